//! Byte layouts of the GGML block types and their dequantization to f32.
//!
//! These layouts are a file-format fact (GGUF stores GGML blocks verbatim); the offsets below are
//! the ones the fixtures made with the `gguf` Python package pin down. All multi-byte fields are
//! little-endian and blocks are packed with no padding, so a block may start at any address.
//!
//! Legacy types hold 32 elements with one f16 scale (`d`), maybe an f16 offset (`m`), and 4, 5
//! or 8 bits per element. K-quants hold 256 elements in super-blocks with an f16 super-scale and
//! 16 or 8 small sub-block scales.

use half::{bf16, f16};

use super::GgmlType;

/// Elements per legacy block.
pub(crate) const QK: usize = 32;
/// Elements per K-quant super-block.
pub(crate) const QK_K: usize = 256;

/// `d: f16, qs: [u8; 16]` (element i < 16 is the low nibble of `qs[i]`, element i + 16 its high nibble).
pub(crate) const Q4_0_BYTES: usize = 2 + 16;
/// `d: f16, m: f16, qs: [u8; 16]`.
pub(crate) const Q4_1_BYTES: usize = 4 + 16;
/// `d: f16, qh: u32, qs: [u8; 16]`; bit i of `qh` is bit 4 of element i.
pub(crate) const Q5_0_BYTES: usize = 2 + 4 + 16;
/// `d: f16, m: f16, qh: u32, qs: [u8; 16]`.
pub(crate) const Q5_1_BYTES: usize = 4 + 4 + 16;
/// `d: f16, qs: [i8; 32]`.
pub(crate) const Q8_0_BYTES: usize = 2 + 32;
/// `d: f16, s: f16, qs: [i8; 32]` (`s` = d * sum(qs), only used by dot products).
pub(crate) const Q8_1_BYTES: usize = 4 + 32;
/// `scales: [u8; 16], qs: [u8; 64], d: f16, dmin: f16`.
pub(crate) const Q2_K_BYTES: usize = 16 + 64 + 4;
/// `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16`.
pub(crate) const Q3_K_BYTES: usize = 32 + 64 + 12 + 2;
/// `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`.
pub(crate) const Q4_K_BYTES: usize = 4 + 12 + 128;
/// `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`.
pub(crate) const Q5_K_BYTES: usize = 4 + 12 + 32 + 128;
/// `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`.
pub(crate) const Q6_K_BYTES: usize = 128 + 64 + 16 + 2;
/// `d: f32, qs: [i8; 256], bsums: [i16; 16]`.
pub(crate) const Q8_K_BYTES: usize = 4 + 256 + 32;

#[inline(always)]
pub(crate) fn f16_at(b: &[u8], off: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

#[inline(always)]
pub(crate) fn f32_at(b: &[u8], off: usize) -> f32 {
    f32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[inline(always)]
pub(crate) fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Fixed-size view of `N` items at `off`; the length check folds away for constant offsets.
#[inline(always)]
pub(crate) fn arr<T, const N: usize>(b: &[T], off: usize) -> &[T; N] {
    b[off..off + N].try_into().expect("slice has length N")
}

/// Q4_K/Q5_K sub-block scales and mins (six bits each) from their 12 packed bytes: bytes 0..4
/// hold scales 0..4 and bytes 4..8 mins 0..4 in their low six bits; sub-blocks 4..8 take their low
/// four bits from the nibbles of bytes 8..12 and their top two bits from the spare bits of 0..8.
#[inline(always)]
pub(crate) fn k4_scales_mins(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

/// Q3_K's sixteen signed sub-block scales (six bits, biased by 32) from their 12 packed bytes:
/// the low four bits of scale j are a nibble of bytes 0..8 (low nibbles first), the top two bits
/// come from bytes 8..12, two bits per scale.
#[inline(always)]
pub(crate) fn q3k_scales(s: &[u8; 12]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (j, o) in out.iter_mut().enumerate() {
        let low = if j < 8 { s[j] & 0x0F } else { s[j - 8] >> 4 };
        let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        *o = (low | (high << 4)) as i8 - 32;
    }
    out
}

/// Dequantizes; `bytes` must hold exactly the blocks of `out.len()` elements (checked by callers).
pub(crate) fn dequantize_exact(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(ty.row_bytes(out.len()), Some(bytes.len()));
    let blocks = bytes.chunks_exact(ty.type_size()).zip(out.chunks_exact_mut(ty.block_size()));
    match ty {
        GgmlType::F32 => blocks.for_each(|(b, y)| y[0] = f32_at(b, 0)),
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = f16_at(b, 0)),
        GgmlType::BF16 => blocks.for_each(|(b, y)| y[0] = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()),
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| {
            let d = f16_at(b, 0);
            for (j, &q) in b[2..18].iter().enumerate() {
                y[j] = d * ((q & 0x0F) as i32 - 8) as f32;
                y[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
            }
        }),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for (j, &q) in b[4..20].iter().enumerate() {
                y[j] = d * (q & 0x0F) as f32 + m;
                y[j + 16] = d * (q >> 4) as f32 + m;
            }
        }),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| {
            let (d, qh) = (f16_at(b, 0), u32_at(b, 2));
            for (j, &q) in b[6..22].iter().enumerate() {
                let lo = (q & 0x0F) as u32 | (((qh >> j) & 1) << 4);
                let hi = (q >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
                y[j] = d * (lo as i32 - 16) as f32;
                y[j + 16] = d * (hi as i32 - 16) as f32;
            }
        }),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| {
            let (d, m, qh) = (f16_at(b, 0), f16_at(b, 2), u32_at(b, 4));
            for (j, &q) in b[8..24].iter().enumerate() {
                let lo = (q & 0x0F) as u32 | (((qh >> j) & 1) << 4);
                let hi = (q >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
                y[j] = d * lo as f32 + m;
                y[j + 16] = d * hi as f32 + m;
            }
        }),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| {
            let d = f16_at(b, 0);
            for (o, &q) in y.iter_mut().zip(&b[2..34]) {
                *o = d * (q as i8) as f32;
            }
        }),
        GgmlType::Q8_1 => blocks.for_each(|(b, y)| {
            let d = f16_at(b, 0);
            for (o, &q) in y.iter_mut().zip(&b[4..36]) {
                *o = d * (q as i8) as f32;
            }
        }),
        GgmlType::Q8_K => blocks.for_each(|(b, y)| {
            let d = f32_at(b, 0);
            for (o, &q) in y.iter_mut().zip(&b[4..260]) {
                *o = d * (q as i8) as f32;
            }
        }),
        GgmlType::Q2_K => blocks.for_each(|(b, y)| dequant_q2_k(b, y)),
        GgmlType::Q3_K => blocks.for_each(|(b, y)| dequant_q3_k(b, y)),
        GgmlType::Q4_K => blocks.for_each(|(b, y)| dequant_q4_k(b, y)),
        GgmlType::Q5_K => blocks.for_each(|(b, y)| dequant_q5_k(b, y)),
        GgmlType::Q6_K => blocks.for_each(|(b, y)| dequant_q6_k(b, y)),
    }
}

/// Elements 128h + 32j + l (l < 32) are bits 2j..2j+2 of `qs[32h + l]`; every 16 elements have a
/// scale (low nibble) and a min (high nibble) byte.
fn dequant_q2_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    let (scales, qs) = (&b[0..16], &b[16..80]);
    for (i, y16) in y.chunks_exact_mut(16).enumerate() {
        let (h, j, l0) = (i / 8, (i % 8) / 2, (i % 2) * 16);
        let (dl, ml) = (d * (scales[i] & 0x0F) as f32, dmin * (scales[i] >> 4) as f32);
        for (l, o) in y16.iter_mut().enumerate() {
            let q = (qs[32 * h + l0 + l] >> (2 * j)) & 3;
            *o = dl * q as f32 - ml;
        }
    }
}

/// Like Q2_K's low bits, plus a high bit from `hmask[l]` bit 4h + j; the value is
/// `low2 - 4` when that bit is clear, `low2` when set.
fn dequant_q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs) = (&b[0..32], &b[32..96]);
    let scales = q3k_scales(arr(b, 96));
    let d = f16_at(b, 108);
    for (i, y16) in y.chunks_exact_mut(16).enumerate() {
        let (h, j, l0) = (i / 8, (i % 8) / 2, (i % 2) * 16);
        let dl = d * scales[i] as f32;
        for (l, o) in y16.iter_mut().enumerate() {
            let low = ((qs[32 * h + l0 + l] >> (2 * j)) & 3) as i32;
            let high = (hmask[l0 + l] >> (4 * h + j)) & 1;
            *o = dl * (low - if high == 0 { 4 } else { 0 }) as f32;
        }
    }
}

/// Sub-block s (32 elements) is the low (s even) or high (s odd) nibbles of `qs[32 * (s / 2)..]`.
fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, mn) = k4_scales_mins(arr(b, 4));
    let qs = &b[16..144];
    for (s, y32) in y.chunks_exact_mut(32).enumerate() {
        let (dl, ml) = (d * sc[s] as f32, dmin * mn[s] as f32);
        let shift = 4 * (s % 2);
        for (o, &q) in y32.iter_mut().zip(&qs[32 * (s / 2)..32 * (s / 2) + 32]) {
            *o = dl * ((q >> shift) & 0x0F) as f32 - ml;
        }
    }
}

/// Q4_K plus a fifth bit: bit s of `qh[l]` for element l of sub-block s.
fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, mn) = k4_scales_mins(arr(b, 4));
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for (s, y32) in y.chunks_exact_mut(32).enumerate() {
        let (dl, ml) = (d * sc[s] as f32, dmin * mn[s] as f32);
        let shift = 4 * (s % 2);
        let q32 = &qs[32 * (s / 2)..32 * (s / 2) + 32];
        for ((o, &q), &h) in y32.iter_mut().zip(q32).zip(qh) {
            let v = ((q >> shift) & 0x0F) | (((h >> s) & 1) << 4);
            *o = dl * v as f32 - ml;
        }
    }
}

/// Each 128-element half h reads `ql[64h..64h + 64]` and `qh[32h..32h + 32]`: quarter c (32
/// elements) takes a nibble of `ql[64h + 32 (c % 2) + l]` (low for c < 2) and bits 2c..2c+2 of
/// `qh[32h + l]` as its top two bits; values are biased by 32 and scaled per 16 elements.
fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for (i, y32) in y.chunks_exact_mut(32).enumerate() {
        let (h, c) = (i / 4, i % 4);
        let lo = &ql[64 * h + 32 * (c % 2)..][..32];
        let hi = &qh[32 * h..][..32];
        let nib_shift = if c < 2 { 0 } else { 4 };
        for (l, o) in y32.iter_mut().enumerate() {
            let q = ((lo[l] >> nib_shift) & 0x0F) | (((hi[l] >> (2 * c)) & 3) << 4);
            let sc = scales[2 * i + l / 16] as i8;
            *o = d * sc as f32 * (q as i32 - 32) as f32;
        }
    }
}
