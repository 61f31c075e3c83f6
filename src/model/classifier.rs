//! The loss: the tied head, log-softmax, cross-entropy and their gradient, fused and in
//! chunks of rows (as llm.c's fused classifier and Liger's fused linear cross-entropy),
//! so that the logits of the whole batch never exist at once, in fp32 or otherwise.
//!
//! For each chunk: logits = hidden · headᵀ in the compute type, then fp32 log-softmax
//! statistics, the chunk's loss, and dlogits = softmax − onehot(target) scaled by
//! `grad_scale`; from it the gradient of the hidden rows (dlogits · head) and of the head
//! (dlogitsᵀ · hidden, accumulated in fp32). The caller sends the hidden gradient back
//! through the model. Padding rows of the head (vocabulary padding) get logit −∞: no
//! probability, no gradient.

use tch::{Kind, Tensor};

/// Elements of fp32 logits formed at a time when no chunk size is configured (32 MB).
const CHUNK_ELEMENTS: i64 = 8 << 20;

pub struct Classified {
    /// Sum of the rows' cross-entropies, fp32, on the device (not read here).
    pub loss_sum: Tensor,
    /// d(grad_scale · loss_sum)/d(hidden), in the hidden rows' type.
    pub grad_hidden: Tensor,
}

/// Rows per chunk: `configured`, or about 32 MB of fp32 logits.
pub fn chunk_rows(configured: usize, padded_vocab: i64) -> i64 {
    if configured > 0 {
        configured as i64
    } else {
        (CHUNK_ELEMENTS / padded_vocab.max(1)).max(16)
    }
}

/// Loss and gradients of `hidden` [N, E] (no graph needed) under the head `head`
/// [V_padded, E] whose first `vocab` rows are real, for `targets` [N]. `grad_head`
/// [V_padded, E] (fp32) receives `grad_scale` · d(loss_sum)/d(head), added to what it holds.
pub fn forward_backward(
    hidden: &Tensor,
    head: &Tensor,
    vocab: i64,
    targets: &Tensor,
    grad_scale: f64,
    grad_head: &mut Tensor,
    chunk: i64,
) -> Classified {
    tch::no_grad(|| {
        let (n, _) = hidden.size2().expect("hidden rows are [N, E]");
        let padded = head.size()[0];
        let hidden = hidden.to_kind(head.kind());
        let grad_hidden = hidden.zeros_like();
        let mut loss_sum = Tensor::zeros([], (Kind::Float, hidden.device()));
        let fp32 = head.kind() == Kind::Float;
        let mut start = 0;
        while start < n {
            let rows = chunk.min(n - start);
            let h = hidden.narrow(0, start, rows);
            let t = targets.narrow(0, start, rows).unsqueeze(1);
            let mut logits = h.matmul(&head.tr()).to_kind(Kind::Float);
            if padded > vocab {
                let _ = logits.narrow(1, vocab, padded - vocab).fill_(f64::NEG_INFINITY);
            }
            let lse = logits.logsumexp([1], true);
            let target_logits = logits.gather(1, &t, false);
            loss_sum += (&lse - target_logits).sum(Kind::Float);
            // logits become dlogits in place: softmax − onehot, times grad_scale.
            let _ = logits.g_sub_(&lse).exp_();
            let minus_one = Tensor::full([rows, 1], -1.0, (Kind::Float, logits.device()));
            let _ = logits.scatter_add_(1, &t, &minus_one);
            let _ = logits.g_mul_scalar_(grad_scale);
            let d = if fp32 { logits } else { logits.to_kind(head.kind()) };
            grad_hidden.narrow(0, start, rows).copy_(&d.matmul(head));
            if fp32 {
                let _ = grad_head.addmm_(&d.tr(), &h);
            } else {
                let _ = grad_head.g_add_(&d.tr().matmul(&h));
            }
            start += rows;
        }
        Classified { loss_sum, grad_hidden }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Against autograd through the unfused head and cross-entropy, with padding rows and
    /// chunks that do not divide the rows.
    #[test]
    fn matches_autograd_of_the_unfused_loss() {
        tch::manual_seed(1);
        let (n, e, v, padded) = (37, 8, 29, 64);
        let hidden = Tensor::randn([n, e], (Kind::Float, Device::Cpu));
        let real = Tensor::randn([v, e], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let targets = Tensor::randint(v, [n], (Kind::Int64, Device::Cpu));
        let h = hidden.shallow_clone().set_requires_grad(true);
        let reference = h.matmul(&real.tr()).cross_entropy_for_logits(&targets);
        reference.backward();

        let head = Tensor::cat(&[real.detach(), Tensor::zeros([padded - v, e], (Kind::Float, Device::Cpu))], 0);
        let mut grad_head = head.zeros_like();
        for chunk in [5, 16, 1000] {
            let _ = grad_head.zero_();
            let out = forward_backward(&hidden, &head, v, &targets, 1.0 / n as f64, &mut grad_head, chunk);
            let loss = out.loss_sum.double_value(&[]) / n as f64;
            assert!((loss - reference.double_value(&[])).abs() < 1e-5, "chunk {chunk}: {loss}");
            assert!((&out.grad_hidden - h.grad()).abs().max().double_value(&[]) < 1e-6, "chunk {chunk}");
            assert!((grad_head.narrow(0, 0, v) - real.grad()).abs().max().double_value(&[]) < 1e-6, "chunk {chunk}");
            assert_eq!(grad_head.narrow(0, v, padded - v).abs().max().double_value(&[]), 0.0, "padding rows got gradient");
        }
    }
}
