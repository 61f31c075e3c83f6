//! What the supervisor does when the job ends: the run is over (finished, or stopped by
//! its user), it can never work (exit 2: a configuration error, ranks that disagree), or
//! it failed on the way (a rank killed, a hang the watchdog ended, a preemption, mpirun
//! gone) and starts again from its last checkpoint.

use crate::parallel::signals::EXIT_PREEMPTED;

/// How the job's process ended, as the supervisor saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Code(i32),
    Signal(i32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Finished, or stopped by the user or the W&B dashboard (exit 0): the supervisor
    /// exits 0 too.
    Over,
    /// Starting again would end the same way, or the user asked to stop: the supervisor
    /// exits with `code`.
    Final { code: u8, why: String },
    /// Start again from the newest checkpoint.
    Restart { why: String },
}

/// The verdict on a job that `ended`; `stopped_by_user` when the supervisor itself was
/// told to stop (it passed the stop on, and never restarts after it).
pub fn of(ended: Ended, stopped_by_user: bool) -> Verdict {
    let what = describe(ended);
    match ended {
        Ended::Code(0) => Verdict::Over,
        _ if stopped_by_user => Verdict::Final { code: code_of(ended), why: format!("stopped by the user; the job {what}") },
        Ended::Code(2) => Verdict::Final {
            code: 2,
            why: format!("the job {what}: a configuration error or ranks launched with different settings, which a restart would repeat"),
        },
        // A shell's "found but cannot run" and "not found": the job never started, and
        // will not start the next time either.
        Ended::Code(c @ (126 | 127)) => {
            Verdict::Final { code: c as u8, why: format!("the job {what}: its program could not be started, which a restart would repeat") }
        }
        Ended::Code(c) if c == i32::from(EXIT_PREEMPTED) => Verdict::Restart { why: format!("preempted (the job {what})") },
        Ended::Code(3) => Verdict::Restart { why: format!("the watchdog ended a job that made no progress (the job {what})") },
        Ended::Code(130) => Verdict::Restart { why: format!("a rank was ended after the stop's grace period (the job {what})") },
        // A shell's 128 + signal; above the last signal number it is just a code.
        Ended::Code(c) if (129..=128 + 64).contains(&c) => {
            Verdict::Restart { why: format!("a rank was killed by {} (the job {what})", signal_name(c - 128)) }
        }
        Ended::Code(_) => Verdict::Restart { why: format!("the job {what}") },
        Ended::Signal(_) => Verdict::Restart { why: format!("the job's launcher {what}") },
    }
}

/// "exited 137", "was killed by SIGKILL".
pub fn describe(ended: Ended) -> String {
    match ended {
        Ended::Code(c) => format!("exited {c}"),
        Ended::Signal(s) => format!("was killed by {}", signal_name(s)),
    }
}

/// The supervisor's own exit code for a job that ended so: a shell's 128 + signal for a
/// signal.
pub fn code_of(ended: Ended) -> u8 {
    match ended {
        Ended::Code(c) => u8::try_from(c).unwrap_or(1),
        Ended::Signal(s) => u8::try_from(128 + s).unwrap_or(1),
    }
}

fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGBUS => "SIGBUS".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGUSR1 => "SIGUSR1".into(),
        s => format!("signal {s}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restarts(v: &Verdict) -> bool {
        matches!(v, Verdict::Restart { .. })
    }

    #[test]
    fn a_finished_run_a_bad_config_and_a_users_stop_are_never_restarted() {
        assert_eq!(of(Ended::Code(0), false), Verdict::Over);
        assert_eq!(of(Ended::Code(0), true), Verdict::Over);
        let Verdict::Final { code: 2, why } = of(Ended::Code(2), false) else { panic!() };
        assert!(why.contains("exited 2: a configuration error"), "{why}");
        // Stopped by the user, whatever the job's code.
        for ended in [Ended::Code(75), Ended::Code(1), Ended::Code(130), Ended::Signal(libc::SIGKILL)] {
            let v = of(ended, true);
            assert!(matches!(&v, Verdict::Final { why, .. } if why.starts_with("stopped by the user")), "{v:?}");
        }
        let Verdict::Final { code: 127, why } = of(Ended::Code(127), false) else { panic!() };
        assert!(why.contains("could not be started"), "{why}");
        assert_eq!(of(Ended::Code(130), true), Verdict::Final { code: 130, why: "stopped by the user; the job exited 130".into() });
    }

    #[test]
    fn failures_on_the_way_restart_and_say_why() {
        let why = |ended| match of(ended, false) {
            Verdict::Restart { why } => why,
            v => panic!("{v:?}"),
        };
        assert_eq!(why(Ended::Code(75)), "preempted (the job exited 75)");
        assert!(why(Ended::Code(3)).starts_with("the watchdog ended"));
        assert_eq!(why(Ended::Code(137)), "a rank was killed by SIGKILL (the job exited 137)");
        assert_eq!(why(Ended::Code(1)), "the job exited 1");
        assert_eq!(why(Ended::Code(205)), "the job exited 205");
        assert_eq!(why(Ended::Signal(libc::SIGKILL)), "the job's launcher was killed by SIGKILL");
        assert!(restarts(&of(Ended::Code(130), false)));
        assert_eq!(code_of(Ended::Signal(9)), 137);
        assert_eq!(code_of(Ended::Code(-1)), 1);
    }
}
