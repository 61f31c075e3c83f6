//! Where a rank is outside the training steps, for the watchdog (src/parallel/watchdog.rs):
//! start-up from MPI's init (where the launcher names the rank) to the first step, a checkpoint's save,
//! and the finish after the last step. The watchdog counts entering a phase as progress
//! and names the phase it stopped in, so a rank stuck before the first step (a node split
//! or a communicator that never forms, a weight broadcast another rank never joins) ends
//! the job after `dist.timeout_s` like a hung step does.
//!
//! One process-wide value, as the collective mark of src/parallel/waiting.rs: the places that
//! enter a phase (the data, the exchange's set-up) need no handle to the watchdog.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// MPI's init, which waits for every rank: armed before it where the launcher says
    /// which rank this is (src/parallel/world.rs), so a rank stopped or hung before its
    /// own init cannot hold the others there for good.
    MpiInit = 0,
    /// MPI's init has returned; the ranks find the others on their node (MPI_Comm_split_type,
    /// a collective), which picks the GPU.
    NodeSplit,
    /// The rank opens its device and checks that the config fits its memory.
    Device,
    /// The watchdogs exchange their heartbeat addresses (an all-gather): until then a
    /// firing watchdog can name only its own rank.
    HeartbeatExchange,
    /// The ranks agree that they run the same job (src/parallel/same_job.rs).
    SettingsAgreement,
    /// Rank 0 builds or checks the token cache while the others wait for it. Not timed:
    /// tokenizing a large corpus takes as long as it takes, and a rank that dies here
    /// ends the job through mpirun.
    DataPreparation,
    /// The other ranks check the cache rank 0 prepared (every chunk's crc32).
    CacheCheck,
    /// The ranks agree on the data and on the checkpoint they resume.
    DataAgreement,
    /// The overlapped exchange's communicator (MPI_Comm_dup).
    CommunicatorDup,
    /// NCCL's communicator (the id over MPI, then the non-blocking ncclCommInitRankConfig,
    /// which the rank itself gives up after `dist.timeout_s`, naming this phase).
    NcclInit,
    /// Rank 0's weights to every rank.
    WeightBroadcast,
    /// The steps: the watchdog's clock is the last completed step.
    Training,
    /// A checkpoint's save: rank 0 writes it while the others wait for its verdict. Not
    /// timed: a slow file system (a long fsync) takes as long as it takes, and a rank
    /// that dies here ends the job through mpirun. Rank 0 waits for the verdict timed
    /// again, so a rank stuck elsewhere meanwhile is still named.
    Saving,
    /// After the last collective: the summary and W&B's flush (bounded by
    /// `wandb.flush_timeout_s`). Not timed: nothing here waits for another rank.
    Finishing,
}

const ALL: [Phase; 14] = [
    Phase::MpiInit,
    Phase::NodeSplit,
    Phase::Device,
    Phase::HeartbeatExchange,
    Phase::SettingsAgreement,
    Phase::DataPreparation,
    Phase::CacheCheck,
    Phase::DataAgreement,
    Phase::CommunicatorDup,
    Phase::NcclInit,
    Phase::WeightBroadcast,
    Phase::Training,
    Phase::Saving,
    Phase::Finishing,
];

static CURRENT: AtomicU8 = AtomicU8::new(Phase::MpiInit as u8);
/// Bumped by work that takes long between two marks of its own: an evaluation batch,
/// entering a phase. The watchdog counts any change as progress.
static MARKS: AtomicU64 = AtomicU64::new(0);

/// Progress within a step or phase (an evaluation batch): the watchdog's clock restarts.
pub fn progress_made() {
    MARKS.fetch_add(1, Ordering::Relaxed);
}

/// How many times progress was marked so far.
pub(crate) fn marks() -> u64 {
    MARKS.load(Ordering::Relaxed)
}

impl Phase {
    /// Makes `self` this process's phase (the watchdog sees it as progress).
    pub fn enter(self) {
        CURRENT.store(self as u8, Ordering::Relaxed);
        progress_made();
    }

    pub fn current() -> Phase {
        Phase::of_index(CURRENT.load(Ordering::Relaxed))
    }

    /// Whether the watchdog ends a rank that makes no progress in this phase.
    pub fn timed(self) -> bool {
        !matches!(self, Phase::DataPreparation | Phase::Saving | Phase::Finishing)
    }

    /// The phase as the watchdog's message names it.
    pub fn describe(self) -> &'static str {
        match self {
            Phase::MpiInit => "start-up: MPI init (MPI_Init_thread)",
            Phase::NodeSplit => "start-up: finding the ranks on this node (MPI_Comm_split_type)",
            Phase::Device => "start-up: opening the device",
            Phase::HeartbeatExchange => "start-up: exchanging the watchdogs' addresses",
            Phase::SettingsAgreement => "start-up: agreeing on the settings",
            Phase::DataPreparation => "start-up: preparing the token cache",
            Phase::CacheCheck => "start-up: checking the token cache",
            Phase::DataAgreement => "start-up: agreeing on the data and the checkpoint",
            Phase::CommunicatorDup => "start-up: communicator dup (MPI_Comm_dup)",
            Phase::NcclInit => "start-up: NCCL init",
            Phase::WeightBroadcast => "start-up: weight broadcast",
            Phase::Training => "training",
            Phase::Saving => "saving a checkpoint",
            Phase::Finishing => "finishing",
        }
    }

    /// The name `ALGPT2_FAULT=hang_in_<slug>@0` uses to hang a rank in this phase.
    pub fn slug(self) -> &'static str {
        match self {
            Phase::MpiInit => "mpi_init",
            Phase::NodeSplit => "node_split",
            Phase::Device => "device",
            Phase::HeartbeatExchange => "heartbeat_exchange",
            Phase::SettingsAgreement => "settings_agreement",
            Phase::DataPreparation => "data_preparation",
            Phase::CacheCheck => "cache_check",
            Phase::DataAgreement => "data_agreement",
            Phase::CommunicatorDup => "comm_dup",
            Phase::NcclInit => "nccl_init",
            Phase::WeightBroadcast => "weight_broadcast",
            Phase::Training => "training",
            Phase::Saving => "saving",
            Phase::Finishing => "finishing",
        }
    }

    /// Enters the phase, then hangs here when a test asked for it
    /// (`ALGPT2_FAULT=hang_in_<slug>@0:R`).
    pub fn begin(self, rank: usize) {
        self.enter();
        crate::faults::hang_in_phase(self.slug(), rank);
    }

    pub(crate) fn of_index(i: u8) -> Phase {
        ALL[usize::from(i).min(ALL.len() - 1)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_round_trips_through_its_index_and_has_its_own_slug() {
        for (i, p) in ALL.iter().enumerate() {
            assert_eq!(*p as usize, i);
            assert_eq!(Phase::of_index(*p as u8), *p);
        }
        let slugs: std::collections::BTreeSet<_> = ALL.iter().map(|p| p.slug()).collect();
        assert_eq!(slugs.len(), ALL.len());
        assert!(!Phase::DataPreparation.timed() && !Phase::Saving.timed() && Phase::CommunicatorDup.timed());
        assert!(Phase::MpiInit.timed() && Phase::NodeSplit.timed() && Phase::Device.timed() && Phase::HeartbeatExchange.timed());
    }
}
