//! The state of a training run on one rank, and how it moves one step, saves and loads:
//! model, flat parameters and gradients, AdamW, the sampler, counters.

use crate::checkpoint::{self, Found, OtherParts, TrainerState, MODEL_FILE, OPTIMIZER_FILE};
use crate::config::{Config, NonFinite};
use crate::data::batches::{batch_tensors, rank_slice, Sampler};
use crate::data::prepare::SplitData;
use crate::dist::{Replicas, World};
use crate::model::flat::FlatParams;
use crate::model::Algpt2;
use crate::optim::adamw::{clip_grad_norm, grads_are_finite};
use crate::optim::AdamW;
use crate::rng::SplitMix64;
use anyhow::{anyhow, bail};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Tensor};

pub struct Trainer {
    cfg: Config,
    device: Device,
    _vs: VarStore,
    pub model: Algpt2,
    pub params: FlatParams,
    opt: AdamW,
    sampler: Sampler,
    /// Optimizer steps completed (skipped non-finite steps included).
    pub step: u64,
    pub tokens_seen: u64,
}

/// What one optimizer step did.
pub struct StepReport {
    /// Mean loss over the step's micro-batches and ranks.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// True when the step was dropped for a non-finite loss or gradient.
    pub skipped: bool,
}

/// Dropout's seed for one micro-step of one rank: a pure function of the run's seed and
/// the position, so a resumed run draws the same masks without saved generator state.
fn dropout_seed(seed: u64, step: u64, micro_step: usize, rank: usize) -> i64 {
    let mixed = seed
        ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (micro_step as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ (rank as u64).wrapping_mul(0x1656_67B1_9E37_79F9);
    (SplitMix64::new(mixed).next_u64() >> 1) as i64
}

impl Trainer {
    /// A freshly initialized model (seeded by `train.seed`) and optimizer.
    pub fn new(cfg: &Config, device: Device, train_windows: u64) -> Trainer {
        tch::manual_seed(cfg.train.seed as i64);
        let vs = VarStore::new(device);
        let model = Algpt2::new(&vs.root(), &cfg.model);
        let params = FlatParams::new(&vs);
        let opt = AdamW::new(&params, &cfg.optim);
        Trainer {
            cfg: cfg.clone(),
            device,
            _vs: vs,
            model,
            params,
            opt,
            sampler: Sampler::new(train_windows, cfg.train.seed),
            step: 0,
            tokens_seen: 0,
        }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Windows per optimizer step, all ranks together.
    pub fn global_batch(&self, world: &World) -> usize {
        self.cfg.train.micro_batch_size * self.cfg.train.grad_accum_steps * world.size()
    }

    /// Epochs of the train split consumed so far.
    pub fn epoch(&self) -> f64 {
        let s = self.sampler.state();
        s.epoch as f64 + s.offset as f64 / self.sampler.windows() as f64
    }

    /// Makes every rank hold rank 0's weights.
    pub fn broadcast_weights(&mut self, replicas: &Replicas) -> anyhow::Result<()> {
        replicas.broadcast(&mut self.params.values)
    }

    /// Stops the run when the ranks' parameters are no longer identical (they must be:
    /// same start, same averaged gradients, same update), naming the ranks that differ.
    pub fn check_ranks_agree(&self, world: &World) -> anyhow::Result<()> {
        let v = self.params.values.to_kind(tch::Kind::Double);
        let local = [v.sum(tch::Kind::Double).double_value(&[]), (&v * &v).sum(tch::Kind::Double).double_value(&[])];
        let all = world.all_gather(&local);
        let differing: Vec<usize> = (1..world.size()).filter(|&r| all[2 * r..2 * r + 2] != all[..2]).collect();
        if !differing.is_empty() {
            bail!(
                "parameters diverged at step {}: rank(s) {differing:?} differ from rank 0 (checksums {:?} vs {:?}); stopping",
                self.step,
                &all[2 * differing[0]..2 * differing[0] + 2],
                &all[..2]
            );
        }
        Ok(())
    }

    /// One optimizer step at learning rate `lr`: micro-steps, gradient averaging across
    /// ranks, the non-finite check, clipping, the update.
    pub fn train_step(&mut self, train: &SplitData, replicas: &Replicas, lr: f64) -> anyhow::Result<StepReport> {
        let world = replicas.world;
        let t = &self.cfg.train;
        let batch = self.sampler.next_batch(self.global_batch(world));
        self.params.zero_grads();
        let mut loss_sum = 0.0;
        for micro in 0..t.grad_accum_steps {
            tch::manual_seed(dropout_seed(t.seed, self.step, micro, world.rank()));
            let windows = rank_slice(&batch, micro, t.micro_batch_size, world.size(), world.rank());
            let (inputs, targets) = batch_tensors(&train.tokens, windows, t.seq_len, self.device);
            let loss = Algpt2::loss(&self.model.forward(&inputs, true), &targets);
            (&loss / t.grad_accum_steps as f64).backward();
            loss_sum += loss.double_value(&[]);
        }
        replicas.average(&mut self.params.grads)?;
        let mut loss = [loss_sum / t.grad_accum_steps as f64];
        world.all_reduce_sum(&mut loss);
        let mut loss = loss[0] / world.size() as f64;
        self.step += 1;
        self.tokens_seen += (batch.len() * t.seq_len) as u64;
        if crate::faults::nan_loss_at(self.step, world.rank()) {
            loss = f64::NAN;
            let _ = self.params.grads.fill_(f64::NAN);
        }

        if !loss.is_finite() || !grads_are_finite(&self.params) {
            let what = if loss.is_finite() { "gradient".to_string() } else { format!("loss ({loss})") };
            match t.nonfinite {
                NonFinite::Stop => bail!(
                    "non-finite {what} at step {}: stopping (the last checkpoint is untouched; set train.nonfinite: skip to drop such steps)",
                    self.step
                ),
                NonFinite::Skip => {
                    tracing::warn!("non-finite {what} at step {}: update skipped (train.nonfinite: skip)", self.step);
                    return Ok(StepReport { loss, grad_norm: f64::NAN, skipped: true });
                }
            }
        }
        let grad_norm = clip_grad_norm(&mut self.params, self.cfg.optim.grad_clip);
        self.opt.step(&mut self.params, lr);
        if crate::faults::diverge_at(self.step, world.rank()) {
            let _ = self.params.values.narrow(0, 0, 1).g_add_scalar_(1e-3);
        }
        Ok(StepReport { loss, grad_norm, skipped: false })
    }

    /// The model's tensors by name, as checkpoints and exports store them.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let p = &self.params;
        p.slots.iter().map(|s| (s.name.clone(), p.values.narrow(0, s.offset, s.numel).view(s.shape.as_slice()))).collect()
    }

    /// Saves a checkpoint of the current step under `root` (rank 0 only), with the parts
    /// other components keep there.
    pub fn save(&self, root: &Path, world: &World, tokenizer_hash: &str, others: &OtherParts) -> anyhow::Result<PathBuf> {
        let optimizer = vec![
            ("exp_avg".to_string(), self.opt.exp_avg.shallow_clone()),
            ("exp_avg_sq".to_string(), self.opt.exp_avg_sq.shallow_clone()),
            ("steps".to_string(), Tensor::from_slice(&[self.opt.steps as i64])),
        ];
        let state = TrainerState {
            format_version: 0,
            step: self.step,
            sampler: self.sampler.state(),
            global_batch: self.global_batch(world),
            world_size: world.size(),
            seed: self.cfg.train.seed,
            model_config: serde_json::to_value(&self.cfg.model)?,
            config_hash: hex::encode(Sha256::digest(self.cfg.to_yaml().as_bytes())),
            tokenizer_hash: tokenizer_hash.to_string(),
            wandb_run_id: others.wandb_run_id.clone(),
            val_loss: others.val_loss,
            best_val_loss: others.best_val_loss,
            tokens_seen: self.tokens_seen,
            checksums: Default::default(),
        };
        let dir = checkpoint::save(root, &self.named_tensors(), &optimizer, state)?;
        checkpoint::retain(root, self.cfg.checkpoint.keep_last)?;
        Ok(dir)
    }

    /// Restores model, optimizer, sampler and counters from a verified checkpoint.
    pub fn load(&mut self, found: &Found, tokenizer_hash: &str, world: &World) -> anyhow::Result<()> {
        let state = &found.state;
        let dir = found.dir.display();
        let ours = serde_json::to_value(&self.cfg.model)?;
        if state.model_config != ours {
            bail!(
                "checkpoint {dir} was made by another model config:\n  checkpoint: {}\n  this run:   {}\nuse the same model section, another run_name, or checkpoint.resume: none",
                state.model_config,
                ours
            );
        }
        if state.tokenizer_hash != tokenizer_hash {
            bail!("checkpoint {dir} was trained with another tokenizer (data or tokenizer config changed); use another run_name");
        }
        if state.global_batch != self.global_batch(world) {
            tracing::warn!(
                "checkpoint {dir} was trained with a global batch of {} windows, this run uses {}: data order continues from the same position",
                state.global_batch,
                self.global_batch(world)
            );
        }
        let model = checkpoint::load_tensors(&found.dir, MODEL_FILE)?;
        let optim = checkpoint::load_tensors(&found.dir, OPTIMIZER_FILE)?;
        self.params.load_named(&model, &format!("checkpoint {dir}"))?;
        tch::no_grad(|| -> anyhow::Result<()> {
            for (name, target) in [("exp_avg", &mut self.opt.exp_avg), ("exp_avg_sq", &mut self.opt.exp_avg_sq)] {
                let t = optim.get(name).ok_or_else(|| anyhow!("checkpoint {dir} lacks optimizer tensor {name}"))?;
                target.copy_(&t.to_device(self.device));
            }
            Ok(())
        })?;
        self.opt.steps = optim.get("steps").map(|t| t.int64_value(&[0]) as u64).unwrap_or(state.step);
        self.sampler.restore(state.sampler).map_err(|e| anyhow!("checkpoint {dir}: {e}"))?;
        self.step = state.step;
        self.tokens_seen = state.tokens_seen;
        Ok(())
    }
}
