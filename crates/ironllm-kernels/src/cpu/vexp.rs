//! A vectorized `exp` for the activations and the softmax, with a scalar twin that gives the same
//! bits, so results do not depend on which path (or slice position) computed them.
//!
//! `std`'s `f32::exp` is a libm call per element, which at 16 concurrent sequences made the SwiGLU
//! activation and the attention softmax take ~10% of a decode step. This is the classic Cephes
//! scheme: `exp(x) = 2^n * exp(r)` with `n = round(x / ln 2)` and `r = x - n ln 2` (ln 2 split in
//! two so that `r` is exact), `exp(r)` a degree-7 polynomial on `|r| <= ln 2 / 2`. Results are
//! within 2 ulp of the exact value for results in f32's normal range; below `exp(-87.33)` (where
//! results would be subnormal) it returns 0, above `exp(88.37)` infinity, NaN stays NaN.
//!
//! Both paths evaluate the same operations in the same order with fused multiply-adds
//! (`f32::mul_add` in the scalar twin), so they agree bit for bit.

/// Inputs below this give 0 (the result would be subnormal).
const LO: f32 = -87.336_55;
/// Inputs above this give infinity (`round(x / ln 2)` would reach 128).
const HI: f32 = 88.376_26;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 = LN2_HI + LN2_LO, LN2_HI with few mantissa bits so that `n * LN2_HI` is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Polynomial coefficients of `(exp(r) - 1 - r) / r^2`, highest degree first (Cephes `expf`).
const P: [f32; 6] = [1.987_569_1e-4, 1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];

/// `exp(x)`, the reference for the SIMD path.
#[inline]
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x < LO {
        return 0.0;
    }
    if x > HI {
        return f32::INFINITY;
    }
    let n = (x * LOG2E).round_ties_even();
    let r = (-n).mul_add(LN2_HI, x);
    let r = (-n).mul_add(LN2_LO, r);
    let mut p = P[0];
    for &c in &P[1..] {
        p = p.mul_add(r, c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `x / (1 + exp(-x))`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `v[i] = exp(v[i] - shift)` (the softmax numerator).
pub fn exp_shifted(v: &mut [f32], shift: f32) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2_fma() {
        // SAFETY: AVX2 and FMA checked.
        return unsafe { avx2::exp_shifted(v, shift) };
    }
    for x in v {
        *x = exp(*x - shift);
    }
}

/// `out[i] = silu(g[i]) * u[i]`.
pub fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    assert!(g.len() == out.len() && u.len() == out.len(), "silu_mul: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2_fma() {
        // SAFETY: AVX2 and FMA checked; the lengths are equal (asserted).
        return unsafe { avx2::silu_mul(g, u, out) };
    }
    for ((o, &x), &v) in out.iter_mut().zip(g).zip(u) {
        *o = silu(x) * v;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{HI, LN2_HI, LN2_LO, LO, LOG2E, P};

    /// Eight lanes of `super::exp`, operation for operation.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn exp8(x: __m256) -> __m256 {
        // `max(LO, x)` returns x when x is NaN (the second operand wins), so NaN flows through.
        let xc = _mm256_min_ps(_mm256_set1_ps(HI), _mm256_max_ps(_mm256_set1_ps(LO), x));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            xc,
            _mm256_set1_ps(LOG2E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), xc);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(P[0]);
        for &c in &P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        let e = _mm256_mul_ps(y, scale);
        // Out of range: 0 below LO, infinity above HI (ordered compares: false for NaN).
        let e = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(LO)), e);
        _mm256_blendv_ps(e, _mm256_set1_ps(f32::INFINITY), _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(HI)))
    }

    /// Applies `f` to `v` eight lanes at a time; the tail goes through a zero-padded copy, so
    /// every element takes the SIMD path.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn map8(v: &mut [f32], f: impl Fn(__m256) -> __m256) {
        let mut chunks = v.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: `c` is 8 f32s; unaligned load/store.
            unsafe { _mm256_storeu_ps(c.as_mut_ptr(), f(_mm256_loadu_ps(c.as_ptr()))) };
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let mut buf = [0f32; 8];
            buf[..tail.len()].copy_from_slice(tail);
            // SAFETY: `buf` is 8 f32s.
            unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), f(_mm256_loadu_ps(buf.as_ptr()))) };
            tail.copy_from_slice(&buf[..tail.len()]);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_shifted(v: &mut [f32], shift: f32) {
        let s = _mm256_set1_ps(shift);
        map8(v, |x| exp8(_mm256_sub_ps(x, s)));
    }

    /// `g.len() == u.len() == out.len()` (the caller asserts it).
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        let one = _mm256_set1_ps(1.0);
        let sign = _mm256_set1_ps(-0.0);
        let silu_mul8 = |x: __m256, v: __m256| {
            let e = exp8(_mm256_xor_ps(x, sign));
            _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), v)
        };
        let n = out.len();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, and all three slices have length n.
            unsafe {
                let y = silu_mul8(_mm256_loadu_ps(g.as_ptr().add(i)), _mm256_loadu_ps(u.as_ptr().add(i)));
                _mm256_storeu_ps(out.as_mut_ptr().add(i), y);
            }
            i += 8;
        }
        if i < n {
            let (mut gb, mut ub, mut ob) = ([0f32; 8], [0f32; 8], [0f32; 8]);
            gb[..n - i].copy_from_slice(&g[i..]);
            ub[..n - i].copy_from_slice(&u[i..]);
            // SAFETY: the buffers are 8 f32s each.
            unsafe {
                let y = silu_mul8(_mm256_loadu_ps(gb.as_ptr()), _mm256_loadu_ps(ub.as_ptr()));
                _mm256_storeu_ps(ob.as_mut_ptr(), y);
            }
            out[i..].copy_from_slice(&ob[..n - i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two finite f32 of the same sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    fn inputs() -> Vec<f32> {
        let mut x: Vec<f32> = (-200_000..=200_000).map(|i| i as f32 * 1e-3 * 0.9).collect();
        x.extend([0.0, -0.0, LO, HI, LO - 1e-3, HI + 1e-3, -1e-30, 1e-30, f32::INFINITY, f32::NEG_INFINITY]);
        x.extend([f32::NAN, -1000.0, 1000.0, 88.0, -87.0, 0.5 * std::f32::consts::LN_2]);
        x
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_exact_value() {
        for x in inputs() {
            let got = exp(x);
            if x.is_nan() {
                assert!(got.is_nan());
                continue;
            }
            let want = (x as f64).exp();
            if x < LO {
                assert_eq!(got, 0.0, "exp({x})");
            } else if x > HI {
                assert_eq!(got, f32::INFINITY, "exp({x})");
            } else {
                assert!(ulps(got, want as f32) <= 2, "exp({x}) = {got}, exact {want}");
            }
        }
    }

    #[test]
    fn simd_paths_match_the_scalar_twin_bitwise() {
        let x = inputs();
        // Odd lengths so the padded tails run too.
        for len in [x.len(), 1, 7, 9, 13] {
            let xs = &x[x.len() - len..];
            let mut v = xs.to_vec();
            exp_shifted(&mut v, 0.75);
            for (&a, &g) in xs.iter().zip(&v) {
                let want = exp(a - 0.75);
                assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "exp({a} - 0.75)");
            }
            let u: Vec<f32> = (0..len).map(|i| 0.5 + (i % 7) as f32 / 3.0).collect();
            let mut out = vec![0f32; len];
            silu_mul(xs, &u, &mut out);
            for ((&a, &b), &g) in xs.iter().zip(&u).zip(&out) {
                let want = silu(a) * b;
                assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "silu({a}) * {b}");
            }
        }
    }

    #[test]
    fn silu_is_close_to_its_definition() {
        for i in -20_000..=20_000 {
            let x = i as f32 / 997.0;
            let want = x as f64 / (1.0 + (-(x as f64)).exp());
            let got = silu(x) as f64;
            assert!((got - want).abs() <= 4.0 * f32::EPSILON as f64 * want.abs().max(1e-30), "silu({x})");
        }
        assert_eq!(silu(-200.0), -0.0);
        assert_eq!(silu(200.0), 200.0);
    }
}
