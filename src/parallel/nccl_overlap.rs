//! NCCL's transport for the overlapped exchange (src/parallel/overlap_session.rs), as
//! PyTorch DDP's Reducer does on CUDA: a bucket is all-reduced on a stream of its own the
//! moment the backward has completed its gradients. The host only enqueues: an event
//! recorded on the compute stream (libtorch's, the legacy default stream) after the
//! bucket's last stage orders the all-reduce after the kernels that wrote its gradients,
//! and the join makes the compute stream wait for an event recorded after the last
//! bucket, before clipping reads the gradients and before the session frees a wire copy
//! (libtorch's caching allocator hands freed memory to the compute stream's next kernel,
//! which then runs after NCCL is done with it). Nothing here waits for the GPU. The
//! stream and event calls go through [`ExchangeStreams`], so that the tests below check
//! their order, and when buffers are released, on the CPU with a fake.
//!
//! Each bucket's runs are averaged as the whole buffer is (ncclAvg, or the bf16 cast,
//! bf16 sum and division of `write_mean`), element for element, so the result is the
//! exchange after backward's: bit for bit where the reduction order does not depend on
//! how the buffer is cut (two ranks; one).

use super::comm_cost::{timing_event, CommCost, DeviceClock};
use super::exchange::write_mean;
use super::nccl::NcclComm;
use super::overlap_session::{JobFailure, LaunchFailure, Transport};
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
    pub fn transport<'a>(&'a self, comm: &'a NcclComm, wire: GradDtype, grads: &Tensor) -> anyhow::Result<NcclTransport<CudaStreams<'a>>> {
        anyhow::ensure!(
            grads.kind() == Kind::Float && grads.is_contiguous() && grads.device() == Device::Cuda(comm.device()),
            "the overlapped NCCL exchange needs the contiguous f32 gradients on GPU {}",
            comm.device()
        );
        Ok(NcclTransport::new(CudaStreams { overlap: self, comm, started: None }, wire))
    }
}

/// What the NCCL transport asks of the GPU. The transport decides the order (a bucket's
/// ready event recorded, the exchange's stream made to wait for it, the all-reduce
/// enqueued; at the join the compute stream made to wait for the exchange's); this seam
/// carries it out, on CUDA streams or, in the tests below, on a fake that logs the order.
pub trait ExchangeStreams {
    /// Records launch slot `slot`'s ready event on the compute stream (after the work that
    /// wrote the bucket's gradients).
    fn record_ready(&mut self, slot: usize) -> Result<(), String>;
    /// Makes the exchange's stream wait for slot `slot`'s ready event.
    fn exchange_waits_for_ready(&mut self, slot: usize) -> Result<(), String>;
    /// Enqueues the all-reduce of `buffers` as one group on the exchange's stream: f32
    /// means, or bf16 sums. When it fails, part of the group may have been enqueued.
    fn enqueue(&mut self, buffers: &[Tensor], wire: GradDtype) -> Result<(), String>;
    /// Makes the compute stream wait for everything enqueued on the exchange's stream; the
    /// exchange's cost.
    fn compute_waits_for_exchange(&mut self) -> Result<CommCost, String>;
    /// Makes the host wait until the exchange's stream has run everything (where the
    /// compute stream could not be ordered after it).
    fn host_waits_for_exchange(&mut self) -> Result<(), String>;
    /// The ranks that sum (for the bf16 means).
    fn ranks(&self) -> usize;
}

/// [`ExchangeStreams`] on the GPU: the exchange's stream, libtorch's compute stream
/// (the legacy default stream) and NCCL.
pub struct CudaStreams<'a> {
    overlap: &'a NcclOverlap,
    comm: &'a NcclComm,
    /// The exchange stream's first work of the step, for its time.
    started: Option<CudaEvent>,
}

impl ExchangeStreams for CudaStreams<'_> {
    fn record_ready(&mut self, slot: usize) -> Result<(), String> {
        let o = self.overlap;
        let mut events = o.ready.borrow_mut();
        while events.len() <= slot {
            events.push(o.compute.context().new_event(None).map_err(cuda("creating a bucket's ready event"))?);
        }
        events[slot].record(&o.compute).map_err(cuda("recording a bucket's ready event"))
    }

    fn exchange_waits_for_ready(&mut self, slot: usize) -> Result<(), String> {
        let o = self.overlap;
        let events = o.ready.borrow();
        let event = events.get(slot).ok_or_else(|| format!("no ready event recorded for launch slot {slot}"))?;
        o.stream.wait(event).map_err(cuda("ordering a bucket after its gradients"))
    }

    fn enqueue(&mut self, buffers: &[Tensor], wire: GradDtype) -> Result<(), String> {
        let o = self.overlap;
        if self.started.is_none() {
            self.started = Some(timing_event(&o.stream).map_err(cuda("recording the exchange's start"))?);
        }
        let stream = o.stream.cu_stream() as cudarc::nccl::sys::cudaStream_t;
        let comm = self.comm;
        let enqueued = comm.group(|| {
            for buffer in buffers {
                match wire {
                    // SAFETY: the buffer is a live contiguous f32 tensor on this GPU (a view
                    // of the gradients or a copy the session keeps until the join, also
                    // when this group fails); the stream waits for the event recorded after
                    // its writers, and the compute stream joins the stream before anything
                    // reads or frees it.
                    GradDtype::Fp32 => unsafe { comm.all_reduce_mean_f32_on(buffer.data_ptr() as u64, buffer.numel(), stream)? },
                    // SAFETY: as above, for a piece's bf16 copy, kept with it.
                    GradDtype::Bf16 => unsafe { comm.all_reduce_sum_bf16_on(buffer.data_ptr() as u64, buffer.numel(), stream)? },
                }
            }
            Ok(())
        });
        enqueued.map_err(|e| format!("{e:#}"))
    }

    fn compute_waits_for_exchange(&mut self) -> Result<CommCost, String> {
        let o = self.overlap;
        let backward_ended = timing_event(&o.compute).map_err(cuda("recording the end of backward"))?;
        let started = match self.started.take() {
            Some(event) => event,
            None => timing_event(&o.stream).map_err(cuda("recording the exchange's start"))?,
        };
        let done = timing_event(&o.stream).map_err(cuda("recording the exchange's end"))?;
        o.compute.wait(&done).map_err(cuda("ordering the optimizer after the exchange"))?;
        let waited = timing_event(&o.compute).map_err(cuda("recording the exchange's join"))?;
        Ok(CommCost::OnDevice(DeviceClock { started, done, backward_ended, waited }))
    }

    fn host_waits_for_exchange(&mut self) -> Result<(), String> {
        self.overlap.stream.synchronize().map_err(|e| format!("waiting for the exchange's stream: {e:?}"))
    }

    fn ranks(&self) -> usize {
        self.comm.world()
    }
}

/// One step's jobs on the exchange's stream.
pub struct NcclTransport<S: ExchangeStreams> {
    streams: S,
    wire: GradDtype,
    /// Whether any job may have reached the exchange's stream (the join must then order
    /// the compute stream after it).
    launched: bool,
}

impl<S: ExchangeStreams> NcclTransport<S> {
    pub fn new(streams: S, wire: GradDtype) -> NcclTransport<S> {
        NcclTransport { streams, wire, launched: false }
    }
}

/// A launched job's pieces, and with bf16 on the wire their bf16 copies, which NCCL sums
/// in place and whose means are written back after the join.
pub struct OnTheWire {
    pieces: Vec<Tensor>,
    wires: Vec<Tensor>,
}

impl<S: ExchangeStreams> Transport for NcclTransport<S> {
    type InFlight = OnTheWire;

    /// All-reduces `pieces` as one group on the exchange's stream, after the compute
    /// stream's work so far. Once the group may be partly enqueued, a failure hands the
    /// job's buffers (the bf16 copies too) to the session, which keeps them until the join.
    fn launch(&mut self, slot: usize, pieces: Vec<Tensor>) -> Result<OnTheWire, LaunchFailure<OnTheWire>> {
        // The casts run on the compute stream, before the ready event: freed after a
        // failure below, they go back to that stream only.
        let wires: Vec<Tensor> = match self.wire {
            GradDtype::Bf16 => pieces.iter().map(|p| p.to_kind(Kind::BFloat16)).collect(),
            GradDtype::Fp32 => Vec::new(),
        };
        self.streams.record_ready(slot)?;
        self.streams.exchange_waits_for_ready(slot)?;
        // From here NCCL may have enqueued part of the group: the join must order after it,
        // and nothing the group names may be freed before.
        self.launched = true;
        let job = OnTheWire { pieces, wires };
        let buffers = match self.wire {
            GradDtype::Fp32 => &job.pieces,
            GradDtype::Bf16 => &job.wires,
        };
        match self.streams.enqueue(buffers, self.wire) {
            Ok(()) => Ok(job),
            Err(why) => Err(LaunchFailure { why, kept: Some(job) }),
        }
    }

    /// Orders the compute stream after everything enqueued on the exchange's stream. If
    /// that cannot be done, the host waits for the exchange's stream instead; if even
    /// that fails, the buffers may still be in use and are never freed.
    fn join(&mut self) -> Result<CommCost, JobFailure> {
        match self.streams.compute_waits_for_exchange() {
            Ok(cost) => Ok(cost),
            Err(why) if !self.launched => Err(JobFailure { slot: None, why, may_still_run: false }),
            Err(why) => {
                let waited = self.streams.host_waits_for_exchange();
                Err(JobFailure { slot: None, why, may_still_run: waited.is_err() })
            }
        }
    }

    fn write_back(&self, job: &OnTheWire) {
        for (values, summed) in job.pieces.iter().zip(&job.wires) {
            write_mean(&mut values.shallow_clone(), summed, self.streams.ranks());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::flat::Slot;
    use crate::parallel::buckets::BucketPlan;
    use crate::parallel::comm_cost::CommTimes;
    use crate::parallel::nccl::unique_id;
    use crate::parallel::overlap_session::Session;
    use std::sync::Mutex;

    type Log = Arc<Mutex<Vec<String>>>;

    fn say(log: &Log, line: String) {
        log.lock().unwrap().push(line);
    }

    /// The GPU's side played on the CPU: it logs what it is asked in order, and its
    /// "all-reduce" is the sum over `ranks` ranks holding the same values (bf16 sums
    /// become `ranks` times the values; f32 means stay). `fail_enqueue`: that enqueue
    /// (from 0) sums its first buffer, then fails, as a group whose end fails after part of
    /// it was enqueued; `fail_join`, `fail_host_wait`: the join's two ways to order after
    /// the exchange fail.
    struct FakeStreams {
        log: Log,
        ranks: usize,
        enqueued: usize,
        fail_enqueue: Option<usize>,
        fail_join: bool,
        fail_host_wait: bool,
    }

    impl FakeStreams {
        fn new(log: &Log) -> FakeStreams {
            FakeStreams { log: log.clone(), ranks: 2, enqueued: 0, fail_enqueue: None, fail_join: false, fail_host_wait: false }
        }
    }

    impl ExchangeStreams for FakeStreams {
        fn record_ready(&mut self, slot: usize) -> Result<(), String> {
            say(&self.log, format!("ready {slot}"));
            Ok(())
        }

        fn exchange_waits_for_ready(&mut self, slot: usize) -> Result<(), String> {
            say(&self.log, format!("exchange waits {slot}"));
            Ok(())
        }

        fn enqueue(&mut self, buffers: &[Tensor], wire: GradDtype) -> Result<(), String> {
            let n = self.enqueued;
            self.enqueued += 1;
            say(&self.log, format!("enqueue {n}"));
            let fails = self.fail_enqueue == Some(n);
            for buffer in buffers.iter().take(if fails { 1 } else { buffers.len() }) {
                if wire == GradDtype::Bf16 {
                    assert_eq!(buffer.kind(), Kind::BFloat16, "bf16 on the wire sums the bf16 copies");
                    let _ = buffer.shallow_clone().g_mul_scalar_(self.ranks as f64);
                }
            }
            if fails {
                return Err("ncclGroupEnd failed".into());
            }
            Ok(())
        }

        fn compute_waits_for_exchange(&mut self) -> Result<CommCost, String> {
            say(&self.log, "compute waits".into());
            if self.fail_join {
                return Err("cuStreamWaitEvent failed".into());
            }
            Ok(CommCost::Measured(CommTimes::default()))
        }

        fn host_waits_for_exchange(&mut self) -> Result<(), String> {
            say(&self.log, "host waits".into());
            if self.fail_host_wait {
                return Err("cuStreamSynchronize failed".into());
            }
            Ok(())
        }

        fn ranks(&self) -> usize {
            self.ranks
        }
    }

    /// A transport that logs when the session releases what a launch kept ("freed N").
    struct Logged<T: Transport> {
        inner: T,
        log: Log,
    }

    struct Kept<K> {
        slot: usize,
        log: Log,
        inner: K,
    }

    impl<K> Drop for Kept<K> {
        fn drop(&mut self) {
            say(&self.log, format!("freed {}", self.slot));
        }
    }

    impl<T: Transport> Transport for Logged<T> {
        type InFlight = Kept<T::InFlight>;

        fn launch(&mut self, slot: usize, pieces: Vec<Tensor>) -> Result<Self::InFlight, LaunchFailure<Self::InFlight>> {
            let keep = |inner| Kept { slot, log: self.log.clone(), inner };
            match self.inner.launch(slot, pieces) {
                Ok(inner) => Ok(keep(inner)),
                Err(LaunchFailure { why, kept }) => Err(LaunchFailure { why, kept: kept.map(keep) }),
            }
        }

        fn join(&mut self) -> Result<CommCost, JobFailure> {
            self.inner.join()
        }

        fn write_back(&self, job: &Self::InFlight) {
            self.inner.write_back(&job.inner)
        }
    }

    /// Six slots of 1,000 values over three stages, in buckets of at most 1,500 values.
    fn six_slots() -> (Vec<Slot>, Vec<Vec<String>>) {
        let slots: Vec<Slot> = (0..6)
            .map(|i| Slot { name: format!("h.{}.w", i % 3), shape: vec![1000], offset: i * 1000, numel: 1000, reserved: 1000, decay: true })
            .collect();
        let stages: Vec<Vec<String>> = (0..3).rev().map(|l| vec![format!("h.{l}.")]).collect();
        (slots, stages)
    }

    /// One step of the session over `streams` (bf16 on the wire), every stage done: the
    /// outcome and the log.
    fn one_step(streams: FakeStreams, grads: &Tensor) -> (anyhow::Result<CommCost>, Vec<String>) {
        let log = streams.log.clone();
        let (slots, stages) = six_slots();
        let plan = BucketPlan::new(&slots, &stages, 1500);
        assert!(plan.buckets.len() >= 3, "{plan:?}");
        let step = plan.for_step(|_| unreachable!("no token table apart")).unwrap();
        let transport = Logged { inner: NcclTransport::new(streams, GradDtype::Bf16), log: log.clone() };
        let mut session = Session::start(transport, grads, &step);
        for stage in 0..3 {
            session.stage_done(stage);
        }
        let outcome = session.finish();
        let log = log.lock().unwrap().clone();
        (outcome, log)
    }

    fn at(log: &[String], line: &str) -> usize {
        log.iter().position(|l| l == line).unwrap_or_else(|| panic!("no \"{line}\" in {log:?}"))
    }

    /// Each bucket: its ready event recorded, the exchange's stream made to wait for it,
    /// then its group enqueued; the compute stream waits for the exchange at the join, and
    /// only then are the buffers (the bf16 copies among them) released and the means
    /// written in: bf16's sum of two equal ranks halved is the values' bf16 rounding.
    #[test]
    fn each_bucket_waits_for_its_gradients_and_the_join_comes_before_any_release() {
        let log = Log::default();
        let source = Tensor::randn([6000], (Kind::Float, Device::Cpu));
        let grads = source.copy();
        let (outcome, log) = one_step(FakeStreams::new(&log), &grads);
        outcome.unwrap();
        let buckets = log.iter().filter(|l| l.starts_with("enqueue")).count();
        assert!(buckets >= 3, "{log:?}");
        for slot in 0..buckets {
            let ready = at(&log, &format!("ready {slot}"));
            assert_eq!(log[ready + 1], format!("exchange waits {slot}"), "{log:?}");
            assert_eq!(log[ready + 2], format!("enqueue {slot}"), "{log:?}");
        }
        let joined = at(&log, "compute waits");
        assert!(log[..joined].iter().all(|l| !l.starts_with("freed")), "released before the join: {log:?}");
        assert_eq!(log[joined + 1..].iter().filter(|l| l.starts_with("freed")).count(), buckets, "{log:?}");
        assert!(grads.equal(&source.to_kind(Kind::BFloat16).to_kind(Kind::Float)));
    }

    /// A group that fails after part of it was enqueued: its bf16 copies are released
    /// after the join too, the compute stream still waits for the exchange, nothing is
    /// written in, and the error names the bucket. (Before the transport handed them to the
    /// session, a failed launch dropped them at once: "freed 1" never came after the join.)
    #[test]
    fn a_group_that_fails_part_enqueued_keeps_its_wire_copies_until_the_join() {
        let log = Log::default();
        let mut streams = FakeStreams::new(&log);
        streams.fail_enqueue = Some(1);
        let grads = Tensor::ones([6000], (Kind::Float, Device::Cpu));
        let (outcome, log) = one_step(streams, &grads);
        let e = outcome.err().expect("the step fails").to_string();
        assert!(e.contains("could not start bucket 2 of") && e.contains("ncclGroupEnd failed"), "{e}");
        let joined = at(&log, "compute waits");
        assert!(at(&log, "freed 1") > joined, "the failed group's wire copies went before the join: {log:?}");
        assert!(at(&log, "freed 0") > joined, "{log:?}");
        assert_eq!(log.iter().filter(|l| l.starts_with("enqueue")).count(), 2, "nothing enqueued after the failure: {log:?}");
        assert!(grads.equal(&Tensor::ones([6000], (Kind::Float, Device::Cpu))), "a failed step wrote means in");
    }

    /// When the compute stream cannot be ordered after the exchange, the host waits for
    /// the exchange's stream before anything is released; when it cannot wait either,
    /// nothing is ever released.
    #[test]
    fn a_join_that_cannot_order_waits_on_the_host_or_never_releases() {
        for host_wait_fails in [false, true] {
            let log = Log::default();
            let mut streams = FakeStreams::new(&log);
            streams.fail_join = true;
            streams.fail_host_wait = host_wait_fails;
            let grads = Tensor::ones([6000], (Kind::Float, Device::Cpu));
            let (outcome, log) = one_step(streams, &grads);
            let e = outcome.err().expect("the step fails").to_string();
            assert!(e.contains("cuStreamWaitEvent failed"), "{e}");
            let waited = at(&log, "host waits");
            let freed: Vec<usize> = log.iter().enumerate().filter(|(_, l)| l.starts_with("freed")).map(|(i, _)| i).collect();
            if host_wait_fails {
                assert!(freed.is_empty(), "released what the exchange may still write: {log:?}");
            } else {
                assert!(!freed.is_empty() && freed.iter().all(|&i| i > waited), "{log:?}");
            }
        }
    }

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
