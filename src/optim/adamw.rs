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
        update(&params.values, &params.grads, &self.exp_avg, &self.exp_avg_sq, params.decay_len, &self.hyper(lr));
    }

    fn hyper(&self, lr: f64) -> AdamWHyper {
        AdamWHyper { lr, beta1: self.beta1, beta2: self.beta2, eps: self.eps, weight_decay: self.weight_decay, step: self.steps }
    }

    /// The step's update with clipping and the non-finite check folded in, on what the
    /// device holds: gradients are scaled by `clip_coef` (scalar tensor) in the same pass,
    /// and nothing changes when `skip` (scalar tensor, nonzero) is set. On CPU this is one
    /// fused pass over the flat buffers (fused_cpu); elsewhere libtorch operations with
    /// the scalars left on the device (no host read).
    pub fn step_guarded(&mut self, params: &mut FlatParams, lr: f64, clip_coef: &Tensor, skip: &Tensor) {
        if params.values.device() == tch::Device::Cpu {
            // On CPU the scalars are host memory: reading them costs nothing.
            let (coef, skipped) = (clip_coef.double_value(&[]), skip.double_value(&[]) != 0.0);
            if skipped {
                return;
            }
            self.steps += 1;
            fused_cpu(params, &self.exp_avg, &self.exp_avg_sq, &self.hyper(lr), coef as f32);
            return;
        }
        // Device path: the step counter advances on the host whether or not the device
        // skips (a skipped step is rare and its bias correction differs by one step).
        self.steps += 1;
        let h = self.hyper(lr);
        tch::no_grad(|| {
            let keep = skip.eq(0.0);
            let _ = params.grads.g_mul_(clip_coef);
            let (old_v, old_m, old_s) = (params.values.copy(), self.exp_avg.copy(), self.exp_avg_sq.copy());
            update(&params.values, &params.grads, &self.exp_avg, &self.exp_avg_sq, params.decay_len, &h);
            for (now, old) in [(&params.values, old_v), (&self.exp_avg, old_m), (&self.exp_avg_sq, old_s)] {
                let _ = now.shallow_clone().copy_(&now.where_self(&keep, &old));
            }
        });
    }
}

/// The flat update in one pass on the CPU, two threads, the same arithmetic in the same
/// order as `update` (to rounding: libtorch's vector kernels may fuse multiply-adds),
/// with the gradient multiplied by `clip_coef` as it is read.
fn fused_cpu(params: &FlatParams, exp_avg: &Tensor, exp_avg_sq: &Tensor, h: &AdamWHyper, clip_coef: f32) {
    let n = params.values.numel();
    for t in [&params.values, &params.grads, exp_avg, exp_avg_sq] {
        assert!(t.is_contiguous() && t.kind() == tch::Kind::Float && t.numel() == n, "fused AdamW needs contiguous fp32 buffers");
    }
    let t = h.step as i32;
    let decay = (1.0 - h.lr * h.weight_decay) as f32;
    let (b1w, b2, b2w) = ((1.0 - h.beta1) as f32, h.beta2 as f32, (1.0 - h.beta2) as f32);
    let sqrt_bc2 = (1.0 - h.beta2.powi(t)).sqrt() as f32;
    let neg_step = (-(h.lr / (1.0 - h.beta1.powi(t)))) as f32;
    let eps = h.eps as f32;
    let decay_len = if h.weight_decay != 0.0 { params.decay_len as usize } else { 0 };
    // SAFETY: four distinct contiguous fp32 buffers of n elements each, alive for the
    // call; the slices are split into disjoint halves for the two threads.
    let (p, g, m, v) = unsafe {
        (
            std::slice::from_raw_parts_mut(params.values.data_ptr() as *mut f32, n),
            std::slice::from_raw_parts(params.grads.data_ptr() as *const f32, n),
            std::slice::from_raw_parts_mut(exp_avg.data_ptr() as *mut f32, n),
            std::slice::from_raw_parts_mut(exp_avg_sq.data_ptr() as *mut f32, n),
        )
    };
    let run = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], first: usize| {
        for i in 0..p.len() {
            let grad = g[i] * clip_coef;
            let mut value = p[i];
            if first + i < decay_len {
                value *= decay;
            }
            // lerp(m, grad, 1 − β1) as libtorch computes it for weights below 0.5.
            let mi = m[i] + b1w * (grad - m[i]);
            let vi = v[i] * b2 + grad * (grad * b2w);
            let denom = vi.sqrt() / sqrt_bc2 + eps;
            p[i] = value + (mi * neg_step) / denom;
            m[i] = mi;
            v[i] = vi;
        }
    };
    let half = n / 2;
    let (p0, p1) = p.split_at_mut(half);
    let (g0, g1) = g.split_at(half);
    let (m0, m1) = m.split_at_mut(half);
    let (v0, v1) = v.split_at_mut(half);
    std::thread::scope(|s| {
        s.spawn(|| run(p0, g0, m0, v0, 0));
        run(p1, g1, m1, v1, half);
    });
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

/// On the device, without reads: the global gradient norm (fp32), the factor that clips
/// it to `max_norm` as torch.nn.utils.clip_grad_norm_ does (f64; 1 when `max_norm` is 0),
/// and 1 where the norm is not finite (fp32; a NaN or infinite gradient anywhere makes it so).
pub fn norm_clip_and_skip(grads: &Tensor, max_norm: f64) -> (Tensor, Tensor, Tensor) {
    tch::no_grad(|| {
        let norm = grads.norm();
        let coef = if max_norm > 0.0 {
            (Tensor::full([], max_norm, (tch::Kind::Double, norm.device())) / (norm.to_kind(tch::Kind::Double) + 1e-6)).clamp_max(1.0)
        } else {
            norm.ones_like().to_kind(tch::Kind::Double)
        };
        let skip = norm.isfinite().logical_not().to_kind(tch::Kind::Float);
        (norm, coef, skip)
    })
}
