// Per-token layer kernels of the Llama family: embedding lookup, RMSNorm (plain and fused with the residual
// add), the fused Qwen3 q/k-norm + rotary embedding + paged KV-cache write (and its packed form for models
// without q/k norm), SiLU-and-multiply, bias add,
// row gather and dtype casts. Each mimics Hugging Face transformers in the same dtype: where HF rounds an
// intermediate to bf16/f16 we round with `round_to<T>`, and every accumulation is f32. In f32 everything
// is plain f32.
//
// Rows are handled by one block each with a fixed strided thread mapping and `block_sum`'s fixed tree, so
// every result depends only on its own row (batch invariance). Rows whose width and base addresses allow
// it move 16 bytes per load; any other width takes the scalar path.
//
// Launch shapes (all matrices row-major and contiguous; no dynamic shared memory anywhere):
//   embedding_T        grid = (num_tokens),                      block = 256
//   rms_norm_T         grid = (rows),                            block = 256
//   add_rms_norm_T     grid = (rows),                            block = 256
//   qk_norm_rope_kv_T  grid = (num_tokens, ceil((num_heads + num_kv_heads) / 4)), block = 128
//   rope_kv_pack_T     grid = (num_tokens),                      block = ops::rope_kv_pack_threads (<= 1024)
//   silu_and_mul_T     grid = (rows, ceil(inter / 2048)),        block = 256
//   add_bias_T         grid = (rows, ceil(cols / 2048)),         block = 256
//   gather_rows_T      grid = (num_rows),                        block = 256
//   cast_to_f32_T      grid = (any, e.g. min(ceil(n / 2048), 65535)), block = 256 (grid-stride loop)
//   cast_from_f32_T    grid = (any, e.g. min(ceil(n / 2048), 65535)), block = 256 (grid-stride loop)

#define LAYERS_THREADS 256
#define LAYERS_COLS_PER_BLOCK 2048

// Copies one row of `n` elements with the whole block: 16-byte moves when both rows allow them.
template <typename T> __device__ __forceinline__ void layers_copy_row(T* dst, const T* src, int n) {
    const long long bytes = (long long)n * (long long)sizeof(T);
    if ((bytes & 15) == 0 && aligned16(dst) && aligned16(src)) {
        const uint4* s = reinterpret_cast<const uint4*>(src);
        uint4* d = reinterpret_cast<uint4*>(dst);
        const int units = (int)(bytes >> 4);
        for (int i = threadIdx.x; i < units; i += blockDim.x) d[i] = s[i];
    } else {
        for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
    }
}

// ---------------------------------------------------------------------------------------------------
// 1. embedding: out[t, :] = table[ids[t], :]. grid = (num_tokens), block = 256.

template <typename T>
__device__ void embedding_impl(T* out, const T* table, const uint32_t* ids, int num_tokens, int hidden) {
    const int t = blockIdx.x;
    if (t >= num_tokens) return;
    layers_copy_row<T>(out + (long long)t * hidden, table + (long long)ids[t] * hidden, hidden);
}
#define EMBEDDING(T, S)                                                                                   \
    extern "C" __global__ void __launch_bounds__(LAYERS_THREADS)                                          \
        embedding_##S(T* out, const T* table, const uint32_t* ids, int num_tokens, int hidden) {          \
        pdl_enter();                                                                                      \
        embedding_impl<T>(out, table, ids, num_tokens, hidden);                                           \
    }
IRONLLM_FOR_EACH_DTYPE(EMBEDDING)

// ---------------------------------------------------------------------------------------------------
// 2./3. RMSNorm, optionally fused with the residual add. grid = (rows), block = 256.
//   HF: var = mean(x.float()^2); y = (x.float() * rsqrt(var + eps)).to(dtype); out = weight * y.
//   Fused: residual = (residual + x).to(dtype) is stored back first and is what gets normalised.
// Pass 1 accumulates the sum of squares (each thread strided over 16-byte packs, then the block tree);
// pass 2 writes the output from the same thread's packs. Rows of up to RMS_NORM_REG_PACKS packs a thread
// (8192 bf16/f16 elements, 4096 f32) keep their packs and the weight's in registers between the passes,
// and load the weight before the programmatic-launch wait: the weight never depends on earlier kernels,
// and after a decode step's weight stream it comes from memory, a round trip the row's own loads then
// overlap. RMS_NORM_REGS=0 (IRONLLM_KERNEL_DEFINES) re-reads both in pass 2 instead, as before 2026-11-28.
// Either way the arithmetic and its order are the same.
#ifndef RMS_NORM_REGS
#define RMS_NORM_REGS 1
#endif
#define RMS_NORM_REG_PACKS 4

template <typename T, bool kAddResidual>
__device__ void rms_norm_row(T* out, T* residual, const T* x, const T* weight, int hidden, float eps) {
    __shared__ float scratch[32];
    constexpr int N = pack16<T>::N;
    const int row = blockIdx.x;
    const long long base = (long long)row * hidden;
    const T* xr = x + base;
    T* rr = kAddResidual ? residual + base : nullptr;
    T* outr = out + base;
    // The row that gets normalised: the updated residual (fused) or x.
    const T* src = kAddResidual ? (const T*)rr : xr;
    const bool vec = (hidden % N) == 0 && aligned16(xr) && aligned16(outr) && aligned16(weight) &&
                     (!kAddResidual || aligned16(rr));
    const int units = hidden / N;
    const bool regs = RMS_NORM_REGS && vec && units <= RMS_NORM_REG_PACKS * (int)blockDim.x;
    uint4 wp[RMS_NORM_REG_PACKS], vp[RMS_NORM_REG_PACKS];
    if (regs) {
#pragma unroll
        for (int u = 0; u < RMS_NORM_REG_PACKS; ++u) {
            const int c = threadIdx.x + u * blockDim.x;
            if (c < units) wp[u] = reinterpret_cast<const uint4*>(weight)[c];
        }
    }
    pdl_enter();
    float ss = 0.0f;
    if (regs) {
        // Every load first, so they are in flight together.
        uint4 rp[RMS_NORM_REG_PACKS];
#pragma unroll
        for (int u = 0; u < RMS_NORM_REG_PACKS; ++u) {
            const int c = threadIdx.x + u * blockDim.x;
            if (c < units) {
                vp[u] = reinterpret_cast<const uint4*>(xr)[c];
                if (kAddResidual) rp[u] = reinterpret_cast<const uint4*>(rr)[c];
            }
        }
#pragma unroll
        for (int u = 0; u < RMS_NORM_REG_PACKS; ++u) {
            const int c = threadIdx.x + u * blockDim.x;
            if (c >= units) break;
            if (kAddResidual) {
                float v[N], r[N];
                unpack16<T>(vp[u], v);
                unpack16<T>(rp[u], r);
#pragma unroll
                for (int i = 0; i < N; ++i) v[i] = round_to<T>(r[i] + v[i]);
                vp[u] = pack16_from<T>(v);  // exact: v holds T values
                reinterpret_cast<uint4*>(rr)[c] = vp[u];
            }
            ss = rms_sum_squares16<T>(vp[u], ss);
        }
    } else if (vec) {
        for (int c = threadIdx.x; c < units; c += blockDim.x) {
            uint4 p = reinterpret_cast<const uint4*>(xr)[c];
            if (kAddResidual) {
                float v[N], r[N];
                unpack16<T>(p, v);
                unpack16<T>(reinterpret_cast<const uint4*>(rr)[c], r);
#pragma unroll
                for (int i = 0; i < N; ++i) v[i] = round_to<T>(r[i] + v[i]);
                p = pack16_from<T>(v);  // exact: v holds T values
                reinterpret_cast<uint4*>(rr)[c] = p;
            }
            ss = rms_sum_squares16<T>(p, ss);
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            float v = load_f(xr + i);
            if (kAddResidual) {
                v = round_to<T>(load_f(rr + i) + v);
                store_f(rr + i, v);
            }
            ss = fmaf(v, v, ss);
        }
    }
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)hidden + eps);
    if (regs) {
#pragma unroll
        for (int u = 0; u < RMS_NORM_REG_PACKS; ++u) {
            const int c = threadIdx.x + u * blockDim.x;
            if (c >= units) break;
            reinterpret_cast<uint4*>(outr)[c] = rms_scale16<T>(vp[u], wp[u], inv);
        }
    } else if (vec) {
        for (int c = threadIdx.x; c < units; c += blockDim.x)
            reinterpret_cast<uint4*>(outr)[c] = rms_scale16<T>(reinterpret_cast<const uint4*>(src)[c],
                                                               reinterpret_cast<const uint4*>(weight)[c], inv);
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x)
            store_f(outr + i, load_f(weight + i) * round_to<T>(load_f(src + i) * inv));
    }
}

#define RMS_NORM(T, S)                                                                                    \
    extern "C" __global__ void __launch_bounds__(LAYERS_THREADS)                                          \
        rms_norm_##S(T* out, const T* x, const T* weight, int rows, int hidden, float eps) {              \
        if ((int)blockIdx.x >= rows) return;                                                              \
        rms_norm_row<T, false>(out, nullptr, x, weight, hidden, eps);                                     \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(LAYERS_THREADS) add_rms_norm_##S(                        \
        T* residual, const T* x, const T* weight, T* out, int rows, int hidden, float eps) {              \
        if ((int)blockIdx.x >= rows) return;                                                              \
        rms_norm_row<T, true>(out, residual, x, weight, hidden, eps);                                     \
    }
IRONLLM_FOR_EACH_DTYPE(RMS_NORM)

// ---------------------------------------------------------------------------------------------------
// 4. Fused (Qwen3 q/k RMSNorm) + rotate-half RoPE on q and k in place + paged KV-cache write.
//   grid = (num_tokens, ceil((num_heads + num_kv_heads) / 4)), block = 128: one warp per q or k head.
//   qkv row t: [q heads (num_heads) | k heads (num_kv_heads) | v heads (num_kv_heads)] x head_dim.
//   Lane l owns rotary pairs (i, i + head_dim/2) for i = l, l + 32, ... (head_dim <= 256 -> <= 4 pairs).
//   The k-head warps also write k (roped) and v (unchanged) to the caches at slot_mapping[t] (< 0: skip);
//   cache layout [num_blocks, num_kv_heads, block_size, head_dim].

#define QKR_MAX_PAIRS 4

template <typename T>
__device__ void qk_norm_rope_kv_impl(T* qkv, T* k_cache, T* v_cache, const float* cos_table, const float* sin_table,
                                     const int* positions, const int64_t* slot_mapping, const T* q_norm_weight,
                                     const T* k_norm_weight, int num_tokens, int num_heads, int num_kv_heads,
                                     int head_dim, int block_size, float eps) {
    const int t = blockIdx.x;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int head = blockIdx.y * 4 + warp;  // q heads first, then k heads
    if (t >= num_tokens || head >= num_heads + num_kv_heads) return;
    const int half = head_dim >> 1;
    const long long qkv_stride = (long long)(num_heads + 2 * num_kv_heads) * head_dim;
    T* row = qkv + (long long)t * qkv_stride;
    T* x = row + (long long)head * head_dim;
    const bool is_k = head >= num_heads;

    float x1[QKR_MAX_PAIRS], x2[QKR_MAX_PAIRS];
#pragma unroll
    for (int r = 0; r < QKR_MAX_PAIRS; ++r) {
        const int i = lane + 32 * r;
        x1[r] = i < half ? load_f(x + i) : 0.0f;
        x2[r] = i < half ? load_f(x + i + half) : 0.0f;
    }

    if (q_norm_weight != nullptr) {
        const T* wn = is_k ? k_norm_weight : q_norm_weight;
        float ss = 0.0f;
#pragma unroll
        for (int r = 0; r < QKR_MAX_PAIRS; ++r) ss = fmaf(x1[r], x1[r], fmaf(x2[r], x2[r], ss));
        ss = warp_sum(ss);
        const float inv = rsqrtf(ss / (float)head_dim + eps);
#pragma unroll
        for (int r = 0; r < QKR_MAX_PAIRS; ++r) {
            const int i = lane + 32 * r;
            if (i < half) {
                x1[r] = round_to<T>(load_f(wn + i) * round_to<T>(x1[r] * inv));
                x2[r] = round_to<T>(load_f(wn + i + half) * round_to<T>(x2[r] * inv));
            }
        }
    }

    const long long pos = positions[t];
    const float* cs = cos_table + pos * half;
    const float* sn = sin_table + pos * half;
#pragma unroll
    for (int r = 0; r < QKR_MAX_PAIRS; ++r) {
        const int i = lane + 32 * r;
        if (i < half) {
            // __fmul_rn: in f32 (round_to is the identity) a plain product may be contracted into an fma
            // with the sum, one way or the other; rounded products are torch's order and every kernel's.
            const float c = round_to<T>(cs[i]), s = round_to<T>(sn[i]);
            const float a = round_to<T>(__fmul_rn(x1[r], c)) - round_to<T>(__fmul_rn(x2[r], s));
            const float b = round_to<T>(__fmul_rn(x2[r], c)) + round_to<T>(__fmul_rn(x1[r], s));
            x1[r] = round_to<T>(a);
            x2[r] = round_to<T>(b);
            store_f(x + i, x1[r]);
            store_f(x + i + half, x2[r]);
        }
    }

    if (!is_k) return;
    const long long slot = slot_mapping[t];
    if (slot < 0) return;
    const int kvh = head - num_heads;
    const long long blk = slot / block_size, off = slot % block_size;
    const long long base = ((blk * num_kv_heads + kvh) * block_size + off) * head_dim;
#pragma unroll
    for (int r = 0; r < QKR_MAX_PAIRS; ++r) {
        const int i = lane + 32 * r;
        if (i < half) {
            store_f(k_cache + base + i, x1[r]);
            store_f(k_cache + base + i + half, x2[r]);
        }
    }
    const T* v = row + (long long)(num_heads + num_kv_heads + kvh) * head_dim;
    for (int d = lane; d < head_dim; d += 32) v_cache[base + d] = v[d];
}

#define QK_NORM_ROPE_KV(T, S)                                                                             \
    extern "C" __global__ void __launch_bounds__(128) qk_norm_rope_kv_##S(                                \
        T* qkv, T* k_cache, T* v_cache, const float* cos_table, const float* sin_table, const int* positions, \
        const int64_t* slot_mapping, const T* q_norm_weight, const T* k_norm_weight, int num_tokens,      \
        int num_heads, int num_kv_heads, int head_dim, int block_size, float eps) {                       \
        pdl_enter();                                                                                      \
        qk_norm_rope_kv_impl<T>(qkv, k_cache, v_cache, cos_table, sin_table, positions, slot_mapping,     \
                                q_norm_weight, k_norm_weight, num_tokens, num_heads, num_kv_heads, head_dim, \
                                block_size, eps);                                                         \
    }
IRONLLM_FOR_EACH_DTYPE(QK_NORM_ROPE_KV)

// ---------------------------------------------------------------------------------------------------
// 4b. Rotate-half RoPE on q and k in place + paged KV-cache write, without q/k norm, 16 bytes per thread:
//   the per-element arithmetic of section 4 on packs of P = 16 / sizeof(T) adjacent elements.
//   grid = (num_tokens), block = rope_kv_pack_threads (the host's `ops::rope_kv_pack_threads`):
//   items = (num_heads + num_kv_heads) * half / P rotation packs (the pack at c of a head's first half
//   and its partner at c + half) then num_kv_heads * head_dim / P value packs (v row -> v cache), one per
//   thread (block-strided past 1024). For half % P == 0 and 16-byte aligned qkv, caches and rope tables
//   only (the host checks both; else section 4's kernel). Section 4's one-warp-per-head blocks keep only a few
//   bytes per thread in flight behind the position -> table load chain, and bounded it at ~1.7 TB/s in
//   whole workloads; a block per token with 16-byte packs has the whole token row in flight at once.

template <typename T>
__device__ void rope_kv_pack_impl(T* qkv, T* k_cache, T* v_cache, const float* cos_table, const float* sin_table,
                                  const int* positions, const int64_t* slot_mapping, int num_tokens, int num_heads,
                                  int num_kv_heads, int head_dim, int block_size) {
    constexpr int P = pack16<T>::N;
    const int t = blockIdx.x;
    if (t >= num_tokens) return;
    const int half = head_dim >> 1;
    const int ppr = half / P;  // rotation packs per head
    const int rot_items = (num_heads + num_kv_heads) * ppr;
    const int v_ppr = head_dim / P;
    const int items = rot_items + num_kv_heads * v_ppr;
    T* row = qkv + (long long)t * (long long)(num_heads + 2 * num_kv_heads) * head_dim;
    const long long pos = positions[t];
    const long long slot = slot_mapping[t];
    const long long blk = slot / block_size, off = slot % block_size;
    for (int it = threadIdx.x; it < items; it += blockDim.x) {
        if (it < rot_items) {
            const int head = it / ppr;
            const int c = (it - head * ppr) * P;
            T* x = row + (long long)head * head_dim + c;
            float x1[P], x2[P], cs[P], sn[P];
            unpack16<T>(*reinterpret_cast<const uint4*>(x), x1);
            unpack16<T>(*reinterpret_cast<const uint4*>(x + half), x2);
            const float4* cp = reinterpret_cast<const float4*>(cos_table + pos * half + c);
            const float4* sp = reinterpret_cast<const float4*>(sin_table + pos * half + c);
#pragma unroll
            for (int q = 0; q < P / 4; ++q) {
                const float4 a = cp[q], b = sp[q];
                cs[4 * q] = a.x, cs[4 * q + 1] = a.y, cs[4 * q + 2] = a.z, cs[4 * q + 3] = a.w;
                sn[4 * q] = b.x, sn[4 * q + 1] = b.y, sn[4 * q + 2] = b.z, sn[4 * q + 3] = b.w;
            }
#pragma unroll
            for (int j = 0; j < P; ++j) {
                const float c1 = round_to<T>(cs[j]), s1 = round_to<T>(sn[j]);
                const float a = round_to<T>(__fmul_rn(x1[j], c1)) - round_to<T>(__fmul_rn(x2[j], s1));
                const float b = round_to<T>(__fmul_rn(x2[j], c1)) + round_to<T>(__fmul_rn(x1[j], s1));
                x1[j] = round_to<T>(a);
                x2[j] = round_to<T>(b);
            }
            const uint4 u1 = pack16_from<T>(x1), u2 = pack16_from<T>(x2);
            *reinterpret_cast<uint4*>(x) = u1;
            *reinterpret_cast<uint4*>(x + half) = u2;
            if (head >= num_heads && slot >= 0) {
                const long long base = ((blk * num_kv_heads + (head - num_heads)) * block_size + off) * head_dim + c;
                *reinterpret_cast<uint4*>(k_cache + base) = u1;
                *reinterpret_cast<uint4*>(k_cache + base + half) = u2;
            }
        } else if (slot >= 0) {
            const int j = it - rot_items;
            const int kvh = j / v_ppr;
            const int c = (j - kvh * v_ppr) * P;
            const long long base = ((blk * num_kv_heads + kvh) * block_size + off) * head_dim + c;
            *reinterpret_cast<uint4*>(v_cache + base) =
                *reinterpret_cast<const uint4*>(row + (long long)(num_heads + num_kv_heads + kvh) * head_dim + c);
        }
    }
}

#define ROPE_KV_PACK(T, S)                                                                                \
    extern "C" __global__ void __launch_bounds__(1024) rope_kv_pack_##S(                                  \
        T* qkv, T* k_cache, T* v_cache, const float* cos_table, const float* sin_table, const int* positions, \
        const int64_t* slot_mapping, int num_tokens, int num_heads, int num_kv_heads, int head_dim,        \
        int block_size) {                                                                                 \
        pdl_enter();                                                                                      \
        rope_kv_pack_impl<T>(qkv, k_cache, v_cache, cos_table, sin_table, positions, slot_mapping,        \
                             num_tokens, num_heads, num_kv_heads, head_dim, block_size);                  \
    }
IRONLLM_FOR_EACH_DTYPE(ROPE_KV_PACK)

// ---------------------------------------------------------------------------------------------------
// 5. SiLU-and-multiply: out[r, c] = T(round_to<T>(silu(gate[r, c])) * up[r, c]), gate_up row = [gate | up].
//   grid = (rows, ceil(inter / 2048)), block = 256. silu(g) = g / (1 + exp(-g)) in f32: common.cuh's
//   silu_for<T> (the fast exp and divide for 16-bit T), shared with gemm_sm90.cu's fused epilogue.

template <typename T> __device__ void silu_and_mul_impl(T* out, const T* gate_up, int rows, int inter) {
    constexpr int N = pack16<T>::N;
    const int r = blockIdx.x;
    const int c0 = blockIdx.y * LAYERS_COLS_PER_BLOCK;
    if (r >= rows || c0 >= inter) return;
    const int c1 = min(c0 + LAYERS_COLS_PER_BLOCK, inter);
    const T* g = gate_up + (long long)r * 2 * inter;
    const T* u = g + inter;
    T* o = out + (long long)r * inter;
    if ((inter % N) == 0 && aligned16(g) && aligned16(o)) {
        for (int c = c0 + threadIdx.x * N; c < c1; c += blockDim.x * N) {
            float gv[N], uv[N];
            unpack16<T>(*reinterpret_cast<const uint4*>(g + c), gv);
            unpack16<T>(*reinterpret_cast<const uint4*>(u + c), uv);
#pragma unroll
            for (int i = 0; i < N; ++i) gv[i] = round_to<T>(silu_for<T>(gv[i])) * uv[i];
            *reinterpret_cast<uint4*>(o + c) = pack16_from<T>(gv);
        }
    } else {
        for (int c = c0 + threadIdx.x; c < c1; c += blockDim.x)
            store_f(o + c, round_to<T>(silu_for<T>(load_f(g + c))) * load_f(u + c));
    }
}
#define SILU_AND_MUL(T, S)                                                                                \
    extern "C" __global__ void __launch_bounds__(LAYERS_THREADS)                                          \
        silu_and_mul_##S(T* out, const T* gate_up, int rows, int inter) {                                 \
        pdl_enter();                                                                                      \
        silu_and_mul_impl<T>(out, gate_up, rows, inter);                                                  \
    }
IRONLLM_FOR_EACH_DTYPE(SILU_AND_MUL)

// ---------------------------------------------------------------------------------------------------
// 6. Bias add in place: x[r, c] = T(x[r, c] + bias[c]). grid = (rows, ceil(cols / 2048)), block = 256.

template <typename T> __device__ void add_bias_impl(T* x, const T* bias, int rows, int cols) {
    constexpr int N = pack16<T>::N;
    const int r = blockIdx.x;
    const int c0 = blockIdx.y * LAYERS_COLS_PER_BLOCK;
    if (r >= rows || c0 >= cols) return;
    const int c1 = min(c0 + LAYERS_COLS_PER_BLOCK, cols);
    T* xr = x + (long long)r * cols;
    if ((cols % N) == 0 && aligned16(xr) && aligned16(bias)) {
        for (int c = c0 + threadIdx.x * N; c < c1; c += blockDim.x * N) {
            float xv[N], bv[N];
            unpack16<T>(*reinterpret_cast<const uint4*>(xr + c), xv);
            unpack16<T>(*reinterpret_cast<const uint4*>(bias + c), bv);
#pragma unroll
            for (int i = 0; i < N; ++i) xv[i] += bv[i];
            *reinterpret_cast<uint4*>(xr + c) = pack16_from<T>(xv);
        }
    } else {
        for (int c = c0 + threadIdx.x; c < c1; c += blockDim.x) store_f(xr + c, load_f(xr + c) + load_f(bias + c));
    }
}
#define ADD_BIAS(T, S)                                                                                    \
    extern "C" __global__ void __launch_bounds__(LAYERS_THREADS) add_bias_##S(T* x, const T* bias, int rows, int cols) { \
        pdl_enter();                                                                                      \
        add_bias_impl<T>(x, bias, rows, cols);                                                            \
    }
IRONLLM_FOR_EACH_DTYPE(ADD_BIAS)

// ---------------------------------------------------------------------------------------------------
// 7. Row gather: out[i, :] = x[rows[i], :]. grid = (num_rows), block = 256.

#define GATHER_ROWS(T, S)                                                                                 \
    extern "C" __global__ void __launch_bounds__(LAYERS_THREADS)                                          \
        gather_rows_##S(T* out, const T* x, const int* rows, int num_rows, int hidden) {                  \
        pdl_enter();                                                                                      \
        const int i = blockIdx.x;                                                                         \
        if (i >= num_rows) return;                                                                        \
        layers_copy_row<T>(out + (long long)i * hidden, x + (long long)rows[i] * hidden, hidden);         \
    }
IRONLLM_FOR_EACH_DTYPE(GATHER_ROWS)

// ---------------------------------------------------------------------------------------------------
// 8. Elementwise casts to and from f32. Any grid, block = 256 (grid-stride loop); e.g.
//   grid = (min(ceil(n / 2048), 65535)).

#define CASTS(T, S)                                                                                       \
    extern "C" __global__ void __launch_bounds__(LAYERS_THREADS) cast_to_f32_##S(float* out, const T* x, long long n) { \
        const long long stride = (long long)gridDim.x * blockDim.x;                                       \
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)          \
            out[i] = load_f(x + i);                                                                       \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(LAYERS_THREADS) cast_from_f32_##S(T* out, const float* x, long long n) { \
        const long long stride = (long long)gridDim.x * blockDim.x;                                       \
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)          \
            store_f(out + i, x[i]);                                                                       \
    }
IRONLLM_FOR_EACH_DTYPE(CASTS)
