//! What of the trainer a checkpoint holds: handed out for a save (`snapshot`) and taken
//! back on resume (`restore`). Where it is written, what is recorded beside it and whether
//! a checkpoint fits this run are the checkpoint code's (src/train/run_checkpoints.rs).

use super::Trainer;
use crate::data::batches::SamplerState;
use anyhow::anyhow;
use std::collections::BTreeMap;
use tch::Tensor;

/// The trainer's state at its current step, for a save.
pub struct TrainerSnapshot {
    /// The model's tensors by name, in the flat buffer's order.
    pub model: Vec<(String, Tensor)>,
    /// AdamW's moments (`exp_avg`, `exp_avg_sq`) and its step count (`steps`).
    pub optimizer: Vec<(String, Tensor)>,
    /// Optimizer steps completed.
    pub step: u64,
    pub tokens_seen: u64,
    pub sampler: SamplerState,
}

/// A trainer's state as a checkpoint gives it back.
pub struct SavedTrainer {
    /// Where it comes from, as errors name it (`checkpoint <dir>`).
    pub origin: String,
    pub model: BTreeMap<String, Tensor>,
    pub optimizer: BTreeMap<String, Tensor>,
    /// Optimizer steps completed; also AdamW's step count where `optimizer` lacks `steps`.
    pub step: u64,
    pub tokens_seen: u64,
    pub sampler: SamplerState,
}

impl Trainer {
    /// The model, the optimizer and the counters as they stand.
    pub fn snapshot(&self) -> TrainerSnapshot {
        let p = &self.params;
        let model = p.slots.iter().map(|s| (s.name.clone(), p.values.narrow(0, s.offset, s.numel).view(s.shape.as_slice()))).collect();
        let optimizer = vec![
            ("exp_avg".to_string(), self.opt.exp_avg.shallow_clone()),
            ("exp_avg_sq".to_string(), self.opt.exp_avg_sq.shallow_clone()),
            ("steps".to_string(), Tensor::from_slice(&[self.opt.steps() as i64])),
        ];
        TrainerSnapshot { model, optimizer, step: self.step, tokens_seen: self.tokens_seen, sampler: self.sampler.state() }
    }

    /// Takes back model, optimizer, sampler and counters from a saved state.
    pub fn restore(&mut self, saved: SavedTrainer) -> anyhow::Result<()> {
        let origin = &saved.origin;
        self.params.load_named(&saved.model, origin)?;
        tch::no_grad(|| -> anyhow::Result<()> {
            for (name, target) in [("exp_avg", &mut self.opt.exp_avg), ("exp_avg_sq", &mut self.opt.exp_avg_sq)] {
                let t = saved.optimizer.get(name).ok_or_else(|| anyhow!("{origin} lacks optimizer tensor {name}"))?;
                target.copy_(&t.to_device(self.device));
            }
            Ok(())
        })?;
        self.opt.set_steps(saved.optimizer.get("steps").map(|t| t.int64_value(&[0]) as u64).unwrap_or(saved.step));
        self.sampler.restore(saved.sampler).map_err(|e| anyhow!("{origin}: {e}"))?;
        self.step = saved.step;
        self.tokens_seen = saved.tokens_seen;
        self.refresh_compute_weights();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use tch::Device;

    fn tiny(seed: u64) -> Config {
        let yaml = format!(
            "run_name: state
data: {{ format: synthetic }}
tokenizer: {{ vocab_size: 320 }}
model: {{ vocab_size: 320, n_positions: 32, n_embd: 32, embedding_size: 16, n_layer: 1, n_head: 2 }}
train: {{ seq_len: 32, micro_batch_size: 2, grad_accum_steps: 1, max_steps: 10, seed: {seed}, precision: fp32 }}
wandb: {{ mode: disabled }}
"
        );
        crate::config::parse(&yaml, "a tiny model", &[]).unwrap()
    }

    fn saved(snapshot: TrainerSnapshot) -> SavedTrainer {
        SavedTrainer {
            origin: "checkpoint x".into(),
            model: snapshot.model.into_iter().collect(),
            optimizer: snapshot.optimizer.into_iter().collect(),
            step: snapshot.step,
            tokens_seen: snapshot.tokens_seen,
            sampler: snapshot.sampler,
        }
    }

    /// What one trainer hands out, another (of other weights) takes back whole.
    #[test]
    fn a_restored_trainer_hands_out_the_state_it_took_back() {
        let mut a = Trainer::new(&tiny(1), Device::Cpu, 100);
        tch::no_grad(|| {
            let _ = a.params.values.g_add_scalar_(0.5);
            let _ = a.opt.exp_avg.fill_(0.25);
            let _ = a.opt.exp_avg_sq.fill_(0.125);
        });
        a.opt.set_steps(3);
        a.sampler.next_batch(30);
        (a.step, a.tokens_seen) = (3, 3 * 64);
        let mut b = Trainer::new(&tiny(2), Device::Cpu, 100);
        b.restore(saved(a.snapshot())).unwrap();
        let (want, got) = (a.snapshot(), b.snapshot());
        assert_eq!((got.step, got.tokens_seen, got.sampler), (want.step, want.tokens_seen, want.sampler));
        for (w, g) in want.model.iter().chain(&want.optimizer).zip(got.model.iter().chain(&got.optimizer)) {
            assert_eq!(w.0, g.0);
            assert!(w.1.equal(&g.1), "{} differs", w.0);
        }
        assert_eq!(b.opt.steps(), 3);
    }

    #[test]
    fn a_missing_optimizer_tensor_is_named_with_its_origin() {
        let mut a = Trainer::new(&tiny(1), Device::Cpu, 100);
        let mut state = saved(a.snapshot());
        state.optimizer.remove("exp_avg_sq");
        let err = a.restore(state).unwrap_err().to_string();
        assert_eq!(err, "checkpoint x lacks optimizer tensor exp_avg_sq");
        // Without `steps` (an older checkpoint), AdamW counts the trainer's steps.
        let mut state = saved(a.snapshot());
        state.optimizer.remove("steps");
        state.step = 7;
        a.restore(state).unwrap();
        assert_eq!(a.opt.steps(), 7);
    }
}
