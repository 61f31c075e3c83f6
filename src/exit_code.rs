//! The exit codes, in one place: 0 success, 1 anything that went wrong while running
//! (including a failed `doctor` check), 2 bad configuration or usage (the config, a flag,
//! a device that is not there, a size that cannot fit, a W&B setting that can never work
//! such as a malformed `WANDB_BASE_URL`, ranks launched with different settings): nothing
//! was started; 75 preempted (SIGTERM: saved, to be started again). A rank's own ends
//! have theirs: 3 the watchdog, 130 the stop's grace period (`parallel::signals`).

use crate::report::wandb::BadSetting;

/// A command used in a way that can never work, found before anything started and that
/// no config check covers (e.g. `supervise` given a job that runs no training): exit 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// A command that ends with another command's exit code (`supervise`: its job's).
#[derive(Debug, thiserror::Error)]
#[error("{why}")]
pub struct ExitWith {
    pub code: u8,
    pub why: String,
}

/// The exit code of a command that ended with `e`.
pub fn of(e: &anyhow::Error) -> u8 {
    if let Some(exit) = e.downcast_ref::<ExitWith>() {
        exit.code
    } else if e.is::<crate::parallel::signals::Preempted>() {
        crate::parallel::signals::EXIT_PREEMPTED
    } else if e.downcast_ref::<crate::config::ConfigError>().is_some()
        || e.downcast_ref::<crate::device::DeviceError>().is_some()
        || e.downcast_ref::<BadSetting>().is_some()
        || e.downcast_ref::<crate::parallel::same_job::RanksDisagree>().is_some()
        || e.is::<Usage>()
    {
        2
    } else {
        1
    }
}

/// Whether every rank fails the same way with `e` (the config is read by all of them), so
/// that one copy of the message is enough.
pub fn same_on_every_rank(e: &anyhow::Error) -> bool {
    e.downcast_ref::<crate::config::ConfigError>().is_some()
}

/// Whether every rank of the job reached `e` together (the ranks compared their settings
/// and each found the same difference, or agreed on a preemption at the same step): then
/// no rank needs to end the others.
pub fn every_rank_knows(e: &anyhow::Error) -> bool {
    e.downcast_ref::<crate::parallel::same_job::RanksDisagree>().is_some() || e.is::<crate::parallel::signals::Preempted>()
}
