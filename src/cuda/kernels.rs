//! Launching the kernels of `kernels/` on libtorch's CUDA tensors.
//!
//! Kernels are compiled with NVRTC for the GPU's own architecture and loaded into the
//! device's primary context, which is the one libtorch's runtime uses, so tensor
//! addresses (`data_ptr`) are valid as kernel arguments. Every launch goes on the legacy
//! default stream, libtorch's default stream: it is ordered after the libtorch work that
//! wrote the inputs and before the work that reads the outputs, with no host wait.

use super::nvrtc::{compile, KERNELS};
use anyhow::{anyhow, bail, Context};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

const BLOCK: u32 = 256;
/// Enough blocks to fill any current GPU several times over; grid-stride loops do the rest.
const MAX_BLOCKS: u32 = 132 * 16;

/// The kernels of `kernels/`, loaded for one GPU.
pub struct Kernels {
    ordinal: usize,
    arch: &'static str,
    stream: Arc<CudaStream>,
    dropout_mask: CudaFunction,
}

/// The kernels of each GPU this process used, loaded once (dropout asks on every mask).
pub fn shared(ordinal: usize) -> anyhow::Result<Arc<Kernels>> {
    static LOADED: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<usize, Arc<Kernels>>>> = std::sync::OnceLock::new();
    let mut loaded = LOADED.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(k) = loaded.get(&ordinal) {
        return Ok(k.clone());
    }
    let cache = std::env::var_os("ALGPT2_KERNEL_CACHE").map(std::path::PathBuf::from);
    let k = Arc::new(Kernels::load(ordinal, cache.as_deref())?);
    loaded.insert(ordinal, k.clone());
    Ok(k)
}

/// `sm_XY` for a compute capability; NVRTC wants a `'static` name.
pub fn arch_name(major: i32, minor: i32) -> &'static str {
    const KNOWN: [&str; 8] = ["sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_100", "sm_103", "sm_120"];
    let name = format!("sm_{major}{minor}");
    KNOWN.iter().find(|k| **k == name).copied().unwrap_or_else(|| Box::leak(name.into_boxed_str()))
}

fn entry_name(source: &str) -> Vec<&str> {
    source.split("__global__ void ").skip(1).filter_map(|rest| rest.split('(').next()).map(str::trim).collect()
}

impl Kernels {
    /// Compiles (or takes from `cache_dir`) and loads every kernel for GPU `ordinal`.
    pub fn load(ordinal: usize, cache_dir: Option<&Path>) -> anyhow::Result<Kernels> {
        // cudarc panics on some loading failures instead of returning an error.
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| anyhow!("the CUDA driver could not be loaded for GPU {ordinal}"))?
            .map_err(|e| anyhow!("CUDA context of GPU {ordinal}: {e:?}"))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| anyhow!("compute capability of GPU {ordinal}: {e:?}"))?;
        let arch = arch_name(major, minor);
        let mut functions = std::collections::HashMap::new();
        for (file, source) in KERNELS {
            let ptx = compile(file, source, arch, cache_dir)?;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                .map_err(|e| anyhow!("loading kernels/{file} on GPU {ordinal} ({arch}): {e:?}"))?;
            for entry in entry_name(source) {
                let f = module.load_function(entry).map_err(|e| anyhow!("kernels/{file}: function {entry}: {e:?}"))?;
                functions.insert(entry.to_string(), f);
            }
        }
        let mut take = |name: &str| functions.remove(name).with_context(|| format!("kernels/ has no function {name}"));
        Ok(Kernels { ordinal, arch, stream: ctx.default_stream(), dropout_mask: take("dropout_mask")? })
    }

    /// The architecture the kernels were compiled for, e.g. `sm_90`.
    pub fn arch(&self) -> &'static str {
        self.arch
    }

    fn check(&self, t: &Tensor, kind: Kind, what: &str) -> anyhow::Result<u64> {
        if t.device() != Device::Cuda(self.ordinal) {
            bail!("{what}: a tensor on {:?}, but the kernels are loaded for cuda:{}", t.device(), self.ordinal);
        }
        if t.kind() != kind || !t.is_contiguous() {
            bail!("{what}: needs a contiguous {kind:?} tensor, got {:?}", t.kind());
        }
        Ok(t.data_ptr() as u64)
    }

    fn config(n: i64, shared_mem_bytes: u32) -> LaunchConfig {
        let blocks = ((n.max(1) as u64).div_ceil(BLOCK as u64)).min(MAX_BLOCKS as u64) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes }
    }
}

impl Kernels {
    /// Fills `out` (contiguous f32) with the dropout mask of `key` (model/dropout.rs).
    pub fn dropout_mask(&self, out: &Tensor, key: u64, threshold: u32, scale: f32) -> anyhow::Result<()> {
        let o = self.check(out, Kind::Float, "dropout_mask out")?;
        let n = out.numel() as i64;
        let mut launch = self.stream.launch_builder(&self.dropout_mask);
        launch.arg(&o).arg(&n).arg(&key).arg(&threshold).arg(&scale);
        // SAFETY: `out` is a contiguous f32 tensor of n values on this GPU, alive until the
        // launch has run (the caller holds it; libtorch's allocator reuses memory only in
        // stream order).
        unsafe { launch.launch(Self::config((n + 3) / 4, 0)) }.map_err(|e| anyhow!("dropout_mask launch: {e:?}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architecture_names_and_entries() {
        assert_eq!(arch_name(9, 0), "sm_90");
        assert_eq!(arch_name(8, 6), "sm_86");
        assert_eq!(arch_name(7, 5), "sm_75");
        let entries: Vec<&str> = KERNELS.iter().flat_map(|(_, s)| entry_name(s)).collect();
        assert_eq!(entries, ["dropout_mask"]);
    }

    #[test]
    fn launch_grid_covers_small_and_caps_large_buffers() {
        assert_eq!(Kernels::config(0, 0).grid_dim.0, 1);
        assert_eq!(Kernels::config(257, 0).grid_dim.0, 2);
        assert_eq!(Kernels::config(1 << 40, 0).grid_dim.0, MAX_BLOCKS);
    }
}
