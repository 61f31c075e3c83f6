//! From text files to packed, sharded, resumable batches: sources and their layouts,
//! the tokenizer, the token cache, windows and the sampler, and the dataset download.

pub mod batches;
pub mod cache;
pub mod download;
mod lines;
pub mod parquet;
pub mod prepare;
mod sniff;
pub mod source;
mod split;
pub mod summary;
pub mod synthetic;
mod synthetic_source;
pub mod token_file;
pub mod tokenizer;

pub use split::{Piece, Split};
