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
    /// What `RunLock` holds while a training runs.
    pub fn lock(&self) -> PathBuf {
        self.root.join("train.lock")
    }
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }
    /// The directory of step `step`'s checkpoint.
    pub fn checkpoint(&self, step: u64) -> PathBuf {
        self.checkpoints().join(checkpoint_dir_name(step))
    }

    /// Whether `dir` holds a training's files (what `create` and `RunLock` put there).
    pub fn is_run_at(dir: &Path) -> bool {
        let run = RunDir { root: dir.to_path_buf() };
        run.checkpoints().is_dir() || run.lock().is_file() || run.metrics().is_file()
    }

    /// The run a checkpoint directory (`<run>/checkpoints/step_N`) belongs to.
    pub fn of_checkpoint(checkpoint_dir: &Path) -> Option<RunDir> {
        checkpoint_dir.parent().and_then(Path::parent).map(|root| RunDir { root: root.to_path_buf() })
    }

    /// Creates the directories and `metrics.jsonl`, and writes the resolved config (atomically, so a reader
    /// never sees half a file).
    pub fn create(&self, cfg: &Config) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.checkpoints()).with_context(|| format!("cannot create run directory {}", self.root.display()))?;
        // Appended to by every logged step; a resumed run keeps what is already there.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.metrics())
            .with_context(|| format!("cannot create {}", self.metrics().display()))?;
        write_atomic(&self.config(), cfg.to_yaml().as_bytes())
    }
}

/// An exclusive claim on a run directory, held for the whole training: a second training
/// pointed at the same directory would interleave checkpoints and metrics. Released when
/// dropped, or by the kernel when the process dies (an flock, so no stale lock survives
/// a crash).
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    pub fn acquire(run: &RunDir) -> anyhow::Result<RunLock> {
        use std::io::{Read, Seek, Write};
        std::fs::create_dir_all(&run.root).with_context(|| format!("cannot create run directory {}", run.root.display()))?;
        let path = run.lock();
        let mut file = open_lock_file(&path).with_context(|| format!("cannot open {}", path.display()))?;
        if file.try_lock().is_err() {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            anyhow::bail!(
                "run directory {} is in use by another training (pid {}): use another run_name, or wait for it to end",
                run.root.display(),
                holder.trim()
            );
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(RunLock { _file: file })
    }
}

/// Opens (creating) a file to hold an flock on; its contents, a holder's pid, are kept.
pub fn open_lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)
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

/// `step_00001000`: the name of a step's checkpoint directory.
pub fn checkpoint_dir_name(step: u64) -> String {
    format!("step_{step:08}")
}

/// The sha256 of a file's bytes, as lowercase hex.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex::encode(hasher.finalize()))
}
