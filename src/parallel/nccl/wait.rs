//! Waiting on a non-blocking NCCL communicator. Made with `blocking = 0` in its config
//! (`ncclCommInitRankConfig`), NCCL answers a call with `ncclInProgress` while its own
//! threads carry on, and `ncclCommGetAsyncError` says when they are done: for the init, for
//! `ncclGroupEnd` and for a collective outside a group. So a rank is never stuck inside
//! NCCL: it polls, gives up at a deadline (`dist.timeout_s`), aborts the communicator and
//! says why, naming the phase (src/parallel/phase.rs).
//!
//! The loop is generic over the poll, the abort and the clock, so that each outcome is
//! tested without a GPU; src/parallel/nccl.rs feeds it NCCL.

use crate::parallel::phase::Phase;
use std::fmt;
use std::time::{Duration, Instant};

/// The first pause between two polls, doubled after each up to [`MAX_PAUSE`]: a call done
/// in microseconds costs no sleep, an init of seconds keeps no core busy.
const FIRST_PAUSE: Duration = Duration::from_micros(20);
const MAX_PAUSE: Duration = Duration::from_millis(10);

/// What one look at the communicator found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Poll {
    InProgress,
    Done,
    /// NCCL's error, as text.
    Failed(String),
}

/// Time as the wait sees it: the system's, or a test's.
pub(crate) trait Clock {
    fn now(&self) -> Instant;
    fn pause(&mut self, d: Duration);
}

pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn pause(&mut self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// What did not finish, for the message.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Step<'a> {
    /// The communicator's init: every rank must join it.
    Join,
    /// An NCCL call on a formed communicator (a collective, `ncclGroupEnd`).
    Call(&'a str),
}

/// One wait: what it is for and how long it may take.
pub(crate) struct Waiting<'a> {
    /// Where the rank is, named in the message.
    pub phase: Phase,
    /// The rank, e.g. "rank 1 of 2 (GPU 1)".
    pub who: &'a str,
    pub step: Step<'a>,
    /// `dist.timeout_s`.
    pub allowed: Duration,
}

/// Why a wait failed; the communicator was aborted in both cases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WaitError {
    TimedOut(String),
    Failed(String),
}

impl fmt::Display for WaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitError::TimedOut(m) | WaitError::Failed(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for WaitError {}

/// Polls until `poll` is no longer in progress, pausing between polls, for at most
/// `waiting.allowed`. Done: Ok. An error, or the deadline: `abort` is called (once) and the
/// error names the phase, the rank and what did not finish.
pub(crate) fn wait_until_done(
    waiting: &Waiting,
    clock: &mut impl Clock,
    mut poll: impl FnMut() -> Poll,
    abort: impl FnOnce(),
) -> Result<(), WaitError> {
    let deadline = clock.now() + waiting.allowed;
    let mut pause = FIRST_PAUSE;
    loop {
        match poll() {
            Poll::Done => return Ok(()),
            Poll::Failed(why) => {
                abort();
                return Err(WaitError::Failed(failed_message(waiting, &why)));
            }
            Poll::InProgress => {}
        }
        let now = clock.now();
        if now >= deadline {
            abort();
            return Err(WaitError::TimedOut(timed_out_message(waiting)));
        }
        clock.pause(pause.min(deadline - now));
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

const ABORTED: &str = "The communicator was aborted (ncclCommAbort)";

fn timed_out_message(w: &Waiting) -> String {
    let (phase, who, secs) = (w.phase.describe(), w.who, seconds(w.allowed));
    match w.step {
        Step::Join => format!(
            "{phase}: {who} did not join the NCCL communicator within {secs} (dist.timeout_s): a rank never called \
             ncclCommInitRankConfig with this id (it stopped, hangs or failed before it), or the ranks cannot reach \
             each other (NCCL_SOCKET_IFNAME picks the network interface; NCCL_DEBUG=INFO shows more). {ABORTED}"
        ),
        Step::Call(what) => format!(
            "{phase}: {what} on {who} was still in progress after {secs} (dist.timeout_s): a rank did not make the \
             same call (it stopped, hangs or took another path), or the network stalled (NCCL_DEBUG=INFO shows \
             more). {ABORTED}"
        ),
    }
}

fn failed_message(w: &Waiting, why: &str) -> String {
    let (phase, who) = (w.phase.describe(), w.who);
    match w.step {
        Step::Join => format!("{phase}: {who} could not join the NCCL communicator: {why}. {ABORTED}"),
        Step::Call(what) => format!("{phase}: {what} on {who} failed: {why}. {ABORTED}"),
    }
}

/// "600 s", "0.25 s".
fn seconds(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Time that moves only when the wait pauses, so that a ten-minute deadline is reached
    /// at once.
    struct FakeClock {
        start: Instant,
        elapsed: Duration,
        pauses: usize,
    }

    impl FakeClock {
        fn new() -> FakeClock {
            FakeClock { start: Instant::now(), elapsed: Duration::ZERO, pauses: 0 }
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            self.start + self.elapsed
        }
        fn pause(&mut self, d: Duration) {
            assert!(d > Duration::ZERO && d <= MAX_PAUSE, "pause of {d:?}");
            self.elapsed += d;
            self.pauses += 1;
        }
    }

    fn init_wait(allowed: Duration) -> Waiting<'static> {
        Waiting { phase: Phase::NcclInit, who: "rank 1 of 2 (GPU 1)", step: Step::Join, allowed }
    }

    #[test]
    fn an_init_in_progress_for_ever_times_out_at_the_deadline_naming_the_phase_and_aborts_once() {
        let mut clock = FakeClock::new();
        let (polls, aborts) = (Cell::new(0), Cell::new(0));
        let allowed = Duration::from_secs(600);
        let e = wait_until_done(
            &init_wait(allowed),
            &mut clock,
            || {
                polls.set(polls.get() + 1);
                Poll::InProgress
            },
            || aborts.set(aborts.get() + 1),
        )
        .unwrap_err();
        assert!(matches!(e, WaitError::TimedOut(_)), "{e:?}");
        let m = e.to_string();
        assert!(
            m.starts_with("start-up: NCCL init: rank 1 of 2 (GPU 1) did not join the NCCL communicator within 600 s (dist.timeout_s)"),
            "{m}"
        );
        assert!(m.ends_with("The communicator was aborted (ncclCommAbort)"), "{m}");
        assert_eq!(aborts.get(), 1);
        // It waited the whole time allowed, not a moment more, and paused between polls.
        assert_eq!(clock.elapsed, allowed);
        assert_eq!(polls.get(), clock.pauses + 1);
        // 10 ms pauses once grown: about 60,000 polls in 600 s, not millions.
        assert!(clock.pauses > 50_000 && clock.pauses < 70_000, "{} pauses", clock.pauses);
    }

    #[test]
    fn an_error_is_reported_at_once_with_nccls_text_and_aborts_once() {
        let mut clock = FakeClock::new();
        let (mut polls, aborts) = (0, Cell::new(0));
        let w = Waiting {
            phase: Phase::Training,
            who: "rank 0 of 4 (GPU 0)",
            step: Step::Call("ncclAllReduce (f32 average)"),
            allowed: Duration::from_secs(5),
        };
        let e = wait_until_done(
            &w,
            &mut clock,
            || {
                polls += 1;
                if polls < 3 {
                    Poll::InProgress
                } else {
                    Poll::Failed("ncclRemoteError (remote process exited)".into())
                }
            },
            || aborts.set(aborts.get() + 1),
        )
        .unwrap_err();
        assert_eq!(
            e,
            WaitError::Failed(
                "training: ncclAllReduce (f32 average) on rank 0 of 4 (GPU 0) failed: ncclRemoteError (remote process \
                 exited). The communicator was aborted (ncclCommAbort)"
                    .into()
            )
        );
        assert_eq!((polls, aborts.get(), clock.pauses), (3, 1, 2));
    }

    #[test]
    fn done_is_ok_without_an_abort() {
        let mut clock = FakeClock::new();
        let aborts = Cell::new(0);
        let mut answers = [Poll::InProgress, Poll::InProgress, Poll::Done].into_iter();
        let r =
            wait_until_done(&init_wait(Duration::from_secs(1)), &mut clock, || answers.next().unwrap(), || aborts.set(aborts.get() + 1));
        assert_eq!(r, Ok(()));
        assert_eq!((aborts.get(), clock.pauses), (0, 2));
        // Done at the first look: no pause at all.
        let mut clock = FakeClock::new();
        assert_eq!(wait_until_done(&init_wait(Duration::ZERO), &mut clock, || Poll::Done, || panic!("aborted")), Ok(()));
        assert_eq!(clock.pauses, 0);
    }

    #[test]
    fn a_call_still_in_progress_names_the_call_and_the_phase() {
        let mut clock = FakeClock::new();
        let w = Waiting {
            phase: Phase::WeightBroadcast,
            who: "rank 0 of 2 (GPU 0)",
            step: Step::Call("ncclBroadcast (f32)"),
            allowed: Duration::from_millis(250),
        };
        let e = wait_until_done(&w, &mut clock, || Poll::InProgress, || {}).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("start-up: weight broadcast: ncclBroadcast (f32) on rank 0 of 2 (GPU 0) was still in progress after 0.25 s"),
            "{e}"
        );
    }

    #[test]
    fn the_real_clock_waits_out_a_short_deadline() {
        let started = Instant::now();
        let e = wait_until_done(&init_wait(Duration::from_millis(50)), &mut SystemClock, || Poll::InProgress, || {}).unwrap_err();
        assert!(matches!(e, WaitError::TimedOut(_)));
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(50) && took < Duration::from_secs(5), "{took:?}");
    }
}
