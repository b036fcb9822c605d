//! Attention over the paged KV cache for a flattened batch that mixes prefills, chunked prefills and
//! decodes: each sequence's new query tokens attend causally to its cached prefix and to themselves, with
//! keys and values read through the sequence's block table.
//!
//! Cache layout per layer: `[num_blocks, num_kv_heads, block_size, head_dim]`, so one KV head's slice of a
//! block is contiguous and a task that owns one (sequence, KV head) streams exactly the bytes it needs.
//! All query heads that share a KV head (GQA) are computed in the same task, so K/V are read once for the
//! group. Softmax is exact (max-subtracted, two passes over the scores) in f32. Keys and values are
//! read a cache block at a time (one table lookup per block, not per position) by SIMD row kernels
//! whose results are bit-identical to the single-row `dot`/`axpy`.
//!
//! The cache holds f32, f16 or bf16 ([`KvElement`], vLLM's `--kv-cache-dtype`). K and V are computed
//! in f32, rounded to nearest even when [`write_kv`] stores them, and widened back (exactly) inside the
//! row kernels as attention reads them; everything else (scores, softmax, the weighted sum) stays f32.
//! A 16-bit cache halves the bytes decode attention streams, which is what bounds its speed. The f32
//! cache takes the very same code path as before 16-bit caches existed.

use std::cell::RefCell;

use half::{bf16, f16};
use rayon::prelude::*;

use super::par::OutPtr;
use super::simd;

/// The element type of a KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDType {
    #[default]
    F32,
    F16,
    BF16,
}

impl KvDType {
    /// Bytes per cached element.
    pub fn size_bytes(self) -> usize {
        match self {
            KvDType::F32 => 4,
            KvDType::F16 | KvDType::BF16 => 2,
        }
    }

    /// vLLM's name for it (`--kv-cache-dtype`).
    pub fn name(self) -> &'static str {
        match self {
            KvDType::F32 => "float32",
            KvDType::F16 => "float16",
            KvDType::BF16 => "bfloat16",
        }
    }
}

/// An element type the paged KV cache can hold: how f32 K/V rows are stored into it and how the
/// attention row kernels read it back as f32.
pub trait KvElement: Copy + Send + Sync + 'static {
    const DTYPE: KvDType;
    /// A cache of `n` zeros. Zeroed memory comes from the allocator as untouched pages, so a large cache
    /// costs resident memory only as it fills.
    fn zeroed(n: usize) -> Vec<Self>;
    /// `dst[i] = src[i]`, rounded to nearest even.
    fn store(src: &[f32], dst: &mut [Self]);
    /// The stored value as f32 (exact).
    fn load(self) -> f32;
    /// `out[j] = dot(q, k_j) * scale` for every row `k_j` of `k` ([`simd::dot_rows`]).
    fn dot_rows(q: &[f32], k: &[Self], scale: f32, out: &mut [f32]);
    /// `acc += p[j] * v_j` for every row `v_j` of `v`, in order of j ([`simd::axpy_rows`]).
    fn axpy_rows(p: &[f32], v: &[Self], acc: &mut [f32]);
}

impl KvElement for f32 {
    const DTYPE: KvDType = KvDType::F32;
    fn zeroed(n: usize) -> Vec<f32> {
        vec![0f32; n]
    }
    #[inline]
    fn store(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline]
    fn load(self) -> f32 {
        self
    }
    #[inline]
    fn dot_rows(q: &[f32], k: &[f32], scale: f32, out: &mut [f32]) {
        simd::dot_rows(q, k, scale, out)
    }
    #[inline]
    fn axpy_rows(p: &[f32], v: &[f32], acc: &mut [f32]) {
        simd::axpy_rows(p, v, acc)
    }
}

impl KvElement for f16 {
    const DTYPE: KvDType = KvDType::F16;
    fn zeroed(n: usize) -> Vec<f16> {
        use half::vec::HalfBitsVecExt;
        // u16 zeros get the zeroed allocation; +0.0 is all-zero bits in f16.
        vec![0u16; n].reinterpret_into()
    }
    /// half's slice conversion: F16C's `vcvtps2ph` eight at a time (one feature check per row, not
    /// per element), round to nearest even like the scalar `f16::from_f32`.
    #[inline]
    fn store(src: &[f32], dst: &mut [f16]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
    #[inline]
    fn load(self) -> f32 {
        simd::Widen::widen(self)
    }
    #[inline]
    fn dot_rows(q: &[f32], k: &[f16], scale: f32, out: &mut [f32]) {
        simd::dot_rows_16(q, k, scale, out)
    }
    #[inline]
    fn axpy_rows(p: &[f32], v: &[f16], acc: &mut [f32]) {
        simd::axpy_rows_16(p, v, acc)
    }
}

impl KvElement for bf16 {
    const DTYPE: KvDType = KvDType::BF16;
    fn zeroed(n: usize) -> Vec<bf16> {
        use half::vec::HalfBitsVecExt;
        // u16 zeros get the zeroed allocation; +0.0 is all-zero bits in bf16.
        vec![0u16; n].reinterpret_into()
    }
    #[inline]
    fn store(src: &[f32], dst: &mut [bf16]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = bf16::from_f32(s);
        }
    }
    #[inline]
    fn load(self) -> f32 {
        simd::Widen::widen(self)
    }
    #[inline]
    fn dot_rows(q: &[f32], k: &[bf16], scale: f32, out: &mut [f32]) {
        simd::dot_rows_16(q, k, scale, out)
    }
    #[inline]
    fn axpy_rows(p: &[f32], v: &[bf16], acc: &mut [f32]) {
        simd::axpy_rows_16(p, v, acc)
    }
}

/// Geometry of one layer's paged cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_blocks: usize,
    pub num_kv_heads: usize,
    pub block_size: usize,
    pub head_dim: usize,
}

impl KvLayout {
    /// Elements in one layer's K (or V) cache.
    pub fn layer_len(&self) -> usize {
        self.num_blocks * self.num_kv_heads * self.block_size * self.head_dim
    }

    #[inline]
    fn offset(&self, block: usize, kv_head: usize, slot_in_block: usize) -> usize {
        ((block * self.num_kv_heads + kv_head) * self.block_size + slot_in_block) * self.head_dim
    }
}

/// Writes each token's K and V (`[tokens, num_kv_heads * head_dim]`) into its cache slot
/// (`slot = block_id * block_size + offset`), rounded to the cache's element type.
pub fn write_kv<T: KvElement>(
    layout: &KvLayout,
    k: &[f32],
    v: &[f32],
    slots: &[usize],
    k_cache: &mut [T],
    v_cache: &mut [T],
) {
    let width = layout.num_kv_heads * layout.head_dim;
    assert!(k.len() == slots.len() * width && v.len() == k.len(), "write_kv: k/v are not [tokens, kv width]");
    assert!(k_cache.len() == layout.layer_len() && v_cache.len() == k_cache.len(), "write_kv: cache size");
    let hd = layout.head_dim;
    for (t, &slot) in slots.iter().enumerate() {
        let (block, off) = (slot / layout.block_size, slot % layout.block_size);
        assert!(block < layout.num_blocks, "write_kv: slot {slot} outside the cache");
        for h in 0..layout.num_kv_heads {
            let dst = layout.offset(block, h, off);
            let src = t * width + h * hd;
            T::store(&k[src..src + hd], &mut k_cache[dst..dst + hd]);
            T::store(&v[src..src + hd], &mut v_cache[dst..dst + hd]);
        }
    }
}

/// One sequence of the flattened batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSpan<'a> {
    /// First row of this sequence's queries in the flattened batch.
    pub query_start: usize,
    /// Number of new tokens (1 for a decode).
    pub query_len: usize,
    /// Tokens in the cache after this step's tokens were written (prefix + new).
    pub context_len: usize,
    /// Block ids covering `0..context_len`.
    pub block_table: &'a [u32],
}

thread_local! {
    /// Per-thread scores and accumulator, reused across calls so a task allocates nothing.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Query tokens per task: small enough to spread a long prefill over threads, large enough to amortize.
const QUERY_CHUNK: usize = 16;

/// Below this many multiply-adds (q·K plus p·V over the whole call) the tasks run on the calling
/// thread: a rayon fork/join costs 5-17 µs here, about what a short decode's attention takes.
/// Decode attention streams its K/V from memory (~6 GB/s on one thread), so a single sequence of
/// SmolLM2-135M (576 query dims) at 128+ tokens of context already takes ~40 µs per layer; run
/// serially, it also lets the other workers fall asleep, and the next projection then pays for
/// waking them (measured on 2 vCPUs: attention + o_proj 2.0 -> 1.1 ms per single-stream step, with
/// the threshold lowered from 2^18 to 2^16).
const PAR_MIN_MACS: usize = 1 << 16;

/// `out[t, h*hd..]` = softmax(q·Kᵀ·scale) V for every query row t and head h.
///
/// The arithmetic of one (row, head) is fixed: scores are `simd::dot(q, k_j) * scale` in position
/// order, the max is exact in any order, the exponentials' sum is folded in position order, and the
/// output is the fused multiply-add of `exp(s_j - max)` times `v_j` in position order, divided by the
/// sum at the end. Splitting positions into cache blocks or rows into tasks does not change any of it, so the
/// result is independent of the batch, the task split and the thread count. A 16-bit cache's K/V enter
/// that arithmetic widened exactly to f32, so its result is bit for bit the f32 cache's over the same
/// (rounded) values.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention<T: KvElement>(
    layout: &KvLayout,
    q: &[f32],
    num_heads: usize,
    k_cache: &[T],
    v_cache: &[T],
    seqs: &[SeqSpan<'_>],
    scale: f32,
    out: &mut [f32],
) {
    let hd = layout.head_dim;
    let nkv = layout.num_kv_heads;
    assert!(num_heads.is_multiple_of(nkv), "paged_attention: heads not a multiple of kv heads");
    let width = num_heads * hd;
    assert_eq!(q.len(), out.len(), "paged_attention: q and out differ");
    assert!(k_cache.len() == layout.layer_len() && v_cache.len() == k_cache.len(), "paged_attention: cache size");
    let rows = q.len() / width;
    let mut macs = 0usize;
    for s in seqs {
        assert!(s.query_start + s.query_len <= rows, "paged_attention: sequence beyond the batch");
        assert!(s.query_len <= s.context_len, "paged_attention: more queries than context");
        assert!(s.block_table.len() * layout.block_size >= s.context_len, "paged_attention: short block table");
        assert!(s.block_table.iter().all(|&b| (b as usize) < layout.num_blocks), "paged_attention: bad block id");
        macs = macs.saturating_add(2 * s.query_len * s.context_len * width);
    }
    let mut tasks: Vec<(usize, usize, usize)> = Vec::new();
    for (si, s) in seqs.iter().enumerate() {
        for kvh in 0..nkv {
            let mut t0 = 0;
            while t0 < s.query_len {
                tasks.push((si, kvh, t0));
                t0 += QUERY_CHUNK;
            }
        }
    }
    let out_ptr = OutPtr::new(out);
    let run = |&(si, kvh, t0): &(usize, usize, usize)| {
        let s = &seqs[si];
        let t1 = (t0 + QUERY_CHUNK).min(s.query_len);
        SCRATCH.with(|cell| {
            let mut guard = cell.borrow_mut();
            let (scores, acc) = &mut *guard;
            if scores.len() < s.context_len {
                scores.resize(s.context_len, 0.0);
            }
            if acc.len() < hd {
                acc.resize(hd, 0.0);
            }
            // SAFETY: each (seq, kv head, chunk) task owns its query rows' heads of one GQA group,
            // so no two tasks write the same elements; rows and heads are in bounds of out (asserted
            // above), and out stays borrowed by this call until every task has finished.
            unsafe {
                attend_group(
                    layout,
                    q,
                    num_heads,
                    k_cache,
                    v_cache,
                    s,
                    kvh,
                    t0..t1,
                    scale,
                    scores,
                    &mut acc[..hd],
                    out_ptr,
                )
            };
        });
    };
    if macs < PAR_MIN_MACS || tasks.len() == 1 || rayon::current_num_threads() == 1 {
        tasks.iter().for_each(run);
    } else {
        tasks.par_iter().for_each(run);
    }
}

/// Asks for KV head `kvh`'s rows of the block after `blocks[b]` (if any). Cache blocks are scattered
/// over memory, so the hardware prefetchers lose the stream at every block boundary; at 16
/// sequences the K/V reads come from memory, and announcing the next block keeps them flowing.
#[inline]
fn prefetch_next<T>(layout: &KvLayout, cache: &[T], blocks: &[u32], b: usize, kvh: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(&next) = blocks.get(b + 1) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let start = layout.offset(next as usize, kvh, 0);
        let rows = &cache[start..start + layout.block_size * layout.head_dim];
        let bytes = std::mem::size_of_val(rows);
        let base = rows.as_ptr().cast::<i8>();
        for line in (0..bytes).step_by(64) {
            // SAFETY: SSE is part of x86_64's baseline; a prefetch never faults and reads nothing
            // into the program.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(line)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (layout, cache, blocks, b, kvh);
}

/// Attention of query rows `ts` of sequence `s` for the query heads of KV head `kvh`.
///
/// # Safety
/// The caller guarantees that no other thread writes these rows' heads of `out` concurrently and
/// that `out` holds `rows * num_heads * head_dim` floats.
#[allow(clippy::too_many_arguments)]
unsafe fn attend_group<T: KvElement>(
    layout: &KvLayout,
    q: &[f32],
    num_heads: usize,
    k_cache: &[T],
    v_cache: &[T],
    s: &SeqSpan<'_>,
    kvh: usize,
    ts: std::ops::Range<usize>,
    scale: f32,
    scores: &mut [f32],
    acc: &mut [f32],
    out: OutPtr,
) {
    let (hd, bs) = (layout.head_dim, layout.block_size);
    let group = num_heads / layout.num_kv_heads;
    let width = num_heads * hd;
    for t in ts {
        let row = s.query_start + t;
        // Causal: this query sits at position context_len - query_len + t and sees 0..=that.
        let visible = s.context_len - s.query_len + t + 1;
        for g in 0..group {
            let h = kvh * group + g;
            let qv = &q[row * width + h * hd..row * width + (h + 1) * hd];
            // Scores block by block: within a block one KV head's keys are contiguous rows.
            let blocks = &s.block_table[..visible.div_ceil(bs)];
            for (b, &block) in blocks.iter().enumerate() {
                let n = bs.min(visible - b * bs);
                let off = layout.offset(block as usize, kvh, 0);
                if g == 0 {
                    prefetch_next(layout, k_cache, blocks, b, kvh);
                }
                T::dot_rows(qv, &k_cache[off..off + n * hd], scale, &mut scores[b * bs..b * bs + n]);
            }
            let scores = &mut scores[..visible];
            // A maximum is exact in any grouping, so the SIMD one equals the sequential fold (a zero
            // maximum's sign aside, which no `exp(s - max)` below can see).
            let max = simd::max(scores);
            super::vexp::exp_shifted(scores, max);
            let mut sum = 0f32;
            for sc in scores.iter() {
                sum += *sc;
            }
            acc.fill(0.0);
            for (b, &block) in blocks.iter().enumerate() {
                let n = bs.min(visible - b * bs);
                let off = layout.offset(block as usize, kvh, 0);
                if g == 0 {
                    prefetch_next(layout, v_cache, blocks, b, kvh);
                }
                T::axpy_rows(&scores[b * bs..b * bs + n], &v_cache[off..off + n * hd], acc);
            }
            let inv = 1.0 / sum;
            // SAFETY: row < rows and head h < num_heads, so the hd floats at row * width + h * hd are
            // in bounds of out; the caller guarantees no concurrent writer.
            unsafe {
                let dst = out.get().add(row * width + h * hd);
                for (i, a) in acc.iter().enumerate() {
                    *dst.add(i) = a * inv;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed ^ 0x9E3779B97F4A7C15;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Dense causal attention in f64 over contiguous K/V.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        nh: usize,
        nkv: usize,
        hd: usize,
        ctx: usize,
        qlen: usize,
        scale: f32,
    ) -> Vec<f64> {
        let group = nh / nkv;
        let mut out = vec![0f64; qlen * nh * hd];
        for t in 0..qlen {
            let visible = ctx - qlen + t + 1;
            for h in 0..nh {
                let kvh = h / group;
                let qv = &q[(t * nh + h) * hd..(t * nh + h + 1) * hd];
                let s: Vec<f64> = (0..visible)
                    .map(|j| {
                        (0..hd).map(|i| qv[i] as f64 * k[(j * nkv + kvh) * hd + i] as f64).sum::<f64>() * scale as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for i in 0..hd {
                    out[(t * nh + h) * hd + i] =
                        (0..visible).map(|j| e[j] * v[(j * nkv + kvh) * hd + i] as f64).sum::<f64>() / z;
                }
            }
        }
        out
    }

    /// The per-position formulation (one block-table lookup, `dot` and `axpy` per cached position)
    /// that the block-wise kernels must reproduce bit for bit.
    #[allow(clippy::too_many_arguments)]
    fn per_position(
        layout: &KvLayout,
        q: &[f32],
        nh: usize,
        k_cache: &[f32],
        v_cache: &[f32],
        s: &SeqSpan<'_>,
        scale: f32,
        out: &mut [f32],
    ) {
        let (hd, bs) = (layout.head_dim, layout.block_size);
        let group = nh / layout.num_kv_heads;
        for t in 0..s.query_len {
            let row = s.query_start + t;
            let visible = s.context_len - s.query_len + t + 1;
            for h in 0..nh {
                let kvh = h / group;
                let qv = &q[(row * nh + h) * hd..(row * nh + h + 1) * hd];
                let at = |j: usize| layout.offset(s.block_table[j / bs] as usize, kvh, j % bs);
                let mut sc: Vec<f32> =
                    (0..visible).map(|j| simd::dot(qv, &k_cache[at(j)..at(j) + hd]) * scale).collect();
                let max = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let mut sum = 0f32;
                for x in sc.iter_mut() {
                    *x = crate::cpu::vexp::exp(*x - max);
                    sum += *x;
                }
                let mut acc = vec![0f32; hd];
                for (j, p) in sc.iter().enumerate() {
                    simd::axpy(*p, &v_cache[at(j)..at(j) + hd], &mut acc);
                }
                for (i, a) in acc.iter().enumerate() {
                    out[(row * nh + h) * hd + i] = a * (1.0 / sum);
                }
            }
        }
    }

    /// Bit-identical to the per-position formulation, for long contexts (several 8-key groups per
    /// block, far-below-max scores) and odd lengths.
    #[test]
    fn blockwise_kernels_match_per_position_bitwise() {
        let (nh, nkv, hd, bs) = (9, 3, 64, 16);
        let layout = KvLayout { num_blocks: 64, num_kv_heads: nkv, block_size: bs, head_dim: hd };
        let (ctx, qlen) = (301usize, 21usize);
        let table: Vec<u32> = (0..ctx.div_ceil(bs) as u32).map(|b| (b * 7) % 64).collect();
        let mut k = rand_vec(ctx * nkv * hd, 1);
        k.iter_mut().for_each(|x| *x *= 6.0); // spread the scores far below the max as well
        let v = rand_vec(ctx * nkv * hd, 2);
        let q = rand_vec(qlen * nh * hd, 3);
        let mut k_cache = vec![0f32; layout.layer_len()];
        let mut v_cache = vec![0f32; layout.layer_len()];
        let slots: Vec<usize> = (0..ctx).map(|p| table[p / bs] as usize * bs + p % bs).collect();
        write_kv(&layout, &k, &v, &slots, &mut k_cache, &mut v_cache);
        let span = SeqSpan { query_start: 0, query_len: qlen, context_len: ctx, block_table: &table };
        let mut got = vec![f32::NAN; q.len()];
        paged_attention(&layout, &q, nh, &k_cache, &v_cache, &[span], 2.0, &mut got);
        let mut want = vec![f32::NAN; q.len()];
        per_position(&layout, &q, nh, &k_cache, &v_cache, &span, 2.0, &mut want);
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn mixed_batch_matches_dense_reference() {
        let (nh, nkv, hd, bs) = (6, 2, 16, 4);
        let layout = KvLayout { num_blocks: 40, num_kv_heads: nkv, block_size: bs, head_dim: hd };
        let mut k_cache = vec![f32::NAN; layout.layer_len()];
        let mut v_cache = vec![f32::NAN; layout.layer_len()];
        // (context_len, query_len): a decode, a chunked prefill with a cached prefix, a full prefill.
        let shapes = [(9usize, 1usize), (13, 5), (7, 7)];
        let tables: Vec<Vec<u32>> = vec![vec![3, 17, 5], vec![20, 2, 9, 11], vec![30, 31]];
        let mut q_all = Vec::new();
        let mut refs = Vec::new();
        let mut spans = Vec::new();
        let mut row = 0;
        for (si, &(ctx, qlen)) in shapes.iter().enumerate() {
            let k = rand_vec(ctx * nkv * hd, 10 + si as u64);
            let v = rand_vec(ctx * nkv * hd, 20 + si as u64);
            let q = rand_vec(qlen * nh * hd, 30 + si as u64);
            let slots: Vec<usize> = (0..ctx).map(|p| tables[si][p / bs] as usize * bs + p % bs).collect();
            write_kv(&layout, &k, &v, &slots, &mut k_cache, &mut v_cache);
            refs.push(reference(&q, &k, &v, nh, nkv, hd, ctx, qlen, 0.25));
            q_all.extend_from_slice(&q);
            spans.push((row, qlen, ctx));
            row += qlen;
        }
        for (si, &(qs, ql, ctx)) in spans.iter().enumerate() {
            let _ = (qs, ql, ctx, si);
        }
        let seqs: Vec<SeqSpan> = spans
            .iter()
            .enumerate()
            .map(|(si, &(query_start, query_len, context_len))| SeqSpan {
                query_start,
                query_len,
                context_len,
                block_table: &tables[si],
            })
            .collect();
        let mut out = vec![f32::NAN; q_all.len()];
        paged_attention(&layout, &q_all, nh, &k_cache, &v_cache, &seqs, 0.25, &mut out);
        let mut row = 0;
        for r in &refs {
            for (i, want) in r.iter().enumerate() {
                let got = out[row * nh * hd + i] as f64;
                assert!((got - want).abs() < 1e-5, "mismatch {got} vs {want}");
            }
            row += r.len() / (nh * hd);
        }
    }

    /// `x` as a cache of `T` holds it, read back as f32.
    fn rounded<T: KvElement>(x: &[f32]) -> Vec<f32> {
        let mut cache = T::zeroed(x.len());
        T::store(x, &mut cache);
        cache.iter().map(|e| e.load()).collect()
    }

    /// A 16-bit cache over a mixed batch (decodes, a chunked prefill over a cached prefix, a full
    /// prefill), GQA with four query heads per KV head, head_dim 64 (the 64-column and 8-key SIMD
    /// paths) and several blocks per sequence: within f32 rounding of an f64 reference computed on the
    /// values the cache really holds, and bit for bit the f32 cache's result over those values.
    fn check_mixed_batch_16bit<T: KvElement>() {
        let (nh, nkv, hd, bs) = (8, 2, 64, 8);
        let layout = KvLayout { num_blocks: 48, num_kv_heads: nkv, block_size: bs, head_dim: hd };
        let mut k_cache = T::zeroed(layout.layer_len());
        let mut v_cache = T::zeroed(layout.layer_len());
        let mut k_wide = vec![0f32; layout.layer_len()];
        let mut v_wide = vec![0f32; layout.layer_len()];
        // (context_len, query_len)
        let shapes = [(37usize, 1usize), (50, 9), (21, 21), (70, 1)];
        let tables: Vec<Vec<u32>> = vec![
            vec![3, 17, 5, 40, 41],
            vec![20, 2, 9, 11, 44, 45, 46],
            vec![30, 31, 0],
            vec![6, 7, 8, 10, 12, 13, 14, 15, 16],
        ];
        let (mut q_all, mut refs, mut refs_exact, mut spans) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (si, &(ctx, qlen)) in shapes.iter().enumerate() {
            let mut k = rand_vec(ctx * nkv * hd, 40 + si as u64);
            k.iter_mut().for_each(|x| *x *= 3.0);
            let v = rand_vec(ctx * nkv * hd, 50 + si as u64);
            let q = rand_vec(qlen * nh * hd, 60 + si as u64);
            let slots: Vec<usize> = (0..ctx).map(|p| tables[si][p / bs] as usize * bs + p % bs).collect();
            write_kv(&layout, &k, &v, &slots, &mut k_cache, &mut v_cache);
            refs_exact.push(reference(&q, &k, &v, nh, nkv, hd, ctx, qlen, 0.125));
            // The reference sees what the cache holds: K/V rounded to T.
            let (k, v) = (rounded::<T>(&k), rounded::<T>(&v));
            write_kv(&layout, &k, &v, &slots, &mut k_wide, &mut v_wide);
            refs.push(reference(&q, &k, &v, nh, nkv, hd, ctx, qlen, 0.125));
            spans.push(SeqSpan {
                query_start: q_all.len() / (nh * hd),
                query_len: qlen,
                context_len: ctx,
                block_table: &tables[si],
            });
            q_all.extend_from_slice(&q);
        }
        let mut out = vec![f32::NAN; q_all.len()];
        paged_attention(&layout, &q_all, nh, &k_cache, &v_cache, &spans, 0.125, &mut out);
        // The f32 arithmetic's own error is ~2.5e-7 here; rounding K/V to 16 bits moves the outputs by
        // ~5e-4 (f16) and ~3e-3 (bf16), so the bound holds only against the values the cache holds.
        let max_err = |want: Vec<f64>| out.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
        let (on_rounded, on_unrounded) = (max_err(refs.concat()), max_err(refs_exact.concat()));
        assert!(on_rounded < 2e-6, "{:?}: max error {on_rounded}", T::DTYPE);
        assert!(on_unrounded > 1e-4, "{:?}: the test should see the rounding ({on_unrounded})", T::DTYPE);
        let mut wide_out = vec![f32::NAN; q_all.len()];
        paged_attention(&layout, &q_all, nh, &k_wide, &v_wide, &spans, 0.125, &mut wide_out);
        assert!(out.iter().zip(&wide_out).all(|(a, b)| a.to_bits() == b.to_bits()), "{:?} vs f32", T::DTYPE);
    }

    #[test]
    fn f16_cache_mixed_batch_matches_reference_on_rounded_values() {
        check_mixed_batch_16bit::<f16>();
    }

    #[test]
    fn bf16_cache_mixed_batch_matches_reference_on_rounded_values() {
        check_mixed_batch_16bit::<bf16>();
    }

    /// `write_kv` into a 16-bit cache: every token lands in its slot, rounded to nearest (ties to
    /// even, within half a unit in the last place), and the rest of the cache stays zero.
    /// `mantissa_bits`: the format's explicit mantissa bits (10 for f16, 7 for bf16).
    fn check_write_kv_round_trip<T: KvElement>(mantissa_bits: i32) {
        let (nkv, hd, bs) = (3, 8, 4);
        let layout = KvLayout { num_blocks: 6, num_kv_heads: nkv, block_size: bs, head_dim: hd };
        let ulp1 = 2f32.powi(-mantissa_bits); // one unit in the last place at 1.0
        let mut k = rand_vec(5 * nkv * hd, 70);
        let v = rand_vec(5 * nkv * hd, 71);
        // Exact values and ties: 1 + ulp/2 rounds down to 1 (even), 1 + 3 ulp/2 up to 1 + 2 ulp (even).
        k[..6].copy_from_slice(&[0.5, -2.0, 3.0, 1.0 + ulp1 / 2.0, 1.0 + 1.5 * ulp1, -(1.0 + 1.5 * ulp1)]);
        let slots = [5usize, 6, 22, 0, 13];
        let mut k_cache = T::zeroed(layout.layer_len());
        let mut v_cache = T::zeroed(layout.layer_len());
        write_kv(&layout, &k, &v, &slots, &mut k_cache, &mut v_cache);
        let got = |c: &[T], i: usize| c[i].load();
        assert_eq!(
            (0..6).map(|i| got(&k_cache, layout.offset(1, 0, 1) + i)).collect::<Vec<_>>(),
            [0.5, -2.0, 3.0, 1.0, 1.0 + 2.0 * ulp1, -(1.0 + 2.0 * ulp1)],
            "{:?}: exact values and ties to even",
            T::DTYPE
        );
        let mut written = vec![false; layout.layer_len()];
        for (t, &slot) in slots.iter().enumerate() {
            for h in 0..nkv {
                let at = layout.offset(slot / bs, h, slot % bs);
                for i in 0..hd {
                    written[at + i] = true;
                    for (cache, src) in [(&k_cache, &k), (&v_cache, &v)] {
                        let (x, y) = (src[(t * nkv + h) * hd + i], got(cache, at + i));
                        // Half an ulp of x's binade, at most (f16 has a fixed step below 2^-14).
                        let binade = (x.abs().log2().floor() as i32).max(-14);
                        let half_ulp = 2f32.powi(binade - mantissa_bits - 1);
                        assert!((x - y).abs() <= half_ulp, "{:?}: {x} stored as {y}", T::DTYPE);
                    }
                }
            }
        }
        for (i, w) in written.iter().enumerate() {
            if !w {
                assert_eq!(got(&k_cache, i).to_bits(), 0);
                assert_eq!(got(&v_cache, i).to_bits(), 0);
            }
        }
    }

    #[test]
    fn write_kv_round_trips_f16() {
        check_write_kv_round_trip::<f16>(10);
    }

    #[test]
    fn write_kv_round_trips_bf16() {
        check_write_kv_round_trip::<bf16>(7);
    }

    /// The row conversion (F16C where present) rounds exactly as the scalar `f16::from_f32`, also for
    /// ties, subnormals, overflow and odd row lengths.
    #[test]
    fn f16_store_matches_scalar_rounding() {
        let mut src: Vec<f32> = (0..4099).map(|i| (i as f32 - 2049.0) * 0.37).collect();
        src.extend((0..40).map(|i| (1.0 + (2 * i + 1) as f32 * 2f32.powi(-11)) * if i % 2 == 0 { 1.0 } else { -1.0 }));
        src.extend([6e-8, 3e-8, 1e-5, 65504.0, 65520.0, 7e4, -1e9, f32::INFINITY, 0.0, -0.0]);
        for len in [src.len(), 13, 7] {
            let mut dst = f16::zeroed(len);
            f16::store(&src[..len], &mut dst);
            for (d, s) in dst.iter().zip(&src) {
                assert_eq!(d.to_bits(), f16::from_f32(*s).to_bits(), "{s}");
            }
        }
    }

    #[test]
    fn write_kv_f32_stores_exactly() {
        let layout = KvLayout { num_blocks: 2, num_kv_heads: 1, block_size: 2, head_dim: 4 };
        let k = rand_vec(8, 80);
        let v = rand_vec(8, 81);
        let mut k_cache = f32::zeroed(layout.layer_len());
        let mut v_cache = f32::zeroed(layout.layer_len());
        write_kv(&layout, &k, &v, &[3, 0], &mut k_cache, &mut v_cache);
        assert_eq!(&k_cache[12..16], &k[..4]);
        assert_eq!(&v_cache[..4], &v[4..]);
    }
}
