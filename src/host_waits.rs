//! Every transfer between host and device that makes the host wait goes through here: on
//! a GPU a read of a device value waits for the device to finish its queued work, and so
//! does a copy to it from pageable host memory (CUDA stages it through a buffer of its
//! own, in stream order). The step makes none (its host tensors go through
//! `host_to_device`, which does not wait), and the loop reads only where it logs, saves
//! or ends. The counter lets a test check that: it counts the calls on every device, the
//! CPU included, where nothing waits, so that a CPU-only run sees what a GPU would wait for.
//!
//! MPI's exchange of gradients that live on a GPU stages them in host memory and back
//! (`to_device`, `copy_across`): those copies exist only where they cross devices, and
//! are counted only there. On the CPU they are no copies at all (the same tensor), and a
//! count would charge every CPU run of the MPI exchange with a wait no CPU step has.

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

/// `t` on `device`: where that crosses devices, a read of the GPU's values or an upload
/// from pageable memory, and counted; else `t` itself, neither copied nor counted.
pub fn to_device(t: &Tensor, device: Device) -> Tensor {
    if crosses(t.device(), device) {
        WAITS.fetch_add(1, Ordering::Relaxed);
    }
    t.to_device(device)
}

/// `src`'s values into `dst` (same shape): counted where they are on different devices.
pub fn copy_across(dst: &mut Tensor, src: &Tensor) {
    if crosses(src.device(), dst.device()) {
        WAITS.fetch_add(1, Ordering::Relaxed);
    }
    tch::no_grad(|| dst.copy_(src));
}

/// Whether a copy from `from` to `to` moves data between the host and a device (or two
/// devices): on a GPU, one that makes the host wait.
fn crosses(from: Device, to: Device) -> bool {
    from != to
}

/// Waiting transfers (reads, pageable uploads, copies across devices) made by this
/// process so far.
pub fn count() -> u64 {
    WAITS.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a copy between the host and a GPU (or two GPUs) counts: on the CPU the MPI
    /// exchange's staging is the tensor itself, uncounted, so CPU runs count as before.
    #[test]
    fn only_copies_across_devices_count() {
        assert!(crosses(Device::Cuda(0), Device::Cpu));
        assert!(crosses(Device::Cpu, Device::Cuda(0)));
        assert!(crosses(Device::Cuda(0), Device::Cuda(1)));
        assert!(!crosses(Device::Cpu, Device::Cpu));
        assert!(!crosses(Device::Cuda(1), Device::Cuda(1)));
        let before = count();
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let same = to_device(&t, Device::Cpu);
        assert_eq!(same.data_ptr(), t.data_ptr(), "no copy on the CPU");
        let mut dst = t.zeros_like();
        copy_across(&mut dst, &t);
        assert!(dst.equal(&t));
        assert_eq!(count(), before, "nothing crossed devices");
    }

    /// On a GPU each crossing counts once: the read back, the upload, the copy into a
    /// GPU tensor from host memory.
    #[test]
    #[ignore = "needs 1 CUDA GPU and a CUDA libtorch"]
    fn gpu_copies_across_devices_count_once_each() {
        let host = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let before = count();
        let on_gpu = to_device(&host, Device::Cuda(0));
        let back = to_device(&on_gpu, Device::Cpu);
        let mut dst = on_gpu.zeros_like();
        copy_across(&mut dst, &host);
        assert!(back.equal(&host) && dst.to_device(Device::Cpu).equal(&host));
        assert_eq!(count(), before + 3);
    }
}
