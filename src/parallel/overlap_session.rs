//! One step's gradient exchange overlapped with backward, whatever carries it: buckets
//! (src/parallel/buckets.rs) launched the moment backward completes their gradients, the
//! token table in its two parts (src/parallel/token_table.rs), and one join at the end. The
//! carrier is a [`Transport`]: MPI's communication thread and ring (src/parallel/overlap.rs)
//! or NCCL on a stream of its own (src/parallel/nccl_overlap.rs).
//!
//! The session owns every buffer a transport may still read or write (views of the
//! gradients, the table's copies, bf16 wire copies) and releases none of them before the
//! transport has joined: on `finish`, on an error (a launch that failed after handing
//! part of its work over included) and on a panic in backward alike (its `Drop` joins).
//! Without that, an error return let libtorch's caching allocator hand a wire copy to the
//! next kernel while NCCL was still writing into it.

use super::buckets::{Bucket, StepBuckets};
use super::comm_cost::CommCost;
use super::token_table::TokenTableInFlight;
use anyhow::anyhow;
use std::fmt;
use tch::Tensor;

/// One launch of a step: what it averages, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// Bucket `index` (from 0) of `of`, `values` long, complete after backward stage
    /// `ready_after`.
    Bucket {
        index: usize,
        of: usize,
        values: i64,
        ready_after: usize,
    },
    TableWhole,
    TokenTableLayout,
}

impl fmt::Display for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Job::Bucket { index, of, values, ready_after } => {
                write!(f, "bucket {} of {of} ({values} values, complete after backward stage {ready_after})", index + 1)
            }
            Job::TableWhole => write!(f, "the token table's whole part"),
            Job::TokenTableLayout => write!(f, "the token table's looked-up rows"),
        }
    }
}

/// A job that failed, by its place in the launch order (`None`: not one job's fault).
#[derive(Debug)]
pub struct JobFailure {
    pub slot: Option<usize>,
    pub why: String,
    /// The transport could not make sure its work is over: what it was given must never
    /// be freed (the session leaks it rather than hand it to the next kernel).
    pub may_still_run: bool,
}

/// A launch that failed, and what of it the transport may still read or write: NCCL may
/// have enqueued part of a group before its end failed. The session keeps `kept` until the
/// join, as it keeps a launched job's buffers; `None` when nothing of the job can run.
#[derive(Debug)]
pub struct LaunchFailure<K> {
    pub why: String,
    pub kept: Option<K>,
}

impl<K> From<String> for LaunchFailure<K> {
    /// A failure before anything of the job was handed over.
    fn from(why: String) -> Self {
        LaunchFailure { why, kept: None }
    }
}

impl<K> From<&str> for LaunchFailure<K> {
    fn from(why: &str) -> Self {
        why.to_string().into()
    }
}

/// What carries the averages: launches jobs in order and joins them all.
pub trait Transport {
    /// What one launch keeps alive while the transport may still read or write it.
    type InFlight;

    /// Starts averaging `pieces` (contiguous f32 on the gradients' device: views of the
    /// gradients or the table's copies) in place, after the compute work queued so far.
    /// `slot` is the job's place in the launch order, the same every step. On an error
    /// the failure carries whatever of the job may still run.
    fn launch(&mut self, slot: usize, pieces: Vec<Tensor>) -> Result<Self::InFlight, LaunchFailure<Self::InFlight>>;

    /// Returns once the compute side is ordered after every job launched (MPI: the thread
    /// has finished them; NCCL: the compute stream waits for the exchange's stream), so
    /// that their buffers may be freed and read. Called exactly once per session, on
    /// every path; the first failure, if any.
    fn join(&mut self) -> Result<CommCost, JobFailure>;

    /// After a join without failure: a job's results into the gradients (bf16 wire
    /// copies' means); nothing where the transport averaged in place.
    fn write_back(&self, in_flight: &Self::InFlight);
}

/// The buckets of one step: launched as their stages complete, joined at the end.
pub struct Session<'a, T: Transport> {
    transport: T,
    grads: &'a Tensor,
    buckets: &'a [Bucket],
    launched_buckets: usize,
    table: Option<TokenTableInFlight<'a>>,
    in_flight: Vec<(Job, T::InFlight)>,
    /// The first launch that failed; nothing is launched after it.
    failed: Option<anyhow::Error>,
    joined: bool,
}

impl<'a, T: Transport> Session<'a, T> {
    /// A step's exchange of `grads` (the flat f32 buffer) by `step`'s plan; with the
    /// plan's token table its whole part starts now.
    pub fn start(transport: T, grads: &'a Tensor, step: &'a StepBuckets<'_>) -> Session<'a, T> {
        let table = step.table().map(|(rows, touched)| TokenTableInFlight::start(rows, touched, grads));
        let mut session = Session {
            transport,
            grads,
            buckets: &step.plan().buckets,
            launched_buckets: 0,
            table,
            in_flight: Vec::new(),
            failed: None,
            joined: false,
        };
        if let Some(whole) = session.table.as_ref().map(|t| t.whole.shallow_clone()) {
            session.launch(Job::TableWhole, vec![whole]);
        }
        session
    }

    /// Stage `stage` (backward order) has its gradients: every bucket complete now starts
    /// (then the table's rows, when theirs is this stage).
    pub fn stage_done(&mut self, stage: usize) {
        let of = self.buckets.len();
        while let Some(bucket) = self.buckets.get(self.launched_buckets).filter(|b| b.ready_after <= stage) {
            let job = Job::Bucket { index: self.launched_buckets, of, values: bucket.elems, ready_after: bucket.ready_after };
            self.launched_buckets += 1;
            let pieces = bucket.runs.iter().map(|&(offset, len)| self.grads.narrow(0, offset, len)).collect();
            self.launch(job, pieces);
        }
        let grads = self.grads;
        if let Some(packed) = self.table.as_mut().and_then(|t| t.pack_if_ready(grads, stage)) {
            self.launch(Job::TokenTableLayout, vec![packed]);
        }
    }

    fn launch(&mut self, job: Job, pieces: Vec<Tensor>) {
        if self.failed.is_some() {
            return;
        }
        match self.transport.launch(self.in_flight.len(), pieces) {
            Ok(kept) => self.in_flight.push((job, kept)),
            Err(LaunchFailure { why, kept }) => {
                // Part of it may be queued: its buffers wait for the join like the others'
                // (never written back: a failed session writes nothing in).
                self.in_flight.extend(kept.map(|kept| (job, kept)));
                self.failed = Some(anyhow!("the overlapped gradient exchange could not start {job}: {why}"));
            }
        }
    }

    /// Launches what is left, joins every job, then writes the averages in: the
    /// gradients are averaged (on a GPU, once it gets there).
    pub fn finish(mut self) -> anyhow::Result<CommCost> {
        self.stage_done(usize::MAX);
        let joined = self.join();
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let cost = joined?;
        for (_, kept) in &self.in_flight {
            self.transport.write_back(kept);
        }
        if let Some(t) = &self.table {
            t.write_back(self.grads);
        }
        Ok(cost)
    }

    fn join(&mut self) -> anyhow::Result<CommCost> {
        self.joined = true;
        self.transport.join().map_err(|failure| {
            let job = failure.slot.and_then(|s| self.in_flight.get(s)).map(|(job, _)| format!(" of {job}"));
            if failure.may_still_run {
                // Freed, these could be handed to the next kernel while the exchange writes.
                self.in_flight.drain(..).for_each(std::mem::forget);
                if let Some(table) = self.table.take() {
                    std::mem::forget(table);
                }
            }
            anyhow!("the overlapped gradient exchange{} failed: {}", job.unwrap_or_default(), failure.why)
        })
    }
}

impl<T: Transport> Drop for Session<'_, T> {
    /// A session left without `finish` (an error or a panic in backward) still joins
    /// before its buffers go.
    fn drop(&mut self) {
        if !self.joined {
            let _ = self.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::flat::Slot;
    use crate::parallel::buckets::BucketPlan;
    use crate::parallel::comm_cost::CommTimes;
    use crate::parallel::token_table::TokenTableLayout;
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;
    use std::time::Duration;
    use tch::{Device, Kind};

    type Log = Arc<Mutex<Vec<String>>>;

    /// A transport whose jobs complete late, on threads of their own, as a GPU stream or
    /// MPI's thread does: each doubles its pieces 30 ms after its launch. It logs
    /// launches, the join and every release of what it was given.
    struct LateTransport {
        log: Log,
        running: Vec<JoinHandle<()>>,
        refuse_launch: Option<usize>,
        /// This slot's launch starts its work, then fails (as an NCCL group whose end fails
        /// after part of it was enqueued).
        fail_after_starting: Option<usize>,
        fail_late: Option<usize>,
        may_still_run: bool,
    }

    struct Kept {
        slot: usize,
        log: Log,
        _pieces: Vec<Tensor>,
    }

    impl Drop for Kept {
        fn drop(&mut self) {
            self.log.lock().unwrap().push(format!("freed {}", self.slot));
        }
    }

    impl LateTransport {
        fn new(log: &Log) -> LateTransport {
            LateTransport {
                log: log.clone(),
                running: Vec::new(),
                refuse_launch: None,
                fail_after_starting: None,
                fail_late: None,
                may_still_run: false,
            }
        }
    }

    impl Transport for LateTransport {
        type InFlight = Kept;

        fn launch(&mut self, slot: usize, pieces: Vec<Tensor>) -> Result<Kept, LaunchFailure<Kept>> {
            if self.refuse_launch == Some(slot) {
                return Err("enqueue refused".into());
            }
            self.log.lock().unwrap().push(format!("launch {slot}"));
            let runs: Vec<(usize, usize)> = pieces.iter().map(|p| (p.data_ptr() as usize, p.numel())).collect();
            self.running.push(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                for (address, len) in runs {
                    // SAFETY: the session keeps the pieces alive until the join, which
                    // waits for this thread; nothing else writes them meanwhile.
                    let values = unsafe { std::slice::from_raw_parts_mut(address as *mut f32, len) };
                    values.iter_mut().for_each(|x| *x *= 2.0);
                }
            }));
            let kept = Kept { slot, log: self.log.clone(), _pieces: pieces };
            if self.fail_after_starting == Some(slot) {
                return Err(LaunchFailure { why: "the group's end failed".into(), kept: Some(kept) });
            }
            Ok(kept)
        }

        fn join(&mut self) -> Result<CommCost, JobFailure> {
            for t in self.running.drain(..) {
                t.join().unwrap();
            }
            self.log.lock().unwrap().push("joined".into());
            match self.fail_late {
                Some(slot) => Err(JobFailure { slot: Some(slot), why: "a peer went away".into(), may_still_run: self.may_still_run }),
                None => Ok(CommCost::Measured(CommTimes::default())),
            }
        }

        fn write_back(&self, _: &Kept) {}
    }

    /// Six slots of 1,000 values over three stages: with buckets of 1,500 values, three
    /// buckets (the first capped, so more); `table` adds a 10 x 100 token table at the
    /// end, complete at the last stage.
    fn plan(table: bool) -> (BucketPlan, usize) {
        let mut slots: Vec<Slot> = (0..6)
            .map(|i| Slot { name: format!("h.{}.w", i % 3), shape: vec![1000], offset: i * 1000, numel: 1000, reserved: 1000, decay: true })
            .collect();
        if table {
            slots.push(Slot { name: "wte".into(), shape: vec![10, 100], offset: 6000, numel: 1000, reserved: 1000, decay: true });
        }
        let mut stages: Vec<Vec<String>> = (0..3).rev().map(|l| vec![format!("h.{l}.")]).collect();
        stages.push(vec!["wte".into()]);
        let plan = BucketPlan::with_table(&slots, &stages, 1500, table.then_some("wte"));
        (plan, 7000)
    }

    fn rows(_: &TokenTableLayout) -> anyhow::Result<Tensor> {
        Ok(Tensor::from_slice(&[1i64, 4, 7]))
    }

    /// Every release of a buffer given to the transport comes after its join.
    fn assert_freed_after_join(log: &Log) {
        let log = log.lock().unwrap().clone();
        let joined = log.iter().position(|l| l == "joined").unwrap_or_else(|| panic!("never joined: {log:?}"));
        let launched = log.iter().filter(|l| l.starts_with("launch")).count();
        let freed: Vec<usize> = log.iter().enumerate().filter(|(_, l)| l.starts_with("freed")).map(|(i, _)| i).collect();
        assert_eq!(freed.len(), launched, "{log:?}");
        assert!(freed.iter().all(|&i| i > joined), "a buffer was released before the join: {log:?}");
    }

    #[test]
    fn late_jobs_are_joined_before_the_averages_are_read_or_their_buffers_freed() {
        let (plan, n) = plan(true);
        let step = plan.for_step(rows).unwrap();
        let log = Log::default();
        let grads = Tensor::arange(n as i64, (Kind::Float, Device::Cpu));
        let want = &grads * 2.0;
        let mut session = Session::start(LateTransport::new(&log), &grads, &step);
        for stage in 0..4 {
            session.stage_done(stage);
        }
        session.finish().unwrap();
        assert!(grads.equal(&want), "every bucket and both table parts doubled, after the late completion");
        assert_freed_after_join(&log);
    }

    #[test]
    fn a_bucket_that_cannot_start_is_named_and_nothing_goes_before_the_join() {
        let (plan, n) = plan(false);
        let step = plan.for_step(rows).unwrap();
        let log = Log::default();
        let grads = Tensor::ones([n as i64], (Kind::Float, Device::Cpu));
        let mut transport = LateTransport::new(&log);
        transport.refuse_launch = Some(1);
        let mut session = Session::start(transport, &grads, &step);
        session.stage_done(0);
        session.stage_done(1);
        let e = session.finish().err().expect("the session fails").to_string();
        assert!(e.contains("could not start bucket 2 of"), "{e}");
        assert!(e.contains("enqueue refused"), "{e}");
        let log_now = log.lock().unwrap().clone();
        assert_eq!(log_now.iter().filter(|l| l.starts_with("launch")).count(), 1, "nothing launched after the failure: {log_now:?}");
        assert_freed_after_join(&log);
    }

    /// A launch that fails after handing part of its work over (NCCL's group end failing
    /// after it enqueued some of the group): its buffers are kept until the join too, and
    /// the error names the bucket. Before the launch could hand them back, they were freed
    /// while the late write was still to come.
    #[test]
    fn a_launch_that_fails_after_starting_keeps_its_buffers_until_the_join() {
        let (plan, n) = plan(false);
        let step = plan.for_step(rows).unwrap();
        let log = Log::default();
        let grads = Tensor::ones([n as i64], (Kind::Float, Device::Cpu));
        let mut transport = LateTransport::new(&log);
        transport.fail_after_starting = Some(1);
        let mut session = Session::start(transport, &grads, &step);
        for stage in 0..3 {
            session.stage_done(stage);
        }
        let e = session.finish().err().expect("the session fails").to_string();
        assert!(e.contains("could not start bucket 2 of"), "{e}");
        assert!(e.contains("the group's end failed"), "{e}");
        let log_now = log.lock().unwrap().clone();
        assert_eq!(log_now.iter().filter(|l| l.starts_with("launch")).count(), 2, "nothing launched after the failure: {log_now:?}");
        assert!(log_now.contains(&"freed 1".to_string()), "the failed launch's buffers were never handed to the session: {log_now:?}");
        assert_freed_after_join(&log);
    }

    #[test]
    fn a_bucket_that_fails_late_is_named() {
        let (plan, n) = plan(true);
        let step = plan.for_step(rows).unwrap();
        let log = Log::default();
        let grads = Tensor::ones([n as i64], (Kind::Float, Device::Cpu));
        let mut transport = LateTransport::new(&log);
        transport.fail_late = Some(2); // the table's whole part is slot 0
        let session = Session::start(transport, &grads, &step);
        let e = session.finish().err().expect("the session fails").to_string();
        assert!(e.contains("failed: a peer went away"), "{e}");
        assert!(e.contains("of bucket 2 of"), "{e}");
        assert_freed_after_join(&log);
    }

    #[test]
    fn a_panic_in_backward_joins_before_any_buffer_goes() {
        let (plan, n) = plan(true);
        let step = plan.for_step(rows).unwrap();
        let log = Log::default();
        let grads = Tensor::ones([n as i64], (Kind::Float, Device::Cpu));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut session = Session::start(LateTransport::new(&log), &grads, &step);
            session.stage_done(0);
            session.stage_done(1);
            panic!("backward failed in stage 2");
        }));
        assert!(outcome.is_err());
        assert_freed_after_join(&log);
    }

    #[test]
    fn buffers_the_transport_may_still_write_are_never_freed() {
        let (plan, n) = plan(true);
        let step = plan.for_step(rows).unwrap();
        let log = Log::default();
        let grads = Tensor::ones([n as i64], (Kind::Float, Device::Cpu));
        let mut transport = LateTransport::new(&log);
        transport.fail_late = Some(0);
        transport.may_still_run = true;
        let e = Session::start(transport, &grads, &step).finish().err().expect("the session fails").to_string();
        assert!(e.contains("of the token table's whole part"), "{e}");
        let log = log.lock().unwrap().clone();
        assert!(!log.iter().any(|l| l.starts_with("freed")), "{log:?}");
    }

    #[test]
    fn a_plan_with_the_table_apart_always_carries_its_rows() {
        let (with_table, _) = plan(true);
        let (without, _) = plan(false);
        let mut asked = 0;
        let step = with_table
            .for_step(|t| {
                asked += 1;
                rows(t)
            })
            .unwrap();
        assert!(step.table().is_some());
        let step = without
            .for_step(|t| {
                asked += 10;
                rows(t)
            })
            .unwrap();
        assert!(step.table().is_none());
        assert_eq!(asked, 1, "the rows are asked for exactly when the plan keeps the table apart");
    }
}
