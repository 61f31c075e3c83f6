//! How the ranks agree on a stop: a stop signal on any rank (src/parallel/signals.rs) or a
//! Stop pressed on the W&B dashboard (heard by rank 0 alone, src/report/wandb_run.rs)
//! stops every rank after the same step, and each rank knows which, for its last line.
//! The same all-reduce carries rank 0's "system metrics are due" (system_stats.rs), so
//! that gathering them needs no collective of its own on the other steps.

use crate::parallel::World;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    Signal,
    Dashboard,
}

/// What every rank agreed on at a step boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    pub stop: Option<StopCause>,
    /// Every rank's system metrics go to rank 0 now.
    pub gather_stats: bool,
}

/// One all-reduce of this rank's three flags: the stop every rank agrees on, if any, and
/// whether system metrics are gathered at this boundary.
pub fn agree(world: &World, signal: bool, dashboard: bool, stats_due: bool) -> Agreed {
    let flag = |b: bool| f64::from(u8::from(b));
    let mut flags = [flag(signal), flag(dashboard), flag(stats_due)];
    world.all_reduce_max(&mut flags);
    Agreed { stop: cause([flags[0], flags[1]]), gather_stats: flags[2] > 0.0 }
}

/// A signal names the stop when both came: it is the one given on this machine.
fn cause(flags: [f64; 2]) -> Option<StopCause> {
    if flags[0] > 0.0 {
        Some(StopCause::Signal)
    } else if flags[1] > 0.0 {
        Some(StopCause::Dashboard)
    } else {
        None
    }
}

impl StopCause {
    /// The run's last line: why it stopped, and that the same command resumes it.
    pub fn message(self, step: u64) -> String {
        let why = match self {
            StopCause::Signal => "by signal",
            StopCause::Dashboard => "from the W&B dashboard",
        };
        format!("stopped {why} after step {step}; the checkpoint is saved: run the same command to resume")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn either_flag_on_any_rank_stops_and_names_its_cause() {
        assert_eq!(cause([0.0, 0.0]), None);
        assert_eq!(cause([1.0, 0.0]), Some(StopCause::Signal));
        assert_eq!(cause([0.0, 1.0]), Some(StopCause::Dashboard));
        assert_eq!(cause([1.0, 1.0]), Some(StopCause::Signal));
        assert!(StopCause::Dashboard.message(7).starts_with("stopped from the W&B dashboard after step 7;"));
        assert!(StopCause::Signal.message(7).contains("stopped by signal after step 7; the checkpoint is saved: run the same command"));
    }
}
