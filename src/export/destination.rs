//! Where an export may go: never into a run or checkpoint directory (it would overwrite
//! what a resume or another export needs), over a non-empty directory only with
//! `--force` and only when it looks like a previous export, and only ever whole: written
//! into a staging directory beside `--out`, fsynced, then renamed into place.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

pub struct Destination {
    /// `--out`, absolute, symbolic links resolved as far as it exists.
    out: PathBuf,
    /// `--out` exists and holds a previous export, which the new one replaces.
    replace: bool,
}

impl Destination {
    /// Refuses `out` unless an export can be written there without touching anything else.
    pub fn check(checkpoint_dir: &Path, out: &Path, force: bool) -> anyhow::Result<Destination> {
        let shown = out.display();
        let abs = resolve(out).with_context(|| format!("--out {shown}"))?;
        for dir in abs.ancestors() {
            if dir.join(crate::checkpoint::TRAINER_FILE).is_file() {
                bail!("--out {shown}: {} is a checkpoint; exporting into it would overwrite its model.safetensors. Choose a directory outside the run", dir.display());
            }
            if crate::run_dir::RunDir::is_run_at(dir) {
                bail!("--out {shown} is inside the run directory {}; choose a directory outside it (an export there can overwrite the run's files)", dir.display());
            }
        }
        if let Ok(checkpoint) = checkpoint_dir.canonicalize() {
            if checkpoint.starts_with(&abs) {
                bail!("--out {shown} contains the checkpoint {}; choose a directory outside the run", checkpoint_dir.display());
            }
        }
        let mut replace = false;
        if abs.exists() {
            if !abs.is_dir() {
                bail!("--out {shown} is a file, not a directory");
            }
            let entries: Vec<PathBuf> = std::fs::read_dir(&abs)
                .with_context(|| format!("--out {shown}: cannot list it"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            if !entries.is_empty() {
                if !force {
                    bail!("--out {shown} is not empty: pass --force to replace it, or choose an empty or new directory");
                }
                if let Some(sub) = entries.iter().find(|e| e.is_dir()) {
                    bail!(
                        "--out {shown} holds the directory {}, so it is not a previous export: not replacing it, even with --force",
                        sub.display()
                    );
                }
                replace = true;
            }
        }
        Ok(Destination { out: abs, replace })
    }

    /// A fresh staging directory beside `--out`.
    pub fn staging(&self) -> anyhow::Result<Staging> {
        let parent = self.out.parent().context("--out has no parent directory")?;
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        let name = self.out.file_name().context("--out has no name")?.to_string_lossy().into_owned();
        let dir = parent.join(format!(".{name}.export-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Staging { dir, out: self.out.clone(), replace: self.replace, committed: false })
    }
}

/// The export being written. Dropped without [`Staging::commit`] (an error on the way),
/// it is removed and `--out` is as it was.
pub struct Staging {
    dir: PathBuf,
    out: PathBuf,
    replace: bool,
    committed: bool,
}

impl Staging {
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Syncs every file and renames the staging directory to `--out`.
    pub fn commit(mut self) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(&self.dir).with_context(|| format!("cannot list {}", self.dir.display()))? {
            let path = entry?.path();
            std::fs::File::open(&path).and_then(|f| f.sync_all()).with_context(|| format!("cannot sync {}", path.display()))?;
        }
        if self.replace {
            let old = self.dir.with_extension("replaced");
            std::fs::rename(&self.out, &old).with_context(|| format!("cannot move the previous export {} aside", self.out.display()))?;
            if let Err(e) = std::fs::rename(&self.dir, &self.out) {
                let _ = std::fs::rename(&old, &self.out);
                return Err(e).with_context(|| format!("cannot move the export into {}", self.out.display()));
            }
            self.committed = true;
            std::fs::remove_dir_all(&old).with_context(|| format!("cannot remove the previous export, moved to {}", old.display()))?;
        } else {
            // An empty --out is replaced as a whole (rename cannot replace a directory otherwise).
            if self.out.is_dir() {
                std::fs::remove_dir(&self.out).with_context(|| format!("cannot replace the empty directory {}", self.out.display()))?;
            }
            std::fs::rename(&self.dir, &self.out).with_context(|| format!("cannot move the export into {}", self.out.display()))?;
            self.committed = true;
        }
        if let Some(parent) = self.out.parent() {
            let _ = std::fs::File::open(parent).and_then(|f| f.sync_all());
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `path` made absolute, resolving the part of it that exists.
fn resolve(path: &Path) -> anyhow::Result<PathBuf> {
    let abs = std::path::absolute(path)?;
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    while !existing.exists() {
        rest.push(existing.file_name().context("no such directory")?.to_os_string());
        existing = existing.parent().context("no such directory")?;
    }
    let mut resolved = existing.canonicalize()?;
    for part in rest.iter().rev() {
        resolved.push(part);
    }
    Ok(resolved)
}
