//! The run directory `<out_dir>/<run_name>/`: config, metrics, log, checkpoints.

use crate::config::Config;
use anyhow::Context;
use std::path::{Path, PathBuf};

/// Paths of everything a run writes; only rank 0 creates them.
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn for_config(cfg: &Config) -> RunDir {
        let name = cfg.run_name.as_deref().unwrap_or("run");
        RunDir { root: cfg.out_dir.join(name) }
    }

    pub fn config(&self) -> PathBuf {
        self.root.join("config.yaml")
    }
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    pub fn log(&self) -> PathBuf {
        self.root.join("train.log")
    }
    pub fn tokenizer(&self) -> PathBuf {
        self.root.join("tokenizer.json")
    }
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// Creates the directories and `metrics.jsonl`, and writes the resolved config (atomically, so a reader
    /// never sees half a file).
    pub fn create(&self, cfg: &Config) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.checkpoints())
            .with_context(|| format!("cannot create run directory {}", self.root.display()))?;
        // Appended to by every logged step; a resumed run keeps what is already there.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.metrics())
            .with_context(|| format!("cannot create {}", self.metrics().display()))?;
        write_atomic(&self.config(), cfg.to_yaml().as_bytes())
    }
}

/// Writes `bytes` to a temporary sibling, fsyncs it and renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.sync_all().with_context(|| format!("cannot sync {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}
