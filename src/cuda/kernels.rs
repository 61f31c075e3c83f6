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
    adamw_step: CudaFunction,
    grad_norm_sq: CudaFunction,
    f32_to_bf16: CudaFunction,
    bf16_to_f32_scaled: CudaFunction,
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

/// AdamW's hyper-parameters for one step, as `kernels/adamw.cu` takes them.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1 - beta1^t.
    pub bias_correction1: f32,
    /// sqrt(1 - beta2^t).
    pub bias_correction2_sqrt: f32,
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
        Ok(Kernels {
            ordinal,
            arch,
            stream: ctx.default_stream(),
            adamw_step: take("adamw_step")?,
            grad_norm_sq: take("grad_norm_sq")?,
            f32_to_bf16: take("f32_to_bf16")?,
            bf16_to_f32_scaled: take("bf16_to_f32_scaled")?,
            dropout_mask: take("dropout_mask")?,
        })
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

    /// One fused AdamW update of the flat buffers; `[0, decay_len)` get weight decay.
    pub fn adamw_step(
        &self,
        params: &Tensor,
        grads: &Tensor,
        exp_avg: &Tensor,
        exp_avg_sq: &Tensor,
        decay_len: i64,
        h: &AdamWStep,
    ) -> anyhow::Result<()> {
        let n = params.numel() as i64;
        for (t, what) in [(grads, "grads"), (exp_avg, "exp_avg"), (exp_avg_sq, "exp_avg_sq")] {
            if t.numel() as i64 != n {
                bail!("adamw_step: {what} has {} values, params {n}", t.numel());
            }
        }
        let p = self.check(params, Kind::Float, "adamw_step params")?;
        let g = self.check(grads, Kind::Float, "adamw_step grads")?;
        let m = self.check(exp_avg, Kind::Float, "adamw_step exp_avg")?;
        let v = self.check(exp_avg_sq, Kind::Float, "adamw_step exp_avg_sq")?;
        let decay_len = decay_len.clamp(0, n);
        let mut launch = self.stream.launch_builder(&self.adamw_step);
        launch.arg(&p).arg(&g).arg(&m).arg(&v).arg(&n).arg(&decay_len);
        launch.arg(&h.lr).arg(&h.beta1).arg(&h.beta2).arg(&h.eps).arg(&h.weight_decay);
        launch.arg(&h.bias_correction1).arg(&h.bias_correction2_sqrt);
        // SAFETY: the four addresses are contiguous f32 tensors of n values on this GPU,
        // alive until the launch has run (the caller holds them; libtorch's allocator
        // reuses memory only in stream order).
        unsafe { launch.launch(Self::config(n, 0)) }.map_err(|e| anyhow!("adamw_step launch: {e:?}"))?;
        Ok(())
    }

    /// Sum of squares (f64, on the device, shape [1]) and the count of non-finite values
    /// (i64, shape [1]) of a flat f32 gradient buffer, in one pass.
    pub fn grad_norm_sq(&self, grads: &Tensor) -> anyhow::Result<(Tensor, Tensor)> {
        let g = self.check(grads, Kind::Float, "grad_norm_sq grads")?;
        let n = grads.numel() as i64;
        let sum_sq = Tensor::zeros([1], (Kind::Double, grads.device()));
        let nonfinite = Tensor::zeros([1], (Kind::Int64, grads.device()));
        let (s, c) = (sum_sq.data_ptr() as u64, nonfinite.data_ptr() as u64);
        let mut launch = self.stream.launch_builder(&self.grad_norm_sq);
        launch.arg(&g).arg(&n).arg(&s).arg(&c);
        // SAFETY: as for adamw_step; the outputs are fresh zeroed tensors of one value each.
        unsafe { launch.launch(Self::config(n, BLOCK * 8)) }.map_err(|e| anyhow!("grad_norm_sq launch: {e:?}"))?;
        Ok((sum_sq, nonfinite))
    }

    /// `dst` (bf16) = `src` (f32) rounded to nearest even.
    pub fn f32_to_bf16(&self, src: &Tensor, dst: &Tensor) -> anyhow::Result<()> {
        let n = src.numel() as i64;
        if dst.numel() as i64 != n {
            bail!("f32_to_bf16: {} values into {}", n, dst.numel());
        }
        let (s, d) = (self.check(src, Kind::Float, "f32_to_bf16 src")?, self.check(dst, Kind::BFloat16, "f32_to_bf16 dst")?);
        let mut launch = self.stream.launch_builder(&self.f32_to_bf16);
        launch.arg(&s).arg(&d).arg(&n);
        // SAFETY: as for adamw_step.
        unsafe { launch.launch(Self::config(n, 0)) }.map_err(|e| anyhow!("f32_to_bf16 launch: {e:?}"))?;
        Ok(())
    }

    /// `dst` (f32) = `src` (bf16) × `scale`.
    pub fn bf16_to_f32_scaled(&self, src: &Tensor, dst: &Tensor, scale: f32) -> anyhow::Result<()> {
        let n = src.numel() as i64;
        if dst.numel() as i64 != n {
            bail!("bf16_to_f32_scaled: {} values into {}", n, dst.numel());
        }
        let (s, d) = (self.check(src, Kind::BFloat16, "bf16_to_f32_scaled src")?, self.check(dst, Kind::Float, "bf16_to_f32_scaled dst")?);
        let mut launch = self.stream.launch_builder(&self.bf16_to_f32_scaled);
        launch.arg(&s).arg(&d).arg(&n).arg(&scale);
        // SAFETY: as for adamw_step.
        unsafe { launch.launch(Self::config(n, 0)) }.map_err(|e| anyhow!("bf16_to_f32_scaled launch: {e:?}"))?;
        Ok(())
    }
}

impl Kernels {
    /// Fills `out` (contiguous f32) with the dropout mask of `key` (model/dropout.rs).
    pub fn dropout_mask(&self, out: &Tensor, key: u64, threshold: u32, scale: f32) -> anyhow::Result<()> {
        let o = self.check(out, Kind::Float, "dropout_mask out")?;
        let n = out.numel() as i64;
        let mut launch = self.stream.launch_builder(&self.dropout_mask);
        launch.arg(&o).arg(&n).arg(&key).arg(&threshold).arg(&scale);
        // SAFETY: as for adamw_step.
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
        assert_eq!(entries, ["adamw_step", "grad_norm_sq", "f32_to_bf16", "bf16_to_f32_scaled", "dropout_mask"]);
    }

    #[test]
    fn launch_grid_covers_small_and_caps_large_buffers() {
        assert_eq!(Kernels::config(0, 0).grid_dim.0, 1);
        assert_eq!(Kernels::config(257, 0).grid_dim.0, 2);
        assert_eq!(Kernels::config(1 << 40, 0).grid_dim.0, MAX_BLOCKS);
    }
}
