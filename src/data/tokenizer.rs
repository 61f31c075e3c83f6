//! Byte-level BPE (HF `tokenizers`): trained on the train split only, or loaded from a
//! `tokenizer.json` or GPT-2's `vocab.json` + `merges.txt`.

use anyhow::{anyhow, bail, Context};
use sha2::{Digest, Sha256};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// The document separator, as in GPT-2.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// A tokenizer with its separator id and a hash that names it in token caches.
pub struct TextTokenizer {
    inner: Tokenizer,
    pub end_of_text: u32,
    /// sha256 of the canonical JSON form: caches record it and refuse another tokenizer.
    pub hash: [u8; 32],
}

/// The byte-level pipeline without a prefix space: a leading space would be added on
/// encode and kept on decode, and decode(encode(x)) == x would break.
fn byte_level_pipeline(model: BPE) -> Tokenizer {
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    tokenizer
}

impl TextTokenizer {
    /// Trains byte-level BPE up to `vocab_size` tokens (the separator included) on
    /// `documents`, which must be the train split alone. A corpus with little variety can
    /// stop short of `vocab_size`.
    pub fn train<I>(documents: I, vocab_size: usize) -> anyhow::Result<TextTokenizer>
    where
        I: Iterator<Item = String> + Send,
    {
        let mut tokenizer = byte_level_pipeline(BPE::default());
        let trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(0)
            .show_progress(false)
            .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut trainer = TrainerWrapper::BpeTrainer(trainer);
        tokenizer.train(&mut trainer, documents).map_err(|e| anyhow!("BPE training failed: {e}"))?;
        TextTokenizer::from_tokenizer(tokenizer, "the trained tokenizer")
    }

    /// Loads `tokenizer.json`, or a directory or `vocab.json` path with GPT-2's
    /// `vocab.json` and `merges.txt`.
    pub fn load(path: &Path) -> anyhow::Result<TextTokenizer> {
        let (vocab, merges) = if path.is_dir() {
            if path.join("tokenizer.json").is_file() {
                return TextTokenizer::load(&path.join("tokenizer.json"));
            }
            (path.join("vocab.json"), path.join("merges.txt"))
        } else if path.file_name().is_some_and(|n| n == "vocab.json") {
            (path.to_path_buf(), path.with_file_name("merges.txt"))
        } else {
            let tokenizer =
                Tokenizer::from_file(path).map_err(|e| anyhow!("tokenizer.path {}: cannot load a tokenizer.json: {e}", path.display()))?;
            return TextTokenizer::from_tokenizer(tokenizer, &path.display().to_string());
        };
        for file in [&vocab, &merges] {
            if !file.is_file() {
                bail!(
                    "tokenizer.path {}: {} is missing (expected tokenizer.json, or vocab.json with merges.txt beside it)",
                    path.display(),
                    file.display()
                );
            }
        }
        let model = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .build()
            .map_err(|e| anyhow!("tokenizer.path {}: cannot load GPT-2 vocab/merges: {e}", path.display()))?;
        let mut tokenizer = byte_level_pipeline(model);
        // GPT-2's vocab.json already holds <|endoftext|>; marking it special keeps it from
        // being split when it appears in text.
        tokenizer
            .add_special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
            .map_err(|e| anyhow!("tokenizer.path {}: cannot mark {END_OF_TEXT} special: {e}", path.display()))?;
        TextTokenizer::from_tokenizer(tokenizer, &path.display().to_string())
    }

    fn from_tokenizer(inner: Tokenizer, origin: &str) -> anyhow::Result<TextTokenizer> {
        let end_of_text =
            inner.token_to_id(END_OF_TEXT).ok_or_else(|| anyhow!("{origin}: has no {END_OF_TEXT} token, which separates documents"))?;
        let json = inner.to_string(false).map_err(|e| anyhow!("{origin}: cannot serialize: {e}"))?;
        let hash = Sha256::digest(json.as_bytes()).into();
        Ok(TextTokenizer { inner, end_of_text, hash })
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let json = self.inner.to_string(true).map_err(|e| anyhow!("cannot serialize tokenizer: {e}"))?;
        crate::run_dir::write_atomic(path, json.as_bytes()).with_context(|| format!("saving {}", path.display()))
    }

    /// Tokens in the vocabulary, the separator included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }

    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow!("encoding failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes many texts on all of the pool's threads, keeping their order.
    pub fn encode_batch(&self, texts: Vec<&str>) -> anyhow::Result<Vec<Vec<u32>>> {
        let encodings = self.inner.encode_batch(texts, false).map_err(|e| anyhow!("encoding failed: {e}"))?;
        Ok(encodings.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        self.inner.decode(ids, false).map_err(|e| anyhow!("decoding failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        let base = "The quick brown fox jumps over the lazy dog. Naïve café — 東京 🚀\n  indented\tline\n";
        (0..50).map(|i| format!("{base} document {i} with numbers {}\n", i * 7919)).collect()
    }

    #[test]
    fn round_trip_holds_for_seen_and_unseen_text() {
        let tok = TextTokenizer::train(corpus().into_iter(), 400).unwrap();
        for text in
            ["The quick brown fox", " leading space and trailing space ", "unseen: Ωμέγα ∑ x² — \u{0}\r\n\r\n", "  = Title = \n", ""]
        {
            let ids = tok.encode(text).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), text, "ids {ids:?}");
        }
    }

    #[test]
    fn separator_is_one_token_and_vocab_respects_the_limit() {
        let tok = TextTokenizer::train(corpus().into_iter(), 300).unwrap();
        assert!(tok.vocab_size() <= 300, "{}", tok.vocab_size());
        let ids = tok.encode("a<|endoftext|>b").unwrap();
        assert_eq!(ids.iter().filter(|&&i| i == tok.end_of_text).count(), 1);
    }

    #[test]
    fn trained_tokenizer_saves_and_loads_with_the_same_hash() {
        let dir = tempfile::tempdir().unwrap();
        let tok = TextTokenizer::train(corpus().into_iter(), 350).unwrap();
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        let loaded = TextTokenizer::load(&path).unwrap();
        assert_eq!(loaded.hash, tok.hash);
        assert_eq!(loaded.encode("jumps over").unwrap(), tok.encode("jumps over").unwrap());
        // A directory holding tokenizer.json loads the same way.
        assert_eq!(TextTokenizer::load(dir.path()).unwrap().hash, tok.hash);
    }

    #[test]
    fn gpt2_vocab_and_merges_load() {
        let dir = tempfile::tempdir().unwrap();
        // A miniature GPT-2 style vocabulary: the 256 byte symbols, one merge, the separator.
        let mut vocab = serde_json::Map::new();
        let mut symbols: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        symbols.sort();
        for (i, c) in symbols.iter().enumerate() {
            vocab.insert(c.to_string(), i.into());
        }
        vocab.insert("th".into(), 256.into());
        vocab.insert(END_OF_TEXT.into(), 257.into());
        std::fs::write(dir.path().join("vocab.json"), serde_json::to_string(&vocab).unwrap()).unwrap();
        std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\nt h\n").unwrap();
        let tok = TextTokenizer::load(&dir.path().join("vocab.json")).unwrap();
        assert_eq!(tok.end_of_text, 257);
        assert_eq!(tok.encode("the").unwrap()[0], 256);
        assert_eq!(tok.decode(&tok.encode("the<|endoftext|>").unwrap()).unwrap(), "the<|endoftext|>");
    }

    #[test]
    fn missing_merges_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vocab.json"), "{}").unwrap();
        let err = TextTokenizer::load(&dir.path().join("vocab.json")).err().unwrap().to_string();
        assert!(err.contains("merges.txt is missing"), "{err}");
    }
}
