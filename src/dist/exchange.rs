//! Gradient exchange: how the flat gradient buffer is averaged across ranks, by
//! `dist.backend`: `nccl` (GPU buffers, NCCL through cudarc), `mpi` (CPU buffers, MPI
//! all-reduce in place), `none` (a world of one), `auto` (NCCL on CUDA, else MPI).
//!
//! Gradients are exchanged once per optimizer step, after the last micro-step's backward
//! (never on the others), in buckets of `dist.bucket_mb`. tch exposes no autograd hooks,
//! so the exchange cannot overlap the backward pass as PyTorch DDP's does; it runs right
//! after it.

use super::nccl::{self, NcclComm};
use super::World;
use crate::config::{DistBackend, DistConfig};
use anyhow::{bail, Context};
use tch::{Device, Tensor};

pub enum GradientExchange {
    /// A world of one: nothing to exchange.
    Single,
    Mpi { bucket_elems: usize },
    Nccl(NcclComm),
}

impl GradientExchange {
    pub fn new(cfg: &DistConfig, world: &World, device: Device) -> anyhow::Result<GradientExchange> {
        let bucket_elems = (cfg.bucket_mb * (1 << 20) / 4).max(1);
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
            DistBackend::Mpi => GradientExchange::Mpi { bucket_elems },
            DistBackend::Nccl => {
                let Device::Cuda(ordinal) = device else {
                    bail!("dist.backend: nccl needs CUDA tensors, but rank {} runs on {device:?} (use dist.backend: mpi)", world.rank())
                };
                nccl::check_available().with_context(|| format!("dist.backend: nccl on rank {}", world.rank()))?;
                // Rank 0 makes the id; MPI carries it to the others.
                let mut id = [0u8; 128];
                if world.is_main() {
                    id = nccl::unique_id()?;
                }
                world.broadcast_bytes(&mut id);
                GradientExchange::Nccl(NcclComm::new(id, world.rank(), world.size(), ordinal)?)
            }
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            GradientExchange::Single => "none (one rank)",
            GradientExchange::Mpi { .. } => "mpi",
            GradientExchange::Nccl(_) => "nccl",
        }
    }

    /// Replaces `grads` (flat, contiguous f32) by its mean over ranks.
    pub fn average(&self, world: &World, grads: &mut Tensor) -> anyhow::Result<()> {
        match self {
            GradientExchange::Single => Ok(()),
            GradientExchange::Mpi { bucket_elems } => {
                world.all_reduce_sum_in_place(grads, *bucket_elems)?;
                let _ = grads.g_mul_scalar_(1.0 / world.size() as f64);
                Ok(())
            }
            // SAFETY: grads is a live, contiguous f32 CUDA tensor of numel() values.
            GradientExchange::Nccl(comm) => unsafe { comm.all_reduce_mean_f32(grads.data_ptr() as u64, grads.numel()) },
        }
    }

    /// Gives every rank rank 0's values of `t` (flat, contiguous f32).
    pub fn broadcast(&self, world: &World, t: &mut Tensor) -> anyhow::Result<()> {
        match self {
            GradientExchange::Single => Ok(()),
            GradientExchange::Mpi { .. } => {
                world.broadcast_from_main(t);
                Ok(())
            }
            // SAFETY: as in `average`.
            GradientExchange::Nccl(comm) => unsafe { comm.broadcast_f32(t.data_ptr() as u64, t.numel(), 0) },
        }
    }
}
