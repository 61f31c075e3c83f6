//! What this process runs on, as `doctor` and a run's W&B metadata report it: the
//! libtorch it loaded, the CUDA that libtorch was built for, the CUDA driver.

use std::path::PathBuf;

/// The torch package directory of the libtorch in this process: the launcher says so,
/// else the path the loader mapped libtorch_cpu.so from.
pub fn libtorch_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("ALGPT2_TORCH_DIR") {
        return Some(PathBuf::from(dir));
    }
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let lib = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|p| p.ends_with("/libtorch_cpu.so"))?;
    PathBuf::from(lib).parent()?.parent().map(PathBuf::from)
}

/// `cuda = '13.0'` of torch/version.py.
pub fn cuda_of_build(torch_dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(torch_dir.join("version.py")).ok()?;
    let line = text.lines().find(|l| l.trim_start().starts_with("cuda"))?;
    let value = line.split('=').nth(1)?.trim().trim_matches(|c| c == '\'' || c == '"');
    (value != "None" && !value.is_empty()).then(|| value.to_string())
}

/// The CUDA driver's version, or None without one.
pub fn driver_version() -> Option<String> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return None;
    }
    let mut v: std::ffi::c_int = 0;
    // SAFETY: writes one int; cudarc panics rather than erroring on some loading failures.
    let ok = std::panic::catch_unwind(move || {
        let res = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
        (res == cudarc::driver::sys::CUresult::CUDA_SUCCESS).then_some(v)
    });
    ok.ok().flatten().map(|v| format!("{}.{} (supports CUDA up to this)", v / 1000, (v % 1000) / 10))
}
