//! Versions of everything the trainer runs on, and this host's GPUs.

use super::Report;
use crate::parallel::World;

pub fn collect(r: &mut Report, world: &World) {
    r.fact("algpt2-ddp", format!("{} (commit {})", env!("CARGO_PKG_VERSION"), env!("ALGPT2_GIT_REVISION")));
    match crate::versions::libtorch_dir() {
        Some(dir) => {
            let version = algpt2_launch::read_version(&dir);
            r.fact("libtorch", format!("{version} at {}", dir.display()));
            r.fact("CUDA (libtorch build)", crate::versions::cuda_of_build(&dir).unwrap_or_else(|| "none (a CPU build)".to_string()));
            if algpt2_launch::version_matches(&version) {
                r.pass("libtorch version", format!("{version} (this binary binds {}.x)", algpt2_launch::EXPECTED_TORCH));
            } else {
                r.fail(
                    "libtorch version",
                    format!("{version} at {}, but this binary binds PyTorch {}.x", dir.display(), algpt2_launch::EXPECTED_TORCH),
                );
            }
        }
        None => r.fail("libtorch version", "cannot tell which libtorch this process loaded"),
    }
    r.fact("CUDA driver", crate::versions::driver_version().unwrap_or_else(|| "none (no CUDA driver)".to_string()));
    r.fact("cuDNN", cudnn_version());
    r.fact(
        "NCCL",
        match crate::parallel::nccl::nccl_version() {
            Ok((a, b, c)) => format!("{a}.{b}.{c}"),
            Err(e) => format!("not loadable ({})", first_line(&format!("{e:#}"))),
        },
    );
    r.fact("MPI", format!("{} (world of {})", World::library_version(), world.size()));
    r.fact("CPU threads", format!("{} of {} cores", tch::get_num_threads(), std::thread::available_parallelism().map_or(1, |n| n.get())));
    gpus(r);
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// cuDNN as libtorch loaded it (never loads a library itself).
fn cudnn_version() -> String {
    // SAFETY: RTLD_NOLOAD only looks up an already loaded library; the symbol has the
    // signature `size_t cudnnGetVersion(void)` in every cuDNN release.
    unsafe {
        for name in [c"libcudnn.so.9", c"libcudnn.so.8", c"libcudnn.so"] {
            let handle = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD);
            if handle.is_null() {
                continue;
            }
            let sym = libc::dlsym(handle, c"cudnnGetVersion".as_ptr());
            if sym.is_null() {
                continue;
            }
            let get: extern "C" fn() -> usize = std::mem::transmute(sym);
            let v = get();
            // cuDNN 9 encodes major*10000 + minor*100 + patch; 8 used major*1000 + minor*100 + patch.
            let (major, minor, patch) =
                if v >= 90000 { (v / 10000, (v % 10000) / 100, v % 100) } else { (v / 1000, (v % 1000) / 100, v % 100) };
            return format!("{major}.{minor}.{patch}");
        }
    }
    "not loaded (a CPU libtorch, or no GPU)".to_string()
}

/// Each GPU the driver sees: name, memory, compute capability, peak FLOP/s used for MFU.
fn gpus(r: &mut Report) {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        r.fact("GPUs", "none (no CUDA driver)");
        return;
    }
    let described = std::panic::catch_unwind(|| -> Result<Vec<String>, String> {
        let count = cudarc::driver::CudaContext::device_count().map_err(|e| format!("{e:?}"))?;
        (0..count as usize)
            .map(|i| {
                let ctx = cudarc::driver::CudaContext::new(i).map_err(|e| format!("GPU {i}: {e:?}"))?;
                let name = ctx.name().unwrap_or_else(|_| "?".into());
                let memory = ctx.total_mem().map_or("?".into(), |b| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64));
                let (major, minor) = ctx.compute_capability().unwrap_or((0, 0));
                let peak = crate::cuda::peak::peak_flops_of(&name)
                    .map_or("peak unknown (set train.peak_flops for MFU)".to_string(), |p| format!("peak {:.0} TFLOP/s bf16", p / 1e12));
                Ok(format!("{name}, {memory}, compute capability {major}.{minor}, {peak}"))
            })
            .collect()
    });
    match described {
        Ok(Ok(list)) if list.is_empty() => r.fact("GPUs", "none (the driver sees no device)"),
        Ok(Ok(list)) => {
            for (i, d) in list.into_iter().enumerate() {
                r.fact(format!("GPU {i}"), d);
            }
        }
        Ok(Err(e)) => r.fact("GPUs", format!("the driver failed: {e}")),
        Err(_) => r.fact("GPUs", "the driver could not be loaded"),
    }
}
