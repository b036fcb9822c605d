//! GGUF/GGML block quantization on the CPU: the block types of the GGUF format ([`GgmlType`]),
//! dequantization to f32 ([`dequantize`]) and the matmul over quantized weights that the CPU
//! backend runs for GGUF models ([`quant_matmul`]).
//!
//! The idea is llama.cpp's: weights stay in their GGUF blocks, and each call quantizes the f32
//! activations once to 8-bit blocks of the same length as the weight blocks (32 elements for the
//! legacy types, 256 for the K-quants). Every pair of blocks then reduces to an integer dot product
//! times a couple of float scales, which is what `maddubs`/`madd` compute fast.
//!
//! Code map:
//! - `blocks`: the byte layout of every block type and its dequantization (the file-format facts).
//! - `act`: activation blocks (`BlockQ8`: Q8_0 values plus the Q8_1 sum; `BlockQ8x2`, the same
//!   for two blocks in the layout of the AVX2 kernels; `BlockQ8K`) and the per-thread buffer they
//!   are quantized into.
//! - `scalar`, `avx2`: one dot kernel per weight type and instruction set, each dotting one weight
//!   row with up to four activation rows so that a decoded weight block is reused across the batch.
//! - `packed`, `packed_avx512`: Q4_0/Q4_1/Q8_0 weights repacked at load into groups of 16
//!   interleaved rows ([`PackedMatrix`]) and their AVX-512 VNNI matmul ([`packed_matmul`]), which
//!   the CPU backend prefers where the CPU has VNNI.
//! - this file: public types, shape checks, runtime dispatch and the parallel driver.
//!
//! Invariants: a row's result depends only on that row's activations and the weights, never on `m`,
//! the tiling or the thread count (each output is one kernel call whose per-row arithmetic does not
//! depend on how many rows share it), so a request's output does not depend on its batch. The
//! `unsafe` code is: calls into `#[target_feature]` functions behind a detection token, unaligned
//! SIMD loads and stores of fixed-size arrays (both in `avx2`), and the disjoint output writes of
//! the parallel driver below.

mod act;
#[cfg(target_arch = "x86_64")]
mod avx2;
mod blocks;
mod packed;
#[cfg(target_arch = "x86_64")]
mod packed_avx512;
mod scalar;
#[cfg(test)]
mod tests;

use std::fmt;
use std::ops::Range;

use rayon::prelude::*;

use super::par::OutPtr;
use act::ActBlock;
pub use packed::{packed_matmul, packing_supported, PackedMatrix};

/// A GGML tensor type, as stored in GGUF tensor infos. Variant names follow GGML's spelling.
#[allow(non_camel_case_types)] // the names are the format's own (`Q4_K`), which readers grep for
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    BF16,
}

impl GgmlType {
    /// Every type this module knows, in GGML id order.
    pub const ALL: [GgmlType; 15] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::BF16,
    ];

    /// The type for a GGML type id (`ggml_type` in GGUF tensor infos); `None` for ids this module
    /// does not read (the removed Q4_2/Q4_3 ids, IQ types, integer types, ...).
    pub fn from_u32(v: u32) -> Option<GgmlType> {
        Some(match v {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            9 => GgmlType::Q8_1,
            10 => GgmlType::Q2_K,
            11 => GgmlType::Q3_K,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            15 => GgmlType::Q8_K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// The GGML type id, the inverse of [`GgmlType::from_u32`].
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::Q8_K => 15,
            GgmlType::BF16 => 30,
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 | GgmlType::Q8_1 => {
                blocks::QK
            }
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K | GgmlType::Q8_K => {
                blocks::QK_K
            }
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => blocks::Q4_0_BYTES,
            GgmlType::Q4_1 => blocks::Q4_1_BYTES,
            GgmlType::Q5_0 => blocks::Q5_0_BYTES,
            GgmlType::Q5_1 => blocks::Q5_1_BYTES,
            GgmlType::Q8_0 => blocks::Q8_0_BYTES,
            GgmlType::Q8_1 => blocks::Q8_1_BYTES,
            GgmlType::Q2_K => blocks::Q2_K_BYTES,
            GgmlType::Q3_K => blocks::Q3_K_BYTES,
            GgmlType::Q4_K => blocks::Q4_K_BYTES,
            GgmlType::Q5_K => blocks::Q5_K_BYTES,
            GgmlType::Q6_K => blocks::Q6_K_BYTES,
            GgmlType::Q8_K => blocks::Q8_K_BYTES,
        }
    }

    /// Bytes taken by `n_elements` consecutive elements; `None` when `n_elements` is not a multiple
    /// of the block size (or the byte count overflows).
    pub fn row_bytes(self, n_elements: usize) -> Option<usize> {
        if !n_elements.is_multiple_of(self.block_size()) {
            return None;
        }
        (n_elements / self.block_size()).checked_mul(self.type_size())
    }

    /// The GGML name (`"Q4_K"`, `"F16"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q3_K => "Q3_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::Q8_K => "Q8_K",
            GgmlType::BF16 => "BF16",
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a quantization call refused its arguments.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("{n_elements} elements is not a multiple of the {ty} block size {block_size}")]
    NotBlockMultiple { ty: GgmlType, n_elements: usize, block_size: usize },
    #[error("`{what}` has length {got}, expected {expected}")]
    LengthMismatch { what: &'static str, expected: usize, got: usize },
    #[error("shape overflows usize: {what}")]
    Overflow { what: &'static str },
}

/// Dequantize `out.len()` elements (a multiple of the block size) from raw GGUF bytes.
/// Every [`GgmlType`] is supported.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    let expected = bytes_for(ty, out.len())?;
    check_len("bytes", expected, bytes.len())?;
    blocks::dequantize_exact(ty, bytes, out);
    Ok(())
}

/// A weight matrix of `rows` x `cols` elements stored as GGUF blocks, row-major: each row is
/// `cols / ty.block_size()` consecutive blocks. For a linear layer, `rows` is the output features.
#[derive(Debug, Clone, Copy)]
pub struct QuantMatrix<'a> {
    pub ty: GgmlType,
    pub data: &'a [u8],
    pub rows: usize,
    pub cols: usize,
}

impl<'a> QuantMatrix<'a> {
    /// A matrix whose byte length has been checked against its shape.
    pub fn new(ty: GgmlType, data: &'a [u8], rows: usize, cols: usize) -> Result<Self, QuantError> {
        let w = QuantMatrix { ty, data, rows, cols };
        w.checked_row_bytes()?;
        Ok(w)
    }

    /// Bytes per row, after checking that `data` holds exactly `rows` such rows.
    fn checked_row_bytes(&self) -> Result<usize, QuantError> {
        let row_bytes = bytes_for(self.ty, self.cols)?;
        let total = self.rows.checked_mul(row_bytes).ok_or(QuantError::Overflow { what: "weight rows * row bytes" })?;
        check_len("weight data (bytes)", total, self.data.len())?;
        Ok(row_bytes)
    }
}

/// `out[m, n] = x[m, k] @ W^T`, where `W` is the quantized `[n, k]` matrix `w` and `x`, `out` are
/// f32 row-major.
///
/// Activations are quantized once per call to the weight type's dot type (Q8_0 for
/// Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1, Q8_K for the K-quants, as in llama.cpp), and blocks are
/// dotted in integer SIMD. F32, F16, BF16, Q8_1 and Q8_K weights are dequantized on the fly in
/// small pieces and dotted in f32 against the unquantized activations.
pub fn quant_matmul(x: &[f32], m: usize, w: &QuantMatrix, out: &mut [f32]) -> Result<(), QuantError> {
    check_matmul(x, m, w, out)?;
    matmul_with(Kernel::best(), x, m, w, out);
    Ok(())
}

fn bytes_for(ty: GgmlType, n_elements: usize) -> Result<usize, QuantError> {
    if !n_elements.is_multiple_of(ty.block_size()) {
        return Err(QuantError::NotBlockMultiple { ty, n_elements, block_size: ty.block_size() });
    }
    ty.row_bytes(n_elements).ok_or(QuantError::Overflow { what: "elements * type size" })
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), QuantError> {
    if expected == got {
        Ok(())
    } else {
        Err(QuantError::LengthMismatch { what, expected, got })
    }
}

fn check_matmul(x: &[f32], m: usize, w: &QuantMatrix, out: &mut [f32]) -> Result<(), QuantError> {
    w.checked_row_bytes()?;
    let x_len = m.checked_mul(w.cols).ok_or(QuantError::Overflow { what: "m * cols" })?;
    check_len("x (m * cols)", x_len, x.len())?;
    let out_len = m.checked_mul(w.rows).ok_or(QuantError::Overflow { what: "m * rows" })?;
    check_len("out (m * rows)", out_len, out.len())
}

/// Which instruction set the dot kernels use. `Avx2` holds a token that only exists once the CPU
/// has been seen to support AVX2, FMA and F16C, so holding it is the proof the kernels need.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2(avx2::Avx2),
}

impl Kernel {
    /// The fastest kernel this CPU runs (feature detection is cached by std, so this is cheap).
    pub(crate) fn best() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if let Some(token) = avx2::Avx2::detect() {
            return Kernel::Avx2(token);
        }
        Kernel::Scalar
    }
}

/// A weight type's dot kernel on one instruction set.
trait RowDot: Sync {
    /// What one activation row is made of: quantized blocks, or plain f32 for dense weights.
    type Act: Sync;

    /// Dots one weight row (`w_row`, exactly one row of blocks) with `R` activation rows, each of
    /// the matching length. `R` > 1 lets every decoded weight block serve the whole tile; each
    /// row's arithmetic must be the same for every `R` (batch invariance, see the module doc).
    fn dot<const R: usize>(&self, w_row: &[u8], acts: [&[Self::Act]; R]) -> [f32; R];

    /// The largest `R` worth calling `dot` with (1 ..= `TILE_M`): how many activation rows share
    /// one decoded weight block before the accumulators no longer fit in registers.
    fn max_tile(&self) -> usize {
        4
    }
}

/// Shapes have been checked by the caller.
pub(crate) fn matmul_with(kernel: Kernel, x: &[f32], m: usize, w: &QuantMatrix, out: &mut [f32]) {
    if m == 0 || w.rows == 0 {
        return;
    }
    if w.cols == 0 {
        out.fill(0.0);
        return;
    }
    macro_rules! quantized {
        ($kind:ident) => {
            match kernel {
                Kernel::Scalar => run_quantized(kernel, &scalar::$kind, x, m, w, out),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2(token) => run_quantized(kernel, &avx2::$kind(token), x, m, w, out),
            }
        };
    }
    match w.ty {
        GgmlType::Q4_0 => quantized!(Q4_0),
        GgmlType::Q4_1 => quantized!(Q4_1),
        GgmlType::Q5_0 => quantized!(Q5_0),
        GgmlType::Q5_1 => quantized!(Q5_1),
        GgmlType::Q8_0 => quantized!(Q8_0),
        GgmlType::Q2_K => quantized!(Q2_K),
        GgmlType::Q3_K => quantized!(Q3_K),
        GgmlType::Q4_K => quantized!(Q4_K),
        GgmlType::Q5_K => quantized!(Q5_K),
        GgmlType::Q6_K => quantized!(Q6_K),
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_1 | GgmlType::Q8_K => {
            drive(&DenseDot { ty: w.ty, kernel }, x, w.cols, m, w, out)
        }
    }
}

fn run_quantized<D>(kernel: Kernel, dot: &D, x: &[f32], m: usize, w: &QuantMatrix, out: &mut [f32])
where
    D: RowDot,
    D::Act: ActBlock,
{
    let act_stride = D::Act::blocks_for(w.cols);
    act::with_quantized::<D::Act, _>(kernel, x, w.cols, |acts| drive(dot, acts, act_stride, m, w, out));
}

/// Below this many multiply-adds a call runs on the calling thread: rayon's fork/join costs a few
/// microseconds, as much as the whole product at that size.
const PAR_MIN_MACS: usize = 1 << 17;
/// Activation rows per tile: the most rows one kernel call dots with a weight row (kernels may
/// ask for fewer through `RowDot::max_tile`).
const TILE_M: usize = 8;
/// Weight bytes a task keeps hot while it sweeps its rows over all activation tiles (L1-sized).
const TASK_WEIGHT_BYTES: usize = 32 * 1024;

/// Runs `dot` for every (activation row, weight row) pair, in parallel over weight rows.
/// `acts` is `m` rows of `act_stride` items; `out` is `[m, w.rows]`.
fn drive<D: RowDot>(dot: &D, acts: &[D::Act], act_stride: usize, m: usize, w: &QuantMatrix, out: &mut [f32]) {
    let n = w.rows;
    let row_bytes = w.data.len() / n;
    assert_eq!(acts.len(), m * act_stride, "quant_matmul: activation buffer has the wrong length");
    assert_eq!(out.len(), m * n, "quant_matmul: out has the wrong length");
    let out_ptr = OutPtr::new(out);

    // Each task owns a contiguous range of weight rows, i.e. output columns; for every tile of up
    // to four activation rows it sweeps its weight rows, which stay in L1/L2 between tiles, so each
    // weight byte comes from memory once per call.
    let max_tile = dot.max_tile().clamp(1, TILE_M);
    let task = |rows: Range<usize>| {
        let mut i0 = 0;
        while i0 < m {
            let tile = (m - i0).min(max_tile);
            match tile {
                8 => dot_tile::<D, 8>(dot, acts, act_stride, i0, rows.clone(), w.data, row_bytes, n, out_ptr),
                7 => dot_tile::<D, 7>(dot, acts, act_stride, i0, rows.clone(), w.data, row_bytes, n, out_ptr),
                6 => dot_tile::<D, 6>(dot, acts, act_stride, i0, rows.clone(), w.data, row_bytes, n, out_ptr),
                5 => dot_tile::<D, 5>(dot, acts, act_stride, i0, rows.clone(), w.data, row_bytes, n, out_ptr),
                4 => dot_tile::<D, 4>(dot, acts, act_stride, i0, rows.clone(), w.data, row_bytes, n, out_ptr),
                3 => dot_tile::<D, 3>(dot, acts, act_stride, i0, rows.clone(), w.data, row_bytes, n, out_ptr),
                2 => dot_tile::<D, 2>(dot, acts, act_stride, i0, rows.clone(), w.data, row_bytes, n, out_ptr),
                _ => dot_tile::<D, 1>(dot, acts, act_stride, i0, rows.clone(), w.data, row_bytes, n, out_ptr),
            }
            i0 += tile;
        }
    };

    let macs = m.saturating_mul(n).saturating_mul(w.cols);
    let threads = rayon::current_num_threads();
    if macs < PAR_MIN_MACS || threads == 1 || n == 1 {
        task(0..n);
        return;
    }
    // Several tasks per thread so a thread slowed by a neighbour on a shared machine does not hold
    // up the call; with more than one tile, cap a task's weights so they stay cache-resident.
    let mut rows_per_task = n.div_ceil(threads * 4);
    if m > max_tile {
        rows_per_task = rows_per_task.min((TASK_WEIGHT_BYTES / row_bytes.max(1)).max(1));
    }
    let n_tasks = n.div_ceil(rows_per_task);
    (0..n_tasks).into_par_iter().for_each(|t| {
        let start = t * rows_per_task;
        task(start..(start + rows_per_task).min(n));
    });
}

#[allow(clippy::too_many_arguments)] // the loop state of `drive`, kept flat for the hot path
#[inline]
fn dot_tile<D: RowDot, const R: usize>(
    dot: &D,
    acts: &[D::Act],
    act_stride: usize,
    i0: usize,
    rows: Range<usize>,
    w_data: &[u8],
    row_bytes: usize,
    n: usize,
    out: OutPtr,
) {
    let tile: [&[D::Act]; R] = std::array::from_fn(|r| &acts[(i0 + r) * act_stride..][..act_stride]);
    for j in rows {
        let sums = dot.dot::<R>(&w_data[j * row_bytes..][..row_bytes], tile);
        for (r, &s) in sums.iter().enumerate() {
            let idx = (i0 + r) * n + j;
            debug_assert!(idx < n * (acts.len() / act_stride));
            // SAFETY: i0 + r < m and j < n, so idx < m * n = out.len() (asserted in `drive`); only
            // the task that owns weight row j writes column j, so writes never overlap, and
            // `out` stays mutably borrowed by `drive` until every task has finished.
            unsafe { *out.get().add(idx) = s };
        }
    }
}

/// Dense and activation-only weight types (F32, F16, BF16, Q8_1, Q8_K): each weight row is
/// dequantized a piece at a time into a stack buffer and dotted in f32 with unquantized `x`.
struct DenseDot {
    ty: GgmlType,
    kernel: Kernel,
}

/// Elements per dequantized piece: a multiple of every block size, small enough for the stack.
const DENSE_PIECE: usize = blocks::QK_K;

impl RowDot for DenseDot {
    type Act = f32;

    fn dot<const R: usize>(&self, w_row: &[u8], xs: [&[f32]; R]) -> [f32; R] {
        let mut sums = [0f32; R];
        let Some(k) = xs.first().map(|x| x.len()) else {
            return sums;
        };
        let (bs, ts) = (self.ty.block_size(), self.ty.type_size());
        let mut buf = [0f32; DENSE_PIECE];
        let mut start = 0;
        while start < k {
            let len = (k - start).min(DENSE_PIECE);
            let bytes = &w_row[start / bs * ts..(start + len) / bs * ts];
            match (self.kernel, self.ty) {
                // `half`'s per-value conversion checks for F16C on every call; convert 8 at once.
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx2(token), GgmlType::F16) => avx2::f16_to_f32(token, bytes, &mut buf[..len]),
                _ => blocks::dequantize_exact(self.ty, bytes, &mut buf[..len]),
            }
            for (sum, x) in sums.iter_mut().zip(xs) {
                *sum += match self.kernel {
                    Kernel::Scalar => super::simd::dot_portable(&buf[..len], &x[start..start + len]),
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2(_) => super::simd::dot(&buf[..len], &x[start..start + len]),
                };
            }
            start += len;
        }
        sums
    }
}
