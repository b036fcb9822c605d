// Shared device helpers for every ironllm kernel file. NVRTC compiles each kernel file with this text
// prepended (no #include: the runtime needs only libnvrtc, not the CUDA toolkit headers), so nothing here
// may rely on cuda_fp16.h / cuda_bf16.h. Half types travel as their 16-bit patterns (`bf16_t`, `f16_t`)
// and convert through PTX `cvt`, which rounds to nearest even like torch does.
//
// Kernel naming: a kernel templated on the element type T is exported three times with `extern "C"`
// wrappers named `<name>_f32`, `<name>_bf16` and `<name>_f16` (see IRONLLM_FOR_EACH_DTYPE).

typedef unsigned short bf16_t;
typedef unsigned short f16_t;
typedef unsigned int uint32_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;

#define IRONLLM_INF __int_as_float(0x7f800000)

// Programmatic dependent launch (Hopper on; no-ops before). A kernel launched with the programmatic
// stream-serialization attribute (ops.rs's `KernelArgs`, used for the kernels of a decode step) may start
// while the kernel before it still runs, and must call pdl_wait() before touching memory that earlier
// work reads or writes; the wait returns once that kernel has completed and its writes are visible.
// pdl_launch_dependents() then lets the next such kernel start (and wait) while this one runs, instead
// of after its blocks exit; it changes nothing for a successor launched the ordinary way. Called after
// the wait, so at most one kernel is ever parked ahead of the running one. pdl_enter() is the pair, for
// kernels with nothing to do before the wait.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_enter() {
    pdl_wait();
    pdl_launch_dependents();
}

// Distinct tag types so templates can tell bf16 from f16 although both are 16-bit patterns.
struct bf16 { bf16_t bits; };
struct f16 { f16_t bits; };

__device__ __forceinline__ float bf16_to_float(bf16_t h) { return __uint_as_float(((unsigned int)h) << 16); }
__device__ __forceinline__ bf16_t float_to_bf16(float f) {
    bf16_t h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float f16_to_float(f16_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ f16_t float_to_f16(float f) {
    f16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// SiLU in f32 of a value whose result is rounded to T. 16-bit types take the fast exp and divide (a few
// f32 ulps, far below their own rounding; the fused gate/up GEMM of gemm_sm90.cu runs this on the tensor
// cores' time, so it must be cheap); float keeps expf and an IEEE divide, as torch computes it. Every
// kernel that applies SiLU for T uses this one form, so fused and unfused paths agree bit for bit.
template <typename T> __device__ __forceinline__ float silu_for(float g) { return __fdividef(g, 1.0f + __expf(-g)); }
template <> __device__ __forceinline__ float silu_for<float>(float g) { return g / (1.0f + expf(-g)); }

// Loads and stores of one element as float, and rounding a float to the element type's precision
// (used to mimic where the reference rounds intermediates, e.g. Hugging Face's bf16 RMSNorm).
__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ float load_f(const bf16* p) { return bf16_to_float(p->bits); }
__device__ __forceinline__ float load_f(const f16* p) { return f16_to_float(p->bits); }
__device__ __forceinline__ void store_f(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f(bf16* p, float v) { p->bits = float_to_bf16(v); }
__device__ __forceinline__ void store_f(f16* p, float v) { p->bits = float_to_f16(v); }
template <typename T> __device__ __forceinline__ float round_to(float v);
template <> __device__ __forceinline__ float round_to<float>(float v) { return v; }
template <> __device__ __forceinline__ float round_to<bf16>(float v) { return bf16_to_float(float_to_bf16(v)); }
template <> __device__ __forceinline__ float round_to<f16>(float v) { return f16_to_float(float_to_f16(v)); }

// 16-byte packs: pack16<T>::N elements (4 f32 or 8 bf16/f16) travel as one uint4 (unpack16 widens to f32,
// pack16_from rounds to T).

template <typename T> struct pack16 { static constexpr int N = 16 / (int)sizeof(T); };

__device__ __forceinline__ bool aligned16(const void* p) { return (((unsigned long long)p) & 15ull) == 0; }

template <typename T> __device__ __forceinline__ void unpack16(const uint4& u, float* f);
template <> __device__ __forceinline__ void unpack16<float>(const uint4& u, float* f) {
    f[0] = __uint_as_float(u.x); f[1] = __uint_as_float(u.y); f[2] = __uint_as_float(u.z); f[3] = __uint_as_float(u.w);
}
template <> __device__ __forceinline__ void unpack16<bf16>(const uint4& u, float* f) {
    const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
template <> __device__ __forceinline__ void unpack16<f16>(const uint4& u, float* f) {
    const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = f16_to_float((f16_t)(w[i] & 0xffffu));
        f[2 * i + 1] = f16_to_float((f16_t)(w[i] >> 16));
    }
}

template <typename T> __device__ __forceinline__ uint4 pack16_from(const float* f);
template <> __device__ __forceinline__ uint4 pack16_from<float>(const float* f) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
}
template <> __device__ __forceinline__ uint4 pack16_from<bf16>(const float* f) {
    unsigned int w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = (unsigned int)float_to_bf16(f[2 * i]) | ((unsigned int)float_to_bf16(f[2 * i + 1]) << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
}
template <> __device__ __forceinline__ uint4 pack16_from<f16>(const float* f) {
    unsigned int w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = (unsigned int)float_to_f16(f[2 * i]) | ((unsigned int)float_to_f16(f[2 * i + 1]) << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// RMSNorm's arithmetic on 16-byte packs, shared by the norm kernel (layers.cu) and the skinny GEMM's norm
// prologue (gemv.cu) so that the two stay bit for bit equal: the squares summed in element order into ss,
// then weight * round_to<T>(x * inv) rounded to T.
template <typename T> __device__ __forceinline__ float rms_sum_squares16(const uint4& p, float ss) {
    float v[pack16<T>::N];
    unpack16<T>(p, v);
#pragma unroll
    for (int i = 0; i < pack16<T>::N; ++i) ss = fmaf(v[i], v[i], ss);
    return ss;
}
template <typename T> __device__ __forceinline__ uint4 rms_scale16(const uint4& p, const uint4& weight, float inv) {
    float v[pack16<T>::N], w[pack16<T>::N];
    unpack16<T>(p, v);
    unpack16<T>(weight, w);
#pragma unroll
    for (int i = 0; i < pack16<T>::N; ++i) v[i] = w[i] * round_to<T>(v[i] * inv);
    return pack16_from<T>(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum / max for blockDim.x a multiple of 32 and at most 1024. `scratch` holds 32 floats of
// shared memory; every thread gets the result. Fixed reduction order, so results are deterministic.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : -IRONLLM_INF;
    return warp_max(v);
}

// Exports `name##_f32/_bf16/_f16` wrappers around a templated __device__ body. Usage:
//   template <typename T> __device__ void my_kernel_impl(T* out, const T* x, int n) { ... }
//   #define MY_KERNEL(T, SUFFIX) extern "C" __global__ void my_kernel_##SUFFIX(T* out, const T* x, int n) \
//       { my_kernel_impl<T>(out, x, n); }
//   IRONLLM_FOR_EACH_DTYPE(MY_KERNEL)
#define IRONLLM_FOR_EACH_DTYPE(M) M(float, f32) M(bf16, bf16) M(f16, f16)

// ---- Tensor-core PTX helpers (sm_80+: cp.async, ldmatrix, mma.sync m16n8k16), used by the flash
// attention kernels. Unused inline functions emit no PTX, so other files and older targets are unaffected.

__device__ __forceinline__ uint32_t fp_smem_addr(const void* p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

// 16-byte async copy global -> shared; when !valid nothing is read and the 16 bytes are zero-filled.
__device__ __forceinline__ void fp_cp_async16(uint32_t dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void fp_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void fp_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void fp_ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void fp_ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

__device__ __forceinline__ float fp_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

template <typename T> struct FpElem;
template <> struct FpElem<bf16> {
    // d += a * b  (16x16 bf16 A row-major, 16x8 bf16 B column-major, f32 accumulators)
    static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    // Two floats -> two bf16 in one 32-bit register; `lo` lands in the low half (lower address / index).
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        uint32_t r;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
};
template <> struct FpElem<f16> {
    static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        uint32_t r;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
};

// Hopper warpgroup MMA helpers, shared by the sm_90a-only files (flash_prefill_sm90.cu, gemm_sm90.cu).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Shared-memory matrix descriptor (PTX ISA "matrix descriptor format"): start address, leading and stride
// byte offsets (each >> 4) and the layout type, 1 = 128-byte swizzle.
__device__ __forceinline__ uint64_t wg_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((saddr & 0x3FFFFu) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32) |
           (1ull << 62);
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Makes this thread's generic-proxy shared-memory writes (cp.async) visible to the async proxy (wgmma).
__device__ __forceinline__ void wg_fence_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Pins an accumulator register in place across a wait, so the compiler reads it only after the wait.
__device__ __forceinline__ void wg_pin(float& x) { asm volatile("" : "+f"(x)::"memory"); }
// Keeps an A-operand register alive until after a wait: otherwise its live range ends at the (async)
// wgmma that reads it and the allocator may hand it to the next tile's P while the read is in flight.
__device__ __forceinline__ void wg_pin(uint32_t& x) { asm volatile("" : "+r"(x)::"memory"); }

#define WG_C4(a, i) "+f"(a[i]), "+f"(a[(i) + 1]), "+f"(a[(i) + 2]), "+f"(a[(i) + 3])
#define WG_C16(a, i) WG_C4(a, i), WG_C4(a, (i) + 4), WG_C4(a, (i) + 8), WG_C4(a, (i) + 12)
#define WG_C32(a, i) WG_C16(a, i), WG_C16(a, (i) + 16)
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
