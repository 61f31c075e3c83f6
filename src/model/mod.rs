//! The ALGPT2 model family: GPT-2, sharing-only and sharing + factorized embeddings.

pub mod memory;
pub mod size;

pub mod gpt;

pub use gpt::{Algpt2, KvCache};
pub mod classifier;
pub mod dropout;
pub mod flat;
pub mod objective;
pub mod precision;
pub mod stages;
