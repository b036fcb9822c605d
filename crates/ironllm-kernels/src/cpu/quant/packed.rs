//! Weights repacked at load into interleaved row groups ([`PackedMatrix`]) for the AVX-512 VNNI
//! matmul ([`packed_matmul`]).
//!
//! The row-at-a-time kernels of `avx2` spend most of their time not in the integer dot but in the
//! float scaling that follows every block of every (weight row, activation row) pair. Here
//! sixteen weight rows are interleaved so that one 512-bit register holds four consecutive
//! weight bytes of each of the sixteen rows: a `vpdpbusd` against four activation bytes
//! broadcast to every lane then advances sixteen dot products at once, and the float scaling of
//! a block is one vector operation for all sixteen rows (llama.cpp's repacked CPU kernels work
//! the same way). The bytes per block and the scale precision (f16) are those of the file, so
//! memory traffic is unchanged.
//!
//! Layout of one group of 16 rows with `nb` blocks per row, for the legacy types whose blocks are
//! 32 elements (Q4_0, Q4_1, Q8_0), block after block (`GroupLayout` says where each part sits):
//! - a block's quants: for each 4-element chunk `c` of the block (8 of them), 64 bytes holding
//!   chunk `c` of rows 0..16 in turn. Q4 nibbles stay packed as in the file: the file's byte `t`
//!   holds element `t` (low nibble) and `t + 16` (high nibble), so the 64 bytes of file bytes
//!   `4j..4j + 4` give chunk `j` after masking and chunk `j + 4` after shifting; a block takes
//!   256 bytes. Q8_0 values are stored with their sign bit flipped (`q + 128`, unsigned, as
//!   `vpdpbusd` wants its first operand) and take 512 bytes.
//! - the sixteen rows' f16 scales `d` of the block (32 bytes), and for Q4_1 their f16 minimums `m`
//!   (32 bytes), next to the quants so that a group streams from memory in one sequence.
//!
//! A last group with fewer than 16 rows is padded with all-zero rows (scale 0, so they add
//! exactly nothing) whose outputs are never written.
//!
//! Each output is one lane of one accumulator that sums the row's blocks in file order, whatever
//! the batch size or tiling, so a request's result does not depend on its batch (as in `mod`).

use std::ops::Range;

use rayon::prelude::*;

use super::super::par::OutPtr;
use super::act::{self, BlockQ8};
use super::blocks::{Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES, QK};
use super::{check_len, GgmlType, Kernel, QuantError, QuantMatrix};

/// Rows interleaved in one group: the 16 i32 lanes of a 512-bit register.
pub(crate) const GROUP: usize = 16;

/// Bytes of one 64-byte aligned line; the storage unit of a packed matrix.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A `[rows, cols]` weight matrix of a legacy GGUF type in the interleaved layout of this module.
pub struct PackedMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    /// Bytes per group (a multiple of 64).
    group_bytes: usize,
    lines: Vec<Line>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("ty", &self.ty)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

/// Where block `b` of a group keeps its quants, scales and minimums.
///
/// Blocks are stored in units of one (Q4_1) or two (Q4_0, Q8_0) blocks: the units' quants, then
/// their scales `d` (32 bytes per block), then for Q4_1 the minimums `m` (32 bytes per block).
/// The unit sizes (320, 576 and 1088 bytes) are whole cache lines, so every 64-byte quant load is
/// aligned, and a row group is one sequential stream (scales kept apart from the quants would be a
/// second stream, measured ~1.5x slower on a memory-bound LM head).
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupLayout {
    /// Blocks per row.
    pub nb: usize,
    /// Quant bytes per block for the 16 rows (256 for Q4, 512 for Q8_0).
    pub qbytes: usize,
    /// Blocks per unit.
    pub bpu: usize,
    /// Bytes per unit.
    pub unit_bytes: usize,
    /// Bytes of a group: every unit, the last one padded with zero blocks.
    pub bytes: usize,
}

impl GroupLayout {
    pub(crate) fn new(ty: GgmlType, cols: usize) -> Option<GroupLayout> {
        let (qbytes, bpu, has_min) = match ty {
            GgmlType::Q4_0 => (GROUP * 16, 2, false),
            GgmlType::Q4_1 => (GROUP * 16, 1, true),
            GgmlType::Q8_0 => (GROUP * 32, 2, false),
            _ => return None,
        };
        let nb = cols / QK;
        let unit_bytes = bpu * (qbytes + 2 * GROUP * if has_min { 2 } else { 1 });
        debug_assert_eq!(unit_bytes % 64, 0);
        Some(GroupLayout { nb, qbytes, bpu, unit_bytes, bytes: nb.div_ceil(bpu) * unit_bytes })
    }

    /// Offsets of block `b`'s quants and scales; the minimums follow the scales by `32 * bpu`.
    #[inline(always)]
    pub(crate) fn block(&self, b: usize) -> (usize, usize) {
        let (u, i) = (b / self.bpu, b % self.bpu);
        let unit = u * self.unit_bytes;
        (unit + i * self.qbytes, unit + self.bpu * self.qbytes + i * 2 * GROUP)
    }

    /// Offset of block `b`'s minimums (Q4_1).
    #[inline(always)]
    pub(crate) fn min_of(&self, b: usize) -> usize {
        self.block(b).1 + self.bpu * 2 * GROUP
    }
}

/// Whether this CPU runs the packed kernels (AVX-512 F/BW/VL/VNNI, unless `IRONLLM_NO_AVX512` or
/// `IRONLLM_NO_REPACK` is set).
pub fn packing_supported() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let vnni = matches!(Kernel::best(), Kernel::Avx2(t) if t.has_vnni());
            vnni && std::env::var_os("IRONLLM_NO_REPACK").is_none()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

impl PackedMatrix {
    /// Repacks `w` when its type has a packed kernel (Q4_0, Q4_1, Q8_0) and this CPU runs it;
    /// `None` otherwise, and the caller keeps the file layout.
    pub fn pack(w: &QuantMatrix) -> Option<PackedMatrix> {
        if !packing_supported() {
            return None;
        }
        Self::pack_layout(w)
    }

    /// The repacking itself, on any CPU (tests compare it with the file layout everywhere).
    pub(crate) fn pack_layout(w: &QuantMatrix) -> Option<PackedMatrix> {
        let layout = GroupLayout::new(w.ty, w.cols)?;
        let row_bytes = w.checked_row_bytes().ok()?;
        if w.cols == 0 || w.rows == 0 {
            return None;
        }
        let group_bytes = layout.bytes;
        let groups = w.rows.div_ceil(GROUP);
        let mut lines = vec![Line([0; 64]); groups * group_bytes / 64];
        let bytes = lines_as_bytes_mut(&mut lines);
        for r in 0..w.rows {
            let (g, lane) = (r / GROUP, r % GROUP);
            let group = &mut bytes[g * group_bytes..(g + 1) * group_bytes];
            let row = &w.data[r * row_bytes..(r + 1) * row_bytes];
            let bsz = w.ty.type_size();
            for (b, block) in row.chunks_exact(bsz).enumerate() {
                let (d, m, qs) = split_block(w.ty, block);
                let (q_at, d_at) = layout.block(b);
                let ds = d_at + 2 * lane;
                group[ds..ds + 2].copy_from_slice(d);
                if let Some(m) = m {
                    let ms = layout.min_of(b) + 2 * lane;
                    group[ms..ms + 2].copy_from_slice(m);
                }
                let flip = if w.ty == GgmlType::Q8_0 { 0x80 } else { 0 };
                for (c, chunk) in qs.chunks_exact(4).enumerate() {
                    let at = q_at + c * 64 + 4 * lane;
                    for (dst, &src) in group[at..at + 4].iter_mut().zip(chunk) {
                        *dst = src ^ flip;
                    }
                }
            }
        }
        Some(PackedMatrix { ty: w.ty, rows: w.rows, cols: w.cols, group_bytes, lines })
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held (with the padding).
    pub fn nbytes(&self) -> usize {
        self.lines.len() * 64
    }

    fn bytes(&self) -> &[u8] {
        lines_as_bytes(&self.lines)
    }

    /// Row `r` in the file's block layout (`ty.row_bytes(cols)` bytes), the inverse of packing.
    pub fn unpack_row(&self, r: usize, out: &mut [u8]) -> Result<(), QuantError> {
        let row_bytes = self.ty.row_bytes(self.cols).ok_or(QuantError::Overflow { what: "row bytes" })?;
        check_len("unpacked row", row_bytes, out.len())?;
        if r >= self.rows {
            return Err(QuantError::LengthMismatch { what: "row index (rows)", expected: self.rows, got: r });
        }
        let layout = GroupLayout::new(self.ty, self.cols).ok_or(QuantError::Overflow { what: "layout" })?;
        let (g, lane) = (r / GROUP, r % GROUP);
        let group = &self.bytes()[g * self.group_bytes..(g + 1) * self.group_bytes];
        let flip = if self.ty == GgmlType::Q8_0 { 0x80 } else { 0 };
        for (b, block) in out.chunks_exact_mut(self.ty.type_size()).enumerate() {
            let (q_at, d_at) = layout.block(b);
            let ds = d_at + 2 * lane;
            block[..2].copy_from_slice(&group[ds..ds + 2]);
            let q_start = if self.ty == GgmlType::Q4_1 {
                let ms = layout.min_of(b) + 2 * lane;
                block[2..4].copy_from_slice(&group[ms..ms + 2]);
                4
            } else {
                2
            };
            for (c, chunk) in block[q_start..].chunks_exact_mut(4).enumerate() {
                let at = q_at + c * 64 + 4 * lane;
                for (dst, &src) in chunk.iter_mut().zip(&group[at..at + 4]) {
                    *dst = src ^ flip;
                }
            }
        }
        Ok(())
    }

    /// Row `r` dequantized to f32 (`cols` values), e.g. for an embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<(), QuantError> {
        check_len("dequantized row", self.cols, out.len())?;
        let row_bytes = self.ty.row_bytes(self.cols).ok_or(QuantError::Overflow { what: "row bytes" })?;
        let mut buf = vec![0u8; row_bytes];
        self.unpack_row(r, &mut buf)?;
        super::dequantize(self.ty, &buf, out)
    }
}

/// A block's f16 scale, f16 minimum (Q4_1) and quant bytes, as the file stores them.
fn split_block(ty: GgmlType, block: &[u8]) -> (&[u8], Option<&[u8]>, &[u8]) {
    match ty {
        GgmlType::Q4_1 => {
            debug_assert_eq!(block.len(), Q4_1_BYTES);
            (&block[..2], Some(&block[2..4]), &block[4..])
        }
        _ => {
            debug_assert!(block.len() == Q4_0_BYTES || block.len() == Q8_0_BYTES);
            (&block[..2], None, &block[2..])
        }
    }
}

fn lines_as_bytes(lines: &[Line]) -> &[u8] {
    // SAFETY: `Line` is 64 plain bytes with no padding (`repr(C)` over `[u8; 64]`), so the
    // lines are `64 * len` initialized bytes; the borrow keeps them alive and unaliased.
    unsafe { std::slice::from_raw_parts(lines.as_ptr().cast::<u8>(), lines.len() * 64) }
}

fn lines_as_bytes_mut(lines: &mut [Line]) -> &mut [u8] {
    // SAFETY: as in `lines_as_bytes`, and the unique borrow makes the byte view unique too.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast::<u8>(), lines.len() * 64) }
}

/// `out[m, rows] = x[m, cols] @ W^T` for a packed `W` (see [`super::quant_matmul`]).
pub fn packed_matmul(x: &[f32], m: usize, w: &PackedMatrix, out: &mut [f32]) -> Result<(), QuantError> {
    let x_len = m.checked_mul(w.cols).ok_or(QuantError::Overflow { what: "m * cols" })?;
    check_len("x (m * cols)", x_len, x.len())?;
    let out_len = m.checked_mul(w.rows).ok_or(QuantError::Overflow { what: "m * rows" })?;
    check_len("out (m * rows)", out_len, out.len())?;
    if m == 0 {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if let Kernel::Avx2(token) = Kernel::best() {
        if token.has_vnni() {
            let kernel = Kernel::Avx2(token);
            act::with_quantized::<BlockQ8, _>(kernel, x, w.cols, |acts| drive(token, acts, m, w, out));
            return Ok(());
        }
    }
    // A packed matrix only exists where the kernel runs (`pack`); tests that pack on other CPUs
    // come here, and so would a matrix moved to another machine: unpack and use the file layout.
    let row_bytes = w.ty.row_bytes(w.cols).ok_or(QuantError::Overflow { what: "row bytes" })?;
    let mut data = vec![0u8; row_bytes * w.rows];
    for (r, row) in data.chunks_exact_mut(row_bytes).enumerate() {
        w.unpack_row(r, row)?;
    }
    super::quant_matmul(x, m, &QuantMatrix { ty: w.ty, data: &data, rows: w.rows, cols: w.cols }, out)
}

/// Below this many multiply-adds a call runs on the calling thread (as in `mod`).
const PAR_MIN_MACS: usize = 1 << 17;
/// Activation rows per tile: eight accumulators plus the decoded block fit the 32 registers.
const TILE_M: usize = 8;
/// Weight bytes a task keeps hot while it sweeps its groups over all activation tiles.
const TASK_WEIGHT_BYTES: usize = 32 * 1024;

#[cfg(target_arch = "x86_64")]
fn drive(token: super::avx2::Avx2, acts: &[BlockQ8], m: usize, w: &PackedMatrix, out: &mut [f32]) {
    let n = w.rows;
    let Some(layout) = GroupLayout::new(w.ty, w.cols) else { return };
    let act_stride = layout.nb;
    assert_eq!(acts.len(), m * act_stride, "packed_matmul: activation buffer has the wrong length");
    assert_eq!(out.len(), m * n, "packed_matmul: out has the wrong length");
    let groups = n.div_ceil(GROUP);
    let bytes = w.bytes();
    let out_ptr = OutPtr::new(out);
    let ty = w.ty;
    let group_bytes = w.group_bytes;

    let task = |range: Range<usize>| {
        let mut i0 = 0;
        while i0 < m {
            let tile = (m - i0).min(TILE_M);
            for g in range.clone() {
                let group = &bytes[g * group_bytes..(g + 1) * group_bytes];
                let cols = (n - g * GROUP).min(GROUP);
                let sums = super::packed_avx512::group_dot(token, ty, layout, group, acts, act_stride, i0, tile);
                for (r, lanes) in sums.iter().take(tile).enumerate() {
                    let idx = (i0 + r) * n + g * GROUP;
                    debug_assert!(idx + cols <= m * n);
                    // SAFETY: i0 + r < m and g * GROUP + cols <= n, so the `cols` elements from idx
                    // lie in `out` (m * n, asserted above); only the task owning group g writes
                    // these columns, and `out` stays mutably borrowed until every task is done.
                    unsafe { std::ptr::copy_nonoverlapping(lanes.as_ptr(), out_ptr.get().add(idx), cols) };
                }
            }
            i0 += tile;
        }
    };

    let macs = m.saturating_mul(n).saturating_mul(w.cols);
    let threads = rayon::current_num_threads();
    if macs < PAR_MIN_MACS || threads == 1 || groups == 1 {
        task(0..groups);
        return;
    }
    // Several tasks per thread (a thread slowed by a neighbour does not hold up the call); with
    // more than one tile, a task's weights are capped so they stay cache-resident between tiles.
    let mut per_task = groups.div_ceil(threads * 4);
    if m > TILE_M {
        per_task = per_task.min((TASK_WEIGHT_BYTES / group_bytes).max(1));
    }
    let n_tasks = groups.div_ceil(per_task);
    (0..n_tasks).into_par_iter().for_each(|t| {
        let start = t * per_task;
        task(start..(start + per_task).min(groups));
    });
}
