//! The ALGPT2 model family: GPT-2, sharing-only and sharing + factorized embeddings.

pub mod size;
