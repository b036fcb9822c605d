//! Small SIMD building blocks shared by the f32 kernels: runtime detection of AVX2+FMA once per
//! process, and a dot product whose summation order is fixed (eight lane-wise partial sums, then a fixed
//! tree), so that the same inputs give bit-identical results wherever the dot is used. That property is
//! what makes a request's output independent of the batch it runs in.
//!
//! The attention row kernels also read 16-bit rows (a KV cache in f16 or bf16): they widen each element
//! to f32 as they load it (F16C's `vcvtph2ps`, or bf16's 16-bit shift) and then do exactly the f32
//! arithmetic. Widening is exact, so a kernel over 16-bit rows is bit-identical to the f32 kernel over
//! the widened rows, on the SIMD and the portable path alike.

use std::sync::OnceLock;

use half::{bf16, f16};

/// Whether the AVX2 + FMA paths may run on this CPU.
pub fn has_avx2_fma() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether the AVX2 + FMA + F16C paths of the 16-bit row kernels may run on this CPU. bf16 rows need
/// no F16C, but one check keeps one set of 16-bit kernels; every AVX2 CPU we know of has F16C.
pub fn has_avx2_fma_f16c() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            has_avx2_fma() && std::arch::is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An element the row kernels read as f32: f32 itself, or a 16-bit float, widened exactly.
pub trait Widen: Copy + sealed::Sealed {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Widen for bf16 {
    /// The bf16 bits become the high half of the f32 (what the SIMD path does with a shift; NaNs keep
    /// their payload, which `bf16::to_f32` would quiet).
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// A 16-bit float format the AVX2 row kernels load eight elements at a time into f32 lanes.
pub trait Half16: Widen {
    /// Eight elements from `p`, widened into f32 lanes exactly as [`Widen::widen`] does.
    ///
    /// # Safety
    /// `p` points to eight readable elements and the CPU has AVX2 and F16C. Called only from functions
    /// that enable those features, into which it inlines.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Half16 for f16 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: f16 is a transparent u16, so eight of them are 16 readable bytes (caller's contract);
        // loadu has no alignment requirement; F16C is present (caller's contract).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast::<__m128i>())) }
    }
}

impl Half16 for bf16 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: bf16 is a transparent u16, so eight of them are 16 readable bytes (caller's contract);
        // zero-extending each to 32 bits and shifting left by 16 puts the bf16 in an f32's high half.
        unsafe { _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())))) }
    }
}

/// Dot product of two equal-length slices.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above); lengths are equal.
        return unsafe { avx2::dot(a, b) };
    }
    dot_portable(a, b)
}

/// The portable dot product, with the same lane structure as the AVX2 one: eight partial sums over
/// strided elements, combined by the same tree, then the tail added in order. `b` may be 16-bit (each
/// element widened exactly as it is read).
pub fn dot_portable<T: Widen>(a: &[f32], b: &[T]) -> f32 {
    let n8 = a.len() / 8 * 8;
    let mut acc = [0f32; 8];
    for (ca, cb) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] = ca[l].mul_add(cb[l].widen(), acc[l]);
        }
    }
    let mut s = hsum8(&acc);
    for i in n8..a.len() {
        s = a[i].mul_add(b[i].widen(), s);
    }
    s
}

/// The fixed reduction tree for eight lanes, matching `avx2::hsum`.
#[inline]
pub fn hsum8(v: &[f32; 8]) -> f32 {
    let q = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    let d = [q[0] + q[2], q[1] + q[3]];
    d[0] + d[1]
}

/// y += a * x.
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: AVX2/FMA checked; lengths equal.
        unsafe { avx2::axpy(a, x, y) };
        return;
    }
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = a.mul_add(*xi, *yi);
    }
}

/// The largest element (`NEG_INFINITY` for an empty slice). Taking a maximum is exact, so any
/// grouping gives the same value for NaN-free input, up to the sign of a zero maximum.
pub fn max(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: AVX2 checked.
        return unsafe { avx2::max(x) };
    }
    x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// `out[j] = dot(q, k_j) * scale` for every row `k_j` of `k` (rows of `q.len()` floats): the scores of
/// one query against a run of cached keys. Each result is bit-identical to `dot(q, k_j) * scale`, so the
/// caller may split a context into runs (cache blocks) freely; the AVX2 path scores eight keys per
/// pass, reducing their eight accumulators with the same tree as `hsum8`, only transposed.
pub fn dot_rows(q: &[f32], k: &[f32], scale: f32, out: &mut [f32]) {
    let d = q.len();
    assert!(d > 0 && k.len() == out.len() * d, "dot_rows: k is not [out.len(), q.len()]");
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: AVX2/FMA checked; k holds out.len() rows of d floats (asserted above).
        unsafe { avx2::dot_rows(q, k, scale, out) };
        return;
    }
    dot_rows_portable(q, k, scale, out)
}

/// `dot_rows` over 16-bit rows, each element widened to f32 as it is read: bit-identical to `dot_rows`
/// over the widened rows (and to [`dot_rows_portable`] over these).
pub fn dot_rows_16<T: Half16>(q: &[f32], k: &[T], scale: f32, out: &mut [f32]) {
    let d = q.len();
    assert!(d > 0 && k.len() == out.len() * d, "dot_rows_16: k is not [out.len(), q.len()]");
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma_f16c() {
        // SAFETY: AVX2/FMA/F16C checked; k holds out.len() rows of d elements (asserted above).
        unsafe { avx2::dot_rows_16(q, k, scale, out) };
        return;
    }
    dot_rows_portable(q, k, scale, out)
}

/// The portable `dot_rows`, for any row element: `out[j] = dot_portable(q, k_j) * scale`.
pub fn dot_rows_portable<T: Widen>(q: &[f32], k: &[T], scale: f32, out: &mut [f32]) {
    let d = q.len();
    assert!(d > 0 && k.len() == out.len() * d, "dot_rows_portable: k is not [out.len(), q.len()]");
    for (o, row) in out.iter_mut().zip(k.chunks_exact(d)) {
        *o = dot_portable(q, row) * scale;
    }
}

/// `acc += p[j] * v_j` for every row `v_j` of `v` (rows of `acc.len()` floats), in order of j: the
/// weighted sum of cached values. Every element sees the same fused multiply-adds in the same order as
/// calling `axpy(p[j], v_j, acc)` row by row, so the result is bit-identical to that; the AVX2 path
/// just keeps `acc` in registers across the rows.
pub fn axpy_rows(p: &[f32], v: &[f32], acc: &mut [f32]) {
    let d = acc.len();
    assert!(d > 0 && v.len() == p.len() * d, "axpy_rows: v is not [p.len(), acc.len()]");
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: AVX2/FMA checked; v holds p.len() rows of d floats (asserted above).
        unsafe { avx2::axpy_rows(p, v, acc) };
        return;
    }
    axpy_rows_portable(p, v, acc)
}

/// `axpy_rows` over 16-bit rows, each element widened to f32 as it is read: bit-identical to
/// `axpy_rows` over the widened rows (and to [`axpy_rows_portable`] over these).
pub fn axpy_rows_16<T: Half16>(p: &[f32], v: &[T], acc: &mut [f32]) {
    let d = acc.len();
    assert!(d > 0 && v.len() == p.len() * d, "axpy_rows_16: v is not [p.len(), acc.len()]");
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma_f16c() {
        // SAFETY: AVX2/FMA/F16C checked; v holds p.len() rows of d elements (asserted above).
        unsafe { avx2::axpy_rows_16(p, v, acc) };
        return;
    }
    axpy_rows_portable(p, v, acc)
}

/// The portable `axpy_rows`, for any row element: one fused multiply-add per element and row, rows in
/// order.
pub fn axpy_rows_portable<T: Widen>(p: &[f32], v: &[T], acc: &mut [f32]) {
    let d = acc.len();
    assert!(d > 0 && v.len() == p.len() * d, "axpy_rows_portable: v is not [p.len(), acc.len()]");
    for (a, row) in p.iter().zip(v.chunks_exact(d)) {
        for (yi, xi) in acc.iter_mut().zip(row) {
            *yi = a.mul_add(xi.widen(), *yi);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::Half16;

    /// Horizontal sum with the same tree as `hsum8`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let q = _mm_add_ps(lo, hi); // [v0+v4, v1+v5, v2+v6, v3+v7]
        let d = _mm_add_ps(q, _mm_movehl_ps(q, q)); // [q0+q2, q1+q3, ..]
        let s = _mm_add_ss(d, _mm_shuffle_ps(d, d, 0x55)); // d0 + d1
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// Requires AVX2 and FMA; `a.len() == b.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let n8 = n / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i < n8 {
            // SAFETY: i + 8 <= n8 <= len of both slices.
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i)), _mm256_loadu_ps(b.as_ptr().add(i)), acc);
            i += 8;
        }
        let mut s = hsum(acc);
        while i < n {
            s = a[i].mul_add(b[i], s);
            i += 1;
        }
        s
    }

    /// # Safety
    /// Requires AVX2 and FMA; `x.len() == y.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let n8 = n / 8 * 8;
        let va = _mm256_set1_ps(a);
        let mut i = 0;
        while i < n8 {
            // SAFETY: i + 8 <= n8 <= len of both slices.
            let yp = y.as_mut_ptr().add(i);
            _mm256_storeu_ps(yp, _mm256_fmadd_ps(va, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(yp)));
            i += 8;
        }
        while i < n {
            y[i] = a.mul_add(x[i], y[i]);
            i += 1;
        }
    }

    /// # Safety
    /// Requires AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn max(x: &[f32]) -> f32 {
        let n8 = x.len() / 8 * 8;
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < n8 {
            // SAFETY: i + 8 <= n8 <= x.len().
            m = _mm256_max_ps(m, unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) });
            i += 8;
        }
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` is 8 writable f32s; storeu has no alignment requirement.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
        lanes.iter().chain(&x[n8..]).fold(f32::NEG_INFINITY, |m, &v| m.max(v))
    }

    /// `[x.lo + x.hi, y.lo + y.hi]`: step one of `hsum` for two accumulators.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn half(x: __m256, y: __m256) -> __m256 {
        _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(x, y), _mm256_permute2f128_ps::<0x31>(x, y))
    }

    /// Step two of `hsum` (lanes l and l + 2 of each four partial sums) for four accumulators.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn pair(x: __m256, y: __m256) -> __m256 {
        _mm256_add_ps(_mm256_shuffle_ps::<0x44>(x, y), _mm256_shuffle_ps::<0xEE>(x, y))
    }

    /// Eight lane-wise accumulators (one per key) reduced with `hsum`'s tree, transposed: step one
    /// adds each accumulator's high half to its low half, step two lanes l and l + 2, step three lanes
    /// 0 and 1, pairing exactly the operands `hsum` pairs. Returns `[s0, s2, s4, s6 | s1, s3, s5, s7]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum_x8(a: [__m256; 8]) -> __m256 {
        let (s01, s23, s45, s67) = (half(a[0], a[1]), half(a[2], a[3]), half(a[4], a[5]), half(a[6], a[7]));
        let (d0123, d4567) = (pair(s01, s23), pair(s45, s67));
        _mm256_add_ps(_mm256_shuffle_ps::<0x88>(d0123, d4567), _mm256_shuffle_ps::<0xDD>(d0123, d4567))
    }

    /// # Safety
    /// Requires AVX2 and FMA; `k.len() == out.len() * q.len()`, `q.len() > 0`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows(q: &[f32], k: &[f32], scale: f32, out: &mut [f32]) {
        let d = q.len();
        let n = out.len();
        let mut j = 0;
        if d.is_multiple_of(8) {
            let vscale = _mm256_set1_ps(scale);
            // hsum_x8 leaves key r in lane [0, 4, 1, 5, 2, 6, 3, 7][r].
            let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            while j + 8 <= n {
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut i = 0;
                while i < d {
                    // SAFETY: i + 8 <= d = q.len().
                    let qv = unsafe { _mm256_loadu_ps(q.as_ptr().add(i)) };
                    for (r, a) in acc.iter_mut().enumerate() {
                        // SAFETY: row j + r < n, so (j + r) * d + i + 8 <= n * d = k.len().
                        let kv = unsafe { _mm256_loadu_ps(k.as_ptr().add((j + r) * d + i)) };
                        *a = _mm256_fmadd_ps(qv, kv, *a);
                    }
                    i += 8;
                }
                let s = _mm256_permutevar8x32_ps(_mm256_mul_ps(hsum_x8(acc), vscale), order);
                // SAFETY: j + 8 <= n = out.len().
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(j), s) };
                j += 8;
            }
        }
        while j < n {
            // SAFETY: same features; row j is in bounds of k.
            out[j] = unsafe { dot(q, &k[j * d..(j + 1) * d]) } * scale;
            j += 1;
        }
    }

    /// # Safety
    /// Requires AVX2 and FMA; `v.len() == p.len() * acc.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy_rows(p: &[f32], v: &[f32], acc: &mut [f32]) {
        let d = acc.len();
        let mut c = 0;
        // Columns in register-sized chunks: 64 floats (8 registers) while they last, then 8.
        while c + 64 <= d {
            let mut y = [_mm256_setzero_ps(); 8];
            for (u, yu) in y.iter_mut().enumerate() {
                // SAFETY: c + 8 * u + 8 <= c + 64 <= acc.len().
                *yu = unsafe { _mm256_loadu_ps(acc.as_ptr().add(c + 8 * u)) };
            }
            for (j, &a) in p.iter().enumerate() {
                let va = _mm256_set1_ps(a);
                for (u, yu) in y.iter_mut().enumerate() {
                    // SAFETY: j < p.len(), so j * d + c + 8 * u + 8 <= p.len() * d = v.len().
                    let x = unsafe { _mm256_loadu_ps(v.as_ptr().add(j * d + c + 8 * u)) };
                    *yu = _mm256_fmadd_ps(va, x, *yu);
                }
            }
            for (u, yu) in y.iter().enumerate() {
                // SAFETY: c + 8 * u + 8 <= c + 64 <= acc.len().
                unsafe { _mm256_storeu_ps(acc.as_mut_ptr().add(c + 8 * u), *yu) };
            }
            c += 64;
        }
        while c + 8 <= d {
            // SAFETY: c + 8 <= acc.len().
            let mut y = unsafe { _mm256_loadu_ps(acc.as_ptr().add(c)) };
            for (j, &a) in p.iter().enumerate() {
                // SAFETY: j * d + c + 8 <= v.len().
                let x = unsafe { _mm256_loadu_ps(v.as_ptr().add(j * d + c)) };
                y = _mm256_fmadd_ps(_mm256_set1_ps(a), x, y);
            }
            // SAFETY: as the load above.
            unsafe { _mm256_storeu_ps(acc.as_mut_ptr().add(c), y) };
            c += 8;
        }
        for i in c..d {
            for (j, &a) in p.iter().enumerate() {
                acc[i] = a.mul_add(v[j * d + i], acc[i]);
            }
        }
    }

    // The 16-bit kernels below are `dot`, `dot_rows` and `axpy_rows` with every load of a cache
    // element replaced by `T::load8` (or `widen` in the scalar tails): the same operations in the same
    // order on exactly the same f32 values.

    /// `dot` against a 16-bit row.
    ///
    /// # Safety
    /// Requires AVX2, FMA and F16C; `a.len() == b.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_16<T: Half16>(a: &[f32], b: &[T]) -> f32 {
        let n = a.len();
        let n8 = n / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i < n8 {
            // SAFETY: i + 8 <= n8 <= len of both slices; the features are enabled here.
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i)), T::load8(b.as_ptr().add(i)), acc);
            i += 8;
        }
        let mut s = hsum(acc);
        while i < n {
            s = a[i].mul_add(b[i].widen(), s);
            i += 1;
        }
        s
    }

    /// `dot_rows` over 16-bit rows.
    ///
    /// # Safety
    /// Requires AVX2, FMA and F16C; `k.len() == out.len() * q.len()`, `q.len() > 0`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows_16<T: Half16>(q: &[f32], k: &[T], scale: f32, out: &mut [f32]) {
        let d = q.len();
        let n = out.len();
        let mut j = 0;
        if d.is_multiple_of(8) {
            let vscale = _mm256_set1_ps(scale);
            // hsum_x8 leaves key r in lane [0, 4, 1, 5, 2, 6, 3, 7][r].
            let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            while j + 8 <= n {
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut i = 0;
                while i < d {
                    // SAFETY: i + 8 <= d = q.len().
                    let qv = unsafe { _mm256_loadu_ps(q.as_ptr().add(i)) };
                    for (r, a) in acc.iter_mut().enumerate() {
                        // SAFETY: row j + r < n, so (j + r) * d + i + 8 <= n * d = k.len(); the
                        // features load8 needs are enabled here.
                        let kv = unsafe { T::load8(k.as_ptr().add((j + r) * d + i)) };
                        *a = _mm256_fmadd_ps(qv, kv, *a);
                    }
                    i += 8;
                }
                let s = _mm256_permutevar8x32_ps(_mm256_mul_ps(hsum_x8(acc), vscale), order);
                // SAFETY: j + 8 <= n = out.len().
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(j), s) };
                j += 8;
            }
        }
        while j < n {
            // SAFETY: same features; row j is in bounds of k.
            out[j] = unsafe { dot_16(q, &k[j * d..(j + 1) * d]) } * scale;
            j += 1;
        }
    }

    /// `axpy_rows` over 16-bit rows.
    ///
    /// # Safety
    /// Requires AVX2, FMA and F16C; `v.len() == p.len() * acc.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_rows_16<T: Half16>(p: &[f32], v: &[T], acc: &mut [f32]) {
        let d = acc.len();
        let mut c = 0;
        // Columns in register-sized chunks: 64 floats (8 registers) while they last, then 8.
        while c + 64 <= d {
            let mut y = [_mm256_setzero_ps(); 8];
            for (u, yu) in y.iter_mut().enumerate() {
                // SAFETY: c + 8 * u + 8 <= c + 64 <= acc.len().
                *yu = unsafe { _mm256_loadu_ps(acc.as_ptr().add(c + 8 * u)) };
            }
            for (j, &a) in p.iter().enumerate() {
                let va = _mm256_set1_ps(a);
                for (u, yu) in y.iter_mut().enumerate() {
                    // SAFETY: j < p.len(), so j * d + c + 8 * u + 8 <= p.len() * d = v.len(); the
                    // features load8 needs are enabled here.
                    let x = unsafe { T::load8(v.as_ptr().add(j * d + c + 8 * u)) };
                    *yu = _mm256_fmadd_ps(va, x, *yu);
                }
            }
            for (u, yu) in y.iter().enumerate() {
                // SAFETY: c + 8 * u + 8 <= c + 64 <= acc.len().
                unsafe { _mm256_storeu_ps(acc.as_mut_ptr().add(c + 8 * u), *yu) };
            }
            c += 64;
        }
        while c + 8 <= d {
            // SAFETY: c + 8 <= acc.len().
            let mut y = unsafe { _mm256_loadu_ps(acc.as_ptr().add(c)) };
            for (j, &a) in p.iter().enumerate() {
                // SAFETY: j * d + c + 8 <= v.len(); the features load8 needs are enabled here.
                let x = unsafe { T::load8(v.as_ptr().add(j * d + c)) };
                y = _mm256_fmadd_ps(_mm256_set1_ps(a), x, y);
            }
            // SAFETY: as the load above.
            unsafe { _mm256_storeu_ps(acc.as_mut_ptr().add(c), y) };
            c += 8;
        }
        for i in c..d {
            for (j, &a) in p.iter().enumerate() {
                acc[i] = a.mul_add(v[j * d + i].widen(), acc[i]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avx2_and_portable_dot_agree_bitwise() {
        for n in [1usize, 7, 8, 9, 64, 100, 577] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 13.0).collect();
            let reference: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let d = dot(&a, &b);
            assert_eq!(d.to_bits(), dot_portable(&a, &b).to_bits(), "n={n}");
            assert!((d as f64 - reference).abs() < 1e-4 * (1.0 + reference.abs()), "n={n}");
        }
    }

    #[test]
    fn axpy_adds() {
        let x: Vec<f32> = (0..19).map(|i| i as f32).collect();
        let mut y = vec![1.0f32; 19];
        axpy(2.0, &x, &mut y);
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, 1.0 + 2.0 * i as f32);
        }
    }

    #[test]
    fn max_is_the_largest_element() {
        for n in [0usize, 1, 7, 8, 9, 64, 100] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
            assert_eq!(max(&x), x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)), "n={n}");
        }
    }

    #[test]
    fn row_kernels_match_single_row_calls_bitwise() {
        for d in [8usize, 12, 64, 72, 128] {
            for n in [1usize, 7, 8, 9, 16, 23] {
                let q: Vec<f32> = (0..d).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
                let k: Vec<f32> = (0..n * d).map(|i| ((i * 53 % 97) as f32 - 48.0) / 13.0).collect();
                let mut got = vec![0f32; n];
                dot_rows(&q, &k, 0.125, &mut got);
                for j in 0..n {
                    let want = dot(&q, &k[j * d..(j + 1) * d]) * 0.125;
                    assert_eq!(got[j].to_bits(), want.to_bits(), "d={d} n={n} j={j}");
                }
                let p: Vec<f32> = (0..n).map(|j| (j as f32 + 0.3) / 7.0).collect();
                let mut acc = q.clone();
                axpy_rows(&p, &k, &mut acc);
                let mut want = q.clone();
                for j in 0..n {
                    axpy(p[j], &k[j * d..(j + 1) * d], &mut want);
                }
                assert_eq!(acc, want, "d={d} n={n}");
            }
        }
    }

    /// The 16-bit row kernels, on whichever path this CPU dispatches to, against the portable ones and
    /// against the f32 kernels over the widened rows: all bit-identical.
    fn check_16bit_row_kernels<T: Half16 + std::fmt::Debug>(from_f32: fn(f32) -> T) {
        for d in [8usize, 12, 64, 72, 128] {
            for n in [1usize, 7, 8, 9, 16, 23] {
                let q: Vec<f32> = (0..d).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
                // Values across several binades, incl. f16 subnormals (|x| < 2^-14) and negative zero.
                let k: Vec<T> = (0..n * d)
                    .map(|i| {
                        let x = ((i * 53 % 97) as f32 - 48.0) / 13.0;
                        from_f32(if i % 11 == 3 {
                            x * 1e-6
                        } else if i % 29 == 0 {
                            -0.0
                        } else {
                            x
                        })
                    })
                    .collect();
                let wide: Vec<f32> = k.iter().map(|x| x.widen()).collect();
                let mut got = vec![0f32; n];
                dot_rows_16(&q, &k, 0.125, &mut got);
                let mut portable = vec![0f32; n];
                dot_rows_portable(&q, &k, 0.125, &mut portable);
                let mut want = vec![0f32; n];
                dot_rows(&q, &wide, 0.125, &mut want);
                for j in 0..n {
                    assert_eq!(got[j].to_bits(), portable[j].to_bits(), "dot d={d} n={n} j={j}");
                    assert_eq!(got[j].to_bits(), want[j].to_bits(), "dot vs f32 d={d} n={n} j={j}");
                }
                let p: Vec<f32> = (0..n).map(|j| (j as f32 + 0.3) / 7.0).collect();
                let mut acc = q.clone();
                axpy_rows_16(&p, &k, &mut acc);
                let mut portable = q.clone();
                axpy_rows_portable(&p, &k, &mut portable);
                let mut want = q.clone();
                axpy_rows(&p, &wide, &mut want);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&acc), bits(&portable), "axpy d={d} n={n}");
                assert_eq!(bits(&acc), bits(&want), "axpy vs f32 d={d} n={n}");
            }
        }
    }

    #[test]
    fn f16_row_kernels_simd_portable_and_f32_agree_bitwise() {
        check_16bit_row_kernels(f16::from_f32);
    }

    #[test]
    fn bf16_row_kernels_simd_portable_and_f32_agree_bitwise() {
        check_16bit_row_kernels(bf16::from_f32);
    }

    #[test]
    fn f32_row_kernels_simd_and_portable_agree_bitwise() {
        for d in [8usize, 12, 64, 72, 128] {
            for n in [1usize, 7, 8, 9, 16, 23] {
                let q: Vec<f32> = (0..d).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
                let k: Vec<f32> = (0..n * d).map(|i| ((i * 53 % 97) as f32 - 48.0) / 13.0).collect();
                let (mut got, mut want) = (vec![0f32; n], vec![0f32; n]);
                dot_rows(&q, &k, 0.125, &mut got);
                dot_rows_portable(&q, &k, 0.125, &mut want);
                assert_eq!(got, want, "dot d={d} n={n}");
                let p: Vec<f32> = (0..n).map(|j| (j as f32 + 0.3) / 7.0).collect();
                let (mut got, mut want) = (q.clone(), q.clone());
                axpy_rows(&p, &k, &mut got);
                axpy_rows_portable(&p, &k, &mut want);
                assert_eq!(got, want, "axpy d={d} n={n}");
            }
        }
    }

    #[test]
    fn bf16_widens_by_shifting_its_bits() {
        for bits in [0x3F80u16, 0x8000, 0x0001, 0x7F80, 0xC2F7] {
            let x = bf16::from_bits(bits);
            assert_eq!(x.widen().to_bits(), (bits as u32) << 16);
            assert_eq!(x.widen(), x.to_f32());
        }
    }
}
