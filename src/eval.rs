//! Perplexity: exp(mean token cross-entropy) over non-overlapping windows of a split,
//! each rank taking every world-size-th window and the sums combined across ranks, so the
//! result is the same at any world size.

use crate::checkpoint;
use crate::config::Config;
use crate::data::batches::{batch_tensors, eval_windows};
use crate::data::prepare::SplitData;
use crate::data::source::Split;
use crate::dist::World;
use crate::model::Algpt2;
use anyhow::{anyhow, bail};
use serde::Serialize;
use std::path::Path;
use tch::{Device, Kind, Reduction};

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Evaluation {
    pub loss: f64,
    pub ppl: f64,
    pub tokens: u64,
    pub windows: u64,
}

/// Evaluates the first `limit` windows of `split` (all when None), `batch` windows at a
/// time per rank, without dropout or gradients.
pub fn evaluate(
    model: &Algpt2,
    split: &SplitData,
    seq_len: usize,
    batch: usize,
    limit: Option<u64>,
    world: &World,
    device: Device,
) -> Evaluation {
    let mine: Vec<u64> = eval_windows(split.windows(seq_len), limit, world.size(), world.rank()).collect();
    let mut totals = [0f64, 0f64, 0f64]; // loss sum, tokens, windows
    tch::no_grad(|| {
        for chunk in mine.chunks(batch.max(1)) {
            let (inputs, targets) = batch_tensors(&split.tokens, chunk, seq_len, device);
            let logits = model.forward(&inputs, false);
            let v = logits.size()[2];
            // Per-token losses summed in f64: the total then hardly depends on how the
            // windows were batched, i.e. on the world size.
            let per_token = logits
                .view([-1, v])
                .to_kind(Kind::Float)
                .cross_entropy_loss::<tch::Tensor>(&targets.reshape([-1]), None, Reduction::None, -100, 0.0);
            totals[0] += per_token.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
            totals[1] += targets.numel() as f64;
            totals[2] += chunk.len() as f64;
        }
    });
    world.all_reduce_sum(&mut totals);
    let loss = totals[0] / totals[1].max(1.0);
    Evaluation { loss, ppl: loss.exp(), tokens: totals[1] as u64, windows: totals[2] as u64 }
}

/// `algpt2-ddp eval`: every window of `split_name` under the weights of `checkpoint_dir`.
pub fn run(cfg: Config, checkpoint_dir: &Path, split_name: &str) -> anyhow::Result<()> {
    let world = World::init()?;
    crate::report::log::init(world.rank(), None)?;
    let state = checkpoint::verify(checkpoint_dir)?;
    if state.model_config != serde_json::to_value(&cfg.model)? {
        bail!("checkpoint {} was made by another model config: {}", checkpoint_dir.display(), state.model_config);
    }
    let device = crate::device::resolve(cfg.device, world.local_rank())?;
    let data = crate::train::open_data(&cfg, &world)?;
    let split = if split_name == "test" { Split::Test } else { Split::Valid };
    let split_data = data.split(split).ok_or_else(|| anyhow!("data.{split_name} is not configured"))?;
    if state.tokenizer_hash != data.tokenizer.hash_hex() {
        bail!("checkpoint {} was trained with another tokenizer than this config's data", checkpoint_dir.display());
    }

    let loaded = checkpoint::load_model(checkpoint_dir, &cfg.model, device)?;
    let e = evaluate(&loaded.model, split_data, cfg.train.seq_len, cfg.train.micro_batch_size, None, &world, device);
    if world.is_main() {
        let report = serde_json::json!({
            "checkpoint": checkpoint_dir.display().to_string(),
            "step": state.step,
            "split": split_name,
            "loss": e.loss,
            "ppl": e.ppl,
            "tokens": e.tokens,
            "windows": e.windows,
            "best_achievable_ppl": split_data.best_loss().map(f64::exp),
        });
        println!("{report}");
        // Beside the run: <run>/eval-<split>-step_<N>.json (checkpoints stay as written).
        if let Some(run_dir) = checkpoint_dir.parent().and_then(Path::parent) {
            let out = run_dir.join(format!("eval-{split_name}-step_{:08}.json", state.step));
            crate::run_dir::write_atomic(&out, serde_json::to_string_pretty(&report)?.as_bytes())?;
        }
    }
    Ok(())
}
