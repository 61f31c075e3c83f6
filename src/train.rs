//! `algpt2-ddp train`: start-up of every rank, then the loop, one stage per comment:
//! lr → step (micro-steps → sync → clip → update) → log → evaluate → agree → save.

use crate::checkpoint::{self, Found};
use crate::config::{Config, OnSaveError};
use crate::data::prepare::{self, Prepared};
use crate::data::source::Split;
use crate::data::summary;
use crate::device;
use crate::dist::signals::StopRequest;
use crate::dist::watchdog::Watchdog;
use crate::dist::{GradientExchange, World};
use crate::evaluation::evaluate;
use crate::report::format::group;
use crate::model::size::{param_count, training_flops_per_token};
use crate::optim::learning_rate;
use crate::report::log;
use crate::report::metrics::MetricsLog;
use crate::report::progress::Progress;
use crate::report::wandb_run::WandbRun;
use crate::run_dir::{RunDir, RunLock};
use crate::trainer::Trainer;
use anyhow::bail;
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tracing::{error, info};

pub fn run(cfg: Config) -> anyhow::Result<()> {
    device::allow_tf32(cfg.train.tf32);
    let world = World::init()?;
    let result = run_in_world(&cfg, &world);
    if let Err(e) = &result {
        if world.size() > 1 {
            // Others may be waiting in a collective for this rank: end the whole job.
            eprintln!("error on rank {}: {e:#}", world.rank());
            error!("rank {} failed: {e:#}", world.rank());
            world.abort(device::exit_code(e) as i32);
        }
    }
    result
}

fn run_in_world(cfg: &Config, world: &World) -> anyhow::Result<()> {
    // A device that is not there is a usage error: found before anything is written.
    let device = device::resolve(cfg.device, world.local_rank())?;
    device::check_memory(cfg, device, world.local_size())?;
    let run = RunDir::for_config(cfg);
    // Held until the run ends: a second training on this directory is refused.
    let _lock = if world.is_main() {
        let lock = RunLock::acquire(&run)?;
        run.create(cfg)?;
        Some(lock)
    } else {
        None
    };
    log::init(world.rank(), world.is_main().then(|| run.log()).as_deref())?;
    if world.is_main() {
        checkpoint::clean_partial(&run.checkpoints())?;
    }
    device::share_cpu_threads(world.local_size());
    announce(cfg, world, device, &run);

    let data = prepare::open_on_every_rank(cfg, world)?;
    summary::print(cfg, &data, world.size());
    if world.is_main() {
        // The run keeps its own tokenizer, for generation and export after the cache is gone.
        data.tokenizer.save(&run.tokenizer())?;
    }
    let train = data.split(Split::Train).expect("the train split always exists");
    let seq_len = cfg.train.seq_len;
    let mut trainer = Trainer::new(cfg, device, train.windows(seq_len));
    let metrics = MetricsLog::new(&run.metrics());
    if let Some(found) = resume_point(cfg, &run)? {
        trainer.load(&found, &data.tokenizer.hash_hex(), world)?;
        info!("resumed from {} at step {}", found.dir.display(), trainer.step);
    }
    if world.is_main() {
        // Rows an interrupted run logged after its last checkpoint (all of them, when it
        // saved none) are logged again by this one.
        metrics.truncate_after(trainer.step)?;
    }
    let exchange = GradientExchange::new(&cfg.dist, world, device)?;
    info!("gradient exchange: {}", exchange.name());
    trainer.broadcast_weights(world, &exchange)?;
    world.barrier();
    let stop = StopRequest::install(Duration::from_secs(cfg.dist.stop_grace_s))?;
    let resume = trainer.wandb_run_id.clone().map(|id| (id, trainer.step));
    let mut extra = Map::new();
    extra.insert("parameters".into(), json!(param_count(&cfg.model).total));
    extra.insert("world_size".into(), json!(world.size()));
    extra.insert("device".into(), json!(device::describe(device)));
    let wandb = WandbRun::start(cfg, &run.root, world.is_main(), extra, resume)?;
    trainer.wandb_run_id = wandb.run_id().or(trainer.wandb_run_id.take());
    // Start-up (data preparation) is not timed; from here on every step must finish.
    let watchdog = Watchdog::start(world.rank(), Duration::from_secs(cfg.dist.timeout_s));
    let ctx = LoopContext {
        cfg,
        world,
        run: &run,
        data: &data,
        metrics: &metrics,
        exchange: &exchange,
        stop: &stop,
        watchdog: &watchdog,
        wandb: &wandb,
        start_tokens: trainer.tokens_seen,
    };
    let result = train_loop(&ctx, &mut trainer);
    wandb.finish(if result.is_ok() { 0 } else { 1 });
    result
}

/// What the loop reads but never changes.
struct LoopContext<'a> {
    cfg: &'a Config,
    world: &'a World,
    run: &'a RunDir,
    data: &'a Prepared,
    metrics: &'a MetricsLog,
    exchange: &'a GradientExchange,
    stop: &'a StopRequest,
    watchdog: &'a Watchdog,
    wandb: &'a WandbRun,
    /// Tokens already trained on when this process started (after a resume).
    start_tokens: u64,
}

fn train_loop(ctx: &LoopContext, trainer: &mut Trainer) -> anyhow::Result<()> {
    let LoopContext { cfg, world, run, data, metrics, exchange, stop, watchdog, wandb, .. } = *ctx;
    let t = &cfg.train;
    let train = data.split(Split::Train).expect("the train split always exists");
    let valid = data.split(Split::Valid);
    let flops_per_token = training_flops_per_token(&cfg.model, t.seq_len) as f64;
    let peak_flops = device::peak_flops(t.peak_flops, trainer.device()).map(|p| p * world.size() as f64);
    let mut progress = Progress::new(world.is_main(), trainer.step, t.max_steps);
    if trainer.step >= t.max_steps {
        info!("the run is already complete at step {} (train.max_steps = {})", trainer.step, t.max_steps);
        return Ok(());
    }
    // Throughput counts training time only, not evaluation or saving.
    let (mut train_seconds, mut tokens_since_log, mut logged_at) = (0f64, 0u64, trainer.step);
    let (started_at, mut total_train_seconds) = (Instant::now(), 0f64);
    while trainer.step < t.max_steps {
        // 1. Learning rate of this step.
        let lr = learning_rate(&cfg.optim, trainer.step, t.max_steps);

        // 2. One optimizer step: micro-steps, gradient averaging, clipping, update.
        let started = Instant::now();
        let report = trainer.train_step(train, world, exchange, lr)?;
        crate::faults::kill_or_hang_at(trainer.step, world.rank());
        watchdog.beat();
        train_seconds += started.elapsed().as_secs_f64();
        total_train_seconds += started.elapsed().as_secs_f64();
        tokens_since_log += (trainer.global_batch(world) * t.seq_len) as u64;
        let step = trainer.step;
        let last = step == t.max_steps;
        trainer.val_loss_now = None;
        progress.step(step, report.loss);
        let mut row = Map::new();

        // 3. Training metrics.
        if step % t.log_interval == 0 || last {
            let tokens_per_sec = tokens_since_log as f64 / train_seconds.max(1e-9);
            row.insert("train/loss".into(), json!(report.loss));
            row.insert("train/lr".into(), json!(lr));
            row.insert("train/grad_norm".into(), json!(report.grad_norm));
            row.insert("train/tokens".into(), json!(trainer.tokens_seen));
            row.insert("train/epoch".into(), json!(trainer.epoch()));
            row.insert("train/tokens_per_sec".into(), json!(tokens_per_sec));
            row.insert("train/step_ms".into(), json!(1000.0 * train_seconds / (step - logged_at) as f64));
            if let Some(peak) = peak_flops {
                row.insert("train/mfu".into(), json!(flops_per_token * tokens_per_sec / peak));
            }
            if report.skipped {
                row.insert("train/skipped".into(), json!(true));
            }
            (train_seconds, tokens_since_log, logged_at) = (0.0, 0, step);
        }

        // 4. Evaluation on the valid split (all ranks take part).
        if let Some(valid) = valid {
            if (t.eval_interval > 0 && step % t.eval_interval == 0) || last {
                let limit = (t.eval_steps > 0).then(|| t.eval_steps * (t.micro_batch_size * world.size()) as u64);
                let e = evaluate(&trainer.model, valid, t.seq_len, t.micro_batch_size, limit, world, trainer.device());
                trainer.record_val_loss(e.loss);
                watchdog.beat();
                wandb.set_summary("val/ppl", json!(e.ppl));
                if let Some(best) = trainer.best_val_loss {
                    wandb.set_summary("val/best_ppl", json!(best.exp()));
                }
                row.insert("val/loss".into(), json!(e.loss));
                row.insert("val/ppl".into(), json!(e.ppl));
                if let Some(best) = valid.best_loss() {
                    row.insert("val/best_achievable_ppl".into(), json!(best.exp()));
                }
            }
        }
        if world.is_main() && !row.is_empty() {
            row.insert("step".into(), json!(step));
            row.insert("train/rss_mb".into(), json!(crate::report::log::rss_mb()));
            progress.line(&format_row(&row));
            metrics.append(&row)?;
            wandb.log(step, &row);
            if row.contains_key("val/loss") || last {
                // Charts are a convenience: a failure to draw is a warning, never a stop.
                if let Err(e) = crate::report::plots::render_run(&run.root) {
                    tracing::warn!("could not draw {}/plots.png: {e:#}", run.root.display());
                }
            }
        }

        // 5. Ranks must hold identical weights; a stop signal on any rank stops all.
        if cfg.dist.check_interval > 0 && step % cfg.dist.check_interval == 0 {
            trainer.check_ranks_agree(world)?;
        }
        let mut stopping = [stop.requested() as u8 as f64];
        world.all_reduce_max(&mut stopping);
        let stopping = stopping[0] > 0.0;

        // 6. Checkpoint (rank 0 writes; every rank reads on resume).
        if (t.save_interval > 0 && step % t.save_interval == 0) || last || stopping {
            let saved = if world.is_main() { trainer.save(&run.checkpoints(), world, &data.tokenizer.hash_hex()) } else { Ok(PathBuf::new()) };
            // Every rank learns whether rank 0's save worked, so that all stop together
            // (or all go on) instead of the others waiting on a rank that left.
            let mut failed = [saved.is_err() as u8 as f64];
            world.all_reduce_max(&mut failed);
            watchdog.beat();
            match saved {
                Ok(dir) if failed[0] == 0.0 => {
                    if world.is_main() {
                        progress.line(&format!("saved {}", dir.display()));
                    }
                }
                result => {
                    let why = match result {
                        Err(e) => format!("{e:#}"),
                        Ok(_) => "rank 0 could not save its checkpoint (its log says why)".to_string(),
                    };
                    let previous = if world.is_main() {
                        checkpoint::list_valid(&run.checkpoints())
                            .last()
                            .map_or("there is no earlier checkpoint".to_string(), |f| format!("{} is intact", f.dir.display()))
                    } else {
                        "rank 0 names the checkpoint to resume from".to_string()
                    };
                    let keep_going = cfg.checkpoint.on_save_error == OnSaveError::Continue && !last && !stopping;
                    if !keep_going {
                        bail!("{why}; {previous}; stopping at step {step} (free space, then run the same command to resume{})",
                            if cfg.checkpoint.on_save_error == OnSaveError::Stop { "; checkpoint.on_save_error: continue trains on" } else { "" });
                    }
                    tracing::warn!("{why}; {previous}; training on (checkpoint.on_save_error: continue), next try at step {}",
                        next_save_step(step, t.save_interval, t.max_steps));
                }
            }
        }
        if stopping {
            progress.finish();
            info!("stopped by signal after step {step}; the checkpoint is saved: run the same command to resume");
            return Ok(());
        }
    }
    progress.finish();
    summarize(ctx, trainer, started_at.elapsed().as_secs_f64(), total_train_seconds)
}

/// The step of the next periodic save after `step` (the final step when none comes first).
fn next_save_step(step: u64, save_interval: u64, max_steps: u64) -> u64 {
    if save_interval == 0 {
        return max_steps;
    }
    ((step / save_interval + 1) * save_interval).min(max_steps)
}

/// The end of a run: the test split's perplexity when there is one, then a summary block
/// in the log and `<run>/summary.json`.
fn summarize(ctx: &LoopContext, trainer: &Trainer, wall_seconds: f64, train_seconds: f64) -> anyhow::Result<()> {
    let LoopContext { cfg, world, run, data, wandb, .. } = *ctx;
    let t = &cfg.train;
    let test = data.split(Split::Test).map(|split| {
        let e = evaluate(&trainer.model, split, t.seq_len, t.micro_batch_size, None, world, trainer.device());
        (e, split.best_loss().map(f64::exp))
    });
    if !world.is_main() {
        return Ok(());
    }
    let valid_best = data.split(Split::Valid).and_then(|s| s.best_loss()).map(f64::exp);
    let tokens_since_start = trainer.tokens_seen.saturating_sub(ctx.start_tokens) as f64;
    let summary = json!({
        "steps": trainer.step,
        "tokens": trainer.tokens_seen,
        "wall_seconds": wall_seconds,
        "train_seconds": train_seconds,
        "tokens_per_sec": tokens_since_start / train_seconds.max(1e-9),
        "val_ppl": trainer.val_loss_now.map(f64::exp),
        "best_val_ppl": trainer.best_val_loss.map(f64::exp),
        "best_achievable_val_ppl": valid_best,
        "test_ppl": test.map(|(e, _)| e.ppl),
        "checkpoint": run.checkpoints().join(format!("step_{:08}", trainer.step)).display().to_string(),
    });
    if let Some((e, _)) = test {
        wandb.set_summary("test/ppl", json!(e.ppl));
    }
    let ppl = |v: &serde_json::Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.2}"));
    info!(
        "run summary\n  steps       {} ({} tokens)\n  time        {:.0} s ({:.0} s training)\n  throughput  {} tokens/s\n  val ppl     {} (best {}, best achievable {})\n  test ppl    {}\n  checkpoint  {}",
        trainer.step,
        group(trainer.tokens_seen),
        wall_seconds,
        train_seconds,
        group(summary["tokens_per_sec"].as_f64().unwrap_or(0.0) as u64),
        ppl(&summary["val_ppl"]),
        ppl(&summary["best_val_ppl"]),
        ppl(&summary["best_achievable_val_ppl"]),
        ppl(&summary["test_ppl"]),
        summary["checkpoint"].as_str().unwrap_or("-"),
    );
    crate::run_dir::write_atomic(&run.root.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())
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

/// `step 100 | train/loss 2.3456 | val/ppl 12.34` for log lines.
fn format_row(row: &Map<String, Value>) -> String {
    let mut parts = vec![format!("step {}", row["step"])];
    for (k, v) in row {
        if k == "step" {
            continue;
        }
        match v.as_f64() {
            Some(x) if k.ends_with("tokens") => parts.push(format!("{k} {}", group(x as u64))),
            Some(x) if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e5) => parts.push(format!("{k} {x:.3e}")),
            Some(x) => parts.push(format!("{k} {x:.4}")),
            None => parts.push(format!("{k} {v}")),
        }
    }
    parts.join(" | ")
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
