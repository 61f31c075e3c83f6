//! `algpt2-ddp bench`: the training step's speed on this device for a config, without a
//! run directory: tokens/s, step time, MFU, peak memory, as a table and as JSON.

use crate::config::Config;
use crate::data::Split;
use crate::device;
use crate::model::size::training_flops_per_token;
use crate::parallel::DataParallel;
use crate::report::format::group;
use crate::trainer::Trainer;
use serde_json::json;
use std::time::Instant;

/// Steps run before timing starts (allocator and kernel warm-up).
const WARMUP_STEPS: u64 = 3;

pub fn run(cfg: Config, steps: u64, as_json: bool) -> anyhow::Result<()> {
    let crate::runtime::Runtime { world, device } = crate::runtime::Runtime::start(&cfg)?;
    crate::report::log::init(world.rank(), None)?;
    let data = crate::data::prepare::open_on_every_rank(&cfg, &world)?;
    let train = data.split(Split::Train).expect("the train split always exists");
    let mut trainer = Trainer::new(&cfg, device, train.windows(cfg.train.seq_len));
    let replicas = DataParallel::new(&cfg.dist, &world, device)?;
    trainer.broadcast_weights(&replicas)?;

    let mut step_seconds = Vec::new();
    for step in 0..WARMUP_STEPS + steps {
        let started = Instant::now();
        // Read every step so that each step's time includes the device finishing it.
        trainer.train_step(train, &replicas, cfg.optim.lr)?.read(&world);
        if step >= WARMUP_STEPS {
            step_seconds.push(started.elapsed().as_secs_f64());
        }
    }
    let tokens_per_step = (trainer.global_batch(&world) * cfg.train.seq_len) as f64;
    let total: f64 = step_seconds.iter().sum();
    let tokens_per_sec = tokens_per_step * step_seconds.len() as f64 / total;
    let mut sorted = step_seconds.clone();
    sorted.sort_by(f64::total_cmp);
    let median_ms = 1000.0 * sorted[sorted.len() / 2];
    let flops = training_flops_per_token(&cfg.model, cfg.train.seq_len) as f64;
    let peak = device::peak_flops(cfg.train.peak_flops, device).map(|p| p * world.size() as f64);
    let mfu = peak.map(|p| flops * tokens_per_sec / p);
    let peak_rss_mb = crate::report::log::peak_rss_mb();
    if !world.is_main() {
        return Ok(());
    }
    let report = json!({
        "device": device::describe(device),
        "world_size": world.size(),
        "steps": steps,
        "tokens_per_step": tokens_per_step,
        "tokens_per_sec": tokens_per_sec,
        "step_ms_mean": 1000.0 * total / step_seconds.len() as f64,
        "step_ms_median": median_ms,
        "mfu": mfu,
        "training_flops_per_token": flops,
        "peak_rss_mb": peak_rss_mb,
        "precision": trainer.precision.name(),
    });
    if as_json {
        println!("{report}");
    } else {
        println!("| device | ranks | tokens/s | step ms (median) | MFU | peak RSS MB |");
        println!("|---|---|---|---|---|---|");
        println!(
            "| {} | {} | {} | {median_ms:.1} | {} | {peak_rss_mb:.0} |",
            device::describe(device),
            world.size(),
            group(tokens_per_sec as u64),
            mfu.map_or("n/a (set train.peak_flops)".to_string(), |m| format!("{:.1}%", 100.0 * m)),
        );
    }
    Ok(())
}
