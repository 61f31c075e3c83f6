//! The ranks that train one model together, as one value: who is who (the MPI world)
//! and how their gradients and weights meet (the exchange `dist.backend` picked, and
//! with `dist.overlap` its communication thread).

use super::buckets::{BucketPlan, StepBuckets};
use super::comm_cost::{timing_event, CommCost, CommTimes, DeviceClock};
use super::nccl_overlap::NcclOverlap;
use super::overlap::Overlap;
use super::overlap_session::{Session, Transport};
use super::token_table::rows_looked_up;
use super::{GradientExchange, World};
use crate::config::DistConfig;
use anyhow::anyhow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tch::{Device, Tensor};

/// What the exchange needs to know of a step's last backward: the buckets, whether the
/// backward is staged (it calls `ready(stage)` as stages complete), and the token ids the
/// micro-batch's inputs look up (for the token table's rows, when the plan keeps it apart).
pub struct LastBackward<'a> {
    pub plan: &'a BucketPlan,
    pub staged: bool,
    pub input_ids: Vec<i64>,
}

/// One step's overlapped exchange on `transport`: buckets launched as `backward`'s
/// stages complete, joined after it (also when it panics: the session's drop joins).
fn overlapped<T: Transport>(
    transport: T,
    grads: &Tensor,
    step: &StepBuckets<'_>,
    backward: impl FnOnce(&mut dyn FnMut(usize)),
) -> anyhow::Result<CommCost> {
    let mut session = Session::start(transport, grads, step);
    backward(&mut |stage| session.stage_done(stage));
    session.finish()
}

/// The overlapped exchange: MPI's communication thread, or NCCL's stream.
enum Overlapped {
    Mpi(Overlap),
    Nccl(NcclOverlap),
}

pub struct DataParallel<'w> {
    pub world: &'w World,
    exchange: GradientExchange,
    /// The overlapped exchange, when `dist.overlap` is on and possible here.
    overlap: Option<Overlapped>,
    /// Why `dist.overlap` is not in effect, for the log.
    not_overlapped: Option<&'static str>,
    /// The ranks compared the length of the token table's looked-up flags (at the first
    /// overlapped step: it is fixed for the run).
    table_lengths_compared: AtomicBool,
}

impl<'w> DataParallel<'w> {
    /// Sets up the exchange between the ranks of `world` (NCCL's communicator, if chosen;
    /// the overlapped exchange's thread and communicator). Every rank calls it.
    pub fn new(cfg: &DistConfig, world: &'w World, device: Device) -> anyhow::Result<DataParallel<'w>> {
        let exchange = GradientExchange::new(cfg, world, device)?;
        let why_not = match &exchange {
            _ if !cfg.overlap => Some("dist.overlap is false"),
            GradientExchange::Single => Some("one rank"),
            GradientExchange::Nccl { .. } => None,
            GradientExchange::Mpi { .. } if world.size() == 1 => Some("one rank"),
            GradientExchange::Mpi { .. } if device != Device::Cpu => Some("MPI exchanges CPU tensors only"),
            GradientExchange::Mpi { .. } if !world.allows_a_communication_thread() => Some("this MPI allows no second thread"),
            GradientExchange::Mpi { .. } => None,
        };
        let overlap = match (why_not, &exchange) {
            (Some(_), _) | (None, GradientExchange::Single) => None,
            (None, GradientExchange::Mpi { bucket_bytes, wire }) => {
                super::phase::Phase::CommunicatorDup.begin(world.rank());
                Some(Overlapped::Mpi(Overlap::start(world.duplicate()?, *wire, bucket_bytes / 4)?))
            }
            (None, GradientExchange::Nccl { comm, .. }) => Some(Overlapped::Nccl(NcclOverlap::new(comm)?)),
        };
        Ok(DataParallel { world, exchange, overlap, not_overlapped: why_not, table_lengths_compared: AtomicBool::new(false) })
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
    /// bucket of the plan while backward runs where this exchange overlaps and that pays
    /// (the backward is staged, or the plan keeps the token table apart), else all after it.
    pub fn backward_and_average(
        &self,
        grads: &Tensor,
        last: LastBackward<'_>,
        backward: impl FnOnce(&mut dyn FnMut(usize)),
    ) -> anyhow::Result<CommCost> {
        let overlap = self.overlap.as_ref().filter(|_| last.staged || last.plan.table.is_some());
        let step = || {
            last.plan.for_step(|table| {
                let first = !self.table_lengths_compared.swap(true, Ordering::Relaxed);
                rows_looked_up(self.world, table, &last.input_ids, grads.device(), first)
            })
        };
        match overlap {
            Some(Overlapped::Mpi(overlap)) => overlapped(overlap.transport(), grads, &step()?, backward),
            Some(Overlapped::Nccl(overlap)) => {
                let (comm, wire) = self.exchange.nccl().ok_or_else(|| anyhow!("the NCCL overlap without an NCCL exchange"))?;
                let step = step()?;
                overlapped(overlap.transport(comm, wire, grads)?, grads, &step, backward)
            }
            None => {
                backward(&mut |_| {});
                self.average_after_backward(grads)
            }
        }
    }

    /// The whole buffer's exchange after backward: timed on the host for MPI, on the GPU
    /// (all of it exposed) for NCCL.
    fn average_after_backward(&self, grads: &Tensor) -> anyhow::Result<CommCost> {
        let Some((comm, _)) = self.exchange.nccl() else {
            let started = Instant::now();
            self.exchange.average(self.world, &mut grads.shallow_clone())?;
            let ms = if self.world.size() > 1 { started.elapsed().as_secs_f64() * 1e3 } else { 0.0 };
            return Ok(CommCost::Measured(CommTimes { comm_ms: ms, exposed_ms: ms }));
        };
        let compute = comm.context().default_stream();
        let event = || timing_event(&compute).map_err(|e| anyhow!("recording a CUDA event around the exchange: {e:?}"));
        let (started, backward_ended) = (event()?, event()?);
        self.exchange.average(self.world, &mut grads.shallow_clone())?;
        let (done, waited) = (event()?, event()?);
        Ok(CommCost::OnDevice(DeviceClock { started, done, backward_ended, waited }))
    }

    /// Gives every rank rank 0's values of `t` (flat, contiguous f32).
    pub fn broadcast(&self, t: &mut Tensor) -> anyhow::Result<()> {
        self.exchange.broadcast(self.world, t)
    }
}
