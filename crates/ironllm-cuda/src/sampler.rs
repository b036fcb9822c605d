//! The batch sampler on the GPU: one token (and, on request, its logprobs) per row of device logits,
//! with the CPU sampler's semantics (`ironllm_model::sampler`, vLLM V1's order and tie rules).
//!
//! One step is one upload, one launch and one download:
//! - the host packs every row's parameters and its sparse lists (allowed ids; the ids banned this step
//!   by bad words and min-tokens; logit bias; `(token, output count, in prompt)` penalty entries, built
//!   only for rows that use penalties) into one `u32` buffer (`[rows, HEADER_WORDS]` headers, then the
//!   lists);
//! - `sampler_sample_f32` runs one CTA per row (`kernels/sampler.cu`): raw logprobs, the processors in
//!   place, then the argmax or the random path (temperature, min-p, top-k, top-p by radix selection,
//!   never a sort) and the draw;
//! - the sampled ids and the requested logprobs come back in one small `[rows, 4 + 2 * k]` array, copied
//!   into pinned host memory without waiting: [`GpuSampler::launch`] returns once the copy is queued and
//!   [`GpuSampler::finish`] waits for that copy alone (async scheduling does host work in between, and may
//!   queue the next step first: the pinned buffer alternates between two, so the next step's copy never
//!   lands in the one being read, and the next step can take the ids from the device output).
//!
//! The draw is the exponential race `argmax_i (v_i - log E_i)` with `E_i ~ Exp(1)` from Philox4x32-10
//! keyed by the request's seed and counted by (output position, token index), so a request's `n`-th
//! token depends only on its seed, `n` and its logits: batch composition, preemption and the grid do not
//! matter. The distribution is the CPU sampler's; the seeded values differ (another generator).
//!
//! Invariants: buffers grow to the largest step seen and are then reused; no input of a request can make
//! the kernel read or write outside a buffer (ids at or above the vocabulary are dropped here); more
//! than [`DEVICE_MAX_LOGPROBS`] logprobs are computed on the host from a copy of the raw row, exactly as
//! the CPU sampler does.

use std::sync::Arc;

use cudarc::driver::{
    CudaEvent, CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PinnedHostSlice, PushKernelArg,
    ValidAsZeroBits,
};
use ironllm_core::outputs::{PositionLogprobs, TokenLogprob};
use ironllm_core::SamplingParams;
use ironllm_model::sampler::{SampledToken, Sampler};

use crate::device::Gpu;
use crate::error::{CudaError, DriverContext};

/// Largest number of top logprobs per row computed on the GPU (`SMP_KMAX` in `sampler.cu`).
pub const DEVICE_MAX_LOGPROBS: usize = 1024;
/// Threads per CTA (`SMP_THREADS` in `sampler.cu`).
const THREADS: u32 = 1024;
/// The split path for plain rows (`sampler_plain_split_f32`): its threads per block, the largest batch it
/// serves (beyond, one block per row fills the card) and the most blocks per row.
const PLAIN_THREADS: u32 = 256;
const PLAIN_SPLIT_MAX_ROWS: usize = 512;
const PLAIN_MAX_SPLITS: usize = 32;
/// Blocks per SM the split path aims for (`IRONLLM_SAMPLER_BLOCKS_PER_SM` for side-by-side runs; 5 of its
/// 256-thread blocks are resident at its 48 registers a thread). The kernel is bound by its arithmetic (an
/// IEEE division, a Philox draw and two logarithms per token), not by bandwidth. Measured on an H200
/// (2026-11-28, 8B shape, `bench/gpu_sampler_ab.sh`, the step's sampler and its copy, temperature 1):
/// with 2 / 4 / 8 blocks per SM 0.046 / 0.039 / 0.039 ms at batch 32, 0.144 / 0.121 / 0.114 at 128,
/// 0.304 / 0.224 / 0.210 at 256 (one block a row: 0.134, 0.159, 0.305).
const PLAIN_BLOCKS_PER_SM: usize = 8;
/// Words of a row's header (`SMP_HDR` and the `SMP_H_*` indices in `sampler.cu`).
const HEADER_WORDS: usize = 24;
/// Words before the top list in a row of the output (`SMP_OUT_HEAD`).
const OUT_HEAD: usize = 4;

const FLAG_GREEDY: u32 = 1;
const FLAG_LOGPROBS: u32 = 2;
const FLAG_ALLOWED: u32 = 4;
const FLAG_COPY_RAW: u32 = 8;

mod h {
    pub const FLAGS: usize = 0;
    pub const TEMPERATURE: usize = 1;
    pub const MIN_P: usize = 2;
    pub const TOP_K: usize = 3;
    pub const TOP_P: usize = 4;
    pub const SEED_LO: usize = 5;
    pub const SEED_HI: usize = 6;
    pub const POS_LO: usize = 7;
    pub const POS_HI: usize = 8;
    pub const LOGPROBS_K: usize = 9;
    pub const RAW_SLOT: usize = 10;
    pub const ALLOWED_OFF: usize = 11;
    pub const BANNED_OFF: usize = 13;
    pub const BIAS_OFF: usize = 15;
    pub const PEN_OFF: usize = 17;
    pub const REPETITION: usize = 19;
    pub const FREQUENCY: usize = 20;
    pub const PRESENCE: usize = 21;
}

/// One row of the batch: the request's parameters, its tokens so far and its generator seed.
#[derive(Debug, Clone, Copy)]
pub struct GpuSamplingRow<'a> {
    pub params: &'a SamplingParams,
    pub prompt_token_ids: &'a [u32],
    pub output_token_ids: &'a [u32],
    /// The request's generator seed: `params.seed`, or one the runner drew for the request when it first
    /// saw it.
    pub seed: u64,
}

/// Host-side token statistics for the penalty lists: a vocabulary-sized table stamped with the row being
/// built, so a row costs O(prompt + output) and nothing is cleared between rows.
#[derive(Debug, Default)]
struct TokenTally {
    stamp: Vec<u32>,
    count: Vec<u32>,
    in_prompt: Vec<bool>,
    current: u32,
    seen: Vec<u32>,
}

impl TokenTally {
    /// Appends `(token, output count, in prompt)` for every distinct token of the row to `out`. Prompt-only
    /// tokens are listed only when the repetition penalty (the one penalty that reads them) is on.
    fn append_entries(
        &mut self,
        vocab_size: usize,
        prompt: &[u32],
        output: &[u32],
        with_prompt: bool,
        out: &mut Vec<u32>,
    ) {
        if self.stamp.len() != vocab_size {
            self.stamp = vec![0; vocab_size];
            self.count = vec![0; vocab_size];
            self.in_prompt = vec![false; vocab_size];
            self.current = 0;
        }
        self.current = self.current.wrapping_add(1);
        if self.current == 0 {
            self.stamp.fill(0);
            self.current = 1;
        }
        let stamp = self.current;
        self.seen.clear();
        if with_prompt {
            for &t in prompt {
                let Some(slot) = self.stamp.get_mut(t as usize) else { continue };
                if *slot != stamp {
                    *slot = stamp;
                    self.count[t as usize] = 0;
                    self.seen.push(t);
                }
                self.in_prompt[t as usize] = true;
            }
        }
        for &t in output {
            let Some(slot) = self.stamp.get_mut(t as usize) else { continue };
            if *slot != stamp {
                *slot = stamp;
                self.count[t as usize] = 0;
                self.in_prompt[t as usize] = false;
                self.seen.push(t);
            }
            self.count[t as usize] += 1;
        }
        for &t in &self.seen {
            out.extend_from_slice(&[t, self.count[t as usize], u32::from(self.in_prompt[t as usize])]);
        }
    }
}

/// A sampling step launched by [`GpuSampler::launch`], to be finished by [`GpuSampler::finish`].
#[derive(Debug, Default)]
pub struct PendingSample {
    /// Words per row of the output.
    out_stride: usize,
    /// Which of the two pinned buffers the results are copied into.
    slot: usize,
    /// Per row: whether its logprobs come from the device.
    device_logprobs: Vec<bool>,
    /// Rows whose logprob lists the host computes, `(row, k)`, with their raw logits.
    host_logprobs: Vec<(usize, usize)>,
    host_raw: Vec<Vec<f32>>,
}

impl PendingSample {
    /// Words per row of the device output ([`GpuSampler::device_output`]).
    pub fn out_stride(&self) -> usize {
        self.out_stride
    }

    /// Rows launched (0 when nothing was sampled).
    pub fn rows(&self) -> usize {
        self.device_logprobs.len()
    }
}

/// The batch sampler on the GPU. Holds its device buffers, grown to the largest step seen.
pub struct GpuSampler {
    gpu: Arc<Gpu>,
    vocab_size: usize,
    /// Row headers and lists of the step being built (`[rows, HEADER_WORDS]`, then the lists).
    meta_host: Vec<u32>,
    meta_dev: CudaSlice<u32>,
    /// Scratch the kernel keeps allowed logits in; as long as `meta_dev`.
    saved_dev: CudaSlice<f32>,
    /// Raw copies of the rows that want logprobs and get modified (`[slots, vocab]`).
    raw_dev: CudaSlice<f32>,
    out_dev: CudaSlice<u32>,
    out_host: Vec<u32>,
    /// Where the sampled ids land without a blocking copy (grown like the device buffers): two buffers
    /// used in turn, so a step's results stay readable while the next step is queued.
    out_pinned: [Option<PinnedHostSlice<u32>>; 2],
    /// Recorded after each buffer's copy (cudarc records nothing itself with event tracking off).
    out_copied: [CudaEvent; 2],
    next_slot: usize,
    targets_dev: CudaSlice<u32>,
    /// Per (row, block) winners of the split path for plain rows (`sampler_plain_split_f32`).
    plain_partial: CudaSlice<u32>,
    /// Whether plain rows of small batches take the split path (on; off for tests and A/B).
    split_plain_rows: bool,
    /// Blocks per SM the split path aims for ([`PLAIN_BLOCKS_PER_SM`] unless measuring).
    plain_blocks_per_sm: usize,
    tally: TokenTally,
    /// The CPU sampler, for logprob lists longer than [`DEVICE_MAX_LOGPROBS`].
    cpu: Sampler,
}

impl std::fmt::Debug for GpuSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuSampler").field("vocab_size", &self.vocab_size).finish_non_exhaustive()
    }
}

/// Grows `buf` to at least `len` elements (contents are not kept).
fn grow<T: DeviceRepr + ValidAsZeroBits>(gpu: &Gpu, buf: &mut CudaSlice<T>, len: usize) -> Result<(), CudaError> {
    if buf.len() < len {
        *buf = gpu.alloc_zeros::<T>(len.max(buf.len().saturating_mul(2)))?;
    }
    Ok(())
}

fn u32_of(n: usize, what: &str) -> Result<u32, CudaError> {
    u32::try_from(n).map_err(|_| CudaError::Invalid(format!("{what} = {n} does not fit in 32 bits")))
}

fn launch_config(rows: usize) -> Result<LaunchConfig, CudaError> {
    let grid = u32::try_from(rows)
        .ok()
        .filter(|&r| r <= i32::MAX as u32)
        .ok_or_else(|| CudaError::Invalid(format!("sampler: {rows} rows do not fit in one grid")))?;
    Ok(LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })
}

/// Whether any logits processor changes this row this step (the CPU sampler's `processors::any_active`).
fn processors_active(params: &SamplingParams, output_token_ids: &[u32]) -> bool {
    params.allowed_token_ids.is_some()
        || !params.bad_words_token_ids.is_empty()
        || min_tokens_active(params, output_token_ids)
        || !params.logit_bias.is_empty()
        || params.has_penalties()
}

fn min_tokens_active(params: &SamplingParams, output_token_ids: &[u32]) -> bool {
    output_token_ids.len() < params.min_tokens && !(params.eos_token_ids.is_empty() && params.stop_token_ids.is_empty())
}

/// Reads one row of the kernel's output (`[token, logprob bits, rank, n, (id, logprob bits) * n]`).
fn parse_logprobs(row: &[u32], chosen: u32) -> PositionLogprobs {
    let n = (row[3] as usize).min((row.len() - OUT_HEAD) / 2);
    let top = (0..n)
        .map(|i| TokenLogprob {
            token_id: row[OUT_HEAD + 2 * i],
            logprob: f32::from_bits(row[OUT_HEAD + 2 * i + 1]),
            rank: i as u32 + 1,
        })
        .collect();
    PositionLogprobs { chosen: TokenLogprob { token_id: chosen, logprob: f32::from_bits(row[1]), rank: row[2] }, top }
}

impl GpuSampler {
    pub fn new(gpu: Arc<Gpu>, vocab_size: usize) -> Result<GpuSampler, CudaError> {
        if vocab_size == 0 || i32::try_from(vocab_size).is_err() {
            return Err(CudaError::Invalid(format!("sampler: `vocab_size` must be in [1, 2^31), got {vocab_size}")));
        }
        // Fail at start-up, not at the first step, when the kernels are missing.
        gpu.function("sampler_sample_f32")?;
        let new_event = || gpu.ctx.new_event(None).at(|| "creating an event".into());
        let out_copied = [new_event()?, new_event()?];
        gpu.function("sampler_prompt_logprobs_f32")?;
        gpu.function("sampler_plain_split_f32")?;
        gpu.function("sampler_plain_merge_f32")?;
        Ok(GpuSampler {
            meta_dev: gpu.alloc_zeros(1)?,
            saved_dev: gpu.alloc_zeros(1)?,
            raw_dev: gpu.alloc_zeros(1)?,
            out_dev: gpu.alloc_zeros(1)?,
            targets_dev: gpu.alloc_zeros(1)?,
            plain_partial: gpu.alloc_zeros(1)?,
            split_plain_rows: std::env::var_os("IRONLLM_SAMPLER_NO_SPLIT").is_none(),
            plain_blocks_per_sm: std::env::var("IRONLLM_SAMPLER_BLOCKS_PER_SM")
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .map_or(PLAIN_BLOCKS_PER_SM, |n| n.clamp(1, 64)),
            gpu,
            vocab_size,
            meta_host: Vec::new(),
            out_host: Vec::new(),
            out_pinned: [None, None],
            out_copied,
            next_slot: 0,
            tally: TokenTally::default(),
            cpu: Sampler::new(vocab_size),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// One token per row. `logits` is device f32 `[rows.len(), vocab]` (raw model output); it is used as
    /// scratch (processed in place).
    pub fn sample(
        &mut self,
        logits: &mut CudaViewMut<'_, f32>,
        rows: &[GpuSamplingRow<'_>],
    ) -> Result<Vec<SampledToken>, CudaError> {
        let pending = self.launch(logits, rows)?;
        self.finish(pending)
    }

    /// Uploads the rows' parameters, launches the sampling kernel and queues the copy of its results to
    /// pinned host memory, without waiting for any of it. [`GpuSampler::finish`] (before the next launch
    /// or prompt-logprobs call, which reuse the buffers) waits and parses.
    pub fn launch(
        &mut self,
        logits: &mut CudaViewMut<'_, f32>,
        rows: &[GpuSamplingRow<'_>],
    ) -> Result<PendingSample, CudaError> {
        let vocab = self.vocab_size;
        if logits.len() != rows.len() * vocab {
            return Err(CudaError::Invalid(format!(
                "sampler: logits hold {} values, need [rows = {}, vocab = {vocab}]",
                logits.len(),
                rows.len()
            )));
        }
        if rows.is_empty() {
            return Ok(PendingSample::default());
        }
        let cfg = launch_config(rows.len())?;

        // Headers and lists, one upload.
        let meta = &mut self.meta_host;
        meta.clear();
        meta.resize(rows.len() * HEADER_WORDS, 0);
        let mut device_k = 0usize;
        let mut raw_slots = 0u32;
        // Rows whose logprob list is too long for the kernel: (row, k).
        let mut host_logprobs: Vec<(usize, usize)> = Vec::new();
        // Whether every row is plain: no processor, no logprobs, no truncation (greedy, or temperature).
        let mut all_plain = true;
        for (r, row) in rows.iter().enumerate() {
            let p = row.params;
            let base = r * HEADER_WORDS;
            let active = processors_active(p, row.output_token_ids);
            all_plain &= !active
                && p.logprobs.is_none()
                && (p.is_greedy()
                    || (p.min_p <= 0.0 && p.top_k_enabled().filter(|&k| k < vocab).is_none() && p.top_p >= 1.0));
            let mut flags = 0;
            if p.is_greedy() {
                flags |= FLAG_GREEDY;
            }
            match p.logprobs {
                Some(k) if k <= DEVICE_MAX_LOGPROBS => {
                    flags |= FLAG_LOGPROBS;
                    device_k = device_k.max(k);
                    meta[base + h::LOGPROBS_K] = k as u32;
                    if active {
                        flags |= FLAG_COPY_RAW;
                        meta[base + h::RAW_SLOT] = raw_slots;
                        raw_slots += 1;
                    }
                }
                Some(k) => host_logprobs.push((r, k)),
                None => {}
            }
            meta[base + h::TEMPERATURE] = p.temperature.to_bits();
            meta[base + h::MIN_P] = p.min_p.to_bits();
            meta[base + h::TOP_K] = p.top_k_enabled().filter(|&k| k < vocab).unwrap_or(0) as u32;
            meta[base + h::TOP_P] = p.top_p.min(1.0).to_bits();
            meta[base + h::SEED_LO] = row.seed as u32;
            meta[base + h::SEED_HI] = (row.seed >> 32) as u32;
            let position = row.output_token_ids.len() as u64;
            meta[base + h::POS_LO] = position as u32;
            meta[base + h::POS_HI] = (position >> 32) as u32;
            meta[base + h::REPETITION] = p.repetition_penalty.to_bits();
            meta[base + h::FREQUENCY] = p.frequency_penalty.to_bits();
            meta[base + h::PRESENCE] = p.presence_penalty.to_bits();

            let in_vocab = |&id: &u32| (id as usize) < vocab;
            // (2) Allowed ids.
            if let Some(allowed) = &p.allowed_token_ids {
                flags |= FLAG_ALLOWED;
                let off = meta.len();
                meta.extend(allowed.iter().copied().filter(in_vocab));
                meta[base + h::ALLOWED_OFF] = u32_of(off, "sampler metadata")?;
                meta[base + h::ALLOWED_OFF + 1] = u32_of(meta.len() - off, "allowed ids")?;
            }
            // (3) Bad words: the last token of every word whose prefix ends the output; (4) min-tokens.
            let off = meta.len();
            for word in &p.bad_words_token_ids {
                if let Some((&last, prefix)) = word.split_last() {
                    if row.output_token_ids.ends_with(prefix) && in_vocab(&last) {
                        meta.push(last);
                    }
                }
            }
            if min_tokens_active(p, row.output_token_ids) {
                meta.extend(p.eos_token_ids.iter().chain(&p.stop_token_ids).copied().filter(in_vocab));
            }
            meta[base + h::BANNED_OFF] = u32_of(off, "sampler metadata")?;
            meta[base + h::BANNED_OFF + 1] = u32_of(meta.len() - off, "banned ids")?;
            // (5) Logit bias.
            let off = meta.len();
            for (&id, &bias) in &p.logit_bias {
                if in_vocab(&id) {
                    meta.extend_from_slice(&[id, bias.to_bits()]);
                }
            }
            meta[base + h::BIAS_OFF] = u32_of(off, "sampler metadata")?;
            meta[base + h::BIAS_OFF + 1] = u32_of((meta.len() - off) / 2, "logit bias")?;
            // (6) Penalties.
            let off = meta.len();
            if p.has_penalties() {
                let with_prompt = p.repetition_penalty != 1.0;
                self.tally.append_entries(vocab, row.prompt_token_ids, row.output_token_ids, with_prompt, meta);
            }
            meta[base + h::PEN_OFF] = u32_of(off, "sampler metadata")?;
            meta[base + h::PEN_OFF + 1] = u32_of((meta.len() - off) / 3, "penalty entries")?;
            meta[base + h::FLAGS] = flags;
        }
        u32_of(meta.len(), "sampler metadata")?;

        let gpu = &*self.gpu;
        let stream = gpu.stream();
        grow(gpu, &mut self.meta_dev, meta.len())?;
        grow(gpu, &mut self.saved_dev, meta.len())?;
        grow(gpu, &mut self.raw_dev, raw_slots as usize * vocab)?;
        let out_stride = OUT_HEAD + 2 * device_k;
        let out_len = rows.len() * out_stride;
        let slot = self.next_slot;
        self.next_slot ^= 1;
        if self.out_pinned[slot].as_ref().is_none_or(|p| p.len() < out_len) {
            // SAFETY: page-locked host memory that only the device writes (the copy below) before the host
            // reads it in `finish`; no write-combining, since the host reads it.
            let pinned = unsafe { gpu.ctx.alloc_pinned_with_flags::<u32>(out_len.next_power_of_two(), 0) }
                .at(|| "allocating pinned memory for the sampled tokens".into())?;
            self.out_pinned[slot] = Some(pinned);
        }
        // A copy into pinned memory moves the whole pinned buffer, so the device side is at least as long
        // (the words past `out_len` are stale and never read).
        let copy_len = self.out_pinned[slot].as_ref().map_or(out_len, |p| p.len());
        grow(gpu, &mut self.out_dev, copy_len)?;
        stream.memcpy_htod(meta.as_slice(), &mut self.meta_dev).at(|| "uploading the sampler metadata".into())?;

        // Raw rows for the host's long logprob lists, before the kernel processes them in place.
        let mut host_raw: Vec<Vec<f32>> = Vec::with_capacity(host_logprobs.len());
        for &(r, _) in &host_logprobs {
            let mut raw = vec![0.0f32; vocab];
            stream
                .memcpy_dtoh(&logits.slice(r * vocab..(r + 1) * vocab), &mut raw)
                .at(|| "copying a raw logits row for logprobs".into())?;
            host_raw.push(raw);
        }

        let vocab_i = vocab as i32;
        let stride_i = i32::try_from(out_stride)
            .map_err(|_| CudaError::Invalid(format!("sampler: output stride {out_stride} too large")))?;
        let splits = match all_plain && self.split_plain_rows && rows.len() <= PLAIN_SPLIT_MAX_ROWS {
            true => (self.plain_blocks_per_sm * gpu.info.multiprocessors / rows.len()).clamp(1, PLAIN_MAX_SPLITS),
            false => 1,
        };
        if splits > 1 {
            grow(gpu, &mut self.plain_partial, rows.len() * splits * 4)?;
            let splits_i = splits as i32;
            let split_cfg = LaunchConfig {
                grid_dim: (rows.len() as u32, splits as u32, 1),
                block_dim: (PLAIN_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let merge_cfg =
                LaunchConfig { grid_dim: (rows.len() as u32, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
            let (split_f, merge_f) =
                (gpu.function("sampler_plain_split_f32")?, gpu.function("sampler_plain_merge_f32")?);
            // SAFETY: logits is [rows, vocab]; the headers describe `rows` rows; `plain_partial` holds
            // rows * splits * 4 words; the merge writes word row * out_stride of `out_dev` for each row,
            // which holds rows * out_stride words.
            unsafe {
                stream
                    .launch_builder(split_f)
                    .arg(&mut *logits)
                    .arg(&vocab_i)
                    .arg(&self.meta_dev)
                    .arg(&mut self.plain_partial)
                    .arg(&splits_i)
                    .launch(split_cfg)
            }
            .at(|| "sampler_plain_split_f32".into())?;
            unsafe {
                stream
                    .launch_builder(merge_f)
                    .arg(&self.meta_dev)
                    .arg(&self.plain_partial)
                    .arg(&splits_i)
                    .arg(&mut self.out_dev)
                    .arg(&stride_i)
                    .launch(merge_cfg)
            }
            .at(|| "sampler_plain_merge_f32".into())?;
            return self.copy_out(slot, copy_len, out_stride, rows, host_logprobs, host_raw);
        }
        let f = gpu.function("sampler_sample_f32")?;
        // SAFETY: logits is [rows, vocab] (checked above); the headers describe exactly `rows` rows and
        // every offset and length in them points inside `meta` (built above), which `meta_dev` and
        // `saved_dev` hold in full; every id in the lists is below `vocab`; raw slots are below
        // `raw_slots` and `raw_dev` holds `raw_slots * vocab` values; the kernel writes at most
        // `out_stride` words per row (its top list is at most the row's k <= device_k) into `out_dev`,
        // which holds `rows * out_stride` words.
        unsafe {
            stream
                .launch_builder(f)
                .arg(&mut *logits)
                .arg(&vocab_i)
                .arg(&self.meta_dev)
                .arg(&mut self.saved_dev)
                .arg(&mut self.raw_dev)
                .arg(&mut self.out_dev)
                .arg(&stride_i)
                .launch(cfg)
        }
        .at(|| "sampler_sample_f32".into())?;
        self.copy_out(slot, copy_len, out_stride, rows, host_logprobs, host_raw)
    }

    /// Queues the copy of the step's results into pinned buffer `slot` and records its event.
    fn copy_out(
        &mut self,
        slot: usize,
        copy_len: usize,
        out_stride: usize,
        rows: &[GpuSamplingRow<'_>],
        host_logprobs: Vec<(usize, usize)>,
        host_raw: Vec<Vec<f32>>,
    ) -> Result<PendingSample, CudaError> {
        let stream = self.gpu.stream();
        let pinned = self.out_pinned[slot].as_mut().ok_or_else(|| CudaError::Invalid("pinned buffer".into()))?;
        stream
            .memcpy_dtoh(&self.out_dev.slice(..copy_len), pinned)
            .at(|| "copying the sampled tokens from the GPU".into())?;
        self.out_copied[slot].record(stream).at(|| "recording the sampled tokens' copy".into())?;
        Ok(PendingSample {
            out_stride,
            slot,
            device_logprobs: rows.iter().map(|r| r.params.logprobs.is_some_and(|k| k <= DEVICE_MAX_LOGPROBS)).collect(),
            host_logprobs,
            host_raw,
        })
    }

    /// Waits for a launched sampling step's results (only for their copy, not for work queued after it)
    /// and returns one token (and its logprobs, if asked) per row.
    pub fn finish(&mut self, pending: PendingSample) -> Result<Vec<SampledToken>, CudaError> {
        let rows = pending.device_logprobs.len();
        if rows == 0 {
            return Ok(Vec::new());
        }
        self.out_copied[pending.slot].synchronize().at(|| "waiting for the sampled tokens".into())?;
        let pinned =
            self.out_pinned[pending.slot].as_ref().ok_or_else(|| CudaError::Invalid("pinned buffer".into()))?;
        let out = pinned.as_slice().at(|| "reading the sampled tokens".into())?;
        let out = out
            .get(..rows * pending.out_stride)
            .ok_or_else(|| CudaError::Invalid("sampler output shorter than its rows".into()))?;
        let mut sampled: Vec<SampledToken> = out
            .chunks_exact(pending.out_stride)
            .zip(&pending.device_logprobs)
            .map(|(out, &device_lp)| {
                let token_id = out[0];
                SampledToken { token_id, logprobs: device_lp.then(|| parse_logprobs(out, token_id)) }
            })
            .collect();
        for (&(r, k), raw) in pending.host_logprobs.iter().zip(&pending.host_raw) {
            let token_id = sampled[r].token_id;
            sampled[r].logprobs = self.cpu.prompt_logprobs(raw, &[token_id], k).pop();
        }
        Ok(sampled)
    }

    /// Whether plain rows of small batches (no processor, no logprobs, no truncation) are split over many
    /// blocks (the default; the same tokens either way). Off runs every row through the general kernel.
    pub fn set_split_plain_rows(&mut self, on: bool) {
        self.split_plain_rows = on;
    }

    /// The device output of the last launch: row `r`'s sampled id is word `r * stride` (the stride is
    /// [`PendingSample::out_stride`]). Valid for work queued on the stream before the next launch.
    pub fn device_output(&self) -> &CudaSlice<u32> {
        &self.out_dev
    }

    /// Prompt logprobs: row `i` of `logits` (`[targets.len(), vocab]`, raw) -> the logprob and rank of
    /// `targets[i]` plus the top `k`.
    pub fn prompt_logprobs(
        &mut self,
        logits: &CudaView<'_, f32>,
        targets: &[u32],
        k: usize,
    ) -> Result<Vec<PositionLogprobs>, CudaError> {
        let vocab = self.vocab_size;
        if logits.len() != targets.len() * vocab {
            return Err(CudaError::Invalid(format!(
                "prompt logprobs: logits hold {} values, need [targets = {}, vocab = {vocab}]",
                logits.len(),
                targets.len()
            )));
        }
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let gpu = &*self.gpu;
        let stream = gpu.stream();
        if k > DEVICE_MAX_LOGPROBS {
            // Rare (vLLM caps k at --max-logprobs, 20 by default): the CPU code on a host copy.
            let mut raw = vec![0.0f32; logits.len()];
            stream.memcpy_dtoh(logits, &mut raw).at(|| "copying prompt logits from the GPU".into())?;
            stream.synchronize().at(|| "waiting for the GPU".into())?;
            return Ok(self.cpu.prompt_logprobs(&raw, targets, k));
        }
        let cfg = launch_config(targets.len())?;
        grow(gpu, &mut self.targets_dev, targets.len())?;
        let out_stride = OUT_HEAD + 2 * k;
        let out_len = targets.len() * out_stride;
        grow(gpu, &mut self.out_dev, out_len)?;
        stream.memcpy_htod(targets, &mut self.targets_dev).at(|| "uploading prompt logprob targets".into())?;
        let f = gpu.function("sampler_prompt_logprobs_f32")?;
        let (vocab_i, k_u, stride_i) = (vocab as i32, k as u32, out_stride as i32);
        // SAFETY: logits is [targets, vocab] (checked above); `targets_dev` holds every target; the kernel
        // writes at most `out_stride` words per row into `out_dev`, which holds `targets * out_stride`.
        // Targets at or above the vocabulary are never used as an index (their logit reads as -inf).
        unsafe {
            stream
                .launch_builder(f)
                .arg(logits)
                .arg(&vocab_i)
                .arg(&self.targets_dev)
                .arg(&k_u)
                .arg(&mut self.out_dev)
                .arg(&stride_i)
                .launch(cfg)
        }
        .at(|| "sampler_prompt_logprobs_f32".into())?;
        self.out_host.resize(out_len, 0);
        stream
            .memcpy_dtoh(&self.out_dev.slice(..out_len), &mut self.out_host[..out_len])
            .at(|| "copying prompt logprobs from the GPU".into())?;
        stream.synchronize().at(|| "waiting for the GPU".into())?;
        Ok(self.out_host.chunks_exact(out_stride).zip(targets).map(|(out, &t)| parse_logprobs(out, t)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_lists_each_token_once_with_its_output_count() {
        let mut tally = TokenTally::default();
        let mut out = Vec::new();
        tally.append_entries(10, &[5, 3, 5, 99], &[1, 3, 1, 42], true, &mut out);
        assert_eq!(out, [5, 0, 1, 3, 1, 1, 1, 2, 0]);
        // The next row starts from a clean slate.
        out.clear();
        tally.append_entries(10, &[5], &[5, 7], false, &mut out);
        assert_eq!(out, [5, 1, 0, 7, 1, 0]);
    }

    #[test]
    fn processor_activity_follows_the_cpu_rules() {
        let params = SamplingParams::default();
        assert!(!processors_active(&params, &[]));
        let params = SamplingParams { min_tokens: 2, eos_token_ids: vec![0], ..Default::default() };
        assert!(processors_active(&params, &[4]));
        assert!(!processors_active(&params, &[4, 4]));
    }

    #[test]
    fn output_rows_parse_into_position_logprobs() {
        let row = [7, (-0.5f32).to_bits(), 3, 2, 1, (-0.1f32).to_bits(), 7, (-0.5f32).to_bits(), 0, 0];
        let got = parse_logprobs(&row, 7);
        assert_eq!(got.chosen, TokenLogprob { token_id: 7, logprob: -0.5, rank: 3 });
        assert_eq!(got.top.len(), 2);
        assert_eq!(got.top[1], TokenLogprob { token_id: 7, logprob: -0.5, rank: 2 });
    }
}
