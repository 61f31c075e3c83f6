//! One micro-batch's forward and backward under the training objective: the model up
//! to the head's input, then the fused classifier (model/classifier.rs) for the loss and
//! the head's gradient, then the backward through the model. Gradients land in the flat
//! fp32 buffer (through the bf16 copies in bf16, model/precision.rs).

use super::classifier;
use super::dropout::Dropout;
use super::flat::FlatParams;
use super::precision::Bf16Weights;
use super::Algpt2;
use tch::{Kind, Tensor};

/// How the objective is computed (from the config and the model).
#[derive(Debug, Clone, Copy)]
pub struct Objective {
    /// Real vocabulary rows of the head (the rest are padding).
    pub vocab: i64,
    /// `train.classifier_chunk_rows` (0: automatic).
    pub chunk_rows: usize,
    /// The loss is divided by this many micro-batches of a step.
    pub grad_accum_steps: usize,
}

impl Objective {
    /// Adds the gradient of (mean token loss / grad_accum_steps) into `params.grads`;
    /// returns the mean token loss, on the device.
    pub fn forward_backward(
        &self,
        model: &Algpt2,
        params: &mut FlatParams,
        bf16: Option<&mut Bf16Weights>,
        inputs: &Tensor,
        targets: &Tensor,
        dropout: Option<&Dropout>,
    ) -> Tensor {
        let hidden = model.hidden(inputs, dropout);
        let width = *hidden.size().last().expect("hidden is [batch, time, E]");
        let rows = hidden.view([-1, width]);
        let n = rows.size()[0];
        let compute = match &bf16 {
            Some(weights) => weights.buffer(),
            None => &params.values,
        };
        let head = params.padded(compute, "wte").expect("the model has a token table");
        let mut grad_head = params.padded(&params.grads, "wte").expect("the model has a token table");
        let chunk = classifier::chunk_rows(self.chunk_rows, head.size()[0]);
        let scale = 1.0 / (n as f64 * self.grad_accum_steps as f64);
        let out = classifier::forward_backward(&rows.detach(), &head, self.vocab, &targets.reshape([-1]), scale, &mut grad_head, chunk);
        // Sends the rows' gradient back through the model: d(Σ rows · g)/d rows = g.
        (&rows * out.grad_hidden).sum(Kind::Float).backward();
        if let Some(weights) = bf16 {
            weights.flush_grads(params);
        }
        out.loss_sum / n as f64
    }
}
