//! AdamW (decoupled weight decay) over the flat parameter buffer, written out because tch
//! cannot save or restore its own optimizer state. The arithmetic follows
//! torch.optim.AdamW's single-tensor path step for step, so the two agree to rounding.

use crate::config::OptimConfig;
use crate::model::flat::FlatParams;
use tch::Tensor;

pub struct AdamW {
    /// First moment, same layout as the flat parameters.
    pub exp_avg: Tensor,
    /// Second moment.
    pub exp_avg_sq: Tensor,
    /// Steps taken so far (bias correction uses step + 1 for the next one).
    pub steps: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    pub fn new(params: &FlatParams, o: &OptimConfig) -> AdamW {
        AdamW {
            exp_avg: params.values.zeros_like(),
            exp_avg_sq: params.values.zeros_like(),
            steps: 0,
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
        }
    }

    /// One update of every parameter from `params.grads` at learning rate `lr`.
    pub fn step(&mut self, params: &mut FlatParams, lr: f64) {
        self.steps += 1;
        let h = AdamWHyper { lr, beta1: self.beta1, beta2: self.beta2, eps: self.eps, weight_decay: self.weight_decay, step: self.steps };
        update(&params.values, &params.grads, &self.exp_avg, &self.exp_avg_sq, params.decay_len, &h);
    }
}

/// The hyper-parameters of one AdamW update; `step` is 1-based (bias correction).
#[derive(Debug, Clone, Copy)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u64,
}

/// The libtorch AdamW update of flat buffers on any device, in place; `values[..decay_len]`
/// get weight decay. The fused CUDA kernel (kernels/adamw.cu) is checked against this.
pub fn update(values: &Tensor, grads: &Tensor, exp_avg: &Tensor, exp_avg_sq: &Tensor, decay_len: i64, h: &AdamWHyper) {
    let t = h.step as i32;
    tch::no_grad(|| {
        if h.weight_decay != 0.0 {
            let _ = values.narrow(0, 0, decay_len).g_mul_scalar_(1.0 - h.lr * h.weight_decay);
        }
        let _ = exp_avg.shallow_clone().lerp_(grads, 1.0 - h.beta1);
        let _ = exp_avg_sq.shallow_clone().g_mul_scalar_(h.beta2).addcmul_(grads, &(grads.g_mul_scalar(1.0 - h.beta2)));
        let bias_correction1 = 1.0 - h.beta1.powi(t);
        let bias_correction2 = 1.0 - h.beta2.powi(t);
        let step_size = h.lr / bias_correction1;
        let denom = (exp_avg_sq.sqrt() / bias_correction2.sqrt()).g_add_scalar_(h.eps);
        let _ = values.shallow_clone().addcdiv_(&(exp_avg.g_mul_scalar(-step_size)), &denom);
    });
}

/// Scales the gradients so their global L2 norm is at most `max_norm` (0: no clipping),
/// as torch.nn.utils.clip_grad_norm_ does; returns the norm before clipping.
pub fn clip_grad_norm(params: &mut FlatParams, max_norm: f64) -> f64 {
    let norm = params.grads.norm().double_value(&[]);
    if max_norm > 0.0 {
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        let _ = params.grads.g_mul_scalar_(coef);
    }
    norm
}

/// False when any gradient is NaN or infinite.
pub fn grads_are_finite(params: &FlatParams) -> bool {
    params.grads.isfinite().all().int64_value(&[]) == 1
}
