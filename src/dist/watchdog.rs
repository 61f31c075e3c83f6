//! A rank that dies makes mpirun end the job, but a rank that hangs (a stuck collective,
//! a wedged device, a peer that stopped without dying) would leave every other rank
//! waiting forever. The watchdog thread ends this process when no step has completed for
//! `dist.timeout_s` seconds; mpirun then ends the rest of the job.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Watchdog {
    last_beat_ms: Arc<AtomicU64>,
    started: Instant,
}

impl Watchdog {
    /// Starts watching this rank's progress.
    pub fn start(rank: usize, timeout: Duration) -> Watchdog {
        let started = Instant::now();
        let last_beat_ms = Arc::new(AtomicU64::new(0));
        let allowed = timeout.as_millis() as u64;
        let last = Arc::clone(&last_beat_ms);
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(200));
                let now = started.elapsed().as_millis() as u64;
                let since = now.saturating_sub(last.load(Ordering::Relaxed));
                if since > allowed {
                    crate::report::log::stderr_line(&format!(
                        "error on rank {rank}: no training progress for {:.0} s (dist.timeout_s): another rank died or hangs; ending this rank so the job stops",
                        since as f64 / 1000.0
                    ));
                    // _exit: no destructors, which could block on the same stuck collective.
                    unsafe { libc::_exit(3) };
                }
            })
            .expect("the watchdog thread starts");
        Watchdog { last_beat_ms, started }
    }

    /// Progress was made: restart the clock.
    pub fn beat(&self) {
        self.last_beat_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}
