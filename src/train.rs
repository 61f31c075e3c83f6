//! `algpt2-ddp train`: start-up of every rank, then the training loop.

use crate::config::Config;
use crate::device;
use crate::dist::World;
use crate::info::{group, variant};
use crate::model::size::param_count;
use crate::report::log;
use crate::run_dir::RunDir;
use tracing::{error, info};

pub fn run(cfg: Config) -> anyhow::Result<()> {
    let world = World::init()?;
    let result = run_in_world(&cfg, &world);
    if let Err(e) = &result {
        if world.size() > 1 {
            // Others may be waiting in a collective for this rank: end the whole job.
            eprintln!("error on rank {}: {e:#}", world.rank());
            error!("rank {} failed: {e:#}", world.rank());
            world.abort(1);
        }
    }
    result
}

fn run_in_world(cfg: &Config, world: &World) -> anyhow::Result<()> {
    let run = RunDir::for_config(cfg);
    if world.is_main() {
        run.create(cfg)?;
    }
    log::init(world.rank(), world.is_main().then(|| run.log()).as_deref())?;
    share_cpu_threads(world);
    let device = device::resolve(cfg.device, world.local_rank())?;

    let global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world.size();
    info!("resolved config:\n{}", cfg.to_yaml().trim_end());
    info!(
        "world: {} rank(s), {} on this node; device {}",
        world.size(),
        world.local_size(),
        device::describe(device)
    );
    info!(
        "model: {} with {} parameters",
        variant(&cfg.model),
        group(param_count(&cfg.model).total)
    );
    info!(
        "global batch: {} windows = micro_batch_size {} x grad_accum_steps {} x world {} ({} tokens/step)",
        global_batch,
        cfg.train.micro_batch_size,
        cfg.train.grad_accum_steps,
        world.size(),
        group((global_batch * cfg.train.seq_len) as u64)
    );
    info!("run directory: {}", run.root.display());
    world.barrier();
    info!("the training loop is not part of this build yet: start-up checks passed, nothing trained");
    Ok(())
}

/// Ranks on one node split its cores, so that two ranks do not fight over every core.
fn share_cpu_threads(world: &World) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_rank = (cores / world.local_size()).max(1);
    tch::set_num_threads(per_rank as i32);
}
