//! Exact parameter counts and training FLOPs of an ALGPT2 configuration, from its shape
//! alone. The tch model must agree with these counts (tested once it exists).

use crate::config::ModelConfig;
use serde::Serialize;

/// Parameters per component; `total` is what `info` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParamCount {
    /// Token table V×E (also the tied LM head).
    pub token_embedding: u64,
    /// Position table P×E.
    pub position_embedding: u64,
    /// E→H and H→E linears with biases (0 when not factorized).
    pub projections: u64,
    /// One transformer block: two LayerNorms, attention, MLP.
    pub per_block: u64,
    /// Distinct blocks stored: 1 with sharing, else `n_layer`.
    pub stored_blocks: u64,
    /// Final LayerNorm.
    pub final_norm: u64,
    pub total: u64,
}

pub fn param_count(m: &ModelConfig) -> ParamCount {
    let (v, p, h, e) = (m.vocab_size as u64, m.n_positions as u64, m.n_embd as u64, m.embedding_width() as u64);
    let layer_norm = 2 * h;
    let attention = (h * 3 * h + 3 * h) + (h * h + h);
    let mlp = (h * 4 * h + 4 * h) + (4 * h * h + h);
    let per_block = 2 * layer_norm + attention + mlp;
    let stored_blocks = if m.share_layers { 1 } else { m.n_layer as u64 };
    let projections = if m.is_factorized() { (e * h + h) + (h * e + e) } else { 0 };
    let token_embedding = v * e;
    let position_embedding = p * e;
    let total = token_embedding + position_embedding + projections + stored_blocks * per_block + layer_norm;
    ParamCount { token_embedding, position_embedding, projections, per_block, stored_blocks, final_norm: layer_norm, total }
}

/// Training FLOPs per token (forward + backward = 3× forward) at sequence length `seq_len`.
///
/// Counts matrix multiplies only: every block application (a shared block costs `n_layer`
/// times though its weights are stored once), the projections, the tied LM head (E×V),
/// and attention scores and mixing (PaLM's 12·L·H·T term, causal mask not discounted).
pub fn training_flops_per_token(m: &ModelConfig, seq_len: usize) -> u64 {
    let (v, h, e, l) = (m.vocab_size as u64, m.n_embd as u64, m.embedding_width() as u64, m.n_layer as u64);
    let block_matmul = 3 * h * h + h * h + 8 * h * h;
    let projections = if m.is_factorized() { 2 * e * h } else { 0 };
    let lm_head = e * v;
    let forward_weights = l * block_matmul + projections + lm_head;
    6 * forward_weights + 12 * l * h * seq_len as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn study(share_layers: bool, embedding_size: Option<usize>) -> ModelConfig {
        ModelConfig { share_layers, embedding_size, ..ModelConfig::default() }
    }

    #[test]
    fn published_parameter_counts() {
        assert_eq!(param_count(&study(false, None)).total, 124_439_808);
        assert_eq!(param_count(&study(true, None)).total, 46_473_216);
        assert_eq!(param_count(&study(true, Some(128))).total, 13_850_880);
        // embedding_size equal to n_embd is the same as no factorization
        assert_eq!(param_count(&study(true, Some(768))), param_count(&study(true, None)));
    }

    #[test]
    fn sharing_does_not_change_compute() {
        let shared = training_flops_per_token(&study(true, None), 256);
        let unshared = training_flops_per_token(&study(false, None), 256);
        assert_eq!(shared, unshared);
        // GPT-2 124M at T=1024 is the familiar ~0.85 GFLOP per token (6N + 12LHT).
        let gpt2 = training_flops_per_token(&study(false, None), 1024) as f64;
        assert!((gpt2 / 1e9 - 0.85).abs() < 0.05, "{gpt2}");
        assert!(training_flops_per_token(&study(true, Some(128)), 256) < shared);
    }
}
