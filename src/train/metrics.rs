//! The training part of a logged row: loss, lr, gradient norm, progress through the data,
//! and throughput over the steps since the previous logged row (training time only, not
//! evaluation or saving).

use crate::config::Config;
use crate::dist::World;
use crate::model::size::training_flops_per_token;
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
            logged_at: start_step,
        }
    }

    /// One more step of `seconds` on `tokens` tokens (all ranks).
    pub fn add(&mut self, seconds: f64, tokens: u64) {
        self.seconds += seconds;
        self.tokens += tokens;
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
        row.insert("train/loss".into(), json!(report.loss));
        row.insert("train/lr".into(), json!(lr));
        row.insert("train/grad_norm".into(), json!(report.grad_norm));
        row.insert("train/tokens".into(), json!(trainer.tokens_seen));
        row.insert("train/epoch".into(), json!(trainer.epoch()));
        row.insert("train/tokens_per_sec".into(), json!(tokens_per_sec));
        row.insert("train/step_ms".into(), json!(1000.0 * self.seconds / (step - self.logged_at) as f64));
        if let Some(peak) = self.peak_flops {
            row.insert("train/mfu".into(), json!(self.flops_per_token * tokens_per_sec / peak));
        }
        if report.skipped {
            row.insert("train/skipped".into(), json!(true));
        }
        (self.seconds, self.tokens, self.logged_at) = (0.0, 0, step);
        row
    }
}
