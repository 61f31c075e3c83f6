//! This run's checkpoints, as the trainer's state goes into them and comes back: what a
//! save records beside that state (`TrainerState`), retention, the other runs'
//! checkpoints named, and the checks and notes of a resume. The file format is
//! src/checkpoint.rs's; when to save is the checkpointer's.

use crate::checkpoint::compat::{self, ResumingRun};
use crate::checkpoint::other_runs::OtherRunsNamed;
use crate::checkpoint::{self, Found, LoopState, RunIdentity, TrainerState, MODEL_FILE, OPTIMIZER_FILE};
use crate::config::Config;
use crate::parallel::World;
use crate::run_dir::RunDir;
use crate::trainer::{SavedTrainer, Trainer, TrainerSnapshot};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

pub struct RunCheckpoints<'a> {
    cfg: &'a Config,
    /// The run directory's `checkpoints/`.
    root: PathBuf,
    /// What this run's checkpoints share; its run id is drawn here, or the resumed
    /// checkpoint's.
    identity: RunIdentity,
    other_runs: OtherRunsNamed,
}

impl<'a> RunCheckpoints<'a> {
    pub fn new(cfg: &'a Config, run: &RunDir, tokenizer_hash: String) -> anyhow::Result<RunCheckpoints<'a>> {
        let identity =
            RunIdentity { run_id: algpt2_wandb::generate_run_id(), model_config: serde_json::to_value(&cfg.model)?, tokenizer_hash };
        Ok(RunCheckpoints { cfg, root: run.checkpoints(), identity, other_runs: OtherRunsNamed::default() })
    }

    /// Saves a checkpoint of the trainer's current step (rank 0 only), with the parts
    /// other components keep there, then applies retention.
    pub fn save(&self, trainer: &Trainer, world: &World, others: &LoopState) -> anyhow::Result<PathBuf> {
        let TrainerSnapshot { model, optimizer, step, tokens_seen, sampler } = trainer.snapshot();
        let state = TrainerState {
            format_version: 0,
            step,
            sampler,
            global_batch: trainer.global_batch(world),
            world_size: world.size(),
            seed: self.cfg.train.seed,
            model_config: self.identity.model_config.clone(),
            config_hash: hex::encode(Sha256::digest(self.cfg.to_yaml().as_bytes())),
            settings: Some(crate::resume_settings::of(self.cfg, &trainer.precision)),
            tokenizer_hash: self.identity.tokenizer_hash.clone(),
            wandb_run_id: others.wandb_run_id.clone(),
            run_id: Some(self.identity.run_id.clone()),
            val_loss: others.val_loss,
            best_val_loss: others.best_val_loss,
            tokens_seen,
            checksums: Default::default(),
        };
        let dir = checkpoint::save(&self.root, &model, &optimizer, state)?;
        let others = checkpoint::retain(&self.root, self.cfg.checkpoint.keep_last, &self.identity)?;
        self.other_runs.warn(&others, &self.identity);
        Ok(dir)
    }

    /// Restores the trainer from a verified checkpoint that fits this run, which goes on
    /// as the checkpoint's run.
    pub fn resume(&mut self, found: &Found, trainer: &mut Trainer, world: &World) -> anyhow::Result<()> {
        let settings = crate::resume_settings::of(self.cfg, &trainer.precision);
        let run = ResumingRun {
            model_config: &self.identity.model_config,
            tokenizer_hash: &self.identity.tokenizer_hash,
            global_batch: trainer.global_batch(world),
            settings: &settings,
            train_windows: trainer.train_windows(),
            seq_len: self.cfg.train.seq_len,
        };
        compat::check(found, &run)?;
        if world.is_main() {
            compat::log_changes(found, &run);
        }
        let state = &found.state;
        trainer.restore(SavedTrainer {
            origin: format!("checkpoint {}", found.dir.display()),
            model: checkpoint::load_tensors(&found.dir, MODEL_FILE)?,
            optimizer: checkpoint::load_tensors(&found.dir, OPTIMIZER_FILE)?,
            step: state.step,
            tokens_seen: state.tokens_seen,
            sampler: state.sampler,
        })?;
        if let Some(id) = &state.run_id {
            self.identity.run_id = id.clone();
        }
        if world.is_main() {
            self.other_runs.warn(&checkpoint::scan(&self.root).0, &self.identity);
        }
        Ok(())
    }
}
