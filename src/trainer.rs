//! The state of a training run on one rank, and how it moves one step: model, flat
//! parameters and gradients, AdamW, the sampler, counters. What of it a checkpoint holds
//! is handed out and taken back in `state`; the files are the checkpoint code's.

mod state;

pub use state::{SavedTrainer, TrainerSnapshot};

use crate::config::Config;
use crate::data::batches::{input_ids, MicroBatches, Sampler};
use crate::data::cache::SplitData;
use crate::faults::{self, StepFaults};
use crate::host_waits;
use crate::model::dropout::Dropout;
use crate::model::flat::{FlatParams, Padding};
use crate::model::objective::Objective;
use crate::model::precision::{self, Bf16Weights, ComputePrecision};
use crate::model::stages::TOKEN_TABLE;
use crate::model::Algpt2;
use crate::optim::adamw::norm_clip_and_skip;
use crate::optim::nonfinite::NonFiniteSteps;
use crate::optim::AdamW;
use crate::parallel::buckets::BucketPlan;
use crate::parallel::comm_cost::CommCost;
use crate::parallel::{DataParallel, LastBackward, World};
use anyhow::{bail, Context};
use sha2::{Digest, Sha256};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

pub struct Trainer {
    cfg: Config,
    device: Device,
    _vs: VarStore,
    pub model: Algpt2,
    pub params: FlatParams,
    /// The precision in use, and in bf16 the compute copies of the weights.
    pub precision: ComputePrecision,
    bf16: Option<Bf16Weights>,
    objective: Objective,
    opt: AdamW,
    sampler: Sampler,
    /// The gradients' buckets, in the order backward completes them.
    buckets: BucketPlan,
    /// Non-finite steps not yet reported, and `train.nonfinite`'s verdict on them.
    nonfinite: NonFiniteSteps,
    /// Optimizer steps completed (skipped non-finite steps included).
    pub step: u64,
    pub tokens_seen: u64,
}

/// What one optimizer step did, read back from the device (`StepOutcome::read`).
pub struct StepReport {
    /// Mean loss over the step's micro-batches and ranks.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// True when the step was dropped for a non-finite loss or gradient.
    pub skipped: bool,
}

/// What one optimizer step did, still on the device: nothing is read until a log row,
/// a save or the end asks (`read`), so the step never waits for the device.
pub struct StepOutcome {
    /// This rank's mean loss over its micro-batches.
    local_loss: Tensor,
    grad_norm: Tensor,
    skipped: Tensor,
    /// What the gradient exchange cost (host times, known at once).
    pub comm: CommCost,
    /// What the fault plan asked of the step; the process faults are the loop's to act on.
    pub faults: StepFaults,
}

impl StepOutcome {
    /// The step's values on the host: one read, and the ranks' losses averaged (every
    /// rank must call it at the same step).
    pub fn read(&self, world: &World) -> StepReport {
        let values = host_waits::read(&Tensor::stack(
            &[self.local_loss.to_kind(Kind::Double), self.grad_norm.to_kind(Kind::Double), self.skipped.to_kind(Kind::Double)],
            0,
        ));
        let mut loss = [values[0]];
        world.all_reduce_sum(&mut loss);
        StepReport { loss: loss[0] / world.size() as f64, grad_norm: values[1], skipped: values[2] != 0.0 }
    }
}

impl Trainer {
    /// A freshly initialized model (seeded by `train.seed`) and optimizer.
    pub fn new(cfg: &Config, device: Device, train_windows: u64) -> Trainer {
        tch::manual_seed(cfg.train.seed as i64);
        let vs = VarStore::new(device);
        let mut model = Algpt2::new(&vs.root(), &cfg.model);
        let padded_rows = cfg.model.vocab_size.div_ceil(cfg.train.pad_vocab_multiple) * cfg.train.pad_vocab_multiple;
        let params = FlatParams::new_padded(&vs, Some(Padding { name: "wte", rows: padded_rows as i64 }));
        let precision = precision::resolve(cfg.train.precision, device);
        let bf16 = precision.bf16.then(|| Bf16Weights::new(&params));
        if let Some(weights) = &bf16 {
            model.use_compute_weights(&|name| weights.get(name));
        }
        let opt = AdamW::new(&params, &cfg.optim);
        let bucket_elems = ((cfg.dist.bucket_mb * (1 << 20) as f64) as i64 / 4).max(1);
        let buckets = BucketPlan::with_table(&params.slots, &model.stage_prefixes(), bucket_elems, Some(TOKEN_TABLE));
        Trainer {
            cfg: cfg.clone(),
            device,
            _vs: vs,
            model,
            params,
            precision,
            bf16,
            objective: Objective {
                vocab: cfg.model.vocab_size as i64,
                chunk_rows: cfg.train.classifier_chunk_rows,
                grad_accum_steps: cfg.train.grad_accum_steps,
            },
            opt,
            sampler: Sampler::new(train_windows, cfg.train.seed),
            buckets,
            nonfinite: NonFiniteSteps::new(cfg.train.nonfinite, device),
            step: 0,
            tokens_seen: 0,
        }
    }

    /// Casts the master weights into the compute copies (bf16 only): after every change
    /// of the fp32 weights (update, load, broadcast), once.
    fn refresh_compute_weights(&mut self) {
        if let Some(weights) = &mut self.bf16 {
            weights.refresh(&self.params);
        }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Windows per optimizer step, all ranks together.
    pub fn global_batch(&self, world: &World) -> usize {
        self.cfg.train.micro_batch_size * self.cfg.train.grad_accum_steps * world.size()
    }

    /// Windows in the train split (one epoch).
    pub fn train_windows(&self) -> u64 {
        self.sampler.windows()
    }

    /// Epochs of the train split consumed so far.
    pub fn epoch(&self) -> f64 {
        let s = self.sampler.state();
        s.epoch as f64 + s.offset as f64 / self.sampler.windows() as f64
    }

    /// Makes every rank hold rank 0's weights.
    pub fn broadcast_weights(&mut self, replicas: &DataParallel) -> anyhow::Result<()> {
        replicas.broadcast(&mut self.params.values)?;
        self.refresh_compute_weights();
        Ok(())
    }

    /// What the gradient exchange's collectives are shaped by, for the ranks to agree on
    /// before the first (src/parallel/same_job.rs): a rank whose buffer or buckets differ
    /// would send or receive past another's buffer.
    pub fn exchange_layout(&self) -> crate::parallel::same_job::Facts {
        let mut facts = crate::parallel::same_job::Facts::default();
        facts.add("gradient values", self.params.grads.numel().to_string());
        facts.add("gradient buckets", hex::encode(Sha256::digest(format!("{:?}", self.buckets).as_bytes())));
        facts.add("token table rows", format!("{:?}", self.buckets.table));
        facts
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

    /// One optimizer step at learning rate `lr`: micro-steps (forward, fused loss,
    /// backward), gradient averaging across ranks, the non-finite check, clipping and the
    /// update, all on the device: nothing here reads a device value.
    pub fn train_step(&mut self, train: &SplitData, replicas: &DataParallel, lr: f64) -> anyhow::Result<StepOutcome> {
        let world = replicas.world;
        let faults = faults::at_step(self.step + 1, world.rank());
        let t = self.cfg.train.clone();
        let batch = self.sampler.next_batch(self.global_batch(world));
        self.params.zero_grads();
        let mut loss_sum = Tensor::zeros([], (Kind::Float, self.device));
        let mut local_loss = loss_sum.shallow_clone();
        let mut comm = CommCost::default();
        let mut feed = MicroBatches::new(&train.tokens, &batch, t.micro_batch_size, t.seq_len, world.size(), world.rank(), self.device);
        for micro in 0..t.grad_accum_steps {
            let last = micro + 1 == t.grad_accum_steps;
            let dropout = Dropout::new(self.cfg.model.dropout, t.seed, self.step, micro, world.rank());
            let windows = feed.windows(micro);
            let (inputs, targets) = feed.take(micro);
            // Staged only where stages complete gradients early: with shared layers only
            // the token table's whole part is complete before the end.
            let staged = last && replicas.overlaps() && self.model.stageable();
            let forwarded = self
                .objective
                .forward(&self.model, &self.params, self.bf16.as_ref(), &inputs, &targets, Some(&dropout), staged)
                .with_context(|| format!("step {}, micro-step {micro}: forward", self.step))?;
            // The next micro-batch, its copy queued while this forward runs, before this backward.
            feed.prepare(micro + 1);
            loss_sum += &forwarded.loss;
            if !last {
                forwarded.backward(&mut self.params, self.bf16.as_mut(), &mut |_| {});
                continue;
            }
            local_loss = &loss_sum / t.grad_accum_steps as f64;
            // A non-finite loss on any rank must reach every rank's skip decision.
            NonFiniteSteps::poison_gradients(&self.params.grads, &mut local_loss, faults.nan_loss);
            // The last backward, and the gradients' exchange with it (bucket by bucket
            // as backward completes them, when overlapped).
            let grads = self.params.grads.shallow_clone();
            let last_backward = LastBackward { plan: &self.buckets, staged, input_ids: input_ids(&train.tokens, windows, t.seq_len) };
            let (params, bf16) = (&mut self.params, self.bf16.as_mut());
            comm = replicas.backward_and_average(&grads, last_backward, |ready| forwarded.backward(params, bf16, ready))?;
        }
        self.step += 1;
        self.tokens_seen += (batch.len() * t.seq_len) as u64;

        let (grad_norm, clip_coef, skipped) = norm_clip_and_skip(&self.params.grads, self.cfg.optim.grad_clip);
        self.nonfinite.record(self.step, &skipped, &local_loss);
        self.opt.step_guarded(&mut self.params, lr, &clip_coef, &skipped)?;
        if faults.diverge {
            let _ = self.params.values.narrow(0, 0, 1).g_add_scalar_(1e-3);
        }
        self.refresh_compute_weights();
        Ok(StepOutcome { local_loss, grad_norm, skipped, comm, faults })
    }

    /// Reports the non-finite steps since the last call (one read): with
    /// `train.nonfinite: stop` the first one ends the run; with `skip` each is a warning.
    pub fn enforce_nonfinite_policy(&mut self) -> anyhow::Result<()> {
        self.nonfinite.enforce_policy(self.step)
    }
}
