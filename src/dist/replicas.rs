//! The ranks that train one model together, as one value: who is who (the MPI world)
//! and how their gradients and weights meet (the exchange `dist.backend` picked).

use super::{GradientExchange, World};
use crate::config::DistConfig;
use tch::{Device, Tensor};

pub struct Replicas<'w> {
    pub world: &'w World,
    exchange: GradientExchange,
}

impl<'w> Replicas<'w> {
    /// Sets up the exchange between the ranks of `world` (NCCL's communicator, if chosen).
    pub fn new(cfg: &DistConfig, world: &'w World, device: Device) -> anyhow::Result<Replicas<'w>> {
        Ok(Replicas { world, exchange: GradientExchange::new(cfg, world, device)? })
    }

    /// The exchange as logs and reports show it, e.g. "nccl, bf16 gradients".
    pub fn exchange_name(&self) -> String {
        self.exchange.name()
    }

    /// Replaces `grads` (flat, contiguous f32) by its mean over the ranks.
    pub fn average(&self, grads: &mut Tensor) -> anyhow::Result<()> {
        self.exchange.average(self.world, grads)
    }

    /// Gives every rank rank 0's values of `t` (flat, contiguous f32).
    pub fn broadcast(&self, t: &mut Tensor) -> anyhow::Result<()> {
        self.exchange.broadcast(self.world, t)
    }
}
