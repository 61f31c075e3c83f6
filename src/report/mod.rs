//! What a run tells people: log lines, metrics.jsonl, progress, Weights & Biases.

pub mod console;
pub mod format;
pub mod log;
pub mod metrics_log;
pub mod plots;
pub mod progress;
pub mod system;
pub mod wandb_run;

/// The W&B client (the `algpt2-wandb` crate of this workspace).
pub use algpt2_wandb as wandb;
