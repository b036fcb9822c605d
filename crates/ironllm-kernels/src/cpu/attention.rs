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

use std::cell::RefCell;

use rayon::prelude::*;

use super::simd;

/// Geometry of one layer's paged cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_blocks: usize,
    pub num_kv_heads: usize,
    pub block_size: usize,
    pub head_dim: usize,
}

impl KvLayout {
    /// Floats in one layer's K (or V) cache.
    pub fn layer_len(&self) -> usize {
        self.num_blocks * self.num_kv_heads * self.block_size * self.head_dim
    }

    #[inline]
    fn offset(&self, block: usize, kv_head: usize, slot_in_block: usize) -> usize {
        ((block * self.num_kv_heads + kv_head) * self.block_size + slot_in_block) * self.head_dim
    }
}

/// Writes each token's K and V (`[tokens, num_kv_heads * head_dim]`) into its cache slot
/// (`slot = block_id * block_size + offset`).
pub fn write_kv(layout: &KvLayout, k: &[f32], v: &[f32], slots: &[usize], k_cache: &mut [f32], v_cache: &mut [f32]) {
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
            k_cache[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
            v_cache[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
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

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint rows/heads of the output buffer, which outlives the parallel scope.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Taking `self` makes closures capture the whole (Send) wrapper, not the raw pointer field.
    fn get(self) -> *mut f32 {
        self.0
    }
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
/// result is independent of the batch, the task split and the thread count.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    layout: &KvLayout,
    q: &[f32],
    num_heads: usize,
    k_cache: &[f32],
    v_cache: &[f32],
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
    let out_ptr = OutPtr(out.as_mut_ptr());
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

/// Attention of query rows `ts` of sequence `s` for the query heads of KV head `kvh`.
///
/// # Safety
/// The caller guarantees that no other thread writes these rows' heads of `out` concurrently and
/// that `out` holds `rows * num_heads * head_dim` floats.
#[allow(clippy::too_many_arguments)]
unsafe fn attend_group(
    layout: &KvLayout,
    q: &[f32],
    num_heads: usize,
    k_cache: &[f32],
    v_cache: &[f32],
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
            for (b, &block) in s.block_table[..visible.div_ceil(bs)].iter().enumerate() {
                let n = bs.min(visible - b * bs);
                let off = layout.offset(block as usize, kvh, 0);
                simd::dot_rows(qv, &k_cache[off..off + n * hd], scale, &mut scores[b * bs..b * bs + n]);
            }
            let scores = &mut scores[..visible];
            // A maximum is exact in any grouping, so the SIMD one equals the sequential fold (a zero
            // maximum's sign aside, which no `exp(s - max)` below can see).
            let max = simd::max(scores);
            simd::exp_shifted_in_place(scores, max);
            let mut sum = 0f32;
            for sc in scores.iter() {
                sum += *sc;
            }
            acc.fill(0.0);
            for (b, &block) in s.block_table[..visible.div_ceil(bs)].iter().enumerate() {
                let n = bs.min(visible - b * bs);
                let off = layout.offset(block as usize, kvh, 0);
                simd::axpy_rows(&scores[b * bs..b * bs + n], &v_cache[off..off + n * hd], acc);
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
                    *x = (*x - max).exp();
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
}
