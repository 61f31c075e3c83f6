//! The end of a completed run: the test split's perplexity when there is one, then a
//! summary block in the log and `<run>/summary.json`.

use super::Timing;
use crate::config::Config;
use crate::data::cache::Prepared;
use crate::data::Split;
use crate::parallel::World;
use crate::perplexity::evaluate;
use crate::report::format::group;
use crate::report::wandb_run::WandbRun;
use crate::run_dir::RunDir;
use crate::trainer::Trainer;
use serde::Serialize;
use serde_json::json;
use tracing::info;

/// `summary.json` (fields in alphabetical order, as the file has always had them).
#[derive(Serialize)]
struct RunSummary {
    best_achievable_val_ppl: Option<f64>,
    best_val_ppl: Option<f64>,
    checkpoint: String,
    /// Transfers by this process that make the host wait for a GPU (`host_waits`: reads
    /// of device values, copies from pageable memory): a handful per logged row, none per
    /// unlogged step.
    host_waits: u64,
    /// `bf16` or `fp32`: what `train.precision` resolved to.
    precision: String,
    /// Host tensors copied to the device without a wait (`host_to_device`): one per
    /// micro-batch and evaluation batch.
    queued_uploads: u64,
    /// Under `supervise`, the job's restarts (`restarts.jsonl`); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    restarts: Option<u32>,
    steps: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    steps_recomputed: Option<u64>,
    test_ppl: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    time_lost_s: Option<f64>,
    tokens: u64,
    tokens_per_sec: f64,
    train_seconds: f64,
    val_ppl: Option<f64>,
    wall_seconds: f64,
}

fn path(run: &RunDir) -> std::path::PathBuf {
    run.root.join("summary.json")
}

/// Whether rank 0 finds no `summary.json`, as every rank must agree (the test evaluation
/// that comes before it is a collective).
pub(super) fn missing(world: &World, run: &RunDir) -> bool {
    let mut missing = [if world.is_main() && !path(run).exists() { 1.0 } else { 0.0 }];
    world.all_reduce_max(&mut missing);
    missing[0] > 0.0
}

/// `val_losses`: the loss at the last step and the best, from the validator.
#[allow(clippy::too_many_arguments)]
pub(super) fn write(
    cfg: &Config,
    world: &World,
    run: &RunDir,
    data: &Prepared,
    wandb: &WandbRun,
    trainer: &Trainer,
    val_losses: (Option<f64>, Option<f64>),
    timing: &Timing,
) -> anyhow::Result<()> {
    let t = &cfg.train;
    // Every rank takes part in the test evaluation; rank 0 alone reports it.
    let test =
        data.split(Split::Test).map(|split| evaluate(&trainer.model, split, t.seq_len, t.micro_batch_size, None, world, trainer.device()));
    // The last collective: what follows waits for no other rank.
    crate::parallel::phase::Phase::Finishing.enter();
    if !world.is_main() {
        return Ok(());
    }
    let tokens_since_start = trainer.tokens_seen.saturating_sub(timing.start_tokens) as f64;
    let restarts = crate::restarts::totals(&crate::restarts::read_all(&run.root));
    let s = RunSummary {
        best_achievable_val_ppl: data.split(Split::Valid).and_then(|s| s.best_loss()).map(f64::exp),
        best_val_ppl: val_losses.1.map(f64::exp),
        checkpoint: run.checkpoint(trainer.step).display().to_string(),
        host_waits: crate::host_waits::count(),
        precision: trainer.precision.name().to_string(),
        queued_uploads: crate::host_to_device::count(),
        restarts: restarts.map(|r| r.restarts),
        steps: trainer.step,
        steps_recomputed: restarts.map(|r| r.steps_recomputed),
        test_ppl: test.map(|e| e.ppl),
        time_lost_s: restarts.map(|r| r.time_lost_s),
        tokens: trainer.tokens_seen,
        tokens_per_sec: tokens_since_start / timing.train_seconds.max(1e-9),
        train_seconds: timing.train_seconds,
        val_ppl: val_losses.0.map(f64::exp),
        wall_seconds: timing.wall_seconds,
    };
    if let Some(ppl) = s.test_ppl {
        wandb.set_summary("test/ppl", json!(ppl));
    }
    let ppl = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.2}"));
    info!(
        "run summary\n  steps       {} ({} tokens)\n  time        {:.0} s ({:.0} s training)\n  throughput  {} tokens/s\n  val ppl     {} (best {}, best achievable {})\n  test ppl    {}\n  checkpoint  {}",
        s.steps,
        group(s.tokens),
        s.wall_seconds,
        s.train_seconds,
        group(s.tokens_per_sec as u64),
        ppl(s.val_ppl),
        ppl(s.best_val_ppl),
        ppl(s.best_achievable_val_ppl),
        ppl(s.test_ppl),
        s.checkpoint,
    );
    if let Some(r) = restarts {
        info!(
            "  restarts    {} ({} step(s) trained again, {:.0} s lost; {})",
            r.restarts,
            r.steps_recomputed,
            r.time_lost_s,
            crate::restarts::path(&run.root).display()
        );
    }
    crate::run_dir::write_atomic(&path(run), serde_json::to_string_pretty(&s)?.as_bytes())
}
