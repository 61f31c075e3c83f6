//! A rank that dies makes mpirun end the job, but a rank that hangs (a stuck collective,
//! a wedged device, a peer that stopped without dying) would leave every other rank
//! waiting forever. The watchdog thread ends this process when no step has completed for
//! `dist.timeout_s` seconds; mpirun then ends the rest of the job. Its message names the
//! rank that stopped (src/parallel/blame.rs), from the heartbeats the ranks' watchdogs
//! exchange (src/parallel/heartbeat.rs); a firing watchdog tells the others, which then end
//! at once with their own view of it.
//!
//! It is armed as soon as MPI's init returns, before the first collective: every phase of
//! start-up (the node split, the device, the heartbeat exchange, the ranks' agreement, the
//! cache check, communicator dup, NCCL init, the weight broadcast; see
//! src/parallel/phase.rs) is timed the same way and named when the watchdog fires in one.
//! Until the heartbeat addresses are exchanged it hears nobody and can name only its own
//! rank: a rank waiting in a collective then gives the others a moment to name themselves
//! before it ends the job. Entering a phase, a completed step and an evaluation batch are
//! progress; preparing the token cache, a checkpoint's save and the finish after the last
//! collective are not timed.
//!
//! NCCL reports a failure (a peer that died, a broken link) asynchronously, while this
//! rank may be waiting on the GPU for the collective that will never finish. While a
//! collective is in flight on an NCCL communicator, the watchdog polls the communicator's
//! error (`ncclCommGetAsyncError`, through [`Health`]) every tick: on an error it says so,
//! naming the rank and the phase, tells the others, aborts the communicator and ends the
//! rank as when it fires.
//!
//! Time this process spent stopped (SIGSTOP and SIGCONT, a suspended Slurm job, a
//! paused VM) is not a hang of this rank: the watchdog sees its own wait overrun and does
//! not count it. An overrun spent waiting for a core (a loaded machine) is not a stop:
//! the kernel counts that wait in the thread's schedstat, a stopped thread's not.

use super::blame::{self, Heard, View};
use super::heartbeat::{Heartbeat, Status};
use super::phase::{self, Phase};
use super::World;
use anyhow::Context;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

/// How often the watchdog looks at the clock.
const TICK: Duration = Duration::from_millis(200);
/// How often it tells the other ranks how this one is doing.
const SEND_EVERY: Duration = Duration::from_millis(500);
/// A tick overrun by this much means the whole process was stopped, not slow.
const FROZEN: Duration = Duration::from_secs(2);
/// A firing watchdog waits this long before ending the rank, so that the others, told,
/// write their view of it before mpirun ends them.
const LINGER: Duration = Duration::from_millis(300);
/// How long a firing watchdog that hears nobody yet (start-up, before the heartbeat
/// exchange) waits before ending its rank when that rank waits inside a collective: the
/// rank that stopped outside one, its clock running alongside, fires meanwhile and names
/// itself, where mpirun would otherwise end it first, unnamed.
const UNHEARD_LINGER: Duration = Duration::from_secs(2);
/// How long the watchdog waits for a failed communicator's abort before it ends the rank
/// anyway (ncclCommAbort itself has hung in some NCCL versions).
const ABORT_WAIT: Duration = Duration::from_secs(5);

/// Something that can fail while this rank waits elsewhere: an NCCL communicator with
/// collectives in flight (src/parallel/nccl.rs). The watchdog asks it every tick.
pub(crate) trait Health: Send + Sync {
    /// Why it failed, naming the rank; None while healthy, idle or busy. Never blocks.
    fn failure(&self) -> Option<String>;
    /// Tears it down after a failure. May block.
    fn abort(&self);
}

/// The sources the watchdog asks: process-wide, as the phase is, so that a communicator
/// registers itself without a handle to the watchdog. Held weakly: the watchdog never
/// keeps one alive, and its owner removes it when it goes.
pub(crate) static HEALTH: Registry = Registry::new();

pub(crate) struct Registry {
    sources: Mutex<Vec<(u64, Weak<dyn Health>)>>,
    next_id: AtomicU64,
}

/// A source's place in a [`Registry`]; dropping it removes the source.
pub(crate) struct Registration<'r> {
    registry: &'r Registry,
    id: u64,
}

impl Registry {
    pub(crate) const fn new() -> Registry {
        Registry { sources: Mutex::new(Vec::new()), next_id: AtomicU64::new(0) }
    }

    pub(crate) fn register(&self, source: Weak<dyn Health>) -> Registration<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.sources.lock().unwrap_or_else(PoisonError::into_inner).push((id, source));
        Registration { registry: self, id }
    }

    /// The first source that failed, and why. The list's lock is not held while the
    /// sources are asked.
    pub(crate) fn first_failure(&self) -> Option<(Arc<dyn Health>, String)> {
        let live: Vec<Arc<dyn Health>> =
            self.sources.lock().unwrap_or_else(PoisonError::into_inner).iter().filter_map(|(_, s)| s.upgrade()).collect();
        live.into_iter().find_map(|s| s.failure().map(|why| (s, why)))
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry.sources.lock().unwrap_or_else(PoisonError::into_inner).retain(|(id, _)| *id != self.id);
    }
}

/// The line the watchdog writes when a communicator failed.
fn failure_message(rank: usize, phase: Phase, why: &str) -> String {
    format!(
        "error on rank {rank}: NCCL reported an error in {}: {why}; aborting the communicator and ending this rank so the job stops",
        phase.describe()
    )
}

/// Calls `source.abort()` on a thread of its own and waits at most `limit` for it: true
/// when it returned in time.
fn abort_within(source: Arc<dyn Health>, limit: Duration) -> bool {
    let (done, finished) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name("nccl-abort".into()).spawn(move || {
        source.abort();
        let _ = done.send(());
    });
    spawned.is_ok() && finished.recv_timeout(limit).is_ok()
}

pub struct Watchdog {
    progress: Arc<Progress>,
    /// Hands the heartbeat to the watchdog's thread once the addresses are exchanged.
    connect: std::sync::mpsc::Sender<Heartbeat>,
}

/// What the main thread tells the watchdog thread.
struct Progress {
    started: Instant,
    /// Milliseconds after `started` of the last progress.
    beat_ms: AtomicU64,
    last_step: AtomicU64,
}

impl Watchdog {
    /// Starts watching rank `rank` of `size` from now on (no step completed yet: `beat`
    /// gives the resumed step once it is known), hearing nobody until [`Watchdog::connect`].
    /// Not a collective: armed as MPI's init returns, before any collective can hang.
    pub fn arm(rank: usize, size: usize, timeout: Duration) -> anyhow::Result<Watchdog> {
        let progress = Arc::new(Progress { started: Instant::now(), beat_ms: AtomicU64::new(0), last_step: AtomicU64::new(0) });
        let (connect, connected) = std::sync::mpsc::channel();
        let watch = Watch { rank, size, allowed: timeout, heartbeat: Heartbeat::unconnected(), connected, progress: Arc::clone(&progress) };
        std::thread::Builder::new().name("watchdog".into()).spawn(move || watch.run()).context("cannot start the watchdog thread")?;
        Ok(Watchdog { progress, connect })
    }

    /// Exchanges the heartbeat addresses (under the watchdog's deadline, as the phase
    /// `HeartbeatExchange`), so that from now on a firing watchdog names the rank that
    /// stopped and tells the others. A collective: every rank calls it at the same point.
    pub fn connect(&self, world: &World) {
        Phase::HeartbeatExchange.begin(world.rank());
        // The thread only ends with the process.
        let _ = self.connect.send(Heartbeat::open(world));
    }

    /// Progress was made (`step` is the last completed step): restart the clock.
    pub fn beat(&self, step: u64) {
        self.progress.last_step.store(step, Ordering::Relaxed);
        self.progress.beat_ms.store(self.progress.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Tells a stop from a loaded machine, tick after tick: the part of a tick's overrun
/// that the watchdog's thread did not spend waiting for a core.
///
/// The clock and the run-queue wait are two reads, not one: a wait between them lands in
/// one tick's run-queue figure and the next tick's overrun. The wait left over from the
/// last tick therefore still explains this tick's overrun (capped at that tick's wait,
/// so a long loaded spell never hides a later stop).
#[derive(Default)]
struct StopMeter {
    unspent_wait: Duration,
}

impl StopMeter {
    /// How long the process was stopped during a tick that took `took`, of which the
    /// thread spent `waited_for_a_core` runnable but not running: none unless the rest
    /// overran the tick by more than [`FROZEN`].
    fn stopped_during(&mut self, took: Duration, waited_for_a_core: Duration) -> Option<Duration> {
        let overrun = took.saturating_sub(TICK);
        let explained_by = waited_for_a_core + self.unspent_wait;
        self.unspent_wait = explained_by.saturating_sub(overrun).min(waited_for_a_core);
        let unexplained = overrun.saturating_sub(explained_by);
        (unexplained > FROZEN).then_some(unexplained)
    }
}

/// The time this thread spent waiting on a run queue (`/proc/thread-self/schedstat`'s
/// second field), read tick after tick. A stopped thread is on no run queue, so a stop
/// does not add to it; a loaded machine does.
struct RunQueueWait {
    file: std::path::PathBuf,
    last_ns: u64,
}

impl RunQueueWait {
    /// None where the kernel keeps no schedstat: every overrun is then taken as a stop.
    fn of_this_thread() -> Option<RunQueueWait> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) };
        let file = std::path::PathBuf::from(format!("/proc/self/task/{tid}/schedstat"));
        let last_ns = read_run_queue_ns(&file)?;
        Some(RunQueueWait { file, last_ns })
    }

    fn since_last(&mut self) -> Duration {
        let Some(now) = read_run_queue_ns(&self.file) else { return Duration::ZERO };
        let waited = now.saturating_sub(self.last_ns);
        self.last_ns = now;
        Duration::from_nanos(waited)
    }
}

fn read_run_queue_ns(file: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(file).ok()?.split_ascii_whitespace().nth(1)?.parse().ok()
}

struct Watch {
    rank: usize,
    size: usize,
    allowed: Duration,
    /// Unconnected until the addresses are exchanged (`connected` brings it).
    heartbeat: Heartbeat,
    connected: std::sync::mpsc::Receiver<Heartbeat>,
    progress: Arc<Progress>,
}

impl Watch {
    fn run(mut self) -> ! {
        let mut peers: Vec<Option<(Status, Instant)>> = vec![None; self.size];
        let mut connected = false;
        let (mut seen_beat, mut frozen, mut next_send) = (0, Duration::ZERO, Instant::now() + SEND_EVERY);
        let mut seen_marks = phase::marks();
        let mut queued = RunQueueWait::of_this_thread();
        let mut stop_meter = StopMeter::default();
        // The last freeze (when it ended, how long), for the message: a step may complete
        // right after it, before a peer's notice arrives.
        let mut last_freeze: Option<(Instant, Duration)> = None;
        let mut tick = Instant::now();
        loop {
            if let Ok(heartbeat) = self.connected.try_recv() {
                (self.heartbeat, connected) = (heartbeat, true);
                // Told at once, the others know this rank from its first moment.
                self.heartbeat.send(&Status::now(self.rank, self.progress.last_step.load(Ordering::Relaxed), 0, false));
            }
            let heard = self.heartbeat.receive(tick + TICK);
            // From the end of the last tick: a stop anywhere in the loop is seen.
            let now = Instant::now();
            // Read next to the clock: see [`StopMeter`].
            let waited_for_a_core = queued.as_mut().map_or(Duration::ZERO, RunQueueWait::since_last);
            let took = now.duration_since(tick);
            tick = now;
            let mut fired_on = None;
            for s in heard.into_iter().filter(|s| s.rank < self.size && s.rank != self.rank) {
                if s.ending {
                    fired_on.get_or_insert(s.rank);
                }
                let rank = s.rank;
                peers[rank] = Some((s, now));
            }
            let marks = phase::marks();
            let current = Phase::current();
            if marks != seen_marks || !current.timed() {
                seen_marks = marks;
                self.progress.beat_ms.store(self.progress.started.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
            let beat_ms = self.progress.beat_ms.load(Ordering::Relaxed);
            if beat_ms != seen_beat {
                (seen_beat, frozen) = (beat_ms, Duration::ZERO);
            }
            if let Some(stopped) = stop_meter.stopped_during(took, waited_for_a_core) {
                frozen += stopped;
                last_freeze = Some((now, stopped));
                tracing::warn!(
                    "rank {}: this rank was frozen for {:.1} s (SIGSTOP, a suspended job or a paused machine); the watchdog does not count that time",
                    self.rank,
                    stopped.as_secs_f64()
                );
            }
            let since_progress = Duration::from_millis((self.progress.started.elapsed().as_millis() as u64).saturating_sub(beat_ms));
            let stalled = since_progress.saturating_sub(frozen);
            let last_step = self.progress.last_step.load(Ordering::Relaxed);
            if let Some((source, why)) = HEALTH.first_failure() {
                crate::report::log::stderr_line(&failure_message(self.rank, current, &why));
                let me = Status::now(self.rank, last_step, stalled.as_millis() as u64, true);
                for _ in 0..2 {
                    self.heartbeat.send(&me);
                    std::thread::sleep(LINGER / 2);
                }
                if !abort_within(source, ABORT_WAIT) {
                    crate::report::log::stderr_line(&format!(
                        "rank {}: the communicator's abort did not return within {} s; ending the rank without it",
                        self.rank,
                        ABORT_WAIT.as_secs()
                    ));
                }
                // As below: no destructors, which could wait for the failed communicator.
                unsafe { libc::_exit(3) };
            }
            let fired = stalled > self.allowed;
            if !fired && fired_on.is_none() {
                if now >= next_send {
                    self.heartbeat.send(&Status::now(self.rank, last_step, stalled.as_millis() as u64, false));
                    next_send = now + SEND_EVERY;
                }
                continue;
            }
            let me = Status::now(self.rank, last_step, stalled.as_millis() as u64, true);
            let peers = peers.iter().map(|p| p.as_ref().map(|(s, at)| Heard { status: s.clone(), ago: now.duration_since(*at) })).collect();
            let frozen = last_freeze.filter(|(at, _)| now.duration_since(*at) < self.allowed).map_or(Duration::ZERO, |(_, d)| d);
            let view = View { me: me.clone(), frozen, peers, allowed: self.allowed, fired_on: fired_on.filter(|_| !fired), phase: current };
            crate::report::log::stderr_line(&blame::message(&view));
            if fired {
                // Twice, in case a datagram is lost.
                for _ in 0..2 {
                    self.heartbeat.send(&me);
                    std::thread::sleep(LINGER / 2);
                }
                if !connected && me.waiting && self.size > 1 {
                    std::thread::sleep(UNHEARD_LINGER);
                }
            }
            // _exit: no destructors, which could block on the same stuck collective.
            unsafe { libc::_exit(3) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A communicator's stand-in: fails when told to, counts its aborts, and may hang in one.
    #[derive(Default)]
    struct FakeSource {
        failure: Mutex<Option<String>>,
        aborts: AtomicUsize,
        abort_hangs: bool,
    }

    impl Health for FakeSource {
        fn failure(&self) -> Option<String> {
            self.failure.lock().unwrap().clone()
        }
        fn abort(&self) {
            self.aborts.fetch_add(1, Ordering::SeqCst);
            if self.abort_hangs {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }

    fn weak(s: &Arc<FakeSource>) -> Weak<dyn Health> {
        let s: Arc<dyn Health> = s.clone();
        Arc::downgrade(&s)
    }

    #[test]
    fn the_registry_reports_a_failed_source_and_forgets_a_removed_or_dropped_one() {
        let registry = Registry::new();
        let (healthy, failed) = (Arc::new(FakeSource::default()), Arc::new(FakeSource::default()));
        let _a = registry.register(weak(&healthy));
        let b = registry.register(weak(&failed));
        assert!(registry.first_failure().is_none());
        *failed.failure.lock().unwrap() = Some("NCCL rank 1 of 2 on GPU 1: ncclRemoteError".into());
        let (source, why) = registry.first_failure().expect("the failure is seen");
        assert_eq!(why, "NCCL rank 1 of 2 on GPU 1: ncclRemoteError");
        source.abort();
        assert_eq!(failed.aborts.load(Ordering::SeqCst), 1);
        drop(source);
        // The owner removed it (its communicator was dropped): no longer asked.
        drop(b);
        assert!(registry.first_failure().is_none());
        // Gone without being removed: the weak handle is skipped, never used.
        let gone = Arc::new(FakeSource::default());
        *gone.failure.lock().unwrap() = Some("x".into());
        let _c = registry.register(weak(&gone));
        assert!(registry.first_failure().is_some());
        drop(gone);
        assert!(registry.first_failure().is_none());
        assert_eq!(registry.sources.lock().unwrap().len(), 2);
    }

    #[test]
    fn the_abort_is_waited_for_but_a_hung_one_only_until_the_limit() {
        let quick = Arc::new(FakeSource::default());
        assert!(abort_within(quick.clone(), Duration::from_secs(60)));
        assert_eq!(quick.aborts.load(Ordering::SeqCst), 1);

        let hung = Arc::new(FakeSource { abort_hangs: true, ..FakeSource::default() });
        let started = Instant::now();
        assert!(!abort_within(hung.clone(), Duration::from_millis(100)));
        assert!(started.elapsed() < Duration::from_secs(30));
        assert_eq!(hung.aborts.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_failure_message_names_the_rank_and_the_phase() {
        let m = failure_message(1, Phase::WeightBroadcast, "NCCL rank 1 of 2 on GPU 1: ncclRemoteError (peer gone)");
        assert_eq!(
            m,
            "error on rank 1: NCCL reported an error in start-up: weight broadcast: NCCL rank 1 of 2 on GPU 1: \
             ncclRemoteError (peer gone); aborting the communicator and ending this rank so the job stops"
        );
    }

    #[test]
    fn an_overrun_spent_waiting_for_a_core_is_not_a_stop() {
        let ms = Duration::from_millis;
        let stopped = |took, waited| StopMeter::default().stopped_during(took, waited);
        // A loaded machine: 2.8 s for a 0.2 s tick, 2.5 s of it waiting for a core.
        assert_eq!(stopped(ms(2800), ms(2500)), None);
        // SIGSTOP for 6 s: the thread was on no run queue.
        assert_eq!(stopped(ms(6203), ms(3)), Some(ms(6000)));
        // Both: only the part not spent waiting counts.
        assert_eq!(stopped(ms(9200), ms(3000)), Some(ms(6000)));
        assert_eq!(stopped(ms(200), Duration::ZERO), None);
    }

    #[test]
    fn a_wait_read_one_tick_early_still_explains_the_next_ticks_overrun() {
        let ms = Duration::from_millis;
        let mut meter = StopMeter::default();
        // Throttled for 3 s between the clock's read and the run queue's: this tick's
        // figure holds the wait, the next tick's clock the overrun (seen in CI).
        assert_eq!(meter.stopped_during(ms(210), ms(3000)), None);
        assert_eq!(meter.stopped_during(ms(3200), ms(0)), None);
        // Again and again: the wait keeps landing a tick early.
        let mut meter = StopMeter::default();
        assert_eq!(meter.stopped_during(ms(200), ms(3000)), None);
        for _ in 0..5 {
            assert_eq!(meter.stopped_during(ms(3200), ms(3000)), None);
        }
        assert_eq!(meter.stopped_during(ms(3200), ms(0)), None);
        // A long loaded spell whose waits the clock never shows hides no later stop
        // beyond its last tick's wait.
        let mut meter = StopMeter::default();
        for _ in 0..50 {
            assert_eq!(meter.stopped_during(ms(200), ms(150)), None);
        }
        assert_eq!(meter.stopped_during(ms(6200), ms(0)), Some(ms(5850)));
    }

    #[test]
    fn this_threads_run_queue_wait_can_be_read_and_only_grows() {
        let Some(mut wait) = RunQueueWait::of_this_thread() else {
            eprintln!("skipped: this kernel keeps no schedstat (the watchdog then takes every overrun as a stop)");
            return;
        };
        let first = wait.last_ns;
        let _ = wait.since_last();
        assert!(wait.last_ns >= first);
    }
}
