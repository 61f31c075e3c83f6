//! NCCL's transport for the overlapped exchange (src/parallel/overlap_session.rs), as
//! PyTorch DDP's Reducer does on CUDA: a bucket is all-reduced on a stream of its own the
//! moment the backward has completed its gradients. The host only enqueues: an event
//! recorded on the compute stream (libtorch's, the legacy default stream) after the
//! bucket's last stage orders the all-reduce after the kernels that wrote its gradients,
//! and the join makes the compute stream wait for an event recorded after the last
//! bucket, before clipping reads the gradients and before the session frees a wire copy
//! (libtorch's caching allocator hands freed memory to the compute stream's next kernel,
//! which then runs after NCCL is done with it). Nothing here waits for the GPU.
//!
//! Each bucket's runs are averaged as the whole buffer is (ncclAvg, or the bf16 cast,
//! bf16 sum and division of `write_mean`), element for element, so the result is the
//! exchange after backward's: bit for bit where the reduction order does not depend on
//! how the buffer is cut (two ranks; one).

use super::comm_cost::{timing_event, CommCost, DeviceClock};
use super::exchange::write_mean;
use super::nccl::NcclComm;
use super::overlap_session::{JobFailure, Transport};
use crate::config::GradDtype;
use anyhow::anyhow;
use cudarc::driver::{CudaEvent, CudaStream, DriverError};
use std::cell::RefCell;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// The exchange's stream (non-blocking: it never waits for the compute stream, nor it
/// for the exchange, except through events), and one "ready" event per launch slot,
/// recorded again every step (as llm.c's zero.cuh keeps its events) rather than made
/// anew for every bucket of every step.
pub struct NcclOverlap {
    stream: Arc<CudaStream>,
    compute: Arc<CudaStream>,
    ready: RefCell<Vec<CudaEvent>>,
}

fn cuda(what: &str) -> impl FnOnce(DriverError) -> String + '_ {
    move |e| format!("{what}: {e:?}")
}

impl NcclOverlap {
    pub fn new(comm: &NcclComm) -> anyhow::Result<NcclOverlap> {
        let ctx = comm.context();
        let stream = ctx.new_stream().map_err(|e| anyhow!("creating the gradient exchange's CUDA stream: {e:?}"))?;
        Ok(NcclOverlap { stream, compute: ctx.default_stream(), ready: RefCell::new(Vec::new()) })
    }

    /// One step's transport on the exchange's stream, for `grads` (the flat f32 buffer on
    /// this rank's GPU).
    pub fn transport<'a>(&'a self, comm: &'a NcclComm, wire: GradDtype, grads: &Tensor) -> anyhow::Result<NcclTransport<'a>> {
        anyhow::ensure!(
            grads.kind() == Kind::Float && grads.is_contiguous() && grads.device() == Device::Cuda(comm.device()),
            "the overlapped NCCL exchange needs the contiguous f32 gradients on GPU {}",
            comm.device()
        );
        Ok(NcclTransport { overlap: self, comm, wire, started: None, launched: false })
    }

    /// Orders the exchange's stream after the compute stream's work so far, through slot
    /// `slot`'s event (made the first time the slot is used). The borrow of the events
    /// ends here: nothing holds it across a launch.
    fn order_after_compute(&self, slot: usize) -> Result<(), String> {
        let mut events = self.ready.borrow_mut();
        while events.len() <= slot {
            events.push(self.compute.context().new_event(None).map_err(cuda("creating a bucket's ready event"))?);
        }
        events[slot].record(&self.compute).map_err(cuda("recording a bucket's ready event"))?;
        self.stream.wait(&events[slot]).map_err(cuda("ordering a bucket after its gradients"))
    }
}

/// One step's jobs on the exchange's stream.
pub struct NcclTransport<'a> {
    overlap: &'a NcclOverlap,
    comm: &'a NcclComm,
    wire: GradDtype,
    /// The exchange stream's first work of the step, for its time.
    started: Option<CudaEvent>,
    /// Whether any job reached the exchange's stream (the join must then order the
    /// compute stream after it).
    launched: bool,
}

/// A launched job's pieces, and with bf16 on the wire their bf16 copies, which NCCL sums
/// in place and whose means are written back after the join.
pub struct OnTheWire {
    pieces: Vec<Tensor>,
    wires: Vec<Tensor>,
}

impl Transport for NcclTransport<'_> {
    type InFlight = OnTheWire;

    /// All-reduces `pieces` as one group on the exchange's stream, after the compute
    /// stream's work so far.
    fn launch(&mut self, slot: usize, pieces: Vec<Tensor>) -> Result<OnTheWire, String> {
        let o = self.overlap;
        // The casts run on the compute stream, before the event below.
        let wires: Vec<Tensor> = match self.wire {
            GradDtype::Bf16 => pieces.iter().map(|p| p.to_kind(Kind::BFloat16)).collect(),
            GradDtype::Fp32 => Vec::new(),
        };
        o.order_after_compute(slot)?;
        if self.started.is_none() {
            self.started = Some(timing_event(&o.stream).map_err(cuda("recording the exchange's start"))?);
        }
        let stream = o.stream.cu_stream() as cudarc::nccl::sys::cudaStream_t;
        // From here NCCL may have enqueued part of the group: the join must order after it.
        self.launched = true;
        let enqueued = self.comm.group(|| {
            for (i, piece) in pieces.iter().enumerate() {
                match self.wire {
                    // SAFETY: the piece is a live contiguous f32 tensor on this GPU (a view
                    // of the gradients or a copy the session keeps until the join); the
                    // stream waits for the event recorded after its writers, and the
                    // compute stream joins the stream before anything reads or frees it.
                    GradDtype::Fp32 => unsafe { self.comm.all_reduce_mean_f32_on(piece.data_ptr() as u64, piece.numel(), stream)? },
                    // SAFETY: as above, for the piece's bf16 copy, kept with it.
                    GradDtype::Bf16 => unsafe { self.comm.all_reduce_sum_bf16_on(wires[i].data_ptr() as u64, wires[i].numel(), stream)? },
                }
            }
            Ok(())
        });
        enqueued.map_err(|e| format!("{e:#}"))?;
        Ok(OnTheWire { pieces, wires })
    }

    /// Orders the compute stream after everything enqueued on the exchange's stream. If
    /// that cannot be done, the host waits for the exchange's stream instead; if even
    /// that fails, the buffers may still be in use and are never freed.
    fn join(&mut self) -> Result<CommCost, JobFailure> {
        let o = self.overlap;
        let mut clock = || -> Result<DeviceClock, String> {
            let backward_ended = timing_event(&o.compute).map_err(cuda("recording the end of backward"))?;
            let started = match self.started.take() {
                Some(event) => event,
                None => timing_event(&o.stream).map_err(cuda("recording the exchange's start"))?,
            };
            let done = timing_event(&o.stream).map_err(cuda("recording the exchange's end"))?;
            o.compute.wait(&done).map_err(cuda("ordering the optimizer after the exchange"))?;
            let waited = timing_event(&o.compute).map_err(cuda("recording the exchange's join"))?;
            Ok(DeviceClock { started, done, backward_ended, waited })
        };
        match clock() {
            Ok(clock) => Ok(CommCost::OnDevice(clock)),
            Err(why) if !self.launched => Err(JobFailure { slot: None, why, may_still_run: false }),
            Err(why) => {
                let waited = o.stream.synchronize();
                Err(JobFailure { slot: None, why, may_still_run: waited.is_err() })
            }
        }
    }

    fn write_back(&self, job: &OnTheWire) {
        for (values, summed) in job.pieces.iter().zip(&job.wires) {
            write_mean(&mut values.shallow_clone(), summed, self.comm.world());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::flat::Slot;
    use crate::parallel::buckets::BucketPlan;
    use crate::parallel::nccl::unique_id;
    use crate::parallel::overlap_session::Session;

    /// In a world of one the average is the values themselves (fp32) or their bf16
    /// rounding: the session must give exactly that, bucket by bucket, after work the
    /// compute stream queued just before each bucket, with readable times; two steps
    /// each, so that the ready events are recorded again in their slots.
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
        let step = plan.for_step(|_| unreachable!("no token table apart")).unwrap();
        for wire in [GradDtype::Fp32, GradDtype::Fp32, GradDtype::Bf16, GradDtype::Bf16] {
            let source = Tensor::randn([6000], (Kind::Float, Device::Cuda(0)));
            let grads = source.zeros_like();
            let mut session = Session::start(overlap.transport(&comm, wire, &grads).unwrap(), &grads, &step);
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
