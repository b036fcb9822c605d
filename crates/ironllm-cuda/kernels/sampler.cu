// The batch sampler on the GPU: one CTA of SMP_THREADS threads per row, the whole batch in one launch.
//
// Per row, in vLLM V1's order (the same as the CPU sampler in crates/ironllm-model/src/sampler):
//  1. logprobs to return come from the raw logits (log-sum-exp, the top-k list, and after the draw the
//     chosen token's logprob and rank);
//  2. the allowed-token mask, 3./4. the banned ids of this step (bad words and min-tokens, resolved on the
//     host), 5. logit bias, 6. repetition / frequency / presence penalties (a sparse per-row list);
//  7. greedy rows take the argmax (lowest id among ties); the others are divided by the temperature,
//     truncated by min-p, top-k and top-p, and drawn from.
//
// Nothing sorts the vocabulary. Thresholds are found by radix selection over order-preserving 32-bit keys
// of the float values: four passes of an 8-bit digit histogram in shared memory, each pass narrowing the
// key prefix. Top-k selects by count, top-p by probability mass held as 2^-40 fixed-point integers, so
// every sum is an integer sum whose result does not depend on the order the atomics land in. Ties at the
// cut are resolved in id order, as the CPU code does.
//
// The draw is the exponential race: the token with the largest `v_i - log(E_i)` wins, E_i ~ Exp(1), which
// picks token i with probability exp(v_i) / sum_j exp(v_j) over the kept set. E_i comes from Philox4x32-10
// (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) keyed by the request's 64-bit
// seed, with the counter (token_index / 4, output position, tag): a request's n-th token depends only on
// its seed, n and its logits, never on the batch, the grid or the thread schedule.
//
// Only the processed logits are written (in place, rows are the caller's scratch); temperature, min-p,
// top-k and top-p are applied on the fly, so a row that has no processor still holds its raw logits when
// its chosen token's logprob and rank are computed. Rows with processors and logprobs copy their raw row
// to a scratch slot first.

#define SMP_THREADS 1024
#define SMP_WARPS (SMP_THREADS / 32)
// Largest top-logprobs list computed on the device; the host handles larger k itself.
#define SMP_KMAX 1024
// Words of the per-row header in the metadata buffer (layout shared with src/sampler.rs).
#define SMP_HDR 24
#define SMP_FLAG_GREEDY 1u
#define SMP_FLAG_LOGPROBS 2u
#define SMP_FLAG_ALLOWED 4u
#define SMP_FLAG_COPY_RAW 8u
// Header words.
#define SMP_H_FLAGS 0
#define SMP_H_TEMPERATURE 1
#define SMP_H_MIN_P 2
#define SMP_H_TOP_K 3
#define SMP_H_TOP_P 4
#define SMP_H_SEED_LO 5
#define SMP_H_SEED_HI 6
#define SMP_H_POS_LO 7
#define SMP_H_POS_HI 8
#define SMP_H_LOGPROBS_K 9
#define SMP_H_RAW_SLOT 10
#define SMP_H_ALLOWED_OFF 11
#define SMP_H_ALLOWED_LEN 12
#define SMP_H_BANNED_OFF 13
#define SMP_H_BANNED_LEN 14
#define SMP_H_BIAS_OFF 15
#define SMP_H_BIAS_LEN 16
#define SMP_H_PEN_OFF 17
#define SMP_H_PEN_LEN 18
#define SMP_H_REPETITION 19
#define SMP_H_FREQUENCY 20
#define SMP_H_PRESENCE 21
// Output words per row: token, chosen logprob bits, chosen rank, number of top entries, then
// (token id, logprob bits) pairs in rank order.
#define SMP_OUT_HEAD 4

#define SMP_NAN __int_as_float(0x7fffffff)
// Probability mass as fixed point: exp(v - max) * 2^40. A 256k vocabulary sums to below 2^59.
#define SMP_FIXED_ONE 1099511627776.0f

typedef unsigned long long smp_u64;

struct SmpShared {
    float f[SMP_WARPS];
    double d[SMP_WARPS];
    uint32_t u[SMP_WARPS];
    uint32_t scan[SMP_WARPS];
    smp_u64 m[SMP_WARPS];
    float best_v[SMP_WARPS];
    uint32_t best_i[SMP_WARPS];
    uint32_t hist_count[256];
    smp_u64 hist[256];
    uint32_t b32[8];
    smp_u64 b64[4];
    float top_val[SMP_KMAX];
    uint32_t top_id[SMP_KMAX];
    uint32_t top_n;
};

__device__ __forceinline__ bool smp_isnan(float v) { return v != v; }

// Order-preserving key: a > b as floats (no NaN) iff key(a) > key(b). -0 and +0 share a key, so key
// equality is float equality.
__device__ __forceinline__ uint32_t smp_key(float x) {
    if (x == 0.0f) x = 0.0f;
    uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float smp_key_to_float(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// ---------------------------------------------------------------------------------------------------
// Block reductions (every thread calls them; every thread gets the result; fixed order).

__device__ __forceinline__ double smp_block_sum_f64(double v, SmpShared& sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) sh.d[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? sh.d[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ uint32_t smp_block_sum_u32(uint32_t v, SmpShared& sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) sh.u[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? sh.u[lane] : 0u;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float smp_block_max(float v, SmpShared& sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) sh.f[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? sh.f[lane] : -IRONLLM_INF;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// (value, index) pair that wins: larger value, then lower index. NaN never wins.
__device__ __forceinline__ void smp_better(float& bv, uint32_t& bi, float v, uint32_t i) {
    if (v > bv || (v == bv && i < bi)) {
        bv = v;
        bi = i;
    }
}

__device__ __forceinline__ uint32_t smp_block_argmax(float bv, uint32_t bi, SmpShared& sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        uint32_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
        smp_better(bv, bi, ov, oi);
    }
    __syncthreads();
    if (lane == 0) {
        sh.best_v[warp] = bv;
        sh.best_i[warp] = bi;
    }
    __syncthreads();
    if (lane < (int)(blockDim.x >> 5)) {
        bv = sh.best_v[lane];
        bi = sh.best_i[lane];
    } else {
        bv = -IRONLLM_INF;
        bi = 0xffffffffu;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        uint32_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
        smp_better(bv, bi, ov, oi);
    }
    return bi;
}

// Exclusive prefix sum over the block in thread order; `total` gets the block's sum.
__device__ __forceinline__ uint32_t smp_block_excl_scan(uint32_t v, uint32_t& total, SmpShared& sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    uint32_t incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        uint32_t n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
    }
    __syncthreads();
    if (lane == 31) sh.u[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        uint32_t w = lane < nwarps ? sh.u[lane] : 0u;
        uint32_t winc = w;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            uint32_t n = __shfl_up_sync(0xffffffffu, winc, o);
            if (lane >= o) winc += n;
        }
        sh.scan[lane] = winc - w;
        if (lane == 31) sh.b32[7] = winc;
    }
    __syncthreads();
    total = sh.b32[7];
    return sh.scan[warp] + incl - v;
}

// ---------------------------------------------------------------------------------------------------
// Row traversal. Thread t visits elements 4t..4t+3 of each tile of 4 * blockDim elements; the loop trip
// count is the same for every thread (warp-wide intrinsics inside stay converged), `ok` says whether the
// element exists.

template <class B>
__device__ __forceinline__ void smp_for_each_converged(int vocab, B body) {
    const int tile = 4 * (int)blockDim.x;
    for (int base = 0; base < vocab; base += tile) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int i = base + 4 * (int)threadIdx.x + j;
            body(i, i < vocab);
        }
    }
}

// Largest value of the row (NaN ignored; -inf if none).
template <class F>
__device__ float smp_row_max(F val, int vocab, SmpShared& sh) {
    float m = -IRONLLM_INF;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, val(i));
    return smp_block_max(m, sh);
}

// Index of the largest value, lowest index among ties, NaN ignored; 0 when every value is NaN (as the
// CPU's argmax and torch.argmax on a fully masked row).
template <class F>
__device__ uint32_t smp_row_argmax(F val, int vocab, SmpShared& sh) {
    float bv = -IRONLLM_INF;
    uint32_t bi = 0xffffffffu;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) smp_better(bv, bi, val(i), (uint32_t)i);
    uint32_t best = smp_block_argmax(bv, bi, sh);
    return best == 0xffffffffu ? 0u : best;
}

// Id of the m-th (1-based) element, in id order, for which pred holds; 0xffffffff if there are fewer.
template <class P>
__device__ uint32_t smp_nth_in_id_order(P pred, int vocab, uint32_t m, SmpShared& sh) {
    if (threadIdx.x == 0) sh.b32[6] = 0xffffffffu;
    __syncthreads();
    uint32_t before = 0;
    const int tile = 4 * (int)blockDim.x;
    for (int base = 0; base < vocab; base += tile) {
        uint32_t bits = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int i = base + 4 * (int)threadIdx.x + j;
            if (i < vocab && pred(i)) bits |= 1u << j;
        }
        const uint32_t c = __popc(bits);
        uint32_t total;
        const uint32_t excl = smp_block_excl_scan(c, total, sh);
        if (before + excl < m && m <= before + excl + c) {
            uint32_t want = m - before - excl;  // 1-based among this thread's bits
            for (int j = 0; j < 4; ++j) {
                if (bits & (1u << j)) {
                    if (--want == 0) {
                        sh.b32[6] = (uint32_t)(base + 4 * (int)threadIdx.x + j);
                        break;
                    }
                }
            }
        }
        before += total;
        if (before >= m) break;  // uniform: `before` is the same in every thread
    }
    __syncthreads();
    const uint32_t id = sh.b32[6];
    __syncthreads();
    return id;
}

// Warp 0: in the descending digit order of `sh.hist`, the digit where the running sum first reaches
// `need`. Writes the digit to sh.b32[0] and the sum of the bins above it to sh.b64[0].
__device__ __forceinline__ void smp_scan_digits(smp_u64 need, SmpShared& sh) {
    const int lane = threadIdx.x & 31;
    smp_u64 lane_sum = 0;
#pragma unroll
    for (int b = 0; b < 8; ++b) lane_sum += sh.hist[255 - 8 * lane - b];
    smp_u64 incl = lane_sum;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        smp_u64 n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
    }
    const smp_u64 all = __shfl_sync(0xffffffffu, incl, 31);
    if (need > all) need = all;
    if (need == 0) need = 1;
    const uint32_t reach = __ballot_sync(0xffffffffu, incl >= need);
    // `reach` is empty only for an empty histogram; then digit 0 (the caller never relies on it).
    const int crossing = reach ? __ffs(reach) - 1 : 31;
    if (lane == crossing) {
        smp_u64 c = incl - lane_sum;
        int digit = 255 - 8 * lane - 7;
        for (int b = 0; b < 8; ++b) {
            const int d = 255 - 8 * lane - b;
            if (c + sh.hist[d] >= need) {
                digit = d;
                break;
            }
            c += sh.hist[d];
        }
        if (!reach) {
            digit = 0;
            c = 0;
        }
        sh.b32[0] = (uint32_t)digit;
        sh.b64[0] = c;
    }
}

// Result of a radix selection.
struct SmpSelect {
    uint32_t key;        // the selected key
    smp_u64 above;       // count (or mass) of the elements with a larger key
    smp_u64 remaining;   // need - above: how much of the selected key's bin is needed
    uint32_t tie_count;  // elements with exactly the selected key
    smp_u64 tie_mass;    // their mass (MASS only)
    smp_u64 total;       // count (or mass) of every included element
};

// Radix selection over the keys of the included elements (val(i) not NaN). Count mode (MASS false):
// the key of the need-th largest element (need is clamped to the number of elements). Mass mode: with
// need = ceil(top_p * total mass), the key K with mass(key > K) < need <= mass(key >= K); the weight of
// value v is exp(v - max) in 2^-40 fixed point, and elements of zero weight are left out.
template <bool MASS, class F>
__device__ SmpSelect smp_radix_select(F val, int vocab, smp_u64 need, float top_p, float max, SmpShared& sh) {
    const int lane = threadIdx.x & 31;
    SmpSelect r;
    r.above = 0;
    r.tie_count = 0;
    r.tie_mass = 0;
    r.total = 0;
    uint32_t prefix = 0, prefix_mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) {
            sh.hist[b] = 0;
            sh.hist_count[b] = 0;
        }
        __syncthreads();
        smp_for_each_converged(vocab, [&](int i, bool ok) {
            const float v = ok ? val(i) : SMP_NAN;
            uint32_t key = 0;
            smp_u64 w = 0;
            bool in = !smp_isnan(v);
            if (in) {
                key = smp_key(v);
                in = (key & prefix_mask) == prefix;
            }
            if (MASS && in) {
                w = __float2ull_rz(expf(__fsub_rn(v, max)) * SMP_FIXED_ONE);
                in = w != 0;
            }
            const uint32_t bin = in ? (key >> shift) & 255u : 256u;
            // Lanes with the same bin add once: shared atomics on one address serialise, and most of a
            // row shares the top digits.
            const uint32_t peers = __match_any_sync(0xffffffffu, bin);
            const int leader = __ffs(peers) - 1;
            if (MASS) {
                smp_u64 sum = 0;
#pragma unroll
                for (int l = 0; l < 32; ++l) {
                    const smp_u64 o = __shfl_sync(0xffffffffu, w, l);
                    if (peers & (1u << l)) sum += o;
                }
                if (in && lane == leader) {
                    atomicAdd(&sh.hist[bin], sum);
                    atomicAdd(&sh.hist_count[bin], (uint32_t)__popc(peers));
                }
            } else if (in && lane == leader) {
                atomicAdd(&sh.hist[bin], (smp_u64)__popc(peers));
            }
        });
        __syncthreads();
        if (threadIdx.x < 32) {
            if (shift == 24) {
                smp_u64 t = 0;
                for (int b = lane; b < 256; b += 32) t += sh.hist[b];
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
                if (MASS) {
                    // The smallest head with mass >= top_p of the total.
                    double target = ceil((double)top_p * (double)t);
                    need = target < 1.0 ? 1ull : (smp_u64)target;
                }
                if (need > t) need = t;
                if (lane == 0) sh.b64[1] = t;
            }
            smp_scan_digits(need, sh);
            if (lane == 0) sh.b64[2] = need;
        }
        __syncthreads();
        const uint32_t digit = sh.b32[0];
        const smp_u64 above = sh.b64[0];
        need = sh.b64[2];
        if (shift == 24) r.total = sh.b64[1];
        r.above += above;
        need -= above;
        prefix |= digit << shift;
        prefix_mask |= 255u << shift;
        if (shift == 0) {
            r.tie_count = MASS ? sh.hist_count[digit] : (uint32_t)sh.hist[digit];
            r.tie_mass = MASS ? sh.hist[digit] : 0;
        }
        __syncthreads();
    }
    r.key = prefix;
    r.remaining = need;
    return r;
}

// log(sum(exp(x))) of the row, NaN ignored; the maximum itself when that is not finite.
template <class F>
__device__ float smp_log_sum_exp(F val, int vocab, SmpShared& sh) {
    const float mx = smp_row_max(val, vocab, sh);
    if (!(mx > -IRONLLM_INF && mx < IRONLLM_INF)) return mx;
    double s = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = val(i);
        if (!smp_isnan(v)) s += (double)expf(__fsub_rn(v, mx));
    }
    s = smp_block_sum_f64(s, sh);
    return __fadd_rn(mx, (float)log(s));
}

// The k largest raw values (k <= SMP_KMAX), NaN skipped, in descending order with the lower id first
// among ties, written as (id, logprob bits) pairs to out[SMP_OUT_HEAD..]; their number to out[3].
template <class F>
__device__ void smp_top_logprobs(F val, int vocab, uint32_t k, float lse, uint32_t* out, SmpShared& sh) {
    if (k > SMP_KMAX) k = SMP_KMAX;
    if (k == 0) {
        if (threadIdx.x == 0) out[3] = 0;
        return;
    }
    const SmpSelect sel = smp_radix_select<false>(val, vocab, (smp_u64)k, 1.0f, 0.0f, sh);
    const uint32_t n = (uint32_t)(sel.total < (smp_u64)k ? sel.total : (smp_u64)k);
    if (n == 0) {
        if (threadIdx.x == 0) out[3] = 0;
        return;
    }
    const uint32_t kth = sel.key;
    // Of the elements equal to the k-th value, the lowest ids fill the list.
    const uint32_t ties_needed = n - (uint32_t)sel.above;
    uint32_t tie_cut = 0xffffffffu;
    if (ties_needed < sel.tie_count) {
        tie_cut = smp_nth_in_id_order(
            [&](int i) {
                const float v = val(i);
                return !smp_isnan(v) && smp_key(v) == kth;
            },
            vocab, ties_needed, sh);
    }
    if (threadIdx.x == 0) sh.top_n = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = val(i);
        if (smp_isnan(v)) continue;
        const uint32_t key = smp_key(v);
        if (key > kth || (key == kth && (uint32_t)i <= tie_cut)) {
            const uint32_t slot = atomicAdd(&sh.top_n, 1u);
            if (slot < SMP_KMAX) {
                sh.top_val[slot] = v == 0.0f ? 0.0f : v;
                sh.top_id[slot] = (uint32_t)i;
            }
        }
    }
    __syncthreads();
    const uint32_t got = sh.top_n < n ? sh.top_n : n;
    // Rank sort of at most SMP_KMAX entries: each entry's position is the number that precede it.
    for (uint32_t j = threadIdx.x; j < got; j += blockDim.x) {
        const float vj = sh.top_val[j];
        const uint32_t ij = sh.top_id[j];
        uint32_t pos = 0;
        for (uint32_t l = 0; l < got; ++l) {
            const float vl = sh.top_val[l];
            pos += (vl > vj || (vl == vj && sh.top_id[l] < ij)) ? 1u : 0u;
        }
        out[SMP_OUT_HEAD + 2 * pos] = ij;
        out[SMP_OUT_HEAD + 2 * pos + 1] = __float_as_uint(__fsub_rn(vj, lse));
    }
    if (threadIdx.x == 0) out[3] = got;
    __syncthreads();
}

// The chosen token's raw logprob and vLLM's rank (the number of tokens with a logit >= its logit).
__device__ void smp_chosen_logprob(const float* raw, int vocab, uint32_t chosen, float lse, uint32_t* out, SmpShared& sh) {
    const float cv = chosen < (uint32_t)vocab ? raw[chosen] : -IRONLLM_INF;
    uint32_t c = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) c += raw[i] >= cv ? 1u : 0u;
    c = smp_block_sum_u32(c, sh);
    if (threadIdx.x == 0) {
        out[1] = __float_as_uint(__fsub_rn(cv, lse));
        out[2] = c;
    }
}

// ---------------------------------------------------------------------------------------------------
// Philox4x32-10: a counter-based generator; the same (counter, key) always gives the same four words.

__device__ __forceinline__ uint4 smp_philox(uint4 c, uint32_t k0, uint32_t k1) {
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        const uint32_t lo0 = 0xD2511F53u * c.x, hi0 = __umulhi(0xD2511F53u, c.x);
        const uint32_t lo1 = 0xCD9E8D57u * c.z, hi1 = __umulhi(0xCD9E8D57u, c.z);
        c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return c;
}

// An Exp(1) variate from 32 random bits, as -log(1 - u) with u in (0, 1): the small values, which decide
// the race, keep full float precision.
__device__ __forceinline__ float smp_exponential(uint32_t bits) {
    float u = fmaf(__uint2float_rn(bits), 2.3283064365386963e-10f, 1.1641532182693481e-10f);
    u = fminf(u, 0.99999994f);
    return -log1pf(-u);
}

// Domain tag in the last counter word, so other users of Philox with the same seed draw other numbers.
#define SMP_PHILOX_TAG 0x53414d50u

// The random path for one row: temperature, min-p, top-k, top-p, then the exponential race.
__device__ uint32_t smp_sample_random(const float* x, int vocab, const uint32_t* h, SmpShared& sh) {
    const float temperature = __uint_as_float(h[SMP_H_TEMPERATURE]);
    const float min_p = __uint_as_float(h[SMP_H_MIN_P]);
    const uint32_t top_k = h[SMP_H_TOP_K];
    const float top_p = __uint_as_float(h[SMP_H_TOP_P]);

    // x / 1 == x exactly in IEEE arithmetic, so the division is skipped at temperature 1 (bit for bit).
    const bool unit = temperature == 1.0f;
    auto scaled = [&](int i) { return unit ? x[i] : __fdiv_rn(x[i], temperature); };
    const float mx = smp_row_max(scaled, vocab, sh);
    // Every token masked: no distribution; the argmax fallback keeps the step defined (as the CPU).
    if (!(mx > -IRONLLM_INF)) return smp_row_argmax(scaled, vocab, sh);

    // min-p: p < min_p * p_max  <=>  v < max + ln(min_p).
    const float min_p_floor = min_p > 0.0f ? __fadd_rn(mx, logf(min_p)) : -IRONLLM_INF;
    auto after_min_p = [&](int i) {
        const float s = scaled(i);
        return s < min_p_floor ? -IRONLLM_INF : s;
    };

    // top-k: keep values >= the k-th largest (ties with it included, as vLLM's `logits < kth` mask).
    float top_k_floor = -IRONLLM_INF;
    if (top_k > 0 && top_k < (uint32_t)vocab) {
        const SmpSelect sel = smp_radix_select<false>(after_min_p, vocab, (smp_u64)top_k, 1.0f, 0.0f, sh);
        top_k_floor = smp_key_to_float(sel.key);
    }
    auto kept_value = [&](int i) {
        const float v = after_min_p(i);
        return (v > -IRONLLM_INF && v >= top_k_floor) ? v : SMP_NAN;
    };

    // top-p over the distribution left by min-p and top-k: the smallest head (descending value, then
    // ascending id) holding at least top_p of its mass.
    const bool use_top_p = top_p < 1.0f;
    uint32_t p_key = 0, p_tie_cut = 0xffffffffu;
    if (use_top_p) {
        const SmpSelect sel = smp_radix_select<true>(kept_value, vocab, 0, top_p, mx, sh);
        p_key = sel.key;
        if (sel.tie_count > 1 && sel.tie_mass > 0) {
            const smp_u64 w = sel.tie_mass / sel.tie_count;
            smp_u64 m = (sel.remaining + w - 1) / w;
            if (m < 1) m = 1;
            if (m < sel.tie_count) {
                p_tie_cut = smp_nth_in_id_order(
                    [&](int i) {
                        const float v = kept_value(i);
                        return !smp_isnan(v) && smp_key(v) == p_key;
                    },
                    vocab, (uint32_t)m, sh);
            }
        }
    }

    // The race: argmax over kept tokens of v_i - log(E_i); ties (probability zero) to the lower id.
    const uint32_t seed_lo = h[SMP_H_SEED_LO], seed_hi = h[SMP_H_SEED_HI];
    const uint32_t pos_lo = h[SMP_H_POS_LO], pos_hi = h[SMP_H_POS_HI];
    float bv = -IRONLLM_INF;
    uint32_t bi = 0xffffffffu;
    const int groups = (vocab + 3) >> 2;
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
        float v[4];
        bool any = false;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int i = 4 * g + j;
            v[j] = i < vocab ? kept_value(i) : SMP_NAN;
            if (!smp_isnan(v[j]) && use_top_p) {
                const uint32_t key = smp_key(v[j]);
                if (key < p_key || (key == p_key && (uint32_t)i > p_tie_cut)) v[j] = SMP_NAN;
            }
            any |= !smp_isnan(v[j]);
        }
        if (!any) continue;
        const uint4 r = smp_philox(make_uint4((uint32_t)g, pos_lo, pos_hi, SMP_PHILOX_TAG), seed_lo, seed_hi);
        const uint32_t words[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (smp_isnan(v[j])) continue;
            const float score = __fsub_rn(v[j], logf(smp_exponential(words[j])));
            // A kept token always beats "none yet", even at a score of -inf.
            if (bi == 0xffffffffu) {
                bv = score;
                bi = (uint32_t)(4 * g + j);
            } else {
                smp_better(bv, bi, score, (uint32_t)(4 * g + j));
            }
        }
    }
    const uint32_t best = smp_block_argmax(bv, bi, sh);
    return best == 0xffffffffu ? smp_row_argmax(kept_value, vocab, sh) : best;
}

// logits: [rows, vocab] f32, processed in place. meta: per-row headers ([rows, SMP_HDR]) followed by the
// rows' lists (allowed ids; banned ids; (id, bias bits) pairs; (id, output count, in-prompt) triples).
// saved: [meta length] f32 scratch for the allowed mask. raw_scratch: [slots, vocab] copies of raw rows.
// out: [rows, out_stride] u32. Grid: (rows), block: (SMP_THREADS).
extern "C" __global__ void __launch_bounds__(SMP_THREADS)
sampler_sample_f32(float* logits, int vocab, const uint32_t* meta, float* saved, float* raw_scratch, uint32_t* out,
                   int out_stride) {
    __shared__ SmpShared sh;
    const size_t row = blockIdx.x;
    const uint32_t* h = meta + row * SMP_HDR;
    float* x = logits + row * (size_t)vocab;
    uint32_t* o = out + row * (size_t)out_stride;
    const uint32_t flags = h[SMP_H_FLAGS];
    const int tid = threadIdx.x, nt = blockDim.x;

    // (1) Raw logprobs: the top list now, the chosen token's after the draw.
    const float* raw = x;
    float lse = 0.0f;
    if (flags & SMP_FLAG_LOGPROBS) {
        auto raw_val = [&](int i) { return x[i]; };
        lse = smp_log_sum_exp(raw_val, vocab, sh);
        smp_top_logprobs(raw_val, vocab, h[SMP_H_LOGPROBS_K], lse, o, sh);
        if (flags & SMP_FLAG_COPY_RAW) {
            float* copy = raw_scratch + (size_t)h[SMP_H_RAW_SLOT] * vocab;
            for (int i = tid; i < vocab; i += nt) copy[i] = x[i];
            raw = copy;
        }
        __syncthreads();
    }

    // (2) Allowed-token mask: save the allowed values, fill with -inf, restore.
    if (flags & SMP_FLAG_ALLOWED) {
        const uint32_t off = h[SMP_H_ALLOWED_OFF], len = h[SMP_H_ALLOWED_LEN];
        for (uint32_t j = tid; j < len; j += nt) saved[off + j] = x[meta[off + j]];
        __syncthreads();
        for (int i = tid; i < vocab; i += nt) x[i] = -IRONLLM_INF;
        __syncthreads();
        for (uint32_t j = tid; j < len; j += nt) x[meta[off + j]] = saved[off + j];
        __syncthreads();
    }
    // (3, 4) Bad words and min-tokens: the ids banned this step.
    {
        const uint32_t off = h[SMP_H_BANNED_OFF], len = h[SMP_H_BANNED_LEN];
        for (uint32_t j = tid; j < len; j += nt) x[meta[off + j]] = -IRONLLM_INF;
        if (len) __syncthreads();
    }
    // (5) Logit bias (ids unique per row).
    {
        const uint32_t off = h[SMP_H_BIAS_OFF], len = h[SMP_H_BIAS_LEN];
        for (uint32_t j = tid; j < len; j += nt) {
            const uint32_t id = meta[off + 2 * j];
            x[id] = __fadd_rn(x[id], __uint_as_float(meta[off + 2 * j + 1]));
        }
        if (len) __syncthreads();
    }
    // (6) Penalties (ids unique per row): repetition over prompt and output tokens, then frequency and
    // presence over output tokens, with the CPU's roundings (no fused multiply-add).
    {
        const uint32_t off = h[SMP_H_PEN_OFF], len = h[SMP_H_PEN_LEN];
        const float repetition = __uint_as_float(h[SMP_H_REPETITION]);
        const float frequency = __uint_as_float(h[SMP_H_FREQUENCY]);
        const float presence = __uint_as_float(h[SMP_H_PRESENCE]);
        for (uint32_t j = tid; j < len; j += nt) {
            const uint32_t id = meta[off + 3 * j], count = meta[off + 3 * j + 1], in_prompt = meta[off + 3 * j + 2];
            float v = x[id];
            if (repetition != 1.0f && (count > 0 || in_prompt)) {
                v = v > 0.0f ? __fdiv_rn(v, repetition) : __fmul_rn(v, repetition);
            }
            if (count > 0 && (frequency != 0.0f || presence != 0.0f)) {
                v = __fsub_rn(__fsub_rn(v, __fmul_rn(frequency, (float)count)), presence);
            }
            x[id] = v;
        }
        if (len) __syncthreads();
    }

    // (7) Choose.
    uint32_t token;
    if (flags & SMP_FLAG_GREEDY) {
        token = smp_row_argmax([&](int i) { return x[i]; }, vocab, sh);
    } else {
        token = smp_sample_random(x, vocab, h, sh);
    }
    if (flags & SMP_FLAG_LOGPROBS) smp_chosen_logprob(raw, vocab, token, lse, o, sh);
    if (tid == 0) o[0] = token;
}

// Prompt logprobs: row r of logits ([rows, vocab], raw) -> logprob and rank of targets[r] plus the top k.
// Same output layout as sampler_sample_f32. Grid: (rows), block: (SMP_THREADS).
extern "C" __global__ void __launch_bounds__(SMP_THREADS)
sampler_prompt_logprobs_f32(const float* logits, int vocab, const uint32_t* targets, uint32_t k, uint32_t* out,
                            int out_stride) {
    __shared__ SmpShared sh;
    const size_t row = blockIdx.x;
    const float* x = logits + row * (size_t)vocab;
    uint32_t* o = out + row * (size_t)out_stride;
    auto raw_val = [&](int i) { return x[i]; };
    const float lse = smp_log_sum_exp(raw_val, vocab, sh);
    smp_top_logprobs(raw_val, vocab, k, lse, o, sh);
    const uint32_t target = targets[row];
    smp_chosen_logprob(x, vocab, target, lse, o, sh);
    if (threadIdx.x == 0) o[0] = target;
}

// ---------------------------------------------------------------------------------------------------
// The plain rows of a small batch, split over many blocks. A row with no processor, no logprobs and no
// truncation (greedy, or temperature alone) needs one pass: the argmax, or the race. One block per row
// leaves most of the card idle at batch 1 (a 128k-token row then costs ~0.13 ms on one SM), so
// sampler_plain_split_f32 gives each row `splits` blocks, each over a slice of whole 4-token groups, and
// sampler_plain_merge_f32 merges their (value, index) winners with the same order (larger value, then
// lower id). Every score is computed exactly as in sampler_sample_f32 (the same division, Philox counter
// and logarithms), and the merge order is total, so the token is the one sampler_sample_f32 picks.
//
// partial: [rows, splits, 4] words: race winner (score bits, id), argmax of the scaled row (value bits,
// id); id 0xffffffff = none. Grid: (rows, splits), block: SMP_PLAIN_THREADS; then (rows), 32.

#define SMP_PLAIN_THREADS 256

__device__ __forceinline__ void smp_warp_best(float& bv, uint32_t& bi) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const uint32_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (oi != 0xffffffffu && (bi == 0xffffffffu || ov > bv || (ov == bv && oi < bi))) {
            bv = ov;
            bi = oi;
        }
    }
}

extern "C" __global__ void __launch_bounds__(SMP_PLAIN_THREADS)
sampler_plain_split_f32(const float* logits, int vocab, const uint32_t* meta, uint32_t* partial, int splits) {
    __shared__ float s_v[2][SMP_PLAIN_THREADS / 32];
    __shared__ uint32_t s_i[2][SMP_PLAIN_THREADS / 32];
    const size_t row = blockIdx.x;
    const int split = blockIdx.y;
    const uint32_t* h = meta + row * SMP_HDR;
    const float* x = logits + row * (size_t)vocab;
    const bool greedy = h[SMP_H_FLAGS] & SMP_FLAG_GREEDY;
    const float temperature = __uint_as_float(h[SMP_H_TEMPERATURE]);
    // Greedy rows compare raw values; at temperature 1 the division would return x exactly.
    const bool keep = greedy || temperature == 1.0f;
    const uint32_t seed_lo = h[SMP_H_SEED_LO], seed_hi = h[SMP_H_SEED_HI];
    const uint32_t pos_lo = h[SMP_H_POS_LO], pos_hi = h[SMP_H_POS_HI];
    const int groups = (vocab + 3) >> 2;
    const int per = (groups + splits - 1) / splits;
    const int g0 = split * per, g1 = min(g0 + per, groups);
    // Race winner (kept tokens only) and argmax of the scaled values (the fallback of a fully masked row).
    float rv = -IRONLLM_INF, av = -IRONLLM_INF;
    uint32_t ri = 0xffffffffu, ai = 0xffffffffu;
    for (int g = g0 + (int)threadIdx.x; g < g1; g += blockDim.x) {
        float v[4];
        bool any = false;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int i = 4 * g + j;
            v[j] = i < vocab ? (keep ? x[i] : __fdiv_rn(x[i], temperature)) : SMP_NAN;
            smp_better(av, ai, v[j], (uint32_t)i);
            any |= !smp_isnan(v[j]) && v[j] > -IRONLLM_INF;
        }
        if (greedy || !any) continue;
        const uint4 r = smp_philox(make_uint4((uint32_t)g, pos_lo, pos_hi, SMP_PHILOX_TAG), seed_lo, seed_hi);
        const uint32_t words[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (smp_isnan(v[j]) || !(v[j] > -IRONLLM_INF)) continue;
            const float score = __fsub_rn(v[j], logf(smp_exponential(words[j])));
            if (ri == 0xffffffffu) {
                rv = score;
                ri = (uint32_t)(4 * g + j);
            } else {
                smp_better(rv, ri, score, (uint32_t)(4 * g + j));
            }
        }
    }
    smp_warp_best(rv, ri);
    smp_warp_best(av, ai);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        s_v[0][warp] = rv;
        s_i[0][warp] = ri;
        s_v[1][warp] = av;
        s_i[1][warp] = ai;
    }
    __syncthreads();
    if (warp == 0) {
        const bool ok = lane < (int)(blockDim.x >> 5);
        rv = ok ? s_v[0][lane] : -IRONLLM_INF;
        ri = ok ? s_i[0][lane] : 0xffffffffu;
        av = ok ? s_v[1][lane] : -IRONLLM_INF;
        ai = ok ? s_i[1][lane] : 0xffffffffu;
        smp_warp_best(rv, ri);
        smp_warp_best(av, ai);
        if (lane == 0) {
            uint32_t* p = partial + (row * (size_t)splits + split) * 4;
            p[0] = __float_as_uint(rv);
            p[1] = ri;
            p[2] = __float_as_uint(av);
            p[3] = ai;
        }
    }
}

extern "C" __global__ void __launch_bounds__(32)
sampler_plain_merge_f32(const uint32_t* meta, const uint32_t* partial, int splits, uint32_t* out, int out_stride) {
    const size_t row = blockIdx.x;
    const int lane = threadIdx.x;
    const uint32_t* h = meta + row * SMP_HDR;
    float rv = -IRONLLM_INF, av = -IRONLLM_INF;
    uint32_t ri = 0xffffffffu, ai = 0xffffffffu;
    for (int s = lane; s < splits; s += 32) {
        const uint32_t* p = partial + (row * (size_t)splits + s) * 4;
        const float pv = __uint_as_float(p[0]), qv = __uint_as_float(p[2]);
        if (p[1] != 0xffffffffu && (ri == 0xffffffffu || pv > rv || (pv == rv && p[1] < ri))) {
            rv = pv;
            ri = p[1];
        }
        if (p[3] != 0xffffffffu && (ai == 0xffffffffu || qv > av || (qv == av && p[3] < ai))) {
            av = qv;
            ai = p[3];
        }
    }
    smp_warp_best(rv, ri);
    smp_warp_best(av, ai);
    if (lane == 0) {
        // Greedy: the argmax (0 when every value is NaN). Random: the race winner; a row with no kept token
        // (every value -inf or NaN) falls back to the argmax, as sampler_sample_f32 does.
        const bool greedy = h[SMP_H_FLAGS] & SMP_FLAG_GREEDY;
        const uint32_t arg = ai == 0xffffffffu ? 0u : ai;
        out[row * (size_t)out_stride] = (greedy || ri == 0xffffffffu) ? arg : ri;
    }
}
