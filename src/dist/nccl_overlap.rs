//! The NCCL exchange overlapped with backward, as PyTorch DDP's Reducer does on CUDA: a
//! bucket (src/dist/buckets.rs) is all-reduced on a stream of its own the moment the
//! backward has completed its gradients. The host only enqueues: an event recorded on
//! the compute stream (libtorch's, the legacy default stream) after the bucket's last
//! stage orders the all-reduce after the kernels that wrote its gradients, and the
//! compute stream waits for an event recorded after the last bucket before clipping
//! reads them. Nothing here waits for the GPU.
//!
//! Each bucket's runs are averaged as the whole buffer is (ncclAvg, or the bf16 cast,
//! bf16 sum and division of `write_mean`), element for element, so the result is the
//! exchange after backward's: bit for bit where the reduction order does not depend on
//! how the buffer is cut (two ranks; one).

use super::buckets::BucketPlan;
use super::comm_cost::{timing_event, CommCost, DeviceClock};
use super::exchange::write_mean;
use super::nccl::NcclComm;
use super::table_rows::TableParts;
use crate::config::GradDtype;
use anyhow::anyhow;
use cudarc::driver::{CudaEvent, CudaStream, DriverError};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// The exchange's stream (non-blocking: it never waits for the compute stream, nor it
/// for the exchange, except through the events below).
pub struct NcclOverlap {
    stream: Arc<CudaStream>,
    compute: Arc<CudaStream>,
}

fn cuda(what: &str) -> impl FnOnce(DriverError) -> anyhow::Error + '_ {
    move |e| anyhow!("{what}: {e:?}")
}

impl NcclOverlap {
    pub fn new(comm: &NcclComm) -> anyhow::Result<NcclOverlap> {
        let ctx = comm.context();
        let stream = ctx.new_stream().map_err(cuda("creating the gradient exchange's CUDA stream"))?;
        Ok(NcclOverlap { stream, compute: ctx.default_stream() })
    }

    /// One step's exchange of `grads` (the flat f32 buffer on this rank's GPU) by `plan`;
    /// with the plan's token table, `touched` holds the rows this micro-step's inputs
    /// look up on any rank (src/dist/table_rows.rs), and the table's early part starts now.
    pub fn session<'a>(
        &'a self,
        comm: &'a NcclComm,
        wire: GradDtype,
        grads: &'a Tensor,
        plan: &'a BucketPlan,
        touched: Option<&'a Tensor>,
    ) -> anyhow::Result<NcclSession<'a>> {
        anyhow::ensure!(
            grads.kind() == Kind::Float && grads.is_contiguous() && grads.device() == Device::Cuda(comm.device()),
            "the overlapped NCCL exchange needs the contiguous f32 gradients on GPU {}",
            comm.device()
        );
        let table = TableParts::start(plan.table, touched, grads);
        let mut session = NcclSession {
            overlap: self,
            comm,
            wire,
            grads,
            plan,
            launched: 0,
            started: None,
            on_the_wire: Vec::new(),
            table,
            failed: None,
        };
        if let Some(early) = session.table.as_ref().map(|t| t.early.shallow_clone()) {
            session.enqueue_or_keep_error(vec![early], "the token table's early part");
        }
        Ok(session)
    }
}

/// The buckets of one step: enqueued as their stages complete, joined at the end.
pub struct NcclSession<'a> {
    overlap: &'a NcclOverlap,
    comm: &'a NcclComm,
    wire: GradDtype,
    grads: &'a Tensor,
    plan: &'a BucketPlan,
    launched: usize,
    started: Option<CudaEvent>,
    /// bf16 on the wire: each piece's f32 values (a view) and its bf16 copy, kept alive
    /// until its mean is written back after the join.
    on_the_wire: Vec<(Tensor, Tensor)>,
    table: Option<TableParts<'a>>,
    /// The first failure; `finish` reports it.
    failed: Option<anyhow::Error>,
}

impl NcclSession<'_> {
    /// Stage `stage` (backward order) has its gradients: every bucket complete now starts
    /// (then the table's rows, when theirs is this stage).
    pub fn stage_done(&mut self, stage: usize) {
        while let Some(bucket) = self.plan.buckets.get(self.launched).filter(|b| b.ready_after <= stage) {
            self.launched += 1;
            let pieces = bucket.runs.iter().map(|&(offset, len)| self.grads.narrow(0, offset, len)).collect();
            self.enqueue_or_keep_error(pieces, "a bucket");
        }
        let grads = self.grads;
        if let Some(packed) = self.table.as_mut().and_then(|t| t.pack_if_ready(grads, stage)) {
            self.enqueue_or_keep_error(vec![packed], "the token table's rows");
        }
    }

    fn enqueue_or_keep_error(&mut self, pieces: Vec<Tensor>, what: &str) {
        if self.failed.is_none() {
            if let Err(e) = self.enqueue(pieces) {
                self.failed = Some(e.context(format!("the overlapped NCCL all-reduce of {what}")));
            }
        }
    }

    /// All-reduces `pieces` (contiguous f32 on this GPU: views of the gradients or the
    /// table's copies) as one group on the exchange's stream, after the compute stream's
    /// work so far.
    fn enqueue(&mut self, pieces: Vec<Tensor>) -> anyhow::Result<()> {
        let o = self.overlap;
        // The casts run on the compute stream, before the event below.
        let wires: Vec<Tensor> = match self.wire {
            GradDtype::Bf16 => pieces.iter().map(|p| p.to_kind(Kind::BFloat16)).collect(),
            GradDtype::Fp32 => Vec::new(),
        };
        let ready = o.compute.record_event(None).map_err(cuda("recording a bucket's ready event"))?;
        o.stream.wait(&ready).map_err(cuda("ordering a bucket after its gradients"))?;
        if self.started.is_none() {
            self.started = Some(timing_event(&o.stream).map_err(cuda("recording the exchange's start"))?);
        }
        let stream = o.stream.cu_stream() as cudarc::nccl::sys::cudaStream_t;
        self.comm.group(|| {
            for (i, piece) in pieces.iter().enumerate() {
                match self.wire {
                    // SAFETY: the piece is a live contiguous f32 tensor on this GPU (a view
                    // of `grads`, which the session borrows, or a copy it keeps); the
                    // stream waits for the event recorded after its writers, and the
                    // compute stream joins the stream before anything reads it (`finish`).
                    GradDtype::Fp32 => unsafe { self.comm.all_reduce_mean_f32_on(piece.data_ptr() as u64, piece.numel(), stream)? },
                    // SAFETY: as above, for the piece's bf16 copy, which lives until the
                    // session has written its mean back after the join.
                    GradDtype::Bf16 => unsafe { self.comm.all_reduce_sum_bf16_on(wires[i].data_ptr() as u64, wires[i].numel(), stream)? },
                }
            }
            Ok(())
        })?;
        self.on_the_wire.extend(pieces.into_iter().zip(wires));
        Ok(())
    }

    /// Launches what is left, then orders the compute stream after every bucket: the
    /// gradients are averaged once the GPU gets there.
    pub fn finish(mut self) -> anyhow::Result<CommCost> {
        self.stage_done(usize::MAX);
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let o = self.overlap;
        let backward_ended = timing_event(&o.compute).map_err(cuda("recording the end of backward"))?;
        let started = match self.started.take() {
            Some(event) => event,
            None => timing_event(&o.stream).map_err(cuda("recording the exchange's start"))?,
        };
        let done = timing_event(&o.stream).map_err(cuda("recording the exchange's end"))?;
        o.compute.wait(&done).map_err(cuda("ordering the optimizer after the exchange"))?;
        let waited = timing_event(&o.compute).map_err(cuda("recording the exchange's join"))?;
        for (values, summed) in &self.on_the_wire {
            write_mean(&mut values.shallow_clone(), summed, self.comm.world());
        }
        if let Some(t) = &self.table {
            t.write_back(self.grads);
        }
        Ok(CommCost::OnDevice(DeviceClock { started, done, backward_ended, waited }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::nccl::unique_id;
    use crate::model::flat::Slot;

    /// In a world of one the average is the values themselves (fp32) or their bf16
    /// rounding: the session must give exactly that, bucket by bucket, after work the
    /// compute stream queued just before each bucket, with readable times.
    #[test]
    #[ignore = "needs 1 CUDA GPU, a CUDA libtorch and libnccl.so on the library path"]
    fn gpu_buckets_in_a_world_of_one_equal_the_whole_buffer_exchange() {
        let comm = NcclComm::new(unique_id().unwrap(), 0, 1, 0).unwrap();
        let overlap = NcclOverlap::new(&comm).unwrap();
        let slots: Vec<Slot> = (0..6)
            .map(|i| Slot { name: format!("h.{}.w", i % 3), shape: vec![1000], offset: i * 1000, numel: 1000, reserved: 1000, decay: true })
            .collect();
        let stages: Vec<Vec<String>> = (0..3).rev().map(|l| vec![format!("h.{l}.")]).collect();
        let plan = BucketPlan::new(&slots, &stages, 1500);
        assert!(plan.buckets.len() >= 3, "{plan:?}");
        for wire in [GradDtype::Fp32, GradDtype::Bf16] {
            let source = Tensor::randn([6000], (Kind::Float, Device::Cuda(0)));
            let grads = source.zeros_like();
            let mut session = overlap.session(&comm, wire, &grads, &plan, None).unwrap();
            for stage in 0..3 {
                // The stage's gradients are written on the compute stream, then it is done.
                for slot in slots.iter().filter(|s| s.name.starts_with(&stages[stage][0])) {
                    let _ = grads.narrow(0, slot.offset, slot.numel).copy_(&(source.narrow(0, slot.offset, slot.numel) * 1.0));
                }
                session.stage_done(stage);
            }
            let times = session.finish().unwrap().times().unwrap();
            assert!(times.comm_ms >= 0.0 && times.exposed_ms >= 0.0, "{times:?}");
            let want = match wire {
                GradDtype::Fp32 => source.shallow_clone(),
                GradDtype::Bf16 => source.to_kind(Kind::BFloat16).to_kind(Kind::Float),
            };
            assert!(grads.equal(&want), "{wire:?}");
        }
    }
}
