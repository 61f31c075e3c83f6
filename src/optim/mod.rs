//! Optimization: AdamW over the flat buffers, global-norm clipping, the lr schedule.

pub mod adamw;
mod fused;
pub mod schedule;

pub use adamw::AdamW;
pub use schedule::learning_rate;
