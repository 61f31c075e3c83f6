//! The exit codes, in one place: 0 success, 1 anything that went wrong while running
//! (including a failed `doctor` check), 2 bad configuration or usage (the config, a flag,
//! a device that is not there, a size that cannot fit, a W&B setting that can never work
//! such as a malformed `WANDB_BASE_URL`, ranks launched with different settings): nothing
//! was started.

use crate::report::wandb::BadSetting;

/// The exit code of a command that ended with `e`.
pub fn of(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<crate::config::ConfigError>().is_some()
        || e.downcast_ref::<crate::device::DeviceError>().is_some()
        || e.downcast_ref::<BadSetting>().is_some()
        || e.downcast_ref::<crate::parallel::same_job::RanksDisagree>().is_some()
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
/// and each found the same difference): then no rank needs to end the others.
pub fn every_rank_knows(e: &anyhow::Error) -> bool {
    e.downcast_ref::<crate::parallel::same_job::RanksDisagree>().is_some()
}
