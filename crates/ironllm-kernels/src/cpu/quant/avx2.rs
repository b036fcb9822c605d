//! AVX2 dot kernels (x86_64 with AVX2, FMA and F16C, i.e. Haswell and later).
//!
//! Every block pair becomes `maddubs` (unsigned weight bytes times signed activation bytes,
//! pairwise summed to i16) and `madd` (to i32, times ones or the sub-block scales). Weights are
//! kept unsigned (the Q4_0/Q5_0/Q6_K/Q3_K offsets are applied through the activation block sums)
//! so that `maddubs` needs no sign fix-up; Q8_0, whose weights are signed, uses the
//! `abs(w) * sign(x, w)` identity instead. No intermediate can overflow: activations are in
//! [-127, 127] and weight bytes below 64 (or |w| <= 128 for Q8_0), so a `maddubs` pair stays
//! under 2 * 128 * 127 < 2^15.
//!
//! The kernels are safe `#[target_feature]` functions over fixed-size array views, so their only
//! `unsafe` is the unaligned loads; each `RowDot` impl calls its kernel under the `Avx2` token.
#![allow(non_camel_case_types)] // one kernel per GGML type, named after it

use std::arch::x86_64::*;

use super::act::{block_scale, fill_bsums, BlockQ8, BlockQ8K};
use super::blocks::{
    arr, k4_scales_mins, q3k_scales, u32_at, Q2_K_BYTES, Q3_K_BYTES, Q4_0_BYTES, Q4_1_BYTES, Q4_K_BYTES, Q5_0_BYTES,
    Q5_1_BYTES, Q5_K_BYTES, Q6_K_BYTES, Q8_0_BYTES,
};
use super::RowDot;

/// Proof that this CPU runs AVX2, FMA and F16C: only [`Avx2::detect`] makes one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx2(());

impl Avx2 {
    pub(crate) fn detect() -> Option<Avx2> {
        let ok =
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
        ok.then_some(Avx2(()))
    }
}

pub(crate) struct Q4_0(pub(crate) Avx2);
pub(crate) struct Q4_1(pub(crate) Avx2);
pub(crate) struct Q5_0(pub(crate) Avx2);
pub(crate) struct Q5_1(pub(crate) Avx2);
pub(crate) struct Q8_0(pub(crate) Avx2);
pub(crate) struct Q2_K(pub(crate) Avx2);
pub(crate) struct Q3_K(pub(crate) Avx2);
pub(crate) struct Q4_K(pub(crate) Avx2);
pub(crate) struct Q5_K(pub(crate) Avx2);
pub(crate) struct Q6_K(pub(crate) Avx2);

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn load_u8x16(b: &[u8; 16]) -> __m128i {
    // SAFETY: `b` is 16 readable bytes, and `loadu` has no alignment requirement.
    unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn load_u8x32(b: &[u8; 32]) -> __m256i {
    // SAFETY: `b` is 32 readable bytes, and `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn load_i8x32(b: &[i8; 32]) -> __m256i {
    // SAFETY: `b` is 32 readable bytes, and `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
}

/// The f16 at `b[off..off + 2]`, converted by F16C rather than `half`'s portable path.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn f16_at(b: &[u8], off: usize) -> f32 {
    let bits = u16::from_le_bytes([b[off], b[off + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// Unsigned bytes `u` times signed bytes `s`, summed in groups of four to i32 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dot_us(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

/// Signed bytes `w` times signed bytes `s` (`s` never -128), summed in groups of four.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dot_ss(w: __m256i, s: __m256i) -> __m256i {
    dot_us(_mm256_sign_epi8(w, w), _mm256_sign_epi8(s, w))
}

/// The 32 nibbles of 16 bytes in element order: low nibbles, then high nibbles. The bytes are
/// broadcast to both halves and the upper half shifted by 4, which avoids a lane insert.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn nibbles(b: &[u8; 16]) -> __m256i {
    let both = _mm256_broadcastsi128_si256(load_u8x16(b));
    let shifted = _mm256_srlv_epi64(both, _mm256_setr_epi64x(0, 0, 4, 4));
    _mm256_and_si256(shifted, _mm256_set1_epi8(0x0F))
}

/// Two adjacent f16 values at `b[off..off + 4]` as lanes 0 and 1 (lanes 2, 3 are zero).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn f16x2_at(b: &[u8], off: usize) -> __m128 {
    _mm_cvtph_ps(_mm_cvtsi32_si128(u32_at(b, off) as i32))
}

/// `[a.d, a.s, 0, 0]`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn load_ds(a: &BlockQ8) -> __m128 {
    // SAFETY: `BlockQ8` is `repr(C)` with `d` at offset 0 and `s` at offset 4, so the 8 bytes
    // read are both fields of `*a`; `_mm_load_sd` has no alignment requirement.
    unsafe { _mm_castpd_ps(_mm_load_sd((a as *const BlockQ8).cast::<f64>())) }
}

/// Byte i is 0x10 where bit i of `qh` is set, else 0: the fifth bit of Q5_0/Q5_1 elements.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn fifth_bits(qh: u32) -> __m256i {
    // Put qh's byte i / 8 in byte i, keep bit i % 8 of it, and widen a match to a full byte.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(qh as i32),
        _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        ),
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// i16 lanes 0..8 set to `lo` and 8..16 to `hi`: per-16-element scales for a `madd` over 32 elements.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn scale_pair(lo: i16, hi: i16) -> __m256i {
    _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo))
}

/// A legacy (32-element) block's weights as bytes for `maddubs`, and `[d, offset, 0, 0]` where
/// `offset` multiplies the activation sum `s` (the block's `m`, or `-8 d`, `-16 d`, 0). Keeping
/// the two scales in one vector lets one multiply by `[da, s]` form both products.
type Legacy = (__m256i, __m128);

/// `[d, -bias * d, 0, 0]` for a symmetric type whose f16 scale is at `b[0..2]`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn scale_with_bias(b: &[u8], bias: f32) -> __m128 {
    let bits = u16::from_le_bytes([b[0], b[1]]) as u32;
    let d = _mm_cvtph_ps(_mm_cvtsi32_si128((bits | (bits << 16)) as i32));
    _mm_mul_ps(d, _mm_setr_ps(1.0, -bias, 0.0, 0.0))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn decode_q4_0(b: &[u8; Q4_0_BYTES]) -> Legacy {
    (nibbles(arr(b, 2)), scale_with_bias(b, 8.0))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn decode_q4_1(b: &[u8; Q4_1_BYTES]) -> Legacy {
    (nibbles(arr(b, 4)), f16x2_at(b, 0))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn decode_q5_0(b: &[u8; Q5_0_BYTES]) -> Legacy {
    let q = _mm256_or_si256(nibbles(arr(b, 6)), fifth_bits(u32_at(b, 2)));
    (q, scale_with_bias(b, 16.0))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn decode_q5_1(b: &[u8; Q5_1_BYTES]) -> Legacy {
    let q = _mm256_or_si256(nibbles(arr(b, 8)), fifth_bits(u32_at(b, 4)));
    (q, f16x2_at(b, 0))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn decode_q8_0(b: &[u8; Q8_0_BYTES]) -> Legacy {
    // The zero upper half of the widened f16 converts to an offset of 0.0.
    let d = _mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes([b[0], b[1]]) as i32));
    (load_u8x32(arr(b, 2)), d)
}

/// Generates a legacy-type kernel and its `RowDot` impl. Per block and activation row,
/// `[d, offset] * [da, s]` gives `d * da`, which scales the block's integer dot lane-wise, and
/// `offset * s`; lanes are summed once at the end of the row. Blocks go in pairs whose two
/// products are combined before touching the accumulators: a block is only a dozen
/// instructions, so one add chain per block would bound a lone row (decode) by latency, while
/// one accumulator pair per row keeps four-row tiles within the 16 vector registers.
macro_rules! legacy_kernel {
    ($ty:ident, $kernel:ident, $bytes:expr, $decode:ident, $dot:ident) => {
        #[target_feature(enable = "avx2,fma,f16c")]
        fn $kernel<const R: usize>(w: &[u8], acts: [&[BlockQ8]; R]) -> [f32; R] {
            let mut acc = [_mm256_setzero_ps(); R];
            let mut acc_s = [_mm_setzero_ps(); R];
            let mut pairs = w.chunks_exact(2 * $bytes);
            for (pi, pair) in pairs.by_ref().enumerate() {
                let bi = 2 * pi;
                let (q0, dm0) = $decode(arr(pair, 0));
                let (q1, dm1) = $decode(arr(pair, $bytes));
                for ((acc, acc_s), act) in acc.iter_mut().zip(acc_s.iter_mut()).zip(acts) {
                    let (a0, a1) = (&act[bi], &act[bi + 1]);
                    let p0 = _mm256_cvtepi32_ps($dot(q0, load_i8x32(&a0.qs)));
                    let p1 = _mm256_cvtepi32_ps($dot(q1, load_i8x32(&a1.qs)));
                    let (prod0, prod1) = (_mm_mul_ps(dm0, load_ds(a0)), _mm_mul_ps(dm1, load_ds(a1)));
                    let pair = _mm256_mul_ps(_mm256_broadcastss_ps(prod1), p1);
                    let pair = _mm256_fmadd_ps(_mm256_broadcastss_ps(prod0), p0, pair);
                    *acc = _mm256_add_ps(*acc, pair);
                    *acc_s = _mm_add_ps(*acc_s, _mm_add_ps(prod0, prod1));
                }
            }
            let tail = pairs.remainder();
            if !tail.is_empty() {
                let bi = w.len() / $bytes - 1;
                let (q0, dm0) = $decode(arr(tail, 0));
                for ((acc, acc_s), act) in acc.iter_mut().zip(acc_s.iter_mut()).zip(acts) {
                    let a0 = &act[bi];
                    let p0 = _mm256_cvtepi32_ps($dot(q0, load_i8x32(&a0.qs)));
                    let prod0 = _mm_mul_ps(dm0, load_ds(a0));
                    *acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(prod0), p0, *acc);
                    *acc_s = _mm_add_ps(*acc_s, prod0);
                }
            }
            let mut out = [0f32; R];
            for ((o, acc), acc_s) in out.iter_mut().zip(acc).zip(acc_s) {
                // Lane 1 of `acc_s` holds the offset terms.
                *o = hsum(acc) + _mm_cvtss_f32(_mm_movehdup_ps(acc_s));
            }
            out
        }

        impl RowDot for $ty {
            type Act = BlockQ8;
            fn dot<const R: usize>(&self, w: &[u8], acts: [&[BlockQ8]; R]) -> [f32; R] {
                // SAFETY: `self.0` is an `Avx2` token, which exists only on CPUs with AVX2, FMA
                // and F16C, the features the kernel is compiled for.
                unsafe { $kernel::<R>(w, acts) }
            }
        }
    };
}

legacy_kernel!(Q4_0, q4_0_dot, Q4_0_BYTES, decode_q4_0, dot_us);
legacy_kernel!(Q4_1, q4_1_dot, Q4_1_BYTES, decode_q4_1, dot_us);
legacy_kernel!(Q5_0, q5_0_dot, Q5_0_BYTES, decode_q5_0, dot_us);
legacy_kernel!(Q5_1, q5_1_dot, Q5_1_BYTES, decode_q5_1, dot_us);
legacy_kernel!(Q8_0, q8_0_dot, Q8_0_BYTES, decode_q8_0, dot_ss);

/// Generates the `RowDot` impl of a K-quant kernel.
macro_rules! k_impl {
    ($ty:ident, $kernel:ident) => {
        impl RowDot for $ty {
            type Act = BlockQ8K;
            fn dot<const R: usize>(&self, w: &[u8], acts: [&[BlockQ8K]; R]) -> [f32; R] {
                // SAFETY: `self.0` is an `Avx2` token, which exists only on CPUs with AVX2, FMA
                // and F16C, the features the kernel is compiled for.
                unsafe { $kernel::<R>(w, acts) }
            }
        }
    };
}

k_impl!(Q2_K, q2_k_dot);
k_impl!(Q3_K, q3_k_dot);
k_impl!(Q4_K, q4_k_dot);
k_impl!(Q5_K, q5_k_dot);
k_impl!(Q6_K, q6_k_dot);

/// Per-row state of the K-quant kernels: the lane-wise float sum over finished super-blocks, a
/// scalar correction (mins or offsets, which `bsums` give per block), and the current
/// super-block's scaled integer sum.
#[derive(Clone, Copy)]
struct KAcc {
    acc: __m256,
    corr: f32,
    isum: __m256i,
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn k_acc_new<const R: usize>() -> [KAcc; R] {
    [KAcc { acc: _mm256_setzero_ps(), corr: 0.0, isum: _mm256_setzero_si256() }; R]
}

/// Ends a super-block: `acc += d * isum` lane-wise, `corr += c`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn k_acc_flush(k: &mut KAcc, d: f32, c: f32) {
    k.acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(k.isum), k.acc);
    k.isum = _mm256_setzero_si256();
    k.corr += c;
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn k_acc_finish<const R: usize>(accs: [KAcc; R]) -> [f32; R] {
    let mut out = [0f32; R];
    for (o, k) in out.iter_mut().zip(accs) {
        *o = hsum(k.acc) + k.corr;
    }
    out
}

/// Q2_K: 2-bit values, per 16 elements a 4-bit scale and a 4-bit min (subtracted via `bsums`).
#[target_feature(enable = "avx2,fma,f16c")]
fn q2_k_dot<const R: usize>(w: &[u8], acts: [&[BlockQ8K]; R]) -> [f32; R] {
    let mut accs = k_acc_new::<R>();
    let three = _mm256_set1_epi8(3);
    for (bi, b) in w.chunks_exact(Q2_K_BYTES).enumerate() {
        let scales: &[u8; 16] = arr(b, 0);
        for h in 0..2 {
            let mut q = load_u8x32(arr(b, 16 + 32 * h));
            for j in 0..4 {
                // Elements 128h + 32j + l are bits 2j.. of byte l; shifting the whole vector
                // right by 2 per step is safe because the mask drops bits from the next byte.
                let qj = _mm256_and_si256(q, three);
                q = _mm256_srli_epi16::<2>(q);
                let g = 8 * h + 2 * j;
                let sv = scale_pair((scales[g] & 0x0F) as i16, (scales[g + 1] & 0x0F) as i16);
                for (k, act) in accs.iter_mut().zip(acts) {
                    let y = load_i8x32(arr(&act[bi].qs, 128 * h + 32 * j));
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(qj, y), sv);
                    k.isum = _mm256_add_epi32(k.isum, p);
                }
            }
        }
        let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
        for (k, act) in accs.iter_mut().zip(acts) {
            let a = &act[bi];
            let mins: i32 = scales.iter().zip(&a.bsums).map(|(&s, &bs)| (s >> 4) as i32 * bs as i32).sum();
            k_acc_flush(k, d * a.d, -(dmin * a.d) * mins as f32);
        }
    }
    k_acc_finish(accs)
}

/// Q3_K: 2 low bits plus a high bit, i.e. `u = q + 4` in 0..8, with signed 6-bit scales per 16
/// elements; the `- 4` is applied through `bsums`.
#[target_feature(enable = "avx2,fma,f16c")]
fn q3_k_dot<const R: usize>(w: &[u8], acts: [&[BlockQ8K]; R]) -> [f32; R] {
    let mut accs = k_acc_new::<R>();
    let (one, three) = (_mm256_set1_epi8(1), _mm256_set1_epi8(3));
    for (bi, b) in w.chunks_exact(Q3_K_BYTES).enumerate() {
        let scales = q3k_scales(arr(b, 96));
        let mut hm = load_u8x32(arr(b, 0));
        for h in 0..2 {
            let mut q = load_u8x32(arr(b, 32 + 32 * h));
            for j in 0..4 {
                // High bit 4h + j of hmask byte l; the running shifts stay below 8 in total.
                let u = _mm256_or_si256(_mm256_and_si256(q, three), _mm256_slli_epi16::<2>(_mm256_and_si256(hm, one)));
                q = _mm256_srli_epi16::<2>(q);
                hm = _mm256_srli_epi16::<1>(hm);
                let g = 8 * h + 2 * j;
                let sv = scale_pair(scales[g] as i16, scales[g + 1] as i16);
                for (k, act) in accs.iter_mut().zip(acts) {
                    let y = load_i8x32(arr(&act[bi].qs, 128 * h + 32 * j));
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, y), sv);
                    k.isum = _mm256_add_epi32(k.isum, p);
                }
            }
        }
        let d = f16_at(b, 108);
        for (k, act) in accs.iter_mut().zip(acts) {
            let a = &act[bi];
            let offs: i32 = scales.iter().zip(&a.bsums).map(|(&s, &bs)| s as i32 * bs as i32).sum();
            k_acc_flush(k, d * a.d, -(d * a.d) * (4 * offs) as f32);
        }
    }
    k_acc_finish(accs)
}

/// Q4_K: 4-bit values, per 32 elements a 6-bit scale and a 6-bit min (subtracted via `bsums`).
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_k_dot<const R: usize>(w: &[u8], acts: [&[BlockQ8K]; R]) -> [f32; R] {
    let mut accs = k_acc_new::<R>();
    let low4 = _mm256_set1_epi8(0x0F);
    for (bi, b) in w.chunks_exact(Q4_K_BYTES).enumerate() {
        let (sc, mn) = k4_scales_mins(arr(b, 4));
        for i in 0..4 {
            let q = load_u8x32(arr(b, 16 + 32 * i));
            let lo = _mm256_and_si256(q, low4);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4);
            let (s_lo, s_hi) = (_mm256_set1_epi16(sc[2 * i] as i16), _mm256_set1_epi16(sc[2 * i + 1] as i16));
            for (k, act) in accs.iter_mut().zip(acts) {
                let y = &act[bi].qs;
                let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load_i8x32(arr(y, 64 * i))), s_lo);
                let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load_i8x32(arr(y, 64 * i + 32))), s_hi);
                k.isum = _mm256_add_epi32(k.isum, _mm256_add_epi32(p_lo, p_hi));
            }
        }
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        for (k, act) in accs.iter_mut().zip(acts) {
            let a = &act[bi];
            let mins: i32 =
                mn.iter().zip(a.bsums.chunks_exact(2)).map(|(&m, bs)| m as i32 * (bs[0] as i32 + bs[1] as i32)).sum();
            k_acc_flush(k, d * a.d, -(dmin * a.d) * mins as f32);
        }
    }
    k_acc_finish(accs)
}

/// Q5_K: Q4_K plus a fifth bit per element from `qh` (bit s of byte l for sub-block s).
#[target_feature(enable = "avx2,fma,f16c")]
fn q5_k_dot<const R: usize>(w: &[u8], acts: [&[BlockQ8K]; R]) -> [f32; R] {
    let mut accs = k_acc_new::<R>();
    let (low4, one) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(1));
    for (bi, b) in w.chunks_exact(Q5_K_BYTES).enumerate() {
        let (sc, mn) = k4_scales_mins(arr(b, 4));
        let mut qh = load_u8x32(arr(b, 16));
        for i in 0..4 {
            let q = load_u8x32(arr(b, 48 + 32 * i));
            let h_lo = _mm256_slli_epi16::<4>(_mm256_and_si256(qh, one));
            let h_hi = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<1>(qh), one));
            qh = _mm256_srli_epi16::<2>(qh);
            let lo = _mm256_or_si256(_mm256_and_si256(q, low4), h_lo);
            let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q), low4), h_hi);
            let (s_lo, s_hi) = (_mm256_set1_epi16(sc[2 * i] as i16), _mm256_set1_epi16(sc[2 * i + 1] as i16));
            for (k, act) in accs.iter_mut().zip(acts) {
                let y = &act[bi].qs;
                let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load_i8x32(arr(y, 64 * i))), s_lo);
                let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load_i8x32(arr(y, 64 * i + 32))), s_hi);
                k.isum = _mm256_add_epi32(k.isum, _mm256_add_epi32(p_lo, p_hi));
            }
        }
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        for (k, act) in accs.iter_mut().zip(acts) {
            let a = &act[bi];
            let mins: i32 =
                mn.iter().zip(a.bsums.chunks_exact(2)).map(|(&m, bs)| m as i32 * (bs[0] as i32 + bs[1] as i32)).sum();
            k_acc_flush(k, d * a.d, -(dmin * a.d) * mins as f32);
        }
    }
    k_acc_finish(accs)
}

/// Q6_K: 6-bit values `u` in 0..64 (the `- 32` applied via `bsums`), signed 8-bit scales per 16.
#[target_feature(enable = "avx2,fma,f16c")]
fn q6_k_dot<const R: usize>(w: &[u8], acts: [&[BlockQ8K]; R]) -> [f32; R] {
    let mut accs = k_acc_new::<R>();
    let (low4, three) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3));
    for (bi, b) in w.chunks_exact(Q6_K_BYTES).enumerate() {
        let scales: [i8; 16] = std::array::from_fn(|g| b[192 + g] as i8);
        for h in 0..2 {
            let ql_a = load_u8x32(arr(b, 64 * h));
            let ql_b = load_u8x32(arr(b, 64 * h + 32));
            let qh = load_u8x32(arr(b, 128 + 32 * h));
            // Quarter c of the half: a nibble of ql_a (c even) or ql_b (c odd), low nibbles
            // first, with bits 2c..2c+2 of qh on top.
            let top = |shift: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(shift, three));
            let quarters = [
                _mm256_or_si256(_mm256_and_si256(ql_a, low4), top(qh)),
                _mm256_or_si256(_mm256_and_si256(ql_b, low4), top(_mm256_srli_epi16::<2>(qh))),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql_a), low4), top(_mm256_srli_epi16::<4>(qh))),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql_b), low4), top(_mm256_srli_epi16::<6>(qh))),
            ];
            for (c, &u) in quarters.iter().enumerate() {
                let g = 8 * h + 2 * c;
                let sv = scale_pair(scales[g] as i16, scales[g + 1] as i16);
                for (k, act) in accs.iter_mut().zip(acts) {
                    let y = load_i8x32(arr(&act[bi].qs, 128 * h + 32 * c));
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, y), sv);
                    k.isum = _mm256_add_epi32(k.isum, p);
                }
            }
        }
        let d = f16_at(b, 208);
        for (k, act) in accs.iter_mut().zip(acts) {
            let a = &act[bi];
            let offs: i32 = scales.iter().zip(&a.bsums).map(|(&s, &bs)| s as i32 * bs as i32).sum();
            k_acc_flush(k, d * a.d, -(d * a.d) * (32 * offs) as f32);
        }
    }
    k_acc_finish(accs)
}

/// Quantizes activations to `BlockQ8`s, with the same results as the scalar quantizer in `act`.
pub(crate) fn quantize_q8(_token: Avx2, x: &[f32], out: &mut [BlockQ8]) {
    // SAFETY: the `Avx2` token exists only on CPUs with AVX2, FMA and F16C.
    unsafe { quantize_q8_impl(x, out) }
}

/// Quantizes activations to `BlockQ8K`s, with the same results as the scalar quantizer in `act`.
pub(crate) fn quantize_q8k(_token: Avx2, x: &[f32], out: &mut [BlockQ8K]) {
    // SAFETY: the `Avx2` token exists only on CPUs with AVX2, FMA and F16C.
    unsafe { quantize_q8k_impl(x, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_q8_impl(x: &[f32], out: &mut [BlockQ8]) {
    for (xb, b) in x.chunks_exact(32).zip(out) {
        let xb: &[f32; 32] = arr(xb, 0);
        let (d, id) = block_scale(abs_max(xb));
        let sum = quantize32(xb, id, &mut b.qs);
        b.d = d;
        b.s = d * sum as f32;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_q8k_impl(x: &[f32], out: &mut [BlockQ8K]) {
    for (xb, b) in x.chunks_exact(256).zip(out) {
        let (d, id) = block_scale(abs_max(xb));
        for (x32, q32) in xb.chunks_exact(32).zip(b.qs.chunks_exact_mut(32)) {
            quantize32(arr(x32, 0), id, q32.try_into().expect("32 values"));
        }
        b.d = d;
        fill_bsums(b);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn load_f32x8(x: &[f32; 8]) -> __m256 {
    // SAFETY: `x` is 8 readable f32s, and `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_ps(x.as_ptr()) }
}

/// max |x| over a multiple of 8 values (NaNs may be dropped or kept, unlike `f32::max`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn abs_max(x: &[f32]) -> f32 {
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_setzero_ps();
    for chunk in x.chunks_exact(8) {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, load_f32x8(arr(chunk, 0))));
    }
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))
}

/// Rounds `x * id` to nearest, ties to even (the default rounding mode), clamped to
/// [-127, 127]; stores the 32 values in order and returns their sum.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn quantize32(x: &[f32; 32], id: f32, qs: &mut [i8; 32]) -> i32 {
    let (vid, hi, lo) = (_mm256_set1_ps(id), _mm256_set1_epi32(127), _mm256_set1_epi32(-127));
    let mut q = [_mm256_setzero_si256(); 4];
    for (i, qi) in q.iter_mut().enumerate() {
        let v = _mm256_cvtps_epi32(_mm256_mul_ps(load_f32x8(arr(x, 8 * i)), vid));
        *qi = _mm256_max_epi32(_mm256_min_epi32(v, hi), lo);
    }
    let total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256::<1>(total));
    let t = _mm_add_epi32(t, _mm_shuffle_epi32::<0b01_00_11_10>(t));
    let sum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32::<0b10_11_00_01>(t)));
    // The packs work within 128-bit lanes and leave 4-value groups in the order 0 2 4 6 1 3 5 7
    // (by dword); the permute puts them back in element order.
    let packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: `qs` is 32 writable bytes, and `storeu` has no alignment requirement.
    unsafe { _mm256_storeu_si256(qs.as_mut_ptr().cast(), ordered) };
    sum
}

/// Converts little-endian f16 `bytes` (two per value) to `out`.
pub(crate) fn f16_to_f32(_token: Avx2, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(bytes.len(), 2 * out.len(), "f16_to_f32: length mismatch");
    // SAFETY: the `Avx2` token exists only on CPUs with AVX2, FMA and F16C.
    unsafe { f16_to_f32_impl(bytes, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn f16_to_f32_impl(bytes: &[u8], out: &mut [f32]) {
    let mut out8 = out.chunks_exact_mut(8);
    for (b, o) in bytes.chunks_exact(16).zip(out8.by_ref()) {
        let v = _mm256_cvtph_ps(load_u8x16(arr(b, 0)));
        // SAFETY: `o` is 8 writable f32s, and `storeu` has no alignment requirement.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), v) };
    }
    let done = out.len() / 8 * 8;
    for (i, o) in out[done..].iter_mut().enumerate() {
        *o = f16_at(bytes, 2 * (done + i));
    }
}
