// Tensor-core attention for prefill / chunked-prefill rows over a paged KV cache (flash-attention-2 style
// online softmax, mma.sync m16n8k16 with f32 accumulation).
//
// ===================================== LAUNCH CONFIGURATION =====================================
//   kernels : flash_prefill_{bf16,f16}_hd{64,128}
//   BLOCK_M : 64 query tokens per CTA (the host's work list has one entry per 64 query tokens of each
//             prefill sequence: tiles = [(s, 0), (s, 64), (s, 128), ...])
//   grid    : (num_tiles, num_heads, 1)      -- one CTA per (query tile, query head)
//   block   : (128, 1, 1)                     -- 4 warps, each owns 16 query rows of the tile
//   dynamic shared memory: 0 bytes            -- all shared memory is static:
//             hd64: 16896 B, hd128: 33280 B (< 48 KiB: no cuFuncSetAttribute needed)
//   registers (ptxas sm_90a, __launch_bounds__ min blocks 4 / 3): hd64 128, hd128 168, no spills
//             -> 4 CTAs/SM (hd64), 3 CTAs/SM (hd128)
//   num_tiles == 0: do not launch (a zero grid dimension is a launch error)
// ================================================================================================
//
// Signature (T = bf16 / f16 bit-pattern structs):
//   (T* out, const T* qkv, const T* k_cache, const T* v_cache, const int* block_tables,
//    const int* query_start_loc, const int* context_lens, const int* tiles, int num_tiles,
//    int num_heads, int num_kv_heads, int block_size, int max_blocks_per_seq, float scale)
//
// Requirements: qkv, out, k_cache, v_cache 16-byte aligned (K/V rows and Q rows are fetched with 16-byte
// cp.async); scale > 0; num_heads % num_kv_heads == 0; context_lens[s] >= query_len(s); every
// tiles[2i+1] < query_len(tiles[2i]) (an entry past the end is skipped, not an error).
//
// Scheduling: the CTA's linear id (blockIdx.y * gridDim.x + blockIdx.x, the order the hardware issues
// CTAs in) is remapped so that consecutive CTAs are the heads of one query tile (so the heads of a GQA
// group read the same K/V from L2 at about the same time) and so that the LAST work-list entries run
// first (later query tiles of a sequence attend to more keys; starting them first shortens the tail).
//
// Algorithm per CTA: Q tile (64 x HD) -> shared -> registers (A fragments). Key tiles of BLOCK_N = 64
// positions are walked from the last one (the one crossing the causal diagonal) down to 0; K and V of a
// tile are gathered row by row through the block table with cp.async (a tile may span any number of
// cache blocks; block_size is arbitrary), with K of the next tile in flight during softmax + PV and V of
// the current tile in flight during QK^T. Shared rows are XOR-swizzled in 16-byte chunks so ldmatrix is
// conflict-free. S = QK^T and O += PV run on tensor cores; the softmax runs in the exp2 domain in f32.

#define FP_BLOCK_M 64
#define FP_BLOCK_N 64
#define FP_THREADS 128

// The PTX helpers (fp_cp_async16, fp_ldmatrix_x4, FpElem<T>::mma, ...) live in common.cuh, shared with
// flash_decode.cu.

// ---- the kernel body --------------------------------------------------------------------------------

template <typename T, int HD>
__device__ __forceinline__ void flash_prefill_impl(T* __restrict__ out, const T* __restrict__ qkv,
                                                   const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                                   const int* __restrict__ block_tables,
                                                   const int* __restrict__ query_start_loc,
                                                   const int* __restrict__ context_lens, const int* __restrict__ tiles,
                                                   int num_tiles, int num_heads, int num_kv_heads, int block_size,
                                                   int max_blocks_per_seq, float scale) {
    constexpr int BM = FP_BLOCK_M;
    constexpr int BN = FP_BLOCK_N;
    constexpr int ROW_BYTES = HD * 2;
    constexpr int CPR = HD / 8;                // 16-byte chunks per row
    constexpr int RPP = FP_THREADS / CPR;      // rows covered by one load pass of the CTA
    constexpr int PASSES = BN / RPP;           // load passes per 64-row tile (BM == BN)
    constexpr int KSTEPS = HD / 16;            // k-steps of S = Q K^T
    constexpr int NT_S = BN / 8;               // 8-key column tiles of S
    constexpr int NT_O = HD / 8;               // 8-wide column tiles of O
    static_assert(BM == BN, "Q staging reuses the V buffer");
    static_assert(HD % 64 == 0 && CPR >= 8 && FP_THREADS % CPR == 0 && BN % RPP == 0, "unsupported HEAD_DIM");

    // sK: K tile; sV: V tile, and the Q tile before the key loop, and the O tile after it.
    __shared__ __align__(128) unsigned short sK[BN * HD];
    __shared__ __align__(128) unsigned short sV[BN * HD];

    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2;  // row within the 8-row half of an mma fragment
    const int t = lane & 3;   // column pair within an 8-column fragment

    // ---- which tile and head (see "Scheduling" above) ----
    const int lin = blockIdx.y * gridDim.x + blockIdx.x;
    const int h = lin % num_heads;
    const int tile = num_tiles - 1 - lin / num_heads;
    const int s = tiles[2 * tile];
    const int m0 = tiles[2 * tile + 1];
    const int q_start = query_start_loc[s];
    const int qlen = query_start_loc[s + 1] - q_start;
    if (m0 >= qlen) return;
    const int ctx = context_lens[s];
    const int past = ctx - qlen;                // position of query token 0
    const int rows_valid = min(BM, qlen - m0);
    const int kv_end = past + m0 + rows_valid;  // keys [0, kv_end) are visible to some row of the tile
    const int n_kv_tiles = (kv_end + BN - 1) / BN;
    const int kvh = h / (num_heads / num_kv_heads);
    const int64_t qkv_stride = (int64_t)(num_heads + 2 * num_kv_heads) * HD;
    const int* bt = block_tables + (int64_t)s * max_blocks_per_seq;

    const uint32_t sK_base = fp_smem_addr(sK);
    const uint32_t sV_base = fp_smem_addr(sV);

    // ---- loader mapping: thread loads chunk ld_c of rows ld_r + p*RPP, p < PASSES ----
    const int ld_r = tid / CPR;
    const int ld_c = tid % CPR;
    // (ld_r + p*RPP) & 7 == ld_r & 7 since RPP is a multiple of 8, so the swizzled column is fixed.
    const uint32_t ld_soff = (uint32_t)(ld_r * ROW_BYTES + ((ld_c ^ (ld_r & 7)) << 4));

    // Cache row index ((block * num_kv_heads + kvh) * block_size + pos % block_size) of each key row of a
    // tile, or ~0u past kv_end (zero-filled). Double-buffered by tile parity; written by threads 0..63 one
    // barrier before the K load of the tile, read by the K and V loads of that tile.
    __shared__ uint32_t sRow[2][BN];
    auto fill_rows = [&](int j) {
        if (tid < BN) {
            const int pos = j * BN + tid;
            uint32_t cr = ~0u;
            if (pos < kv_end) {
                const uint32_t blk = (uint32_t)bt[pos / block_size];
                cr = (blk * (uint32_t)num_kv_heads + (uint32_t)kvh) * (uint32_t)block_size + (uint32_t)(pos % block_size);
            }
            sRow[j & 1][tid] = cr;
        }
    };
    auto issue_kv = [&](const T* __restrict__ cache, uint32_t sbase, int j) {
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            const uint32_t cr = sRow[j & 1][ld_r + p * RPP];
            const bool valid = cr != ~0u;
            const T* src = cache + ((uint64_t)(valid ? cr : 0u) * HD + ld_c * 8);
            fp_cp_async16(sbase + ld_soff + p * RPP * ROW_BYTES, src, valid);
        }
    };

    // ---- prologue: Q tile -> sV (staging), K of the last key tile -> sK ----
    {
        const T* qbase = qkv + (int64_t)(q_start + m0) * qkv_stride + h * HD + ld_c * 8;
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            const int r = ld_r + p * RPP;
            const bool valid = r < rows_valid;
            const T* src = qbase + (valid ? (int64_t)r * qkv_stride : (int64_t)0);
            fp_cp_async16(sV_base + ld_soff + p * RPP * ROW_BYTES, src, valid);
        }
    }
    fill_rows(n_kv_tiles - 1);
    __syncthreads();
    issue_kv(k_cache, sK_base, n_kv_tiles - 1);
    fp_cp_async_commit();
    fp_cp_async_wait<0>();
    __syncthreads();

    // Q A-fragments of this warp's 16 rows: matrices (rows 0-7, k lo), (rows 8-15, k lo), (0-7, k hi),
    // (8-15, k hi) -> a0..a3 of mma.m16n8k16.
    uint32_t qf[KSTEPS][4];
    {
        const int row = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int csel = lane >> 4;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            const int c = kk * 2 + csel;
            fp_ldmatrix_x4(qf[kk], sV_base + row * ROW_BYTES + ((c ^ (lane & 7)) << 4));
        }
    }
    __syncthreads();  // everyone holds Q; sV may be overwritten

    // ldmatrix lane addressing for K (non-transposed: matrices (keys lo, d lo), (keys lo, d hi),
    // (keys hi, d lo), (keys hi, d hi) -> B fragments {r0,r1} of key tile lo, {r2,r3} of key tile hi)
    const int k_lrow = (lane & 7) + ((lane >> 4) << 3);
    const int k_lc = (lane >> 3) & 1;
    // ... and for V (transposed: matrices (keys lo, d lo), (keys hi, d lo), (keys lo, d hi), (keys hi, d hi)
    // -> B fragments {r0,r1} of d tile lo, {r2,r3} of d tile hi)
    const int v_lrow = (lane & 7) + (((lane >> 3) & 1) << 3);
    const int v_lc = lane >> 4;
    const int sw = lane & 7;  // row & 7 of every ldmatrix row address this lane provides

    float o[NT_O][4];
#pragma unroll
    for (int i = 0; i < NT_O; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m_run0 = -IRONLLM_INF, m_run1 = -IRONLLM_INF;  // running max (log2 domain) of rows g, g+8
    float l_run0 = 0.0f, l_run1 = 0.0f;                  // this thread's partial row sums
    const float sl2 = scale * 1.4426950408889634f;
    const int qpos0 = past + m0 + warp * 16 + g;  // position of row g; row g+8 is qpos0 + 8

    for (int j = n_kv_tiles - 1; j >= 0; --j) {
        issue_kv(v_cache, sV_base, j);
        fp_cp_async_commit();
        fp_cp_async_wait<1>();  // K(j) landed
        __syncthreads();
        if (j > 0) fill_rows(j - 1);  // visible to issue_kv(K, j-1) after the next barrier

        // ---- S = Q K^T (16 x 64 per warp) ----
        float sc[NT_S][4];
#pragma unroll
        for (int i = 0; i < NT_S; ++i) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
#pragma unroll
            for (int np = 0; np < NT_S / 2; ++np) {
                uint32_t b[4];
                const int row = np * 16 + k_lrow;
                const int c = kk * 2 + k_lc;
                fp_ldmatrix_x4(b, sK_base + row * ROW_BYTES + ((c ^ sw) << 4));
                FpElem<T>::mma(sc[2 * np], qf[kk], b[0], b[1]);
                FpElem<T>::mma(sc[2 * np + 1], qf[kk], b[2], b[3]);
            }
        }
        __syncthreads();  // all warps are done with sK
        if (j > 0) {
            issue_kv(k_cache, sK_base, j - 1);
            fp_cp_async_commit();
        }

        // ---- causal mask (only tiles that cross the diagonal of the first row) ----
        const int kv0 = j * BN;
        if (kv0 + BN - 1 > past + m0) {
#pragma unroll
            for (int nt = 0; nt < NT_S; ++nt) {
                const int key = kv0 + nt * 8 + 2 * t;
                if (key > qpos0) sc[nt][0] = -IRONLLM_INF;
                if (key + 1 > qpos0) sc[nt][1] = -IRONLLM_INF;
                if (key > qpos0 + 8) sc[nt][2] = -IRONLLM_INF;
                if (key + 1 > qpos0 + 8) sc[nt][3] = -IRONLLM_INF;
            }
        }

        // ---- online softmax ----
        float mx0 = -IRONLLM_INF, mx1 = -IRONLLM_INF;
#pragma unroll
        for (int nt = 0; nt < NT_S; ++nt) {
            mx0 = fmaxf(mx0, fmaxf(sc[nt][0], sc[nt][1]));
            mx1 = fmaxf(mx1, fmaxf(sc[nt][2], sc[nt][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mnew0 = fmaxf(m_run0, mx0 * sl2);
        const float mnew1 = fmaxf(m_run1, mx1 * sl2);
        const float muse0 = mnew0 == -IRONLLM_INF ? 0.0f : mnew0;  // fully masked so far: keep exps at 0
        const float muse1 = mnew1 == -IRONLLM_INF ? 0.0f : mnew1;
        const float alpha0 = fp_exp2(m_run0 - muse0);
        const float alpha1 = fp_exp2(m_run1 - muse1);
        m_run0 = mnew0;
        m_run1 = mnew1;

        float rs0 = 0.0f, rs1 = 0.0f;
        uint32_t pf[NT_S / 2][4];  // P as A fragments of the PV mma (k = key)
#pragma unroll
        for (int nt = 0; nt < NT_S; ++nt) {
            const float p0 = fp_exp2(fmaf(sc[nt][0], sl2, -muse0));
            const float p1 = fp_exp2(fmaf(sc[nt][1], sl2, -muse0));
            const float p2 = fp_exp2(fmaf(sc[nt][2], sl2, -muse1));
            const float p3 = fp_exp2(fmaf(sc[nt][3], sl2, -muse1));
            rs0 += p0 + p1;
            rs1 += p2 + p3;
            pf[nt >> 1][(nt & 1) * 2 + 0] = FpElem<T>::pack(p0, p1);
            pf[nt >> 1][(nt & 1) * 2 + 1] = FpElem<T>::pack(p2, p3);
        }
        l_run0 = l_run0 * alpha0 + rs0;
        l_run1 = l_run1 * alpha1 + rs1;
#pragma unroll
        for (int i = 0; i < NT_O; ++i) {
            o[i][0] *= alpha0;
            o[i][1] *= alpha0;
            o[i][2] *= alpha1;
            o[i][3] *= alpha1;
        }

        if (j > 0) fp_cp_async_wait<1>();  // V(j) landed (K(j-1) may still be in flight)
        else fp_cp_async_wait<0>();
        __syncthreads();

        // ---- O += P V ----
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
            for (int dp = 0; dp < NT_O / 2; ++dp) {
                uint32_t b[4];
                const int row = kk * 16 + v_lrow;
                const int c = dp * 2 + v_lc;
                fp_ldmatrix_x4_trans(b, sV_base + row * ROW_BYTES + ((c ^ sw) << 4));
                FpElem<T>::mma(o[2 * dp], pf[kk], b[0], b[1]);
                FpElem<T>::mma(o[2 * dp + 1], pf[kk], b[2], b[3]);
            }
        }
        __syncthreads();  // all warps are done with sV
    }

    // ---- epilogue: normalize, stage this warp's 16 rows in sV, write valid rows with 16-byte stores ----
    l_run0 += __shfl_xor_sync(0xffffffffu, l_run0, 1);
    l_run0 += __shfl_xor_sync(0xffffffffu, l_run0, 2);
    l_run1 += __shfl_xor_sync(0xffffffffu, l_run1, 1);
    l_run1 += __shfl_xor_sync(0xffffffffu, l_run1, 2);
    const float inv0 = l_run0 > 0.0f ? 1.0f / l_run0 : 0.0f;
    const float inv1 = l_run1 > 0.0f ? 1.0f / l_run1 : 0.0f;
    {
        unsigned char* sO = reinterpret_cast<unsigned char*>(sV);
        const int r0 = warp * 16 + g;  // r0 & 7 == g, (r0 + 8) & 7 == g
#pragma unroll
        for (int nt = 0; nt < NT_O; ++nt) {
            const int off = ((nt ^ g) << 4) + t * 4;
            *reinterpret_cast<uint32_t*>(sO + r0 * ROW_BYTES + off) = FpElem<T>::pack(o[nt][0] * inv0, o[nt][1] * inv0);
            *reinterpret_cast<uint32_t*>(sO + (r0 + 8) * ROW_BYTES + off) =
                FpElem<T>::pack(o[nt][2] * inv1, o[nt][3] * inv1);
        }
        __syncwarp();
        const int64_t out_stride = (int64_t)num_heads * HD;
#pragma unroll
        for (int i = lane; i < 16 * CPR; i += 32) {
            const int r = warp * 16 + i / CPR;
            const int c = i % CPR;
            if (r < rows_valid) {
                const uint4 v = *reinterpret_cast<const uint4*>(sO + r * ROW_BYTES + ((c ^ (r & 7)) << 4));
                *reinterpret_cast<uint4*>(out + (int64_t)(q_start + m0 + r) * out_stride + h * HD + c * 8) = v;
            }
        }
    }
}

#define FLASH_PREFILL_KERNEL(T, SUFFIX, HD)                                                                     \
    extern "C" __global__ void __launch_bounds__(FP_THREADS, (HD) == 64 ? 4 : 3) flash_prefill_##SUFFIX##_hd##HD(                  \
        T* out, const T* qkv, const T* k_cache, const T* v_cache, const int* block_tables,                     \
        const int* query_start_loc, const int* context_lens, const int* tiles, int num_tiles, int num_heads,   \
        int num_kv_heads, int block_size, int max_blocks_per_seq, float scale) {                               \
        flash_prefill_impl<T, HD>(out, qkv, k_cache, v_cache, block_tables, query_start_loc, context_lens,     \
                                  tiles, num_tiles, num_heads, num_kv_heads, block_size, max_blocks_per_seq,   \
                                  scale);                                                                      \
    }

FLASH_PREFILL_KERNEL(bf16, bf16, 64)
FLASH_PREFILL_KERNEL(bf16, bf16, 128)
FLASH_PREFILL_KERNEL(f16, f16, 64)
FLASH_PREFILL_KERNEL(f16, f16, 128)
