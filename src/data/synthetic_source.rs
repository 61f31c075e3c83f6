//! The embedded default corpus as a data source: the synthetic language's documents,
//! one split each, with their exact likelihood under the source.

use super::split::{Piece, Split};
use super::synthetic::{self, SyntheticLanguage};

fn split_of(split: Split) -> (synthetic::Split, usize) {
    match split {
        Split::Train => (synthetic::Split::Train, synthetic::DEFAULT_TRAIN_BYTES),
        Split::Valid => (synthetic::Split::Valid, synthetic::DEFAULT_EVAL_BYTES),
        Split::Test => (synthetic::Split::Test, synthetic::DEFAULT_EVAL_BYTES),
    }
}

/// The split's documents, one piece each.
pub fn pieces(split: Split) -> impl Iterator<Item = Piece> + Send {
    let (which, bytes) = split_of(split);
    let language = SyntheticLanguage::new(synthetic::DEFAULT_SEED);
    let documents: Vec<Piece> = language.documents(which, bytes).map(|d| Piece { text: d.text, starts_document: true }).collect();
    documents.into_iter()
}

/// Negative log-likelihood of the whole split under its source, in nats.
pub fn source_nll(split: Split) -> f64 {
    let (which, bytes) = split_of(split);
    SyntheticLanguage::new(synthetic::DEFAULT_SEED).documents(which, bytes).map(|d| d.nll_nats).sum()
}
