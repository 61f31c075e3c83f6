//! Fault injection for the test suite, off unless `ALGPT2_FAULT` is set. Each fault
//! makes a real failure happen at a chosen point, so tests exercise the real recovery
//! code rather than a mock of it.
//!
//! `ALGPT2_FAULT=nan_loss@N`: the loss of optimizer step N (1-based) becomes NaN.
//! `ALGPT2_FAULT=kill@N`: the process kills itself with SIGKILL right after step N's
//! update, before anything else of that step is logged or saved (as a preemption or
//! the OOM killer would). Faults combine with commas.

fn fault_step(name: &str) -> Option<u64> {
    let spec = std::env::var("ALGPT2_FAULT").ok()?;
    spec.split(',').find_map(|f| f.strip_prefix(name)?.strip_prefix('@')?.parse().ok())
}

/// True when step `step` (1-based) should see a NaN loss.
pub fn nan_loss_at(step: u64) -> bool {
    fault_step("nan_loss") == Some(step)
}

/// Dies at once with SIGKILL when step `step` is the chosen one.
pub fn maybe_kill_at(step: u64) {
    if fault_step("kill") == Some(step) {
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
