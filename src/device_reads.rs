//! Every read of a device value by the host goes through here: on a GPU each one waits
//! for the device to finish its queued work, so the step makes none and the loop reads
//! only where it logs, saves or ends. The counter lets a test check that.

use std::sync::atomic::{AtomicU64, Ordering};
use tch::{Kind, Tensor};

static READS: AtomicU64 = AtomicU64::new(0);

/// The values of a small tensor as f64 (one transfer).
pub fn read(t: &Tensor) -> Vec<f64> {
    READS.fetch_add(1, Ordering::Relaxed);
    let host = t.to_kind(Kind::Double).to_device(tch::Device::Cpu).reshape([-1]);
    Vec::<f64>::try_from(&host).expect("a double tensor converts to Vec<f64>")
}

/// Reads made by this process so far.
pub fn count() -> u64 {
    READS.load(Ordering::Relaxed)
}
