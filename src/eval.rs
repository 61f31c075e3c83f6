//! `algpt2-ddp eval`: the perplexity of a checkpoint over a whole split (the arithmetic
//! is in `perplexity.rs`).

use crate::checkpoint;
use crate::config::Config;
use crate::data::Split;
use crate::perplexity::evaluate;
use anyhow::{anyhow, bail};
use std::path::Path;

/// `algpt2-ddp eval`: every window of `split_name` under the weights of `checkpoint_dir`.
pub fn run(cfg: Config, checkpoint_dir: &Path, split_name: &str) -> anyhow::Result<()> {
    let crate::runtime::Runtime { world, device } = crate::runtime::Runtime::start(&cfg)?;
    crate::report::log::init(world.rank(), None)?;
    let state = checkpoint::verify(checkpoint_dir)?;
    if state.model_config != serde_json::to_value(&cfg.model)? {
        bail!("checkpoint {} was made by another model config: {}", checkpoint_dir.display(), state.model_config);
    }
    let data = crate::data::prepare::open_on_every_rank(&cfg, &world)?;
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
        if let Some(run) = crate::run_dir::RunDir::of_checkpoint(checkpoint_dir) {
            let out = run.root.join(format!("eval-{split_name}-{}.json", crate::run_dir::checkpoint_dir_name(state.step)));
            crate::run_dir::write_atomic(&out, serde_json::to_string_pretty(&report)?.as_bytes())?;
        }
    }
    Ok(())
}
