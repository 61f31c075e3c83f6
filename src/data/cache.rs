//! The token cache on disk: where a config's cache lives, what its manifest records, and
//! the check that it is whole before anything reads it.
//!
//! The cache directory is named by a fingerprint of everything that shapes its contents
//! (layout, files with sizes and times, tokenizer settings), so another data or
//! tokenizer config never picks up a stale cache. Its manifest, written last, records the
//! tokenizer's hash and a crc32 per 16 MiB of every token file; each process that opens
//! the cache checks all of it (every byte against its checksum, every id against the
//! vocabulary, the tokenizer against its hash) before training on it.

use super::batches::window_count;
use super::source::Sources;
use super::split::Split;
use super::token_file::TokenFile;
use super::tokenizer::TextTokenizer;
use crate::config::Config;
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Bumped whenever the encoding of a split or the manifest changes (2: chunk checksums).
pub const CACHE_FORMAT: u32 = 2;

/// What `manifest.json` records about one split.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SplitStats {
    pub files: Vec<String>,
    pub bytes: u64,
    pub documents: u64,
    pub tokens: u64,
    pub seconds: f64,
    /// Synthetic corpus only: exact negative log-likelihood of the split's text under
    /// its source, in nats; over the predicted tokens it gives the best achievable loss.
    pub source_nll_nats: Option<f64>,
    /// crc32 of each 16 MiB of the split's token file (`TokenFile::chunk_checksums`).
    #[serde(default)]
    pub chunk_crc32: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub cache_format: u32,
    pub fingerprint: String,
    pub tokenizer_hash: String,
    pub vocab_size: usize,
    pub splits: BTreeMap<String, SplitStats>,
}

/// An opened split: its tokens and how many windows they make.
pub struct SplitData {
    pub tokens: TokenFile,
    pub stats: SplitStats,
}

impl SplitData {
    pub fn windows(&self, seq_len: usize) -> u64 {
        window_count(self.tokens.len(), seq_len)
    }

    /// Best achievable mean cross-entropy per predicted token (synthetic corpus only).
    pub fn best_loss(&self) -> Option<f64> {
        self.stats.source_nll_nats.map(|nll| nll / (self.tokens.len().saturating_sub(1)) as f64)
    }
}

/// The opened, verified cache of a config.
pub struct Prepared {
    pub dir: PathBuf,
    pub tokenizer: TextTokenizer,
    pub splits: BTreeMap<&'static str, SplitData>,
}

impl Prepared {
    pub fn split(&self, split: Split) -> Option<&SplitData> {
        self.splits.get(split.name())
    }
}

/// Where a config's cache lives, and the fingerprint that names it.
#[derive(Debug, Clone)]
pub struct CacheLocation {
    pub dir: PathBuf,
    pub fingerprint: String,
}

impl CacheLocation {
    pub fn of(cfg: &Config, sources: &Sources) -> anyhow::Result<CacheLocation> {
        let tokenizer_file_hash = match &cfg.tokenizer.path {
            Some(path) => Some(hash_path(path)?),
            None => None,
        };
        let key = serde_json::json!({
            "cache_format": CACHE_FORMAT,
            "format": cfg.data.format,
            "sources": sources.fingerprints(),
            "tokenizer_vocab_size": cfg.tokenizer.vocab_size,
            "tokenizer_path": cfg.tokenizer.path,
            "tokenizer_file_hash": tokenizer_file_hash,
        });
        let fingerprint = hex::encode(Sha256::digest(key.to_string().as_bytes()));
        let dir = cfg.data.cache_dir.join(format!("{}-{}", sources.label(), &fingerprint[..12]));
        Ok(CacheLocation { dir, fingerprint })
    }

    /// The directory's name, which its lock and temporary builds are named after.
    pub fn name(&self) -> String {
        self.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

/// sha256 of a file, or of `tokenizer.json` / `vocab.json` + `merges.txt` in a directory.
fn hash_path(path: &Path) -> anyhow::Result<String> {
    let files: Vec<PathBuf> = if path.is_dir() {
        ["tokenizer.json", "vocab.json", "merges.txt"].iter().map(|n| path.join(n)).filter(|p| p.is_file()).collect()
    } else if path.file_name().is_some_and(|n| n == "vocab.json") {
        vec![path.to_path_buf(), path.with_file_name("merges.txt")]
    } else {
        vec![path.to_path_buf()]
    };
    let mut hasher = Sha256::new();
    for f in files {
        hasher.update(std::fs::read(&f).with_context(|| format!("tokenizer.path: cannot read {}", f.display()))?);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// A cache that is whole: its manifest, its tokenizer and every token file checked.
pub struct Verified {
    tokenizer: TextTokenizer,
    manifest: Manifest,
    files: BTreeMap<String, TokenFile>,
    /// Bytes of token files checked, and the seconds it took.
    pub bytes: u64,
    pub seconds: f64,
}

/// Checks the cache at `location` from end to end. The error says what is wrong, to be
/// shown when rebuilding it or refusing it.
pub fn verify(location: &CacheLocation) -> Result<Verified, String> {
    let started = Instant::now();
    let dir = &location.dir;
    let manifest = read_manifest(dir).map_err(|e| format!("{e:#}"))?;
    if manifest.cache_format != CACHE_FORMAT || manifest.fingerprint != location.fingerprint {
        return Err(format!("{} was made by another version or for other data", dir.join("manifest.json").display()));
    }
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = TextTokenizer::load(&tokenizer_path).map_err(|e| format!("{e:#}"))?;
    if tokenizer.hash_hex() != manifest.tokenizer_hash {
        return Err(format!("{} is not the tokenizer the manifest records", tokenizer_path.display()));
    }
    let mut files = BTreeMap::new();
    let mut bytes = 0;
    for (split, stats) in &manifest.splits {
        let file = TokenFile::open(&dir.join(format!("{split}.bin"))).map_err(|e| format!("{e:#}"))?;
        if file.tokenizer_hash != tokenizer.hash {
            return Err(format!("{} was made with another tokenizer than the manifest's", file.path.display()));
        }
        if file.len() != stats.tokens {
            return Err(format!("{} holds {} tokens, the manifest says {}", file.path.display(), file.len(), stats.tokens));
        }
        file.verify(&stats.chunk_crc32, tokenizer.vocab_size())?;
        bytes += std::fs::metadata(&file.path).map_or(0, |m| m.len());
        files.insert(split.clone(), file);
    }
    Ok(Verified { tokenizer, manifest, files, bytes, seconds: started.elapsed().as_secs_f64() })
}

/// The verified cache as the run uses it, after the checks that depend on the config
/// rather than on the cache (a model vocabulary too small, a split shorter than a window).
pub fn into_prepared(cfg: &Config, location: &CacheLocation, verified: Verified) -> anyhow::Result<Prepared> {
    let Verified { tokenizer, manifest, mut files, .. } = verified;
    check_vocab(cfg, &tokenizer, &location.dir.join("tokenizer.json"))?;
    let mut splits = BTreeMap::new();
    for split in Split::ALL {
        let Some(stats) = manifest.splits.get(split.name()) else { continue };
        let tokens = files.remove(split.name()).expect("verify opened every split of the manifest");
        let data = SplitData { tokens, stats: stats.clone() };
        if data.windows(cfg.train.seq_len) == 0 {
            bail!(
                "data.{} ({}): {} tokens make no window of train.seq_len + 1 = {} tokens; use more text or a smaller train.seq_len",
                split.name(),
                stats.files.join(", "),
                data.tokens.len(),
                cfg.train.seq_len + 1
            );
        }
        splits.insert(split.name(), data);
    }
    Ok(Prepared { dir: location.dir.clone(), tokenizer, splits })
}

fn read_manifest(dir: &Path) -> anyhow::Result<Manifest> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))
}

pub fn check_vocab(cfg: &Config, tokenizer: &TextTokenizer, origin: &Path) -> anyhow::Result<()> {
    if tokenizer.vocab_size() > cfg.model.vocab_size {
        bail!(
            "the tokenizer {} has {} tokens but model.vocab_size is {}: set model.vocab_size to at least {}",
            origin.display(),
            tokenizer.vocab_size(),
            cfg.model.vocab_size,
            tokenizer.vocab_size()
        );
    }
    Ok(())
}
