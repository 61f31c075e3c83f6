// Dropout masks from the counter-based generator of src/model/dropout.rs, bit for bit:
// group g of four elements takes SplitMix64's output at key + g·φ (φ = 0x9E37...7C15);
// lane l keeps its element when bits [16l, 16l + 16) are >= threshold. Kept elements
// get `scale`, dropped ones 0. No generator state, so any element can be made anywhere.
extern "C" __global__ void dropout_mask(float* __restrict__ out, long long n, unsigned long long key,
                                        unsigned int threshold, float scale) {
    long long groups = (n + 3) / 4;
    for (long long g = blockIdx.x * (long long)blockDim.x + threadIdx.x; g < groups;
         g += (long long)gridDim.x * blockDim.x) {
        unsigned long long z = key + (unsigned long long)g * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        for (int lane = 0; lane < 4; ++lane) {
            long long i = g * 4 + lane;
            if (i < n) {
                unsigned int u = (unsigned int)((z >> (16 * lane)) & 0xFFFFull);
                out[i] = u >= threshold ? scale : 0.0f;
            }
        }
    }
}
