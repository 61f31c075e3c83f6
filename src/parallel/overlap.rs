//! MPI's transport for the overlapped exchange (src/parallel/overlap_session.rs), as PyTorch
//! DDP's Reducer does on CPUs: a bucket is all-reduced the moment backward has completed
//! its gradients, on a communication thread with a communicator of its own, while the
//! main thread goes on with the earlier stages' backward. MPI on CPU tensors.
//!
//! Each bucket is averaged as the whole-buffer exchange averages it (a sum, then the same
//! multiply by 1/ranks; or the same bf16 rounding, fp32 sums and division), so the
//! result is the same: bit for bit on two ranks (a + b = b + a), and within the
//! reduction order's rounding on more (the ring adds in its own order).
//!
//! The main thread never calls MPI while a bucket is in flight (MPI_THREAD_SERIALIZED):
//! it only computes until the session's join has waited for every bucket. The thread
//! runs each all-reduce as a ring of non-blocking sends and receives (src/parallel/ring.rs)
//! polled with short sleeps: Open MPI's blocking calls spin, and a spinning thread takes
//! half the core from the backward it should hide in.

use super::comm_cost::{CommCost, CommTimes};
use super::overlap_session::{JobFailure, LaunchFailure, Transport};
use super::ring::{self, f32_to_bf16, Bf16};
use super::waiting::InCollective;
use super::RawComm;
use crate::config::GradDtype;
use anyhow::Context;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// How often the thread moves a bucket's all-reduce on. Between polls it sleeps, leaving
/// the core to the backward (a blocking MPI call would spin on it); the kernel's socket
/// buffers keep the link busy meanwhile (at 10 Gbit/s, 0.2 ms is 250 kB).
const POLL: Duration = Duration::from_micros(200);

/// One launch: runs of f32 values in host memory, as raw addresses for the thread.
struct Job {
    slot: usize,
    runs: Vec<(usize, usize)>,
}

// SAFETY: the addresses point into the pieces the session keeps alive until the join,
// which waits for every job, and which no other thread touches until the job is done.
unsafe impl Send for Job {}

/// A job's slot and how it went: its time, or why it failed.
type Outcome = (usize, Result<Duration, String>);

pub struct Overlap {
    jobs: Option<Sender<Job>>,
    results: Receiver<Outcome>,
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
                    if outbox.send((job.slot, done)).is_err() {
                        break;
                    }
                }
                comm
            })
            .context("cannot start the gradient exchange thread")?;
        Ok(Overlap { jobs: Some(jobs), results, thread: Some(thread) })
    }

    /// One step's transport through the thread.
    pub fn transport(&self) -> MpiTransport<'_> {
        MpiTransport { overlap: self, sent: 0, received: 0, comm: Duration::ZERO }
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

/// One step's jobs on the communication thread. The main thread never calls MPI while
/// one is in flight (MPI_THREAD_SERIALIZED): the join waits for all of them.
pub struct MpiTransport<'a> {
    overlap: &'a Overlap,
    sent: usize,
    received: usize,
    /// The jobs' own time, summed.
    comm: Duration,
}

impl Transport for MpiTransport<'_> {
    type InFlight = Vec<Tensor>;

    fn launch(&mut self, slot: usize, pieces: Vec<Tensor>) -> Result<Vec<Tensor>, LaunchFailure<Vec<Tensor>>> {
        let host_f32 = |p: &Tensor| p.kind() == Kind::Float && p.is_contiguous() && p.device() == Device::Cpu;
        if !pieces.iter().all(host_f32) {
            return Err("the overlapped MPI exchange needs contiguous f32 gradients in host memory".into());
        }
        let jobs = self.overlap.jobs.as_ref().ok_or("the gradient exchange thread has stopped")?;
        let runs = pieces.iter().map(|p| (p.data_ptr() as usize, p.numel())).collect();
        jobs.send(Job { slot, runs }).map_err(|_| "the gradient exchange thread has ended".to_string())?;
        self.sent += 1;
        Ok(pieces)
    }

    /// Waits for every job sent (all of them, also after a failure: a job may write into
    /// its pieces until it is done), then says how the first that failed did.
    fn join(&mut self) -> Result<CommCost, JobFailure> {
        let backward_ended = Instant::now();
        let _waiting = InCollective::enter();
        let mut first_failure = None;
        while self.received < self.sent {
            let Ok((slot, outcome)) = self.overlap.results.recv() else {
                // The thread is gone, and with it every job: nothing runs any more.
                self.received = self.sent;
                return Err(JobFailure { slot: None, why: "the gradient exchange thread ended".into(), may_still_run: false });
            };
            self.received += 1;
            match outcome {
                Ok(took) => self.comm += took,
                Err(why) => {
                    first_failure.get_or_insert(JobFailure { slot: Some(slot), why, may_still_run: false });
                }
            }
        }
        let exposed = backward_ended.elapsed();
        first_failure.map_or(Ok(CommCost::Measured(CommTimes { comm_ms: ms(self.comm), exposed_ms: ms(exposed) })), Err)
    }

    fn write_back(&self, _: &Vec<Tensor>) {}
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Replaces each run (an address and a length of f32 values) by its mean over the ranks,
/// in MPI calls of at most `bucket_elems` values.
fn average_runs(comm: &RawComm, runs: &[(usize, usize)], wire: GradDtype, bucket_elems: usize) -> Result<(), String> {
    let ranks = comm.size;
    for &(address, len) in runs {
        // SAFETY: `address` is a run of `len` f32 values of a piece the session keeps
        // alive, and nothing else touches, until this job is done.
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
