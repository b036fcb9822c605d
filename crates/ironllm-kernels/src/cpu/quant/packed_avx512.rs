//! The AVX-512 VNNI kernel of `packed`: one group of 16 interleaved weight rows against a tile of
//! up to eight activation rows.
//!
//! Per block and activation row: eight `vpdpbusd`, each multiplying four weight bytes of all 16
//! rows by the same four activation bytes (broadcast from memory), in two chains of four so that
//! a single row still keeps the multiplier busy; then one conversion and two or three float
//! operations scale the sixteen integer sums. The offsets of the unsigned encodings (-8 for Q4_0,
//! -128 for the sign-flipped Q8_0 bytes) and Q4_1's minimum come from the activation block's
//! `s = d * sum(qs)`, as in the row kernels.
//!
//! Integer sums are exact (weights below 256, activations in [-127, 127]: a lane gathers at most
//! 32 * 255 * 127 < 2^21), so each output is determined by its row's blocks alone.

use std::arch::x86_64::*;

use super::act::BlockQ8;
use super::avx2::Avx2;
use super::packed::{GroupLayout, GROUP};
use super::GgmlType;

/// Activation rows per call, at most.
pub(crate) const MAX_TILE: usize = 8;

/// The 16 outputs of rows `i0 .. i0 + tile` of `acts` (each `act_stride` blocks) against one
/// group; rows beyond `tile` are left zero.
#[allow(clippy::too_many_arguments)] // the loop state of `packed::drive`, kept flat for the hot path
#[inline]
pub(crate) fn group_dot(
    token: Avx2,
    ty: GgmlType,
    layout: GroupLayout,
    group: &[u8],
    acts: &[BlockQ8],
    act_stride: usize,
    i0: usize,
    tile: usize,
) -> [[f32; GROUP]; MAX_TILE] {
    assert!(token.has_vnni(), "packed kernel without AVX-512 VNNI");
    assert!(group.len() >= layout.bytes, "packed group is short");
    assert!(act_stride == layout.nb, "activation row length differs from the weight row");
    assert!((1..=MAX_TILE).contains(&tile) && (i0 + tile) * act_stride <= acts.len(), "activation tile out of range");
    let rows: [*const BlockQ8; MAX_TILE] =
        std::array::from_fn(|r| acts[(i0 + r.min(tile - 1)) * act_stride..].as_ptr());
    let g = group.as_ptr();
    let mut out = [[0f32; GROUP]; MAX_TILE];
    macro_rules! call {
        ($r:literal) => {{
            let ptrs: [*const BlockQ8; $r] = std::array::from_fn(|i| rows[i]);
            // SAFETY: the CPU runs AVX-512 F/VL/BW/VNNI, F16C and FMA (the token's `vnni` flag);
            // `group` holds `layout.bytes` bytes, which covers every quant and scale read for
            // `layout.nb` blocks, and each activation pointer starts a row of `nb` blocks inside
            // `acts` (asserted above).
            let sums = unsafe {
                match ty {
                    GgmlType::Q4_0 => q4::<$r, false>(g, layout, ptrs),
                    GgmlType::Q4_1 => q4::<$r, true>(g, layout, ptrs),
                    GgmlType::Q8_0 => q8::<$r>(g, layout, ptrs),
                    _ => unreachable!("only Q4_0, Q4_1 and Q8_0 are packed"),
                }
            };
            for (o, s) in out.iter_mut().zip(sums) {
                // SAFETY: `o` is 16 writable f32s; `storeu` has no alignment requirement.
                unsafe { _mm512_storeu_ps(o.as_mut_ptr(), s) };
            }
        }};
    }
    match tile {
        8 => call!(8),
        7 => call!(7),
        6 => call!(6),
        5 => call!(5),
        4 => call!(4),
        3 => call!(3),
        2 => call!(2),
        _ => call!(1),
    }
    out
}

/// Four activation bytes `4c .. 4c + 4` of a block, broadcast to every lane.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
#[inline]
unsafe fn act4(a: *const BlockQ8, c: usize) -> __m512i {
    // SAFETY (caller): `a` points to a readable block; `c < 8`, so the 4 bytes lie in `qs`.
    unsafe { _mm512_set1_epi32(std::ptr::read_unaligned((*a).qs.as_ptr().add(4 * c).cast::<i32>())) }
}

/// Blocks this far ahead are prefetched.
const PREFETCH_BLOCKS: usize = 4;

/// Asks for the quants `PREFETCH_BLOCKS` blocks ahead of `q` (a hint: addresses past the group
/// are harmless, nothing is dereferenced).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
#[inline]
fn prefetch_ahead(q: *const u8, qbytes: usize) {
    let ahead = q.wrapping_add(PREFETCH_BLOCKS * qbytes);
    for line in 0..qbytes / 64 {
        // A safe intrinsic inside this `target_feature` function: prefetching never faults.
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line).cast());
    }
}

/// The 16 rows' integer dots of one block with activation block `a`, as f32: `w[c]` holds chunk `c`
/// (elements `4c .. 4c + 4`) of every row. Two chains of four `vpdpbusd`, so that a lone activation
/// row still keeps two multiplies in flight.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
#[inline]
unsafe fn block_sums(w: &[__m512i; 8], a: *const BlockQ8) -> __m512 {
    let zero = _mm512_setzero_si512();
    // SAFETY (caller): `a` points to a readable block.
    unsafe {
        let mut s0 = _mm512_dpbusd_epi32(zero, w[0], act4(a, 0));
        let mut s1 = _mm512_dpbusd_epi32(zero, w[4], act4(a, 4));
        for c in 1..4 {
            s0 = _mm512_dpbusd_epi32(s0, w[c], act4(a, c));
            s1 = _mm512_dpbusd_epi32(s1, w[c + 4], act4(a, c + 4));
        }
        _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1))
    }
}

/// The 16 rows' f16 values at `p` as f32.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
#[inline]
unsafe fn f16x16(p: *const u8) -> __m512 {
    // SAFETY (caller): 32 readable bytes at `p`.
    unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
}

/// Q4_0 (`HAS_MIN` false: value `d * (q - 8)`) and Q4_1 (`d * q + m`).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
unsafe fn q4<const R: usize, const HAS_MIN: bool>(
    g: *const u8,
    l: GroupLayout,
    acts: [*const BlockQ8; R],
) -> [__m512; R] {
    let mut acc = [_mm512_setzero_ps(); R];
    let nibble = _mm512_set1_epi8(0x0F);
    let eight = _mm512_set1_ps(8.0);
    for b in 0..l.nb {
        // SAFETY (caller): the group holds the `nb` blocks where `l.block` and `l.min_of` say
        // (256 quant bytes, 32 of scales and of minimums each); activation rows hold `nb` blocks.
        unsafe {
            let (q_at, d_at) = l.block(b);
            let q = g.add(q_at);
            prefetch_ahead(q, l.qbytes);
            let v: [__m512i; 4] = std::array::from_fn(|j| _mm512_loadu_si512(q.add(64 * j).cast()));
            // Chunks 0..4 are the low nibbles of the four vectors, chunks 4..8 the high ones.
            let w: [__m512i; 8] = std::array::from_fn(|c| {
                if c < 4 {
                    _mm512_and_si512(v[c], nibble)
                } else {
                    _mm512_and_si512(_mm512_srli_epi16::<4>(v[c - 4]), nibble)
                }
            });
            let dw = f16x16(g.add(d_at));
            let mw = if HAS_MIN { f16x16(g.add(l.min_of(b))) } else { _mm512_setzero_ps() };
            for (acc, &row) in acc.iter_mut().zip(&acts) {
                let a = row.add(b);
                let f = block_sums(&w, a);
                let (da, sa) = (_mm512_set1_ps((*a).d), _mm512_set1_ps((*a).s));
                if HAS_MIN {
                    *acc = _mm512_fmadd_ps(_mm512_mul_ps(f, da), dw, *acc);
                    *acc = _mm512_fmadd_ps(mw, sa, *acc);
                } else {
                    let t = _mm512_fnmadd_ps(sa, eight, _mm512_mul_ps(f, da));
                    *acc = _mm512_fmadd_ps(t, dw, *acc);
                }
            }
        }
    }
    acc
}

/// Q8_0 (value `d * q`, stored as `q + 128`).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
unsafe fn q8<const R: usize>(g: *const u8, l: GroupLayout, acts: [*const BlockQ8; R]) -> [__m512; R] {
    let mut acc = [_mm512_setzero_ps(); R];
    let bias = _mm512_set1_ps(128.0);
    for b in 0..l.nb {
        // SAFETY (caller): the group holds the `nb` blocks where `l.block` says (512 quant bytes
        // and 32 of scales each); activation rows hold `nb` blocks.
        unsafe {
            let (q_at, d_at) = l.block(b);
            let q = g.add(q_at);
            prefetch_ahead(q, l.qbytes);
            let v: [__m512i; 8] = std::array::from_fn(|j| _mm512_loadu_si512(q.add(64 * j).cast()));
            let dw = f16x16(g.add(d_at));
            for (acc, &row) in acc.iter_mut().zip(&acts) {
                let a = row.add(b);
                let f = block_sums(&v, a);
                let (da, sa) = (_mm512_set1_ps((*a).d), _mm512_set1_ps((*a).s));
                let t = _mm512_fnmadd_ps(sa, bias, _mm512_mul_ps(f, da));
                *acc = _mm512_fmadd_ps(t, dw, *acc);
            }
        }
    }
    acc
}
