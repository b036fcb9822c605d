//! Activation blocks: f32 activations quantized to 8 bits, once per `quant_matmul` call, into a
//! per-thread buffer that is reused across calls so the hot path does not allocate.
//!
//! `BlockQ8` is llama.cpp's Q8_0 (scale `d`, 32 values) with Q8_1's `s = d * sum(qs)` always
//! filled in: Q8_0 and Q8_1 quantize identically, and keeping the sum lets the unsigned-weight
//! kernels (Q4_0, Q5_0) fold their -8/-16 offset into one multiply instead of sign-extending every
//! weight. `BlockQ8K` is Q8_K (256 values with the sum of every 16, which the K-quant kernels use
//! for their mins and offsets). Scales are kept as f32, not rounded to f16 as in the file format,
//! because these blocks never leave memory.

use std::cell::RefCell;

use rayon::prelude::*;

use super::blocks::{QK, QK_K};

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

/// An activation block type: how a row is quantized, and where its buffer lives.
pub(crate) trait ActBlock: Copy + Send + Sync + 'static {
    /// Elements per block.
    const ELEMS: usize;
    const ZERO: Self;
    /// Quantizes `x` (`out.len() * ELEMS` values) into `out`.
    fn quantize_row(x: &[f32], out: &mut [Self]);
    fn buffer(scratch: &mut Scratch) -> &mut Vec<Self>;
}

/// Symmetric 8-bit quantization of one block: `d = max|x| / 127`, `q = round(x / d)` (ties away
/// from zero, as llama.cpp's reference quantizer), clamped so the [-127, 127] invariant holds even
/// for NaN or infinite inputs. Returns `d` and the sum of the values.
#[inline]
fn quantize_block(x: &[f32], qs: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        let qi = ((v * id).round() as i32).clamp(-127, 127);
        *q = qi as i8;
        sum += qi;
    }
    (d, sum)
}

impl ActBlock for BlockQ8 {
    const ELEMS: usize = QK;
    const ZERO: Self = BlockQ8 {
        d: 0.0,
        s: 0.0,
        qs: [0; QK],
    };

    fn quantize_row(x: &[f32], out: &mut [Self]) {
        for (xb, b) in x.chunks_exact(QK).zip(out) {
            let (d, sum) = quantize_block(xb, &mut b.qs);
            b.d = d;
            b.s = d * sum as f32;
        }
    }

    fn buffer(scratch: &mut Scratch) -> &mut Vec<Self> {
        &mut scratch.q8
    }
}

impl ActBlock for BlockQ8K {
    const ELEMS: usize = QK_K;
    const ZERO: Self = BlockQ8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };

    fn quantize_row(x: &[f32], out: &mut [Self]) {
        for (xb, b) in x.chunks_exact(QK_K).zip(out) {
            let (d, _) = quantize_block(xb, &mut b.qs);
            b.d = d;
            for (bsum, q16) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
                *bsum = q16.iter().map(|&q| q as i16).sum();
            }
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
    q8k: Vec<BlockQ8K>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Rows are quantized in parallel above this many elements (prefill); below it the fork/join
/// would cost more than the work.
const PAR_MIN_ELEMS: usize = 1 << 15;

/// Quantizes the rows of `x` (each `k` values, `k` a multiple of `A::ELEMS`) and hands the
/// blocks, row after row, to `f`.
pub(crate) fn with_quantized<A: ActBlock, T>(x: &[f32], k: usize, f: impl FnOnce(&[A]) -> T) -> T {
    let n_blocks = x.len() / A::ELEMS;
    let fill = |buf: &mut Vec<A>| {
        buf.clear();
        buf.resize(n_blocks, A::ZERO);
        let blocks_per_row = k / A::ELEMS;
        if x.len() >= PAR_MIN_ELEMS && x.len() > k {
            buf.par_chunks_mut(blocks_per_row)
                .zip(x.par_chunks(k))
                .for_each(|(b, xr)| A::quantize_row(xr, b));
        } else {
            A::quantize_row(x, buf);
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
pub(crate) fn quantize_rows<A: ActBlock>(x: &[f32]) -> Vec<A> {
    let mut out = vec![A::ZERO; x.len() / A::ELEMS];
    A::quantize_row(x, &mut out);
    out
}
