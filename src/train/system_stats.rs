//! The system metrics of every rank on the W&B dashboard's System panels. Each rank's
//! sampler thread (src/report/system) keeps its newest sample, so a step never waits
//! for /proc or NVML. When rank 0's interval is up, its vote rides on the step
//! boundary's stop agreement (stopping.rs); every rank then hands its newest sample to
//! one gather, which waits for nobody (the agreement just brought every rank there), and
//! rank 0 logs one `wandb-events.jsonl` row of them all.

use crate::config::Config;
use crate::parallel::World;
use crate::report::system::{events_row, RankSample, Sampler};
use crate::report::wandb_run::WandbRun;
use std::cell::Cell;
use std::time::{Duration, Instant};

pub struct SystemStats {
    sampler: Option<Sampler>,
    interval: Duration,
    /// Rank 0 reports: it votes when a row is due.
    reports: bool,
    /// When rank 0 last logged a row (none yet: the first goes at the first boundary).
    last_row: Cell<Option<Instant>>,
}

impl SystemStats {
    /// Starts this rank's sampler when the run wants system metrics (the same answer on
    /// every rank: config and environment); `gpu` is the CUDA device the rank trains on.
    pub fn start(cfg: &Config, world: &World, gpu: Option<usize>, wandb: &WandbRun) -> SystemStats {
        let interval = Duration::from_secs_f64(cfg.wandb.stats_interval_s);
        let wanted = WandbRun::stats_wanted(cfg);
        SystemStats {
            sampler: wanted.then(|| Sampler::start(world.rank(), interval, gpu)),
            interval,
            reports: wanted && wandb.reports(),
            last_row: Cell::new(None),
        }
    }

    /// Rank 0's vote at this boundary: a row is due.
    pub fn due(&self) -> bool {
        self.reports && self.last_row.get().is_none_or(|t| t.elapsed() >= self.interval)
    }

    /// Every rank, when the ranks agreed on it: gathers the newest samples on rank 0,
    /// which logs them as one row. A rank without a sampler sends an empty sample.
    pub fn gather(&self, world: &World, wandb: &WandbRun) -> anyhow::Result<()> {
        let mine = self.sampler.as_ref().map(Sampler::latest).unwrap_or_default();
        let mut values = mine.to_f64s();
        if crate::faults::stats_extra(world.rank()) {
            values.push(0.0);
        }
        let Some(all) = world.gather_to_main(&values).map_err(|e| anyhow::anyhow!("system metrics: {e:#}"))? else { return Ok(()) };
        self.last_row.set(Some(Instant::now()));
        let samples: Vec<RankSample> = all.chunks(RankSample::LEN).map(RankSample::from_f64s).collect();
        let row = events_row(&samples);
        if !row.is_empty() {
            wandb.log_system(&row);
        }
        Ok(())
    }
}
