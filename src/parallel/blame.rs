//! The watchdog's last words: from what this rank knows of itself and heard from the
//! others (src/parallel/heartbeat.rs), which rank stopped the job. The training loop moves
//! in lockstep, so when one rank stops the others soon wait for it inside a collective;
//! the rank that stopped is the one that is not waiting (or, when several are not, the
//! one furthest behind), or the one that went silent altogether.

use super::heartbeat::Status;
use super::phase::Phase;
use std::time::Duration;

/// A peer silent this long is stopped, frozen, dead or cut off (it sends every 0.5 s).
const SILENT: Duration = Duration::from_millis(2500);
/// The most ranks one message names.
const MAX_NAMED: usize = 4;

/// What a peer last said, and how long ago.
#[derive(Debug, Clone)]
pub(crate) struct Heard {
    pub status: Status,
    pub ago: Duration,
}

/// Everything the message is made of.
pub(crate) struct View {
    /// This rank now (`stalled_ms` without the time it was frozen).
    pub me: Status,
    /// How long this rank itself was last frozen (stopped by a signal, or its machine
    /// paused), if that ended within `allowed`.
    pub frozen: Duration,
    /// Each rank's last heartbeat (None for this rank and the ranks never heard).
    pub peers: Vec<Option<Heard>>,
    pub allowed: Duration,
    /// The peer whose watchdog fired first and ended the job, when not this rank's.
    pub fired_on: Option<usize>,
    /// Where this rank is: a start-up phase, the steps, or the finish.
    pub phase: Phase,
}

/// The one line a firing watchdog writes.
pub(crate) fn message(v: &View) -> String {
    // Told by the rank that fired, this rank gives that rank's time, and its own view.
    let (stalled, on) = match v.fired_on.and_then(|r| v.peers.get(r).cloned().flatten()) {
        Some(h) => (Duration::from_millis(h.status.stalled_ms), format!(" on rank {}", h.status.rank)),
        None => (Duration::from_millis(v.me.stalled_ms), String::new()),
    };
    let progress = match v.phase {
        Phase::Training => "no training progress".to_string(),
        phase => format!("no progress in {}", phase.describe()),
    };
    format!(
        "error on rank {}: {progress} for {:.1} s{on} (dist.timeout_s): {}; ending this rank so the job stops",
        v.me.rank,
        secs(stalled),
        blame(v)
    )
}

fn blame(v: &View) -> String {
    if v.fired_on.is_some() && v.frozen >= v.allowed / 2 {
        return format!(
            "this rank was frozen for {:.1} s (SIGSTOP, a suspended job or a paused machine) while the others waited",
            secs(v.frozen)
        );
    }
    let stuck = |s: &Status| !s.waiting && Duration::from_millis(s.stalled_ms) >= v.allowed / 2;
    let heard_any = v.peers.iter().any(Option::is_some);
    if !heard_any {
        return if stuck(&v.me) || v.peers.len() <= 1 {
            this_rank(&v.me)
        } else {
            "another rank died or hangs (cannot tell which rank: no heartbeat from the other ranks arrived)".to_string()
        };
    }
    let recent = |h: &&Heard| h.ago <= SILENT;
    let mut stopped: Vec<&Status> = v.peers.iter().flatten().filter(recent).map(|h| &h.status).filter(|s| stuck(s)).collect();
    if stuck(&v.me) {
        stopped.push(&v.me);
    }
    // Several not waiting: the ones furthest behind hold the others up.
    if let Some(least) = stopped.iter().map(|s| s.last_step).min() {
        stopped.retain(|s| s.last_step == least);
    }
    stopped.sort_by_key(|s| s.rank);
    let mut parts: Vec<String> = stopped
        .iter()
        .map(|s| match v.peers.get(s.rank).and_then(Option::as_ref) {
            Some(h) if s.rank != v.me.rank => format!(
                "rank {} stopped making progress (last completed step {}, not waiting in a collective; heard {:.1} s ago)",
                s.rank,
                s.last_step,
                secs(h.ago)
            ),
            _ => this_rank(s),
        })
        .collect();
    for (rank, peer) in v.peers.iter().enumerate().filter(|(r, _)| *r != v.me.rank) {
        match peer {
            None => parts
                .push(format!("rank {rank} has sent nothing since the start (stopped, frozen, its host is down, or UDP to it is blocked)")),
            Some(h) if h.ago > SILENT => parts.push(format!(
                "rank {rank} has sent nothing for {:.1} s (stopped, frozen or its host is down; last completed step {})",
                secs(h.ago),
                h.status.last_step
            )),
            Some(_) => {}
        }
    }
    if parts.is_empty() {
        let mut steps: Vec<String> = v.peers.iter().flatten().map(|h| format!("rank {}: {}", h.status.rank, h.status.last_step)).collect();
        steps.insert(0, format!("rank {}: {}", v.me.rank, v.me.last_step));
        steps.truncate(MAX_NAMED);
        return format!(
            "every rank waits in a collective that cannot complete (last completed steps {}): the network between them, or ranks that called different collectives",
            steps.join(", ")
        );
    }
    let more = parts.len().saturating_sub(MAX_NAMED);
    parts.truncate(MAX_NAMED);
    if more > 0 {
        parts.push(format!("and {more} more rank(s)"));
    }
    parts.join("; ")
}

fn this_rank(me: &Status) -> String {
    format!("this rank stopped making progress outside any collective after step {}", me.last_step)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALLOWED: Duration = Duration::from_secs(4);

    fn status(rank: usize, last_step: u64, waiting: bool, stalled_s: f64) -> Status {
        Status { rank, last_step, waiting, stalled_ms: (stalled_s * 1000.0) as u64, ending: false }
    }

    fn heard(s: Status, ago_s: f64) -> Option<Heard> {
        Some(Heard { status: s, ago: Duration::from_secs_f64(ago_s) })
    }

    fn view(me: Status, peers: Vec<Option<Heard>>) -> View {
        View { me, frozen: Duration::ZERO, peers, allowed: ALLOWED, fired_on: None, phase: Phase::Training }
    }

    #[test]
    fn the_rank_that_is_not_waiting_is_named_by_the_others_and_by_itself() {
        let (waiting, hung) = (status(0, 3, true, 4.1), status(1, 2, false, 4.3));
        let on_0 = message(&view(waiting.clone(), vec![None, heard(hung.clone(), 0.3)]));
        assert_eq!(
            on_0,
            "error on rank 0: no training progress for 4.1 s (dist.timeout_s): rank 1 stopped making progress (last completed step 2, \
             not waiting in a collective; heard 0.3 s ago); ending this rank so the job stops"
        );
        let on_1 = message(&view(hung, vec![heard(waiting, 0.1), None]));
        assert!(
            on_1.contains("error on rank 1") && on_1.contains("this rank stopped making progress outside any collective after step 2"),
            "{on_1}"
        );
    }

    #[test]
    fn a_silent_rank_is_named_with_how_long_it_has_been_silent() {
        let m = message(&view(status(0, 5, true, 4.2), vec![None, heard(status(1, 5, false, 0.2), 4.4)]));
        assert!(m.contains("rank 1 has sent nothing for 4.4 s (stopped, frozen or its host is down; last completed step 5)"), "{m}");
        assert!(!m.contains("stopped making progress"), "{m}");
        let never = message(&view(status(0, 5, true, 4.2), vec![None, heard(status(1, 5, true, 4.0), 0.2), None]));
        assert!(never.contains("rank 2 has sent nothing since the start"), "{never}");
    }

    #[test]
    fn of_several_ranks_not_waiting_the_one_furthest_behind_is_named() {
        let peers = vec![None, heard(status(1, 7, false, 3.0), 0.2), heard(status(2, 6, false, 4.0), 0.2)];
        let m = message(&view(status(0, 7, true, 4.1), peers));
        assert!(m.contains("rank 2 stopped") && !m.contains("rank 1 stopped"), "{m}");
    }

    #[test]
    fn a_frozen_rank_blames_itself_when_a_peer_ends_the_job() {
        let mut v = view(status(1, 4, true, 0.3), vec![heard(status(0, 5, true, 4.2), 0.0), None]);
        (v.frozen, v.fired_on) = (Duration::from_secs(6), Some(0));
        let m = message(&v);
        assert!(
            m.starts_with("error on rank 1: no training progress for 4.2 s on rank 0 (dist.timeout_s): this rank was frozen for 6.0 s"),
            "{m}"
        );
    }

    #[test]
    fn without_any_heartbeat_the_message_says_it_cannot_tell() {
        let m = message(&view(status(0, 3, true, 4.0), vec![None, None]));
        assert!(m.contains("another rank died or hangs (cannot tell which rank"), "{m}");
        // Not waiting in a collective is known without the others.
        let m = message(&view(status(0, 3, false, 4.0), vec![None, None]));
        assert!(m.contains("this rank stopped making progress outside any collective after step 3"), "{m}");
        // One rank alone.
        assert!(message(&view(status(0, 3, false, 4.0), vec![None])).contains("this rank stopped"));
    }

    #[test]
    fn before_the_first_step_the_message_names_the_start_up_phase() {
        let mut v = view(status(0, 0, true, 4.1), vec![None, heard(status(1, 0, false, 4.2), 0.2)]);
        v.phase = Phase::WeightBroadcast;
        let m = message(&v);
        assert!(
            m.starts_with("error on rank 0: no progress in start-up: weight broadcast for 4.1 s (dist.timeout_s): rank 1 stopped"),
            "{m}"
        );
    }

    #[test]
    fn all_waiting_is_a_collective_that_cannot_complete() {
        let m = message(&view(status(0, 3, true, 4.0), vec![None, heard(status(1, 3, true, 4.0), 0.2)]));
        assert!(m.contains("every rank waits in a collective that cannot complete (last completed steps rank 0: 3, rank 1: 3)"), "{m}");
    }
}
