//! What a run tells people: log lines, metrics.jsonl, progress, Weights & Biases.

pub mod format;
pub mod log;
pub mod metrics;
pub mod plots;
pub mod progress;
pub mod wandb;
pub mod wandb_run;
