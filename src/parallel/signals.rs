//! Stopping a run on request. SIGTERM, SIGINT and SIGUSR1 (preemption, Slurm's warning
//! before the time limit, Ctrl-C, and the signal mpirun forwards to every rank) ask the
//! run to stop: the flag is read once per step, agreed across ranks, and the run ends
//! after saving a checkpoint, with exit code 0.
//!
//! A second stop signal, or the loss of the launcher that started this rank (mpirun
//! returns at once on a second Ctrl-C and leaves its ranks behind), ends the rank within
//! `dist.stop_grace_s`: if the step in progress ends first, the checkpoint is still
//! saved; otherwise the rank exits with [`EXIT_HARD_STOP`]. Either way no rank outlives its
//! launcher by more than the grace period.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Exit code of a rank ended by the grace period (128 + SIGINT, as shells report Ctrl-C).
pub const EXIT_HARD_STOP: i32 = 130;

/// The signals that ask for a stop at the next step boundary.
pub const STOP_SIGNALS: [i32; 3] = [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT, signal_hook::consts::SIGUSR1];

pub struct StopRequest {
    flag: Arc<AtomicBool>,
}

impl StopRequest {
    /// Handles the stop signals from now on; `grace` bounds the stop after a second one.
    pub fn install(grace: Duration) -> anyhow::Result<StopRequest> {
        let flag = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicUsize::new(0));
        for signal in STOP_SIGNALS {
            signal_hook::flag::register(signal, Arc::clone(&flag))?;
            let count = Arc::clone(&received);
            // SAFETY: the handler does one atomic add, which is async-signal-safe.
            unsafe {
                signal_hook::low_level::register(signal, move || {
                    count.fetch_add(1, Ordering::SeqCst);
                })
            }?;
        }
        let by_launcher = algpt2_launch::started_by_launcher(&|key| std::env::var(key).ok());
        // SAFETY: getppid has no preconditions.
        let launcher = by_launcher.then(|| unsafe { libc::getppid() });
        let watched = (Arc::clone(&flag), received);
        std::thread::Builder::new()
            .name("stop-watch".into())
            .spawn(move || watch(&watched.0, &watched.1, launcher, grace))
            .map_err(|e| anyhow::anyhow!("cannot start the stop-signal thread: {e}"))?;
        Ok(StopRequest { flag })
    }

    /// True once a stop was requested on this rank.
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
}

/// Why a rank must end soon, if it must.
fn hard_stop_reason(signals: usize, launcher_gone: bool) -> Option<&'static str> {
    if signals >= 2 {
        Some("a second stop signal")
    } else if launcher_gone {
        Some("the launcher that started this rank is gone")
    } else {
        None
    }
}

fn watch(flag: &AtomicBool, received: &AtomicUsize, launcher: Option<i32>, grace: Duration) {
    let mut deadline: Option<Instant> = None;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if deadline.is_none() {
            // SAFETY: getppid has no preconditions.
            let launcher_gone = launcher.is_some_and(|p| p != unsafe { libc::getppid() });
            if let Some(why) = hard_stop_reason(received.load(Ordering::SeqCst), launcher_gone) {
                flag.store(true, Ordering::SeqCst);
                if launcher_gone {
                    silence_stdio();
                }
                tracing::warn!(
                    "{why}: this rank ends within {:.0} s (dist.stop_grace_s), saving first if the step in progress ends before",
                    grace.as_secs_f64()
                );
                deadline = Some(Instant::now() + grace);
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            tracing::error!("stop grace period over: ending this rank now (exit {EXIT_HARD_STOP}); the last saved checkpoint is intact");
            // _exit: no destructors, which could block on a collective whose peers are gone.
            unsafe { libc::_exit(EXIT_HARD_STOP) };
        }
    }
}

/// The launcher held the other ends of stdout and stderr: writing there now fails (and
/// Rust's printing panics on it), so both go to /dev/null. The run's log file still gets
/// every line.
fn silence_stdio() {
    // SAFETY: plain descriptor calls; dup2 over 1 and 2 is atomic for other threads.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
        if null >= 0 {
            libc::dup2(null, 1);
            libc::dup2(null, 2);
            libc::close(null);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_signal_or_a_lost_launcher_starts_the_grace_period() {
        assert_eq!(hard_stop_reason(0, false), None);
        assert_eq!(hard_stop_reason(1, false), None);
        assert!(hard_stop_reason(2, false).unwrap().contains("second"));
        assert!(hard_stop_reason(2, true).unwrap().contains("second"));
        assert!(hard_stop_reason(0, true).unwrap().contains("launcher"));
    }
}
