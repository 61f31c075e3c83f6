//! Host tensors onto the step's device without the host waiting: a copy to a GPU from
//! pageable memory (a plain `to_device`) synchronizes, so the host would stall until the
//! work queued before it had run, and queue nothing meanwhile. Here the values are staged
//! in pinned memory and copied with `non_blocking` (nanoGPT's `pin_memory()` with
//! `non_blocking=True`): the host returns once the copy is queued, and the device runs it
//! in stream order, before any work queued after it reads the tensor.

use crate::host_waits;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;
use tch::{Device, Tensor};

static QUEUED: AtomicU64 = AtomicU64::new(0);

/// `host` (a CPU tensor) on `device`, the host not waiting for the copy.
///
/// On the CPU it is `host` itself: the same storage, the same bits, no copy (as
/// `to_device` gives). On a CUDA device the values are copied into pinned memory from
/// libtorch's caching host allocator (`_pin_memory`: `pin_memory` does the same but, given
/// a device, as tch always gives one, warns on every call that the argument is deprecated)
/// and from there with `non_blocking` on the device's current stream: libtorch's default
/// stream, which every kernel of the step and NCCL's collectives run on or wait for.
///
/// The pinned copy is dropped when this returns, perhaps before the device has read it.
/// What makes that safe: ATen's non-blocking host/device copy records an event on the
/// copy's stream for the pinned block (`record_event` in `copy_kernel_cuda`), and the
/// caching host allocator hands a freed block out again only once all its recorded events
/// have completed. (A pinned buffer from elsewhere, not from that allocator, would have no
/// such guard.)
///
/// Where pinning fails (page-locked memory exhausted), or on another kind of device, the
/// copy is a pageable one, counted by `host_waits`: correct, only not free.
pub fn upload(host: &Tensor, device: Device) -> Tensor {
    let queued = match device {
        Device::Cpu => Some(host.shallow_clone()),
        Device::Cuda(_) => copy_from_pinned(host, device),
        _ => None,
    };
    match queued {
        Some(on_device) => {
            QUEUED.fetch_add(1, Ordering::Relaxed);
            on_device
        }
        None => host_waits::upload_pageable(host, device),
    }
}

/// The non-blocking copy of `host` to CUDA `device` through pinned memory; None where
/// memory cannot be pinned (said once).
fn copy_from_pinned(host: &Tensor, device: Device) -> Option<Tensor> {
    // Contiguous first: a strided source would be gathered into a pageable temporary.
    match host.contiguous().f_internal_pin_memory(device) {
        Ok(pinned) => Some(pinned.to_device_(device, pinned.kind(), true, false)),
        Err(e) => {
            static WARNED: Once = Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "cannot pin host memory ({e}): copies to {device:?} are made from pageable memory, which makes the host wait"
                )
            });
            None
        }
    }
}

/// Uploads made by this process so far that did not make the host wait.
pub fn count() -> u64 {
    QUEUED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};
    use tch::Kind;

    #[test]
    fn on_the_cpu_the_tensor_itself_is_handed_over() {
        let host = Tensor::from_slice(&[3i64, 1, 4, 1, 5, 9]).view([2, 3]);
        let queued = count();
        let on_device = upload(&host, Device::Cpu);
        assert_eq!(on_device.data_ptr(), host.data_ptr(), "a copy was made");
        assert_eq!(on_device.size(), vec![2, 3]);
        // Counted as queued (other tests may count beside it: the exact counts are
        // tests/lean_step.rs's, in a process of its own).
        assert!(count() > queued);
    }

    /// Needs 1 CUDA GPU: `cargo test --locked --lib host_to_device::tests::cuda -- --ignored`.
    /// The host returns from an upload queued behind ~a second of matrix products long
    /// before they finish (a pageable copy, measured beside it, waits for them), and 64
    /// uploads whose pinned copies are all dropped before any of them ran arrive intact:
    /// the caching host allocator handed out no block under a pending copy again.
    #[test]
    #[ignore = "needs 1 CUDA GPU"]
    fn cuda_upload_is_queued_without_a_wait_and_arrives_intact() {
        let device = Device::Cuda(0);
        let a = Tensor::randn([4096, 4096], (Kind::Float, device));
        let busy = |n: usize| {
            let mut x = a.shallow_clone();
            for _ in 0..n {
                x = x.matmul(&a).tanh();
            }
            x
        };
        let _ = busy(2);
        tch::Cuda::synchronize(0);
        // How long the queued work takes, measured.
        let start = Instant::now();
        let _ = busy(200);
        tch::Cuda::synchronize(0);
        let work = start.elapsed();
        assert!(work > Duration::from_millis(100), "the queued work is too short to measure against: {work:?}");

        let sources: Vec<Tensor> =
            (0..64).map(|i| Tensor::arange_start(i * 100_000, (i + 1) * 100_000, (Kind::Int64, Device::Cpu))).collect();
        // Once untimed: the caching host allocator's first blocks come from cudaHostAlloc.
        let _ = sources.iter().map(|s| upload(s, device)).collect::<Vec<_>>();
        tch::Cuda::synchronize(0);
        let (waits, queued) = (host_waits::count(), count());
        let _ = busy(200);
        let start = Instant::now();
        let copies: Vec<Tensor> = sources.iter().map(|s| upload(s, device)).collect();
        let returned = start.elapsed();
        tch::Cuda::synchronize(0);
        assert!(returned < work / 4, "64 uploads took {returned:?} behind {work:?} of queued work: the host waited");
        assert_eq!((host_waits::count(), count()), (waits, queued + 64));
        for (s, c) in sources.iter().zip(&copies) {
            assert_eq!(c.device(), device);
            assert!(c.to_device(Device::Cpu).equal(s), "an upload arrived damaged");
        }

        // The same check fails for a pageable copy: it waits for the queued work.
        let _ = busy(200);
        let start = Instant::now();
        let _ = host_waits::upload_pageable(&sources[0], device);
        assert!(start.elapsed() > work / 2, "a pageable copy did not wait: this test could not tell");
    }
}
