//! The memory one rank needs to train a config, estimated from the shapes alone, so that
//! a size that cannot fit is refused before anything is allocated or written (instead of
//! an allocator abort minutes later). fp32 throughout, one micro-batch alive at a time.

use crate::config::Config;

/// Bytes, by what holds them. f64: absurd configs must not overflow the arithmetic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    /// Weights and their gradients (the flat buffers).
    pub parameters: f64,
    /// AdamW's two moments.
    pub optimizer: f64,
    /// What autograd keeps of one micro-batch for the backward pass.
    pub activations: f64,
    /// The fused classifier's logits chunk (fp32, and its compute-type copy), and the
    /// gradient of the head's input rows.
    pub logits: f64,
}

impl MemoryEstimate {
    pub fn total(&self) -> f64 {
        self.parameters + self.optimizer + self.activations + self.logits
    }
}

/// H-wide tensors autograd saves per block application: LayerNorm inputs and outputs
/// (4), q, k, v (3), the attention output and its projection (2), the residuals (2), and
/// the MLP's 4H-wide input and GELU output (8).
const SAVED_WIDTHS_PER_BLOCK: f64 = 19.0;
/// Bytes per attention score kept per head: the probabilities, their dropout output and
/// the dropout mask.
const ATTENTION_BYTES_PER_SCORE: f64 = 4.0 + 4.0 + 1.0;

pub fn training(cfg: &Config) -> MemoryEstimate {
    let m = &cfg.model;
    let (b, t) = (cfg.train.micro_batch_size as f64, cfg.train.seq_len as f64);
    let (h, v, e) = (m.n_embd as f64, m.vocab_size as f64, m.embedding_width() as f64);
    let p = crate::model::size::param_count(m).total as f64;
    let per_block = b * t * h * 4.0 * SAVED_WIDTHS_PER_BLOCK + b * m.n_head as f64 * t * t * ATTENTION_BYTES_PER_SCORE;
    // Embedding outputs, the projections in and out, the final LayerNorm, the batch ids.
    let edges = b * t * (4.0 * (2.0 * e + 3.0 * h) + 16.0);
    MemoryEstimate {
        parameters: 8.0 * p,
        optimizer: 8.0 * p,
        activations: per_block * m.n_layer as f64 + edges,
        logits: {
            let padded = (v / cfg.train.pad_vocab_multiple as f64).ceil() * cfg.train.pad_vocab_multiple as f64;
            let rows = (crate::model::classifier::chunk_rows(cfg.train.classifier_chunk_rows, padded as i64) as f64).min(b * t);
            2.0 * rows * padded * 4.0 + b * t * e * 4.0
        },
    }
}

/// "1.2 GB" style.
pub fn human(bytes: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KB", "MB", "GB", "TB", "PB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == UNITS.len() - 1 && value >= 1000.0 {
        return format!("{bytes:.1e} B");
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> Config {
        crate::config::parse(yaml, "t.yaml", &[]).unwrap()
    }

    #[test]
    fn parameters_and_optimizer_are_16_bytes_per_parameter() {
        let c = cfg("model: { vocab_size: 50257, n_positions: 1024, n_embd: 768, n_layer: 12, n_head: 12, share_layers: false, embedding_size: null }\n");
        let m = training(&c);
        assert_eq!(m.parameters, 8.0 * 124_439_808.0);
        assert_eq!(m.optimizer, m.parameters);
    }

    #[test]
    fn activations_and_logits_grow_with_the_batch() {
        let small = training(&cfg("train: { micro_batch_size: 1 }\n"));
        let large = training(&cfg("train: { micro_batch_size: 64 }\n"));
        assert!((large.activations / small.activations - 64.0).abs() < 1e-9);
        // The fused classifier's logits chunk does not grow with the batch; the gradient
        // of the head's input rows (E = 128 wide) does.
        assert!((large.logits - small.logits - 63.0 * 256.0 * 128.0 * 4.0).abs() < 1e-3, "{} {}", large.logits, small.logits);
        // GPT-2 124M at 30 x 256 (the studies' shape): a few GB, as PyTorch fp32 needs.
        let gpt2 = training(&cfg("model: { n_layer: 12, n_embd: 768, n_head: 12, embedding_size: null, share_layers: false }\n"));
        assert!(gpt2.total() > 5e9 && gpt2.total() < 30e9, "{}", human(gpt2.total()));
    }

    #[test]
    fn absurd_sizes_stay_finite() {
        let c = cfg("train: { micro_batch_size: 1000000000 }\n");
        let t = training(&c).total();
        assert!(t.is_finite() && t > 1e15, "{t}");
        assert_eq!(human(1.5e9), "1.5 GB");
        assert_eq!(human(512.0), "512.0 B");
    }
}
