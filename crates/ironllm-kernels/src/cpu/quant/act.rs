//! Activation blocks: f32 activations quantized to 8 bits, once per `quant_matmul` call, into a
//! per-thread buffer that is reused across calls so the hot path does not allocate.
//!
//! `BlockQ8` is llama.cpp's Q8_0 (scale `d`, 32 values) with Q8_1's `s = d * sum(qs)` always
//! filled in: Q8_0 and Q8_1 quantize identically, and keeping the sum lets the unsigned-weight
//! kernels (Q4_0, Q5_0) fold their -8/-16 offset into one multiply instead of sign-extending every
//! weight. `BlockQ8x2` holds the same values for two consecutive blocks, interleaved by half-block
//! for the AVX2 kernels. `BlockQ8K` is Q8_K (256 values with the sum of every 16, which the
//! K-quant kernels use for their mins and offsets). Scales are kept as f32, not rounded to f16 as
//! in the file format, because these blocks never leave memory.

use std::cell::RefCell;

use rayon::prelude::*;

use super::blocks::{QK, QK_K};
use super::Kernel;

/// Q8_0/Q8_1 activation block. Values lie in [-127, 127], which the kernels rely on: `maddubs`
/// cannot saturate, and negating a value (the sign trick of the Q8_0 kernel) cannot overflow.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub(crate) struct BlockQ8 {
    pub d: f32,
    /// `d * sum(qs)`.
    pub s: f32,
    pub qs: [i8; QK],
}

/// Q8_K activation block; values lie in [-127, 127].
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub(crate) struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    /// Sum of each 16 consecutive values.
    pub bsums: [i16; QK_K / 16],
}

/// Two consecutive `BlockQ8`s interleaved by half-block, the layout the AVX2 legacy kernels read:
/// one 256-bit vector then holds the same half of two blocks, so one `madd`, one float conversion
/// and one FMA serve two blocks. A row with an odd number of blocks ends with a pair whose second
/// block is all zeros (scales included), which contributes exactly nothing.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub(crate) struct BlockQ8x2 {
    /// `[d0, s0, d1, s1]`.
    pub ds: [f32; 4],
    /// Values 0..16 of block 0, then values 0..16 of block 1.
    pub lo: [i8; QK],
    /// Values 16..32 of block 0, then values 16..32 of block 1.
    pub hi: [i8; QK],
}

/// An activation block type: how a row is quantized, and where its buffer lives.
pub(crate) trait ActBlock: Copy + Send + Sync + 'static {
    /// Elements per block.
    const ELEMS: usize;
    const ZERO: Self;
    /// Quantizes one row `x` into `out` (`blocks_for(x.len())` blocks). Every kernel gives the
    /// same blocks.
    fn quantize_row(kernel: Kernel, x: &[f32], out: &mut [Self]);
    fn buffer(scratch: &mut Scratch) -> &mut Vec<Self>;
    /// Blocks for a row of `k` values (`k` a multiple of the weight block size).
    fn blocks_for(k: usize) -> usize {
        k.div_ceil(Self::ELEMS)
    }
}

/// Adding and then subtracting 1.5 * 2^23 rounds an f32 below 2^22 in magnitude to an integer,
/// ties to even: the same result as `cvtps2dq` under the default rounding mode, so the scalar and
/// AVX2 quantizers agree bit for bit (and `f32::round`, a libm call on baseline x86-64, is
/// avoided). llama.cpp's SIMD quantizers round the same way.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// max |x|, in eight independent lanes so that it vectorizes; `x.len()` is a multiple of 8.
#[inline]
fn abs_max(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    for chunk in x.chunks_exact(8) {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = m.max(v.abs());
        }
    }
    lanes.iter().fold(0f32, |a, &m| a.max(m))
}

/// The step `d = max|x| / 127` of a block and its inverse (0 for an all-zero block).
#[inline]
pub(crate) fn block_scale(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    (d, if d > 0.0 { 1.0 / d } else { 0.0 })
}

/// Quantizes `x` with inverse step `id` into `qs`, clamped to [-127, 127] (which also maps NaN
/// to 0); returns the sum of the values.
#[inline]
fn quantize_values(x: &[f32], id: f32, qs: &mut [i8]) -> i32 {
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        let r = (((v * id + ROUND_MAGIC) - ROUND_MAGIC) as i32).clamp(-127, 127);
        *q = r as i8;
        sum += r;
    }
    sum
}

/// Fills `bsums` from `qs`.
#[inline]
pub(crate) fn fill_bsums(b: &mut BlockQ8K) {
    for (bsum, q16) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
        *bsum = q16.iter().map(|&q| q as i16).sum();
    }
}

impl ActBlock for BlockQ8 {
    const ELEMS: usize = QK;
    const ZERO: Self = BlockQ8 { d: 0.0, s: 0.0, qs: [0; QK] };

    fn quantize_row(kernel: Kernel, x: &[f32], out: &mut [Self]) {
        #[cfg(target_arch = "x86_64")]
        if let Kernel::Avx2(token) = kernel {
            return super::avx2::quantize_q8(token, x, out);
        }
        let _ = kernel;
        for (xb, b) in x.chunks_exact(QK).zip(out) {
            let (d, id) = block_scale(abs_max(xb));
            let sum = quantize_values(xb, id, &mut b.qs);
            b.d = d;
            b.s = d * sum as f32;
        }
    }

    fn buffer(scratch: &mut Scratch) -> &mut Vec<Self> {
        &mut scratch.q8
    }
}

impl ActBlock for BlockQ8x2 {
    const ELEMS: usize = 2 * QK;
    const ZERO: Self = BlockQ8x2 { ds: [0.0; 4], lo: [0; QK], hi: [0; QK] };

    fn quantize_row(kernel: Kernel, x: &[f32], out: &mut [Self]) {
        #[cfg(target_arch = "x86_64")]
        if let Kernel::Avx2(token) = kernel {
            return super::avx2::quantize_q8x2(token, x, out);
        }
        let _ = kernel;
        for (x64, pair) in x.chunks(2 * QK).zip(out) {
            *pair = Self::ZERO;
            for (h, xb) in x64.chunks_exact(QK).enumerate() {
                let mut q = [0i8; QK];
                let (d, id) = block_scale(abs_max(xb));
                let sum = quantize_values(xb, id, &mut q);
                pair.ds[2 * h] = d;
                pair.ds[2 * h + 1] = d * sum as f32;
                pair.lo[16 * h..16 * h + 16].copy_from_slice(&q[..16]);
                pair.hi[16 * h..16 * h + 16].copy_from_slice(&q[16..]);
            }
        }
    }

    fn buffer(scratch: &mut Scratch) -> &mut Vec<Self> {
        &mut scratch.q8x2
    }
}

impl ActBlock for BlockQ8K {
    const ELEMS: usize = QK_K;
    const ZERO: Self = BlockQ8K { d: 0.0, qs: [0; QK_K], bsums: [0; QK_K / 16] };

    fn quantize_row(kernel: Kernel, x: &[f32], out: &mut [Self]) {
        #[cfg(target_arch = "x86_64")]
        if let Kernel::Avx2(token) = kernel {
            return super::avx2::quantize_q8k(token, x, out);
        }
        let _ = kernel;
        for (xb, b) in x.chunks_exact(QK_K).zip(out) {
            let (d, id) = block_scale(abs_max(xb));
            quantize_values(xb, id, &mut b.qs);
            b.d = d;
            fill_bsums(b);
        }
    }

    fn buffer(scratch: &mut Scratch) -> &mut Vec<Self> {
        &mut scratch.q8k
    }
}

/// The per-thread activation buffers, one per block type; they only grow.
#[derive(Default)]
pub(crate) struct Scratch {
    q8: Vec<BlockQ8>,
    q8x2: Vec<BlockQ8x2>,
    q8k: Vec<BlockQ8K>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Rows are quantized in parallel above this many elements (prefill); below it the fork/join
/// would cost more than the work.
const PAR_MIN_ELEMS: usize = 1 << 15;

/// Quantizes the rows of `x` (each `k` values) and hands the blocks, `A::blocks_for(k)` per
/// row, to `f`.
pub(crate) fn with_quantized<A: ActBlock, T>(kernel: Kernel, x: &[f32], k: usize, f: impl FnOnce(&[A]) -> T) -> T {
    let blocks_per_row = A::blocks_for(k);
    let fill = |buf: &mut Vec<A>| {
        buf.clear();
        buf.resize(x.len() / k * blocks_per_row, A::ZERO);
        if x.len() >= PAR_MIN_ELEMS && x.len() > k {
            buf.par_chunks_mut(blocks_per_row).zip(x.par_chunks(k)).for_each(|(b, xr)| A::quantize_row(kernel, xr, b));
        } else {
            buf.chunks_mut(blocks_per_row).zip(x.chunks(k)).for_each(|(b, xr)| A::quantize_row(kernel, xr, b));
        }
    };
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => {
            let buf = A::buffer(&mut scratch);
            fill(buf);
            f(buf)
        }
        // This thread is already inside a call (a rayon worker that picked up another matmul
        // while waiting on its own); that call owns the buffer, so this one gets a fresh one.
        Err(_) => {
            let mut buf = Vec::new();
            fill(&mut buf);
            f(&buf)
        }
    })
}

#[cfg(test)]
pub(crate) fn quantize_rows<A: ActBlock>(kernel: Kernel, x: &[f32], k: usize) -> Vec<A> {
    with_quantized(kernel, x, k, |blocks: &[A]| blocks.to_vec())
}
