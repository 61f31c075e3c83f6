//! Stopping a run on request. SIGTERM, SIGINT and SIGUSR1 (preemption, Slurm's warning
//! before the time limit, Ctrl-C, and the signal mpirun forwards to every rank) ask the
//! run to stop: the flag is read once per step, agreed across ranks, and the run ends
//! after saving a checkpoint. SIGINT and SIGUSR1 are a user's stop (what the launch
//! scripts send on Ctrl-C): exit code 0. SIGTERM is what Slurm, a cloud's spot notice and
//! Kubernetes send to take the machine back: the run is *preempted* and exits with
//! [`EXIT_PREEMPTED`], so that a supervisor or `sbatch --requeue` starts it again.
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

/// Exit code of a run stopped by SIGTERM after saving: preempted, to be started again
/// (75 is sysexits' EX_TEMPFAIL, "try again later").
pub const EXIT_PREEMPTED: u8 = 75;

pub struct StopRequest {
    flag: Arc<AtomicBool>,
    /// SIGTERM came: the stop is a preemption.
    preempted: Arc<AtomicBool>,
}

/// The error a preempted run ends with: its checkpoint is saved, and it exits with
/// [`EXIT_PREEMPTED`] rather than 0 so that whatever started it starts it again.
#[derive(Debug)]
pub struct Preempted {
    pub step: u64,
}

impl std::fmt::Display for Preempted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "preempted (SIGTERM) after step {}; the checkpoint is saved (exit code {EXIT_PREEMPTED})", self.step)
    }
}

impl std::error::Error for Preempted {}

impl StopRequest {
    /// Handles the stop signals from now on; `grace` bounds the stop after a second one.
    pub fn install(grace: Duration) -> anyhow::Result<StopRequest> {
        let flag = Arc::new(AtomicBool::new(false));
        let preempted = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&preempted))?;
        for signal in STOP_SIGNALS {
            signal_hook::flag::register(signal, Arc::clone(&flag))?;
        }
        let received = count_stop_signals()?;
        let by_launcher = algpt2_launch::started_by_launcher(&|key| std::env::var(key).ok());
        // SAFETY: getppid has no preconditions.
        let launcher = by_launcher.then(|| unsafe { libc::getppid() });
        let watched = (Arc::clone(&flag), received);
        std::thread::Builder::new()
            .name("stop-watch".into())
            .spawn(move || watch(&watched.0, &watched.1, launcher, grace))
            .map_err(|e| anyhow::anyhow!("cannot start the stop-signal thread: {e}"))?;
        Ok(StopRequest { flag, preempted })
    }

    /// True once a stop was requested on this rank.
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// True once SIGTERM came: the stop is a preemption.
    pub fn preempted(&self) -> bool {
        self.preempted.load(Ordering::Relaxed)
    }
}

/// Counts the stop signals received from now on (a rank's second one ends it within the
/// grace period; `supervise` passes each on to its job).
pub fn count_stop_signals() -> anyhow::Result<Arc<AtomicUsize>> {
    let received = Arc::new(AtomicUsize::new(0));
    for signal in STOP_SIGNALS {
        let count = Arc::clone(&received);
        // SAFETY: the handler does one atomic add, which is async-signal-safe.
        unsafe {
            signal_hook::low_level::register(signal, move || {
                count.fetch_add(1, Ordering::SeqCst);
            })
        }?;
    }
    Ok(received)
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
