//! Building the token cache: each split encoded once into a token file, beside the
//! tokenizer that made it and a manifest written last (see `cache` for what is checked
//! when it is opened). One build per cache at a time: a second `prepare` (or training)
//! of the same cache waits for the first and reuses what it built.

use super::cache::{self, CacheLocation, Prepared, SplitStats, Verified, CACHE_FORMAT};
use super::source::{pieces, Sources, SplitFiles};
use super::split::Piece;
use super::token_file::{token_width, TokenFile, TokenWriter};
use super::tokenizer::TextTokenizer;
use crate::config::{Config, DataFormat};
use crate::parallel::phase::Phase;
use crate::run_dir::open_lock_file;
use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;
use tracing::{info, warn};

/// Text handed to the tokenizer's thread pool at once: large enough to keep every core
/// busy, small enough to bound memory.
const ENCODE_BATCH_BYTES: usize = 8 << 20;

/// Builds the cache unless a whole one exists (or `force`), then opens it.
pub fn prepare(cfg: &Config, force: bool) -> anyhow::Result<Prepared> {
    let sources = Sources::resolve(&cfg.data)?;
    // A warning, not an error: evaluating on training text is sometimes meant (a check
    // that the model can fit its data, a smoke test on one small file).
    for shared in sources.shared_with_train() {
        warn!("{shared}");
    }
    let location = CacheLocation::of(cfg, &sources)?;
    let _lock = BuildLock::acquire(&cfg.data.cache_dir, &location)?;
    clean_abandoned_builds(&cfg.data.cache_dir, &location);
    if force && location.dir.exists() {
        std::fs::remove_dir_all(&location.dir).with_context(|| format!("cannot clear {}", location.dir.display()))?;
    }
    let verified = match cache::verify(&location) {
        Ok(verified) => {
            info!("token cache {} is complete ({})", location.dir.display(), checked(&verified));
            verified
        }
        Err(problem) => {
            if location.dir.exists() {
                warn!("token cache {} is damaged ({problem}): rebuilding it", location.dir.display());
                std::fs::remove_dir_all(&location.dir).with_context(|| format!("cannot clear {}", location.dir.display()))?;
            }
            build(cfg, &sources, &location)?;
            cache::verify(&location).map_err(|problem| anyhow::anyhow!("the token cache just built is not whole: {problem}"))?
        }
    };
    cache::into_prepared(cfg, &location, verified)
}

/// Opens the whole cache of `cfg`; an error says how to build it.
pub fn open(cfg: &Config) -> anyhow::Result<Prepared> {
    let sources = Sources::resolve(&cfg.data)?;
    let location = CacheLocation::of(cfg, &sources)?;
    match cache::verify(&location) {
        Ok(verified) => {
            tracing::debug!("token cache {} verified ({})", location.dir.display(), checked(&verified));
            cache::into_prepared(cfg, &location, verified)
        }
        Err(_) if !location.dir.exists() => {
            bail!("no complete token cache at {} (run `algpt2-ddp prepare --config ...`)", location.dir.display())
        }
        Err(problem) => {
            bail!("token cache {} is damaged ({problem}): run `algpt2-ddp prepare --config ...` to rebuild it", location.dir.display())
        }
    }
}

fn checked(verified: &Verified) -> String {
    format!("{:.1} MB of tokens verified in {:.2} s", verified.bytes as f64 / 1e6, verified.seconds)
}

/// The config's token cache on every rank: rank 0 builds it when missing while the
/// others wait, then all open it. If rank 0 fails, it aborts the job (see `run`) and the
/// waiting ranks end with it.
pub fn open_on_every_rank(cfg: &Config, world: &crate::parallel::World) -> anyhow::Result<Prepared> {
    // Not timed by the watchdog: rank 0 may be tokenizing a large corpus meanwhile.
    Phase::DataPreparation.begin(world.rank());
    if world.is_main() {
        let data = prepare(cfg, false)?;
        world.barrier();
        Ok(data)
    } else {
        world.barrier();
        Phase::CacheCheck.begin(world.rank());
        open(cfg)
    }
}

/// An exclusive claim on building one cache: `.<cache name>.lock` in `data.cache_dir`,
/// an flock, so a killed build leaves no stale lock.
struct BuildLock {
    _file: File,
}

impl BuildLock {
    fn acquire(cache_dir: &Path, location: &CacheLocation) -> anyhow::Result<Option<BuildLock>> {
        std::fs::create_dir_all(cache_dir).with_context(|| format!("data.cache_dir: cannot create {}", cache_dir.display()))?;
        let path = build_lock_path(cache_dir, &location.name());
        let file = match open_lock_file(&path) {
            Ok(file) => file,
            // A read-only cache directory (a shared, prebuilt cache) is read, never built:
            // nobody can be building it, and a build would fail naming the directory.
            Err(e) => {
                tracing::debug!("no build lock {}: {e}", path.display());
                return Ok(None);
            }
        };
        if file.try_lock().is_err() {
            info!("another process is building token cache {}: waiting for it", location.dir.display());
            file.lock().with_context(|| format!("cannot lock {}", path.display()))?;
        }
        Ok(Some(BuildLock { _file: file }))
    }
}

/// `.<cache name>.lock` in `data.cache_dir`: the lock of building that cache.
fn build_lock_path(cache_dir: &Path, name: &str) -> std::path::PathBuf {
    cache_dir.join(format!(".{name}.lock"))
}

/// Removes the temporary directories of builds that were killed: any `.<name>.tmp-*` in
/// `data.cache_dir` whose cache nobody is building is abandoned. Ours is known by name
/// (we hold its lock); another cache's lock must be free.
fn clean_abandoned_builds(cache_dir: &Path, ours: &CacheLocation) {
    let Ok(entries) = std::fs::read_dir(cache_dir) else { return };
    for entry in entries.filter_map(Result::ok) {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some((name, _)) = file_name.strip_prefix('.').and_then(|n| n.rsplit_once(".tmp-")) else { continue };
        // Held until this entry is dealt with, so that nobody starts building it meanwhile.
        let _other = if name == ours.name() {
            None
        } else {
            let Ok(lock) = open_lock_file(&build_lock_path(cache_dir, name)) else { continue };
            if lock.try_lock().is_err() {
                continue;
            }
            Some(lock)
        };
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => warn!("removed {}, left by a token cache build that was interrupted", entry.path().display()),
            Err(e) => warn!("cannot remove {}, left by an interrupted build: {e}", entry.path().display()),
        }
    }
}

/// Builds the cache in a private temporary directory and renames it into place, so that
/// a crash never leaves a mix of two builds or a half-built cache under the final name.
fn build(cfg: &Config, sources: &Sources, location: &CacheLocation) -> anyhow::Result<()> {
    let tmp = location.dir.with_file_name(format!(".{}.tmp-{}", location.name(), std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    info!("building token cache {}", location.dir.display());
    if let Err(e) = build_into(cfg, sources, &tmp, &location.fingerprint) {
        let _ = std::fs::remove_dir_all(&tmp);
        if disk_full(&e) {
            return Err(e.context(format!(
                "the token cache does not fit on the disk of data.cache_dir ({}): free space there, or set data.cache_dir to a disk with room",
                cfg.data.cache_dir.display()
            )));
        }
        return Err(e);
    }
    std::fs::rename(&tmp, &location.dir).with_context(|| format!("cannot move the token cache into {}", location.dir.display()))
}

/// Whether `e` comes from a full disk (or an exhausted quota).
fn disk_full(e: &anyhow::Error) -> bool {
    e.chain().filter_map(|c| c.downcast_ref::<std::io::Error>()).any(|io| matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)))
}

fn build_into(cfg: &Config, sources: &Sources, dir: &Path, fingerprint: &str) -> anyhow::Result<()> {
    let tokenizer = match &cfg.tokenizer.path {
        Some(path) => TextTokenizer::load(path)?,
        None => train_tokenizer(sources.train(), cfg.tokenizer.vocab_size)?,
    };
    let origin = cfg.tokenizer.path.clone().unwrap_or_else(|| dir.join("tokenizer.json"));
    cache::check_vocab(cfg, &tokenizer, &origin)?;
    tokenizer.save(&dir.join("tokenizer.json"))?;

    let mut splits = BTreeMap::new();
    for files in sources.iter() {
        let stats = encode_split(files, &tokenizer, &dir.join(format!("{}.bin", files.split.name())))?;
        info!(
            "{}: {} documents, {:.1} MB, {} tokens in {:.1} s ({:.1} MB/s)",
            files.split.name(),
            stats.documents,
            stats.bytes as f64 / 1e6,
            stats.tokens,
            stats.seconds,
            stats.bytes as f64 / 1e6 / stats.seconds.max(1e-9)
        );
        splits.insert(files.split.name().to_string(), stats);
    }
    let manifest = cache::Manifest {
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
    let chunk_crc32 = TokenFile::open(dest)?.chunk_checksums();
    let source_nll_nats = (files.format == DataFormat::Synthetic).then(|| super::synthetic_source::source_nll(files.split));
    Ok(SplitStats { files: names, bytes, documents, tokens, seconds: started.elapsed().as_secs_f64(), source_nll_nats, chunk_crc32 })
}
