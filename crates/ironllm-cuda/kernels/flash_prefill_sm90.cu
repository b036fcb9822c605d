// Hopper tensor-core attention for prefill / chunked-prefill rows over a paged KV cache: the algorithm of
// flash_prefill.cu (flash-attention-2 online softmax, exp2 domain, f32 accumulation) on warpgroup MMAs
// (wgmma), which read K and V from shared memory themselves (Q from registers, loaded once) and run
// asynchronously, so the tensor cores compute the next key tile's Q K^T while the warps do this tile's
// softmax.
//
// ===================================== LAUNCH CONFIGURATION =====================================
//   kernels : flash_prefill_wg_{bf16,f16}_hd{64,128}   (NWG = 1: one query head per CTA, any group)
//             flash_prefill_wg2_{bf16,f16}_hd{64,128}  (NWG = 2: heads 2i, 2i+1 per CTA; they must share
//             their KV head, so the host takes these only for even num_heads / num_kv_heads)
//             compiled only for sm_90a (wgmma does not exist elsewhere): for any other architecture this
//             file exports nothing and the runtime keeps flash_prefill.cu's kernels
//   work list: flash_prefill.cu's (one entry per 64 query tokens of each prefill sequence)
//   grid    : (num_tiles, num_heads / NWG, 1); CTA order as flash_prefill.cu's (last tiles first, the
//             head groups of one tile adjacent)
//   block   : (128 * NWG, 1, 1) -- warpgroup w takes head 2i + w (NWG = 2); warp q of a warpgroup owns
//             query rows 16q..16q+15 of the tile
//   dynamic shared memory: WG_SMEM_BYTES(HD, NWG, stages) = 1024 + (NWG + 2 * stages) * 64 * HD * 2
//             + (stages + 1) * 256, stages WG_STAGES = 2 (NWG 1) or WG2_STAGES = 3 (NWG 2): hd128 83712 B
//             (two CTAs per SM) / 133120 B (one), hd64 42752 / 67584 B; the loader raises the function's
//             limit (ops::dynamic_smem_of, which must match)
//   registers (ptxas sm_90a): 177-178 (hd128), 127-128 (hd64), no spills, no wgmma serialization
//             (WG_Q_REGS=0: 143-145 / 111-113)
//   num_tiles == 0: do not launch
// ================================================================================================
//
// Signature and requirements: flash_prefill.cu's.
//
// Shared memory: NWG Q tiles, `stages` K tiles and `stages` V tiles (64 rows x HD each), then `stages` + 1
// row tables (the cache row of each key of a tile, filled once per tile by 64 threads and read by every
// loader, so no thread divides positions by the block size or reads the block table per copy). A tile is
// stored as HD/64 column halves of 64 rows x 128 bytes, each row's eight 16-byte chunks XOR-swizzled by
// (row & 7): the wgmma "128-byte swizzle" layout, whose 8-row x 128-byte atoms must sit on 1024-byte
// boundaries (hence the 1024 bytes of alignment slack). With that one layout Q's tile (read into registers
// by ldmatrix) and K are K-major operands
// (rows = queries / keys, the head dimension contiguous) and V, whose rows are keys, is the N-major
// (transposed) B operand of O += P V, so nothing is ever transposed. P stays in registers: the f32
// accumulator fragment of S is, after packing pairs to 16 bits, the A-operand fragment of the PV wgmma.
// Q is read from its tile into A-operand registers once (ldmatrix), so S's wgmmas read only K from shared
// memory (on an H100 at 8 x 1024: 272.2 TFLOP/s; WG_Q_REGS=0, Q a shared-memory operand as before: 261.5).
// With NWG = 2 each K/V tile is loaded once for both heads.
//
// Pipeline per key tile j (walked from the last tile, the one on the causal diagonal, down to 0):
//   wait for K(j-1) and V(j) -> start loading K and V stages-1 tiles ahead (cp.async, every thread)
//   -> issue S' = Q K(j-1)^T (async) -> rescale O by this tile's correction -> issue O += P(j) V(j) (async)
//   -> wait for S' only, softmax it into P(j-1) while PV runs -> wait for PV.

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

#ifndef WG_STAGES
#define WG_STAGES 2   // stages of K and V with one head per CTA (two CTAs per SM)
#endif
#ifndef WG2_STAGES
#define WG2_STAGES 3  // ... with two heads per CTA (one CTA per SM; 4 stages measured no faster)
#endif
#ifndef WG_LAZY_RESCALE
// 1: a row's running max moves only when it grows by more than 8 (log2 domain), so most tiles skip O's
// rescale (exact in real arithmetic: O and l share the stale max; P is at most 256, well inside bf16/f16
// and the f32 sums). 8 x 1024 on an H100: 268 vs 255 TFLOP/s (2026-11-28). 0: rescale on every new max.
#define WG_LAZY_RESCALE 1
#endif
#ifndef WG_Q_REGS
#define WG_Q_REGS 1   // Q as the register (A) operand of S = Q K^T; 0: read from shared memory by every wgmma
#endif
#define WG_BLOCK 64
#define WG_THREADS 128

// ---- wgmma helpers (the rest are common.cuh's) ------------------------------------------------------

#define WG_R32                                                                                                  \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
    "%23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define WG_R64                                                                                                  \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
    "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "  \
    "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// d(64 x 64) = (accumulate ? d : 0) + A(64 x 16, shared, K-major) B(64 x 16, shared, K-major)^T
// d(64 x 64) = (accumulate ? d : 0) + a(64 x 16, registers) B(64 x 16, shared, K-major)^T
// a(64 x 16, registers) B(16 x N, shared, N-major) accumulated into d(64 x N)
#define WG_MMA_TYPE(T, TY)                                                                                      \
    template <> struct WgMma<T> {                                                                               \
        static __device__ __forceinline__ void ss_n64(float (&d)[32], uint64_t da, uint64_t db, int accumulate) { \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                           \
                         "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " WG_R32                    \
                         ", %32, %33, p, 1, 1, 0, 0;\n}\n"                                                      \
                         : WG_C32(d, 0)                                                                         \
                         : "l"(da), "l"(db), "r"(accumulate));                                                  \
        }                                                                                                       \
        static __device__ __forceinline__ void rs_n64_kmajor(float (&d)[32], const uint32_t (&a)[4], uint64_t db, \
                                                             int accumulate) {                                   \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                           \
                         "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " WG_R32                    \
                         ", {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"                                        \
                         : WG_C32(d, 0)                                                                         \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate));               \
        }                                                                                                       \
        static __device__ __forceinline__ void rs_n64(float (&d)[32], const uint32_t (&a)[4], uint64_t db) {     \
            asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " WG_R32                    \
                         ", {%32, %33, %34, %35}, %36, 1, 1, 1, 1;\n"                                           \
                         : WG_C32(d, 0)                                                                         \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));                                \
        }                                                                                                       \
        static __device__ __forceinline__ void rs_n128(float (&d)[64], const uint32_t (&a)[4], uint64_t db) {    \
            asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " WG_R64                   \
                         ", {%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"                                           \
                         : WG_C32(d, 0), WG_C32(d, 32)                                                          \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));                                \
        }                                                                                                       \
    };

template <typename T> struct WgMma;
WG_MMA_TYPE(bf16, "bf16")
WG_MMA_TYPE(f16, "f16")

// ---- the kernel body --------------------------------------------------------------------------------

// Shared memory of a kernel with NWG warpgroups (heads) per CTA and ST stages: alignment slack, NWG Q tiles,
// ST K and ST V tiles, ST + 1 row tables of 64 words.
#define WG_SMEM_BYTES(HD, NWG, ST) (1024 + ((NWG) + 2 * (ST)) * 64 * (HD) * 2 + ((ST) + 1) * 64 * 4)

template <typename T, int HD, int NWG, int S>
__device__ __forceinline__ void flash_prefill_wg_impl(T* __restrict__ out, const T* __restrict__ qkv,
                                                      const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                                      const int* __restrict__ block_tables,
                                                      const int* __restrict__ query_start_loc,
                                                      const int* __restrict__ context_lens,
                                                      const int* __restrict__ tiles, int num_tiles, int num_heads,
                                                      int num_kv_heads, int block_size, int max_blocks_per_seq,
                                                      float scale) {
    constexpr int BM = WG_BLOCK;
    constexpr int BN = WG_BLOCK;
    constexpr int THREADS = WG_THREADS * NWG;
    constexpr int R = S + 1;                 // row tables in the ring
    constexpr uint32_t HALF = BN * 128;      // bytes of one 64-column half of a tile
    constexpr uint32_t TILE = BN * HD * 2;   // bytes of a tile
    constexpr int CPR = HD / 8;              // 16-byte chunks per row
    constexpr int RPP = THREADS / CPR;       // rows covered by one load pass of the CTA
    constexpr int PASSES = BN / RPP;
    constexpr int KSTEPS = HD / 16;          // k-steps of S = Q K^T
    constexpr int PSTEPS = BN / 16;          // k-steps of O += P V
    constexpr int NT_S = BN / 8;             // 8-key column tiles of S
    constexpr int NT_O = HD / 8;             // 8-wide column tiles of O
    static_assert(HD == 64 || HD == 128, "unsupported HEAD_DIM");
    static_assert(RPP % 8 == 0 && BN % RPP == 0 && S >= 2, "load mapping");

    extern __shared__ unsigned char wg_smem[];
    const uint32_t base = (fp_smem_addr(wg_smem) + 1023u) & ~1023u;
    const int tid = threadIdx.x;
    const int wg = tid >> 7;           // this thread's warpgroup = which head of the CTA's pair
    const int warp = (tid >> 5) & 3;   // warp within the warpgroup: query rows 16 * warp ..
    const int lane = tid & 31;
    const int g = lane >> 2;
    const int t = lane & 3;
    const uint32_t sQ = base + TILE * (uint32_t)wg;
    auto k_buf = [&](int j) { return base + TILE * (uint32_t)(NWG + j % S); };
    auto v_buf = [&](int j) { return base + TILE * (uint32_t)(NWG + S + j % S); };
    uint32_t* rows_tab = reinterpret_cast<uint32_t*>(wg_smem + (base - fp_smem_addr(wg_smem)) + TILE * (NWG + 2 * S));

    // ---- which tile and heads (flash_prefill.cu's order, with NWG adjacent heads per CTA) ----
    const int head_groups = num_heads / NWG;
    const int lin = blockIdx.y * gridDim.x + blockIdx.x;
    const int h0 = (lin % head_groups) * NWG;
    const int h = h0 + wg;
    const int tile = num_tiles - 1 - lin / head_groups;
    const int s = tiles[2 * tile];
    const int m0 = tiles[2 * tile + 1];
    const int q_start = query_start_loc[s];
    const int qlen = query_start_loc[s + 1] - q_start;
    if (m0 >= qlen) return;
    const int ctx = context_lens[s];
    const int past = ctx - qlen;
    const int rows_valid = min(BM, qlen - m0);
    const int kv_end = past + m0 + rows_valid;
    const int n_kv_tiles = (kv_end + BN - 1) / BN;
    const int kvh = h0 / (num_heads / num_kv_heads);  // the same for every head of the CTA (host: group % NWG == 0)
    const int64_t qkv_stride = (int64_t)(num_heads + 2 * num_kv_heads) * HD;
    const int* bt = block_tables + (int64_t)s * max_blocks_per_seq;

    // Cache row of each key of tile x ((block * num_kv_heads + kvh) * block_size + pos % block_size; ~0u past
    // kv_end), in ring slot x % R, written by threads 0..63 at least one barrier before the loads that read it.
    auto fill_rows = [&](int x) {
        if (x >= 0 && tid < BN) {
            const int pos = x * BN + tid;
            uint32_t cr = ~0u;
            if (pos < kv_end) {
                const uint32_t blk = (uint32_t)bt[pos / block_size];
                cr = (blk * (uint32_t)num_kv_heads + (uint32_t)kvh) * (uint32_t)block_size + (uint32_t)(pos % block_size);
            }
            rows_tab[(x % R) * BN + tid] = cr;
        }
    };
    // ---- loads: thread copies chunk ld_c of rows ld_r + p * RPP; (row & 7) == (ld_r & 7) for all p ----
    const int ld_r = tid / CPR;
    const int ld_c = tid % CPR;
    const uint32_t ld_off = (uint32_t)((ld_c >> 3) * HALF + ld_r * 128 + (((ld_c & 7) ^ (ld_r & 7)) << 4));
    auto load_kv = [&](const T* __restrict__ cache, uint32_t sbase, int x) {
        const uint32_t* rt = rows_tab + (x % R) * BN;
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            const uint32_t cr = rt[ld_r + p * RPP];
            const bool valid = cr != ~0u;
            fp_cp_async16(sbase + ld_off + p * RPP * 128, cache + ((uint64_t)(valid ? cr : 0u) * HD + ld_c * 8), valid);
        }
    };
    // The copies started at (virtual) iteration i: K(i - S) and V(i - S + 1), where they exist. Iteration
    // j needs K(j - 1) and V(j), both started at iteration j + S - 1, with S - 2 later groups in flight;
    // it fills the row table of tile j - 1 - S, first read at iteration j - 1.
    auto load_iter = [&](int i) {
        if (i - S >= 0) load_kv(k_cache, k_buf(i - S), i - S);
        if (i - S + 1 >= 0) load_kv(v_cache, v_buf(i - S + 1), i - S + 1);
    };

    // ---- prologue: row tables of tiles n-1 .. n-1-S; Q tiles and K(n-1); the groups of iterations
    // n + S - 2 .. n ----
#pragma unroll
    for (int x = 0; x <= S; ++x) fill_rows(n_kv_tiles - 1 - x);
#pragma unroll
    for (int w = 0; w < NWG; ++w) {
        const T* qbase = qkv + (int64_t)(q_start + m0) * qkv_stride + (h0 + w) * HD + ld_c * 8;
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            const int r = ld_r + p * RPP;
            const bool valid = r < rows_valid;
            fp_cp_async16(base + TILE * (uint32_t)w + ld_off + p * RPP * 128,
                          qbase + (valid ? (int64_t)r * qkv_stride : (int64_t)0), valid);
        }
    }
    __syncthreads();  // row tables
    load_kv(k_cache, k_buf(n_kv_tiles - 1), n_kv_tiles - 1);
    fp_cp_async_commit();
#pragma unroll
    for (int i = n_kv_tiles + S - 2; i >= n_kv_tiles; --i) {
        load_iter(i);
        fp_cp_async_commit();
    }
    fp_cp_async_wait<S - 1>();
    wg_fence_smem();
    __syncthreads();

    // Descriptors. Q and K (K-major): k-step kk is 16 columns, 32 bytes into a 128-byte row of half kk / 4;
    // 8-row groups 1024 bytes apart (SBO); LBO unused with swizzling (16 by convention). V (N-major): k-step
    // kk is keys 16kk.., 2048 bytes on; the two 64-column halves of N (hd128) HALF apart (LBO); 8-key
    // groups 1024 bytes apart (SBO).
    auto kmaj = [&](uint32_t tile_base, int kk) {
        return wg_desc(tile_base + (uint32_t)(kk >> 2) * HALF + (uint32_t)(kk & 3) * 32, 16, 1024);
    };
    auto vdesc = [&](uint32_t tile_base, int kk) { return wg_desc(tile_base + (uint32_t)kk * 2048, HALF, 1024); };

    float sc[NT_S * 4];
    float o[NT_O * 4];
#pragma unroll
    for (int i = 0; i < NT_O * 4; ++i) o[i] = 0.0f;
    uint32_t pcur[PSTEPS][4], pnext[PSTEPS][4];
    float m_run0 = -IRONLLM_INF, m_run1 = -IRONLLM_INF;  // running max (log2 domain) of rows g, g + 8
    float l_run0 = 0.0f, l_run1 = 0.0f;                  // this thread's partial row sums
    float alpha0 = 1.0f, alpha1 = 1.0f;                  // O's correction for the tile in pcur
    const float sl2 = scale * 1.4426950408889634f;
    const int qpos0 = past + m0 + warp * 16 + g;  // position of row g; row g + 8 is qpos0 + 8

#if WG_Q_REGS
    // Q's A fragments (this warp's 16 rows, every k-step), read once: an S wgmma with Q in shared memory
    // re-reads all of Q for every key tile, half the shared-memory traffic of S.
    uint32_t qf[KSTEPS][4];
    {
        const int row = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;  // row & 7 == lane & 7
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            const int c = kk * 2 + (lane >> 4);  // 16-byte chunk of the row
            fp_ldmatrix_x4(qf[kk], sQ + (uint32_t)(c >> 3) * HALF + row * 128 + ((((c & 7) ^ (lane & 7))) << 4));
        }
    }
#endif
    auto issue_s = [&](int j) {
        const uint32_t kb = k_buf(j);
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
#if WG_Q_REGS
            WgMma<T>::rs_n64_kmajor(sc, qf[kk], kmaj(kb, kk), kk > 0 ? 1 : 0);
#else
            WgMma<T>::ss_n64(sc, kmaj(sQ, kk), kmaj(kb, kk), kk > 0 ? 1 : 0);
#endif
        }
        wg_commit();
    };
    // Mask, online softmax of S(j) into pnext; sets alpha0/1 (O's correction) and updates m_run / l_run.
    auto softmax = [&](int j) {
        const int kv0 = j * BN;
        if (kv0 + BN - 1 > past + m0) {
#pragma unroll
            for (int nt = 0; nt < NT_S; ++nt) {
                const int key = kv0 + nt * 8 + 2 * t;
                if (key > qpos0) sc[nt * 4 + 0] = -IRONLLM_INF;
                if (key + 1 > qpos0) sc[nt * 4 + 1] = -IRONLLM_INF;
                if (key > qpos0 + 8) sc[nt * 4 + 2] = -IRONLLM_INF;
                if (key + 1 > qpos0 + 8) sc[nt * 4 + 3] = -IRONLLM_INF;
            }
        }
        float mx0 = -IRONLLM_INF, mx1 = -IRONLLM_INF;
#pragma unroll
        for (int nt = 0; nt < NT_S; ++nt) {
            mx0 = fmaxf(mx0, fmaxf(sc[nt * 4 + 0], sc[nt * 4 + 1]));
            mx1 = fmaxf(mx1, fmaxf(sc[nt * 4 + 2], sc[nt * 4 + 3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        float mnew0 = fmaxf(m_run0, mx0 * sl2);
        float mnew1 = fmaxf(m_run1, mx1 * sl2);
        if (WG_LAZY_RESCALE) {  // keep the running max unless a row's grew by more than 8 (log2): P <= 256
            if (!(mnew0 > m_run0 + 8.0f)) mnew0 = m_run0;
            if (!(mnew1 > m_run1 + 8.0f)) mnew1 = m_run1;
        }
        const float muse0 = mnew0 == -IRONLLM_INF ? 0.0f : mnew0;  // fully masked so far: keep exps at 0
        const float muse1 = mnew1 == -IRONLLM_INF ? 0.0f : mnew1;
        alpha0 = fp_exp2(m_run0 - muse0);
        alpha1 = fp_exp2(m_run1 - muse1);
        m_run0 = mnew0;
        m_run1 = mnew1;
        float rs0 = 0.0f, rs1 = 0.0f;
#pragma unroll
        for (int nt = 0; nt < NT_S; ++nt) {
            const float p0 = fp_exp2(fmaf(sc[nt * 4 + 0], sl2, -muse0));
            const float p1 = fp_exp2(fmaf(sc[nt * 4 + 1], sl2, -muse0));
            const float p2 = fp_exp2(fmaf(sc[nt * 4 + 2], sl2, -muse1));
            const float p3 = fp_exp2(fmaf(sc[nt * 4 + 3], sl2, -muse1));
            rs0 += p0 + p1;
            rs1 += p2 + p3;
            pnext[nt >> 1][(nt & 1) * 2 + 0] = FpElem<T>::pack(p0, p1);
            pnext[nt >> 1][(nt & 1) * 2 + 1] = FpElem<T>::pack(p2, p3);
        }
        l_run0 = l_run0 * alpha0 + rs0;
        l_run1 = l_run1 * alpha1 + rs1;
    };

    // ---- S of the last tile, before the loop ----
    wg_fence();
    issue_s(n_kv_tiles - 1);
    wg_wait<0>();
#pragma unroll
    for (int i = 0; i < NT_S * 4; ++i) wg_pin(sc[i]);
    softmax(n_kv_tiles - 1);
#pragma unroll
    for (int kk = 0; kk < PSTEPS; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) pcur[kk][r] = pnext[kk][r];

    // O *= this tile's correction, then O += P V(j) (async; committed as one group).
    auto issue_pv = [&](int j) {
        if (!WG_LAZY_RESCALE || __any_sync(0xffffffffu, alpha0 != 1.0f || alpha1 != 1.0f)) {
#pragma unroll
            for (int i = 0; i < NT_O; ++i) {
                o[i * 4 + 0] *= alpha0;
                o[i * 4 + 1] *= alpha0;
                o[i * 4 + 2] *= alpha1;
                o[i * 4 + 3] *= alpha1;
            }
        }
        wg_fence();
        const uint32_t vb = v_buf(j);
#pragma unroll
        for (int kk = 0; kk < PSTEPS; ++kk) {
            if constexpr (HD == 128) {
                WgMma<T>::rs_n128(o, pcur[kk], vdesc(vb, kk));
            } else {
                WgMma<T>::rs_n64(o, pcur[kk], vdesc(vb, kk));
            }
        }
        wg_commit();
    };

    // Every tile but the first one (key tile 0) issues the next S before its PV; no branch inside, so the
    // compiler can see that wait_group 1 retires S and leaves only PV in flight (with a conditional S it
    // serializes every wgmma).
    for (int j = n_kv_tiles - 1; j >= 1; --j) {
        fp_cp_async_wait<S - 2>();  // K(j - 1), V(j) landed
        wg_fence_smem();
        __syncthreads();  // ... for every thread; and every warp is past the wgmmas that read the buffers reloaded now
        load_iter(j);
        fp_cp_async_commit();
        fill_rows(j - 1 - S);
        wg_fence();
        issue_s(j - 1);
        issue_pv(j);
        wg_wait<1>();
#pragma unroll
        for (int i = 0; i < NT_S * 4; ++i) wg_pin(sc[i]);
#if WG_Q_REGS
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk)
#pragma unroll
            for (int r = 0; r < 4; ++r) wg_pin(qf[kk][r]);  // read by S(j - 1) until the wait above
#endif
        softmax(j - 1);
        wg_wait<0>();
#pragma unroll
        for (int i = 0; i < NT_O * 4; ++i) wg_pin(o[i]);
#pragma unroll
        for (int kk = 0; kk < PSTEPS; ++kk)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                wg_pin(pcur[kk][r]);
                pcur[kk][r] = pnext[kk][r];
            }
    }
    fp_cp_async_wait<0>();  // V(0) (and the empty groups of the last iterations)
    wg_fence_smem();
    __syncthreads();
    issue_pv(0);
    wg_wait<0>();
#pragma unroll
    for (int i = 0; i < NT_O * 4; ++i) wg_pin(o[i]);

    // ---- epilogue: normalize, stage the tile in the Q buffer (row-major, 16-byte chunks swizzled by
    // row & 7), write the valid rows with 16-byte stores ----
    l_run0 += __shfl_xor_sync(0xffffffffu, l_run0, 1);
    l_run0 += __shfl_xor_sync(0xffffffffu, l_run0, 2);
    l_run1 += __shfl_xor_sync(0xffffffffu, l_run1, 1);
    l_run1 += __shfl_xor_sync(0xffffffffu, l_run1, 2);
    const float inv0 = l_run0 > 0.0f ? 1.0f / l_run0 : 0.0f;
    const float inv1 = l_run1 > 0.0f ? 1.0f / l_run1 : 0.0f;
    __syncthreads();  // every warp is done reading sQ (ldmatrix, or the wgmmas with WG_Q_REGS=0): the staged
                      // rows of one warp overlap other warps' swizzled Q rows
    {
        constexpr int ROW_BYTES = HD * 2;
        unsigned char* sO = wg_smem + (sQ - fp_smem_addr(wg_smem));
        const int r0 = warp * 16 + g;
#pragma unroll
        for (int nt = 0; nt < NT_O; ++nt) {
            const int off = ((nt ^ g) << 4) + t * 4;
            *reinterpret_cast<uint32_t*>(sO + r0 * ROW_BYTES + off) =
                FpElem<T>::pack(o[nt * 4 + 0] * inv0, o[nt * 4 + 1] * inv0);
            *reinterpret_cast<uint32_t*>(sO + (r0 + 8) * ROW_BYTES + off) =
                FpElem<T>::pack(o[nt * 4 + 2] * inv1, o[nt * 4 + 3] * inv1);
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

#define FLASH_PREFILL_WG_KERNEL(T, SUFFIX, HD, NWG, ST, NAME)                                                  \
    extern "C" __global__ void __launch_bounds__(WG_THREADS * (NWG), 3 - (NWG)) NAME##_##SUFFIX##_hd##HD(      \
        T* out, const T* qkv, const T* k_cache, const T* v_cache, const int* block_tables,                     \
        const int* query_start_loc, const int* context_lens, const int* tiles, int num_tiles, int num_heads,   \
        int num_kv_heads, int block_size, int max_blocks_per_seq, float scale) {                               \
        flash_prefill_wg_impl<T, HD, NWG, ST>(out, qkv, k_cache, v_cache, block_tables, query_start_loc,      \
                                              context_lens, tiles, num_tiles, num_heads, num_kv_heads,         \
                                              block_size, max_blocks_per_seq, scale);                          \
    }

// One head per CTA (two CTAs per SM): any group size. Two heads of one KV head per CTA (one CTA per SM,
// each K/V tile loaded once for both): even group sizes.
#define FLASH_PREFILL_WG_ALL(T, SUFFIX)                                                                       \
    FLASH_PREFILL_WG_KERNEL(T, SUFFIX, 64, 1, WG_STAGES, flash_prefill_wg)                                   \
    FLASH_PREFILL_WG_KERNEL(T, SUFFIX, 128, 1, WG_STAGES, flash_prefill_wg)                                  \
    FLASH_PREFILL_WG_KERNEL(T, SUFFIX, 64, 2, WG2_STAGES, flash_prefill_wg2)                                 \
    FLASH_PREFILL_WG_KERNEL(T, SUFFIX, 128, 2, WG2_STAGES, flash_prefill_wg2)

FLASH_PREFILL_WG_ALL(bf16, bf16)
FLASH_PREFILL_WG_ALL(f16, f16)

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
