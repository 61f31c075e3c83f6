//! Validation during training: every `train.eval_interval` steps and at the last, over
//! `train.eval_steps` batches of the valid split (all of it when 0), on every rank.

use crate::config::Config;
use crate::data::prepare::SplitData;
use crate::dist::World;
use crate::evaluation::evaluate;
use crate::report::wandb_run::WandbRun;
use crate::trainer::Trainer;
use serde_json::{json, Map, Value};

pub struct Validator<'a> {
    split: Option<&'a SplitData>,
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
            interval: t.eval_interval,
            max_steps: t.max_steps,
            limit: (t.eval_steps > 0).then(|| t.eval_steps * (t.micro_batch_size * world.size()) as u64),
            seq_len: t.seq_len,
            batch: t.micro_batch_size,
        }
    }

    /// Evaluates when due, records the loss in the trainer (best so far, for checkpoints)
    /// and the W&B summary, and adds `val/*` to the row; true when it ran.
    pub fn validate_if_due(&self, trainer: &mut Trainer, world: &World, wandb: &WandbRun, row: &mut Map<String, Value>) -> bool {
        let step = trainer.step;
        let Some(split) = self.split else { return false };
        if !((self.interval > 0 && step % self.interval == 0) || step == self.max_steps) {
            return false;
        }
        let e = evaluate(&trainer.model, split, self.seq_len, self.batch, self.limit, world, trainer.device());
        trainer.record_val_loss(e.loss);
        wandb.set_summary("val/ppl", json!(e.ppl));
        if let Some(best) = trainer.best_val_loss {
            wandb.set_summary("val/best_ppl", json!(best.exp()));
        }
        row.insert("val/loss".into(), json!(e.loss));
        row.insert("val/ppl".into(), json!(e.ppl));
        if let Some(best) = split.best_loss() {
            row.insert("val/best_achievable_ppl".into(), json!(best.exp()));
        }
        true
    }
}
