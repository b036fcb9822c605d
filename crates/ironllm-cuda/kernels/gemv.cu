// Skinny GEMM for decode steps of a few sequences (bf16/f16): y[m, n] = sum_k x[m, k] * w[n, k] for
// m < M <= GEMV_MAX_M, with w row-major [n, k] (a linear layer's weight) and x, y row-major.
//
// extern "C" gemv_T(T* y, const T* x, const T* w, int m, int n, int k), and gemv_T_f32 with a float y
// (the LM head's logits); gemv_swiglu_T (gate/up with SiLU-and-mul), and the fused forms at the end of
// the file: the input norm in the prologue (gemv_norm_T, gemv_swiglu_norm_T), the residual add in the
// epilogue (gemv_acc_T).
//   grid = (ceil(n / (GEMV_WARPS * rows))), block = GEMV_WARPS * 32, rows = GEMV_ROWS_M1 for m = 1 and
//   GEMV_ROWS otherwise; k % 8 == 0, rows 16-byte aligned.
//
// A decode step at batch 1-4 is a pass over the weights, and cuBLAS's kernels for these shapes stream
// them at about 70% of the card's copy rate. Here each warp owns one or two output columns and walks their
// weight rows with 16-byte loads, several in flight per lane (the unrolled loop), multiplying each 8-element
// chunk with the same chunk of every x row (x is small and stays in L1/L2); partial sums stay in f32 per
// lane and are reduced across the warp at the end, then rounded once to T. The summation order depends only
// on k, never on m or n, but differs from cuBLAS's, so bf16/f16 outputs of this path and cuBLAS's may
// differ in the last bit (bf16/f16 are not batch-invariant on the GPU in any case).
// The host uses it for m <= 2 only (see ops::GEMV_MAX_M for the measurement); m = 3, 4 are tested too.
//
// On Hopper the host launches it as a programmatic dependent (see pdl_wait in common.cuh): the weights
// never depend on earlier kernels, so each warp first asks L2 for the start of its rows (whole rows of
// small weights, GEMV_PREFETCH; the first 512 bytes of larger ones, GEMV_PREFETCH_LARGE: see there) and
// only then waits for the kernel that writes x.

// The tuning knobs can be overridden with -D for the measurement in bench/gpu_gemv_bw.py; the runtime
// uses these values (the host's grid arithmetic assumes GEMV_WARPS * GEMV_ROWS rows per block).
// Measured on an H100 (bench/gpu_gemv_bw.py, 2026-11-27): at m = 1 one row per warp and 8 chunks in flight
// per lane stream the 8B step's weights in 5.35 ms against 5.52 ms for two rows and 4 chunks (the QKV and
// O projections gain most: more warps for their few thousand rows); at m = 2 two rows per warp are better.
#ifndef GEMV_WARPS
#define GEMV_WARPS 8
#endif
#ifndef GEMV_ROWS_M1
#define GEMV_ROWS_M1 1
#endif
#ifndef GEMV_ROWS
#define GEMV_ROWS 2
#endif
#define GEMV_MAX_M 4
// 16-byte chunks per lane and row prefetched into L2 before the wait (8 chunks: 4 KB of weights per warp),
// for weights of at most GEMV_PREFETCH_MAX_MB (larger ones: GEMV_PREFETCH_LARGE below). Measured on H200s (2026-11-28, GPU-only decode graph
// replays, bench/results/gpu-2026-11-28-h200-session16): the SmolLM2-135M shape's batch-1 step takes
// 0.62 ms with the prefetch against 0.70 ms without (its layers' weights are 1-4 MB: the hint pulls whole
// matrices into L2 while the kernel before runs); for the 8B shape (weights of 34-235 MB) the prefetch
// cost time (4.64 against 4.31 ms a step, an earlier H200), and with this rule alone its step was that of
// no prefetch (4.28 ms both). Loading the first chunks into registers before the wait instead was no better
// for the small shape and worse for the 8B one (4.47 ms). Weights between 4 and 34 MB were not measured;
// 16 MB stays well under the L2 of the cards in use (50 MB).
#ifndef GEMV_PREFETCH
#define GEMV_PREFETCH 8
#endif
#ifndef GEMV_PREFETCH_MAX_MB
#define GEMV_PREFETCH_MAX_MB 16
#endif
// Chunks per lane and row prefetched for larger weights: the first 512 bytes of each row, so a kernel's
// first loads find L2 ready while the weights stay mostly in memory. Measured on an H200 (2026-11-28,
// GPU-only decode graph replays at context 1024, two rounds, bench/results/gpu-2026-11-28-h200-session17):
// the 8B batch-1 step 4.248 / 4.247 ms against 4.282 ms with none (batch 2 4.441 against 4.473); two chunks
// 4.287 / 4.291 ms, and two chunks for weights of up to 64 MB only 4.265 ms.
#ifndef GEMV_PREFETCH_LARGE
#define GEMV_PREFETCH_LARGE 1
#endif
// Resident blocks per SM the register allocation must allow: 32 warps (64 registers a thread), what the
// kernel had without the prefetch (whose bookkeeping costs 8 registers more, one block less per SM) and
// what the 8B shape's decode step was measured fastest with.
#define GEMV_MIN_BLOCKS (32 / GEMV_WARPS)
// Iterations of the chunk loop unrolled, so rows * GEMV_UNROLL loads per lane are in flight.
#ifndef GEMV_UNROLL
#define GEMV_UNROLL 8
#endif

// The NORM forms' prologue: out[j] = rms_norm(x[j]) * norm_w for the block's M rows of k elements, in
// shared memory, with rms_norm_row's arithmetic and summation order (layers.cu: the block's 256 threads
// strided over 16-byte chunks, then block_sum), so the GEMM sees exactly the rows that kernel writes.
// Every block recomputes it (the rows are a few KB in L2), and no block loads weights meanwhile: see
// ops::gemv_norm_takes for where that pays.
// Rows of up to GEMV_NORM_REG_PACKS 16-byte chunks a thread (4096 bf16/f16 elements) keep their chunks in
// registers between the two passes, and the norm weight's are loaded before the programmatic-launch wait
// (gemv_impl), as layers.cu's norm kernel does; RMS_NORM_REGS=0 (IRONLLM_KERNEL_DEFINES) re-reads both.
#ifndef RMS_NORM_REGS
#define RMS_NORM_REGS 1
#endif
#define GEMV_NORM_REG_PACKS 2
__device__ __forceinline__ bool gemv_norm_regs(int chunks) {
    return RMS_NORM_REGS && chunks <= GEMV_NORM_REG_PACKS * (int)blockDim.x;
}
template <typename T, int M>
__device__ __forceinline__ void gemv_normed_rows(uint4* out, const uint4* __restrict__ x, const uint4* __restrict__ norm_w,
                                                 const uint4 (&gp)[GEMV_NORM_REG_PACKS], int chunks, int k,
                                                 float eps) {
    __shared__ float scratch[32];
    if (gemv_norm_regs(chunks)) {
        uint4 xp[M][GEMV_NORM_REG_PACKS];
#pragma unroll
        for (int j = 0; j < M; ++j)
#pragma unroll
            for (int u = 0; u < GEMV_NORM_REG_PACKS; ++u) {
                const int c = threadIdx.x + u * blockDim.x;
                if (c < chunks) xp[j][u] = x[(long long)j * chunks + c];
            }
#pragma unroll
        for (int j = 0; j < M; ++j) {
            float ss = 0.0f;
#pragma unroll
            for (int u = 0; u < GEMV_NORM_REG_PACKS; ++u) {
                if ((int)threadIdx.x + u * (int)blockDim.x >= chunks) break;
                ss = rms_sum_squares16<T>(xp[j][u], ss);
            }
            ss = block_sum(ss, scratch);
            const float inv = rsqrtf(ss / (float)k + eps);
#pragma unroll
            for (int u = 0; u < GEMV_NORM_REG_PACKS; ++u) {
                const int c = threadIdx.x + u * blockDim.x;
                if (c >= chunks) break;
                out[j * chunks + c] = rms_scale16<T>(xp[j][u], gp[u], inv);
            }
        }
        __syncthreads();
        return;
    }
    for (int j = 0; j < M; ++j) {
        const uint4* xj = x + (long long)j * chunks;
        float ss = 0.0f;
        for (int c = threadIdx.x; c < chunks; c += blockDim.x) ss = rms_sum_squares16<T>(xj[c], ss);
        ss = block_sum(ss, scratch);
        const float inv = rsqrtf(ss / (float)k + eps);
        for (int c = threadIdx.x; c < chunks; c += blockDim.x) out[j * chunks + c] = rms_scale16<T>(xj[c], norm_w[c], inv);
    }
    __syncthreads();
}

// SWIGLU (GEMV_R == 2, Y == T): w is the stacked [gate; up] weight of 2n rows, the warp owns column c of
// the n intermediate columns and reads gate row c and up row n + c; the epilogue rounds both sums to T,
// then stores round(silu(g)) * u as silu_and_mul_T (layers.cu) does, so the result is bit for bit that of
// this kernel's plain form over the 2n rows followed by silu_and_mul_T.
//
// NORM: x is the residual stream and the block first computes rms_norm(x) * norm_w into shared memory
// (gemv_normed_rows above), so the decode step needs no norm kernel of its own before this GEMM.
// ACC (Y == T): y += x w^T, rounded as a GEMM into a buffer of T followed by add_rms_norm_T's add (the
// product rounded to T, then the sum), so a step with both forms is bit for bit the unfused one (for
// projections without a bias: the host adds one after this sum, where the unfused path adds it before).
template <typename T, typename Y, int M, int GEMV_R, bool SWIGLU = false, bool NORM = false, bool ACC = false>
__device__ void gemv_impl(Y* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, int n, int k,
                          const T* __restrict__ norm_w = nullptr, float eps = 0.0f) {
    static_assert(!SWIGLU || GEMV_R == 2, "the SwiGLU form reads one gate row and one up row");
    static_assert(!ACC || !SWIGLU, "the SwiGLU form overwrites its output");
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = SWIGLU ? blockIdx.x * GEMV_WARPS + warp : (blockIdx.x * GEMV_WARPS + warp) * GEMV_R;
    // Warps past the last row still take part in the block's norm.
    if (!NORM && row0 >= n) return;
    const int chunks = k >> 3;  // 16-byte chunks per row
    const uint4* __restrict__ wr[GEMV_R];
#pragma unroll
    for (int r = 0; r < GEMV_R; ++r) {
        // A missing last row (odd n, or a warp past n in the NORM form) re-reads a valid row and is not stored.
        const int first = NORM && row0 >= n ? 0 : row0;
        const int row = SWIGLU ? first + r * n : (first + r < n ? first + r : first);
        wr[r] = reinterpret_cast<const uint4*>(w + (long long)row * k);
    }
    // Chunks to prefetch: none past the row, GEMV_PREFETCH_LARGE per lane of a large weight.
    const bool small = (SWIGLU ? 2LL : 1LL) * n * k * (long long)sizeof(T) <= (long long)GEMV_PREFETCH_MAX_MB << 20;
    const int pf_end = NORM && row0 >= n ? 0 : small ? chunks : min(chunks, 32 * GEMV_PREFETCH_LARGE);
#pragma unroll
    for (int r = 0; r < GEMV_R; ++r)
#pragma unroll
        for (int p = 0; p < GEMV_PREFETCH; ++p) {
            const int c = lane + 32 * p;
            if (c < pf_end) asm volatile("prefetch.global.L2 [%0];" ::"l"(wr[r] + c));
        }
    // The norm weight does not depend on earlier kernels either.
    const uint4* __restrict__ gw = reinterpret_cast<const uint4*>(norm_w);
    uint4 gp[GEMV_NORM_REG_PACKS];
    if (NORM && gemv_norm_regs(chunks)) {
#pragma unroll
        for (int u = 0; u < GEMV_NORM_REG_PACKS; ++u) {
            const int c = threadIdx.x + u * blockDim.x;
            if (c < chunks) gp[u] = gw[c];
        }
    }
    pdl_enter();
    extern __shared__ uint4 gemv_normed[];  // NORM: [M][chunks]
    const uint4* __restrict__ xs = reinterpret_cast<const uint4*>(x);
    if (NORM) {
        gemv_normed_rows<T, M>(gemv_normed, xs, gw, gp, chunks, k, eps);
        if (row0 >= n) return;
    }
    float acc[GEMV_R][M];
#pragma unroll
    for (int r = 0; r < GEMV_R; ++r)
#pragma unroll
        for (int j = 0; j < M; ++j) acc[r][j] = 0.0f;

#pragma unroll GEMV_UNROLL
    for (int c = lane; c < chunks; c += 32) {
        uint4 wv[GEMV_R];
#pragma unroll
        for (int r = 0; r < GEMV_R; ++r) wv[r] = wr[r][c];
        float xf[M][8];
#pragma unroll
        for (int j = 0; j < M; ++j) unpack16<T>(NORM ? gemv_normed[j * chunks + c] : xs[(long long)j * chunks + c], xf[j]);
#pragma unroll
        for (int r = 0; r < GEMV_R; ++r) {
            float wf[8];
            unpack16<T>(wv[r], wf);
#pragma unroll
            for (int j = 0; j < M; ++j)
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[r][j] = fmaf(wf[i], xf[j][i], acc[r][j]);
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_R; ++r)
#pragma unroll
        for (int j = 0; j < M; ++j) acc[r][j] = warp_sum(acc[r][j]);
    if (SWIGLU) {
        if (lane == 0) {
#pragma unroll
            for (int j = 0; j < M; ++j) {
                const float g = round_to<T>(acc[0][j]), u = round_to<T>(acc[GEMV_R - 1][j]);
                store_f(y + (long long)j * n + row0, round_to<T>(silu_for<T>(g)) * u);
            }
        }
    } else if (lane == 0) {
#pragma unroll
        for (int r = 0; r < GEMV_R; ++r) {
            if (row0 + r >= n) break;
#pragma unroll
            for (int j = 0; j < M; ++j) {
                Y* out = y + (long long)j * n + row0 + r;
                store_f(out, ACC ? round_to<T>(load_f(out) + round_to<T>(acc[r][j])) : acc[r][j]);
            }
        }
    }
}

#define GEMV(T, Y, S)                                                                                     \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, GEMV_MIN_BLOCKS)                       \
        gemv_##S(Y* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, int m, int n, int k) { \
        switch (m) {                                                                                      \
            case 1: gemv_impl<T, Y, 1, GEMV_ROWS_M1>(y, x, w, n, k); break;                               \
            case 2: gemv_impl<T, Y, 2, GEMV_ROWS>(y, x, w, n, k); break;                                  \
            case 3: gemv_impl<T, Y, 3, GEMV_ROWS>(y, x, w, n, k); break;                                  \
            case 4: gemv_impl<T, Y, 4, GEMV_ROWS>(y, x, w, n, k); break;                                  \
            default: break;                                                                               \
        }                                                                                                 \
    }
// gemv_swiglu_T(T* act, const T* x, const T* w_gate_up, int m, int inter, int k): act[m, inter] =
// silu(x w_gate^T) * (x w_up^T) for the stacked [2 inter, k] weight; grid = ceil(inter / GEMV_WARPS).
#define GEMV_SWIGLU(T, S)                                                                                 \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, GEMV_MIN_BLOCKS)                       \
        gemv_swiglu_##S(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, int m, int inter, int k) { \
        switch (m) {                                                                                      \
            case 1: gemv_impl<T, T, 1, 2, true>(y, x, w, inter, k); break;                                \
            case 2: gemv_impl<T, T, 2, 2, true>(y, x, w, inter, k); break;                                \
            default: break;                                                                               \
        }                                                                                                 \
    }
// The NORM and ACC forms (see gemv_impl) for m <= 2, same grids; the NORM forms take m * k * sizeof(T) bytes
// of dynamic shared memory.
//   gemv_norm_T(T* y, const T* x, const T* w, int m, int n, int k, const T* norm_w, float eps)
//   gemv_swiglu_norm_T(T* act, const T* x, const T* w_gate_up, int m, int inter, int k, const T* norm_w, float eps)
//   gemv_acc_T(T* y, const T* x, const T* w, int m, int n, int k)
#define GEMV_FUSED(T, S)                                                                                  \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, GEMV_MIN_BLOCKS) gemv_norm_##S(         \
        T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, int m, int n, int k,          \
        const T* __restrict__ norm_w, float eps) {                                                         \
        if (m == 1) gemv_impl<T, T, 1, GEMV_ROWS_M1, false, true>(y, x, w, n, k, norm_w, eps);            \
        else if (m == 2) gemv_impl<T, T, 2, GEMV_ROWS, false, true>(y, x, w, n, k, norm_w, eps);          \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, GEMV_MIN_BLOCKS) gemv_swiglu_norm_##S(  \
        T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, int m, int inter, int k,      \
        const T* __restrict__ norm_w, float eps) {                                                         \
        if (m == 1) gemv_impl<T, T, 1, 2, true, true>(y, x, w, inter, k, norm_w, eps);                    \
        else if (m == 2) gemv_impl<T, T, 2, 2, true, true>(y, x, w, inter, k, norm_w, eps);               \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, GEMV_MIN_BLOCKS)                       \
        gemv_acc_##S(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, int m, int n, int k) { \
        if (m == 1) gemv_impl<T, T, 1, GEMV_ROWS_M1, false, false, true>(y, x, w, n, k);                  \
        else if (m == 2) gemv_impl<T, T, 2, GEMV_ROWS, false, false, true>(y, x, w, n, k);                \
    }
GEMV_FUSED(bf16, bf16)
GEMV_FUSED(f16, f16)
GEMV_SWIGLU(bf16, bf16)
GEMV_SWIGLU(f16, f16)
GEMV(bf16, bf16, bf16)
GEMV(f16, f16, f16)
GEMV(bf16, float, bf16_f32)
GEMV(f16, float, f16_f32)
