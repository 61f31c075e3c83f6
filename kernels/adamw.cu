// Fused AdamW over the flat buffers (src/model/flat.rs layout): one launch updates every
// parameter. Elements [0, decay_len) get decoupled weight decay (matrices, embeddings);
// the rest (biases, LayerNorm gains) do not. The arithmetic follows torch.optim.AdamW's
// single-tensor path, as the CPU implementation (src/optim/adamw.rs) does:
//   p *= 1 - lr*wd;  m = lerp(m, g, 1-b1);  v = b2*v + (1-b2)*g*g;
//   p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
// Grid-stride loop: any grid size covers any n.
extern "C" __global__ void adamw_step(float* __restrict__ params, const float* __restrict__ grads,
                                      float* __restrict__ exp_avg, float* __restrict__ exp_avg_sq,
                                      long long n, long long decay_len, float lr, float beta1,
                                      float beta2, float eps, float weight_decay,
                                      float bias_correction1, float bias_correction2_sqrt) {
    const float step_size = lr / bias_correction1;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float g = grads[i];
        float p = params[i];
        if (i < decay_len) p *= 1.0f - lr * weight_decay;
        float m = exp_avg[i];
        m = m + (1.0f - beta1) * (g - m);
        float v = beta2 * exp_avg_sq[i] + (1.0f - beta2) * g * g;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        params[i] = p - step_size * m / (sqrtf(v) / bias_correction2_sqrt + eps);
    }
}
