//! Where an export may go: never into a run or checkpoint directory (it would overwrite
//! what a resume or another export needs), over a non-empty directory only with
//! `--force` and only when it is a previous export, and only ever whole: written into a
//! staging directory beside `--out`, fsynced, then renamed into place.
//!
//! A previous export is known by its marker, [`MARKER`], which every export writes
//! listing the files it wrote: `--force` replaces a directory only when it holds that
//! marker and nothing but the files the marker lists. Anything else (a folder of the
//! user's, a file added to an export later, an export made before the marker existed)
//! is refused, `--force` or not, naming what would have been deleted.
//!
//! The staging directory `.<out>.export-<pid>` holds a whole model; when a kill leaves
//! one behind, the next export into the same parent directory removes it (its process is
//! gone and its flock free). A kill between moving the previous export aside
//! (`.<out>.export-<pid>.replaced`) and renaming the new one into place leaves no
//! `--out` at all: the next export puts the previous one back first.

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use tracing::warn;

/// The file an export writes beside its model, listing the files it wrote.
pub const MARKER: &str = ".algpt2-export.json";

/// What every export wrote before the marker existed.
const UNMARKED_EXPORT: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

/// The contents of [`MARKER`].
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    /// `algpt2-ddp export-hf <version>`.
    written_by: String,
    /// The names of the files the export wrote, the marker itself not included.
    files: Vec<String>,
}

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
        if let Some(parent) = abs.parent() {
            clean_abandoned_exports(parent);
        }
        let mut replace = false;
        if abs.exists() {
            if !abs.is_dir() {
                bail!("--out {shown} is a file, not a directory");
            }
            let empty = std::fs::read_dir(&abs).with_context(|| format!("--out {shown}: cannot list it"))?.next().is_none();
            if !empty {
                if !force {
                    bail!(
                        "--out {shown} is not empty: pass --force to replace a previous export there, or choose an empty or new directory"
                    );
                }
                check_previous_export(&abs, &shown.to_string())?;
                replace = true;
            }
        }
        Ok(Destination { out: abs, replace })
    }

    /// A fresh staging directory beside `--out`, locked for as long as it lives.
    pub fn staging(&self) -> anyhow::Result<Staging> {
        let parent = self.out.parent().context("--out has no parent directory")?;
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        let name = self.out.file_name().context("--out has no name")?.to_string_lossy().into_owned();
        let dir = parent.join(format!(".{name}.export-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // Until this lock is taken the directory is protected by our pid, which is alive.
        let lock = File::open(&dir).with_context(|| format!("cannot open {}", dir.display()))?;
        lock.try_lock().with_context(|| format!("cannot lock {}", dir.display()))?;
        Ok(Staging { dir, out: self.out.clone(), replace: self.replace, committed: false, _lock: lock })
    }
}

/// Whether the non-empty directory `dir` is a previous export that `--force` may replace:
/// it holds [`MARKER`] and nothing but the files the marker lists.
fn check_previous_export(dir: &Path, shown: &str) -> anyhow::Result<()> {
    let not_replacing = "not replacing it, even with --force";
    let mut names: Vec<OsString> = std::fs::read_dir(dir)
        .with_context(|| format!("--out {shown}: cannot list it"))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("--out {shown}: cannot list it"))?;
    names.sort();
    let marker_path = dir.join(MARKER);
    if !marker_path.symlink_metadata().is_ok_and(|m| m.is_file()) {
        if names.iter().map(|n| n.to_string_lossy()).eq(UNMARKED_EXPORT) {
            bail!(
                "--out {shown} holds {} but no {MARKER}: an export made before exports were marked (or files that look like one); {not_replacing}. If it is an old export you no longer need, delete it yourself (rm -r {shown}) and export again, or choose another --out",
                UNMARKED_EXPORT.join(", ")
            );
        }
        bail!(
            "--out {shown} holds no {MARKER}, so it is not a previous export (export-hf writes that file, listing the files it wrote); {not_replacing}: choose another --out"
        );
    }
    let marker: Marker = std::fs::read(&marker_path)
        .map_err(anyhow::Error::from)
        .and_then(|bytes| Ok(serde_json::from_slice(&bytes)?))
        .with_context(|| format!("--out {shown}: cannot read {} ({not_replacing})", marker_path.display()))?;
    let foreign: Vec<String> = names
        .iter()
        .filter(|name| name.as_os_str() != MARKER)
        .filter(|name| {
            let listed = marker.files.iter().any(|f| f.as_str() == name.as_os_str());
            // A listed name that is now a directory or a link is not what the export wrote.
            !listed || !dir.join(name).symlink_metadata().is_ok_and(|m| m.is_file())
        })
        .map(|name| dir.join(name).display().to_string())
        .collect();
    if !foreign.is_empty() {
        bail!(
            "--out {shown} holds {}, which the previous export did not write (its {MARKER} lists {}); {not_replacing}, as that would delete {}. Move {} out of {shown}, or choose another --out",
            foreign.join(", "),
            marker.files.join(", "),
            if foreign.len() == 1 { "it" } else { "them" },
            if foreign.len() == 1 { "it" } else { "them" },
        );
    }
    Ok(())
}

/// The export being written. Dropped without [`Staging::commit`] (an error on the way),
/// it is removed and `--out` is as it was.
pub struct Staging {
    dir: PathBuf,
    out: PathBuf,
    replace: bool,
    committed: bool,
    /// An flock on the staging directory: while it is held, no other export takes the
    /// directory for abandoned.
    _lock: File,
}

impl Staging {
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes the marker listing the files staged, syncs every file and renames the
    /// staging directory to `--out`.
    pub fn commit(mut self) -> anyhow::Result<()> {
        let mut files: Vec<String> = Vec::new();
        for entry in std::fs::read_dir(&self.dir).with_context(|| format!("cannot list {}", self.dir.display()))? {
            files.push(entry?.file_name().to_string_lossy().into_owned());
        }
        files.sort();
        let marker = Marker { written_by: format!("algpt2-ddp export-hf {}", env!("CARGO_PKG_VERSION")), files };
        crate::run_dir::write_atomic(&self.dir.join(MARKER), serde_json::to_string_pretty(&marker)?.as_bytes())?;
        for entry in std::fs::read_dir(&self.dir).with_context(|| format!("cannot list {}", self.dir.display()))? {
            let path = entry?.path();
            File::open(&path).and_then(|f| f.sync_all()).with_context(|| format!("cannot sync {}", path.display()))?;
        }
        crate::faults::kill_in_export("staged");
        if self.replace {
            // Checked again: a file may have been put into --out while the export was built.
            check_previous_export(&self.out, &self.out.display().to_string())?;
            let old = aside_name(&self.dir);
            std::fs::rename(&self.out, &old).with_context(|| format!("cannot move the previous export {} aside", self.out.display()))?;
            crate::faults::kill_in_export("aside");
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
            let _ = File::open(parent).and_then(|f| f.sync_all());
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

/// Where the previous export waits while the new one is renamed into place.
fn aside_name(staging: &Path) -> PathBuf {
    let mut name = staging.as_os_str().to_os_string();
    name.push(".replaced");
    PathBuf::from(name)
}

/// What an entry of `--out`'s parent left by an export is, from its name.
#[derive(Debug, PartialEq)]
enum Leftover {
    /// `.<out>.export-<pid>`: a staging directory.
    Staging { out: String, pid: u32 },
    /// `.<out>.export-<pid>.replaced`: a previous export moved aside.
    Aside { out: String, pid: u32 },
}

fn leftover(file_name: &str) -> Option<Leftover> {
    let (out, rest) = file_name.strip_prefix('.')?.rsplit_once(".export-")?;
    if out.is_empty() {
        return None;
    }
    let pid = |digits: &str| digits.bytes().all(|b| b.is_ascii_digit()).then(|| digits.parse().ok()).flatten();
    match rest.strip_suffix(".replaced") {
        Some(digits) => Some(Leftover::Aside { out: out.to_string(), pid: pid(digits)? }),
        None => Some(Leftover::Staging { out: out.to_string(), pid: pid(rest)? }),
    }
}

/// Whether a process `pid` exists on this machine.
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    // SAFETY: kill(2) with signal 0 sends nothing; it only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) }
}

/// Whether `dir` is a directory (not a link) of regular files only, as an export's are.
fn holds_files_only(dir: &Path) -> bool {
    dir.symlink_metadata().is_ok_and(|m| m.is_dir())
        && std::fs::read_dir(dir)
            .is_ok_and(|entries| entries.into_iter().all(|e| e.is_ok_and(|e| e.path().symlink_metadata().is_ok_and(|m| m.is_file()))))
}

/// Deals with what killed exports left in `parent`: a staging directory whose process is
/// gone and whose lock is free is removed; a previous export moved aside goes back to its
/// `--out` when that is missing (the kill came before the new one was renamed into
/// place), and is removed otherwise. Each is a warning; nothing else is touched.
fn clean_abandoned_exports(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    let mut found: Vec<(PathBuf, Leftover)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| leftover(&e.file_name().to_string_lossy()).map(|l| (e.path(), l)))
        .filter(|(path, l)| {
            let pid = match l {
                Leftover::Staging { pid, .. } | Leftover::Aside { pid, .. } => *pid,
            };
            pid != std::process::id() && !process_alive(pid) && holds_files_only(path)
        })
        .collect();
    // Previous exports go back before staging directories are removed.
    found.sort_by_key(|(_, l)| matches!(l, Leftover::Staging { .. }));
    for (path, leftover) in found {
        match leftover {
            Leftover::Aside { out, .. } => {
                let out = parent.join(out);
                if out.symlink_metadata().is_err() {
                    match std::fs::rename(&path, &out) {
                        Ok(()) => warn!(
                            "put the previous export back into {}: an export that was interrupted had moved it aside to {}",
                            out.display(),
                            path.display()
                        ),
                        Err(e) => warn!("cannot put {} back into {}: {e}", path.display(), out.display()),
                    }
                    continue;
                }
                remove_leftover(&path, "a previous export moved aside by an export that was interrupted");
            }
            Leftover::Staging { .. } => {
                // Another machine's export (a shared file system) holds its lock; ours is free.
                let Ok(lock) = File::open(&path) else { continue };
                if lock.try_lock().is_err() {
                    continue;
                }
                remove_leftover(&path, "the staging directory of an export that was interrupted");
            }
        }
    }
}

fn remove_leftover(path: &Path, what: &str) {
    match std::fs::remove_dir_all(path) {
        Ok(()) => warn!("removed {}, {what}", path.display()),
        Err(e) => warn!("cannot remove {}, {what}: {e}", path.display()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_are_known_by_name_only_when_the_pid_is_a_number() {
        assert_eq!(leftover(".hf.export-123"), Some(Leftover::Staging { out: "hf".into(), pid: 123 }));
        assert_eq!(leftover(".my.export.export-9.replaced"), Some(Leftover::Aside { out: "my.export".into(), pid: 9 }));
        for name in ["hf.export-1", ".hf.export-", ".hf.export-12a", ".hf.export-+1", "..export-1", ".hf.export-1.replaced.x", ".hf.tmp-1"]
        {
            assert_eq!(leftover(name), None, "{name}");
        }
    }

    #[test]
    fn a_previous_export_is_known_by_its_marker_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let check = || check_previous_export(d, "out").map_err(|e| e.to_string());
        std::fs::write(d.join("thesis.tex"), "x").unwrap();
        assert!(check().unwrap_err().contains("holds no .algpt2-export.json"));
        std::fs::remove_file(d.join("thesis.tex")).unwrap();
        for f in UNMARKED_EXPORT {
            std::fs::write(d.join(f), "x").unwrap();
        }
        assert!(check().unwrap_err().contains("delete it yourself"));
        let marker = Marker { written_by: "test".into(), files: UNMARKED_EXPORT.iter().map(|s| s.to_string()).collect() };
        std::fs::write(d.join(MARKER), serde_json::to_string(&marker).unwrap()).unwrap();
        check().unwrap();
        // A listed file the user deleted is no obstacle; an added one, or a listed name now a directory, is.
        std::fs::remove_file(d.join("tokenizer.json")).unwrap();
        check().unwrap();
        std::fs::write(d.join("notes.txt"), "mine").unwrap();
        std::fs::create_dir(d.join("tokenizer.json")).unwrap();
        let err = check().unwrap_err();
        assert!(err.contains("notes.txt") && err.contains("tokenizer.json, which") && err.contains("delete them"), "{err}");
        std::fs::write(d.join(MARKER), "{ broken").unwrap();
        assert!(check().unwrap_err().contains("cannot read"));
    }
}
