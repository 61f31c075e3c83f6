//! Peak dense bf16 tensor-core FLOP/s of the GPUs we know, for MFU; the device name comes
//! from the CUDA driver (absent on a machine without one).

/// (substring of the device name, peak FLOP/s). More specific names come first.
const PEAKS: [(&str, f64); 8] = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("RTX 6000 Ada", 364e12),
    ("RTX 4090", 165e12),
    ("L4", 121e12),
];

/// The peak of a device name such as "NVIDIA H100 80GB HBM3", when it is in the table.
pub fn peak_flops_of(name: &str) -> Option<f64> {
    PEAKS.iter().find(|(key, _)| name.contains(key)).map(|(_, peak)| *peak)
}

/// The name of CUDA device `ordinal`, or None without a CUDA driver or device.
pub fn device_name(ordinal: usize) -> Option<String> {
    ask_device(ordinal, |ctx| ctx.name().ok())
}

/// Total memory of CUDA device `ordinal` in bytes, or None without a CUDA driver or device.
pub fn total_memory(ordinal: usize) -> Option<usize> {
    ask_device(ordinal, |ctx| ctx.total_mem().ok())
}

/// (major, minor) compute capability of CUDA device `ordinal`, or None without one.
pub fn compute_capability(ordinal: usize) -> Option<(i32, i32)> {
    ask_device(ordinal, |ctx| ctx.compute_capability().ok())
}

/// `question` of device `ordinal`'s context, or None where there is no driver or device.
fn ask_device<T>(ordinal: usize, question: impl FnOnce(&cudarc::driver::CudaContext) -> Option<T> + std::panic::UnwindSafe) -> Option<T> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return None;
    }
    // cudarc panics on some driver failures instead of returning an error.
    std::panic::catch_unwind(move || cudarc::driver::CudaContext::new(ordinal).ok().and_then(|ctx| question(&ctx))).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_gpus_have_their_peaks_and_others_none() {
        assert_eq!(peak_flops_of("NVIDIA H100 80GB HBM3"), Some(989e12));
        assert_eq!(peak_flops_of("NVIDIA H100 PCIe"), Some(756e12));
        assert_eq!(peak_flops_of("NVIDIA H200"), Some(989e12));
        assert_eq!(peak_flops_of("NVIDIA A100-SXM4-80GB"), Some(312e12));
        assert_eq!(peak_flops_of("NVIDIA RTX 6000 Ada Generation"), Some(364e12));
        assert_eq!(peak_flops_of("NVIDIA GeForce RTX 4090"), Some(165e12));
        assert_eq!(peak_flops_of("NVIDIA L40S"), Some(362e12));
        assert_eq!(peak_flops_of("Tesla T4"), None);
    }

    #[test]
    fn no_device_name_without_a_gpu() {
        if tch::Cuda::is_available() {
            eprintln!("skipped: this machine has a CUDA GPU");
            return;
        }
        assert_eq!(device_name(0), None);
    }
}
