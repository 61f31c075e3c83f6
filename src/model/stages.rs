//! The forward of `Algpt2::hidden` cut into stages whose inputs are fresh leaves, so that
//! the backward can run one stage at a time, the last first: when a stage's backward
//! returns, the gradients of its parameters are complete, and their exchange can start
//! while the earlier stages' backward runs (src/parallel/overlap.rs). tch has no autograd
//! hooks; stage boundaries are what tells us a gradient is ready.
//!
//! The stages, in backward order: the final LayerNorm (and H→E projection), each block
//! from the last to the first, the embeddings (token table, which is also the head,
//! positions, E→H projection). With shared layers the one block's gradients are complete
//! only after its first application's backward, that is with everything else: such a
//! model is not staged (`Algpt2::stageable`).
//!
//! Every operation is the unstaged forward's, and each boundary's gradient is the same
//! sum of the same contributions, so the gradients are bitwise those of one backward
//! (tested in src/model/objective.rs).

use super::dropout::Dropout;
use super::Algpt2;
use tch::{Kind, Tensor};

/// The token table (also the head): its gradient before the last backward is complete
/// but for what the embedding lookup adds in the last stage, to the rows of the input
/// tokens only (src/parallel/token_table.rs exchanges it in two parts).
pub const TOKEN_TABLE: &str = "wte";

/// The stage (index into `stages`, backward order, as `Algpt2::stage_prefixes`) whose
/// backward completes the gradient of parameter `name`; one no stage names goes with the
/// last.
pub fn stage_of(name: &str, stages: &[Vec<String>]) -> usize {
    stages.iter().position(|prefixes| prefixes.iter().any(|p| name.starts_with(p.as_str()))).unwrap_or(stages.len().saturating_sub(1))
}

/// A staged forward: each stage's input leaf and output, in forward order.
pub struct Staged {
    embedded: Tensor,
    /// (input leaf, output) of each layer application.
    layers: Vec<(Tensor, Tensor)>,
    final_input: Tensor,
    /// The head's input [batch, time, E], as `Algpt2::hidden` gives it.
    pub hidden: Tensor,
}

impl Algpt2 {
    /// Whether backward can be cut into stages that complete parameters one after another
    /// (not with shared layers: see the module's doc).
    pub fn stageable(&self) -> bool {
        !self.config().share_layers
    }

    /// The parameter name prefixes of each stage, in backward order (the order their
    /// gradients are complete in). Unstageable models have the same stages; all of them
    /// complete at the end of backward.
    pub fn stage_prefixes(&self) -> Vec<Vec<String>> {
        let layers = if self.config().share_layers { 1 } else { self.config().n_layer };
        let mut stages = vec![vec!["ln_f.".to_string(), "proj_out.".to_string()]];
        stages.extend((0..layers).rev().map(|l| vec![format!("h.{l}.")]));
        stages.push(vec!["wte".to_string(), "wpe".to_string(), "proj_in.".to_string()]);
        stages
    }

    /// `hidden`, keeping the stages for `Staged::backward`.
    pub fn hidden_staged(&self, idx: &Tensor, dropout: Option<&Dropout>) -> anyhow::Result<Staged> {
        let (_, t) = idx.size2().expect("token ids are [batch, time]");
        assert!(t as usize <= self.config().n_positions, "sequence of {t} exceeds n_positions {}", self.config().n_positions);
        let embedded = self.embed(idx, 0, dropout)?;
        let mut x = embedded.shallow_clone();
        let mut layers = Vec::with_capacity(self.config().n_layer);
        for layer in 0..self.config().n_layer {
            let input = x.detach().set_requires_grad(true);
            let output = self.block(layer).forward(&input, self.config().n_head as i64, dropout, layer)?;
            x = output.shallow_clone();
            layers.push((input, output));
        }
        let final_input = x.detach().set_requires_grad(true);
        let hidden = self.final_norm(&final_input);
        Ok(Staged { embedded, layers, final_input, hidden })
    }
}

impl Staged {
    /// Backward from `grad` (the gradient of `hidden`, same shape), one stage at a time;
    /// `done(i)` once stage `i` (backward order, as `stage_prefixes`) has its gradients.
    pub fn backward(self, grad: &Tensor, done: &mut dyn FnMut(usize)) {
        // d(Σ out · g)/d out = g: sends `g` back from `out`.
        let send = |out: &Tensor, g: &Tensor| (out * g).sum(Kind::Float).backward();
        send(&self.hidden, grad);
        done(0);
        let mut g = self.final_input.grad();
        let n = self.layers.len();
        for (i, (input, output)) in self.layers.iter().enumerate().rev() {
            send(output, &g);
            done(n - i);
            g = input.grad();
        }
        send(&self.embedded, &g);
        done(n + 1);
    }
}
