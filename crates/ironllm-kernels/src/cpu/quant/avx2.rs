//! AVX2 kernels (x86_64 with AVX2, FMA and F16C, i.e. Haswell and later): the block dots and
//! the activation quantizers.
//!
//! Every block pair becomes `maddubs` (unsigned weight bytes times signed activation bytes,
//! pairwise summed to i16) and `madd` (to i32, times ones or the sub-block scales). Weights are
//! kept unsigned (the Q4_0/Q5_0/Q6_K/Q3_K offsets are applied through the activation block sums)
//! so that `maddubs` needs no sign fix-up; Q8_0, whose weights are signed, uses the
//! `abs(w) * sign(x, w)` identity instead. No intermediate can overflow: activations are in
//! [-127, 127] and weight bytes below 64 (or |w| <= 128 for Q8_0), so a `maddubs` lane stays
//! under 2 * 128 * 127 < 2^15.
//!
//! The legacy (32-element) kernels work on two blocks at a time against `BlockQ8x2`: a block is
//! only 16 or 32 weight bytes, and handling its float scaling alone costs as much as its integer
//! dot; pairing halves that cost (measured 1.4x on decode, 1.6x on 16-row batches).
//!
//! On CPUs with AVX-512 VNNI (Ice Lake, Zen 4 and later) the legacy kernels are compiled a second
//! time with AVX-512 enabled: `vpdpbusd` replaces `maddubs` + `madd` (the same exact i32 sums, so
//! results are bit-identical to the AVX2 build and do not depend on the CPU), and the 32 vector
//! registers let one decoded weight block serve eight activation rows instead of four.
//!
//! The kernels are safe `#[target_feature]` functions over fixed-size array views, so their only
//! `unsafe` is the unaligned loads and stores; each entry point runs under the `Avx2` token.
#![allow(non_camel_case_types)] // one kernel per GGML type, named after it

use std::arch::x86_64::*;

use super::act::{block_scale, fill_bsums, BlockQ8, BlockQ8K, BlockQ8x2};
use super::blocks::{
    arr, k4_scales_mins, q3k_scales, u32_at, Q2_K_BYTES, Q3_K_BYTES, Q4_0_BYTES, Q4_1_BYTES, Q4_K_BYTES, Q5_0_BYTES,
    Q5_1_BYTES, Q5_K_BYTES, Q6_K_BYTES, Q8_0_BYTES,
};
use super::RowDot;

/// Proof that this CPU runs AVX2, FMA and F16C: only [`Avx2::detect`] makes one. `vnni` records
/// whether it also runs AVX-512 F/VL/BW/VNNI, which the legacy-type kernels then use (see
/// `dot_unsigned_vnni`); those give bit-identical results, so the flag changes speed only.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx2 {
    vnni: bool,
}

impl Avx2 {
    pub(crate) fn detect() -> Option<Avx2> {
        let ok =
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
        // Called for every matmul: std caches the CPU flags, the environment look-up is cached here.
        static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let vnni = *VNNI.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
                // An escape hatch for timing the AVX2 kernels on an AVX-512 machine.
                && std::env::var_os("IRONLLM_NO_AVX512").is_none()
        });
        ok.then_some(Avx2 { vnni })
    }

    /// The same token with the AVX-512 VNNI paths turned off (tests compare the two).
    #[cfg(test)]
    pub(crate) fn without_vnni(self) -> Avx2 {
        Avx2 { vnni: false }
    }

    /// Whether the AVX-512 VNNI paths run.
    #[cfg(test)]
    pub(crate) fn vnni(self) -> bool {
        self.vnni
    }

    /// Whether this CPU runs AVX-512 F/VL/BW/VNNI (and they are not turned off).
    pub(crate) fn has_vnni(self) -> bool {
        self.vnni
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

/// Byte i of the result is 0x10 where bit i of `bits` is set, else 0: fifth bits of Q5 values.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn fifth_bits(bits: u32) -> __m256i {
    // Put byte i / 8 of `bits` in byte i, keep bit i % 8 of it, and widen a match to a full byte.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
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

/// Two legacy weight blocks decoded for the `BlockQ8x2` layout: `lo` and `hi` hold the first
/// and second 16 values of block 0 (lower 128 bits) and block 1 (upper 128 bits) as bytes for
/// `maddubs`, and `scales` is `[d0, offset0, d1, offset1]`, where a block's offset multiplies the
/// activation sum `s` (its `m`, or `-8 d`, `-16 d`, 0).
struct LegacyPair {
    lo: __m256i,
    hi: __m256i,
    scales: __m128,
}

/// Four f16 values (two per block) as f32 lanes: `[lo(a), hi(a), lo(b), hi(b)]`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn f16x4(a: u32, b: u32) -> __m128 {
    _mm_cvtph_ps(_mm_cvtsi64_si128((a as u64 | ((b as u64) << 32)) as i64))
}

/// `[d0, -bias d0, d1, -bias d1]` from the f16 scales at the start of two symmetric blocks.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn scales_with_bias(b0: &[u8], b1: &[u8], bias: f32) -> __m128 {
    let (d0, d1) = (u16::from_le_bytes([b0[0], b0[1]]) as u32, u16::from_le_bytes([b1[0], b1[1]]) as u32);
    let d = f16x4(d0 | (d0 << 16), d1 | (d1 << 16));
    _mm_mul_ps(d, _mm_setr_ps(1.0, -bias, 1.0, -bias))
}

/// Low and high nibbles of 16 bytes from each block: values 0..16 and 16..32 of both.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn nibble_pair(qs0: &[u8; 16], qs1: &[u8; 16]) -> (__m256i, __m256i) {
    let both = _mm256_set_m128i(load_u8x16(qs1), load_u8x16(qs0));
    let low4 = _mm256_set1_epi8(0x0F);
    (_mm256_and_si256(both, low4), _mm256_and_si256(_mm256_srli_epi16::<4>(both), low4))
}

/// Fifth bits of two Q5 blocks (`qh` words) laid out like `nibble_pair`: bits 0..16 of each
/// word belong to the low halves, bits 16..32 to the high halves.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn fifth_bit_pair(qh0: u32, qh1: u32) -> (__m256i, __m256i) {
    let lo = (qh0 & 0xFFFF) | (qh1 << 16);
    let hi = (qh0 >> 16) | (qh1 & 0xFFFF_0000);
    (fifth_bits(lo), fifth_bits(hi))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn decode_q4_0(b0: &[u8; Q4_0_BYTES], b1: &[u8; Q4_0_BYTES]) -> LegacyPair {
    let (lo, hi) = nibble_pair(arr(b0, 2), arr(b1, 2));
    LegacyPair { lo, hi, scales: scales_with_bias(b0, b1, 8.0) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn decode_q4_1(b0: &[u8; Q4_1_BYTES], b1: &[u8; Q4_1_BYTES]) -> LegacyPair {
    let (lo, hi) = nibble_pair(arr(b0, 4), arr(b1, 4));
    LegacyPair { lo, hi, scales: f16x4(u32_at(b0, 0), u32_at(b1, 0)) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn decode_q5_0(b0: &[u8; Q5_0_BYTES], b1: &[u8; Q5_0_BYTES]) -> LegacyPair {
    let (lo, hi) = nibble_pair(arr(b0, 6), arr(b1, 6));
    let (h_lo, h_hi) = fifth_bit_pair(u32_at(b0, 2), u32_at(b1, 2));
    LegacyPair { lo: _mm256_or_si256(lo, h_lo), hi: _mm256_or_si256(hi, h_hi), scales: scales_with_bias(b0, b1, 16.0) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn decode_q5_1(b0: &[u8; Q5_1_BYTES], b1: &[u8; Q5_1_BYTES]) -> LegacyPair {
    let (lo, hi) = nibble_pair(arr(b0, 8), arr(b1, 8));
    let (h_lo, h_hi) = fifth_bit_pair(u32_at(b0, 4), u32_at(b1, 4));
    LegacyPair {
        lo: _mm256_or_si256(lo, h_lo),
        hi: _mm256_or_si256(hi, h_hi),
        scales: f16x4(u32_at(b0, 0), u32_at(b1, 0)),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn decode_q8_0(b0: &[u8; Q8_0_BYTES], b1: &[u8; Q8_0_BYTES]) -> LegacyPair {
    let lo = _mm256_set_m128i(load_u8x16(arr(b1, 2)), load_u8x16(arr(b0, 2)));
    let hi = _mm256_set_m128i(load_u8x16(arr(b1, 18)), load_u8x16(arr(b0, 18)));
    // The zero upper half of each widened f16 converts to an offset of 0.0.
    let scales = f16x4(u16::from_le_bytes([b0[0], b0[1]]) as u32, u16::from_le_bytes([b1[0], b1[1]]) as u32);
    LegacyPair { lo, hi, scales }
}

/// Integer dots of unsigned weight bytes with a `BlockQ8x2`: lanes 0..4 hold partial sums of
/// block 0, lanes 4..8 of block 1. The two `maddubs` results may be added as i16: each lane is
/// at most 2 * 31 * 127, so their sum stays below 2^15.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dot_unsigned(w: &LegacyPair, a: &BlockQ8x2) -> __m256i {
    let lo = _mm256_maddubs_epi16(w.lo, load_i8x32(&a.lo));
    let hi = _mm256_maddubs_epi16(w.hi, load_i8x32(&a.hi));
    _mm256_madd_epi16(_mm256_add_epi16(lo, hi), _mm256_set1_epi16(1))
}

/// As `dot_unsigned` for signed weights, via `|w| * (y * sign(w))`; a lane can reach 2 * 128 * 127,
/// so the halves are widened to i32 before they are added.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dot_signed(w: &LegacyPair, a: &BlockQ8x2) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    let (ylo, yhi) = (load_i8x32(&a.lo), load_i8x32(&a.hi));
    let lo = _mm256_maddubs_epi16(_mm256_sign_epi8(w.lo, w.lo), _mm256_sign_epi8(ylo, w.lo));
    let hi = _mm256_maddubs_epi16(_mm256_sign_epi8(w.hi, w.hi), _mm256_sign_epi8(yhi, w.hi));
    _mm256_add_epi32(_mm256_madd_epi16(lo, ones), _mm256_madd_epi16(hi, ones))
}

/// `dot_unsigned` with AVX-512 VNNI: `vpdpbusd` sums four u8 x i8 products straight into each
/// i32 lane, the same four (lo) plus four (hi) products that `maddubs` + `madd` pair up, and no
/// intermediate saturates in either path, so the i32 lanes are identical.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
#[inline]
fn dot_unsigned_vnni(w: &LegacyPair, a: &BlockQ8x2) -> __m256i {
    let lo = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w.lo, load_i8x32(&a.lo));
    _mm256_dpbusd_epi32(lo, w.hi, load_i8x32(&a.hi))
}

/// `dot_signed` with AVX-512 VNNI, the same `|w| * (y * sign(w))` identity; exact i32 sums, so
/// identical lanes.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
#[inline]
fn dot_signed_vnni(w: &LegacyPair, a: &BlockQ8x2) -> __m256i {
    let (ylo, yhi) = (load_i8x32(&a.lo), load_i8x32(&a.hi));
    let lo = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(w.lo, w.lo), _mm256_sign_epi8(ylo, w.lo));
    _mm256_dpbusd_epi32(lo, _mm256_sign_epi8(w.hi, w.hi), _mm256_sign_epi8(yhi, w.hi))
}

/// `a.ds` as a vector.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn load_ds(a: &BlockQ8x2) -> __m128 {
    // SAFETY: `a.ds` is 4 readable f32s, and `loadu` has no alignment requirement.
    unsafe { _mm_loadu_ps(a.ds.as_ptr()) }
}

/// Generates a legacy-type kernel and its `RowDot` impl. Per pair of blocks and activation row,
/// `[d0, off0, d1, off1] * [da0, s0, da1, s1]` gives both blocks' scale products; lanes 0 and 2
/// are spread over the two halves of the integer dot to scale it into `acc`, and lanes 1 and 3
/// (the offset terms) accumulate in `acc_off`. Lanes are summed once at the end of the row. An odd
/// last block is paired with itself, against the zero second half of its `BlockQ8x2`.
macro_rules! legacy_kernel {
    ($ty:ident, $kernel:ident, $kernel_vnni:ident, $bytes:expr, $decode:ident, $dot:ident, $dot_vnni:ident) => {
        legacy_kernel!(@body $kernel, $bytes, $decode, $dot, "avx2,fma,f16c");
        legacy_kernel!(@body $kernel_vnni, $bytes, $decode, $dot_vnni,
            "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni");

        impl RowDot for $ty {
            type Act = BlockQ8x2;
            fn dot<const R: usize>(&self, w: &[u8], acts: [&[BlockQ8x2]; R]) -> [f32; R] {
                if self.0.vnni {
                    // SAFETY: `self.0` is an `Avx2` token whose `vnni` flag is only set on CPUs
                    // with AVX2, FMA, F16C and AVX-512 F/VL/BW/VNNI, the features of this kernel.
                    unsafe { $kernel_vnni::<R>(w, acts) }
                } else {
                    // SAFETY: `self.0` is an `Avx2` token, which exists only on CPUs with AVX2, FMA
                    // and F16C, the features the kernel is compiled for.
                    unsafe { $kernel::<R>(w, acts) }
                }
            }

            fn max_tile(&self) -> usize {
                // AVX-512's 32 vector registers hold eight rows' accumulators without spilling.
                if self.0.vnni { 8 } else { 4 }
            }
        }
    };
    (@body $kernel:ident, $bytes:expr, $decode:ident, $dot:ident, $features:literal) => {
        #[target_feature(enable = $features)]
        fn $kernel<const R: usize>(w: &[u8], acts: [&[BlockQ8x2]; R]) -> [f32; R] {
            let mut acc = [_mm256_setzero_ps(); R];
            let mut acc_off = [_mm_setzero_ps(); R];
            let spread = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
            let n_blocks = w.len() / $bytes;
            for pi in 0..n_blocks.div_ceil(2) {
                let b0: &[u8; $bytes] = arr(w, 2 * pi * $bytes);
                let b1: &[u8; $bytes] = if 2 * pi + 1 < n_blocks { arr(w, (2 * pi + 1) * $bytes) } else { b0 };
                let wp = $decode(b0, b1);
                for ((acc, acc_off), act) in acc.iter_mut().zip(acc_off.iter_mut()).zip(acts) {
                    let a = &act[pi];
                    let p = _mm256_cvtepi32_ps($dot(&wp, a));
                    let prod = _mm_mul_ps(wp.scales, load_ds(a));
                    let scale = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(prod), spread);
                    *acc = _mm256_fmadd_ps(scale, p, *acc);
                    *acc_off = _mm_add_ps(*acc_off, prod);
                }
            }
            let mut out = [0f32; R];
            for ((o, acc), acc_off) in out.iter_mut().zip(acc).zip(acc_off) {
                let odd = _mm_movehdup_ps(acc_off); // [off0, off0, off1, off1]
                let offsets = _mm_add_ss(odd, _mm_movehl_ps(odd, odd));
                *o = hsum(acc) + _mm_cvtss_f32(offsets);
            }
            out
        }
    };
}

legacy_kernel!(Q4_0, q4_0_dot, q4_0_dot_vnni, Q4_0_BYTES, decode_q4_0, dot_unsigned, dot_unsigned_vnni);
legacy_kernel!(Q4_1, q4_1_dot, q4_1_dot_vnni, Q4_1_BYTES, decode_q4_1, dot_unsigned, dot_unsigned_vnni);
legacy_kernel!(Q5_0, q5_0_dot, q5_0_dot_vnni, Q5_0_BYTES, decode_q5_0, dot_unsigned, dot_unsigned_vnni);
legacy_kernel!(Q5_1, q5_1_dot, q5_1_dot_vnni, Q5_1_BYTES, decode_q5_1, dot_unsigned, dot_unsigned_vnni);
legacy_kernel!(Q8_0, q8_0_dot, q8_0_dot_vnni, Q8_0_BYTES, decode_q8_0, dot_signed, dot_signed_vnni);

/// Generates the `RowDot` impl of a K-quant kernel.
macro_rules! k_impl {
    ($ty:ident, $kernel:ident) => {
        impl RowDot for $ty {
            type Act = BlockQ8K;
            fn dot<const R: usize>(&self, w: &[u8], acts: [&[BlockQ8K]; R]) -> [f32; R] {
                let _proof: Avx2 = self.0;
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

/// Quantizes a row to `BlockQ8x2`s, with the same values as the scalar quantizer in `act`.
pub(crate) fn quantize_q8x2(_token: Avx2, x: &[f32], out: &mut [BlockQ8x2]) {
    // SAFETY: the `Avx2` token exists only on CPUs with AVX2, FMA and F16C.
    unsafe { quantize_q8x2_impl(x, out) }
}

/// Quantizes a row to `BlockQ8`s, with the same results as the scalar quantizer in `act`.
pub(crate) fn quantize_q8(_token: Avx2, x: &[f32], out: &mut [BlockQ8]) {
    // SAFETY: the `Avx2` token exists only on CPUs with AVX2, FMA and F16C.
    unsafe { quantize_q8_impl(x, out) }
}

/// Quantizes a row to `BlockQ8K`s, with the same results as the scalar quantizer in `act`.
pub(crate) fn quantize_q8k(_token: Avx2, x: &[f32], out: &mut [BlockQ8K]) {
    // SAFETY: the `Avx2` token exists only on CPUs with AVX2, FMA and F16C.
    unsafe { quantize_q8k_impl(x, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_q8x2_impl(x: &[f32], out: &mut [BlockQ8x2]) {
    for (x64, pair) in x.chunks(64).zip(out) {
        let x0: &[f32; 32] = arr(x64, 0);
        let (d0, id0) = block_scale(abs_max(x0));
        let (q0, sum0) = quantize32(x0, id0);
        let (d1, q1, sum1) = if x64.len() == 64 {
            let x1: &[f32; 32] = arr(x64, 32);
            let (d1, id1) = block_scale(abs_max(x1));
            let (q1, sum1) = quantize32(x1, id1);
            (d1, q1, sum1)
        } else {
            (0.0, _mm256_setzero_si256(), 0)
        };
        pair.ds = [d0, d0 * sum0 as f32, d1, d1 * sum1 as f32];
        store_i8x32(&mut pair.lo, _mm256_permute2x128_si256::<0x20>(q0, q1));
        store_i8x32(&mut pair.hi, _mm256_permute2x128_si256::<0x31>(q0, q1));
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_q8_impl(x: &[f32], out: &mut [BlockQ8]) {
    for (xb, b) in x.chunks_exact(32).zip(out) {
        let x32: &[f32; 32] = arr(xb, 0);
        let (d, id) = block_scale(abs_max(x32));
        let (q, sum) = quantize32(x32, id);
        store_i8x32(&mut b.qs, q);
        b.d = d;
        b.s = d * sum as f32;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_q8k_impl(x: &[f32], out: &mut [BlockQ8K]) {
    for (xb, b) in x.chunks_exact(256).zip(out) {
        let (d, id) = block_scale(abs_max(xb));
        for (x32, q32) in xb.chunks_exact(32).zip(b.qs.chunks_exact_mut(32)) {
            let (q, _) = quantize32(arr(x32, 0), id);
            store_i8x32(q32.try_into().expect("32 values"), q);
        }
        b.d = d;
        fill_bsums(b);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn store_i8x32(out: &mut [i8; 32], v: __m256i) {
    // SAFETY: `out` is 32 writable bytes, and `storeu` has no alignment requirement.
    unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), v) }
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
/// [-127, 127]: the 32 values as bytes in element order, and their sum.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn quantize32(x: &[f32; 32], id: f32) -> (__m256i, i32) {
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
    (_mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)), sum)
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
