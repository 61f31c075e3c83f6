//! Validation during training: every `train.eval_interval` steps and at the last, over
//! `train.eval_steps` batches of the valid split (all of it when 0), on every rank.

use crate::checkpoint::TrainerState;
use crate::config::Config;
use crate::data::cache::SplitData;
use crate::parallel::World;
use crate::perplexity::evaluate;
use crate::report::wandb_run::WandbRun;
use crate::trainer::Trainer;
use serde_json::{json, Map, Value};

pub struct Validator<'a> {
    split: Option<&'a SplitData>,
    /// Validation loss at the current step, when it was evaluated there.
    now: Option<f64>,
    /// The best validation loss so far (restored on resume).
    best: Option<f64>,
    interval: u64,
    max_steps: u64,
    /// Windows evaluated (over all ranks), or all of them.
    limit: Option<u64>,
    seq_len: usize,
    batch: usize,
}

impl<'a> Validator<'a> {
    pub fn new(cfg: &Config, split: Option<&'a SplitData>, world: &World) -> Validator<'a> {
        let t = &cfg.train;
        Validator {
            split,
            now: None,
            best: None,
            interval: t.eval_interval,
            max_steps: t.max_steps,
            limit: (t.eval_steps > 0).then(|| t.eval_steps * (t.micro_batch_size * world.size()) as u64),
            seq_len: t.seq_len,
            batch: t.micro_batch_size,
        }
    }

    /// Continues from a checkpoint's validation losses.
    pub fn restore(&mut self, state: &TrainerState) {
        (self.now, self.best) = (state.val_loss, state.best_val_loss);
    }

    /// The loss at the current step (if evaluated there) and the best so far.
    pub fn losses(&self) -> (Option<f64>, Option<f64>) {
        (self.now, self.best)
    }

    /// Evaluates when due, keeps the loss (and the best so far, for checkpoints) and the
    /// W&B summary, and adds `val/*` to the row; true when it ran.
    pub fn validate_if_due(&mut self, trainer: &Trainer, world: &World, wandb: &WandbRun, row: &mut Map<String, Value>) -> bool {
        let step = trainer.step;
        // A new step has no validation loss until it is evaluated.
        self.now = None;
        let Some(split) = self.split else { return false };
        if !((self.interval > 0 && step.is_multiple_of(self.interval)) || step == self.max_steps) {
            return false;
        }
        let e = evaluate(&trainer.model, split, self.seq_len, self.batch, self.limit, world, trainer.device());
        self.now = Some(e.loss);
        let best = self.best.map_or(e.loss, |b| b.min(e.loss));
        self.best = Some(best);
        wandb.set_summary("val/ppl", json!(e.ppl));
        wandb.set_summary("val/best_ppl", json!(best.exp()));
        row.insert("val/loss".into(), json!(e.loss));
        row.insert("val/ppl".into(), json!(e.ppl));
        if let Some(best) = split.best_loss() {
            row.insert("val/best_achievable_ppl".into(), json!(best.exp()));
        }
        true
    }
}
