//! What a prepared dataset amounts to for a run: tokens, windows, epochs, best loss.

use super::cache::Prepared;
use crate::config::Config;
use tracing::info;

/// Logs one line per split, and how many epochs of train the run's steps make at
/// `world_size` ranks.
pub fn print(cfg: &Config, data: &Prepared, world_size: usize) {
    let seq_len = cfg.train.seq_len;
    info!("token cache: {} (tokenizer: {} tokens)", data.dir.display(), data.tokenizer.vocab_size());
    for (name, split) in &data.splits {
        let best = split.best_loss().map(|l| format!(", best achievable loss {l:.4} (ppl {:.3})", l.exp())).unwrap_or_default();
        info!("  {name}: {} tokens, {} windows of {seq_len}{best}", split.tokens.len(), split.windows(seq_len));
    }
    if let Some(train) = data.splits.get("train") {
        let per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size;
        let epochs = cfg.train.max_steps as f64 * per_step as f64 / train.windows(seq_len) as f64;
        info!("  {} steps x {per_step} windows = {epochs:.2} epochs of train", cfg.train.max_steps);
    }
}
