//! Start-up shared by the commands that compute (train, bench, eval, doctor), in one
//! order: TF32, the MPI world, the rank's device and the memory the config needs on it,
//! the rank's share of the CPU threads. Nothing is written, so a device that is not there
//! or a config that cannot fit leaves no trace. `doctor` takes the first stage only and
//! reports the device instead of failing on it.

use crate::config::Config;
use crate::device;
use crate::parallel::phase::Phase;
use crate::parallel::watchdog::Watchdog;
use crate::parallel::World;
use tch::Device;

pub struct Runtime {
    pub world: World,
    pub device: Device,
}

impl Runtime {
    pub fn start(cfg: &Config) -> anyhow::Result<Runtime> {
        let world = Self::join(cfg.train.tf32)?;
        Self::on_device(cfg, world)
    }

    /// As `start`, with the watchdog (`dist.timeout_s`) armed as MPI's init returns and
    /// connected to the other ranks' once the device is open: from there to the first
    /// step, a rank stuck anywhere is named (training).
    pub fn start_watched(cfg: &Config) -> anyhow::Result<(Runtime, Watchdog)> {
        device::allow_tf32(cfg.train.tf32);
        let timeout = std::time::Duration::from_secs(cfg.dist.timeout_s);
        let (world, watchdog) = World::init_then(|rank, size| Watchdog::arm(rank, size, timeout))?;
        let watchdog = abort_job_on_error(&world, watchdog)?;
        let rt = Self::on_device(cfg, world)?;
        watchdog.connect(&rt.world);
        Ok((rt, watchdog))
    }

    /// The rank's device and the memory the config needs on it, then its share of the
    /// CPU threads.
    fn on_device(cfg: &Config, world: World) -> anyhow::Result<Runtime> {
        Phase::Device.begin(world.rank());
        let checked = device::resolve(cfg.device, world.local_rank())
            .and_then(|d| device::check_memory(cfg, d, world.local_size()).map(|()| d))
            .map_err(anyhow::Error::from);
        let device = abort_job_on_error(&world, checked)?;
        device::share_cpu_threads(world.local_size());
        Ok(Runtime { world, device })
    }

    /// The first stage: TF32 for CUDA matrix products (libtorch reads the setting once,
    /// so before any tensor work and before MPI starts threads), then the MPI world.
    pub fn join(tf32: bool) -> anyhow::Result<World> {
        device::allow_tf32(tf32);
        World::init()
    }

    /// `result`, unless it is an error in a world of several ranks: then the whole job
    /// ends (see [`abort_job_on_error`]).
    pub fn check<T>(&self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        abort_job_on_error(&self.world, result)
    }
}

/// A rank that cannot go on must not leave the others waiting in a collective: under
/// mpirun it prints its error and ends every rank (MPI_Abort with the error's exit code:
/// 2 for a bad config or a missing device, else 1). Alone, the error is returned.
fn abort_job_on_error<T>(world: &World, result: anyhow::Result<T>) -> anyhow::Result<T> {
    if let Err(e) = &result {
        if world.size() > 1 && !crate::exit_code::every_rank_knows(e) {
            crate::report::log::stderr_line(&format!("error on rank {}: {e:#}", world.rank()));
            tracing::error!("rank {} failed: {e:#}", world.rank());
            world.abort(crate::exit_code::of(e) as i32);
        }
    }
    result
}
