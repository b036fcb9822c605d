// Tensor-core decode attention for grouped-query models over the paged KV cache (bf16/f16). One CTA owns
// one (query token, KV head, split) and computes every query head that shares the KV head at once: the
// group's heads are the rows of a 16-row mma tile (rows past the group are zero and discarded), so each
// K/V row is read from memory once per group and the q.k / p.v products run on tensor cores instead of
// the scalar lanes of attention.cu's general kernel, whose arithmetic, not memory, bounded it at large
// batches.
//
// ===================================== LAUNCH CONFIGURATION =====================================
//   kernels : flash_decode_{bf16,f16}_hd{64,128}        (writes the output rows)
//             flash_decode_split_{bf16,f16}_hd{64,128}  (writes split shares; merge with
//                                                        paged_attention_reduce_T of attention.cu)
//             flash_decode[_split]_deep_{bf16,f16}_hd128 (the same with 3 stages, 2 CTAs per SM)
//   grid    : (num_tokens, num_kv_heads, num_splits)     (num_splits = 1 for the plain kernel)
//   block   : (128, 1, 1)   -- 4 warps; a key tile of 64 positions gives each warp 16 keys
//   dynamic shared memory: FD_SMEM_BYTES(HD) = STAGES * 2 * 64 * HD * 2 + 16 * HD * 2
//             hd64: 3 stages, 51200 B; hd128: 2 stages, 69632 B, deep 3 stages, 102400 B (above 48 KiB: the host raises
//             CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES at load, see ops::flash_decode_smem)
// ================================================================================================
//
// Signatures: the same as paged_attention_T / paged_attention_split_T of attention.cu (head_dim must
// equal HD), so the host swaps kernels without changing arguments:
//   flash_decode:       (T* out, const T* qkv, const T* k_cache, const T* v_cache, const int* block_tables,
//                        const int* query_start_loc, const int* context_lens, const int* token_to_seq,
//                        int num_tokens, int num_heads, int num_kv_heads, int head_dim, int block_size,
//                        int max_blocks_per_seq, float scale)
//   flash_decode_split: (qkv, ..., scale, float* part_o, float* part_lse, int num_splits, int min_split_keys)
// Requirements: num_heads / num_kv_heads <= 16; qkv, k_cache, v_cache 16-byte aligned. A row's query
// position is context_lens[s] - query_len + j as in attention.cu, so any row is valid, but the kernel is
// meant for decode rows (one query token per CTA).
//
// Split-KV: split s takes keys [s c, (s + 1) c) with c = max(ceil(n / num_splits), min_split_keys), writes the share's
// normalized output to part_o[(t * num_heads + h) * num_splits + s][:] and its log2-sum-exp to part_lse
// (an empty share writes -inf), exactly as paged_attention_split_T does.
//
// Pipeline: STAGES key tiles (K and V, 64 rows each) in flight through cp.async, gathered row by row
// through the block table (any block_size); shared rows are XOR-swizzled in 16-byte chunks so ldmatrix is
// conflict-free. Each warp keeps its own online softmax (exp2 domain, f32) over its 16 keys of every
// tile; the four warps are merged through shared memory at the end.

#define FD_BLOCK_N 64
#define FD_THREADS 128
#define FD_MAX_GROUP 16
#ifndef FD_STAGES_HD128
#define FD_STAGES_HD128 2  // A/B knob of the plain form (2-4; ops::flash_decode_smem reads it back)
#endif
#define FD_STAGES(HD) ((HD) == 64 ? 3 : FD_STAGES_HD128)
#define FD_MIN_BLOCKS(HD) ((HD) == 64 ? 4 : (FD_STAGES_HD128 == 2 ? 3 : FD_STAGES_HD128 == 3 ? 2 : 1))
#define FD_SMEM_BYTES(HD) (FD_STAGES(HD) * 2 * FD_BLOCK_N * (HD) * 2 + 16 * (HD) * 2)

template <typename T, int HD, int STAGES>
__device__ __forceinline__ void flash_decode_impl(unsigned char* smem, T* __restrict__ out, const T* __restrict__ qkv,
                                                  const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                                  const int* __restrict__ block_tables,
                                                  const int* __restrict__ query_start_loc,
                                                  const int* __restrict__ context_lens,
                                                  const int* __restrict__ token_to_seq, int num_tokens, int num_heads,
                                                  int num_kv_heads, int block_size, int max_blocks_per_seq,
                                                  float scale, float* __restrict__ part_o,
                                                  float* __restrict__ part_lse, int num_splits,
                                                  int min_split_keys) {
    constexpr int BN = FD_BLOCK_N;
    constexpr int ROW_BYTES = HD * 2;
    constexpr int CPR = HD / 8;               // 16-byte chunks per row
    constexpr int RPP = FD_THREADS / CPR;     // rows covered by one load pass of the CTA
    constexpr int PASSES = BN / RPP;          // load passes per 64-row tile
    constexpr int KSTEPS = HD / 16;           // k-steps of S = Q K^T
    constexpr int NT_O = HD / 8;              // 8-wide column tiles of O
    constexpr int TILE = BN * ROW_BYTES;      // bytes of one K or V tile
    static_assert(HD % 64 == 0 && RPP % 8 == 0 && BN % RPP == 0, "unsupported HEAD_DIM");
    static_assert(4 * 16 * HD * 4 + 2 * 64 * 4 <= STAGES * 2 * TILE, "merge scratch must fit the stages");

    const int t = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    if (t >= num_tokens || kvh >= num_kv_heads) return;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2;  // row within the 8-row half of an mma fragment
    const int tq = lane & 3;  // column pair within an 8-column fragment
    const int group = num_heads / num_kv_heads;
    const int seq = token_to_seq[t];
    const int q_start = query_start_loc[seq], q_len = query_start_loc[seq + 1] - q_start;
    const int p = context_lens[seq] - q_len + (t - q_start);  // position of this query token
    const long long head_row0 = (long long)t * num_heads + (long long)kvh * group;  // (token, first head)

    int k_begin = 0, k_end = p + 1;
    if (part_o != nullptr && p >= 0) {
        const int chunk = max((p + num_splits) / num_splits, min_split_keys);  // ceil((p + 1) / num_splits)
        k_begin = min(split * chunk, p + 1);
        k_end = min(k_begin + chunk, p + 1);
    }
    const int* __restrict__ bt = block_tables + (long long)seq * max_blocks_per_seq;
    // Launched as a programmatic dependent (see common.cuh): the batch metadata was uploaded before the
    // step, and the keys before this token's position were written by earlier steps, so the first tile's
    // K and V rows can be pulled into L2 while the kernel before (RoPE + KV write) still runs. The wait
    // comes before anything reads q or this token's K/V row, or writes.
    if (p >= 0 && k_begin < k_end) {
        const int pos = k_begin + tid / 2;
        if (pos < min(k_end, k_begin + BN)) {
            const long long row = ((long long)bt[pos / block_size] * num_kv_heads + kvh) * block_size + pos % block_size;
            const T* base = (tid & 1) ? v_cache : k_cache;
            for (int off = 0; off < HD; off += 64)  // 128-byte lines
                asm volatile("prefetch.global.L2 [%0];" ::"l"(base + row * HD + off));
        }
    }
    pdl_enter();
    if (p < 0 || k_begin >= k_end) {  // inconsistent metadata, or an empty share: weight zero / zeros
        for (int i = tid; i < group * HD; i += FD_THREADS) {
            const int r = i / HD, d = i - r * HD;
            if (part_o == nullptr) store_f(out + (head_row0 + r) * HD + d, 0.0f);
            else if (d == 0) part_lse[(head_row0 + r) * num_splits + split] = -IRONLLM_INF;
        }
        return;
    }
    const int n_tiles = (k_end - k_begin + BN - 1) / BN;

    const uint32_t s_base = fp_smem_addr(smem);                 // stage s: K at +2sTILE, V at +(2s+1)TILE
    const uint32_t q_base = s_base + STAGES * 2 * TILE;          // the 16 x HD Q tile

    // Loader mapping: thread loads chunk ld_c of rows ld_r + pass * RPP; (ld_r + pass * RPP) & 7 == ld_r & 7
    // since RPP is a multiple of 8, so the swizzled column is fixed per thread.
    const int ld_r = tid / CPR, ld_c = tid % CPR;
    const uint32_t ld_soff = (uint32_t)(ld_r * ROW_BYTES + ((ld_c ^ (ld_r & 7)) << 4));
    auto issue_tile = [&](int j) {
        const uint32_t kb = s_base + (uint32_t)((j % STAGES) * 2 * TILE);
#pragma unroll
        for (int pass = 0; pass < PASSES; ++pass) {
            const int pos = k_begin + j * BN + ld_r + pass * RPP;
            const bool valid = pos < k_end;
            long long row = 0;
            if (valid) row = ((long long)bt[pos / block_size] * num_kv_heads + kvh) * block_size + pos % block_size;
            const long long off = row * HD + ld_c * 8;
            fp_cp_async16(kb + ld_soff + pass * RPP * ROW_BYTES, k_cache + off, valid);
            fp_cp_async16(kb + TILE + ld_soff + pass * RPP * ROW_BYTES, v_cache + off, valid);
        }
    };

    // Prologue: the Q tile (rows past the group zero-filled) rides in the first commit group with tile 0.
    {
        const T* q_row = qkv + (long long)t * (num_heads + 2 * num_kv_heads) * HD + (long long)kvh * group * HD;
        for (int i = tid; i < 16 * CPR; i += FD_THREADS) {
            const int r = i / CPR, c = i - r * CPR;
            const bool valid = r < group;
            fp_cp_async16(q_base + r * ROW_BYTES + ((c ^ (r & 7)) << 4), q_row + (valid ? r * HD + c * 8 : 0), valid);
        }
    }
#pragma unroll
    for (int j = 0; j < STAGES - 1; ++j) {
        if (j < n_tiles) issue_tile(j);
        fp_cp_async_commit();
    }
    fp_cp_async_wait<STAGES - 2>();
    __syncthreads();

    // Q A-fragments (rows 0-7 / 8-15, k lo / hi) of the whole 16-row tile; every warp holds all of Q.
    uint32_t qf[KSTEPS][4];
    {
        const int row = (lane & 7) + ((lane >> 3) & 1) * 8;
        const int csel = lane >> 4;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            const int c = kk * 2 + csel;
            fp_ldmatrix_x4(qf[kk], q_base + row * ROW_BYTES + ((c ^ (lane & 7)) << 4));
        }
    }
    // ldmatrix lane addressing, as in flash_prefill.cu: K non-transposed (B fragments of keys lo / hi),
    // V transposed (B fragments of d tiles lo / hi); every row address this lane provides has row & 7 == sw.
    const int k_lrow = warp * 16 + (lane & 7) + ((lane >> 4) << 3);
    const int k_lc = (lane >> 3) & 1;
    const int v_lrow = warp * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
    const int v_lc = lane >> 4;
    const int sw = lane & 7;

    float o[NT_O][4];
#pragma unroll
    for (int i = 0; i < NT_O; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m_run0 = -IRONLLM_INF, m_run1 = -IRONLLM_INF;  // running max (log2 domain) of rows g, g + 8
    float l_run0 = 0.0f, l_run1 = 0.0f;                  // this thread's partial row sums
    const float sl2 = scale * 1.4426950408889634f;

    for (int j = 0; j < n_tiles; ++j) {
        fp_cp_async_wait<STAGES - 2>();  // tile j landed
        __syncthreads();                 // ... for every thread; and all warps are done with tile j - 1
        if (j + STAGES - 1 < n_tiles) issue_tile(j + STAGES - 1);  // into tile j - 1's stage
        fp_cp_async_commit();

        const uint32_t kb = s_base + (uint32_t)((j % STAGES) * 2 * TILE), vb = kb + TILE;
        // ---- S = Q K^T for this warp's 16 keys (16 x 16) ----
        float sc[2][4];
#pragma unroll
        for (int i = 0; i < 2; ++i) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            uint32_t b[4];
            fp_ldmatrix_x4(b, kb + k_lrow * ROW_BYTES + (((kk * 2 + k_lc) ^ sw) << 4));
            FpElem<T>::mma(sc[0], qf[kk], b[0], b[1]);
            FpElem<T>::mma(sc[1], qf[kk], b[2], b[3]);
        }
        // ---- keys past the share (last tile only) ----
        const int key0 = k_begin + j * BN + warp * 16 + 2 * tq;
        if (k_begin + (j + 1) * BN > k_end) {
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                const int key = key0 + nt * 8;
                if (key >= k_end) sc[nt][0] = sc[nt][2] = -IRONLLM_INF;
                if (key + 1 >= k_end) sc[nt][1] = sc[nt][3] = -IRONLLM_INF;
            }
        }
        // ---- online softmax (rows g and g + 8; a row's max is shared by its quad) ----
        float mx0 = fmaxf(fmaxf(sc[0][0], sc[0][1]), fmaxf(sc[1][0], sc[1][1]));
        float mx1 = fmaxf(fmaxf(sc[0][2], sc[0][3]), fmaxf(sc[1][2], sc[1][3]));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mnew0 = fmaxf(m_run0, mx0 * sl2);
        const float mnew1 = fmaxf(m_run1, mx1 * sl2);
        const float muse0 = mnew0 == -IRONLLM_INF ? 0.0f : mnew0;  // nothing seen yet: keep exps at 0
        const float muse1 = mnew1 == -IRONLLM_INF ? 0.0f : mnew1;
        const float alpha0 = fp_exp2(m_run0 - muse0);
        const float alpha1 = fp_exp2(m_run1 - muse1);
        m_run0 = mnew0;
        m_run1 = mnew1;
        uint32_t pf[4];  // P (16 x 16) as the A fragment of the PV mma
        float rs0 = 0.0f, rs1 = 0.0f;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
            const float p0 = fp_exp2(fmaf(sc[nt][0], sl2, -muse0));
            const float p1 = fp_exp2(fmaf(sc[nt][1], sl2, -muse0));
            const float p2 = fp_exp2(fmaf(sc[nt][2], sl2, -muse1));
            const float p3 = fp_exp2(fmaf(sc[nt][3], sl2, -muse1));
            rs0 += p0 + p1;
            rs1 += p2 + p3;
            pf[nt * 2] = FpElem<T>::pack(p0, p1);
            pf[nt * 2 + 1] = FpElem<T>::pack(p2, p3);
        }
        l_run0 = l_run0 * alpha0 + rs0;
        l_run1 = l_run1 * alpha1 + rs1;
        // ---- O = O * alpha + P V ----
#pragma unroll
        for (int dp = 0; dp < NT_O / 2; ++dp) {
            o[2 * dp][0] *= alpha0;
            o[2 * dp][1] *= alpha0;
            o[2 * dp][2] *= alpha1;
            o[2 * dp][3] *= alpha1;
            o[2 * dp + 1][0] *= alpha0;
            o[2 * dp + 1][1] *= alpha0;
            o[2 * dp + 1][2] *= alpha1;
            o[2 * dp + 1][3] *= alpha1;
            uint32_t b[4];
            fp_ldmatrix_x4_trans(b, vb + v_lrow * ROW_BYTES + (((dp * 2 + v_lc) ^ sw) << 4));
            FpElem<T>::mma(o[2 * dp], pf, b[0], b[1]);
            FpElem<T>::mma(o[2 * dp + 1], pf, b[2], b[3]);
        }
    }

    // ---- merge the four warps' partial softmaxes (warp order), through the now idle stages ----
    fp_cp_async_wait<0>();
    __syncthreads();
    l_run0 += __shfl_xor_sync(0xffffffffu, l_run0, 1);
    l_run0 += __shfl_xor_sync(0xffffffffu, l_run0, 2);
    l_run1 += __shfl_xor_sync(0xffffffffu, l_run1, 1);
    l_run1 += __shfl_xor_sync(0xffffffffu, l_run1, 2);
    float* sO = reinterpret_cast<float*>(smem);  // [warp][16 rows][HD]
    float* sM = sO + 4 * 16 * HD;                // [warp][16 rows]
    float* sL = sM + 64;
    {
        float* r0 = sO + (warp * 16 + g) * HD;
        float* r1 = r0 + 8 * HD;
#pragma unroll
        for (int nt = 0; nt < NT_O; ++nt) {
            *reinterpret_cast<float2*>(r0 + nt * 8 + 2 * tq) = make_float2(o[nt][0], o[nt][1]);
            *reinterpret_cast<float2*>(r1 + nt * 8 + 2 * tq) = make_float2(o[nt][2], o[nt][3]);
        }
        if (tq == 0) {
            sM[warp * 16 + g] = m_run0;
            sM[warp * 16 + g + 8] = m_run1;
            sL[warp * 16 + g] = l_run0;
            sL[warp * 16 + g + 8] = l_run1;
        }
    }
    __syncthreads();
    for (int i = tid; i < group * HD; i += FD_THREADS) {
        const int r = i / HD, d = i - r * HD;
        float mx = -IRONLLM_INF;
#pragma unroll
        for (int w = 0; w < 4; ++w) mx = fmaxf(mx, sM[w * 16 + r]);
        float sum = 0.0f, val = 0.0f;
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            const float mw = sM[w * 16 + r];
            if (mw == -IRONLLM_INF) continue;  // a warp whose keys were all past the share
            const float f = fp_exp2(mw - mx);
            sum = fmaf(sL[w * 16 + r], f, sum);
            val = fmaf(sO[(w * 16 + r) * HD + d], f, val);
        }
        if (part_o == nullptr) {
            store_f(out + (head_row0 + r) * HD + d, val / sum);
        } else {
            const long long row = (head_row0 + r) * num_splits + split;
            part_o[row * HD + d] = val / sum;
            if (d == 0) part_lse[row] = mx + log2f(sum);
        }
    }
}

#define FLASH_DECODE_KERNEL(T, SUFFIX, HD) FLASH_DECODE_FORM(T, SUFFIX, HD, , FD_STAGES(HD), FD_MIN_BLOCKS(HD))

// The deep form: three stages for head size 128 (two CTAs per SM instead of three). Each CTA keeps two key
// tiles in flight instead of one, which pays where the (token, KV head, share) CTAs fill about two waves or
// fewer; ops::decode_plan picks the form and the share count from the cost model.
#define FLASH_DECODE_DEEP_KERNEL(T, SUFFIX) FLASH_DECODE_FORM(T, SUFFIX, 128, deep_, 3, 2)

#define FLASH_DECODE_FORM(T, SUFFIX, HD, FORM, STAGES, MIN_BLOCKS)                                            \
    extern "C" __global__ void __launch_bounds__(FD_THREADS, MIN_BLOCKS) flash_decode_##FORM##SUFFIX##_hd##HD( \
        T* __restrict__ out, const T* __restrict__ qkv, const T* __restrict__ k_cache,                        \
        const T* __restrict__ v_cache, const int* __restrict__ block_tables,                                  \
        const int* __restrict__ query_start_loc, const int* __restrict__ context_lens,                        \
        const int* __restrict__ token_to_seq, int num_tokens, int num_heads, int num_kv_heads, int head_dim,  \
        int block_size, int max_blocks_per_seq, float scale) {                                                \
        extern __shared__ __align__(128) unsigned char fd_smem[];                                             \
        flash_decode_impl<T, HD, STAGES>(fd_smem, out, qkv, k_cache, v_cache, block_tables, query_start_loc,  \
                                         context_lens, token_to_seq, num_tokens, num_heads, num_kv_heads,     \
                                         block_size, max_blocks_per_seq, scale, nullptr, nullptr, 1, 1);      \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(FD_THREADS, MIN_BLOCKS)                                     \
        flash_decode_split_##FORM##SUFFIX##_hd##HD(                                                           \
            const T* __restrict__ qkv, const T* __restrict__ k_cache, const T* __restrict__ v_cache,          \
            const int* __restrict__ block_tables, const int* __restrict__ query_start_loc,                    \
            const int* __restrict__ context_lens, const int* __restrict__ token_to_seq, int num_tokens,       \
            int num_heads, int num_kv_heads, int head_dim, int block_size, int max_blocks_per_seq,            \
            float scale, float* __restrict__ part_o, float* __restrict__ part_lse, int num_splits,            \
            int min_split_keys) {                                                                             \
        extern __shared__ __align__(128) unsigned char fd_smem[];                                             \
        flash_decode_impl<T, HD, STAGES>(fd_smem, nullptr, qkv, k_cache, v_cache, block_tables,               \
                                         query_start_loc, context_lens, token_to_seq, num_tokens, num_heads,  \
                                         num_kv_heads, block_size, max_blocks_per_seq, scale, part_o,         \
                                         part_lse, num_splits, min_split_keys);                               \
    }

FLASH_DECODE_KERNEL(bf16, bf16, 64)
FLASH_DECODE_KERNEL(bf16, bf16, 128)
FLASH_DECODE_KERNEL(f16, f16, 64)
FLASH_DECODE_KERNEL(f16, f16, 128)
FLASH_DECODE_DEEP_KERNEL(bf16, bf16)
FLASH_DECODE_DEEP_KERNEL(f16, f16)
