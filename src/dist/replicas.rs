//! The ranks that train one model together, as one value: who is who (the MPI world)
//! and how their gradients and weights meet (the exchange `dist.backend` picked, and
//! with `dist.overlap` its communication thread).

use super::buckets::BucketPlan;
use super::overlap::{CommTimes, Overlap};
use super::{GradientExchange, World};
use crate::config::DistConfig;
use std::time::Instant;
use tch::{Device, Tensor};

pub struct Replicas<'w> {
    pub world: &'w World,
    exchange: GradientExchange,
    /// The overlapped exchange, when `dist.overlap` is on and possible here.
    overlap: Option<Overlap>,
    /// Why `dist.overlap` is not in effect, for the log.
    not_overlapped: Option<&'static str>,
}

impl<'w> Replicas<'w> {
    /// Sets up the exchange between the ranks of `world` (NCCL's communicator, if chosen;
    /// the overlapped exchange's thread and communicator). Every rank calls it.
    pub fn new(cfg: &DistConfig, world: &'w World, device: Device) -> anyhow::Result<Replicas<'w>> {
        let exchange = GradientExchange::new(cfg, world, device)?;
        let why_not = match exchange.mpi_buckets() {
            _ if !cfg.overlap => Some("dist.overlap is false"),
            _ if world.size() == 1 => Some("one rank"),
            None => Some("the NCCL exchange is not overlapped yet: it runs after backward"),
            Some(_) if device != Device::Cpu => Some("MPI exchanges CPU tensors only"),
            Some(_) if !world.allows_a_communication_thread() => Some("this MPI allows no second thread"),
            Some(_) => None,
        };
        let overlap = match (why_not, exchange.mpi_buckets()) {
            (None, Some((bucket_bytes, wire))) => Some(Overlap::start(world.duplicate()?, wire, bucket_bytes / 4)?),
            _ => None,
        };
        Ok(Replicas { world, exchange, overlap, not_overlapped: why_not })
    }

    /// The exchange as logs and reports show it, e.g. "mpi, fp32 gradients, overlapped".
    pub fn exchange_name(&self) -> String {
        match (&self.overlap, self.not_overlapped) {
            (Some(_), _) => format!("{}, overlapped with backward", self.exchange.name()),
            (None, Some(why)) if self.world.size() > 1 => format!("{}, after backward ({why})", self.exchange.name()),
            _ => self.exchange.name(),
        }
    }

    /// Whether buckets go while backward runs (the step then stages its backward).
    pub fn overlaps(&self) -> bool {
        self.overlap.is_some()
    }

    /// Runs `backward` (which calls `ready(stage)` as its stages complete, backward order)
    /// and replaces `grads` (flat, contiguous f32) by its mean over the ranks: bucket by
    /// bucket of `plan` while backward runs when overlapped and `staged` (the backward
    /// completes gradients before its end), else all after it.
    pub fn backward_and_average(
        &self,
        grads: &Tensor,
        plan: &BucketPlan,
        staged: bool,
        backward: impl FnOnce(&mut dyn FnMut(usize)),
    ) -> anyhow::Result<CommTimes> {
        match self.overlap.as_ref().filter(|_| staged) {
            Some(overlap) => {
                let mut session = overlap.session(grads, plan)?;
                backward(&mut |stage| session.stage_done(stage));
                session.finish()
            }
            None => {
                backward(&mut |_| {});
                let started = Instant::now();
                self.exchange.average(self.world, &mut grads.shallow_clone())?;
                let ms = if self.world.size() > 1 { started.elapsed().as_secs_f64() * 1e3 } else { 0.0 };
                Ok(CommTimes { comm_ms: ms, exposed_ms: ms })
            }
        }
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
