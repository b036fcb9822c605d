// General paged attention for mixed batches: every query row (a decode token or any token of a prefill
// chunk, with or without a cached prefix) attends causally to its sequence's keys in the paged KV cache.
// Used for everything in float32 mode and for decode rows in bf16/f16.
//
// extern "C" paged_attention_T(T* out, const T* qkv, const T* k_cache, const T* v_cache,
//     const int* block_tables, const int* query_start_loc, const int* context_lens, const int* token_to_seq,
//     int num_tokens, int num_heads, int num_kv_heads, int head_dim, int block_size,
//     int max_blocks_per_seq, float scale)
//   grid = (num_tokens, num_kv_heads), block = 128, no dynamic shared memory (static 34 KB).
//   out: [num_tokens, num_heads * head_dim]; qkv: [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim];
//   caches: [num_blocks, num_kv_heads, block_size, head_dim]; block_tables: [num_seqs, max_blocks_per_seq];
//   query_start_loc: [num_seqs + 1]; context_lens: [num_seqs] (cached prefix + this step's tokens, whose
//   K/V are already in the cache); token_to_seq: [num_tokens]. head_dim even and <= 256; block_size >= 1.
//
// One block owns one (token, kv head) pair and all `group = num_heads / num_kv_heads` query heads that
// share it, so each K/V row is read once per group. Query token j of sequence s sits at position
// p = context_lens[s] - query_len + j and sees keys 0..=p.
//
// Work split (depends only on p, head_dim, the dtype and the group size, never on the batch): a K/V row
// is covered by L lanes (L = the power of two >= max(4, head_dim / 8)), each holding 8 consecutive
// elements (16-byte loads when head_dim % 8 == 0 and the caches are 16-byte aligned), so a warp holds
// 32 / L sub-groups and the block P = 4 * 32 / L independent partial softmaxes. Partial `i` takes the keys
// i, i + P, i + 2P, ... in increasing order, keeping its own running max, sum and f32 accumulator (online
// softmax); the partials are then merged in index order 0..P-1. So a token's output is bit-identical
// whether it is computed as a decode row or inside a prefill chunk, alone or in any batch.
//
// Query heads are processed in passes of up to 8 (group <= 8, the usual case, is one pass); a larger
// group re-reads K/V once per pass.
//
// Split-KV (FlashDecoding, vLLM's paged attention v2), for bf16/f16 decode rows when the batch has too
// few (token, kv head) pairs to fill the card: paged_attention_split_T runs grid = (num_tokens,
// num_kv_heads, num_splits); split s of a row with n keys takes keys [s c, (s + 1) c) with
// c = max(ceil(n / num_splits), min_split_keys) (so a short row fills fewer shares than the grid has: a
// grid sized for the longest context, as a captured graph's is, still gives a short row shares of a
// useful size) and writes its normalized output and log2-sum-exp to part_o [num_tokens, num_heads,
// num_splits, head_dim] and part_lse [num_tokens, num_heads, num_splits] (an empty share writes -inf);
// paged_attention_reduce_T (grid = (num_tokens, num_heads)) merges them. The split depends on the batch,
// so it is not used in float32 mode, whose rows must not depend on the batch.

#define ATTN_WARPS 4
#define ATTN_THREADS (ATTN_WARPS * 32)
#define ATTN_MAX_G 8
// Partial accumulators: P * GM * (8 L) = 4 * 32 * 8 * GM <= 8192 floats; the q tile (GM x 8 L) aliases it.
#define ATTN_RED_FLOATS (ATTN_MAX_G * ATTN_WARPS * 32 * 8)
// Running max and sum per partial (P <= 32) and head (GM <= 8).
#define ATTN_ML_FLOATS (ATTN_MAX_G * ATTN_WARPS * 8)
#define ATTN_LOG2E 1.4426950408889634f

// Eight consecutive K or V elements as raw bits: one uint4 for 16-bit types, two for f32.
template <typename T> struct attn_chunk { uint4 v[sizeof(T) == 4 ? 2 : 1]; };

__device__ __forceinline__ unsigned int attn_bits(const float* p) { return __float_as_uint(*p); }
__device__ __forceinline__ unsigned int attn_bits(const bf16* p) { return p->bits; }
__device__ __forceinline__ unsigned int attn_bits(const f16* p) { return p->bits; }

// Loads elements d0..d0+7 of one row; elements at or past head_dim read as zero.
template <typename T>
__device__ __forceinline__ void attn_load_chunk(attn_chunk<T>& c, const T* __restrict__ row, int d0, int head_dim,
                                                bool vec) {
    constexpr int W = sizeof(T) == 4 ? 2 : 1;
    if (vec) {
        // head_dim % 8 == 0: a chunk is either fully inside the row or fully past it.
        if (d0 < head_dim) {
            const uint4* p = reinterpret_cast<const uint4*>(row + d0);
#pragma unroll
            for (int w = 0; w < W; ++w) c.v[w] = p[w];
        } else {
#pragma unroll
            for (int w = 0; w < W; ++w) c.v[w] = make_uint4(0u, 0u, 0u, 0u);
        }
    } else {
        unsigned int wd[4 * W];
#pragma unroll
        for (int i = 0; i < 4 * W; ++i) wd[i] = 0u;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int d = d0 + i;
            const unsigned int b = d < head_dim ? attn_bits(row + d) : 0u;
            if (sizeof(T) == 4) wd[i] = b;
            else wd[i >> 1] |= b << ((i & 1) * 16);
        }
#pragma unroll
        for (int w = 0; w < W; ++w) c.v[w] = make_uint4(wd[4 * w], wd[4 * w + 1], wd[4 * w + 2], wd[4 * w + 3]);
    }
}

template <typename T> __device__ __forceinline__ void attn_chunk_to_float(const attn_chunk<T>& c, float (&f)[8]);
template <> __device__ __forceinline__ void attn_chunk_to_float<float>(const attn_chunk<float>& c, float (&f)[8]) {
#pragma unroll
    for (int w = 0; w < 2; ++w) {
        f[4 * w] = __uint_as_float(c.v[w].x);
        f[4 * w + 1] = __uint_as_float(c.v[w].y);
        f[4 * w + 2] = __uint_as_float(c.v[w].z);
        f[4 * w + 3] = __uint_as_float(c.v[w].w);
    }
}
template <> __device__ __forceinline__ void attn_chunk_to_float<bf16>(const attn_chunk<bf16>& c, float (&f)[8]) {
    const unsigned int w[4] = {c.v[0].x, c.v[0].y, c.v[0].z, c.v[0].w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
template <> __device__ __forceinline__ void attn_chunk_to_float<f16>(const attn_chunk<f16>& c, float (&f)[8]) {
    const unsigned int w[4] = {c.v[0].x, c.v[0].y, c.v[0].z, c.v[0].w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = f16_to_float((f16_t)(w[i] & 0xffffu));
        f[2 * i + 1] = f16_to_float((f16_t)(w[i] >> 16));
    }
}

// One pass over all keys for up to GM query heads of the group; KU keys per sub-group per iteration keep
// 2 * KU independent 16-32 byte loads in flight per lane.
template <typename T, int GM, int KU>
__device__ void attn_heads(float* smem, T* __restrict__ out, const T* __restrict__ qkv, const T* __restrict__ k_cache,
                           const T* __restrict__ v_cache, const int* __restrict__ bt_row, int t, int kvh,
                           int k_begin, int k_end, int num_heads, int num_kv_heads, int head_dim, int block_size,
                           int group, int log2_lanes, float scale_log2, bool vec, float* __restrict__ part_o,
                           float* __restrict__ part_lse, int split, int num_splits) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int lanes = 1 << log2_lanes;                 // L
    const int subgroups = 32 >> log2_lanes;            // per warp
    const int num_partials = ATTN_WARPS * subgroups;   // P
    const int li = lane & (lanes - 1);
    const int my = warp * subgroups + (lane >> log2_lanes);
    const int d0 = li * 8;
    const int hdp = lanes * 8;  // padded head_dim of the q tile and the partial accumulators
    const int key_block = num_partials * KU;  // keys per iteration of the whole block
    const long long qkv_stride = (long long)(num_heads + 2 * num_kv_heads) * head_dim;
    const T* q_row = qkv + (long long)t * qkv_stride + (long long)kvh * group * head_dim;
    T* out_row = out + (long long)t * num_heads * head_dim + (long long)kvh * group * head_dim;
    float* q_s = smem;                      // [GM][hdp]
    float* red = smem;                      // [P][GM][hdp], after the key loop
    float* m_s = smem + ATTN_RED_FLOATS;    // [P][GM]
    float* l_s = m_s + ATTN_ML_FLOATS / 2;  // [P][GM]
    const float neg_inf = -IRONLLM_INF;

    for (int g0 = 0; g0 < group; g0 += GM) {
        const int gn = min(GM, group - g0);
        __syncthreads();  // the previous pass has finished reading `red`, which q_s overwrites
        for (int i = tid; i < GM * hdp; i += ATTN_THREADS) {
            const int g = i / hdp, d = i - g * hdp;
            q_s[i] = (g < gn && d < head_dim) ? load_f(q_row + (long long)(g0 + g) * head_dim + d) : 0.0f;
        }
        __syncthreads();

        float m[GM], l[GM], acc[GM][8];
#pragma unroll
        for (int g = 0; g < GM; ++g) {
            m[g] = neg_inf;
            l[g] = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[g][i] = 0.0f;
        }

        // Physical block of each key of the next iteration, fetched one iteration ahead.
        int page[KU];
#pragma unroll
        for (int u = 0; u < KU; ++u) {
            const int key = k_begin + u * num_partials + my;
            page[u] = key < k_end ? bt_row[key / block_size] : 0;
        }

        for (int kb = k_begin; kb < k_end; kb += key_block) {
            attn_chunk<T> kc[KU], vc[KU];
#pragma unroll
            for (int u = 0; u < KU; ++u) {
                const int key = kb + u * num_partials + my;
                if (key < k_end) {
                    const int off = key % block_size;
                    const long long row = (((long long)page[u] * num_kv_heads + kvh) * block_size + off) * head_dim;
                    attn_load_chunk<T>(kc[u], k_cache + row, d0, head_dim, vec);
                    attn_load_chunk<T>(vc[u], v_cache + row, d0, head_dim, vec);
                } else {
#pragma unroll
                    for (int w = 0; w < (int)(sizeof(kc[u].v) / sizeof(uint4)); ++w)
                        kc[u].v[w] = vc[u].v[w] = make_uint4(0u, 0u, 0u, 0u);
                }
            }
#pragma unroll
            for (int u = 0; u < KU; ++u) {
                const int key = kb + key_block + u * num_partials + my;
                page[u] = key < k_end ? bt_row[key / block_size] : 0;
            }

            // Scores: this lane's 8-element slice of q . k, then a butterfly sum over the sub-group's lanes
            // (every lane ends with the same bits).
            float s[KU][GM];
            {
                float kf[KU][8];
#pragma unroll
                for (int u = 0; u < KU; ++u) attn_chunk_to_float<T>(kc[u], kf[u]);
#pragma unroll
                for (int g = 0; g < GM; ++g) {
                    const float4 qa = *reinterpret_cast<const float4*>(q_s + g * hdp + d0);
                    const float4 qb = *reinterpret_cast<const float4*>(q_s + g * hdp + d0 + 4);
                    const float qv[8] = {qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w};
#pragma unroll
                    for (int u = 0; u < KU; ++u) {
                        float dot = 0.0f;
#pragma unroll
                        for (int i = 0; i < 8; ++i) dot = fmaf(qv[i], kf[u][i], dot);
                        s[u][g] = dot;
                    }
                }
            }
            for (int o = lanes >> 1; o > 0; o >>= 1) {
#pragma unroll
                for (int u = 0; u < KU; ++u)
#pragma unroll
                    for (int g = 0; g < GM; ++g) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], o);
            }

            // Online softmax in the log2 domain: s = scale * log2(e) * q.k.
#pragma unroll
            for (int g = 0; g < GM; ++g) {
                float mx = m[g];
#pragma unroll
                for (int u = 0; u < KU; ++u) {
                    const bool valid = kb + u * num_partials + my < k_end;
                    s[u][g] = valid ? s[u][g] * scale_log2 : neg_inf;
                    mx = fmaxf(mx, s[u][g]);
                }
                if (mx == neg_inf) {
#pragma unroll
                    for (int u = 0; u < KU; ++u) s[u][g] = 0.0f;
                } else {
                    const float corr = exp2f(m[g] - mx);  // 0 while m[g] is still -inf
                    l[g] *= corr;
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[g][i] *= corr;
                    m[g] = mx;
#pragma unroll
                    for (int u = 0; u < KU; ++u) {
                        s[u][g] = exp2f(s[u][g] - mx);  // invalid keys: exp2(-inf) = 0
                        l[g] += s[u][g];
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < KU; ++u) {
                float vf[8];
                attn_chunk_to_float<T>(vc[u], vf);
#pragma unroll
                for (int g = 0; g < GM; ++g)
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(s[u][g], vf[i], acc[g][i]);
            }
        }

        // Merge the P partials in index order.
        __syncthreads();  // every warp is done with q_s, which `red` overwrites
#pragma unroll
        for (int g = 0; g < GM; ++g) {
            float* dst = red + (my * GM + g) * hdp + d0;
            *reinterpret_cast<float4*>(dst) = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
            *reinterpret_cast<float4*>(dst + 4) = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
            if (li == 0) {
                m_s[my * GM + g] = m[g];
                l_s[my * GM + g] = l[g];
            }
        }
        __syncthreads();
        for (int i = tid; i < gn * head_dim; i += ATTN_THREADS) {
            const int g = i / head_dim, d = i - g * head_dim;
            float mx = neg_inf;
            for (int q = 0; q < num_partials; ++q) mx = fmaxf(mx, m_s[q * GM + g]);
            float sum = 0.0f, val = 0.0f;
            for (int q = 0; q < num_partials; ++q) {
                const float mq = m_s[q * GM + g];
                if (mq == neg_inf) continue;  // a partial that saw no key
                const float f = exp2f(mq - mx);
                sum = fmaf(l_s[q * GM + g], f, sum);
                val = fmaf(red[(q * GM + g) * hdp + d], f, val);
            }
            if (part_o == nullptr) {
                store_f(out_row + (long long)(g0 + g) * head_dim + d, val / sum);
            } else {
                // A split's share: its normalized output and log2-sum-exp, merged by the reduce kernel.
                const long long row = ((long long)t * num_heads + (long long)kvh * group + g0 + g) * num_splits + split;
                part_o[row * head_dim + d] = val / sum;
                if (d == 0) part_lse[row] = mx + log2f(sum);
            }
        }
    }
}

template <typename T>
__device__ void paged_attention_impl(float* smem, T* __restrict__ out, const T* __restrict__ qkv,
                                     const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                     const int* __restrict__ block_tables, const int* __restrict__ query_start_loc,
                                     const int* __restrict__ context_lens, const int* __restrict__ token_to_seq,
                                     int num_tokens, int num_heads, int num_kv_heads, int head_dim, int block_size,
                                     int max_blocks_per_seq, float scale, float* __restrict__ part_o,
                                     float* __restrict__ part_lse, int num_splits, int min_split_keys) {
    const int t = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    if (t >= num_tokens || kvh >= num_kv_heads) return;
    const int seq = token_to_seq[t];
    const int q_start = query_start_loc[seq], q_len = query_start_loc[seq + 1] - q_start;
    const int p = context_lens[seq] - q_len + (t - q_start);  // position of this query token
    const int group = num_heads / num_kv_heads;
    if (p < 0) {  // inconsistent metadata: no key to attend to; write zeros rather than garbage
        if (out != nullptr) {
            T* o = out + (long long)t * num_heads * head_dim + (long long)kvh * group * head_dim;
            for (int i = threadIdx.x; i < group * head_dim; i += ATTN_THREADS) store_f(o + i, 0.0f);
        } else {
            for (int g = threadIdx.x; g < group; g += ATTN_THREADS)
                part_lse[((long long)t * num_heads + (long long)kvh * group + g) * num_splits + split] = -IRONLLM_INF;
        }
        return;
    }
    int log2_lanes = 2;
    while ((8 << log2_lanes) < head_dim) ++log2_lanes;
    const bool vec = (head_dim & 7) == 0 && ((((unsigned long long)k_cache) | ((unsigned long long)v_cache)) & 15ull) == 0;
    const float scale_log2 = scale * ATTN_LOG2E;
    const int* bt_row = block_tables + (long long)seq * max_blocks_per_seq;
    // Split-KV: this block takes one contiguous share of the keys, sized from the row's own context.
    int k_begin = 0, k_end = p + 1;
    if (part_o != nullptr) {
        const int chunk = max((p + num_splits) / num_splits, min_split_keys);  // ceil((p + 1) / num_splits)
        k_begin = min(split * chunk, p + 1);
        k_end = min(k_begin + chunk, p + 1);
        if (k_begin >= k_end) {  // nothing left for this split: a share of weight zero
            for (int g = threadIdx.x; g < group; g += ATTN_THREADS)
                part_lse[((long long)t * num_heads + (long long)kvh * group + g) * num_splits + split] = -IRONLLM_INF;
            return;
        }
    }
    // Keys per sub-group per iteration: fewer where more registers go to accumulators (f32, 8 heads).
    constexpr int KU = sizeof(T) == 4 ? 2 : 4;
#define ATTN_CALL(GM)                                                                                     \
    attn_heads<T, GM, (GM >= 8 ? 2 : KU)>(smem, out, qkv, k_cache, v_cache, bt_row, t, kvh, k_begin, k_end, num_heads, \
                          num_kv_heads, head_dim, block_size, group, log2_lanes, scale_log2, vec, part_o, part_lse,   \
                          split, num_splits)
    if (group == 1) ATTN_CALL(1);
    else if (group == 2) ATTN_CALL(2);
    else if (group <= 4) ATTN_CALL(4);
    else ATTN_CALL(8);
#undef ATTN_CALL
}

// Merges the split shares of one (token, head): weights exp2(lse_s - max), in split order.
template <typename T>
__device__ void paged_attention_reduce_impl(T* __restrict__ out, const float* __restrict__ part_o,
                                            const float* __restrict__ part_lse, int num_tokens, int num_heads,
                                            int head_dim, int num_splits) {
    const int t = blockIdx.x, h = blockIdx.y;
    if (t >= num_tokens || h >= num_heads) return;
    const long long row0 = ((long long)t * num_heads + h) * num_splits;
    float mx = -IRONLLM_INF;
    for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, part_lse[row0 + s]);
    for (int d = threadIdx.x; d < head_dim; d += ATTN_THREADS) {
        float sum = 0.0f, val = 0.0f;
        for (int s = 0; s < num_splits; ++s) {
            const float lse = part_lse[row0 + s];
            if (lse == -IRONLLM_INF) continue;
            const float w = exp2f(lse - mx);
            sum += w;
            val = fmaf(w, part_o[(row0 + s) * head_dim + d], val);
        }
        store_f(out + ((long long)t * num_heads + h) * head_dim + d, sum > 0.0f ? val / sum : 0.0f);
    }
}

#define PAGED_ATTENTION(T, S)                                                                             \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS) paged_attention_##S(                       \
        T* __restrict__ out, const T* __restrict__ qkv, const T* __restrict__ k_cache,                    \
        const T* __restrict__ v_cache, const int* __restrict__ block_tables,                              \
        const int* __restrict__ query_start_loc, const int* __restrict__ context_lens,                    \
        const int* __restrict__ token_to_seq, int num_tokens, int num_heads, int num_kv_heads, int head_dim, \
        int block_size, int max_blocks_per_seq, float scale) {                                            \
        __shared__ __align__(16) float smem[ATTN_RED_FLOATS + ATTN_ML_FLOATS];                            \
        pdl_enter();                                                                                      \
        paged_attention_impl<T>(smem, out, qkv, k_cache, v_cache, block_tables, query_start_loc,          \
                                context_lens, token_to_seq, num_tokens, num_heads, num_kv_heads, head_dim, \
                                block_size, max_blocks_per_seq, scale, nullptr, nullptr, 1, 1);           \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS) paged_attention_split_##S(                 \
        const T* __restrict__ qkv, const T* __restrict__ k_cache, const T* __restrict__ v_cache,          \
        const int* __restrict__ block_tables, const int* __restrict__ query_start_loc,                    \
        const int* __restrict__ context_lens, const int* __restrict__ token_to_seq, int num_tokens,       \
        int num_heads, int num_kv_heads, int head_dim, int block_size, int max_blocks_per_seq, float scale, \
        float* __restrict__ part_o, float* __restrict__ part_lse, int num_splits, int min_split_keys) {   \
        __shared__ __align__(16) float smem[ATTN_RED_FLOATS + ATTN_ML_FLOATS];                            \
        pdl_enter();                                                                                      \
        paged_attention_impl<T>(smem, nullptr, qkv, k_cache, v_cache, block_tables, query_start_loc,      \
                                context_lens, token_to_seq, num_tokens, num_heads, num_kv_heads, head_dim, \
                                block_size, max_blocks_per_seq, scale, part_o, part_lse, num_splits,      \
                                min_split_keys);                                                          \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS) paged_attention_reduce_##S(                \
        T* __restrict__ out, const float* __restrict__ part_o, const float* __restrict__ part_lse,        \
        int num_tokens, int num_heads, int head_dim, int num_splits) {                                    \
        pdl_enter();                                                                                      \
        paged_attention_reduce_impl<T>(out, part_o, part_lse, num_tokens, num_heads, head_dim, num_splits); \
    }
IRONLLM_FOR_EACH_DTYPE(PAGED_ATTENTION)
