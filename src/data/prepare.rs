//! The token cache: each split encoded once into a token file, beside the tokenizer that
//! made it and a manifest written last. The cache directory is named by a fingerprint of
//! everything that shapes its contents (layout, files with sizes and times, tokenizer
//! settings), so another data or tokenizer config can never pick up a stale cache.

use super::batches::window_count;
use super::source::{fingerprint, pieces, split_files, Piece, Split, SplitFiles};
use super::token_file::{token_width, TokenFile, TokenWriter};
use super::tokenizer::TextTokenizer;
use crate::config::{Config, DataFormat};
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;
use tracing::info;

/// Bumped whenever the encoding of a split changes (separators, piece boundaries...).
const CACHE_FORMAT: u32 = 1;
/// Text handed to the tokenizer's thread pool at once: large enough to keep every core
/// busy, small enough to bound memory.
const ENCODE_BATCH_BYTES: usize = 8 << 20;

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

/// The opened cache of a config.
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

/// The cache directory of `cfg` and the fingerprint naming it.
pub fn cache_location(cfg: &Config) -> anyhow::Result<(PathBuf, String)> {
    let mut sources = BTreeMap::new();
    for split in Split::ALL {
        if let Some(files) = split_files(&cfg.data, split)? {
            sources.insert(split.name(), fingerprint(&files)?);
        }
    }
    let tokenizer_file_hash = match &cfg.tokenizer.path {
        Some(path) => Some(hash_path(path)?),
        None => None,
    };
    let key = serde_json::json!({
        "cache_format": CACHE_FORMAT,
        "format": cfg.data.format,
        "sources": sources,
        "tokenizer_vocab_size": cfg.tokenizer.vocab_size,
        "tokenizer_path": cfg.tokenizer.path,
        "tokenizer_file_hash": tokenizer_file_hash,
    });
    let fingerprint = hex::encode(Sha256::digest(key.to_string().as_bytes()));
    let label = match cfg.data.format {
        DataFormat::Synthetic => "synthetic".to_string(),
        _ => split_files(&cfg.data, Split::Train)?
            .and_then(|f| f.files[0].parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "data".to_string()),
    };
    Ok((cfg.data.cache_dir.join(format!("{label}-{}", &fingerprint[..12])), fingerprint))
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

/// Builds the cache unless a complete one exists (or `force`), then opens it.
pub fn prepare(cfg: &Config, force: bool) -> anyhow::Result<Prepared> {
    let (dir, fingerprint) = cache_location(cfg)?;
    if force && dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    if let Some(problem) = cache_problem(&dir, &fingerprint) {
        if dir.exists() {
            tracing::warn!("token cache {} is damaged ({problem}): rebuilding it", dir.display());
        }
        build(cfg, &dir, &fingerprint)?;
    } else {
        info!("token cache {} is complete", dir.display());
    }
    open(cfg)
}

/// Opens the complete cache of `cfg`; an error says how to build it.
pub fn open(cfg: &Config) -> anyhow::Result<Prepared> {
    let (dir, fingerprint) = cache_location(cfg)?;
    if let Some(problem) = cache_problem(&dir, &fingerprint) {
        if dir.exists() {
            bail!("token cache {} is damaged ({problem}): run `algpt2-ddp prepare --config ...` to rebuild it", dir.display());
        }
        bail!("no complete token cache at {} (run `algpt2-ddp prepare --config ...`)", dir.display());
    }
    let manifest = read_manifest(&dir)?;
    let tokenizer = TextTokenizer::load(&dir.join("tokenizer.json"))?;
    check_vocab(cfg, &tokenizer, &dir.join("tokenizer.json"))?;
    let mut splits = BTreeMap::new();
    for split in Split::ALL {
        let Some(stats) = manifest.splits.get(split.name()) else { continue };
        let tokens = TokenFile::open(&dir.join(format!("{}.bin", split.name())))?;
        if tokens.tokenizer_hash != tokenizer.hash || tokens.len() != stats.tokens {
            bail!("{} does not match its tokenizer or manifest: delete {} to rebuild", tokens.path.display(), dir.display());
        }
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
    Ok(Prepared { dir, tokenizer, splits })
}

fn read_manifest(dir: &Path) -> anyhow::Result<Manifest> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))
}

/// A cache counts only once its manifest (written last) matches and every token file it
/// lists opens with the tokenizer's hash.
fn is_complete(dir: &Path, fingerprint: &str) -> bool {
    cache_problem(dir, fingerprint).is_none()
}

/// Why the cache in `dir` cannot be used as it is, or None when it can.
fn cache_problem(dir: &Path, fingerprint: &str) -> Option<String> {
    let manifest = match read_manifest(dir) {
        Ok(m) => m,
        Err(e) => return Some(format!("{e:#}")),
    };
    if manifest.cache_format != CACHE_FORMAT || manifest.fingerprint != fingerprint {
        return Some(format!("{} was made by another version or for other data", dir.join("manifest.json").display()));
    }
    manifest.splits.keys().find_map(|split| match TokenFile::open(&dir.join(format!("{split}.bin"))) {
        Err(e) => Some(format!("{e:#}")),
        Ok(f) if hex::encode(f.tokenizer_hash) != manifest.tokenizer_hash => {
            Some(format!("{} was made with another tokenizer than the manifest's", f.path.display()))
        }
        Ok(f) if f.len() != manifest.splits[split].tokens => {
            Some(format!("{} holds {} tokens, the manifest says {}", f.path.display(), f.len(), manifest.splits[split].tokens))
        }
        Ok(_) => None,
    })
}

fn check_vocab(cfg: &Config, tokenizer: &TextTokenizer, origin: &Path) -> anyhow::Result<()> {
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

/// Builds the cache in a private temporary directory and renames it into place, so that
/// a concurrent build of the same cache (two runs sharing `data.cache_dir`) or a crash
/// never leaves a mix of two builds: the first complete one wins.
fn build(cfg: &Config, dir: &Path, fingerprint: &str) -> anyhow::Result<()> {
    let name = dir.file_name().expect("cache dirs have a name").to_string_lossy();
    let tmp = dir.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    info!("building token cache {}", dir.display());
    if let Err(e) = build_into(cfg, &tmp, fingerprint) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() && !is_complete(dir, fingerprint) {
        // Stale or half-built by an older version: ours replaces it.
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    if std::fs::rename(&tmp, dir).is_err() {
        // Another process renamed its complete build into place first.
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
        if !is_complete(dir, fingerprint) {
            bail!("cannot move the token cache into {}", dir.display());
        }
    }
    Ok(())
}

fn build_into(cfg: &Config, dir: &Path, fingerprint: &str) -> anyhow::Result<()> {
    let train_files = split_files(&cfg.data, Split::Train)?.expect("train split is required");
    let tokenizer = match &cfg.tokenizer.path {
        Some(path) => TextTokenizer::load(path)?,
        None => train_tokenizer(&train_files, cfg.tokenizer.vocab_size)?,
    };
    let origin = cfg.tokenizer.path.clone().unwrap_or_else(|| dir.join("tokenizer.json"));
    check_vocab(cfg, &tokenizer, &origin)?;
    tokenizer.save(&dir.join("tokenizer.json"))?;

    let mut splits = BTreeMap::new();
    for split in Split::ALL {
        let Some(files) = split_files(&cfg.data, split)? else { continue };
        let stats = encode_split(&files, &tokenizer, &dir.join(format!("{}.bin", split.name())))?;
        info!(
            "{}: {} documents, {:.1} MB, {} tokens in {:.1} s ({:.1} MB/s)",
            split.name(),
            stats.documents,
            stats.bytes as f64 / 1e6,
            stats.tokens,
            stats.seconds,
            stats.bytes as f64 / 1e6 / stats.seconds.max(1e-9)
        );
        splits.insert(split.name().to_string(), stats);
    }
    let manifest = Manifest {
        cache_format: CACHE_FORMAT,
        fingerprint: fingerprint.to_string(),
        tokenizer_hash: tokenizer.hash_hex(),
        vocab_size: tokenizer.vocab_size(),
        splits,
    };
    crate::run_dir::write_atomic(&dir.join("manifest.json"), serde_json::to_string_pretty(&manifest)?.as_bytes())
}

/// Trains the tokenizer on the train split alone: the eval splits never shape it.
fn train_tokenizer(train: &SplitFiles, vocab_size: usize) -> anyhow::Result<TextTokenizer> {
    let started = Instant::now();
    let failure = Mutex::new(None);
    let texts = pieces(train).map_while(|p| match p {
        Ok(piece) => Some(piece.text),
        Err(e) => {
            *failure.lock().unwrap() = Some(e);
            None
        }
    });
    let tokenizer = TextTokenizer::train(texts, vocab_size)?;
    if let Some(e) = failure.into_inner().unwrap() {
        return Err(e.context("reading the train split to train the tokenizer"));
    }
    info!(
        "trained byte-level BPE on the train split: {} tokens (asked for {vocab_size}) in {:.1} s",
        tokenizer.vocab_size(),
        started.elapsed().as_secs_f64()
    );
    Ok(tokenizer)
}

/// Encodes a split into `dest`: `<|endoftext|>` before every document and once at the
/// end, so that each document's last prediction is its end.
fn encode_split(files: &SplitFiles, tokenizer: &TextTokenizer, dest: &Path) -> anyhow::Result<SplitStats> {
    let started = Instant::now();
    let width = token_width(tokenizer.vocab_size());
    let mut out = TokenWriter::create(dest, width, &tokenizer.hash)?;
    let (mut bytes, mut documents) = (0u64, 0u64);
    let mut batch: Vec<Piece> = Vec::new();
    let mut batch_bytes = 0usize;
    let flush = |batch: &mut Vec<Piece>, out: &mut TokenWriter| -> anyhow::Result<()> {
        let ids = tokenizer.encode_batch(batch.iter().map(|p| p.text.as_str()).collect())?;
        for (piece, ids) in batch.iter().zip(ids) {
            if piece.starts_document {
                out.push(&[tokenizer.end_of_text])?;
            }
            out.push(&ids)?;
        }
        batch.clear();
        Ok(())
    };
    for piece in pieces(files) {
        let piece = piece.with_context(|| format!("reading the {} split", files.split.name()))?;
        bytes += piece.text.len() as u64;
        documents += piece.starts_document as u64;
        batch_bytes += piece.text.len();
        batch.push(piece);
        if batch_bytes >= ENCODE_BATCH_BYTES {
            flush(&mut batch, &mut out)?;
            batch_bytes = 0;
        }
    }
    flush(&mut batch, &mut out)?;
    let names: Vec<String> = files.files.iter().map(|f| f.display().to_string()).collect();
    if bytes == 0 || documents == 0 || out.len() <= documents {
        let what = if names.is_empty() { "the synthetic corpus".to_string() } else { names.join(", ") };
        bail!("data.{} is empty: {what} holds no text", files.split.name());
    }
    out.push(&[tokenizer.end_of_text])?;
    let tokens = out.finish()?;
    let source_nll_nats = (files.format == DataFormat::Synthetic).then(|| super::synthetic_source::source_nll(files.split));
    Ok(SplitStats { files: names, bytes, documents, tokens, seconds: started.elapsed().as_secs_f64(), source_nll_nats })
}
/// The config's token cache on every rank: rank 0 builds it when missing while the
/// others wait, then all open it. If rank 0 fails, it aborts the job (see `run`) and the
/// waiting ranks end with it.
pub fn open_on_every_rank(cfg: &Config, world: &crate::dist::World) -> anyhow::Result<Prepared> {
    if world.is_main() {
        let data = prepare(cfg, false)?;
        world.barrier();
        Ok(data)
    } else {
        world.barrier();
        open(cfg)
    }
}
