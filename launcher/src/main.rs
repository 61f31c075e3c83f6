//! `bin/algpt2-ddp` of the bundle: finds this host's libtorch, puts it and the NVIDIA
//! libraries on the library path, and becomes the trainer (same process, same arguments,
//! so mpirun's signals and exit codes pass straight through). See the library for where
//! it looks.

use algpt2_launch::{
    cache_root, join_library_path, launcher_rank, library_dirs, locate, nccl_link_dir, trainer_binary, version_matches, LaunchError,
};
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

fn main() -> ExitCode {
    let env = |key: &str| std::env::var(key).ok();
    match launch(&env) {
        Ok(never) => match never {},
        Err((code, message)) => {
            eprintln!("algpt2-ddp: error: {message}");
            ExitCode::from(code)
        }
    }
}

enum Never {}

/// Returns only on failure: (exit code, message). 2 when the host lacks what is needed.
fn launch(env: &dyn Fn(&str) -> Option<String>) -> Result<Never, (u8, String)> {
    let usage = |e: LaunchError| (2, e.to_string());
    let launcher = std::env::current_exe().map_err(|e| (1, format!("cannot find the launcher's own path: {e}")))?;
    let trainer = trainer_binary(&launcher, env).map_err(usage)?;
    let torch = locate(env).map_err(usage)?;
    let quiet = env("ALGPT2_LAUNCH_QUIET").is_some_and(|v| !v.is_empty() && v != "0");
    if !version_matches(&torch.version) {
        let error = LaunchError::WrongVersion { found: torch.version.clone(), dir: torch.dir.clone() };
        if env("ALGPT2_TORCH_ANY_VERSION").is_none_or(|v| v.is_empty() || v == "0") {
            return Err(usage(error));
        }
        eprintln!("algpt2-ddp: warning: {error}");
    }
    let mut dirs = library_dirs(&torch);
    match nccl_link_dir(&dirs, &cache_root(env)) {
        Ok(Some(link_dir)) => dirs.push(link_dir),
        Ok(None) => {}
        // Without the link only NCCL is missing, which the trainer reports when it is needed.
        Err(e) => eprintln!("algpt2-ddp: warning: could not make the libnccl.so link under {}: {e}", cache_root(env).display()),
    }
    if !quiet && launcher_rank(env) == 0 {
        eprintln!("algpt2-ddp: libtorch {} from {} ({})", torch.version, torch.dir.display(), torch.found_by);
    }
    let library_path = join_library_path(&dirs, env("LD_LIBRARY_PATH").as_deref());
    let error = std::process::Command::new(&trainer)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", library_path)
        // The trainer reports it (doctor) and compiles kernels/ against its CUDA headers.
        .env("ALGPT2_TORCH_DIR", &torch.dir)
        .exec();
    Err((1, format!("could not start {}: {error}", trainer.display())))
}
