//! libtorch's fused AdamW (`at::_fused_adamw_`) through src/optim/fused_adamw.cpp: tch
//! leaves every `_fused_adam*` operator out of its bindings.

use anyhow::bail;
use std::ffi::{c_char, c_int, CStr};
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn algpt2_fused_adamw(
        param: *const C_tensor,
        grad: *const C_tensor,
        exp_avg: *const C_tensor,
        exp_avg_sq: *const C_tensor,
        step: *const C_tensor,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        grad_scale: *const C_tensor,
        found_inf: *const C_tensor,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
}

/// The scalars of one fused update.
#[derive(Debug, Clone, Copy)]
pub struct FusedHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// The buffers of one fused update, all on one device: `param`, `grad`, `exp_avg` and
/// `exp_avg_sq` alike in shape and kind; `step` one f32 holding the 1-based step of this
/// update (read, not advanced); `grad_scale` one f32 the gradient is divided by (and the
/// gradient stored back so divided); `found_inf` one f32 which, when 1, leaves every
/// buffer untouched. Nothing is read by the host.
pub struct FusedBuffers<'a> {
    pub param: &'a Tensor,
    pub grad: &'a Tensor,
    pub exp_avg: &'a Tensor,
    pub exp_avg_sq: &'a Tensor,
    pub step: &'a Tensor,
    pub grad_scale: Option<&'a Tensor>,
    pub found_inf: Option<&'a Tensor>,
}

/// One AdamW update in place by libtorch's fused kernel for the buffers' device.
pub fn fused_adamw_(b: &FusedBuffers, h: &FusedHyper) -> anyhow::Result<()> {
    // libtorch's CPU kernel trusts the buffers' lengths.
    for (t, what) in [(b.grad, "grad"), (b.exp_avg, "exp_avg"), (b.exp_avg_sq, "exp_avg_sq")] {
        if t.size() != b.param.size() || t.device() != b.param.device() || !t.is_contiguous() {
            bail!(
                "fused AdamW: {what} is {:?} on {:?}, the parameters {:?} on {:?}",
                t.size(),
                t.device(),
                b.param.size(),
                b.param.device()
            );
        }
    }
    if !b.param.is_contiguous() {
        bail!("fused AdamW: the parameters are not contiguous");
    }
    for (t, what) in [(Some(b.step), "step"), (b.grad_scale, "grad_scale"), (b.found_inf, "found_inf")] {
        if let Some(t) = t {
            if t.kind() != Kind::Float || t.numel() != 1 {
                bail!("fused AdamW: {what} must be one f32 value, got {:?} of {:?}", t.kind(), t.size());
            }
        }
    }
    let optional = |t: Option<&Tensor>| t.map_or(std::ptr::null(), |t| t.as_ptr());
    let mut error = [0 as c_char; 1024];
    // SAFETY: every pointer is a live tch tensor (an at::Tensor) borrowed for the call, or
    // null where the C++ side takes an absent optional; `error` is writable for its length.
    let status = unsafe {
        algpt2_fused_adamw(
            b.param.as_ptr(),
            b.grad.as_ptr(),
            b.exp_avg.as_ptr(),
            b.exp_avg_sq.as_ptr(),
            b.step.as_ptr(),
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
            optional(b.grad_scale),
            optional(b.found_inf),
            error.as_mut_ptr(),
            error.len(),
        )
    };
    if status != 0 {
        // SAFETY: the C++ side NUL-terminates what it writes within the buffer.
        let message = unsafe { CStr::from_ptr(error.as_ptr()) }.to_string_lossy().into_owned();
        bail!("libtorch's fused AdamW: {message}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn buffers(n: i64) -> [Tensor; 4] {
        let o = (Kind::Float, Device::Cpu);
        [Tensor::randn([n], o), Tensor::randn([n], o), Tensor::zeros([n], o), Tensor::zeros([n], o)]
    }

    const H: FusedHyper = FusedHyper { lr: 1e-3, beta1: 0.9, beta2: 0.95, weight_decay: 0.1, eps: 1e-8 };

    /// An exception of libtorch's (integer buffers) comes back as an error with its message.
    #[test]
    fn libtorch_errors_come_back_as_errors() {
        let ints: Vec<Tensor> = (0..4).map(|_| Tensor::zeros([8], (Kind::Int64, Device::Cpu))).collect();
        let step = Tensor::from(1.0f32);
        let b = FusedBuffers {
            param: &ints[0],
            grad: &ints[1],
            exp_avg: &ints[2],
            exp_avg_sq: &ints[3],
            step: &step,
            grad_scale: None,
            found_inf: None,
        };
        let e = fused_adamw_(&b, &H).unwrap_err().to_string();
        assert!(e.starts_with("libtorch's fused AdamW: ") && e.contains("Long"), "{e}");
    }

    #[test]
    fn mismatched_buffers_and_scalars_are_refused() {
        let [p, g, m, v] = buffers(8);
        let (short, step, wide) = (Tensor::zeros([4], (Kind::Float, Device::Cpu)), Tensor::from(1.0f32), Tensor::from(1.0f64));
        let b = FusedBuffers { param: &p, grad: &g, exp_avg: &m, exp_avg_sq: &short, step: &step, grad_scale: None, found_inf: None };
        assert!(fused_adamw_(&b, &H).unwrap_err().to_string().contains("exp_avg_sq is [4]"));
        let b = FusedBuffers { param: &p, grad: &g, exp_avg: &m, exp_avg_sq: &v, step: &wide, grad_scale: None, found_inf: None };
        assert!(fused_adamw_(&b, &H).unwrap_err().to_string().contains("step must be one f32"));
    }

    /// found_inf = 1 leaves every buffer as it was, the gradient included.
    #[test]
    fn found_inf_writes_nothing() {
        let [p, g, m, v] = buffers(8);
        let before: Vec<Tensor> = [&p, &g, &m, &v].iter().map(|t| t.copy()).collect();
        let (step, scale, inf) = (Tensor::from(1.0f32), Tensor::from(2.0f32), Tensor::from(1.0f32));
        let b =
            FusedBuffers { param: &p, grad: &g, exp_avg: &m, exp_avg_sq: &v, step: &step, grad_scale: Some(&scale), found_inf: Some(&inf) };
        fused_adamw_(&b, &H).unwrap();
        for (now, was) in [&p, &g, &m, &v].iter().zip(&before) {
            assert!(now.equal(was));
        }
    }
}
