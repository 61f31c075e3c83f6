//! Finding the libtorch a copied `algpt2-ddp` binary should run against.
//!
//! The trainer links libtorch dynamically and records where it was built (RPATH). On a
//! GPU host, a container or a cluster node that path does not exist: the host has its own
//! PyTorch in its own Python environment. The loader reads `LD_LIBRARY_PATH` only when a
//! process starts, so the trainer cannot fix this itself once running; this launcher finds
//! the host's libtorch, sets the library path and replaces itself with the trainer.
//!
//! Where libtorch comes from, first match wins:
//! 1. `ALGPT2_TORCH`: a `torch` package directory or the `site-packages` holding one;
//! 2. the `torch` package of `ALGPT2_PYTHON`, else of the `python3` on `PATH` (asked with
//!    `importlib.util.find_spec`, which does not import torch and so starts no CUDA).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The PyTorch release this build of the trainer binds (through `tch` 0.24): libtorch's
/// C++ ABI changes between minor releases, so another one fails to load or misbehaves.
pub const EXPECTED_TORCH: &str = "2.11";

/// The library every libtorch has; its presence tells a torch package directory apart.
const LIBTORCH_MARKER: &str = "libtorch_cpu.so";

/// The libtorch found on this host.
#[derive(Debug, Clone, PartialEq)]
pub struct Torch {
    /// The `torch` package directory (holding `lib/` and `version.py`).
    pub dir: PathBuf,
    /// Its version as `torch/version.py` gives it, e.g. `2.11.0+cu130`.
    pub version: String,
    /// How it was found, for the message that names it.
    pub found_by: String,
}

impl Torch {
    /// The `site-packages` directory the torch package sits in (the NVIDIA wheels'
    /// libraries and CUDA headers are under its `nvidia/`).
    pub fn site_packages(&self) -> Option<&Path> {
        self.dir.parent()
    }
}

#[derive(Debug, PartialEq)]
pub enum LaunchError {
    /// `ALGPT2_TORCH` names something that is not a torch installation.
    NotTorch { var_value: String },
    /// No `ALGPT2_TORCH` and no Python to ask.
    NoPython { python: String, why: String },
    /// The Python answered but has no torch package.
    NoTorchInPython { python: String },
    /// A libtorch of another release.
    WrongVersion { found: String, dir: PathBuf },
    /// The trainer binary is not where the launcher expects it.
    NoBinary { path: PathBuf },
}

impl fmt::Display for LaunchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LaunchError::NotTorch { var_value } => write!(
                f,
                "ALGPT2_TORCH={var_value} is neither a torch package directory (with lib/{LIBTORCH_MARKER}) nor a site-packages directory holding one"
            ),
            LaunchError::NoPython { python, why } => write!(
                f,
                "no libtorch found: ALGPT2_TORCH is not set and `{python}` could not be run ({why}); install PyTorch {EXPECTED_TORCH} (pip install torch=={EXPECTED_TORCH}.0) or set ALGPT2_TORCH to its site-packages"
            ),
            LaunchError::NoTorchInPython { python } => write!(
                f,
                "no libtorch found: `{python}` has no torch package and ALGPT2_TORCH is not set; install PyTorch {EXPECTED_TORCH} there (pip install torch=={EXPECTED_TORCH}.0), put the python3 that has it first on PATH, or set ALGPT2_TORCH to its site-packages"
            ),
            LaunchError::WrongVersion { found, dir } => write!(
                f,
                "libtorch at {} is PyTorch {found}, but this algpt2-ddp was built for PyTorch {EXPECTED_TORCH}.x (tch 0.24): point ALGPT2_TORCH at a PyTorch {EXPECTED_TORCH} installation, or rebuild algpt2-ddp against this one (ALGPT2_TORCH_ANY_VERSION=1 tries anyway)",
                dir.display()
            ),
            LaunchError::NoBinary { path } => write!(
                f,
                "the trainer binary {} is missing: unpack the whole bundle, or set ALGPT2_BIN to the algpt2-ddp binary",
                path.display()
            ),
        }
    }
}

impl std::error::Error for LaunchError {}

/// Finds the host's libtorch; `env` reads the environment (a map in tests).
pub fn locate(env: &dyn Fn(&str) -> Option<String>) -> Result<Torch, LaunchError> {
    if let Some(value) = env("ALGPT2_TORCH").filter(|v| !v.is_empty()) {
        let dir = torch_package_dir(Path::new(&value)).ok_or(LaunchError::NotTorch { var_value: value.clone() })?;
        let version = read_version(&dir);
        return Ok(Torch { dir, version, found_by: "ALGPT2_TORCH".to_string() });
    }
    let python = env("ALGPT2_PYTHON").filter(|v| !v.is_empty()).unwrap_or_else(|| "python3".to_string());
    let dir = ask_python(&python)?;
    let version = read_version(&dir);
    Ok(Torch { dir, version, found_by: format!("the torch package of {python}") })
}

/// `path` itself when it is a torch package directory, or its `torch/` when it is a
/// site-packages holding one.
pub fn torch_package_dir(path: &Path) -> Option<PathBuf> {
    [path.to_path_buf(), path.join("torch")].into_iter().find(|d| d.join("lib").join(LIBTORCH_MARKER).is_file())
}

fn ask_python(python: &str) -> Result<PathBuf, LaunchError> {
    const FIND_TORCH: &str = "import importlib.util as u\n\
        s = u.find_spec('torch')\n\
        print(s.submodule_search_locations[0] if s and s.submodule_search_locations else '')";
    let out = Command::new(python)
        .args(["-c", FIND_TORCH])
        .output()
        .map_err(|e| LaunchError::NoPython { python: python.to_string(), why: e.to_string() })?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("it failed").to_string();
        return Err(LaunchError::NoPython { python: python.to_string(), why });
    }
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if answer.is_empty() {
        return Err(LaunchError::NoTorchInPython { python: python.to_string() });
    }
    torch_package_dir(Path::new(&answer)).ok_or(LaunchError::NoTorchInPython { python: python.to_string() })
}

/// The version in `torch/version.py` (`__version__ = '2.11.0+cu130'`), or "unknown".
pub fn read_version(torch_dir: &Path) -> String {
    let text = std::fs::read_to_string(torch_dir.join("version.py")).unwrap_or_default();
    text.lines()
        .find_map(|line| {
            let rest = line.trim().strip_prefix("__version__")?.trim_start().strip_prefix('=')?.trim();
            let quote = rest.chars().next().filter(|c| *c == '\'' || *c == '"')?;
            rest[1..].split(quote).next().map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".to_string())
}

/// Whether `version` (e.g. `2.11.0+cu130`) is of the release this binary binds.
pub fn version_matches(version: &str) -> bool {
    version.strip_prefix(EXPECTED_TORCH).is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('+'))
}

/// The directories the trainer's libraries are in: libtorch's, then each NVIDIA wheel's
/// (`site-packages/nvidia/*/lib`: CUDA runtime, cuBLAS, cuDNN, NVRTC, NCCL, ...).
pub fn library_dirs(torch: &Torch) -> Vec<PathBuf> {
    let mut dirs = vec![torch.dir.join("lib")];
    if let Some(nvidia) = torch.site_packages().map(|s| s.join("nvidia")) {
        let mut wheels: Vec<PathBuf> = std::fs::read_dir(&nvidia)
            .map(|entries| entries.filter_map(|e| Some(e.ok()?.path().join("lib"))).filter(|d| d.is_dir()).collect())
            .unwrap_or_default();
        wheels.sort();
        dirs.extend(wheels);
    }
    dirs
}

/// cudarc opens NCCL as `libnccl.so`, but the wheel ships only `libnccl.so.2`: when no
/// directory has the former, a directory under `cache_root` gets a `libnccl.so` link to
/// the latter, and is returned to go on the library path. Made by rename, so that ranks
/// starting together do not trip over each other.
pub fn nccl_link_dir(dirs: &[PathBuf], cache_root: &Path) -> std::io::Result<Option<PathBuf>> {
    if dirs.iter().any(|d| d.join("libnccl.so").exists()) {
        return Ok(None);
    }
    let Some(target) = dirs.iter().map(|d| d.join("libnccl.so.2")).find(|p| p.is_file()) else {
        return Ok(None);
    };
    let link_dir = cache_root.join(format!("nccl-{:016x}", fnv1a(target.to_string_lossy().as_bytes())));
    let link = link_dir.join("libnccl.so");
    if std::fs::read_link(&link).is_ok_and(|t| t == target) {
        return Ok(Some(link_dir));
    }
    std::fs::create_dir_all(&link_dir)?;
    let temporary = link_dir.join(format!(".libnccl.so.{}", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    std::os::unix::fs::symlink(&target, &temporary)?;
    std::fs::rename(&temporary, &link)?;
    Ok(Some(link_dir))
}

/// Where the link directory goes: `$XDG_CACHE_HOME/algpt2-ddp`, `~/.cache/algpt2-ddp`,
/// else the temporary directory.
pub fn cache_root(env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    env("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| env("HOME").filter(|v| !v.is_empty()).map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("algpt2-ddp")
}

/// The trainer binary: `ALGPT2_BIN`, else `../libexec/algpt2-ddp` from the launcher (the
/// bundle's layout), else `algpt2-ddp` beside it (a build tree).
pub fn trainer_binary(launcher: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<PathBuf, LaunchError> {
    if let Some(bin) = env("ALGPT2_BIN").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(bin);
        return if path.is_file() { Ok(path) } else { Err(LaunchError::NoBinary { path }) };
    }
    let dir = launcher.parent().unwrap_or(Path::new("."));
    let candidates = [dir.join("../libexec/algpt2-ddp"), dir.join("algpt2-ddp")];
    candidates
        .iter()
        .find(|p| p.is_file() && !same_file(p, launcher))
        .cloned()
        .ok_or_else(|| LaunchError::NoBinary { path: candidates[0].clone() })
}

fn same_file(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// `dirs` in front of an existing library path.
pub fn join_library_path(dirs: &[PathBuf], existing: Option<&str>) -> String {
    let mut parts: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    parts.extend(existing.into_iter().flat_map(|e| e.split(':')).filter(|p| !p.is_empty()).map(str::to_string));
    parts.join(":")
}

/// Where a launcher (Open MPI, MPICH/PMI, Slurm) announces this process's rank.
const RANK_VARIABLES: [&str; 3] = ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"];

/// This process's rank as a launcher announced it (0 without one).
pub fn launcher_rank(env: &dyn Fn(&str) -> Option<String>) -> u32 {
    RANK_VARIABLES.iter().find_map(|v| env(v)?.parse().ok()).unwrap_or(0)
}

/// Whether a launcher started this process (it is then this process's parent).
pub fn started_by_launcher(env: &dyn Fn(&str) -> Option<String>) -> bool {
    RANK_VARIABLES.iter().any(|v| env(v).is_some())
}

/// A stable 64-bit FNV-1a hash, for naming a cache directory after a path.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A fake site-packages: torch/lib/libtorch_cpu.so, torch/version.py, and NVIDIA wheels.
    fn fake_site_packages(root: &Path, version: &str) -> PathBuf {
        let site = root.join("site-packages");
        std::fs::create_dir_all(site.join("torch/lib")).unwrap();
        std::fs::write(site.join("torch/lib").join(LIBTORCH_MARKER), b"").unwrap();
        // A regular package: on a path that also holds a real torch, it is found first.
        std::fs::write(site.join("torch/__init__.py"), b"").unwrap();
        std::fs::write(
            site.join("torch/version.py"),
            format!("from typing import Optional\n__version__ = '{version}'\ncuda: Optional[str] = '13.0'\n"),
        )
        .unwrap();
        for wheel in ["nccl", "cu13", "cudnn"] {
            std::fs::create_dir_all(site.join("nvidia").join(wheel).join("lib")).unwrap();
        }
        std::fs::create_dir_all(site.join("nvidia/no_lib_dir")).unwrap();
        std::fs::write(site.join("nvidia/nccl/lib/libnccl.so.2"), b"").unwrap();
        site
    }

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn algpt2_torch_takes_a_site_packages_or_a_torch_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let site = fake_site_packages(tmp.path(), "2.11.0+cu130");
        for given in [site.clone(), site.join("torch")] {
            let torch = locate(&env_of(&[("ALGPT2_TORCH", given.to_str().unwrap())])).unwrap();
            assert_eq!(torch.dir, site.join("torch"));
            assert_eq!(torch.version, "2.11.0+cu130");
            assert_eq!(torch.found_by, "ALGPT2_TORCH");
        }
        let err = locate(&env_of(&[("ALGPT2_TORCH", tmp.path().to_str().unwrap())])).unwrap_err();
        assert!(matches!(err, LaunchError::NotTorch { .. }));
        assert!(err.to_string().contains("ALGPT2_TORCH="), "{err}");
    }

    #[test]
    fn python_is_asked_where_its_torch_is() {
        let tmp = tempfile::tempdir().unwrap();
        let site = fake_site_packages(tmp.path(), "2.11.0");
        // A python3 that has the fake torch on its path (no real torch is imported).
        let script = tmp.path().join("python3");
        std::fs::write(&script, format!("#!/bin/sh\nPYTHONPATH={} exec python3 \"$@\"\n", site.display())).unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let torch = locate(&env_of(&[("ALGPT2_PYTHON", script.to_str().unwrap())])).unwrap();
        assert_eq!(torch.dir.canonicalize().unwrap(), site.join("torch").canonicalize().unwrap());
        assert_eq!(torch.version, "2.11.0");
        assert!(torch.found_by.contains("python3"), "{}", torch.found_by);
    }

    #[test]
    fn a_python_without_torch_or_no_python_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let script = tmp.path().join("python3");
        // The system python with an empty path of its own: no torch anywhere.
        std::fs::write(&script, "#!/bin/sh\nexec python3 -S -I \"$@\"\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let err = locate(&env_of(&[("ALGPT2_PYTHON", script.to_str().unwrap())])).unwrap_err();
        assert!(matches!(err, LaunchError::NoTorchInPython { .. }), "{err}");
        assert!(err.to_string().contains("has no torch package"), "{err}");
        let missing = tmp.path().join("no-such-python");
        let err = locate(&env_of(&[("ALGPT2_PYTHON", missing.to_str().unwrap())])).unwrap_err();
        assert!(matches!(err, LaunchError::NoPython { .. }), "{err}");
        assert!(err.to_string().contains("ALGPT2_TORCH"), "{err}");
    }

    #[test]
    fn versions_are_read_and_matched() {
        let tmp = tempfile::tempdir().unwrap();
        let site = fake_site_packages(tmp.path(), "2.11.0+cu130");
        assert_eq!(read_version(&site.join("torch")), "2.11.0+cu130");
        assert_eq!(read_version(tmp.path()), "unknown");
        for ok in ["2.11.0", "2.11.0+cu130", "2.11.1", "2.11"] {
            assert!(version_matches(ok), "{ok}");
        }
        for bad in ["2.13.0", "2.1.0", "2.110.0", "unknown", "", "3.11.0"] {
            assert!(!version_matches(bad), "{bad}");
        }
        let e = LaunchError::WrongVersion { found: "2.13.0".into(), dir: site.join("torch") };
        assert!(e.to_string().contains("PyTorch 2.13.0") && e.to_string().contains("built for PyTorch 2.11.x"), "{e}");
    }

    #[test]
    fn library_dirs_are_libtorch_then_each_nvidia_wheel() {
        let tmp = tempfile::tempdir().unwrap();
        let site = fake_site_packages(tmp.path(), "2.11.0");
        let torch = Torch { dir: site.join("torch"), version: "2.11.0".into(), found_by: String::new() };
        let dirs = library_dirs(&torch);
        let expected: Vec<PathBuf> =
            vec![site.join("torch/lib"), site.join("nvidia/cu13/lib"), site.join("nvidia/cudnn/lib"), site.join("nvidia/nccl/lib")];
        assert_eq!(dirs, expected);
        assert_eq!(join_library_path(&dirs[..2], Some("/a::/b")), format!("{}:{}:/a:/b", dirs[0].display(), dirs[1].display()));
        assert_eq!(join_library_path(&dirs[..1], None), dirs[0].display().to_string());
    }

    #[test]
    fn a_libnccl_so_link_is_made_once_when_only_so_2_exists() {
        let tmp = tempfile::tempdir().unwrap();
        let site = fake_site_packages(tmp.path(), "2.11.0");
        let torch = Torch { dir: site.join("torch"), version: "2.11.0".into(), found_by: String::new() };
        let dirs = library_dirs(&torch);
        let cache = tmp.path().join("cache");
        let link_dir = nccl_link_dir(&dirs, &cache).unwrap().expect("a link directory");
        let link = link_dir.join("libnccl.so");
        assert_eq!(std::fs::read_link(&link).unwrap(), site.join("nvidia/nccl/lib/libnccl.so.2"));
        // Again: the same directory, the link untouched.
        assert_eq!(nccl_link_dir(&dirs, &cache).unwrap(), Some(link_dir.clone()));
        assert_eq!(std::fs::read_dir(&link_dir).unwrap().count(), 1);
        // Where libnccl.so exists already, nothing is made.
        std::os::unix::fs::symlink("libnccl.so.2", site.join("nvidia/nccl/lib/libnccl.so")).unwrap();
        assert_eq!(nccl_link_dir(&dirs, &tmp.path().join("cache2")).unwrap(), None);
        // No NCCL at all (a CPU-only torch): nothing to link.
        assert_eq!(nccl_link_dir(&dirs[..1], &cache).unwrap(), None);
    }

    #[test]
    fn the_trainer_binary_is_found_in_the_bundle_layout() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("bin")).unwrap();
        std::fs::create_dir_all(tmp.path().join("libexec")).unwrap();
        let launcher = tmp.path().join("bin/algpt2-ddp");
        std::fs::write(&launcher, b"launcher").unwrap();
        let none = env_of(&[]);
        // The launcher itself is never taken for the trainer.
        assert!(matches!(trainer_binary(&launcher, &none), Err(LaunchError::NoBinary { .. })));
        std::fs::write(tmp.path().join("libexec/algpt2-ddp"), b"trainer").unwrap();
        let found = trainer_binary(&launcher, &none).unwrap();
        assert_eq!(std::fs::read(found).unwrap(), b"trainer");
        let other = tmp.path().join("other");
        std::fs::write(&other, b"x").unwrap();
        assert_eq!(trainer_binary(&launcher, &env_of(&[("ALGPT2_BIN", other.to_str().unwrap())])).unwrap(), other);
        let err = trainer_binary(&launcher, &env_of(&[("ALGPT2_BIN", "/no/such/bin")])).unwrap_err();
        assert!(err.to_string().contains("/no/such/bin"), "{err}");
    }

    #[test]
    fn cache_root_and_rank_come_from_the_environment() {
        assert_eq!(cache_root(&env_of(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")])), Path::new("/x/algpt2-ddp"));
        assert_eq!(cache_root(&env_of(&[("HOME", "/h")])), Path::new("/h/.cache/algpt2-ddp"));
        assert_eq!(launcher_rank(&env_of(&[])), 0);
        assert_eq!(launcher_rank(&env_of(&[("OMPI_COMM_WORLD_RANK", "3")])), 3);
        assert_eq!(launcher_rank(&env_of(&[("SLURM_PROCID", "2")])), 2);
        assert!(!started_by_launcher(&env_of(&[])));
        assert!(started_by_launcher(&env_of(&[("PMI_RANK", "0")])));
    }
}
