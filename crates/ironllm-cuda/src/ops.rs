//! Safe launchers for the kernels in `kernels/*.cu` and the GEMMs. Each checks the sizes it is given
//! against the buffers before launching (a kernel reading past a buffer is a crash, not an error), picks
//! the kernel by dtype suffix, and returns driver failures as [`CudaError`] with the kernel's name.
//!
//! Launch shapes are the ones documented at the top of each kernel.

use std::borrow::Cow;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use crate::device::Gpu;
use crate::error::{CudaError, DriverContext};
use crate::launch::KernelArgs;
use crate::lt_gemm::Output;
use crate::tensor::{DevBuf, GpuDType};

fn need(buf: &DevBuf, elems: usize, what: &str) -> Result<(), CudaError> {
    if buf.len < elems {
        return Err(CudaError::Invalid(format!("{what}: buffer of {} elements, need {elems}", buf.len)));
    }
    Ok(())
}

fn need_slice<T>(buf: &CudaSlice<T>, elems: usize, what: &str) -> Result<(), CudaError> {
    if buf.len() < elems {
        return Err(CudaError::Invalid(format!("{what}: buffer of {} elements, need {elems}", buf.len())));
    }
    Ok(())
}

pub(crate) fn same_dtype(bufs: &[&DevBuf], what: &str) -> Result<GpuDType, CudaError> {
    let d = bufs[0].dtype;
    if bufs.iter().any(|b| b.dtype != d) {
        return Err(CudaError::Invalid(format!("{what}: operands of different dtypes")));
    }
    Ok(d)
}

fn cfg(grid: (u32, u32, u32), block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: smem }
}

pub(crate) fn i32_of(n: usize, what: &str) -> Result<i32, CudaError> {
    i32::try_from(n).map_err(|_| CudaError::Invalid(format!("{what} = {n} does not fit in 32 bits")))
}

/// `out[t, :] = table[ids[t], :]`.
pub fn embedding(
    gpu: &Gpu,
    out: &mut DevBuf,
    table: &DevBuf,
    ids: &CudaSlice<u32>,
    t: usize,
    h: usize,
) -> Result<(), CudaError> {
    // Ids come from the engine, which validated them against the vocabulary.
    copy_rows(gpu, "embedding", out, table, ids, t, h)
}

/// `out[i, :] = src[index[i], :]` for `n` rows of `hidden` through `kernel`_T (the embedding lookup and
/// the logits rows' gather share this shape; only the index type differs).
fn copy_rows<I>(
    gpu: &Gpu,
    kernel: &str,
    out: &mut DevBuf,
    src: &DevBuf,
    index: &CudaSlice<I>,
    n: usize,
    hidden: usize,
) -> Result<(), CudaError> {
    let d = same_dtype(&[out, src], kernel)?;
    need(out, n * hidden, kernel)?;
    need_slice(index, n, kernel)?;
    if n == 0 {
        return Ok(());
    }
    let name = format!("{kernel}_{}", d.suffix());
    let f = gpu.function(&name)?;
    let (ni, hi) = (i32_of(n, "rows")?, i32_of(hidden, "hidden")?);
    // SAFETY: sizes checked above; every index names a row of `src` (vocabulary ids validated by the
    // engine, logits rows < the batch's tokens by the runner).
    unsafe {
        KernelArgs::new(gpu)
            .buf(&out.data)
            .buf(&src.data)
            .buf(index)
            .i32(ni)
            .i32(hi)
            .launch(f, cfg((n as u32, 1, 1), 256, 0))
    }
    .at(|| name)?;
    Ok(())
}

/// `out = rms_norm(x) * w` over rows of `hidden`.
pub fn rms_norm(
    gpu: &Gpu,
    out: &mut DevBuf,
    x: &DevBuf,
    w: &DevBuf,
    rows: usize,
    hidden: usize,
    eps: f32,
) -> Result<(), CudaError> {
    let d = same_dtype(&[out, x, w], "rms_norm")?;
    need(out, rows * hidden, "rms_norm out")?;
    need(x, rows * hidden, "rms_norm x")?;
    need(w, hidden, "rms_norm weight")?;
    if rows == 0 {
        return Ok(());
    }
    let name = format!("rms_norm_{}", d.suffix());
    let f = gpu.function(&name)?;
    let (ri, hi) = (i32_of(rows, "rows")?, i32_of(hidden, "hidden")?);
    // SAFETY: sizes checked above.
    unsafe {
        KernelArgs::new(gpu)
            .buf(&out.data)
            .buf(&x.data)
            .buf(&w.data)
            .i32(ri)
            .i32(hi)
            .f32(eps)
            .launch(f, cfg((rows as u32, 1, 1), 256, 0))
    }
    .at(|| name)?;
    Ok(())
}

/// `residual += x; out = rms_norm(residual) * w`.
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm(
    gpu: &Gpu,
    residual: &mut DevBuf,
    x: &DevBuf,
    w: &DevBuf,
    out: &mut DevBuf,
    rows: usize,
    hidden: usize,
    eps: f32,
) -> Result<(), CudaError> {
    let d = same_dtype(&[residual, x, w, out], "add_rms_norm")?;
    need(residual, rows * hidden, "add_rms_norm residual")?;
    need(x, rows * hidden, "add_rms_norm x")?;
    need(out, rows * hidden, "add_rms_norm out")?;
    need(w, hidden, "add_rms_norm weight")?;
    if rows == 0 {
        return Ok(());
    }
    let name = format!("add_rms_norm_{}", d.suffix());
    let f = gpu.function(&name)?;
    let (ri, hi) = (i32_of(rows, "rows")?, i32_of(hidden, "hidden")?);
    // SAFETY: sizes checked above; residual and out are distinct buffers (two &mut).
    unsafe {
        KernelArgs::new(gpu)
            .buf(&residual.data)
            .buf(&x.data)
            .buf(&w.data)
            .buf(&out.data)
            .i32(ri)
            .i32(hi)
            .f32(eps)
            .launch(f, cfg((rows as u32, 1, 1), 256, 0))
    }
    .at(|| name)?;
    Ok(())
}

/// Geometry of the attention part of a layer.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub num_blocks: usize,
}

impl AttnShape {
    pub fn qkv_width(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }
    pub fn cache_len(&self) -> usize {
        self.num_blocks * self.num_kv_heads * self.block_size * self.head_dim
    }
}

/// The per-step batch metadata on the device.
pub struct BatchMeta<'a> {
    pub num_tokens: usize,
    pub num_seqs: usize,
    /// [num_tokens]
    pub positions: &'a CudaSlice<i32>,
    /// [num_tokens]
    pub slot_mapping: &'a CudaSlice<i64>,
    /// [num_seqs * max_blocks_per_seq]
    pub block_tables: &'a CudaSlice<i32>,
    pub max_blocks_per_seq: usize,
    /// [num_seqs + 1]
    pub query_start_loc: &'a CudaSlice<i32>,
    /// [num_seqs]
    pub context_lens: &'a CudaSlice<i32>,
    /// [num_tokens]
    pub token_to_seq: &'a CudaSlice<i32>,
    /// Leading tokens that belong to single-token (decode) sequences; the rest are prefill rows.
    pub num_decode_tokens: usize,
    /// [num_tiles * 2] (sequence, first query token) per prefill tile of `FLASH_BLOCK_M` tokens.
    pub prefill_tiles: &'a CudaSlice<i32>,
    pub num_prefill_tiles: usize,
    /// An upper bound of every sequence's context length this step (`max_model_len` for a captured
    /// graph, which must serve any context); it caps the split-KV factor.
    pub max_context_len: usize,
    /// The decode attention's share count and kernel form when the caller chose them (a decode graph
    /// captured for a range of contexts, see [`graph_plans`]); `None`: the model's rule picks them from
    /// `max_context_len`.
    pub decode_plan: Option<DecodePlan>,
}

/// How a step's decode rows run their attention: the split-KV share count, and whether the deep form of
/// the tensor-core kernel (3 key-tile stages, 2 CTAs per SM; head size 128) serves them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePlan {
    pub splits: usize,
    pub deep: bool,
}

impl DecodePlan {
    /// `splits` shares on the plain form.
    pub const fn plain(splits: usize) -> DecodePlan {
        DecodePlan { splits, deep: false }
    }
}

impl std::fmt::Display for DecodePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} shares{}", self.splits, if self.deep { ", deep form" } else { "" })
    }
}

/// Split-KV scratch of the decode rows (see `attention.cu`): the split count and the per-split outputs
/// and log2-sum-exps.
pub struct DecodeSplit<'a> {
    pub num_splits: usize,
    /// The deep form of the tensor-core kernel (where the model has it; see [`DecodePlan`]).
    pub deep: bool,
    /// Fewest keys of a non-empty share ([`DECODE_SPLIT_MIN_KEYS`] unless measuring): a row shorter than
    /// `num_splits` such shares leaves the last shares empty.
    pub min_keys: usize,
    pub part_o: &'a mut CudaSlice<f32>,
    pub part_lse: &'a mut CudaSlice<f32>,
}

/// Most splits of one row's keys the scratch and the reduce kernel allow.
pub const MAX_DECODE_SPLITS: usize = 32;
/// The split cap used unless `IRONLLM_MAX_DECODE_SPLITS` names another.
pub const DEFAULT_MAX_DECODE_SPLITS: usize = 16;
/// Fewest keys worth a split of their own, on the host (the split count of an eager step, from its
/// longest context) and in the kernels (a row's share size, from its own context; `min_split_keys`), so
/// a decode graph captured for the longest context still gives a short row shares of two 64-key tiles.
/// Measured on an H100 (batch 1, 8B shape, graphs captured for 8k, before the kernels took a minimum):
/// at ~1.1k context 8 shares of ~136 keys beat 16 of ~68 (5.79 vs 5.84 ms a step) and 32 of ~34 (5.99);
/// at ~4.1k, 16 shares of ~260 beat 8 of ~520 (6.02 vs 6.17 ms). The cost of a share is its blocks
/// and its part of the merge; below ~2 tiles that outweighs the parallelism.
pub const DECODE_SPLIT_MIN_KEYS: usize = 128;

/// Most resident split-kernel CTAs per SM the split rule counts on (and the scratch is sized for).
pub const DECODE_SPLIT_MAX_RESIDENT: usize = 8;
/// CTAs per SM the split rule aimed for before 2026-11-28 (`IRONLLM_DECODE_SPLIT_FILL` brings that rule
/// back for side-by-side runs).
pub const OLD_SPLIT_BLOCKS_PER_SM: usize = 4;

/// Fixed cost of one split-kernel CTA in the cost model of [`SplitRule::Cost`], in the time the CTA takes
/// per key (its launch, the query's load, the share's tail and its partial output).
pub const SPLIT_CTA_FIXED_KEYS: usize = 273;
/// Cost of the merge kernel that a step with shares adds, in the same unit.
pub const SPLIT_MERGE_KEYS: usize = 110;
/// A key-time of the deep form against the plain form's, in percent: with two tiles in flight a CTA
/// streams its keys faster, in waves of two CTAs per SM instead of three. Fitted on an H200 (2026-11-28,
/// 8B shape): GPU-only replays of batches 1-128 with 1-4 shares forced on both forms at contexts 1024 and
/// 4096 (`bench/results/gpu-2026-11-28-h200-session20/6`); with 76 (and the plain form's constants) the
/// model's pick over both forms is the measured best, or within 0.5% of it, at all 30 points (the test
/// holds it to these runs, in-sample). The fit is narrow: with 75 batch 56 at 4096 takes the deep form at
/// 3.9% above the best, with 78 batches 32 and 64 at 4096 the plain one at 1.2-2.0% above.
pub const DEEP_KEY_PERCENT: usize = 76;

/// The modelled time of the decode attention with `splits` shares, in key-times of one CTA: the waves of
/// (pair, share) CTAs, each as long as its share's keys plus [`SPLIT_CTA_FIXED_KEYS`], plus
/// [`SPLIT_MERGE_KEYS`] where there are shares. A row shorter than `splits` shares of
/// [`DECODE_SPLIT_MIN_KEYS`] fills fewer of them (the kernels' `min_split_keys`), so a graph captured with
/// many shares costs what fewer would at a short context; the empty shares' CTAs return at once.
/// Fitted by hand on an H200 (2026-11-28, 8B shape, hd128 kernel, 3 CTAs per SM, a wave of 396): GPU-only
/// decode graph replays of batches 1-128 with 1-4 shares forced at contexts 1024 and 4096
/// (`bench/results/gpu-2026-11-28-h200-session18/1/split`); it picks the measured best, or a count within
/// 0.5% of it, at all 30 points (see the test: in-sample, the constants were fitted to these runs), where
/// the earlier [`SplitRule::Wave`] missed 5 at context 4096 by 1.6-8.1%.
pub fn split_cost(pairs: usize, keys: usize, splits: usize, wave: usize) -> usize {
    let used = splits.min(keys.div_ceil(DECODE_SPLIT_MIN_KEYS)).max(1);
    let waves = (pairs * used).div_ceil(wave.max(1));
    waves * (keys.div_ceil(used) + SPLIT_CTA_FIXED_KEYS) + if splits > 1 { SPLIT_MERGE_KEYS } else { 0 }
}

/// The modelled time of `plan`, in hundredths of the plain form's key-time: [`split_cost`] for the plain
/// form (a wave of `wave` CTAs); for the deep form the same waves of `deep_wave` CTAs at
/// [`DEEP_KEY_PERCENT`], its merge unchanged.
pub fn plan_cost(pairs: usize, keys: usize, plan: DecodePlan, wave: usize, deep_wave: usize) -> usize {
    let cost = split_cost(pairs, keys, plan.splits, if plan.deep { deep_wave } else { wave });
    if !plan.deep {
        return 100 * cost;
    }
    let merge = if plan.splits > 1 { SPLIT_MERGE_KEYS } else { 0 };
    DEEP_KEY_PERCENT * (cost - merge) + 100 * merge
}

/// The decode attention's plan for `num_decode_tokens` rows: with [`SplitRule::Cost`] and a deep form
/// (`deep_wave > 0`), the form and share count of least [`plan_cost`] at the longest context (the plain
/// form on ties); otherwise [`decode_splits`]' count on the plain form.
pub fn decode_plan(
    num_decode_tokens: usize,
    num_kv_heads: usize,
    rule: SplitRule,
    max_context_len: usize,
    max_splits: usize,
) -> DecodePlan {
    let plain = DecodePlan::plain(decode_splits(num_decode_tokens, num_kv_heads, rule, max_context_len, max_splits));
    let pairs = num_decode_tokens * num_kv_heads;
    let SplitRule::Cost { wave, ctas, deep_wave } = rule else { return plain };
    if pairs == 0 || deep_wave == 0 {
        return plain;
    }
    let most = split_cap(max_splits, max_context_len);
    let top = most.min(ctas / pairs).max(1);
    let cost = |p: &DecodePlan| (plan_cost(pairs, max_context_len, *p, wave, deep_wave), p.deep, p.splits);
    let deep = (1..=top).map(|splits| DecodePlan { splits, deep: true }).min_by_key(cost);
    deep.filter(|d| cost(d) < cost(&plain)).unwrap_or(plain)
}

/// How many shares the decode rows' keys are split into. With [`SplitRule::Cost`] (the default): the
/// count of least [`split_cost`] at the longest context, among those the scratch holds. With
/// [`SplitRule::Wave`] (the rule before 2026-11-28 14:00, `IRONLLM_DECODE_SPLIT_RULE=wave`): as many as
/// keep the (token, kv head, share) CTAs within one wave of the split kernel; none when the
/// (token, kv head) pairs alone fill more than half a wave; two when they fill one wave and less than a
/// third of a second (so the CTAs make two nearly full waves instead of one and a sliver); never more
/// than the longest context can use or `max_splits` (at most [`MAX_DECODE_SPLITS`]).
/// Why: a partly filled wave costs about as much as a full one, and each share costs its merge. Measured
/// on an H200 (2026-11-28, 8B shape, GPU-only decode graph replays at context 1024; the hd128 kernel has
/// 3 CTAs per SM, a wave of 396): batch 24 (192 pairs) takes 5.50 ms with 2 shares (384 CTAs), 5.77 with 3
/// (576) and 5.67 with none; batch 32 (256 pairs) 5.98 ms with none, 6.24 with 2 (512 CTAs), 6.05 with 3;
/// batch 40 / 48 6.00 / 6.20 ms with none, 6.26 / 6.48 with 2; batch 8 and 16 4.95 / 5.23 ms with 6 and 3
/// shares (one wave), 5.07 / 5.47 with 8 and 5; batch 56 / 64 (448 / 512 pairs) 7.26 / 7.28 ms with 2
/// shares, 7.45 / 7.45 with none. At context 4096 the same rule missed the best count by 1.6-8.1% at batches
/// 32, 56, 64, 80 and 112 (batch 32: 9.93 ms with none, 9.12 with 3), which the cost model gets right.
pub fn decode_splits(
    num_decode_tokens: usize,
    num_kv_heads: usize,
    rule: SplitRule,
    max_context_len: usize,
    max_splits: usize,
) -> usize {
    let pairs = num_decode_tokens * num_kv_heads;
    let most = split_cap(max_splits, max_context_len);
    let want = match rule {
        _ if pairs == 0 => 1,
        SplitRule::Cost { wave, ctas, .. } => (1..=most.min(ctas / pairs).max(1))
            .min_by_key(|&s| (split_cost(pairs, max_context_len, s, wave), s))
            .unwrap_or(1),
        SplitRule::Wave(wave) if 2 * pairs <= wave => wave / pairs,
        SplitRule::Wave(wave) if pairs > wave && 3 * pairs < 4 * wave => 2,
        SplitRule::Wave(_) => 1,
        SplitRule::Fill(target) if pairs < target => target.div_ceil(pairs),
        SplitRule::Fill(_) => 1,
        SplitRule::Fixed { splits, ctas } => splits.min(ctas / pairs),
    };
    want.min(most).max(1)
}

/// Most shares a row of `max_context_len` keys can use: `max_splits`, at most [`MAX_DECODE_SPLITS`], and
/// no more than shares of [`DECODE_SPLIT_MIN_KEYS`] fill.
fn split_cap(max_splits: usize, max_context_len: usize) -> usize {
    max_splits.min(MAX_DECODE_SPLITS).min(max_context_len.div_ceil(DECODE_SPLIT_MIN_KEYS))
}

/// How [`decode_splits`] chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitRule {
    /// Least [`split_cost`] for a wave of `wave` CTAs ([`decode_split_wave`]), at most `ctas` CTAs
    /// ([`decode_split_ctas`]: the scratch); with a deep form of the kernel (`deep_wave` CTAs a wave, 0
    /// without one), least [`plan_cost`] over both forms ([`decode_plan`]). The default.
    Cost { wave: usize, ctas: usize, deep_wave: usize },
    /// Within one wave of this many CTAs ([`decode_split_wave`]; `IRONLLM_DECODE_SPLIT_RULE=wave`).
    Wave(usize),
    /// The rule before 2026-11-28: enough shares for this many CTAs, rounded up, when the pairs alone give
    /// fewer (`IRONLLM_DECODE_SPLIT_FILL=N`: N CTAs per SM, at most [`OLD_SPLIT_BLOCKS_PER_SM`]).
    Fill(usize),
    /// `splits` shares wherever the pairs times them stay within `ctas` ([`decode_split_ctas`]: the
    /// scratch), fewer elsewhere (`IRONLLM_DECODE_SPLITS=N`, for side-by-side measurements of the rule).
    Fixed { splits: usize, ctas: usize },
}

/// Plans (share count and form) to capture decode graphs of `num_decode_tokens` rows with, for contexts
/// up to `max_context_len`: first the rule's plan at the longest context, then, walking the contexts up
/// from the shortest, the rule's plan wherever it beats every plan kept so far by at least
/// [`GRAPH_SPLIT_MIN_GAIN`] of the modelled cost (so a plan that serves short contexts almost as well as
/// their own costs no graph). Only [`SplitRule::Cost`] depends on the context this way; the other rules
/// get one graph, of their count at the longest context. A replay picks among them with
/// [`graph_plan_choice`].
pub fn graph_plans(
    num_decode_tokens: usize,
    num_kv_heads: usize,
    rule: SplitRule,
    max_context_len: usize,
    max_splits: usize,
) -> Vec<DecodePlan> {
    let top = decode_plan(num_decode_tokens, num_kv_heads, rule, max_context_len, max_splits);
    let SplitRule::Cost { wave, deep_wave, ctas } = rule else { return vec![top] };
    let pairs = num_decode_tokens * num_kv_heads;
    let cap = max_splits.min(MAX_DECODE_SPLITS).min(ctas / pairs.max(1)).max(1);
    let cost = |p: DecodePlan, keys: usize| plan_cost(pairs, keys, p, wave, deep_wave);
    let mut plans = vec![top];
    for keys in (GRAPH_SPLIT_SHORTEST_CONTEXT..max_context_len).step_by(GRAPH_SPLIT_CONTEXT_STEP) {
        let best = decode_plan(num_decode_tokens, num_kv_heads, rule, keys, max_splits);
        // Of the counts that cost the same here (a short row fills only so many shares), the most: it
        // also serves the longer contexts.
        let best = (best.splits..=cap)
            .rev()
            .map(|splits| DecodePlan { splits, ..best })
            .find(|&p| cost(p, keys) == cost(best, keys))
            .unwrap_or(best);
        let cost = cost(best, keys) as f64;
        let kept = plans.iter().map(|&p| plan_cost(pairs, keys, p, wave, deep_wave)).min().unwrap_or(usize::MAX);
        if cost < kept as f64 * (1.0 - GRAPH_SPLIT_MIN_GAIN) {
            plans.push(best);
        }
    }
    plans
}

/// Which of a batch's captured plans (`captured`, from [`graph_plans`]) a step whose longest context is
/// `context` replays: the least modelled cost (the first of equals). Rules other than [`SplitRule::Cost`]
/// capture one plan.
pub fn graph_plan_choice(pairs: usize, context: usize, rule: SplitRule, captured: &[DecodePlan]) -> usize {
    let SplitRule::Cost { wave, deep_wave, .. } = rule else { return 0 };
    (0..captured.len()).min_by_key(|&i| (plan_cost(pairs, context, captured[i], wave, deep_wave), i)).unwrap_or(0)
}

/// Contexts [`graph_plans`] walks in steps of this many keys, from [`GRAPH_SPLIT_SHORTEST_CONTEXT`].
const GRAPH_SPLIT_CONTEXT_STEP: usize = 64;
/// The shortest context that may get a graph of its own. Below it the attention is a small part of a
/// step, and the model's one clear preference there (no merge kernel under 128 keys) is not borne out:
/// at batch 1 the step without its merge kernel measured 0.02 ms slower, not faster (2026-11-28,
/// `IRONLLM_SKIP_OPS` on an H200).
const GRAPH_SPLIT_SHORTEST_CONTEXT: usize = 512;
/// Modelled gain a context must see from its own share count for a graph of its own (~the model's
/// error; a graph costs start-up time and a little memory).
pub const GRAPH_SPLIT_MIN_GAIN: f64 = 0.03;

/// Most (token, kv head, share) CTAs the split-KV scratch holds ([`decode_split_rows`] for one query head
/// per KV head).
pub fn decode_split_ctas(num_sms: usize) -> usize {
    decode_split_rows(num_sms, 1)
}

/// CTAs of the split kernel in one wave: `resident` per SM (the driver's occupancy figure), at most
/// [`DECODE_SPLIT_MAX_RESIDENT`], times the SMs.
pub fn decode_split_wave(num_sms: usize, resident: usize) -> usize {
    resident.clamp(1, DECODE_SPLIT_MAX_RESIDENT) * num_sms.max(1)
}

/// Rows (token x head x split) the split-KV scratch must hold for `group` query heads per KV head.
/// The (token, kv head, share) CTAs stay under 8/3 of a wave of at most [`DECODE_SPLIT_MAX_RESIDENT`] per SM
/// (two shares of under 4/3 of a wave) with [`SplitRule::Wave`], under twice its 4 per SM with
/// [`SplitRule::Fill`], within the scratch by construction with [`SplitRule::Cost`] and [`SplitRule::Fixed`].
pub fn decode_split_rows(num_sms: usize, group: usize) -> usize {
    3 * DECODE_SPLIT_MAX_RESIDENT * num_sms * group
}

/// Optional per-head q/k RMSNorm, then rotary embedding of q and k in place in `qkv`, then K and V
/// written into the layer's paged cache at `slot_mapping`.
#[allow(clippy::too_many_arguments)]
pub fn qk_norm_rope_kv(
    gpu: &Gpu,
    qkv: &mut DevBuf,
    k_cache: &mut DevBuf,
    v_cache: &mut DevBuf,
    cos: &CudaSlice<f32>,
    sin: &CudaSlice<f32>,
    qk_norm: Option<(&DevBuf, &DevBuf)>,
    shape: &AttnShape,
    meta: &BatchMeta<'_>,
    eps: f32,
) -> Result<(), CudaError> {
    let d = same_dtype(&[qkv, k_cache, v_cache], "qk_norm_rope_kv")?;
    let t = meta.num_tokens;
    need(qkv, t * shape.qkv_width(), "qkv")?;
    need(k_cache, shape.cache_len(), "k cache")?;
    need(v_cache, shape.cache_len(), "v cache")?;
    need_slice(meta.positions, t, "positions")?;
    need_slice(meta.slot_mapping, t, "slot mapping")?;
    if t == 0 {
        return Ok(());
    }
    let (ti, nh, nkv, hd, bs) = (
        i32_of(t, "tokens")?,
        i32_of(shape.num_heads, "heads")?,
        i32_of(shape.num_kv_heads, "kv heads")?,
        i32_of(shape.head_dim, "head_dim")?,
        i32_of(shape.block_size, "block_size")?,
    );
    let mut b = KernelArgs::new(gpu);
    b.buf(&qkv.data).buf(&k_cache.data).buf(&v_cache.data).buf(cos).buf(sin).buf(meta.positions).buf(meta.slot_mapping);
    let packed = if qk_norm.is_none() && rope_pack_enabled() { rope_kv_pack_threads(shape, d) } else { None };
    // Whole allocations are 256-byte aligned; checked anyway, since the packed kernel's 16-byte moves
    // depend on it and the per-warp kernel does not.
    let aligned = || {
        let stream = gpu.stream();
        [
            qkv.data.device_ptr(stream).0,
            k_cache.data.device_ptr(stream).0,
            v_cache.data.device_ptr(stream).0,
            cos.device_ptr(stream).0,
            sin.device_ptr(stream).0,
        ]
        .iter()
        .all(|p| p % 16 == 0)
    };
    if let Some(threads) = packed.filter(|_| aligned()) {
        let name = format!("rope_kv_pack_{}", d.suffix());
        let f = gpu.function(&name)?;
        b.i32(ti).i32(nh).i32(nkv).i32(hd).i32(bs);
        // SAFETY: as below; the buffers are 16-byte aligned and half a head is a whole number of 16-byte
        // packs, so each pack the kernel moves is 16-byte aligned.
        unsafe { b.launch(f, cfg((t as u32, 1, 1), threads, 0)) }.at(|| name)?;
        return Ok(());
    }
    let name = format!("qk_norm_rope_kv_{}", d.suffix());
    let f = gpu.function(&name)?;
    match qk_norm {
        Some((qn, kn)) => {
            need(qn, shape.head_dim, "q_norm")?;
            need(kn, shape.head_dim, "k_norm")?;
            b.buf(&qn.data).buf(&kn.data);
        }
        None => {
            b.null().null();
        }
    }
    b.i32(ti).i32(nh).i32(nkv).i32(hd).i32(bs).f32(eps);
    // SAFETY: sizes checked above; positions are < the rope table length (the runner checks positions
    // against max_model_len) and slots are inside the cache (block ids come from the block pool).
    unsafe { b.launch(f, cfg((t as u32, (shape.num_heads + shape.num_kv_heads).div_ceil(4) as u32, 1), 128, 0)) }
        .at(|| name)?;
    Ok(())
}

/// Threads of `rope_kv_pack_T`'s block (one block per token, one 16-byte pack per thread): `None` where
/// half a head is not a whole number of packs, which leaves the per-warp `qk_norm_rope_kv_T`.
pub fn rope_kv_pack_threads(shape: &AttnShape, d: GpuDType) -> Option<u32> {
    let pack = 16 / d.size();
    let half = shape.head_dim / 2;
    if !shape.head_dim.is_multiple_of(2) || half == 0 || !half.is_multiple_of(pack) {
        return None;
    }
    let items = (shape.num_heads + shape.num_kv_heads) * half / pack + shape.num_kv_heads * shape.head_dim / pack;
    Some(items.div_ceil(32).clamp(1, 32) as u32 * 32)
}

/// The packed RoPE kernel is on unless `IRONLLM_DISABLE_ROPE_PACK` is set (side-by-side measurements).
fn rope_pack_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("IRONLLM_DISABLE_ROPE_PACK").is_none())
}

/// Tokens per tile of the tensor-core prefill kernel.
pub const FLASH_BLOCK_M: usize = 64;

/// The tensor-core attention kernels resolved once at load for the model's dtype and head size: the
/// prefill kernel (on Hopper `flash_prefill_sm90.cu`'s `flash_prefill_wg2_*` for even GQA groups, else its
/// `flash_prefill_wg_*`; elsewhere `flash_prefill.cu`) and the grouped-query decode kernel
/// (`flash_decode.cu`, plain and split-KV). `None` where the kernel is missing or disabled; float32 has
/// neither.
#[derive(Debug, Clone, Default)]
pub struct AttnKernels {
    pub prefill: Option<String>,
    /// (plain, split) names.
    pub decode: Option<(String, String)>,
    /// (plain, split) names of the deep form (head size 128; `IRONLLM_DISABLE_DEEP_DECODE` leaves it out).
    pub decode_deep: Option<(String, String)>,
}

/// Most query heads per KV head the tensor-core decode kernel takes (the rows of one mma tile).
pub const FLASH_DECODE_MAX_GROUP: usize = 16;

impl AttnKernels {
    /// `IRONLLM_DISABLE_FLASH_PREFILL` / `IRONLLM_DISABLE_FLASH_DECODE` turn either off (A/B runs). The
    /// decode kernel is used only beside the prefill kernel: without it every row goes through the general
    /// kernel, whose results do not depend on the batch (float32's guarantee).
    pub fn resolve(gpu: &Gpu, d: GpuDType, head_dim: usize, group: usize) -> AttnKernels {
        if d == GpuDType::F32 || std::env::var_os("IRONLLM_DISABLE_FLASH_PREFILL").is_some() {
            return AttnKernels::default();
        }
        // The Hopper kernel (`flash_prefill_sm90.cu`, compiled only for sm_90a) where it exists, unless
        // IRONLLM_DISABLE_WGMMA_PREFILL asks for the mma.sync kernel (A/B runs).
        // Its two-heads-per-CTA form needs the heads of a CTA to share their KV head (an even group). The
        // first kernel the card loaded wins (one it could not grant the shared memory is missing).
        let suffix = d.suffix();
        let mut candidates = Vec::new();
        // IRONLLM_PREFILL_ONE_HEAD_PER_CTA keeps the one-head form for even groups too (A/B runs: two CTAs
        // per SM, so one CTA's start-up overlaps the other's tiles, against each K/V tile loaded once).
        if std::env::var_os("IRONLLM_DISABLE_WGMMA_PREFILL").is_none() {
            if group.is_multiple_of(2) && std::env::var_os("IRONLLM_PREFILL_ONE_HEAD_PER_CTA").is_none() {
                candidates.push(format!("flash_prefill_wg2_{suffix}_hd{head_dim}"));
            }
            candidates.push(format!("flash_prefill_wg_{suffix}_hd{head_dim}"));
        }
        candidates.push(format!("flash_prefill_{suffix}_hd{head_dim}"));
        let prefill = candidates.into_iter().find(|name| gpu.has_function(name));
        let plain = format!("flash_decode_{}_hd{head_dim}", d.suffix());
        let split = format!("flash_decode_split_{}_hd{head_dim}", d.suffix());
        let decode = (prefill.is_some()
            && (1..=FLASH_DECODE_MAX_GROUP).contains(&group)
            && gpu.has_function(&plain)
            && gpu.has_function(&split)
            && std::env::var_os("IRONLLM_DISABLE_FLASH_DECODE").is_none())
        .then_some((plain, split));
        let deep_plain = format!("flash_decode_deep_{}_hd{head_dim}", d.suffix());
        let deep_split = format!("flash_decode_split_deep_{}_hd{head_dim}", d.suffix());
        let decode_deep = (decode.is_some()
            && gpu.has_function(&deep_plain)
            && gpu.has_function(&deep_split)
            && std::env::var_os("IRONLLM_DISABLE_DEEP_DECODE").is_none())
        .then_some((deep_plain, deep_split));
        AttnKernels { prefill, decode, decode_deep }
    }
}

/// Dynamic shared memory of the tensor-core decode kernel for `head_dim` (`FD_SMEM_BYTES` in
/// `flash_decode.cu`: key-tile stages of K and V, 64 rows each, plus the 16-row Q tile), of its deep form
/// (3 stages, head size 128) when `deep`.
pub fn flash_decode_smem(head_dim: usize, deep: bool) -> usize {
    let stages = match (head_dim, deep) {
        (_, true) => 3,
        (64, false) => 3,
        _ => crate::compile::stage_knob().unwrap_or(2),
    };
    stages * 2 * 64 * head_dim * 2 + 16 * head_dim * 2
}

/// Query heads per CTA of a prefill kernel, by name: the Hopper kernel's `wg2` form takes two heads of
/// one KV head (256 threads), every other form one (128 threads).
pub fn prefill_heads_per_cta(kernel: &str) -> usize {
    if kernel.starts_with("flash_prefill_wg2_") {
        2
    } else {
        1
    }
}

/// Dynamic shared memory of the Hopper prefill kernel (`WG_SMEM_BYTES` in `flash_prefill_sm90.cu`: 1 KiB
/// of alignment slack, a Q tile per head, `stages` K and V tiles of 64 rows, `stages + 1` row tables of
/// 64 words); one head per CTA runs 2 stages, two heads 3 (as fast as 4 on an H100; see BENCHMARKS.md).
pub fn flash_prefill_wg_smem(head_dim: usize, heads: usize) -> usize {
    let stages = if heads == 2 { 3 } else { 2 };
    1024 + (heads + 2 * stages) * 64 * head_dim * 2 + (stages + 1) * 64 * 4
}

/// Dynamic shared memory a kernel needs (the launch passes it; over 48 KiB the loader also raises the
/// function's limit once), by name; `None` for kernels with static shared memory only.
pub fn dynamic_smem_of(kernel: &str) -> Option<usize> {
    if let Some(bytes) = crate::fused_mlp::dynamic_smem_of(kernel) {
        return Some(bytes);
    }
    let hd = kernel.rsplit_once("_hd")?.1.parse().ok()?;
    if kernel.starts_with("flash_decode_") {
        Some(flash_decode_smem(hd, kernel.contains("_deep_")))
    } else if kernel.starts_with("flash_prefill_wg") {
        Some(flash_prefill_wg_smem(hd, prefill_heads_per_cta(kernel)))
    } else {
        None
    }
}

/// What both attention launches read: q (in `qkv`), the layer's caches, the batch and the kernels.
#[derive(Clone, Copy)]
pub struct AttnInputs<'a, 'm> {
    pub qkv: &'a DevBuf,
    pub k_cache: &'a DevBuf,
    pub v_cache: &'a DevBuf,
    pub shape: &'a AttnShape,
    pub meta: &'a BatchMeta<'m>,
    pub scale: f32,
    pub kernels: &'a AttnKernels,
}

/// Checks shared by both attention parts; the element type of the buffers.
fn attention_inputs(out: &DevBuf, a: &AttnInputs<'_, '_>) -> Result<GpuDType, CudaError> {
    let AttnInputs { qkv, k_cache, v_cache, shape, meta, .. } = *a;
    let d = same_dtype(&[out, qkv, k_cache, v_cache], "attention")?;
    let t = meta.num_tokens;
    need(out, t * shape.num_heads * shape.head_dim, "attention out")?;
    need(qkv, t * shape.qkv_width(), "qkv")?;
    need_slice(meta.block_tables, meta.num_seqs * meta.max_blocks_per_seq, "block tables")?;
    need_slice(meta.query_start_loc, meta.num_seqs + 1, "query_start_loc")?;
    need_slice(meta.context_lens, meta.num_seqs, "context_lens")?;
    need_slice(meta.token_to_seq, t, "token_to_seq")?;
    Ok(d)
}

/// Attention for every token of the batch is two launches, this one and then [`attention_prefill`] (two
/// functions so a measurement can time them apart): prefill rows go through the tensor-core prefill
/// kernel, decode rows through the tensor-core decode kernel where `kernels` has them (else the general
/// paged kernel), and everything through the general kernel when there is no prefill kernel (f32, or
/// head sizes the tensor-core kernels lack). This part: the paged kernel over the decode rows when the
/// prefill kernel exists (with split-KV when asked), else over every row.
pub fn attention_paged(
    gpu: &Gpu,
    out: &mut DevBuf,
    inputs: &AttnInputs<'_, '_>,
    split: Option<DecodeSplit<'_>>,
) -> Result<(), CudaError> {
    let AttnInputs { qkv, k_cache, v_cache, shape, meta, scale, kernels } = *inputs;
    let flash = kernels.prefill.as_deref();
    let d = attention_inputs(out, inputs)?;
    let t = meta.num_tokens;
    if t == 0 {
        return Ok(());
    }
    let paged_tokens = if flash.is_some() { meta.num_decode_tokens } else { t };
    let (nh, nkv, hd, bs, mb) = (
        i32_of(shape.num_heads, "heads")?,
        i32_of(shape.num_kv_heads, "kv heads")?,
        i32_of(shape.head_dim, "head_dim")?,
        i32_of(shape.block_size, "block_size")?,
        i32_of(meta.max_blocks_per_seq, "blocks per sequence")?,
    );
    let ints = [i32_of(paged_tokens, "tokens")?, nh, nkv, hd, bs, mb];
    // The tensor-core decode kernel takes the general kernel's arguments; only its name and shared memory
    // differ. Its deep form where the plan asks for it and the model has it.
    let (decode, deep) = match (&kernels.decode_deep, split.as_ref().is_some_and(|s| s.deep)) {
        (Some(forms), true) => (Some(forms), true),
        _ => (kernels.decode.as_ref(), false),
    };
    let (plain_name, split_name, smem): (Cow<'_, str>, Cow<'_, str>, u32) = match decode {
        Some((plain, split)) => (plain.into(), split.into(), flash_decode_smem(shape.head_dim, deep) as u32),
        None => (
            format!("paged_attention_{}", d.suffix()).into(),
            format!("paged_attention_split_{}", d.suffix()).into(),
            0,
        ),
    };
    let split = split.filter(|s| s.num_splits > 1 && flash.is_some());
    if let (true, Some(split)) = (paged_tokens > 0, split) {
        let n = ints[0];
        let ns = i32_of(split.num_splits, "splits")?;
        let rows = paged_tokens * shape.num_heads * split.num_splits;
        if split.part_lse.len() < rows || split.part_o.len() < rows * shape.head_dim {
            return Err(CudaError::Invalid(format!("split-KV scratch holds fewer than {rows} rows")));
        }
        let name = split_name;
        let f = gpu.function(&name)?;
        let grid = (paged_tokens as u32, shape.num_kv_heads as u32, split.num_splits as u32);
        let mut launch = KernelArgs::new(gpu);
        push_attention_inputs(&mut launch, qkv, k_cache, v_cache, meta, &ints, scale);
        launch.buf(split.part_o).buf(split.part_lse).i32(ns).i32(i32_of(split.min_keys.max(1), "split keys")?);
        // SAFETY: sizes checked above; the scratch holds every (token, head, split) row.
        unsafe { launch.launch(f, cfg(grid, 128, smem)) }.at(|| name.into_owned())?;
        let name = format!("paged_attention_reduce_{}", d.suffix());
        let f = gpu.function(&name)?;
        // SAFETY: the split kernel wrote every row the reduce reads.
        unsafe {
            KernelArgs::new(gpu)
                .buf(&out.data)
                .buf(split.part_o)
                .buf(split.part_lse)
                .i32(n)
                .i32(nh)
                .i32(hd)
                .i32(ns)
                .launch(f, cfg((paged_tokens as u32, shape.num_heads as u32, 1), 128, 0))
        }
        .at(|| name)?;
    } else if paged_tokens > 0 {
        let name = plain_name;
        let f = gpu.function(&name)?;
        let mut launch = KernelArgs::new(gpu);
        launch.buf(&out.data);
        push_attention_inputs(&mut launch, qkv, k_cache, v_cache, meta, &ints, scale);
        // SAFETY: sizes checked above; block tables hold valid block ids for every context position.
        unsafe { launch.launch(f, cfg((paged_tokens as u32, shape.num_kv_heads as u32, 1), 128, smem)) }
            .at(|| name.into_owned())?;
    }
    Ok(())
}

/// The second part of a batch's attention (after [`attention_paged`]): the tensor-core kernel over the
/// prefill rows' tiles (nothing when the dtype has no such kernel: the paged part covered every row).
pub fn attention_prefill(gpu: &Gpu, out: &mut DevBuf, inputs: &AttnInputs<'_, '_>) -> Result<(), CudaError> {
    let AttnInputs { qkv, k_cache, v_cache, shape, meta, scale, kernels } = *inputs;
    attention_inputs(out, inputs)?;
    let (nh, nkv, bs, mb) = (
        i32_of(shape.num_heads, "heads")?,
        i32_of(shape.num_kv_heads, "kv heads")?,
        i32_of(shape.block_size, "block_size")?,
        i32_of(meta.max_blocks_per_seq, "blocks per sequence")?,
    );
    if let Some(name) = kernels.prefill.as_deref() {
        if meta.num_prefill_tiles > 0 {
            need_slice(meta.prefill_tiles, 2 * meta.num_prefill_tiles, "prefill tiles")?;
            let f = gpu.function(name)?;
            let tiles = i32_of(meta.num_prefill_tiles, "tiles")?;
            let smem = dynamic_smem_of(name).unwrap_or(0) as u32;
            let heads_per_cta = prefill_heads_per_cta(name);
            if !(shape.num_heads / shape.num_kv_heads.max(1)).is_multiple_of(heads_per_cta) {
                return Err(CudaError::Invalid(format!(
                    "{name} takes {heads_per_cta} heads of one KV head per CTA; {} heads over {} KV heads do not pair",
                    shape.num_heads, shape.num_kv_heads
                )));
            }
            // SAFETY: as above; tiles name sequences of this batch and query offsets inside them.
            unsafe {
                gpu.stream()
                    .launch_builder(f)
                    .arg(&mut out.data)
                    .arg(&qkv.data)
                    .arg(&k_cache.data)
                    .arg(&v_cache.data)
                    .arg(meta.block_tables)
                    .arg(meta.query_start_loc)
                    .arg(meta.context_lens)
                    .arg(meta.prefill_tiles)
                    .arg(&tiles)
                    .arg(&nh)
                    .arg(&nkv)
                    .arg(&bs)
                    .arg(&mb)
                    .arg(&scale)
                    .launch(cfg(
                        (meta.num_prefill_tiles as u32, (shape.num_heads / heads_per_cta) as u32, 1),
                        128 * heads_per_cta as u32,
                        smem,
                    ))
            }
            .at(|| name.to_string())?;
        }
    }
    Ok(())
}

/// The inputs every paged-attention kernel takes after its output: qkv, the caches, the batch metadata,
/// then (tokens, heads, kv heads, head_dim, block size, blocks per sequence) and the scale.
fn push_attention_inputs(
    launch: &mut KernelArgs<'_>,
    qkv: &DevBuf,
    k_cache: &DevBuf,
    v_cache: &DevBuf,
    meta: &BatchMeta<'_>,
    ints: &[i32; 6],
    scale: f32,
) {
    launch.buf(&qkv.data).buf(&k_cache.data).buf(&v_cache.data);
    launch.buf(meta.block_tables).buf(meta.query_start_loc).buf(meta.context_lens).buf(meta.token_to_seq);
    for &v in ints {
        launch.i32(v);
    }
    launch.f32(scale);
}

/// `out[r, :inter] = silu(gate) * up` for `gate_up` rows `[gate | up]`.
pub fn silu_and_mul(gpu: &Gpu, out: &mut DevBuf, gate_up: &DevBuf, rows: usize, inter: usize) -> Result<(), CudaError> {
    let d = same_dtype(&[out, gate_up], "silu_and_mul")?;
    need(out, rows * inter, "silu_and_mul out")?;
    need(gate_up, rows * 2 * inter, "silu_and_mul in")?;
    if rows == 0 {
        return Ok(());
    }
    let name = format!("silu_and_mul_{}", d.suffix());
    let f = gpu.function(&name)?;
    let (ri, ii) = (i32_of(rows, "rows")?, i32_of(inter, "intermediate")?);
    // SAFETY: sizes checked above.
    unsafe {
        KernelArgs::new(gpu)
            .buf(&out.data)
            .buf(&gate_up.data)
            .i32(ri)
            .i32(ii)
            .launch(f, cfg((rows as u32, inter.div_ceil(2048) as u32, 1), 256, 0))
    }
    .at(|| name)?;
    Ok(())
}

/// The buffer sizes the gate/up projections with SiLU-and-mul share (this file's skinny form, `fused_mlp`'s
/// Hopper form): act `[m, inter]`, x `[m, k]`, w `[2 inter, k]`.
pub(crate) fn gate_up_sizes(
    op: &str,
    act: &DevBuf,
    x: &DevBuf,
    w: &DevBuf,
    (m, inter, k): (usize, usize, usize),
) -> Result<(), CudaError> {
    need(act, m * inter, &format!("{op} act"))?;
    need(x, m * k, &format!("{op} x"))?;
    need(w, 2 * inter * k, &format!("{op} w"))
}

/// An RMSNorm the skinny GEMM applies to its input rows in its prologue (`gemv.cu`, the NORM forms): x is
/// then the residual stream and the GEMM multiplies `rms_norm(x) * weight`, bit for bit [`rms_norm`]'s rows.
#[derive(Debug, Clone, Copy)]
pub struct InputNorm<'a> {
    pub weight: &'a DevBuf,
    pub eps: f32,
}

/// Most dynamic shared memory the NORM forms ask for: two rows of 8192 in bf16/f16, within the 48 KiB a
/// block gets without opting in (its static scratch included), four such blocks to an SM.
const GEMV_NORM_SMEM: usize = 32 * 1024;
/// Largest weight the skinny GEMM prefetches whole into L2 before it waits for the kernel before it
/// (`GEMV_PREFETCH_MAX_MB` in `gemv.cu`).
const GEMV_WHOLE_PREFETCH_BYTES: usize = 16 << 20;

/// Whether the skinny GEMM's NORM form serves `m` rows of `k` elements of `d` over a weight of
/// `weight_bytes`: where [`gemm`] takes the skinny path, the normalized rows fit [`GEMV_NORM_SMEM`], and
/// the weight is one the GEMM prefetches whole into L2 while the kernel before it runs. Why that weight:
/// each block normalizes before it loads anything, and a kernel streaming its weights from memory loses
/// that time on every wave of blocks, where one reading them from L2 loses about what the norm kernel
/// cost. Measured on an H200 (2026-11-28, GPU-only decode graph replays, three rounds each,
/// bench/results/gpu-2026-11-28-h200-session18): the SmolLM2-135M shape's batch-1 step (weights of 1-4 MB)
/// 0.569 ms against 0.602 with the norm kernels (batch 2 0.651 both); the 8B shape (34-235 MB) with the
/// norm in every GEMM 4.38 against 4.26 ms at batch 1 and 5.41 against 4.49 at batch 2, and with it in
/// the QKV GEMM only at batch 2 (50 MB, one wave of blocks) 4.58 against 4.48.
fn gemv_norm_takes(gpu: &Gpu, d: GpuDType, m: usize, k: usize, weight_bytes: usize) -> bool {
    m > 0
        && gemm_path(d, d, m, k, gpu.skinny_gemm) == GemmPath::Skinny
        && m * k * d.size() <= GEMV_NORM_SMEM
        && weight_bytes <= GEMV_WHOLE_PREFETCH_BYTES
}

/// Launches one of `gemv.cu`'s kernels on `blocks` blocks of `GEMV_WARPS` warps (see [`gemv_blocks`]): y,
/// x, w, m, n, k, then the norm's weight and epsilon for the NORM forms. The caller has checked the
/// buffers against (m, n, k).
#[allow(clippy::too_many_arguments)]
fn launch_gemv(
    gpu: &Gpu,
    name: &str,
    y: &mut DevBuf,
    x: &DevBuf,
    w: &DevBuf,
    norm: Option<InputNorm<'_>>,
    (m, n, k): (usize, usize, usize),
    blocks: usize,
) -> Result<(), CudaError> {
    let f = gpu.function(name)?;
    let smem = norm.map_or(0, |_| m * k * x.dtype.size());
    let launch = cfg((blocks as u32, 1, 1), (GEMV_WARPS * 32) as u32, smem as u32);
    let mut args = KernelArgs::new(gpu);
    args.buf(&y.data).buf(&x.data).buf(&w.data).i32(i32_of(m, "m")?).i32(i32_of(n, "n")?).i32(i32_of(k, "k")?);
    if let Some(norm) = norm {
        need(norm.weight, k, "gemv norm weight")?;
        args.buf(&norm.weight.data).f32(norm.eps);
    }
    // SAFETY: the caller checked the buffers against (m, n, k) and the norm weight holds k elements; the
    // skinny path's k % 8 == 0 keeps every row 16-byte aligned in these allocations; the kernels wait
    // (pdl_wait) before reading x or writing y.
    unsafe { args.launch(f, launch) }.at(|| name.to_string())
}

/// `y[m, n] = (rms_norm(x) * norm.weight) @ w[n, k]^T (+ bias)` with the norm in the skinny GEMM's prologue
/// (`gemv_norm_T`), where [`gemv_norm_takes`] says it pays; then `Ok(true)`: bit for bit [`rms_norm`] into a
/// buffer followed by [`gemm`], one launch instead of two. Elsewhere it launches nothing and returns
/// `Ok(false)`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_normed(
    gpu: &Gpu,
    y: &mut DevBuf,
    x: &DevBuf,
    norm: InputNorm<'_>,
    w: &DevBuf,
    bias: Option<&DevBuf>,
    m: usize,
    n: usize,
    k: usize,
) -> Result<bool, CudaError> {
    let d = same_dtype(&[y, x, w, norm.weight], "gemm_normed")?;
    if !gemv_norm_takes(gpu, d, m, k, n * k * d.size()) {
        return Ok(false);
    }
    gemm_operands("gemm_normed", y, x, w, (m, n, k))?;
    let name = format!("gemv_norm_{}", d.suffix());
    launch_gemv(gpu, &name, y, x, w, Some(norm), (m, n, k), gemv_blocks(m, n))?;
    if let Some(bias) = bias {
        add_bias(gpu, y, bias, m, n)?;
    }
    Ok(true)
}

/// `act[m, inter] = silu(x w_gate^T) * (x w_up^T)` for the stacked `[gate; up]` weight `w` of `2 inter` rows,
/// through the skinny GEMM with the SiLU-and-mul in its epilogue, where [`gemm`] would take the skinny path
/// (bf16/f16, m <= [`GEMV_MAX_M`]); then `Ok(true)`. The result is bit for bit [`gemm`] into a `[m, 2 inter]`
/// buffer followed by [`silu_and_mul`], with one launch instead of two and without the gate/up buffer.
/// With `norm`, x is the residual stream and the GEMM's prologue normalizes it (as [`gemm_normed`], where
/// [`gemv_norm_takes`] says it pays). Elsewhere it launches nothing and returns `Ok(false)`.
#[allow(clippy::too_many_arguments)]
pub fn gemv_swiglu(
    gpu: &Gpu,
    act: &mut DevBuf,
    x: &DevBuf,
    norm: Option<InputNorm<'_>>,
    w: &DevBuf,
    m: usize,
    inter: usize,
    k: usize,
) -> Result<bool, CudaError> {
    let d = same_dtype(&[act, x, w], "gemv_swiglu")?;
    if norm.is_some_and(|norm| norm.weight.dtype != d) {
        return Err(CudaError::Invalid("gemv_swiglu: the norm weight's dtype differs from x's".into()));
    }
    let takes = match norm {
        Some(_) => gemv_norm_takes(gpu, d, m, k, 2 * inter * k * d.size()),
        None => m > 0 && gemm_path(d, d, m, k, gpu.skinny_gemm) == GemmPath::Skinny,
    };
    if !takes {
        return Ok(false);
    }
    gate_up_sizes("gemv_swiglu", act, x, w, (m, inter, k))?;
    let name = format!("gemv_swiglu{}_{}", if norm.is_some() { "_norm" } else { "" }, d.suffix());
    // One warp per output column (a gate row and an up row), whatever m.
    launch_gemv(gpu, &name, act, x, w, norm, (m, inter, k), inter.div_ceil(GEMV_WARPS))?;
    Ok(true)
}

/// `x[r, c] += bias[c]`.
pub fn add_bias(gpu: &Gpu, x: &mut DevBuf, bias: &DevBuf, rows: usize, cols: usize) -> Result<(), CudaError> {
    let d = same_dtype(&[x, bias], "add_bias")?;
    need(x, rows * cols, "add_bias x")?;
    need(bias, cols, "add_bias bias")?;
    if rows == 0 {
        return Ok(());
    }
    let name = format!("add_bias_{}", d.suffix());
    let f = gpu.function(&name)?;
    let (ri, ci) = (i32_of(rows, "rows")?, i32_of(cols, "cols")?);
    // SAFETY: sizes checked above.
    unsafe {
        KernelArgs::new(gpu)
            .buf(&x.data)
            .buf(&bias.data)
            .i32(ri)
            .i32(ci)
            .launch(f, cfg((rows as u32, cols.div_ceil(2048) as u32, 1), 256, 0))
    }
    .at(|| name)?;
    Ok(())
}

/// `out[i, :] = x[rows[i], :]`.
pub fn gather_rows(
    gpu: &Gpu,
    out: &mut DevBuf,
    x: &DevBuf,
    rows: &CudaSlice<i32>,
    n: usize,
    hidden: usize,
) -> Result<(), CudaError> {
    copy_rows(gpu, "gather_rows", out, x, rows, n, hidden)
}

/// Fills `buf` with uniform random values in `[lo, hi)` (dummy weights).
pub fn fill_uniform(gpu: &Gpu, buf: &mut DevBuf, seed: u64, lo: f32, hi: f32) -> Result<(), CudaError> {
    let name = format!("fill_uniform_{}", buf.dtype.suffix());
    let f = gpu.function(&name)?;
    let n = buf.len as i64;
    let blocks = buf.len.div_ceil(256).clamp(1, 65535) as u32;
    // SAFETY: the kernel writes buf[0..n].
    unsafe {
        gpu.stream().launch_builder(f).arg(&mut buf.data).arg(&n).arg(&seed).arg(&lo).arg(&hi).launch(cfg(
            (blocks, 1, 1),
            256,
            0,
        ))
    }
    .at(|| name)?;
    Ok(())
}

/// `y[m, n] = x[m, k] @ w[n, k]^T (+ bias)`, in the buffers' dtype. `y` may be f32 while `x`/`w` are
/// bf16/f16 (the LM head's logits). f32 uses our batch-invariant kernel; half types use cuBLAS.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    gpu: &Gpu,
    y: &mut DevBuf,
    x: &DevBuf,
    w: &DevBuf,
    bias: Option<&DevBuf>,
    m: usize,
    n: usize,
    k: usize,
) -> Result<(), CudaError> {
    gemm_operands("gemm", y, x, w, (m, n, k))?;
    if m == 0 {
        return Ok(());
    }
    let (mi, ni, ki) = (i32_of(m, "m")?, i32_of(n, "n")?, i32_of(k, "k")?);
    let path = gemm_path(x.dtype, y.dtype, m, k, gpu.skinny_gemm);
    if path == GemmPath::F32 {
        if y.dtype != GpuDType::F32 {
            return Err(CudaError::Invalid("gemm: f32 inputs need an f32 output".into()));
        }
        let f = gpu.function("gemm_f32_nt")?;
        let null = 0u64;
        let mut b = gpu.stream().launch_builder(f);
        b.arg(&mut y.data).arg(&x.data).arg(&w.data);
        match bias {
            Some(bias) => {
                need(bias, n, "gemm bias")?;
                b.arg(&bias.data)
            }
            None => b.arg(&null),
        };
        b.arg(&mi).arg(&ni).arg(&ki);
        // SAFETY: sizes checked above.
        unsafe { b.launch(cfg(((n as u32).div_ceil(64), (m as u32).div_ceil(64), 1), 256, 0)) }
            .at(|| "gemm_f32_nt".into())?;
        return Ok(());
    }
    if path == GemmPath::Skinny {
        let name = if y.dtype == x.dtype {
            format!("gemv_{}", x.dtype.suffix())
        } else {
            format!("gemv_{}_f32", x.dtype.suffix())
        };
        launch_gemv(gpu, &name, y, x, w, None, (m, n, k), gemv_blocks(m, n))?;
    } else {
        cublaslt_gemm(gpu, y, x, w, (m, n, k), Output::Overwrite)?;
    }
    if let Some(bias) = bias {
        if y.dtype != bias.dtype {
            return Err(CudaError::Invalid("gemm: bias dtype differs from the output's".into()));
        }
        add_bias(gpu, y, bias, m, n)?;
    }
    Ok(())
}

/// `y[m, n] += x[m, k] @ w[n, k]^T (+ bias)` in place, the add done in the GEMM's epilogue, where y has
/// x's dtype (bf16/f16): cuBLASLt with beta = 1, or the skinny GEMM's accumulating form (`gemv_acc_T`) for
/// its rows; then `Ok(true)`. Elsewhere (float32, an f32 y) it launches nothing and returns `Ok(false)`,
/// and the caller runs [`gemm`] into a buffer of its own and adds that (the decoder's residual stream:
/// `add_rms_norm`).
///
/// Numerics: cuBLASLt rounds the sum once (the f32 product plus y, then one rounding to y's dtype), where
/// `gemm` and a later add round the product to y's dtype and then the sum; the two differ by at most
/// about one ulp of y. The skinny form rounds as `gemm` and the add do, bit for bit (the decode step of
/// one or two sequences is then that of the unfused kernels). A bias is added afterwards by `add_bias`, a
/// rounding of its own as in [`gemm`] (after the sum here, so with a bias neither form is bit for bit
/// `gemm` + add, which adds it to the product first).
#[allow(clippy::too_many_arguments)]
pub fn gemm_accumulate(
    gpu: &Gpu,
    y: &mut DevBuf,
    x: &DevBuf,
    w: &DevBuf,
    bias: Option<&DevBuf>,
    m: usize,
    n: usize,
    k: usize,
) -> Result<bool, CudaError> {
    if !accumulates(x.dtype, y.dtype, m, k, gpu.skinny_gemm) {
        return Ok(false);
    }
    gemm_operands("gemm_accumulate", y, x, w, (m, n, k))?;
    if let Some(bias) = bias {
        if bias.dtype != y.dtype {
            return Err(CudaError::Invalid("gemm_accumulate: bias dtype differs from the output's".into()));
        }
        need(bias, n, "gemm_accumulate bias")?;
    }
    if m == 0 {
        return Ok(true);
    }
    if gemm_path(x.dtype, y.dtype, m, k, gpu.skinny_gemm) == GemmPath::Skinny {
        let name = format!("gemv_acc_{}", x.dtype.suffix());
        launch_gemv(gpu, &name, y, x, w, None, (m, n, k), gemv_blocks(m, n))?;
    } else {
        cublaslt_gemm(gpu, y, x, w, (m, n, k), Output::Accumulate)?;
    }
    if let Some(bias) = bias {
        add_bias(gpu, y, bias, m, n)?;
    }
    Ok(true)
}

/// The checks [`gemm`] and [`gemm_accumulate`] share: x and w of one dtype, every buffer large enough.
fn gemm_operands(
    op: &str,
    y: &DevBuf,
    x: &DevBuf,
    w: &DevBuf,
    (m, n, k): (usize, usize, usize),
) -> Result<(), CudaError> {
    if x.dtype != w.dtype {
        return Err(CudaError::Invalid(format!("{op}: x and w of different dtypes")));
    }
    for (buf, elems, name) in [(y, m * n, "y"), (x, m * k, "x"), (w, n * k, "w")] {
        if buf.len < elems {
            return Err(CudaError::Invalid(format!("{op} {name}: buffer of {} elements, need {elems}", buf.len)));
        }
    }
    Ok(())
}

/// Which GEMM serves a shape; [`gemm`] and [`gemm_accumulate`] decide alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GemmPath {
    /// Our batch-invariant float32 kernel (`gemm_f32_nt`).
    F32,
    /// The skinny GEMM (`gemv.cu`).
    Skinny,
    /// cuBLASLt (`lt_gemm`).
    Lt,
}

/// The path for x and w of `input`, y of `output`, m rows of k; `skinny` is [`Gpu::skinny_gemm`].
fn gemm_path(input: GpuDType, output: GpuDType, m: usize, k: usize, skinny: bool) -> GemmPath {
    if input == GpuDType::F32 {
        GemmPath::F32
    } else if skinny && m <= GEMV_MAX_M && k.is_multiple_of(8) && k > 0 && (output == input || output == GpuDType::F32)
    {
        GemmPath::Skinny
    } else {
        GemmPath::Lt
    }
}

/// Whether [`gemm_accumulate`] takes this shape: both cuBLASLt's epilogue and the skinny GEMM's add in y's
/// own dtype; our float32 kernel has no epilogue.
fn accumulates(input: GpuDType, output: GpuDType, m: usize, k: usize, skinny: bool) -> bool {
    output == input && gemm_path(input, output, m, k, skinny) != GemmPath::F32
}

/// Most rows the skinny GEMM (`gemv.cu`, which handles up to 4) serves: on the H200 it beat cuBLAS at
/// batch 1 (8B decode step 5.43 -> 5.16 ms) but lost at batch 4 (6.06 -> 6.61 ms), where every warp
/// re-reading four x rows costs more than it saves; batch 2 replays as fast as batch 1.
pub const GEMV_MAX_M: usize = 2;
/// The skinny GEMM's warps per block (`GEMV_WARPS` in `gemv.cu`).
const GEMV_WARPS: usize = 8;

/// Output columns per warp of the skinny GEMM for `m` rows (`GEMV_ROWS_M1` / `GEMV_ROWS` in `gemv.cu`).
fn gemv_rows_per_warp(m: usize) -> usize {
    if m == 1 {
        1
    } else {
        2
    }
}

/// Blocks of the skinny GEMM's plain, NORM and ACC forms for `m` rows and `n` output columns.
fn gemv_blocks(m: usize, n: usize) -> usize {
    n.div_ceil(GEMV_WARPS * gemv_rows_per_warp(m))
}

/// `y = x w^T` (or `y += x w^T`) through cuBLASLt (bf16/f16 inputs, f32 accumulation, y in its own
/// dtype or f32).
fn cublaslt_gemm(
    gpu: &Gpu,
    y: &mut DevBuf,
    x: &DevBuf,
    w: &DevBuf,
    mnk: (usize, usize, usize),
    into: Output,
) -> Result<(), CudaError> {
    let stream = gpu.stream();
    let (xp, _gx) = x.data.device_ptr(stream);
    let (wp, _gw) = w.data.device_ptr(stream);
    let (yp, _gy) = y.data.device_ptr_mut(stream);
    gpu.lt().gemm(stream, yp, xp, wp, mnk, x.dtype, y.dtype, into)
}

/// Times cuBLASLt's candidate algorithms for `y[m, n] = x[m, k] w[n, k]^T` on these buffers and keeps the
/// fastest for GEMMs of this weight shape at up to m rows (see `lt_gemm`). Overwrites y and `flush` (a
/// buffer of at least twice the L2 cache, see [`l2_flush_bytes`], written before each timed GEMM);
/// synchronizes.
#[allow(clippy::too_many_arguments)]
pub fn tune_gemm(
    gpu: &Gpu,
    y: &mut DevBuf,
    x: &DevBuf,
    w: &DevBuf,
    m: usize,
    n: usize,
    k: usize,
    flush: &mut DevBuf,
) -> Result<crate::lt_gemm::TuneResult, CudaError> {
    if x.dtype != w.dtype || x.dtype == GpuDType::F32 {
        return Err(CudaError::Invalid("tune_gemm: bf16/f16 x and w of one dtype".into()));
    }
    need(y, m * n, "gemm y")?;
    need(x, m * k, "gemm x")?;
    need(w, n * k, "gemm w")?;
    if m == 0 || n == 0 || k == 0 {
        return Err(CudaError::Invalid("tune_gemm: empty shape".into()));
    }
    let stream = gpu.stream();
    let (xp, _gx) = x.data.device_ptr(stream);
    let (wp, _gw) = w.data.device_ptr(stream);
    let (yp, _gy) = y.data.device_ptr_mut(stream);
    gpu.lt().tune(stream, yp, xp, wp, (m, n, k), x.dtype, y.dtype, &mut flush.data)
}

/// Bytes of the buffer `tune_gemm` writes to empty the L2 cache: twice the card's L2, at least 64 MiB.
pub fn l2_flush_bytes(gpu: &Gpu) -> usize {
    (2 * gpu.info.l2_cache_bytes).max(64 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_rope_takes_heads_whose_halves_are_whole_16_byte_packs() {
        let shape = |num_heads, num_kv_heads, head_dim| AttnShape {
            num_heads,
            num_kv_heads,
            head_dim,
            block_size: 16,
            num_blocks: 4,
        };
        // Llama-3.1-8B in bf16: 40 heads x 8 rotation packs + 8 value heads x 16 packs = 448 threads.
        assert_eq!(rope_kv_pack_threads(&shape(32, 8, 128), GpuDType::BF16), Some(448));
        // f32 packs hold 4 elements: 40 x 16 + 8 x 32 = 896.
        assert_eq!(rope_kv_pack_threads(&shape(32, 8, 128), GpuDType::F32), Some(896));
        // SmolLM2-135M (head_dim 64, 9 / 3 heads): 12 x 4 + 3 x 8 = 72 packs -> 96 threads.
        assert_eq!(rope_kv_pack_threads(&shape(9, 3, 64), GpuDType::BF16), Some(96));
        // More packs than a block: capped at 1024, the kernel strides.
        assert_eq!(rope_kv_pack_threads(&shape(128, 16, 256), GpuDType::F16), Some(1024));
        // head_dim 80: halves of 40 are five bf16 packs (18 x 5 + 2 x 10 = 110 -> 128 threads).
        assert_eq!(rope_kv_pack_threads(&shape(16, 2, 80), GpuDType::BF16), Some(128));
        // Half a head that is not whole packs: the per-warp kernel.
        assert_eq!(rope_kv_pack_threads(&shape(16, 2, 72), GpuDType::BF16), None);
        assert_eq!(rope_kv_pack_threads(&shape(6, 2, 34), GpuDType::F32), None);
        assert_eq!(rope_kv_pack_threads(&shape(4, 4, 8), GpuDType::BF16), None);
        // An odd head size (whose floor half would be whole packs) is refused by its parity alone.
        assert_eq!(rope_kv_pack_threads(&shape(4, 4, 17), GpuDType::F32), None);
    }

    #[test]
    fn flash_decode_shared_memory_follows_the_kernels_stages_and_fits_an_sm() {
        // FD_SMEM_BYTES in flash_decode.cu: 3 stages at head_dim 64, 2 at 128 (3 in the deep form), plus
        // the Q tile.
        assert_eq!(flash_decode_smem(64, false), 3 * 2 * 64 * 64 * 2 + 16 * 64 * 2);
        assert_eq!(flash_decode_smem(128, false), 2 * 2 * 64 * 128 * 2 + 16 * 128 * 2);
        assert_eq!(flash_decode_smem(128, true), 3 * 2 * 64 * 128 * 2 + 16 * 128 * 2);
        assert_eq!(dynamic_smem_of("flash_decode_bf16_hd128"), Some(69632));
        assert_eq!(dynamic_smem_of("flash_decode_split_f16_hd64"), Some(51200));
        assert_eq!(dynamic_smem_of("flash_decode_split_deep_bf16_hd128"), Some(102400));
        assert_eq!(dynamic_smem_of("flash_decode_deep_f16_hd128"), Some(102400));
        assert_eq!(dynamic_smem_of("flash_prefill_bf16_hd128"), None);
        assert_eq!(dynamic_smem_of("paged_attention_bf16"), None);
        // Three CTAs of the head_dim-128 kernel (two of its deep form) fit Hopper's 227 KiB per SM.
        assert!(3 * flash_decode_smem(128, false) <= 227 * 1024);
        assert!(2 * flash_decode_smem(128, true) <= 227 * 1024);
    }

    #[test]
    fn hopper_prefill_shared_memory_matches_the_kernel_and_two_ctas_fit_an_sm() {
        // WG_SMEM_BYTES(HD, heads, stages) in flash_prefill_sm90.cu.
        assert_eq!(dynamic_smem_of("flash_prefill_wg_bf16_hd128"), Some(83712));
        assert_eq!(dynamic_smem_of("flash_prefill_wg_f16_hd64"), Some(42752));
        assert_eq!(dynamic_smem_of("flash_prefill_wg2_bf16_hd128"), Some(133120));
        assert_eq!(dynamic_smem_of("flash_prefill_wg2_f16_hd64"), Some(67584));
        assert_eq!(prefill_heads_per_cta("flash_prefill_wg2_f16_hd64"), 2);
        assert_eq!(prefill_heads_per_cta("flash_prefill_bf16_hd128"), 1);
        // The launch bounds' CTAs per SM (two of one head, one of two) within Hopper's 228 KiB per SM,
        // 1 KiB reserved per CTA.
        assert!(2 * (flash_prefill_wg_smem(128, 1) + 1024) <= 228 * 1024);
        assert!(flash_prefill_wg_smem(128, 2) + 1024 <= 228 * 1024);
    }

    #[test]
    fn gemm_accumulate_takes_the_half_gemms_with_a_same_dtype_output() {
        use GpuDType::{BF16, F16, F32};
        // Rows past the skinny GEMM's, or any rows with it disabled: cuBLASLt, which accumulates.
        for d in [BF16, F16] {
            assert_eq!(gemm_path(d, d, GEMV_MAX_M + 1, 4096, true), GemmPath::Lt);
            assert!(accumulates(d, d, GEMV_MAX_M + 1, 4096, true));
            assert!(accumulates(d, d, 1, 4096, false));
            assert!(accumulates(d, d, 8192, 14336, true));
        }
        // The skinny GEMM's rows (one decode token or two): its accumulating form.
        for m in 1..=GEMV_MAX_M {
            assert_eq!(gemm_path(BF16, BF16, m, 4096, true), GemmPath::Skinny);
            assert!(accumulates(BF16, BF16, m, 4096, true));
        }
        // A k the skinny GEMM cannot read 16 bytes at a time goes to cuBLASLt even for one row.
        assert_eq!(gemm_path(BF16, BF16, 1, 4100, true), GemmPath::Lt);
        assert!(accumulates(BF16, BF16, 1, 4100, true));
        // Float32 runs our own kernel; an f32 output of half inputs (the logits) is not a residual.
        assert_eq!(gemm_path(F32, F32, 64, 4096, true), GemmPath::F32);
        assert!(!accumulates(F32, F32, 64, 4096, true));
        assert_eq!(gemm_path(BF16, F32, 64, 4096, true), GemmPath::Lt);
        assert!(!accumulates(BF16, F32, 64, 4096, true));
        assert!(!accumulates(BF16, F16, 64, 4096, false));
    }

    #[test]
    fn decode_splits_keep_one_wave_and_stay_within_the_scratch() {
        // The hd128 decode kernel on an H200: 3 CTAs per SM, 132 SMs.
        let wave = SplitRule::Wave(decode_split_wave(132, 3));
        assert_eq!(wave, SplitRule::Wave(396));
        // Batch 1 of an 8-KV-head model with a long context: the most splits.
        assert_eq!(decode_splits(1, 8, wave, 8192, MAX_DECODE_SPLITS), MAX_DECODE_SPLITS);
        assert_eq!(decode_splits(1, 8, wave, 8192, DEFAULT_MAX_DECODE_SPLITS), 16);
        // A 1k context allows 8 shares of 128 keys; a short one none.
        assert_eq!(decode_splits(1, 8, wave, 1024, MAX_DECODE_SPLITS), 8);
        assert_eq!(decode_splits(1, 8, wave, 100, MAX_DECODE_SPLITS), 1);
        // Batch 24 (192 pairs): two shares fill the wave; batch 32 (256 pairs) fills more than half alone.
        assert_eq!(decode_splits(24, 8, wave, 8192, MAX_DECODE_SPLITS), 2);
        assert_eq!(decode_splits(32, 8, wave, 8192, MAX_DECODE_SPLITS), 1);
        assert_eq!(decode_splits(16, 8, wave, 8192, MAX_DECODE_SPLITS), 3);
        assert_eq!(decode_splits(48, 8, wave, 8192, MAX_DECODE_SPLITS), 1);
        // Batch 56 / 64 (448 / 512 pairs): one wave and a sliver alone, two nearly full waves in two shares.
        assert_eq!(decode_splits(56, 8, wave, 8192, MAX_DECODE_SPLITS), 2);
        assert_eq!(decode_splits(64, 8, wave, 8192, MAX_DECODE_SPLITS), 2);
        assert_eq!(decode_splits(80, 8, wave, 8192, MAX_DECODE_SPLITS), 1);
        assert_eq!(decode_splits(128, 8, wave, 8192, MAX_DECODE_SPLITS), 1);
        assert_eq!(decode_splits(0, 8, wave, 8192, MAX_DECODE_SPLITS), 1);
        // The earlier rule: four CTAs per SM aimed for, rounded up (batch 32: three shares).
        let fill = SplitRule::Fill(OLD_SPLIT_BLOCKS_PER_SM * 132);
        assert_eq!(decode_splits(32, 8, fill, 8192, MAX_DECODE_SPLITS), 3);
        assert_eq!(decode_splits(1, 8, fill, 1024, MAX_DECODE_SPLITS), 8);
        assert_eq!(decode_splits(128, 8, fill, 8192, MAX_DECODE_SPLITS), 1);
        // Forced shares (A/B runs) stop at the scratch.
        let fixed = SplitRule::Fixed { splits: 4, ctas: decode_split_ctas(132) };
        assert_eq!(decode_splits(32, 8, fixed, 8192, MAX_DECODE_SPLITS), 4);
        assert_eq!(decode_splits(128, 8, fixed, 8192, MAX_DECODE_SPLITS), 3);
        assert_eq!(decode_splits(128, 8, fixed, 256, MAX_DECODE_SPLITS), 2);
        for tokens in 1..64 {
            for kv in [1, 2, 4, 8, 16] {
                for sms in [16, 78, 114, 132] {
                    for resident in [1, 2, 3, 4, 8, 16] {
                        for rule in [
                            SplitRule::Cost {
                                wave: decode_split_wave(sms, resident),
                                ctas: decode_split_ctas(sms),
                                deep_wave: 0,
                            },
                            SplitRule::Cost {
                                wave: decode_split_wave(sms, resident),
                                ctas: decode_split_ctas(sms),
                                deep_wave: decode_split_wave(sms, resident.div_ceil(2)),
                            },
                            SplitRule::Wave(decode_split_wave(sms, resident)),
                            SplitRule::Fill(OLD_SPLIT_BLOCKS_PER_SM * sms),
                            SplitRule::Fixed { splits: resident, ctas: decode_split_ctas(sms) },
                        ] {
                            let s = decode_plan(tokens, kv, rule, 1 << 20, MAX_DECODE_SPLITS).splits;
                            assert!((1..=MAX_DECODE_SPLITS).contains(&s));
                            if s > 1 {
                                // Rows of the scratch: tokens x heads x splits, heads = kv x group.
                                assert!(tokens * kv * s <= decode_split_rows(sms, 1), "{tokens} {kv} {sms} -> {s}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// (context, batch, [(shares, microseconds)])
    type Replays = (usize, usize, &'static [(usize, u32)]);

    /// GPU-only decode graph replays (microseconds) of the 8B shape on an H200 (2026-11-28, call 1 of
    /// `bench/results/gpu-2026-11-28-h200-session18`, `split/replays.txt`): (context, batch, [(shares, us)])
    /// for 1-4 shares forced (the most the scratch holds where it holds fewer) and the Wave rule's count.
    const H200_SPLIT_REPLAYS: &[Replays] = &[
        (1024, 1, &[(1, 5071), (2, 4547), (3, 4429), (4, 4315), (8, 4245)]),
        (1024, 2, &[(1, 5261), (2, 4744), (3, 4621), (4, 4510), (8, 4450)]),
        (1024, 4, &[(1, 5509), (2, 5114), (3, 4995), (4, 4888), (8, 4906)]),
        (1024, 8, &[(1, 5561), (2, 5205), (3, 5094), (4, 5051), (6, 5046)]),
        (1024, 16, &[(1, 5724), (2, 5422), (3, 5349), (4, 5527)]),
        (1024, 24, &[(1, 5821), (2, 5537), (3, 5810), (4, 5719)]),
        (1024, 32, &[(1, 6030), (2, 6276), (3, 6101), (4, 6229)]),
        (1024, 40, &[(1, 6031), (2, 6282), (3, 6544), (4, 6515)]),
        (1024, 48, &[(1, 6271), (2, 6529), (3, 6790), (4, 6816)]),
        (1024, 56, &[(1, 7374), (2, 7180), (3, 7314), (4, 7223)]),
        (1024, 64, &[(1, 7478), (2, 7288), (3, 7457), (4, 7608)]),
        (1024, 80, &[(1, 7668), (2, 8123), (3, 8219), (4, 8321)]),
        (1024, 96, &[(1, 8092), (2, 8573), (3, 9078), (4, 9090)]),
        (1024, 112, &[(1, 9515), (2, 9543), (3, 9932)]),
        (1024, 128, &[(1, 9545), (2, 10152), (3, 10494)]),
        (4096, 1, &[(1, 8074), (2, 6067), (3, 5498), (4, 5085), (16, 4500)]),
        (4096, 2, &[(1, 8223), (2, 6280), (3, 5686), (4, 5278), (16, 4743)]),
        (4096, 4, &[(1, 8518), (2, 6631), (3, 6066), (4, 5678), (12, 5388)]),
        (4096, 8, &[(1, 8549), (2, 6824), (3, 6256), (4, 6031), (6, 5808)]),
        (4096, 16, &[(1, 8999), (2, 7383), (3, 6889), (4, 7490)]),
        (4096, 24, &[(1, 9269), (2, 7751), (3, 8387), (4, 7915)]),
        (4096, 32, &[(1, 9928), (2, 10150), (3, 9119), (4, 9394)]),
        (4096, 40, &[(1, 10334), (2, 10395), (3, 10753), (4, 10679)]),
        (4096, 48, &[(1, 10699), (2, 10928), (3, 11239), (4, 11227)]),
        (4096, 56, &[(1, 15068), (2, 13321), (3, 13027), (4, 12652)]),
        (4096, 64, &[(1, 15369), (2, 13607), (3, 13391), (4, 14042)]),
        (4096, 80, &[(1, 15907), (2, 16432), (3, 15651), (4, 15982)]),
        (4096, 96, &[(1, 16946), (2, 17381), (3, 17957), (4, 17929)]),
        (4096, 112, &[(1, 21869), (2, 20319), (3, 20317)]),
        (4096, 128, &[(1, 22230), (2, 22919), (3, 22356)]),
    ];

    #[test]
    fn the_split_cost_model_picks_the_measured_best_share_count() {
        let rule = SplitRule::Cost { wave: decode_split_wave(132, 3), ctas: decode_split_ctas(132), deep_wave: 0 };
        for &(context, batch, measured) in H200_SPLIT_REPLAYS {
            let pick = decode_splits(batch, 8, rule, context, DEFAULT_MAX_DECODE_SPLITS);
            let best = measured.iter().map(|&(_, us)| us).min().unwrap_or(0);
            let Some(&(_, us)) = measured.iter().find(|&&(s, _)| s == pick) else {
                panic!("context {context}, batch {batch}: {pick} shares were not measured");
            };
            // 0.5%: the rounds of these replays agree to ~0.2%, and batch 4 at context 1024 has 8 shares
            // at 4.906 ms against 4 at 4.888.
            assert!(us * 1000 <= best * 1005, "context {context}, batch {batch}: {pick} shares {us} us, best {best}");
        }
        // Where the earlier rule lost: batch 32 at context 4096 takes 3 shares, at 1024 none.
        assert_eq!(decode_splits(32, 8, rule, 4096, DEFAULT_MAX_DECODE_SPLITS), 3);
        assert_eq!(decode_splits(32, 8, rule, 1024, DEFAULT_MAX_DECODE_SPLITS), 1);
        // Without a deep form the plan is the plain form's count.
        assert_eq!(decode_plan(32, 8, rule, 4096, DEFAULT_MAX_DECODE_SPLITS), DecodePlan::plain(3));
    }

    /// (context, batch, [((deep form, shares), microseconds)])
    type PlanReplays = (usize, usize, &'static [((bool, usize), u32)]);

    /// GPU-only decode graph replays (microseconds) of the 8B shape on an H200 (2026-11-28, call 6 of
    /// `bench/results/gpu-2026-11-28-h200-session20`): both forms of the decode kernel (the plain one
    /// built with `FD_STAGES_HD128=2`, the default, and with 3, the deep form's stages), 1-4 shares forced
    /// and each form's rule count; the better of a graph's two timing passes.
    const H200_PLAN_REPLAYS: &[PlanReplays] = &[
        (
            1024,
            1,
            &[
                ((false, 1), 4998),
                ((false, 2), 4454),
                ((false, 3), 4344),
                ((false, 4), 4227),
                ((false, 16), 4158),
                ((true, 1), 4925),
                ((true, 2), 4411),
                ((true, 3), 4304),
                ((true, 4), 4198),
                ((true, 16), 4141),
            ],
        ),
        (
            1024,
            2,
            &[
                ((false, 1), 5142),
                ((false, 2), 4659),
                ((false, 3), 4541),
                ((false, 4), 4430),
                ((false, 16), 4383),
                ((true, 1), 5063),
                ((true, 2), 4611),
                ((true, 3), 4513),
                ((true, 4), 4403),
                ((true, 16), 4364),
            ],
        ),
        (
            1024,
            4,
            &[
                ((false, 1), 5333),
                ((false, 2), 4918),
                ((false, 3), 4801),
                ((false, 4), 4703),
                ((false, 12), 4711),
                ((true, 1), 5257),
                ((true, 2), 4868),
                ((true, 3), 4768),
                ((true, 4), 4671),
                ((true, 8), 4657),
            ],
        ),
        (
            1024,
            8,
            &[
                ((false, 1), 5480),
                ((false, 2), 5121),
                ((false, 3), 5014),
                ((false, 4), 4969),
                ((false, 6), 4954),
                ((true, 1), 5404),
                ((true, 2), 5088),
                ((true, 3), 4979),
                ((true, 4), 4893),
            ],
        ),
        (
            1024,
            16,
            &[
                ((false, 1), 5633),
                ((false, 2), 5329),
                ((false, 3), 5266),
                ((false, 4), 5441),
                ((true, 1), 5582),
                ((true, 2), 5195),
                ((true, 3), 5499),
                ((true, 4), 5335),
            ],
        ),
        (
            1024,
            24,
            &[
                ((false, 1), 5746),
                ((false, 2), 5485),
                ((false, 3), 5736),
                ((false, 4), 5650),
                ((true, 1), 5650),
                ((true, 2), 5816),
                ((true, 3), 5945),
                ((true, 4), 5735),
            ],
        ),
        (
            1024,
            32,
            &[
                ((false, 1), 5983),
                ((false, 2), 6181),
                ((false, 3), 6021),
                ((false, 4), 6132),
                ((true, 1), 5726),
                ((true, 2), 5940),
                ((true, 3), 6169),
                ((true, 4), 6196),
            ],
        ),
        (
            1024,
            40,
            &[
                ((false, 1), 6036),
                ((false, 2), 6259),
                ((false, 3), 6501),
                ((false, 4), 6468),
                ((false, 6), 6651),
                ((true, 1), 6661),
                ((true, 2), 6508),
                ((true, 3), 6599),
                ((true, 4), 6538),
            ],
        ),
        (
            1024,
            48,
            &[
                ((false, 1), 6149),
                ((false, 2), 6393),
                ((false, 3), 6643),
                ((false, 4), 6669),
                ((true, 1), 6762),
                ((true, 2), 6554),
                ((true, 3), 7066),
                ((true, 4), 6912),
            ],
        ),
        (
            1024,
            56,
            &[
                ((false, 1), 7286),
                ((false, 2), 7066),
                ((false, 3), 7194),
                ((false, 4), 7110),
                ((false, 5), 7407),
                ((true, 1), 6814),
                ((true, 2), 7175),
                ((true, 3), 7504),
                ((true, 4), 7321),
            ],
        ),
        (
            1024,
            64,
            &[
                ((false, 1), 7312),
                ((false, 2), 7183),
                ((false, 3), 7328),
                ((false, 4), 7448),
                ((true, 1), 6855),
                ((true, 2), 7240),
                ((true, 3), 7663),
                ((true, 4), 7713),
            ],
        ),
        (
            1024,
            80,
            &[
                ((false, 1), 7644),
                ((false, 2), 8021),
                ((false, 3), 8101),
                ((false, 4), 8167),
                ((true, 1), 8026),
                ((true, 2), 8019),
                ((true, 3), 8664),
                ((true, 4), 8594),
            ],
        ),
        (
            1024,
            96,
            &[
                ((false, 1), 8114),
                ((false, 2), 8508),
                ((false, 3), 9019),
                ((false, 4), 8924),
                ((true, 1), 8350),
                ((true, 2), 8847),
                ((true, 3), 9427),
                ((true, 4), 9506),
            ],
        ),
        (
            1024,
            112,
            &[
                ((false, 1), 9586),
                ((false, 2), 9546),
                ((false, 3), 9904),
                ((true, 1), 9698),
                ((true, 2), 9893),
                ((true, 3), 10485),
            ],
        ),
        (
            1024,
            128,
            &[
                ((false, 1), 9851),
                ((false, 2), 10350),
                ((false, 3), 10789),
                ((true, 1), 10066),
                ((true, 2), 10730),
                ((true, 3), 11124),
            ],
        ),
        (
            4096,
            1,
            &[
                ((false, 1), 7959),
                ((false, 2), 5952),
                ((false, 3), 5401),
                ((false, 4), 4983),
                ((false, 16), 4414),
                ((true, 1), 7735),
                ((true, 2), 5812),
                ((true, 3), 5297),
                ((true, 4), 4901),
                ((true, 16), 4382),
            ],
        ),
        (
            4096,
            2,
            &[
                ((false, 1), 8101),
                ((false, 2), 6179),
                ((false, 3), 5604),
                ((false, 4), 5200),
                ((false, 16), 4669),
                ((true, 1), 7868),
                ((true, 2), 6028),
                ((true, 3), 5501),
                ((true, 4), 5106),
                ((true, 16), 4626),
            ],
        ),
        (
            4096,
            4,
            &[
                ((false, 1), 8331),
                ((false, 2), 6432),
                ((false, 3), 5865),
                ((false, 4), 5490),
                ((false, 12), 5193),
                ((true, 1), 8095),
                ((true, 2), 6266),
                ((true, 3), 5758),
                ((true, 4), 5372),
                ((true, 8), 5077),
            ],
        ),
        (
            4096,
            8,
            &[
                ((false, 1), 8471),
                ((false, 2), 6737),
                ((false, 3), 6176),
                ((false, 4), 5947),
                ((false, 6), 5721),
                ((true, 1), 8171),
                ((true, 2), 6620),
                ((true, 3), 6037),
                ((true, 4), 5715),
            ],
        ),
        (
            4096,
            16,
            &[
                ((false, 1), 8918),
                ((false, 2), 7307),
                ((false, 3), 6812),
                ((false, 4), 7385),
                ((true, 1), 8682),
                ((true, 2), 6788),
                ((true, 3), 7598),
                ((true, 4), 6927),
            ],
        ),
        (
            4096,
            24,
            &[
                ((false, 1), 9189),
                ((false, 2), 7707),
                ((false, 3), 8328),
                ((false, 4), 7847),
                ((true, 1), 8688),
                ((true, 2), 8899),
                ((true, 3), 9128),
                ((true, 4), 8122),
            ],
        ),
        (
            4096,
            32,
            &[
                ((false, 1), 9873),
                ((false, 2), 10043),
                ((false, 3), 9035),
                ((false, 4), 9285),
                ((true, 1), 8858),
                ((true, 2), 9074),
                ((true, 3), 9435),
                ((true, 4), 9350),
            ],
        ),
        (
            4096,
            40,
            &[
                ((false, 1), 10304),
                ((false, 2), 10383),
                ((false, 3), 10692),
                ((false, 4), 10610),
                ((false, 6), 10393),
                ((true, 1), 12584),
                ((true, 2), 11151),
                ((true, 3), 10954),
                ((true, 4), 10496),
            ],
        ),
        (
            4096,
            48,
            &[
                ((false, 1), 10589),
                ((false, 2), 10789),
                ((false, 3), 11072),
                ((false, 4), 11056),
                ((true, 1), 12923),
                ((true, 2), 11266),
                ((true, 3), 12422),
                ((true, 4), 11644),
            ],
        ),
        (
            4096,
            56,
            &[
                ((false, 1), 14943),
                ((false, 2), 13172),
                ((false, 3), 12890),
                ((false, 4), 12516),
                ((false, 5), 12608),
                ((true, 1), 12999),
                ((true, 2), 13386),
                ((true, 3), 13896),
                ((true, 4), 12861),
            ],
        ),
        (
            4096,
            64,
            &[
                ((false, 1), 15053),
                ((false, 2), 13557),
                ((false, 3), 13281),
                ((false, 4), 14086),
                ((true, 1), 13124),
                ((true, 2), 13538),
                ((true, 3), 14216),
                ((true, 4), 14205),
            ],
        ),
        (
            4096,
            80,
            &[
                ((false, 1), 15825),
                ((false, 2), 16338),
                ((false, 3), 15794),
                ((false, 4), 16061),
                ((true, 1), 17457),
                ((true, 2), 16205),
                ((true, 3), 17290),
                ((true, 4), 16713),
            ],
        ),
        (
            4096,
            96,
            &[
                ((false, 1), 17520),
                ((false, 2), 17656),
                ((false, 3), 18117),
                ((false, 4), 18116),
                ((true, 1), 18033),
                ((true, 2), 18566),
                ((true, 3), 19316),
                ((true, 4), 19103),
            ],
        ),
        (
            4096,
            112,
            &[
                ((false, 1), 21814),
                ((false, 2), 20684),
                ((false, 3), 20607),
                ((true, 1), 22379),
                ((true, 2), 21485),
                ((true, 3), 22670),
            ],
        ),
        (
            4096,
            128,
            &[
                ((false, 1), 22765),
                ((false, 2), 23364),
                ((false, 3), 23087),
                ((true, 1), 23227),
                ((true, 2), 23943),
                ((true, 3), 24836),
            ],
        ),
    ];

    #[test]
    fn the_plan_cost_model_picks_the_measured_best_form_and_share_count() {
        let rule = SplitRule::Cost {
            wave: decode_split_wave(132, 3),
            ctas: decode_split_ctas(132),
            deep_wave: decode_split_wave(132, 2),
        };
        let mut misses = Vec::new();
        for &(context, batch, measured) in H200_PLAN_REPLAYS {
            let pick = decode_plan(batch, 8, rule, context, DEFAULT_MAX_DECODE_SPLITS);
            let best = measured.iter().map(|&(_, us)| us).min().unwrap_or(0);
            // A row of `context` keys fills at most context / 128 shares: 8 and 16 shares run the same.
            let used = |s: usize| s.min(context.div_ceil(DECODE_SPLIT_MIN_KEYS));
            let Some(&(_, us)) =
                measured.iter().find(|&&((deep, s), _)| deep == pick.deep && used(s) == used(pick.splits))
            else {
                panic!("context {context}, batch {batch}: {pick} was not measured");
            };
            // Within 0.5% (the rounds of such replays agree to ~0.2%; in-sample: DEEP_KEY_PERCENT was
            // fitted to these runs).
            if us * 1000 > best * 1005 {
                misses.push((context, batch, pick, us, best));
            }
        }
        assert!(misses.is_empty(), "{misses:?}");
        // The deep form where its CTAs fill about two of its waves or fewer: batches 1-16, 32, 56 and 64
        // at context 1024, the plain form at 24, 40, 48 and from 80 up.
        let deep_at_1024: Vec<usize> = [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128]
            .into_iter()
            .filter(|&b| decode_plan(b, 8, rule, 1024, DEFAULT_MAX_DECODE_SPLITS).deep)
            .collect();
        assert_eq!(deep_at_1024, vec![1, 2, 4, 8, 16, 32, 56, 64]);
        assert_eq!(decode_plan(32, 8, rule, 1024, DEFAULT_MAX_DECODE_SPLITS), DecodePlan { splits: 1, deep: true });
    }

    #[test]
    fn graphs_get_a_share_count_per_context_range_that_needs_one() {
        let plain = DecodePlan::plain;
        let rule = SplitRule::Cost { wave: decode_split_wave(132, 3), ctas: decode_split_ctas(132), deep_wave: 0 };
        // Batch 32 of the 8B shape: three shares for long contexts, none for short ones.
        let plans = graph_plans(32, 8, rule, 8192, DEFAULT_MAX_DECODE_SPLITS);
        assert_eq!(plans, vec![plain(3), plain(1)]);
        assert_eq!(plans[graph_plan_choice(256, 1024, rule, &plans)], plain(1));
        assert_eq!(plans[graph_plan_choice(256, 4096, rule, &plans)], plain(3));
        // Batch 1: the most shares serve every context (a short row fills fewer of them).
        assert_eq!(graph_plans(1, 8, rule, 8192, DEFAULT_MAX_DECODE_SPLITS), vec![plain(16)]);
        // A short max_model_len: one graph.
        assert_eq!(graph_plans(32, 8, rule, 1024, DEFAULT_MAX_DECODE_SPLITS), vec![plain(1)]);
        // With the deep form: batch 32 takes it for short contexts.
        let deep_rule = SplitRule::Cost {
            wave: decode_split_wave(132, 3),
            ctas: decode_split_ctas(132),
            deep_wave: decode_split_wave(132, 2),
        };
        let plans = graph_plans(32, 8, deep_rule, 8192, DEFAULT_MAX_DECODE_SPLITS);
        assert_eq!(plans[graph_plan_choice(256, 1024, deep_rule, &plans)], DecodePlan { splits: 1, deep: true });
        assert_eq!(plans[graph_plan_choice(256, 4096, deep_rule, &plans)], DecodePlan { splits: 1, deep: true });
        // Other rules: one graph of their count at the longest context.
        let wave = SplitRule::Wave(396);
        assert_eq!(graph_plans(24, 8, wave, 8192, DEFAULT_MAX_DECODE_SPLITS), vec![plain(2)]);
        assert_eq!(graph_plan_choice(192, 100, wave, &[plain(2)]), 0);
        // Few graphs for any batch and context, each count within the scratch and chosen somewhere.
        for rule in [rule, deep_rule] {
            for batch in [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 256, 512] {
                for max_context in [16, 1000, 4096, 8192, 32768, 131072] {
                    let plans = graph_plans(batch, 8, rule, max_context, DEFAULT_MAX_DECODE_SPLITS);
                    assert!(!plans.is_empty() && plans.len() <= 4, "{batch} {max_context}: {plans:?}");
                    for p in &plans {
                        assert!(p.splits == 1 || batch * 8 * p.splits <= decode_split_ctas(132), "{batch}: {plans:?}");
                    }
                }
            }
        }
    }
}
