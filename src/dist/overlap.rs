//! The gradient exchange overlapped with backward, as PyTorch DDP's Reducer does: a
//! bucket (src/dist/buckets.rs) is all-reduced the moment backward has completed its
//! gradients, on a communication thread with a communicator of its own, while the main
//! thread goes on with the earlier stages' backward. The step waits for the last bucket
//! only after its backward. MPI on CPU tensors (the NCCL exchange runs after backward).
//!
//! Each bucket is averaged as the whole-buffer exchange averages it (a sum, then the same
//! multiply by 1/ranks; or the same bf16 rounding, fp32 sums and division), so the
//! result is the same: bit for bit on two ranks (a + b = b + a), and within the
//! reduction order's rounding on more (the ring adds in its own order).
//!
//! The main thread never calls MPI while a bucket is in flight (MPI_THREAD_SERIALIZED):
//! it only computes until `Session::finish` has waited for every bucket. The thread runs
//! each all-reduce as a ring of non-blocking sends and receives (src/dist/ring.rs) polled
//! with short sleeps: Open MPI's blocking calls spin, and a spinning thread takes half
//! the core from the backward it should hide in.

use super::buckets::BucketPlan;
use super::comm_cost::CommTimes;
use super::ring::{self, f32_to_bf16, Bf16};
use super::table_rows::TableParts;
use super::waiting::InCollective;
use super::RawComm;
use crate::config::GradDtype;
use anyhow::{anyhow, Context};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

/// How often the thread moves a bucket's all-reduce on. Between polls it sleeps, leaving
/// the core to the backward (a blocking MPI call would spin on it); the kernel's socket
/// buffers keep the link busy meanwhile (at 10 Gbit/s, 0.2 ms is 250 kB).
const POLL: Duration = Duration::from_micros(200);

/// One bucket: runs of the flat f32 buffer, as raw addresses for the thread.
struct Job {
    runs: Vec<(usize, usize)>,
}

// SAFETY: the addresses point into the gradient buffer or the session's copies of the
// token table's parts, which outlive the session that sent them (it waits for every
// job), and which no other thread touches in those runs until the job is done.
unsafe impl Send for Job {}

pub struct Overlap {
    jobs: Option<Sender<Job>>,
    results: Receiver<Result<Duration, String>>,
    thread: Option<JoinHandle<RawComm>>,
}

impl Overlap {
    /// Starts the communication thread on `comm` (from `World::duplicate`).
    pub fn start(comm: RawComm, wire: GradDtype, bucket_elems: usize) -> anyhow::Result<Overlap> {
        let (jobs, inbox) = channel::<Job>();
        let (outbox, results) = channel();
        let thread = std::thread::Builder::new()
            .name("gradient-exchange".into())
            .spawn(move || {
                for job in inbox {
                    let started = Instant::now();
                    let done = average_runs(&comm, &job.runs, wire, bucket_elems).map(|()| started.elapsed());
                    if outbox.send(done).is_err() {
                        break;
                    }
                }
                comm
            })
            .context("cannot start the gradient exchange thread")?;
        Ok(Overlap { jobs: Some(jobs), results, thread: Some(thread) })
    }

    /// One step's exchange of `grads` (the flat f32 buffer, on the CPU) by `plan`; with
    /// the plan's token table, `touched` holds the rows this micro-step's inputs look up
    /// on any rank (src/dist/table_rows.rs), and the table's early part starts now.
    pub fn session<'a>(&'a self, grads: &'a Tensor, plan: &'a BucketPlan, touched: Option<&'a Tensor>) -> anyhow::Result<Session<'a>> {
        anyhow::ensure!(
            grads.kind() == Kind::Float && grads.is_contiguous() && grads.device() == tch::Device::Cpu,
            "the overlapped exchange needs the contiguous f32 gradients in host memory"
        );
        let table = TableParts::start(plan.table, touched, grads);
        let mut session = Session {
            overlap: self,
            base: grads.data_ptr() as usize,
            plan,
            launched: 0,
            sent: 0,
            received: 0,
            comm: Duration::ZERO,
            table,
            grads,
        };
        if let Some(early) = session.table.as_ref().map(|t| t.early.shallow_clone()) {
            session.send(vec![(early.data_ptr() as usize, early.numel())]);
        }
        Ok(session)
    }
}

impl Drop for Overlap {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(comm) = self.thread.take().and_then(|t| t.join().ok()) {
            comm.free();
        }
    }
}

/// The buckets of one step: launched as their stages complete, waited for at the end.
pub struct Session<'a> {
    overlap: &'a Overlap,
    base: usize,
    plan: &'a BucketPlan,
    /// Buckets of the plan launched.
    launched: usize,
    /// Jobs sent to the thread (buckets and the table's parts), and results received.
    sent: usize,
    received: usize,
    comm: Duration,
    /// The token table's two parts, when the plan keeps it apart.
    table: Option<TableParts<'a>>,
    /// The buffer the addresses point into, borrowed for the session's life.
    grads: &'a Tensor,
}

impl Session<'_> {
    fn send(&mut self, runs: Vec<(usize, usize)>) {
        if let Some(jobs) = &self.overlap.jobs {
            // A send fails only when the thread has ended; `finish` reports why.
            let _ = jobs.send(Job { runs });
        }
        self.sent += 1;
    }

    /// Stage `stage` (backward order) has its gradients: every bucket complete now starts
    /// (then the table's rows, when theirs is this stage).
    pub fn stage_done(&mut self, stage: usize) {
        while let Some(bucket) = self.plan.buckets.get(self.launched).filter(|b| b.ready_after <= stage) {
            let runs = bucket.runs.iter().map(|&(offset, len)| (self.base + offset as usize * 4, len as usize)).collect();
            self.send(runs);
            self.launched += 1;
        }
        let grads = self.grads;
        if let Some(packed) = self.table.as_mut().and_then(|t| t.pack_if_ready(grads, stage)) {
            self.send(vec![(packed.data_ptr() as usize, packed.numel())]);
        }
    }

    /// Launches what is left, then waits for every bucket: the gradients are averaged.
    pub fn finish(mut self) -> anyhow::Result<CommTimes> {
        self.stage_done(usize::MAX);
        let backward_ended = Instant::now();
        let outcome = {
            let _waiting = InCollective::enter();
            self.wait_for_every_job()
        };
        outcome?;
        if let Some(t) = &self.table {
            t.write_back(self.grads);
        }
        Ok(CommTimes { comm_ms: self.comm.as_secs_f64() * 1e3, exposed_ms: backward_ended.elapsed().as_secs_f64() * 1e3 })
    }

    /// Waits for every job sent (all of them, also after a failure: a job may write into
    /// the session's copies until it is done), then says how the first that failed did.
    fn wait_for_every_job(&mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        while self.received < self.sent {
            let Ok(result) = self.overlap.results.recv() else {
                self.received = self.sent; // the thread is gone: nothing runs any more
                return Err(anyhow!("the gradient exchange thread ended"));
            };
            self.received += 1;
            match result {
                Ok(took) => self.comm += took,
                Err(e) => {
                    first_error.get_or_insert_with(|| anyhow!("the overlapped gradient exchange failed: {e}"));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Session<'_> {
    /// A session left without `finish` (an error or a panic in backward) still waits for
    /// its jobs, which may write into its copies.
    fn drop(&mut self) {
        let _ = self.wait_for_every_job();
    }
}

/// Replaces each run (an address and a length of f32 values) by its mean over the ranks,
/// in MPI calls of at most `bucket_elems` values.
fn average_runs(comm: &RawComm, runs: &[(usize, usize)], wire: GradDtype, bucket_elems: usize) -> Result<(), String> {
    let ranks = comm.size;
    for &(address, len) in runs {
        // SAFETY: `address` is a run of `len` f32 values of the gradient buffer, which the
        // session keeps alive and nothing else touches until this job is done.
        let values = unsafe { std::slice::from_raw_parts_mut(address as *mut f32, len) };
        for chunk in values.chunks_mut(bucket_elems.clamp(1, i32::MAX as usize)) {
            let rc = match wire {
                GradDtype::Fp32 => ring::all_reduce_sum(comm, chunk, POLL).map(|()| {
                    // As the whole-buffer exchange: the sum times (f32)(1 / ranks).
                    let scale = (1.0 / ranks as f64) as f32;
                    chunk.iter_mut().for_each(|x| *x *= scale);
                }),
                GradDtype::Bf16 => {
                    let mut wire: Vec<Bf16> = chunk.iter().map(|&x| Bf16(f32_to_bf16(x))).collect();
                    ring::all_reduce_sum(comm, &mut wire, POLL).map(|()| {
                        // As write_mean: f32(sum) / ranks.
                        for (x, w) in chunk.iter_mut().zip(&wire) {
                            *x = f32::from_bits(u32::from(w.0) << 16) / ranks as f32;
                        }
                    })
                }
            };
            if let Err(why) = rc {
                return Err(format!("the ring all-reduce of {} values: {why}", chunk.len()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_libtorch() {
        let values: Vec<f32> = vec![0.0, -0.0, 1.0, 1.00390625, 1.0039063, 3.1415927, -2.7182817, 1e-40, 3.4e38, f32::INFINITY, -1e-3];
        let ours: Vec<u16> = values.iter().map(|&x| f32_to_bf16(x)).collect();
        let theirs = Tensor::from_slice(&values).to_kind(Kind::BFloat16).view_dtype(Kind::Int16);
        let theirs: Vec<i16> = Vec::try_from(&theirs).unwrap();
        assert_eq!(ours, theirs.iter().map(|&v| v as u16).collect::<Vec<_>>());
        assert!(f32::from_bits(u32::from(f32_to_bf16(f32::NAN)) << 16).is_nan());
    }
}
