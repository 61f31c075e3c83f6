//! When the loop saves, and what a failed save does (`checkpoint.on_save_error`): rank 0
//! writes, every rank learns whether it worked, and all stop together or all go on.

use super::run_checkpoints::RunCheckpoints;
use crate::checkpoint::LoopState;
use crate::config::{Config, OnSaveError};
use crate::parallel::phase::Phase;
use crate::parallel::World;
use crate::report::progress::Progress;
use crate::run_dir::RunDir;
use crate::trainer::Trainer;
use anyhow::bail;
use std::path::PathBuf;

pub struct Checkpointer<'a> {
    run: &'a RunDir,
    save_interval: u64,
    max_steps: u64,
    on_error: OnSaveError,
    /// Where a save goes and what it records.
    checkpoints: RunCheckpoints<'a>,
}

impl<'a> Checkpointer<'a> {
    pub fn new(cfg: &Config, run: &'a RunDir, checkpoints: RunCheckpoints<'a>) -> Checkpointer<'a> {
        Checkpointer {
            run,
            save_interval: cfg.train.save_interval,
            max_steps: cfg.train.max_steps,
            on_error: cfg.checkpoint.on_save_error,
            checkpoints,
        }
    }

    /// Saves at every `save_interval`-th step, at the last step and when stopping.
    /// True when step `step` ends with a save.
    pub fn is_due(&self, step: u64, stopping: bool) -> bool {
        (self.save_interval > 0 && step.is_multiple_of(self.save_interval)) || step == self.max_steps || stopping
    }

    pub fn save_if_due(
        &self,
        trainer: &Trainer,
        others: &LoopState,
        world: &World,
        progress: &Progress,
        stopping: bool,
    ) -> anyhow::Result<()> {
        let (step, last) = (trainer.step, trainer.step == self.max_steps);
        if !self.is_due(step, stopping) {
            return Ok(());
        }
        // Not timed while rank 0 writes (a slow fsync is no hang) and the others wait for
        // it; rank 0 waits for the verdict timed again (src/parallel/phase.rs).
        Phase::Saving.enter();
        let saved = if world.is_main() {
            let saved = self.checkpoints.save(trainer, world, others);
            Phase::Training.enter();
            saved
        } else {
            Ok(PathBuf::new())
        };
        // Every rank learns whether rank 0's save worked, so that all stop together
        // (or all go on) instead of the others waiting on a rank that left.
        let mut failed = [saved.is_err() as u8 as f64];
        world.all_reduce_max(&mut failed);
        Phase::Training.enter();
        match saved {
            Ok(dir) if failed[0] == 0.0 => {
                if world.is_main() {
                    progress.line(&format!("saved {}", dir.display()));
                }
                Ok(())
            }
            result => {
                let why = match result {
                    Err(e) => format!("{e:#}"),
                    Ok(_) => "rank 0 could not save its checkpoint (its log says why)".to_string(),
                };
                let previous = if world.is_main() {
                    crate::checkpoint::list_valid(&self.run.checkpoints())
                        .last()
                        .map_or("there is no earlier checkpoint".to_string(), |f| format!("{} is intact", f.dir.display()))
                } else {
                    "rank 0 names the checkpoint to resume from".to_string()
                };
                let keep_going = self.on_error == OnSaveError::Continue && !last && !stopping;
                if !keep_going {
                    bail!(
                        "{why}; {previous}; stopping at step {step} (free space, then run the same command to resume{})",
                        if self.on_error == OnSaveError::Stop { "; checkpoint.on_save_error: continue trains on" } else { "" }
                    );
                }
                tracing::warn!(
                    "{why}; {previous}; training on (checkpoint.on_save_error: continue), next try at step {}",
                    self.next_save_step(step)
                );
                Ok(())
            }
        }
    }

    /// The step of the next periodic save after `step` (the final step when none comes first).
    fn next_save_step(&self, step: u64) -> u64 {
        if self.save_interval == 0 {
            return self.max_steps;
        }
        ((step / self.save_interval + 1) * self.save_interval).min(self.max_steps)
    }
}
