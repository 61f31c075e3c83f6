//! SIGTERM and SIGINT (preemption, Slurm's warning before the time limit, Ctrl-C) ask
//! the run to stop: the flag is read once per step, agreed across ranks, and the run ends
//! after saving a checkpoint. A second signal ends the process at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub struct StopRequest {
    flag: Arc<AtomicBool>,
}

impl StopRequest {
    pub fn install() -> anyhow::Result<StopRequest> {
        let flag = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            // The second signal exits at once (the flag is already set by then).
            signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&flag))?;
            signal_hook::flag::register(signal, Arc::clone(&flag))?;
        }
        Ok(StopRequest { flag })
    }

    /// True once a stop signal arrived on this rank.
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
}
