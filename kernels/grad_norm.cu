// Global gradient norm and the non-finite check in one pass over the flat gradient
// buffer: each block sums g*g in double and counts NaN/Inf, then one atomic per block
// adds into out_sum_sq[0] and out_nonfinite[0] (both zeroed by the caller). The host
// takes sqrt(sum_sq); clipping then scales the buffer (the CPU path is
// src/optim/adamw.rs: clip_grad_norm and grads_are_finite).
extern "C" __global__ void grad_norm_sq(const float* __restrict__ grads, long long n,
                                        double* __restrict__ out_sum_sq,
                                        unsigned long long* __restrict__ out_nonfinite) {
    extern __shared__ double partial[];
    __shared__ unsigned int bad;
    if (threadIdx.x == 0) bad = 0;
    __syncthreads();
    double sum = 0.0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float g = grads[i];
        if (!isfinite(g)) atomicAdd(&bad, 1u);
        sum += (double)g * (double)g;
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        atomicAdd(out_sum_sq, partial[0]);
        if (bad) atomicAdd(out_nonfinite, (unsigned long long)bad);
    }
}
