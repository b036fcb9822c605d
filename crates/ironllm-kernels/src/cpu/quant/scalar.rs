//! Portable dot kernels: the fallback on CPUs without AVX2, and the reference the SIMD kernels
//! are tested against. They compute each block's integer dot exactly, as the SIMD kernels do, but
//! with the offsets applied per element (signed weights) rather than folded into block sums, so
//! the two paths share no arithmetic tricks.
#![allow(non_camel_case_types)] // one kernel per GGML type, named after it

use super::act::{BlockQ8, BlockQ8K};
use super::blocks::{
    arr, f16_at, k4_scales_mins, q3k_scales, u32_at, Q2_K_BYTES, Q3_K_BYTES, Q4_0_BYTES, Q4_1_BYTES, Q4_K_BYTES,
    Q5_0_BYTES, Q5_1_BYTES, Q5_K_BYTES, Q6_K_BYTES, Q8_0_BYTES, QK, QK_K,
};
use super::RowDot;

pub(crate) struct Q4_0;
pub(crate) struct Q4_1;
pub(crate) struct Q5_0;
pub(crate) struct Q5_1;
pub(crate) struct Q8_0;
pub(crate) struct Q2_K;
pub(crate) struct Q3_K;
pub(crate) struct Q4_K;
pub(crate) struct Q5_K;
pub(crate) struct Q6_K;

#[inline(always)]
fn idot(w: &[i8], y: &[i8]) -> i32 {
    w.iter().zip(y).map(|(&a, &b)| a as i32 * b as i32).sum()
}

/// Weight values of a 4-bit block (element order), offset by `bias`.
#[inline(always)]
fn nibbles(qs: &[u8], bias: i8) -> [i8; QK] {
    let mut q = [0i8; QK];
    for (j, &b) in qs.iter().enumerate() {
        q[j] = (b & 0x0F) as i8 - bias;
        q[j + 16] = (b >> 4) as i8 - bias;
    }
    q
}

/// Weight values of a 5-bit block (element order), offset by `bias`.
#[inline(always)]
fn five_bits(qs: &[u8], qh: u32, bias: i8) -> [i8; QK] {
    let mut q = nibbles(qs, 0);
    for (j, v) in q.iter_mut().enumerate() {
        *v = (*v | (((qh >> j) & 1) as i8) << 4) - bias;
    }
    q
}

/// Dots one legacy weight row, block by block: `decode` gives a block's values, its scale and
/// its offset `m` (0 for the symmetric types), so the sum is `d * da * dot + m * s`.
#[inline(always)]
fn legacy_dot<const R: usize>(
    w: &[u8],
    bytes: usize,
    acts: [&[BlockQ8]; R],
    decode: impl Fn(&[u8]) -> ([i8; QK], f32, f32),
) -> [f32; R] {
    let mut sums = [0f32; R];
    for (bi, wb) in w.chunks_exact(bytes).enumerate() {
        let (q, d, m) = decode(wb);
        for (sum, act) in sums.iter_mut().zip(acts) {
            let a = &act[bi];
            *sum += d * a.d * idot(&q, &a.qs) as f32 + m * a.s;
        }
    }
    sums
}

impl RowDot for Q4_0 {
    type Act = BlockQ8;
    fn dot<const R: usize>(&self, w: &[u8], acts: [&[BlockQ8]; R]) -> [f32; R] {
        legacy_dot(w, Q4_0_BYTES, acts, |b| (nibbles(&b[2..18], 8), f16_at(b, 0), 0.0))
    }
}

impl RowDot for Q4_1 {
    type Act = BlockQ8;
    fn dot<const R: usize>(&self, w: &[u8], acts: [&[BlockQ8]; R]) -> [f32; R] {
        legacy_dot(w, Q4_1_BYTES, acts, |b| (nibbles(&b[4..20], 0), f16_at(b, 0), f16_at(b, 2)))
    }
}

impl RowDot for Q5_0 {
    type Act = BlockQ8;
    fn dot<const R: usize>(&self, w: &[u8], acts: [&[BlockQ8]; R]) -> [f32; R] {
        legacy_dot(w, Q5_0_BYTES, acts, |b| (five_bits(&b[6..22], u32_at(b, 2), 16), f16_at(b, 0), 0.0))
    }
}

impl RowDot for Q5_1 {
    type Act = BlockQ8;
    fn dot<const R: usize>(&self, w: &[u8], acts: [&[BlockQ8]; R]) -> [f32; R] {
        legacy_dot(w, Q5_1_BYTES, acts, |b| (five_bits(&b[8..24], u32_at(b, 4), 0), f16_at(b, 0), f16_at(b, 2)))
    }
}

impl RowDot for Q8_0 {
    type Act = BlockQ8;
    fn dot<const R: usize>(&self, w: &[u8], acts: [&[BlockQ8]; R]) -> [f32; R] {
        legacy_dot(w, Q8_0_BYTES, acts, |b| {
            let q: [i8; QK] = std::array::from_fn(|j| b[2 + j] as i8);
            (q, f16_at(b, 0), 0.0)
        })
    }
}

/// A K-quant super-block decoded to signed values with one scale (and min) per `G` elements:
/// the block contributes `d * da * sum_g(scale_g * dot_g) - dmin * da * sum_g(min_g * ysum_g)`.
struct KBlock<const G: usize> {
    q: [i8; QK_K],
    scales: [i32; 16],
    mins: [i32; 16],
    d: f32,
    dmin: f32,
}

#[inline(always)]
fn k_dot<const R: usize, const G: usize>(
    w: &[u8],
    bytes: usize,
    acts: [&[BlockQ8K]; R],
    decode: impl Fn(&[u8]) -> KBlock<G>,
) -> [f32; R] {
    let mut sums = [0f32; R];
    for (bi, wb) in w.chunks_exact(bytes).enumerate() {
        let blk = decode(wb);
        for (sum, act) in sums.iter_mut().zip(acts) {
            let a = &act[bi];
            let (mut dot, mut mins) = (0i32, 0i32);
            for (g, (qg, yg)) in blk.q.chunks_exact(G).zip(a.qs.chunks_exact(G)).enumerate() {
                dot += blk.scales[g] * idot(qg, yg);
                mins += blk.mins[g] * yg.iter().map(|&y| y as i32).sum::<i32>();
            }
            *sum += blk.d * a.d * dot as f32 - blk.dmin * a.d * mins as f32;
        }
    }
    sums
}

impl RowDot for Q2_K {
    type Act = BlockQ8K;
    fn dot<const R: usize>(&self, w: &[u8], acts: [&[BlockQ8K]; R]) -> [f32; R] {
        k_dot::<R, 16>(w, Q2_K_BYTES, acts, |b| {
            let (scales, qs) = (&b[0..16], &b[16..80]);
            let q = std::array::from_fn(|i| {
                let (h, j, l) = (i / 128, (i % 128) / 32, i % 32);
                ((qs[32 * h + l] >> (2 * j)) & 3) as i8
            });
            KBlock {
                q,
                scales: std::array::from_fn(|g| (scales[g] & 0x0F) as i32),
                mins: std::array::from_fn(|g| (scales[g] >> 4) as i32),
                d: f16_at(b, 80),
                dmin: f16_at(b, 82),
            }
        })
    }
}

impl RowDot for Q3_K {
    type Act = BlockQ8K;
    fn dot<const R: usize>(&self, w: &[u8], acts: [&[BlockQ8K]; R]) -> [f32; R] {
        k_dot::<R, 16>(w, Q3_K_BYTES, acts, |b| {
            let (hmask, qs) = (&b[0..32], &b[32..96]);
            let q = std::array::from_fn(|i| {
                let (h, j, l) = (i / 128, (i % 128) / 32, i % 32);
                let low = ((qs[32 * h + l] >> (2 * j)) & 3) as i8;
                let high = (hmask[l] >> (4 * h + j)) & 1;
                low - if high == 0 { 4 } else { 0 }
            });
            let sc = q3k_scales(arr(b, 96));
            KBlock { q, scales: std::array::from_fn(|g| sc[g] as i32), mins: [0; 16], d: f16_at(b, 108), dmin: 0.0 }
        })
    }
}

/// Scales and mins of Q4_K/Q5_K, widened to the 16-entry table (only the first 8 are used).
#[inline(always)]
fn k4_table(b: &[u8]) -> ([i32; 16], [i32; 16]) {
    let (sc, mn) = k4_scales_mins(arr(b, 4));
    let mut scales = [0i32; 16];
    let mut mins = [0i32; 16];
    for j in 0..8 {
        scales[j] = sc[j] as i32;
        mins[j] = mn[j] as i32;
    }
    (scales, mins)
}

impl RowDot for Q4_K {
    type Act = BlockQ8K;
    fn dot<const R: usize>(&self, w: &[u8], acts: [&[BlockQ8K]; R]) -> [f32; R] {
        k_dot::<R, 32>(w, Q4_K_BYTES, acts, |b| {
            let qs = &b[16..144];
            let q = std::array::from_fn(|i| {
                let s = i / 32;
                ((qs[32 * (s / 2) + i % 32] >> (4 * (s % 2))) & 0x0F) as i8
            });
            let (scales, mins) = k4_table(b);
            KBlock { q, scales, mins, d: f16_at(b, 0), dmin: f16_at(b, 2) }
        })
    }
}

impl RowDot for Q5_K {
    type Act = BlockQ8K;
    fn dot<const R: usize>(&self, w: &[u8], acts: [&[BlockQ8K]; R]) -> [f32; R] {
        k_dot::<R, 32>(w, Q5_K_BYTES, acts, |b| {
            let (qh, qs) = (&b[16..48], &b[48..176]);
            let q = std::array::from_fn(|i| {
                let (s, l) = (i / 32, i % 32);
                let low = (qs[32 * (s / 2) + l] >> (4 * (s % 2))) & 0x0F;
                (low | (((qh[l] >> s) & 1) << 4)) as i8
            });
            let (scales, mins) = k4_table(b);
            KBlock { q, scales, mins, d: f16_at(b, 0), dmin: f16_at(b, 2) }
        })
    }
}

impl RowDot for Q6_K {
    type Act = BlockQ8K;
    fn dot<const R: usize>(&self, w: &[u8], acts: [&[BlockQ8K]; R]) -> [f32; R] {
        k_dot::<R, 16>(w, Q6_K_BYTES, acts, |b| {
            let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
            let q = std::array::from_fn(|i| {
                let (h, c, l) = (i / 128, (i % 128) / 32, i % 32);
                let low = (ql[64 * h + 32 * (c % 2) + l] >> (4 * (c / 2))) & 0x0F;
                let high = (qh[32 * h + l] >> (2 * c)) & 3;
                (low | (high << 4)) as i8 - 32
            });
            KBlock {
                q,
                scales: std::array::from_fn(|g| scales[g] as i8 as i32),
                mins: [0; 16],
                d: f16_at(b, 208),
                dmin: 0.0,
            }
        })
    }
}
