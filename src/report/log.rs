//! Log lines to stderr on every rank, and on rank 0 also to `train.log` in the run dir.

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Mutex;
use tracing_subscriber::{fmt, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer};

/// Installs the global logger. `RUST_LOG` overrides the default `info` level; other ranks
/// log warnings only, so that rank 0's lines are not repeated world-size times.
pub fn init(rank: usize, log_file: Option<&Path>) -> anyhow::Result<()> {
    let level = if rank == 0 { "info" } else { "warn" };
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let stderr = fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .with_filter(filter());
    let file = match log_file {
        Some(path) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("cannot open log file {}: {e}", path.display()))?;
            Some(fmt::layer().with_writer(Mutex::new(f)).with_ansi(false).with_target(false).with_filter(filter()))
        }
        None => None,
    };
    // Rank 0's lines may also go to the W&B Logs tab (see console.rs: idle until asked).
    let console = (rank == 0).then(|| super::console::ConsoleLayer.with_filter(filter()));
    tracing_subscriber::registry().with(stderr).with(file).with(console).try_init()?;
    Ok(())
}

/// A `Vm*:` line of /proc/self/status in MB (Linux), 0 where unknown.
fn proc_status_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix(field).map(|v| v.trim().trim_end_matches("kB").trim().to_string())))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// This process's resident memory now, in MB.
pub fn rss_mb() -> f64 {
    proc_status_mb("VmRSS:")
}

/// The most resident memory this process has had, in MB.
pub fn peak_rss_mb() -> f64 {
    proc_status_mb("VmHWM:")
}
/// Writes `text` and a newline to stderr in one write: ranks share mpirun's pipe, and
/// `eprintln!` writes a formatted line in pieces, which another rank's line can split.
pub fn stderr_line(text: &str) {
    use std::io::Write;
    let mut line = String::with_capacity(text.len() + 1);
    line.push_str(text);
    line.push('\n');
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}
