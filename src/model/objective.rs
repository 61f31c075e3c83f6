//! One micro-batch's forward and backward under the training objective: the model up
//! to the head's input, then the fused classifier (model/classifier.rs) for the loss and
//! the head's gradient, then the backward through the model. Gradients land in the flat
//! fp32 buffer (through the bf16 copies in bf16, model/precision.rs).

use super::classifier;
use super::dropout::Dropout;
use super::flat::FlatParams;
use super::precision::Bf16Weights;
use super::stages::{stage_of, Staged};
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
    /// The forward and the fused classifier, which already adds the head's gradient into
    /// `params.grads`; the backward through the model is `Forwarded::backward`. `staged`:
    /// cut the backward into stages that complete parameters one after another (when
    /// the model allows it; in bf16 each stage's gradients are flushed into the fp32
    /// buffer as it completes them). Fails, before anything is added to the gradients,
    /// where making a dropout mask does (on a GPU).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        model: &Algpt2,
        params: &FlatParams,
        bf16: Option<&Bf16Weights>,
        inputs: &Tensor,
        targets: &Tensor,
        dropout: Option<&Dropout>,
        staged: bool,
    ) -> anyhow::Result<Forwarded> {
        let (hidden, stages) = if staged && model.stageable() {
            let s = model.hidden_staged(inputs, dropout)?;
            (s.hidden.shallow_clone(), Some((s, stage_runs(model, params))))
        } else {
            (model.hidden(inputs, dropout)?, None)
        };
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
        Ok(Forwarded { rows, stages, grad_rows: out.grad_hidden, loss: out.loss_sum / n as f64, stage_count: model.stage_prefixes().len() })
    }
}

/// The (offset, elements) runs of the flat buffer each stage completes, backward order.
type StageRuns = Vec<Vec<(i64, i64)>>;

fn stage_runs(model: &Algpt2, params: &FlatParams) -> StageRuns {
    let prefixes = model.stage_prefixes();
    let mut runs = vec![Vec::new(); prefixes.len()];
    for slot in &params.slots {
        runs[stage_of(&slot.name, &prefixes)].push((slot.offset, slot.reserved));
    }
    runs
}

/// A micro-batch after its forward: the loss, and the backward still to run.
pub struct Forwarded {
    rows: Tensor,
    /// The staged forward, and the runs of the flat buffer each stage completes.
    stages: Option<(Staged, StageRuns)>,
    grad_rows: Tensor,
    /// The mean token loss, on the device.
    pub loss: Tensor,
    stage_count: usize,
}

impl Forwarded {
    /// The backward through the model; `done(i)` once stage `i` (`Algpt2::stage_prefixes`,
    /// backward order) has all its gradients in `params.grads`, every stage once, in
    /// order (all at the end when the forward was not staged).
    pub fn backward(self, params: &mut FlatParams, mut bf16: Option<&mut Bf16Weights>, done: &mut dyn FnMut(usize)) {
        match self.stages {
            Some((stages, runs)) => {
                let grad = self.grad_rows.view(stages.hidden.size().as_slice());
                stages.backward(&grad, &mut |stage| {
                    if let Some(weights) = bf16.as_deref_mut() {
                        weights.flush_grad_runs(params, &runs[stage]);
                    }
                    done(stage)
                });
            }
            None => {
                // Sends the rows' gradient back through the model: d(Σ rows · g)/d rows = g.
                (&self.rows * &self.grad_rows).sum(Kind::Float).backward();
                if let Some(weights) = bf16 {
                    weights.flush_grads(params);
                }
                (0..self.stage_count).for_each(done);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use tch::nn::VarStore;
    use tch::Device;

    /// The flat gradients after `micro` micro-steps, the last one staged or not, computed
    /// in bf16 or fp32, and the order in which the stages said they were done.
    fn gradients(share_layers: bool, embedding_size: Option<usize>, micro: usize, staged: bool, bf16: bool) -> (Vec<f32>, Vec<usize>) {
        let cfg = ModelConfig { dropout: 0.1, ..crate::model::gpt::tests::tiny(share_layers, embedding_size) };
        // Weights and batches from a generator of this test's own: libtorch's global one
        // is shared with the tests running beside it, which could draw from it between
        // this function's two calls and give them different weights.
        let mut rng = crate::rng::SplitMix64::new(3);
        let vs = VarStore::new(Device::Cpu);
        let mut model = Algpt2::new(&vs.root(), &cfg);
        let mut params = FlatParams::new(&vs);
        let init: Vec<f32> = (0..params.values.numel()).map(|_| (rng.below(1 << 20) as f32 / (1 << 20) as f32 - 0.5) * 0.04).collect();
        tch::no_grad(|| {
            let _ = params.values.copy_(&Tensor::from_slice(&init));
        });
        let mut weights = bf16.then(|| Bf16Weights::new(&params));
        if let Some(w) = &weights {
            model.use_compute_weights(&|name| w.get(name));
        }
        let objective = Objective { vocab: 61, chunk_rows: 0, grad_accum_steps: micro };
        let mut order = Vec::new();
        for m in 0..micro {
            let mut tokens = || Tensor::from_slice(&(0..32).map(|_| rng.below(61) as i64).collect::<Vec<_>>()).view([2, 16]);
            let (inputs, targets) = (tokens(), tokens());
            let dropout = Dropout::new(0.1, 7, 0, m, 0);
            let last = m + 1 == micro;
            let f = objective.forward(&model, &params, weights.as_ref(), &inputs, &targets, Some(&dropout), staged && last).unwrap();
            f.backward(&mut params, weights.as_mut(), &mut |i| {
                if last {
                    order.push(i)
                }
            });
        }
        (Vec::<f32>::try_from(&params.grads).unwrap(), order)
    }

    #[test]
    fn a_staged_backward_gives_the_same_gradients_bit_for_bit_stage_by_stage() {
        for (share, e, bf16) in
            [(false, None, false), (false, Some(8), false), (true, Some(8), false), (false, None, true), (false, Some(8), true)]
        {
            for micro in [1, 2] {
                let (whole, whole_order) = gradients(share, e, micro, false, bf16);
                let (staged, staged_order) = gradients(share, e, micro, true, bf16);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&whole), bits(&staged), "share {share}, embedding {e:?}, bf16 {bf16}, {micro} micro-steps");
                let stages = if share { 3 } else { 5 };
                assert_eq!(whole_order, (0..stages).collect::<Vec<_>>());
                assert_eq!(staged_order, whole_order);
                assert!(whole.iter().any(|g| *g != 0.0));
            }
        }
    }

    /// A dropout mask that fails (as one made on a GPU can) makes the forward an error
    /// naming the site, staged or not, with nothing added to the gradients: no panic.
    #[test]
    fn a_failing_dropout_mask_is_an_error_of_the_forward() {
        use crate::model::dropout::{site, tests::with_failing_mask};
        let cfg = ModelConfig { dropout: 0.1, ..crate::model::gpt::tests::tiny(false, None) };
        let vs = VarStore::new(Device::Cpu);
        let model = Algpt2::new(&vs.root(), &cfg);
        let mut params = FlatParams::new(&vs);
        let objective = Objective { vocab: 61, chunk_rows: 0, grad_accum_steps: 1 };
        let tokens = Tensor::from_slice(&(0..32).map(|i| i % 61).collect::<Vec<i64>>()).view([2, 16]);
        let dropout = Dropout::new(0.1, 7, 0, 0, 0);
        for (failing, staged) in [(site::mlp_out(1), false), (site::attention_probs(2), true), (site::EMBEDDING, true)] {
            let forwarded =
                with_failing_mask(failing, || objective.forward(&model, &params, None, &tokens, &tokens, Some(&dropout), staged));
            let text = format!("{:#}", forwarded.err().expect("the forward fails with its mask"));
            assert!(text.contains(&site::describe(failing)) && text.contains("injected mask failure"), "{text}");
            assert_eq!(params.grads.abs().sum(Kind::Float).double_value(&[]), 0.0, "gradients were added");
        }
        // Without the failure the same forward goes through.
        let forwarded = objective.forward(&model, &params, None, &tokens, &tokens, Some(&dropout), false).unwrap();
        let loss = forwarded.loss.shallow_clone();
        forwarded.backward(&mut params, None, &mut |_| {});
        assert!(loss.double_value(&[]).is_finite());
        assert!(params.grads.abs().sum(Kind::Float).double_value(&[]) > 0.0, "the backward added no gradient");
    }
}
