//! Optimization: AdamW over the flat buffers, global-norm clipping, the lr schedule, and
//! what becomes of non-finite steps.

pub mod adamw;
mod fused;
pub mod nonfinite;
pub mod schedule;

pub use adamw::AdamW;
pub use schedule::learning_rate;
