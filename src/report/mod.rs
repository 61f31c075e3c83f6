//! What a run tells people: log lines now; metrics, progress and W&B join later.

pub mod log;
pub mod metrics;
pub mod progress;
