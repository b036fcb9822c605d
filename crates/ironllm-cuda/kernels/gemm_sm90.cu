// Hopper GEMM for the MLP's merged gate/up projection with SiLU-and-mul in its epilogue: out = silu(x Wg^T)
// * (x Wu^T), so the [tokens, 2 * inter] gate/up activation never reaches device memory and the separate
// SiLU-and-mul pass (a read of 2 * inter and a write of inter values per token) disappears. A plain form
// (out = x W^T) shares the main loop and is there to compare that loop with cuBLASLt on the same shapes.
//
// ===================================== LAUNCH CONFIGURATION =====================================
//   kernels : gemm_swiglu_sm90_{bf16,f16}, gemm_plain_sm90_{bf16,f16}
//             compiled only for sm_90a (wgmma, setmaxnreg); elsewhere this file exports nothing
//   params  : (tm_x, tm_w, tm_out: CUtensorMap by value, int m, int n_out, int k, int up_row)
//             tm_x  : x   [m rows, k cols], row-major, box {64 cols, 128 rows}, 128-byte swizzle
//             tm_w  : W   [2 * inter (swiglu) or n_out (plain) rows, k cols], same box and swizzle
//             tm_out: out [m rows, n_out cols], same box and swizzle (written by the copy engine, which
//                     drops rows >= m)
//             swiglu: n_out = inter, up_row = inter (W's rows are [gate | up]); plain: up_row unused
//   requires: k % 64 == 0; n_out % 128 == 0 (swiglu) or % 256 == 0 (plain); 16-byte aligned rows
//   grid    : (min(number of SMs, tiles), 1, 1), persistent: CTA b takes tiles b, b + gridDim.x, ...
//   block   : (384, 1, 1): warpgroup 0 loads (one thread issues the copies), warpgroups 1 and 2 multiply
//   dynamic shared memory: GS_SMEM_BYTES (1 KiB slack + GS_STAGES x 48 KiB + 32 KiB + barriers:
//             181296 bytes with the default 3 stages; fused_mlp::SMEM_BYTES must match)
//   registers (ptxas sm_90a): 168 at entry (the cap for 384 threads), then setmaxnreg gives the consumers
//             232 and the producer 40; no spills, except gemm_swiglu_sm90_f16 (248 bytes; not timed)
// ================================================================================================
//
// Tiles: 128 rows of x by 256 rows of W per CTA tile; in the swiglu form those 256 are gate rows n0..n0+127
// and up rows inter+n0.., so a consumer warpgroup's m64n256 accumulator holds gate and up of the same 128
// output columns in the same thread (column c and c + 128 of the fragment), and the epilogue needs no
// exchange. Each k step of 64 moves 48 KiB (x 16 KiB, W 32 KiB) by the copy engine into one of GS_STAGES
// shared-memory stages, completing on that stage's `full` mbarrier; the consumers release a stage on its
// `empty` mbarrier once the wgmmas that read it have retired. Tiles go in groups of GS_GROUP_M row tiles so
// that the CTAs running at one time share rows of x and W in L2.
//
// On an H100 the plain form with four stages runs within 1-2% of cuBLAS (16384 x 28672 x 4096: 717 against
// 723 TFLOP/s; 8192 rows: 705 against 690); the fused form beats cuBLAS + silu_and_mul by 1-5% from 1024
// to 16384 rows. A form with two-CTA clusters sharing the W tile by multicast ran at half that rate and
// was dropped (BENCHMARKS.md, 2026-11-28).
//
// Epilogue: values are rounded as the unfused path rounds them (gate and up to T as a GEMM returns them,
// silu(g) to T with common.cuh's silu_for<T>, then the product: layers.cu's silu_and_mul), written through
// a 32 KiB staging tile in the copy engine's swizzled layout and stored by the copy engine, which overlaps
// the next tile's main loop. The SiLU math runs while the tensor cores wait for the next tile, so its cost
// counts: at 16384 rows with four stages the fused form was 14% slower than the plain one with expf and an
// IEEE divide, 11% with silu_for's fast forms (with three stages, the default, it is 2% faster).

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

#ifndef GS_STAGES
// 3: on an H100 at its power limit the fused form ran 1.01-1.05x the unfused pair from 1024 to 16384 rows
// with three stages and 0.93-0.95x with four. In cycles four are not slower (Nsight Compute); they move ~15%
// more through L2, which at the power limit likely costs clock (BENCHMARKS.md, 2026-11-28).
#define GS_STAGES 3
#endif
#ifndef GS_GROUP_M
#define GS_GROUP_M 16
#endif
#define GS_BM 128
#define GS_BN 256
#define GS_BK 64
#define GS_THREADS 384
#define GS_X_BYTES (GS_BM * GS_BK * 2)
#define GS_W_BYTES (GS_BN * GS_BK * 2)
#define GS_STAGE_BYTES (GS_X_BYTES + GS_W_BYTES)
#define GS_OUT_BYTES (GS_BM * 128 * 2)
#define GS_SMEM_BYTES (1024 + GS_STAGES * GS_STAGE_BYTES + GS_OUT_BYTES + 2 * GS_STAGES * 8)

// The driver's CUtensorMap: 128 opaque bytes, 64-byte aligned, passed by value as a __grid_constant__.
struct __align__(64) GsTmap {
    unsigned long long v[16];
};

__device__ __forceinline__ uint32_t gs_smem(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void gs_bar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void gs_bar_expect(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void gs_bar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void gs_bar_wait(uint32_t bar, uint32_t parity) {
    asm volatile("{\n.reg .pred p;\nGS_WAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
                 "@!p bra GS_WAIT;\n}\n" ::"r"(bar),
                 "r"(parity)
                 : "memory");
}
// A box of the tensor map at (c0 = column, c1 = row) into shared memory, completing on `bar`.
__device__ __forceinline__ void gs_load(uint32_t dst, const GsTmap* map, uint32_t bar, int c0, int c1) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], "
                 "[%2];\n" ::"r"(dst),
                 "l"((uint64_t)map), "r"(bar), "r"(c0), "r"(c1)
                 : "memory");
}
__device__ __forceinline__ void gs_store(const GsTmap* map, uint32_t src, int c0, int c1) {
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"(
                     (uint64_t)map),
                 "r"(src), "r"(c0), "r"(c1)
                 : "memory");
}
__device__ __forceinline__ void gs_store_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// The staging tile may be overwritten once the copy engine has read it.
__device__ __forceinline__ void gs_store_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
__device__ __forceinline__ void gs_store_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
// The two consumer warpgroups (threads 128..383) only.
__device__ __forceinline__ void gs_consumer_sync() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }

// K-major operand in the 128-byte swizzle layout: 8-row x 128-byte atoms, 1024 bytes apart.
__device__ __forceinline__ uint64_t gs_desc(uint32_t saddr) { return wg_desc(saddr, 16, 1024); }
#define GS_R128                                                                                              \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "  \
    "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, "     \
    "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "     \
    "%62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, "     \
    "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, "        \
    "%101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, "        \
    "%117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}"

// d(64 x 256) = (accumulate ? d : 0) + A(64 x 16, shared, K-major) B(256 x 16, shared, K-major)^T
#define GS_MMA_TYPE(T, TY)                                                                                   \
    template <> struct GsMma<T> {                                                                            \
        static __device__ __forceinline__ void ss_n256(float (&d)[128], uint64_t da, uint64_t db, int acc) { \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                       \
                         "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " " GS_R128                \
                         ", %128, %129, p, 1, 1, 0, 0;\n}\n"                                                  \
                         : WG_C32(d, 0), WG_C32(d, 32), WG_C32(d, 64), WG_C32(d, 96)                          \
                         : "l"(da), "l"(db), "r"(acc));                                                       \
        }                                                                                                    \
    };
template <typename T> struct GsMma;
GS_MMA_TYPE(bf16, "bf16")
GS_MMA_TYPE(f16, "f16")

template <typename T> __device__ __forceinline__ float gs_swiglu(float g, float u) {
    g = round_to<T>(g);
    return round_to<T>(silu_for<T>(g)) * round_to<T>(u);
}

// Row tile and W tile of tile `t`, grouped GS_GROUP_M row tiles at a time.
__device__ __forceinline__ void gs_tile(int t, int tiles_m, int tiles_n, int& tm, int& tn) {
    const int span = GS_GROUP_M * tiles_n;
    const int first = (t / span) * GS_GROUP_M;
    const int rows = min(tiles_m - first, GS_GROUP_M);
    const int r = t % span;
    tm = first + r % rows;
    tn = r / rows;
}

template <typename T, bool SWIGLU>
__device__ __forceinline__ void gemm_sm90_impl(const GsTmap* tm_x, const GsTmap* tm_w, const GsTmap* tm_out, int m,
                                               int n_out, int k, int up_row) {
    extern __shared__ unsigned char gs_raw[];
    const uint32_t base = (gs_smem(gs_raw) + 1023u) & ~1023u;
    const uint32_t out_tile = base + GS_STAGES * GS_STAGE_BYTES;
    const uint32_t full0 = out_tile + GS_OUT_BYTES;
    const uint32_t empty0 = full0 + GS_STAGES * 8;
    const int wg = threadIdx.x >> 7;
    const int kblocks = k / GS_BK;
    const int tiles_m = (m + GS_BM - 1) / GS_BM;
    const int tiles_n = SWIGLU ? n_out / 128 : n_out / 256;
    const int tiles = tiles_m * tiles_n;

    if (threadIdx.x == 0) {
        for (int s = 0; s < GS_STAGES; ++s) {
            gs_bar_init(full0 + 8 * s, 1);
            gs_bar_init(empty0 + 8 * s, 8);  // every consumer warp
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    // Launched as a programmatic dependent, nothing may be read before the kernel that feeds x is done.
    pdl_wait();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (threadIdx.x == 0) {
            asm volatile("prefetch.tensormap [%0];\n" ::"l"((uint64_t)tm_x) : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"((uint64_t)tm_w) : "memory");
            int it = 0;
            for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
                int tm, tn;
                gs_tile(t, tiles_m, tiles_n, tm, tn);
                const int row0 = tm * GS_BM;
                const int gate = SWIGLU ? tn * 128 : tn * 256;
                const int up = SWIGLU ? up_row + tn * 128 : gate + 128;
                for (int kb = 0; kb < kblocks; ++kb, ++it) {
                    const int s = it % GS_STAGES;
                    const uint32_t ph = (uint32_t)(it / GS_STAGES) & 1u;
                    gs_bar_wait(empty0 + 8 * s, ph ^ 1u);
                    const uint32_t full = full0 + 8 * s;
                    const uint32_t xs = base + s * GS_STAGE_BYTES;
                    const uint32_t ws = xs + GS_X_BYTES;
                    gs_bar_expect(full, GS_STAGE_BYTES);
                    gs_load(xs, tm_x, full, kb * GS_BK, row0);
                    gs_load(ws, tm_w, full, kb * GS_BK, gate);
                    gs_load(ws + GS_W_BYTES / 2, tm_w, full, kb * GS_BK, up);
                }
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
        const int c = wg - 1;  // rows 64c..64c+63 of the tile
        const int warp = (threadIdx.x >> 5) & 3;
        const int lane = threadIdx.x & 31;
        const bool storer = threadIdx.x == 128;
        float acc[128];
        int it = 0;
        for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
            int tm, tn;
            gs_tile(t, tiles_m, tiles_n, tm, tn);
            const int row0 = tm * GS_BM;
            int prev = 0;
            for (int kb = 0; kb < kblocks; ++kb, ++it) {
                const int s = it % GS_STAGES;
                gs_bar_wait(full0 + 8 * s, (uint32_t)(it / GS_STAGES) & 1u);
                const uint32_t xs = base + s * GS_STAGE_BYTES + c * (64 * 128);
                const uint32_t ws = base + s * GS_STAGE_BYTES + GS_X_BYTES;
                wg_fence();
#pragma unroll
                for (int kk = 0; kk < 4; ++kk) {
                    GsMma<T>::ss_n256(acc, gs_desc(xs + kk * 32), gs_desc(ws + kk * 32), (kb | kk) != 0);
                }
                wg_commit();
                if (kb > 0) {
                    wg_wait<1>();
                    if (lane == 0) gs_bar_arrive(empty0 + 8 * prev);
                }
                prev = s;
            }
            wg_wait<0>();
#pragma unroll
            for (int i = 0; i < 128; ++i) wg_pin(acc[i]);
            if (lane == 0) gs_bar_arrive(empty0 + 8 * prev);

            // Epilogue: fragment row 16 * warp + lane / 4 (and + 8) of this warpgroup's 64, columns
            // 8g + 2 (lane % 4) (+1) of group g; gate column j sits at group j / 8, up column j at j / 8 + 16.
            const int r_lo = 64 * c + 16 * warp + (lane >> 2);
            const uint32_t sw = (uint32_t)(r_lo & 7);
#pragma unroll
            for (int h = 0; h < (SWIGLU ? 1 : 2); ++h) {
                if (storer) gs_store_wait_read();
                gs_consumer_sync();
#pragma unroll
                for (int g = 0; g < 16; ++g) {
                    float v[4];
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        v[i] = SWIGLU ? gs_swiglu<T>(acc[4 * g + i], acc[4 * g + 64 + i]) : acc[64 * h + 4 * g + i];
                    }
                    const uint32_t at = out_tile + (uint32_t)(g >> 3) * (GS_BM * 128) + (uint32_t)r_lo * 128 +
                                        ((((uint32_t)g & 7u) ^ sw) << 4) + (uint32_t)(lane & 3) * 4;
                    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(at), "r"(FpElem<T>::pack(v[0], v[1])) : "memory");
                    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(at + 8 * 128), "r"(FpElem<T>::pack(v[2], v[3]))
                                 : "memory");
                }
                asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
                gs_consumer_sync();
                if (storer) {
                    const int col = (SWIGLU ? tn * 128 : tn * 256 + 128 * h);
                    gs_store(tm_out, out_tile, col, row0);
                    gs_store(tm_out, out_tile + GS_BM * 128, col + 64, row0);
                    gs_store_commit();
                }
            }
        }
        if (storer) gs_store_wait_all();
    }
}

#define GEMM_SM90(T, S)                                                                                          \
    extern "C" __global__ void __launch_bounds__(GS_THREADS, 1) gemm_swiglu_sm90_##S(            \
        const __grid_constant__ GsTmap tm_x, const __grid_constant__ GsTmap tm_w,                               \
        const __grid_constant__ GsTmap tm_out, int m, int n_out, int k, int up_row) {                            \
        gemm_sm90_impl<T, true>(&tm_x, &tm_w, &tm_out, m, n_out, k, up_row);                                     \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(GS_THREADS, 1) gemm_plain_sm90_##S(             \
        const __grid_constant__ GsTmap tm_x, const __grid_constant__ GsTmap tm_w,                               \
        const __grid_constant__ GsTmap tm_out, int m, int n_out, int k, int up_row) {                            \
        gemm_sm90_impl<T, false>(&tm_x, &tm_w, &tm_out, m, n_out, k, up_row);                                    \
    }
GEMM_SM90(bf16, bf16)
GEMM_SM90(f16, f16)

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
