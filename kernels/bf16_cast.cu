// For the bf16 gradient all-reduce (dist.grad_dtype: bf16): the fp32 gradient buffer is
// rounded to bf16 (round to nearest even) before the exchange, and the exchanged bf16
// values are accumulated back into fp32 after it.
#include <cuda_bf16.h>

extern "C" __global__ void f32_to_bf16(const float* __restrict__ src, __nv_bfloat16* __restrict__ dst,
                                       long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        dst[i] = __float2bfloat16_rn(src[i]);
    }
}

extern "C" __global__ void bf16_to_f32_scaled(const __nv_bfloat16* __restrict__ src,
                                              float* __restrict__ dst, long long n, float scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        dst[i] = __bfloat162float(src[i]) * scale;
    }
}
