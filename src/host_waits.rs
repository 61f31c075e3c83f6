//! Every transfer between host and device that makes the host wait goes through here: on
//! a GPU a read of a device value waits for the device to finish its queued work, and so
//! does a copy to it from pageable host memory (CUDA stages it through a buffer of its
//! own, in stream order). The step makes none (its host tensors go through
//! `host_to_device`, which does not wait), and the loop reads only where it logs, saves
//! or ends. The counter lets a test check that: it counts the calls on every device, the
//! CPU included, where nothing waits, so that a CPU-only run sees what a GPU would wait for.

use std::sync::atomic::{AtomicU64, Ordering};
use tch::{Device, Kind, Tensor};

static WAITS: AtomicU64 = AtomicU64::new(0);

/// The values of a small tensor as f64 (one transfer).
pub fn read(t: &Tensor) -> Vec<f64> {
    WAITS.fetch_add(1, Ordering::Relaxed);
    let host = t.to_kind(Kind::Double).to_device(Device::Cpu).reshape([-1]);
    Vec::<f64>::try_from(&host).expect("a double tensor converts to Vec<f64>")
}

/// `host` on `device`, copied from pageable memory: on a GPU the host waits until the copy
/// (and the work queued before it) has run. For what cannot be staged in pinned memory.
pub fn upload_pageable(host: &Tensor, device: Device) -> Tensor {
    WAITS.fetch_add(1, Ordering::Relaxed);
    host.to_device(device)
}

/// Waiting transfers (reads and pageable uploads) made by this process so far.
pub fn count() -> u64 {
    WAITS.load(Ordering::Relaxed)
}
