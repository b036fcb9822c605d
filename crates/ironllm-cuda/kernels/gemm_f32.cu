// Batch-invariant f32 GEMM for float32 mode: y[m, n] = x[m, k] @ w[n, k]^T (+ bias[n]).
//
// cuBLAS picks its algorithm (and with it the split of k and the summation order) from the shape, so a
// request's logits would change with the size of the batch it lands in. Here every output element is
// one thread's single accumulator, updated with fmaf for k = 0, 1, ..., k-1 in that order, whatever m is
// and whichever tile the element lands in; the bias (if any) is added once at the end. Tiles only decide
// who computes an element, never how, so a row of y is bit-identical whether computed alone or in a batch.
//
// extern "C" gemm_f32_nt(float* y, const float* x, const float* w, const float* bias /*nullable*/,
//                        int m, int n, int k)
//   grid = (ceil(n / 64), ceil(m / 64)), block = 256, no dynamic shared memory (static 16.6 KB).
//   Any m, n, k >= 0 (k = 0 gives bias or zeros). 64x64 output tile per block, 16-wide k slices double
//   buffered through shared memory; thread (tx, ty) = (tid % 16, tid / 16) owns rows ty + 16i and columns
//   tx + 16j (i, j < 4), so shared-memory reads are broadcasts or consecutive and stores coalesce.

#define GEMM_BM 64
#define GEMM_BN 64
#define GEMM_BK 16
#define GEMM_THREADS 256

__device__ __forceinline__ bool gemm_aligned16(const void* p) { return (((unsigned long long)p) & 15ull) == 0; }

// Loads the [64 rows x 16 k] slice starting at (row0, k0) of a row-major [rows, k] matrix into four
// registers per thread; out-of-range elements read as zero (a zero never changes an fmaf accumulator
// except the sign of a zero, and which k are padded depends only on k, not on m).
__device__ __forceinline__ void gemm_load_slice(float (&r)[4], const float* a, int rows, int k, int row0, int k0,
                                                bool vec) {
    const int tid = threadIdx.x;
    if (vec) {
        // Thread -> (row tid / 4, k quad tid % 4); k % 4 == 0 so a quad is all in or all out.
        const int rr = row0 + (tid >> 2), kk = k0 + ((tid & 3) << 2);
        if (rr < rows && kk < k) {
            const float4 v = *reinterpret_cast<const float4*>(a + (long long)rr * k + kk);
            r[0] = v.x; r[1] = v.y; r[2] = v.z; r[3] = v.w;
        } else {
            r[0] = r[1] = r[2] = r[3] = 0.0f;
        }
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int e = tid + GEMM_THREADS * i;  // (row e / 16, k e % 16)
            const int rr = row0 + (e >> 4), kk = k0 + (e & 15);
            r[i] = (rr < rows && kk < k) ? a[(long long)rr * k + kk] : 0.0f;
        }
    }
}

// Stores a slice from registers into shared memory as [k][row] (row padded by one against bank conflicts).
__device__ __forceinline__ void gemm_store_slice(float (*s)[GEMM_BM + 1], const float (&r)[4], bool vec) {
    const int tid = threadIdx.x;
    if (vec) {
        const int rr = tid >> 2, kk = (tid & 3) << 2;
#pragma unroll
        for (int i = 0; i < 4; ++i) s[kk + i][rr] = r[i];
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int e = tid + GEMM_THREADS * i;
            s[e & 15][e >> 4] = r[i];
        }
    }
}

extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
    gemm_f32_nt(float* __restrict__ y, const float* __restrict__ x, const float* __restrict__ w,
                const float* __restrict__ bias, int m, int n, int k) {
    __shared__ float xs[2][GEMM_BK][GEMM_BM + 1];  // [buffer][k][row of x]
    __shared__ float ws[2][GEMM_BK][GEMM_BN + 1];  // [buffer][k][row of w = column of y]
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int row0 = blockIdx.y * GEMM_BM, col0 = blockIdx.x * GEMM_BN;
    if (row0 >= m || col0 >= n) return;
    const bool vec = (k & 3) == 0 && gemm_aligned16(x) && gemm_aligned16(w);

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    const int num_slices = (k + GEMM_BK - 1) / GEMM_BK;
    float xr[4], wr[4];
    if (num_slices > 0) {
        gemm_load_slice(xr, x, m, k, row0, 0, vec);
        gemm_load_slice(wr, w, n, k, col0, 0, vec);
        gemm_store_slice(xs[0], xr, vec);
        gemm_store_slice(ws[0], wr, vec);
    }
    __syncthreads();
    for (int sl = 0; sl < num_slices; ++sl) {
        const int buf = sl & 1;
        const bool more = sl + 1 < num_slices;
        // Prefetch the next slice into registers while this one is multiplied.
        if (more) {
            gemm_load_slice(xr, x, m, k, row0, (sl + 1) * GEMM_BK, vec);
            gemm_load_slice(wr, w, n, k, col0, (sl + 1) * GEMM_BK, vec);
        }
#pragma unroll
        for (int kk = 0; kk < GEMM_BK; ++kk) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = xs[buf][kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = ws[buf][kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        // The other buffer was last read in the previous iteration, which every thread has finished
        // (barrier below), so it can be refilled now; the barrier then publishes it.
        if (more) {
            gemm_store_slice(xs[buf ^ 1], xr, vec);
            gemm_store_slice(ws[buf ^ 1], wr, vec);
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = row0 + ty + 16 * i;
        if (r >= m) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int c = col0 + tx + 16 * j;
            if (c < n) y[(long long)r * n + c] = bias != nullptr ? acc[i][j] + bias[c] : acc[i][j];
        }
    }
}
