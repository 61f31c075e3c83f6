//! Gradient exchange: how the flat gradient buffer is averaged across ranks, by
//! `dist.backend`: `nccl` (GPU buffers, NCCL through cudarc), `mpi` (CPU buffers, MPI
//! all-reduce in place), `none` (a world of one), `auto` (NCCL on CUDA, else MPI).
//!
//! Gradients are exchanged once per optimizer step, on the last micro-step (never on the
//! others), in buckets of `dist.bucket_mb`: with `dist.overlap` each bucket as soon as
//! backward has completed it (src/parallel/overlap.rs for MPI, src/parallel/nccl_overlap.rs for
//! NCCL), else all after backward.
//!
//! `dist.grad_dtype: bf16` sends the gradients as bf16, half the bytes: the fp32
//! gradients (accumulated over micro-steps in fp32) are rounded to bf16, summed across
//! ranks with every addition in fp32, and the mean is written back into the fp32 buffer
//! that clipping and AdamW read.

use super::nccl::{self, NcclComm};
use super::World;
use crate::config::{DistBackend, DistConfig, GradDtype};
use crate::host_waits;
use anyhow::{bail, Context};
use tch::{Device, Kind, Tensor};

pub enum GradientExchange {
    /// A world of one: nothing to exchange.
    Single,
    Mpi {
        bucket_bytes: usize,
        wire: GradDtype,
    },
    Nccl {
        comm: NcclComm,
        wire: GradDtype,
    },
}

impl GradientExchange {
    pub fn new(cfg: &DistConfig, world: &World, device: Device) -> anyhow::Result<GradientExchange> {
        let (bucket_bytes, wire) = (((cfg.bucket_mb * (1 << 20) as f64) as usize).max(4), cfg.grad_dtype);
        let backend = match (cfg.backend, device) {
            (DistBackend::Auto, _) if world.size() == 1 => DistBackend::None,
            (DistBackend::Auto, Device::Cuda(_)) => DistBackend::Nccl,
            (DistBackend::Auto, _) => DistBackend::Mpi,
            (b, _) => b,
        };
        Ok(match backend {
            DistBackend::None if world.size() > 1 => {
                bail!("dist.backend: none cannot train {} ranks (use auto, mpi or nccl)", world.size())
            }
            DistBackend::None | DistBackend::Auto => GradientExchange::Single,
            DistBackend::Mpi => GradientExchange::Mpi { bucket_bytes, wire },
            DistBackend::Nccl => {
                // A rank a test chose never to join makes no CUDA or NCCL call: it may run
                // on the CPU (launch/gpu-checks.sh, a world of two on one GPU).
                let never_joins = crate::faults::never_joins_nccl(world.rank());
                let ordinal = match device {
                    Device::Cuda(ordinal) => ordinal,
                    _ if never_joins => 0,
                    _ => {
                        bail!("dist.backend: nccl needs CUDA tensors, but rank {} runs on {device:?} (use dist.backend: mpi)", world.rank())
                    }
                };
                if !never_joins {
                    nccl::check_available().with_context(|| format!("dist.backend: nccl on rank {}", world.rank()))?;
                }
                super::phase::Phase::NcclInit.begin(world.rank());
                // Rank 0 makes the id; MPI carries it to the others.
                let mut id = [0u8; 128];
                if world.is_main() {
                    id = nccl::unique_id()?;
                }
                world.broadcast_bytes(&mut id);
                // Non-blocking init, given up (and aborted) after dist.timeout_s with an error
                // naming this phase: a rank that never joins cannot hold the others for good.
                let timeout = std::time::Duration::from_secs(cfg.timeout_s);
                GradientExchange::Nccl { comm: NcclComm::new_within(id, world.rank(), world.size(), ordinal, timeout)?, wire }
            }
        })
    }

    /// NCCL's communicator and wire type, for the overlapped exchange (None: not NCCL).
    pub fn nccl(&self) -> Option<(&NcclComm, GradDtype)> {
        match self {
            GradientExchange::Nccl { comm, wire } => Some((comm, *wire)),
            _ => None,
        }
    }

    pub fn name(&self) -> String {
        let wire = |w: &GradDtype| match w {
            GradDtype::Fp32 => "fp32",
            GradDtype::Bf16 => "bf16",
        };
        match self {
            GradientExchange::Single => "none (one rank)".to_string(),
            GradientExchange::Mpi { wire: w, .. } => format!("mpi, {} gradients", wire(w)),
            GradientExchange::Nccl { wire: w, .. } => format!("nccl, {} gradients", wire(w)),
        }
    }

    /// Replaces `grads` (flat, contiguous f32) by its mean over ranks.
    pub fn average(&self, world: &World, grads: &mut Tensor) -> anyhow::Result<()> {
        match self {
            GradientExchange::Single => Ok(()),
            GradientExchange::Mpi { bucket_bytes, wire: GradDtype::Fp32 } => {
                world.all_reduce_sum_in_place(grads, bucket_bytes / 4)?;
                let _ = grads.g_mul_scalar_(1.0 / world.size() as f64);
                Ok(())
            }
            GradientExchange::Mpi { bucket_bytes, wire: GradDtype::Bf16 } => {
                // From a GPU a read that waits for it (counted); on the CPU the buffer itself.
                let mut wire = host_waits::to_device(grads, Device::Cpu).to_kind(Kind::BFloat16);
                world.all_reduce_bf16_sum_in_place(&mut wire, bucket_bytes / 2)?;
                write_mean(grads, &wire, world.size());
                Ok(())
            }
            // SAFETY: grads is a live, contiguous f32 CUDA tensor of numel() values.
            GradientExchange::Nccl { comm, wire: GradDtype::Fp32 } => unsafe {
                comm.all_reduce_mean_f32(grads.data_ptr() as u64, grads.numel())
            },
            GradientExchange::Nccl { comm, wire: GradDtype::Bf16 } => {
                // The cast runs on libtorch's current stream, the default stream NCCL's
                // calls are enqueued on, so the three steps run in order on the GPU.
                let wire = grads.to_kind(Kind::BFloat16);
                // SAFETY: wire is a live, contiguous bf16 CUDA tensor of numel() values,
                // kept alive until write_mean's kernels (queued after the reduction) read it.
                unsafe { comm.all_reduce_sum_bf16(wire.data_ptr() as u64, wire.numel())? };
                write_mean(grads, &wire, world.size());
                Ok(())
            }
        }
    }

    /// Gives every rank rank 0's values of `t` (flat, contiguous f32).
    pub fn broadcast(&self, world: &World, t: &mut Tensor) -> anyhow::Result<()> {
        match self {
            GradientExchange::Single => Ok(()),
            GradientExchange::Mpi { .. } => world.broadcast_from_main(t),
            GradientExchange::Nccl { comm, .. } => {
                world.check_same_length("the weight broadcast", t.numel())?;
                // SAFETY: as in `average`.
                unsafe { comm.broadcast_f32(t.data_ptr() as u64, t.numel(), 0) }
            }
        }
    }
}

/// grads = f32(summed) / ranks, in place. `summed` from host memory into a GPU's
/// gradients (MPI's bf16 exchange) is an upload that waits, counted; NCCL's sums are
/// on the gradients' device already.
pub(super) fn write_mean(grads: &mut Tensor, summed: &Tensor, ranks: usize) {
    let mean = host_waits::to_device(summed, grads.device()).to_kind(Kind::Float) / ranks as f64;
    tch::no_grad(|| grads.copy_(&mean));
}
