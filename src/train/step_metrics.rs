//! The training part of a logged row: loss, lr, gradient norm, progress through the data,
//! and throughput over the steps since the previous logged row (training time only, not
//! evaluation or saving), with what the gradient exchange cost per step over them.

use crate::config::Config;
use crate::model::size::training_flops_per_token;
use crate::parallel::comm_cost::{CommCost, CommTimes};
use crate::parallel::World;
use crate::trainer::{StepOutcome, StepReport, Trainer};
use serde_json::{json, Map, Value};

pub struct TrainMetrics {
    log_interval: u64,
    max_steps: u64,
    flops_per_token: f64,
    /// Peak FLOP/s of all ranks together, when known (MFU).
    peak_flops: Option<f64>,
    seconds: f64,
    tokens: u64,
    /// The exchange's time and the part of it the steps waited for, summed.
    comm: CommTimes,
    /// Steps' costs still on the GPU (NCCL), read when the next row is made.
    comm_on_device: Vec<CommCost>,
    logged_at: u64,
}

impl TrainMetrics {
    pub fn new(cfg: &Config, peak_flops: Option<f64>, start_step: u64) -> TrainMetrics {
        TrainMetrics {
            log_interval: cfg.train.log_interval,
            max_steps: cfg.train.max_steps,
            flops_per_token: training_flops_per_token(&cfg.model, cfg.train.seq_len) as f64,
            peak_flops,
            seconds: 0.0,
            tokens: 0,
            comm: CommTimes::default(),
            comm_on_device: Vec::new(),
            logged_at: start_step,
        }
    }

    /// One more step of `seconds` on `tokens` tokens (all ranks), its exchange `comm`.
    pub fn add(&mut self, seconds: f64, tokens: u64, comm: CommCost) {
        self.seconds += seconds;
        self.tokens += tokens;
        match comm {
            CommCost::Measured(t) => self.add_comm(t),
            on_device => self.comm_on_device.push(on_device),
        }
    }

    fn add_comm(&mut self, t: CommTimes) {
        self.comm.comm_ms += t.comm_ms;
        self.comm.exposed_ms += t.exposed_ms;
    }

    /// Reads the costs still on the GPU (this waits for it: only for a logged row). One
    /// that cannot be read makes the row's exchange times NaN, with a warning.
    fn read_comm_on_device(&mut self) {
        for cost in std::mem::take(&mut self.comm_on_device) {
            match cost.times() {
                Ok(t) => self.add_comm(t),
                Err(e) => {
                    tracing::warn!("the gradient exchange's time is unknown: {e:#}");
                    self.add_comm(CommTimes { comm_ms: f64::NAN, exposed_ms: f64::NAN });
                }
            }
        }
    }

    /// True when step `step` is logged: every `train.log_interval` steps and the last.
    pub fn is_due(&self, step: u64) -> bool {
        step.is_multiple_of(self.log_interval) || step == self.max_steps
    }

    /// The step's values when it is logged, read from the device then and only then (so
    /// a step's time includes waiting for the device). Every rank calls it.
    pub fn read_if_due(&self, outcome: &StepOutcome, step: u64, world: &World) -> Option<StepReport> {
        self.is_due(step).then(|| outcome.read(world))
    }

    /// The step's training metrics when it is logged (`report` from `read_if_due`), else
    /// nothing; logging starts the next throughput window.
    pub fn row(&mut self, report: Option<&StepReport>, lr: f64, trainer: &Trainer) -> Map<String, Value> {
        let step = trainer.step;
        let mut row = Map::new();
        let Some(report) = report else {
            return row;
        };
        let tokens_per_sec = self.tokens as f64 / self.seconds.max(1e-9);
        self.read_comm_on_device();
        row.insert("train/loss".into(), json!(report.loss));
        row.insert("train/lr".into(), json!(lr));
        row.insert("train/grad_norm".into(), json!(report.grad_norm));
        row.insert("train/tokens".into(), json!(trainer.tokens_seen));
        row.insert("train/epoch".into(), json!(trainer.epoch()));
        row.insert("train/tokens_per_sec".into(), json!(tokens_per_sec));
        let steps = (step - self.logged_at).max(1) as f64;
        row.insert("train/step_ms".into(), json!(1000.0 * self.seconds / steps));
        // Per step: the exchange's own time, and how long the step waited for it after
        // backward (all of it when not overlapped).
        row.insert("train/comm_ms".into(), json!(self.comm.comm_ms / steps));
        row.insert("train/comm_exposed_ms".into(), json!(self.comm.exposed_ms / steps));
        if let Some(peak) = self.peak_flops {
            row.insert("train/mfu".into(), json!(self.flops_per_token * tokens_per_sec / peak));
        }
        if report.skipped {
            row.insert("train/skipped".into(), json!(true));
        }
        (self.seconds, self.tokens, self.comm, self.logged_at) = (0.0, 0, CommTimes::default(), step);
        row
    }
}
