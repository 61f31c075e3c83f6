//! Compiling `kernels/*.cu` to PTX with NVRTC, cached on disk per GPU architecture and
//! source hash so that start-up stays fast after the first run.

use anyhow::{anyhow, bail, Context};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The kernels shipped with the program, embedded at build time: (file name, source).
/// Each is launched by the training step; a kernel nothing launches is not kept.
pub const KERNELS: [(&str, &str); 1] = [("dropout.cu", include_str!("../../kernels/dropout.cu"))];

/// The directories of the CUDA headers (cuda_bf16.h): the PyPI wheels' beside the
/// libtorch in use (`ALGPT2_TORCH_DIR`, set by the bundle's launcher), else beside the
/// libtorch this binary was built against, then CUDA_HOME's or /usr/local/cuda's.
fn include_dirs() -> Vec<String> {
    let mut dirs = Vec::new();
    if let Ok(torch) = std::env::var("ALGPT2_TORCH_DIR") {
        dirs.push(format!("{torch}/../nvidia/cu13/include"));
    }
    if let Some(site) = option_env!("ALGPT2_SITE_PACKAGES") {
        dirs.push(format!("{site}/nvidia/cu13/include"));
    }
    if let Ok(home) = std::env::var("CUDA_HOME") {
        dirs.push(format!("{home}/include"));
    }
    dirs.push("/usr/local/cuda/include".to_string());
    dirs.into_iter().filter(|d| Path::new(d).join("cuda_bf16.h").is_file()).take(1).collect()
}

/// PTX of `source` for `arch` (e.g. "sm_80"), from the cache under `cache_dir` when there.
pub fn compile(name: &str, source: &str, arch: &'static str, cache_dir: Option<&Path>) -> anyhow::Result<String> {
    let key = hex::encode(Sha256::digest(format!("{arch}\n{source}").as_bytes()));
    let cached: Option<PathBuf> = cache_dir.map(|d| d.join(format!("{}-{arch}-{}.ptx", name.trim_end_matches(".cu"), &key[..16])));
    if let Some(path) = &cached {
        if let Ok(ptx) = std::fs::read_to_string(path) {
            return Ok(ptx);
        }
    }
    // SAFETY: only tries to dlopen the library; no other precondition.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        bail!("NVRTC (libnvrtc) is not loadable: install the project venv (launch/setup.sh) or CUDA, to compile {name}");
    }
    let opts = cudarc::nvrtc::CompileOptions { arch: Some(arch), include_paths: include_dirs(), ..Default::default() };
    // cudarc panics on some loading failures instead of returning an error.
    let result = std::panic::catch_unwind(|| cudarc::nvrtc::compile_ptx_with_opts(source, opts))
        .map_err(|_| anyhow!("NVRTC panicked while compiling {name}"))?;
    let ptx = result.map_err(|e| anyhow!("NVRTC could not compile kernels/{name} for {arch}: {e:?}"))?.to_src();
    if let Some(path) = &cached {
        std::fs::create_dir_all(path.parent().unwrap()).ok();
        crate::run_dir::write_atomic(path, ptx.as_bytes()).with_context(|| format!("caching PTX at {}", path.display()))?;
    }
    Ok(ptx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel compiles (CUDA 13's NVRTC targets sm_80 and later): a broken kernel
    /// fails CI even though CI has no GPU.
    #[test]
    fn every_kernel_compiles_to_ptx() {
        for arch in ["sm_80", "sm_90"] {
            for (name, source) in KERNELS {
                let ptx = compile(name, source, arch, None).unwrap_or_else(|e| panic!("{e:#}"));
                assert!(ptx.contains(&format!(".target {arch}")), "{name}: {}", &ptx[..200.min(ptx.len())]);
                let entry = source.split("__global__ void ").nth(1).unwrap().split('(').next().unwrap();
                assert!(ptx.contains(&format!(".entry {entry}")), "{name} lacks .entry {entry}");
            }
        }
    }

    #[test]
    fn every_file_in_kernels_is_embedded() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut files: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        files.sort();
        let mut embedded: Vec<String> = KERNELS.iter().map(|(n, _)| n.to_string()).collect();
        embedded.sort();
        assert_eq!(files, embedded);
    }

    #[test]
    fn compiled_ptx_is_cached_per_architecture() {
        let dir = tempfile::tempdir().unwrap();
        let (name, source) = KERNELS[0];
        let first = compile(name, source, "sm_80", Some(dir.path())).unwrap();
        let cached: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(cached.len(), 1);
        // A cache hit does not call NVRTC: plant a marker in the cached file and read it back.
        let path = cached[0].as_ref().unwrap().path();
        std::fs::write(&path, format!("{first}// cached")).unwrap();
        assert!(compile(name, source, "sm_80", Some(dir.path())).unwrap().ends_with("// cached"));
        compile(name, source, "sm_90", Some(dir.path())).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
