// Weight initialisation on the device: `--load-format dummy` fills tensors with random values here, so an
// 8B-shaped model needs no host-side generation or copies (the CPU's dummy weights differ; dummy weights
// are for speed, not for comparing outputs).
//
// fill_uniform_T(T* x, long long n, unsigned long long seed, float lo, float hi)
//   grid = (min(ceil(n / 256), 65535)), block = 256; grid-stride loop.

__device__ __forceinline__ unsigned long long init_mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

template <typename T>
__device__ void fill_uniform_impl(T* x, long long n, unsigned long long seed, float lo, float hi) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        unsigned long long r = init_mix64(seed + 0x9e3779b97f4a7c15ull * (unsigned long long)(i + 1));
        float u = (float)(r >> 40) * (1.0f / 16777216.0f);
        store_f(x + i, lo + (hi - lo) * u);
    }
}

#define FILL_UNIFORM(T, S)                                                                                \
    extern "C" __global__ void fill_uniform_##S(T* x, long long n, unsigned long long seed, float lo, float hi) { \
        fill_uniform_impl<T>(x, n, seed, lo, hi);                                                            \
    }
IRONLLM_FOR_EACH_DTYPE(FILL_UNIFORM)
