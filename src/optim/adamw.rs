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
        let t = self.steps as i32;
        tch::no_grad(|| {
            if self.weight_decay != 0.0 {
                let _ = params.values.narrow(0, 0, params.decay_len).g_mul_scalar_(1.0 - lr * self.weight_decay);
            }
            let _ = self.exp_avg.lerp_(&params.grads, 1.0 - self.beta1);
            let _ = self.exp_avg_sq.g_mul_scalar_(self.beta2).addcmul_(&params.grads, &(params.grads.g_mul_scalar(1.0 - self.beta2)));
            let bias_correction1 = 1.0 - self.beta1.powi(t);
            let bias_correction2 = 1.0 - self.beta2.powi(t);
            let step_size = lr / bias_correction1;
            let denom = (self.exp_avg_sq.sqrt() / bias_correction2.sqrt()).g_add_scalar_(self.eps);
            let _ = params.values.addcdiv_(&(self.exp_avg.g_mul_scalar(-step_size)), &denom);
        });
    }
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
