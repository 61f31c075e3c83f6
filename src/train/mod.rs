//! `algpt2-ddp train`: start-up of every rank, then the loop (`train_loop`, one page):
//! lr → step (micro-steps → sync → clip → update) → log → evaluate → agree → save.

mod checkpointer;
mod job_facts;
mod run_checkpoints;
mod run_metadata;
mod run_summary;
mod sinks;
mod step_metrics;
mod stopping;
mod system_stats;
mod validation;

use crate::checkpoint::{self, Found, LoopState};
use crate::config::Config;
use crate::data::cache::SplitData;
use crate::data::prepare;
use crate::data::summary;
use crate::data::Split;
use crate::device;
use crate::model::size::param_count;
use crate::optim::learning_rate;
use crate::parallel::phase::Phase;
use crate::parallel::same_job;
use crate::parallel::signals::{Preempted, StopRequest, EXIT_PREEMPTED};
use crate::parallel::watchdog::Watchdog;
use crate::parallel::{DataParallel, World};
use crate::report::format::group;
use crate::report::log;
use crate::report::metrics_log::MetricsLog;
use crate::report::progress::Progress;
use crate::report::wandb_run::WandbRun;
use crate::run_dir::{RunDir, RunLock};
use crate::runtime::Runtime;
use crate::trainer::Trainer;
use anyhow::bail;
use checkpointer::Checkpointer;
use run_checkpoints::RunCheckpoints;
use serde_json::{json, Map};
use sinks::{Charts, MetricSink};
use std::time::{Duration, Instant};
use step_metrics::TrainMetrics;
use stopping::StopCause;
use system_stats::SystemStats;
use tracing::info;
use validation::Validator;

pub fn run(cfg: Config) -> anyhow::Result<()> {
    // From MPI's init to the first step every phase is timed (but preparing the token
    // cache), and a rank stuck in one is named (src/parallel/phase.rs); the step counter
    // is set once the resume is settled.
    let (rt, watchdog) = Runtime::start_watched(&cfg)?;
    let result = run_in_world(&cfg, &rt.world, rt.device, &watchdog);
    rt.check(result)
}

fn run_in_world(cfg: &Config, world: &World, device: tch::Device, watchdog: &Watchdog) -> anyhow::Result<()> {
    // Before anything is written or any collective the settings shape.
    Phase::SettingsAgreement.begin(world.rank());
    same_job::agree(world, "settings", &job_facts::settings(cfg, device, world.rank()))?;
    let run = RunDir::for_config(cfg);
    // Held until the run ends: a second training on this directory is refused. The run's
    // config and tokenizer are written only once the resume is settled (below): a refused
    // resume leaves them as the checkpoints were made with.
    let _lock = if world.is_main() { Some(RunLock::acquire(&run)?) } else { None };
    log::init(world.rank(), world.is_main().then(|| run.log()).as_deref())?;
    if world.is_main() && cfg.wandb.console && cfg.wandb.mode != crate::config::WandbMode::Disabled {
        // From the first line on, for the W&B Logs tab (sent once the run reports).
        crate::report::console::capture();
    }
    if world.is_main() {
        checkpoint::clean_partial(&run.checkpoints())?;
    }
    announce(cfg, world, device, &run);

    let data = prepare::open_on_every_rank(cfg, world)?;
    Phase::DataAgreement.begin(world.rank());
    summary::print(cfg, &data, world.size());
    let train = data.split(Split::Train).expect("the train split always exists");
    let seq_len = cfg.train.seq_len;
    if let (tch::Device::Cuda(ordinal), true) = (device, cfg.model.dropout > 0.0) {
        // Dropout masks are made by kernels/dropout.cu: load it now, not mid-step.
        crate::cuda::kernels::shared(ordinal).map_err(|e| anyhow::anyhow!("rank {}: loading the CUDA kernels: {e:#}", world.rank()))?;
    }
    let mut trainer = Trainer::new(cfg, device, train.windows(seq_len));
    info!("precision: {} ({})", trainer.precision.name(), trainer.precision.reason);
    let metrics = MetricsLog::new(&run.metrics());
    let mut validator = Validator::new(cfg, data.split(Split::Valid), world);
    let mut resumed_wandb_run = None;
    let mut checkpoints = RunCheckpoints::new(cfg, &run, data.tokenizer.hash_hex())?;
    let resumed = resume_point(cfg, &run)?;
    same_job::agree(world, "data and checkpoint", &job_facts::data_and_checkpoint(&data, resumed.as_ref())?)?;
    same_job::agree(world, "gradient layout", &trainer.exchange_layout())?;
    if let Some(found) = resumed {
        checkpoints.resume(&found, &mut trainer, world)?;
        validator.restore(&found.state);
        resumed_wandb_run = found.state.wandb_run_id.clone();
        info!("resumed from {} at step {}", found.dir.display(), trainer.step);
    }
    if world.is_main() {
        run.create(cfg)?;
        // The run keeps its own tokenizer, for generation and export after the cache is gone.
        data.tokenizer.save(&run.tokenizer())?;
        // Rows an interrupted run logged after its last checkpoint (all of them, when it
        // saved none) are logged again by this one.
        metrics.truncate_after(trainer.step)?;
    }
    let replicas = DataParallel::new(&cfg.dist, world, device)?;
    info!("gradient exchange: {}", replicas.exchange_name());
    if replicas.overlaps() && !trainer.model.stageable() {
        info!(
            "  shared layers complete their gradients only when backward ends: only the token table's whole part goes during backward, the rest after it"
        );
    }
    Phase::WeightBroadcast.begin(world.rank());
    trainer.broadcast_weights(&replicas)?;
    world.barrier();
    let stop = StopRequest::install(Duration::from_secs(cfg.dist.stop_grace_s))?;
    let resume = resumed_wandb_run.clone().map(|id| (id, trainer.step));
    let mut extra = Map::new();
    extra.insert("parameters".into(), json!(param_count(&cfg.model).total));
    extra.insert("world_size".into(), json!(world.size()));
    extra.insert("device".into(), json!(device::describe(device)));
    extra.insert("precision".into(), json!(trainer.precision.name()));
    let metadata = run_metadata::collect(world, device);
    let wandb = WandbRun::start(cfg, &run.root, world.is_main(), extra, resume, metadata)?;
    // Said once W&B runs, so that its console has it too.
    if let Some(restart) = crate::restarts::this_restart(&run.root, &|key| std::env::var(key).ok()).filter(|_| world.is_main()) {
        info!("{}", crate::restarts::announcement(&restart));
    }
    let gpu = match device {
        tch::Device::Cuda(i) => Some(i),
        _ => None,
    };
    let stats = SystemStats::start(cfg, world, gpu, &wandb);
    // Kept in every checkpoint, so that a resumed run continues the same W&B run.
    let wandb_run_id = wandb.run_id().or(resumed_wandb_run);
    Phase::Training.enter();
    watchdog.beat(trainer.step);
    let progress = Progress::new(world.is_main(), trainer.step, cfg.train.max_steps);
    let charts = Charts { run_root: &run.root, max_steps: cfg.train.max_steps };
    let env = LoopEnv {
        replicas: &replicas,
        train,
        stop: &stop,
        watchdog,
        wandb: &wandb,
        stats: &stats,
        wandb_run_id,
        progress: &progress,
        sinks: [&metrics, &progress, &wandb, &charts],
    };
    let checkpointer = Checkpointer::new(cfg, &run, checkpoints);
    let peak_flops = device::peak_flops(cfg.train.peak_flops, device).map(|p| p * world.size() as f64);
    let mut train_metrics = TrainMetrics::new(cfg, peak_flops, trainer.step);
    let (started_at, start_tokens) = (Instant::now(), trainer.tokens_seen);
    let result = train_loop(cfg, &mut trainer, &env, &checkpointer, &mut validator, &mut train_metrics).and_then(|ended| match ended {
        Ended::Completed { train_seconds } => {
            let timing = Timing { wall_seconds: started_at.elapsed().as_secs_f64(), train_seconds, start_tokens };
            run_summary::write(cfg, world, &run, &data, &wandb, &trainer, validator.losses(), &timing)
        }
        Ended::Stopped(StopCause::Preempted) => Err(Preempted { step: trainer.step }.into()),
        // Ended after its last checkpoint but before its summary (a rank killed there,
        // then restarted by `supervise` or by hand): the summary of this attempt.
        Ended::AlreadyComplete if run_summary::missing(world, &run) => {
            let timing = Timing { wall_seconds: started_at.elapsed().as_secs_f64(), train_seconds: 0.0, start_tokens };
            run_summary::write(cfg, world, &run, &data, &wandb, &trainer, validator.losses(), &timing)
        }
        Ended::AlreadyComplete | Ended::Stopped(_) => Ok(()),
    });
    // After the last collective nothing waits for another rank: W&B's flush is bounded
    // by wandb.flush_timeout_s, and a run that trained to the end must not fail here.
    Phase::Finishing.enter();
    let preempted = result.as_ref().err().is_some_and(|e| e.is::<Preempted>());
    if let Err(e) = &result {
        if !preempted {
            wandb.console_error(&format!("{e:#}"));
        }
    }
    wandb.finish(match &result {
        Ok(()) => 0,
        Err(_) if preempted => i32::from(EXIT_PREEMPTED),
        Err(_) => 1,
    });
    result
}

/// What the loop uses and never changes.
struct LoopEnv<'a> {
    replicas: &'a DataParallel<'a>,
    train: &'a SplitData,
    stop: &'a StopRequest,
    watchdog: &'a Watchdog,
    wandb: &'a WandbRun,
    stats: &'a SystemStats,
    wandb_run_id: Option<String>,
    progress: &'a Progress,
    /// Rank 0's logged rows go to each: metrics.jsonl, the progress line, W&B, charts.
    sinks: [&'a dyn MetricSink; 4],
}

enum Ended {
    Completed { train_seconds: f64 },
    Stopped(StopCause),
    AlreadyComplete,
}

/// The loop. Each component decides its own timing: the metrics when a row is logged,
/// the validator when to evaluate, the checkpointer when to save and what a failed save
/// does.
fn train_loop(
    cfg: &Config,
    trainer: &mut Trainer,
    env: &LoopEnv,
    checkpointer: &Checkpointer,
    validator: &mut Validator,
    metrics: &mut TrainMetrics,
) -> anyhow::Result<Ended> {
    let (t, world) = (&cfg.train, env.replicas.world);
    if trainer.step >= t.max_steps {
        info!("the run is already complete at step {} (train.max_steps = {})", trainer.step, t.max_steps);
        return Ok(Ended::AlreadyComplete);
    }
    let mut train_seconds = 0.0;
    while trainer.step < t.max_steps {
        let lr = learning_rate(&cfg.optim, trainer.step, t.max_steps);
        let started = Instant::now();
        let outcome = trainer.train_step(env.train, env.replicas, lr)?;
        outcome.faults.after_update();
        // Device values are read only for a logged row; the read waits for the device, so
        // it belongs to the step's time.
        let report = metrics.read_if_due(&outcome, trainer.step, world);
        env.watchdog.beat(trainer.step);
        let step_seconds = started.elapsed().as_secs_f64();
        train_seconds += step_seconds;
        metrics.add(step_seconds, (trainer.global_batch(world) * t.seq_len) as u64, outcome.comm);
        if report.is_some() {
            trainer.enforce_nonfinite_policy()?;
        }
        env.progress.step(trainer.step, report.as_ref().map(|r| r.loss));
        let mut row = metrics.row(report.as_ref(), lr, trainer);
        if validator.validate_if_due(trainer, world, env.wandb, &mut row) {
            env.watchdog.beat(trainer.step);
        }
        if world.is_main() && !row.is_empty() {
            row.insert("step".into(), json!(trainer.step));
            row.insert("train/rss_mb".into(), json!(crate::report::log::rss_mb()));
            for sink in env.sinks {
                sink.record(trainer.step, &row)?;
            }
        }

        // Ranks must hold identical weights; a stop signal on any rank, or the dashboard's
        // Stop (rank 0 hears it from W&B), stops all.
        if cfg.dist.check_interval > 0 && trainer.step.is_multiple_of(cfg.dist.check_interval) {
            trainer.check_ranks_agree(world)?;
        }
        let heard = stopping::Heard {
            signal: env.stop.requested(),
            preempted: env.stop.preempted(),
            dashboard: env.wandb.stop_requested(),
            stats_due: env.stats.due(),
        };
        let agreed = stopping::agree(world, heard);
        if agreed.gather_stats {
            env.stats.gather(world, env.wandb)?;
        }
        let (stop_cause, stopping) = (agreed.stop, agreed.stop.is_some());
        let (val_loss, best_val_loss) = validator.losses();
        let others = LoopState { wandb_run_id: env.wandb_run_id.clone(), val_loss, best_val_loss };
        if checkpointer.is_due(trainer.step, stopping) {
            // No checkpoint after a non-finite step under `train.nonfinite: stop`.
            trainer.enforce_nonfinite_policy()?;
        }
        checkpointer.save_if_due(trainer, &others, world, env.progress, stopping)?;
        env.watchdog.beat(trainer.step);
        if let Some(cause) = stop_cause {
            env.progress.finish();
            info!("{}", cause.message(trainer.step));
            return Ok(Ended::Stopped(cause));
        }
    }
    env.progress.finish();
    Ok(Ended::Completed { train_seconds })
}

/// Times of a completed run, for its summary.
pub(crate) struct Timing {
    wall_seconds: f64,
    train_seconds: f64,
    /// Tokens already trained on when this process started (after a resume).
    start_tokens: u64,
}

/// Where a run starts: `checkpoint.resume` is `auto` (the run's newest valid
/// checkpoint, if any), `none`, or a checkpoint directory.
fn resume_point(cfg: &Config, run: &RunDir) -> anyhow::Result<Option<Found>> {
    match cfg.checkpoint.resume.as_str() {
        "auto" => Ok(checkpoint::list_valid(&run.checkpoints()).pop()),
        "none" => {
            if let Some(found) = checkpoint::list_valid(&run.checkpoints()).pop() {
                bail!(
                    "checkpoint.resume is none but {} already holds checkpoints (newest {}): choose another run_name, resume: auto, or delete them",
                    run.checkpoints().display(),
                    found.dir.display()
                );
            }
            Ok(None)
        }
        path => {
            let dir = std::path::PathBuf::from(path);
            let state = checkpoint::verify(&dir).map_err(|e| anyhow::anyhow!("checkpoint.resume: {e:#}"))?;
            Ok(Some(Found { dir, state }))
        }
    }
}

fn announce(cfg: &Config, world: &World, device: tch::Device, run: &RunDir) {
    let global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world.size();
    info!("resolved config:\n{}", cfg.to_yaml().trim_end());
    info!("world: {} rank(s), {} on this node; device {}", world.size(), world.local_size(), device::describe(device));
    info!("model: {} with {} parameters", cfg.model.variant(), group(param_count(&cfg.model).total));
    info!(
        "global batch: {} windows = micro_batch_size {} x grad_accum_steps {} x world {} ({} tokens/step)",
        global_batch,
        cfg.train.micro_batch_size,
        cfg.train.grad_accum_steps,
        world.size(),
        group((global_batch * cfg.train.seq_len) as u64)
    );
    info!("run directory: {}", run.root.display());
}
