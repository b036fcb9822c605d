//! The GPU model runner: the CPU runner's bookkeeping (per-request token ids, block tables, computed
//! tokens; a request's state survives preemption so its seeded draws continue) over a GPU model, a GPU
//! KV cache and the GPU sampler.
//!
//! The flattened batch puts single-token (decode) sequences first, so the general paged-attention kernel
//! runs over a prefix of the tokens and the tensor-core prefill kernel over tiles of the rest. Batch
//! arrays are built in reused host vectors and copied into device buffers that only grow.
//!
//! Start-up sizes the KV cache like vLLM: load the weights, allocate the activation workspace for the
//! largest step, run one forward pass of `max_num_batched_tokens` tokens, then give the cache
//! `gpu_memory_utilization` of the card's memory minus everything in use.
//!
//!
//! A step is launched (inputs uploaded, forward and sampler queued, the sampled ids' copy to pinned
//! memory queued) and then finished (wait for that copy, read the ids, advance the requests). With async
//! scheduling (`submit_model` / `collect_model`) the runner returns right after the launch, so the
//! engine's scheduling of the next step and its output processing of the previous one run while the GPU
//! computes. Step N + 1 is then launched *before* step N is finished: a request that step N samples for
//! and step N + 1 computes again gets a placeholder input id, and a small kernel copies step N's sampled
//! id over it on the device (vLLM's async scheduling does the same), so the GPU goes from step N to
//! N + 1 without waiting for the host. Where step N + 1's host-side inputs need the token itself
//! (penalties, bad words, a grammar's bitmask) or the scheduler resumed the request from scratch, step N
//! is finished first, as without async scheduling; either way the outputs are the same.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaGraph, CudaSlice};
use ironllm_core::executor::{ModelExecutor, Submitted};
use ironllm_core::outputs::{ModelRunnerOutput, PositionLogprobs, SchedulerOutput};
use ironllm_core::{CoreError, SamplingParams};
use ironllm_model::proposer::Proposer;
use ironllm_model::runner_state::{fill_spec_masks, RunnerRequest, RunnerRequests, StepSamples};
use ironllm_model::sampler::Rng;

use crate::device::Gpu;
use crate::draft::CudaDraftModel;
use crate::error::{CudaError, DriverContext};
use crate::model::{CudaKvCache, CudaLlama, Workspace};
use crate::op_timer::{self, Op, OpMarks, OpTimer, StepWork, Work};
use crate::ops::{BatchMeta, DecodePlan, FLASH_BLOCK_M};
use crate::sampler::{GpuSampler, GpuSamplingRow, PendingSample};
use crate::step_timer::{StepEvents, StepTimer};
use crate::tensor::GpuDType;

/// How the KV cache is sized.
#[derive(Debug, Clone, Copy)]
pub enum KvCacheSize {
    /// This many bytes (`--kv-cache-memory-bytes`).
    Bytes(usize),
    /// This fraction of the card's memory for everything (`--gpu-memory-utilization`).
    Utilization(f64),
}

/// Settings of the runner.
#[derive(Clone)]
pub struct CudaRunnerConfig {
    pub block_size: usize,
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub kv_cache: KvCacheSize,
    pub seed: u64,
    pub max_model_len: usize,
    /// `--enforce-eager`: no CUDA graphs.
    pub enforce_eager: bool,
    /// Speculative decoding's draft model and its `num_speculative_tokens` (`"method": "draft_model"`).
    pub draft: Option<(Arc<CudaLlama>, usize)>,
    /// `num_speculative_tokens` of any speculative method (0 without): a verifying sequence samples
    /// one logits row per draft token too.
    pub num_speculative_tokens: usize,
}

/// Prompt-logprob rows per LM-head pass: their logits go through a buffer of this many rows (256 MiB for
/// a 128k vocabulary), not one row per token of the step.
pub const PROMPT_LOGPROB_CHUNK_ROWS: usize = 512;

/// What start-up measured, for the log line and `EngineInfo`.
#[derive(Debug, Clone)]
pub struct CudaMemoryReport {
    pub total_bytes: usize,
    pub weight_bytes: usize,
    pub peak_activation_bytes: usize,
    pub kv_cache_bytes: usize,
    pub num_blocks: usize,
    pub profile_seconds: f64,
    /// Batch sizes with a captured decode graph, and the time capturing took.
    pub graph_batch_sizes: Vec<usize>,
    /// Graphs captured (a batch size may have one per split-KV share count).
    pub graph_count: usize,
    pub graph_capture_seconds: f64,
}

/// Reused device buffers for the batch metadata; they only grow.
pub(crate) struct DeviceBatch {
    pub(crate) token_ids: CudaSlice<u32>,
    pub(crate) positions: CudaSlice<i32>,
    pub(crate) slots: CudaSlice<i64>,
    pub(crate) block_tables: CudaSlice<i32>,
    pub(crate) query_start_loc: CudaSlice<i32>,
    pub(crate) context_lens: CudaSlice<i32>,
    pub(crate) token_to_seq: CudaSlice<i32>,
    pub(crate) logits_rows: CudaSlice<i32>,
    /// One chunk of prompt-logprob rows (`PROMPT_LOGPROB_CHUNK_ROWS`).
    pub(crate) prompt_rows: CudaSlice<i32>,
    pub(crate) tiles: CudaSlice<i32>,
    /// Structured-output bitmasks of this step and the logits row each applies to.
    pub(crate) masks: CudaSlice<u32>,
    pub(crate) mask_rows: CudaSlice<i32>,
    /// Async scheduling: `(token index, sampler output word)` pairs fed from the previous step.
    pub(crate) fed: CudaSlice<i32>,
}

pub(crate) fn upload_into<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    gpu: &Gpu,
    dst: &mut CudaSlice<T>,
    host: &[T],
) -> Result<(), CudaError> {
    if host.is_empty() {
        return Ok(());
    }
    if dst.len() < host.len() {
        *dst = gpu.alloc_zeros::<T>(host.len().next_power_of_two())?;
    }
    let mut view = dst.slice_mut(0..host.len());
    gpu.stream().memcpy_htod(host, &mut view).at(|| "copying batch metadata to the GPU".into())
}

/// Host-side batch arrays, reused across steps.
#[derive(Default)]
pub(crate) struct HostBatch {
    pub(crate) token_ids: Vec<u32>,
    pub(crate) positions: Vec<i32>,
    pub(crate) slots: Vec<i64>,
    pub(crate) block_tables: Vec<i32>,
    pub(crate) query_start_loc: Vec<i32>,
    pub(crate) context_lens: Vec<i32>,
    pub(crate) token_to_seq: Vec<i32>,
    pub(crate) logits_rows: Vec<i32>,
    pub(crate) tiles: Vec<i32>,
    pub(crate) fed: Vec<i32>,
}

impl DeviceBatch {
    /// The forward's view of these buffers for a step of `num_tokens` tokens in `num_seqs` sequences (the
    /// first `num_decode_tokens` of them single-token), block-table rows of `max_blocks_per_seq`,
    /// `num_prefill_tiles` tensor-core prefill tiles, and no context longer than `max_context_len`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn meta(
        &self,
        num_tokens: usize,
        num_seqs: usize,
        max_blocks_per_seq: usize,
        num_decode_tokens: usize,
        num_prefill_tiles: usize,
        max_context_len: usize,
        decode_plan: Option<DecodePlan>,
    ) -> BatchMeta<'_> {
        BatchMeta {
            num_tokens,
            num_seqs,
            positions: &self.positions,
            slot_mapping: &self.slots,
            block_tables: &self.block_tables,
            max_blocks_per_seq,
            query_start_loc: &self.query_start_loc,
            context_lens: &self.context_lens,
            token_to_seq: &self.token_to_seq,
            num_decode_tokens,
            prefill_tiles: &self.tiles,
            num_prefill_tiles,
            max_context_len,
            decode_plan,
        }
    }

    /// Copies the step's host arrays into the device buffers (growing any that are too small).
    pub(crate) fn upload(&mut self, gpu: &Gpu, h: &HostBatch) -> Result<(), CudaError> {
        upload_into(gpu, &mut self.token_ids, &h.token_ids)?;
        upload_into(gpu, &mut self.positions, &h.positions)?;
        upload_into(gpu, &mut self.slots, &h.slots)?;
        upload_into(gpu, &mut self.block_tables, &h.block_tables)?;
        upload_into(gpu, &mut self.query_start_loc, &h.query_start_loc)?;
        upload_into(gpu, &mut self.context_lens, &h.context_lens)?;
        upload_into(gpu, &mut self.token_to_seq, &h.token_to_seq)?;
        upload_into(gpu, &mut self.logits_rows, &h.logits_rows)?;
        upload_into(gpu, &mut self.tiles, &h.tiles)?;
        upload_into(gpu, &mut self.fed, &h.fed)
    }

    /// Buffers sized for steps of `max_tokens` tokens, `max_seqs` sequences with block-table rows of
    /// `table_stride`, `max_rows` logits rows and a `vocab`-token bitmask.
    pub(crate) fn new(
        gpu: &Gpu,
        max_tokens: usize,
        max_seqs: usize,
        table_stride: usize,
        max_rows: usize,
        vocab: usize,
    ) -> Result<DeviceBatch, CudaError> {
        Ok(DeviceBatch {
            token_ids: gpu.alloc_zeros(max_tokens.max(max_seqs))?,
            positions: gpu.alloc_zeros(max_tokens.max(max_seqs))?,
            slots: gpu.alloc_zeros(max_tokens.max(max_seqs))?,
            block_tables: gpu.alloc_zeros(max_seqs * table_stride)?,
            query_start_loc: gpu.alloc_zeros(max_seqs + 1)?,
            context_lens: gpu.alloc_zeros(max_seqs)?,
            token_to_seq: gpu.alloc_zeros(max_tokens.max(max_seqs))?,
            logits_rows: gpu.alloc_zeros(max_rows)?,
            prompt_rows: gpu.alloc_zeros(PROMPT_LOGPROB_CHUNK_ROWS)?,
            tiles: gpu.alloc_zeros(2 * (max_tokens.div_ceil(FLASH_BLOCK_M) + max_seqs))?,
            masks: gpu.alloc_zeros(vocab.div_ceil(32))?,
            mask_rows: gpu.alloc_zeros(1)?,
            fed: gpu.alloc_zeros(2 * max_seqs)?,
        })
    }
}

impl HostBatch {
    pub(crate) fn clear(&mut self) {
        self.token_ids.clear();
        self.positions.clear();
        self.slots.clear();
        self.block_tables.clear();
        self.query_start_loc.clear();
        self.context_lens.clear();
        self.token_to_seq.clear();
        self.logits_rows.clear();
        self.tiles.clear();
        self.fed.clear();
    }
}

/// Executes planned steps on the GPU.
pub struct CudaModelRunner {
    gpu: Arc<Gpu>,
    model: Arc<CudaLlama>,
    kv: CudaKvCache,
    ws: Workspace,
    sampler: GpuSampler,
    engine_rng: Rng,
    /// Per-request state; the sampling state is the request's generator seed.
    reqs: RunnerRequests<u64>,
    /// Speculative decoding's proposer (`None`: off).
    spec: Option<Proposer>,
    /// Speculative decoding's draft model, when that is the method.
    draft: Option<CudaDraftModel>,
    host: HostBatch,
    dev: DeviceBatch,
    /// Async scheduling: the launched step not finished yet, and finished outputs not collected yet
    /// (oldest first).
    in_flight: Option<PendingStep>,
    finished: std::collections::VecDeque<ModelRunnerOutput>,
    /// Block-table row stride of graph steps (blocks for `max_model_len`): graphs bake it in.
    graph_table_stride: usize,
    /// Captured decode graphs by padded batch size (ascending), each size's by the decode attention's
    /// plan (`CudaLlama::graph_plans`: one per range of contexts that wants its own).
    graphs: Vec<(usize, PlanGraphs)>,
    /// `IRONLLM_GRAPH_CHECK` was set: every replay is compared with an eager run (debugging aid).
    check_graphs: bool,
    /// `IRONLLM_STEP_TIMING` was set: GPU time of each part of a step, logged (measurement aid).
    step_timer: Option<StepTimer>,
    /// `IRONLLM_OP_TIMING` was set: GPU time of each op of served steps, logged (measurement aid).
    op_timer: Option<OpTimer>,
    pub memory: CudaMemoryReport,
}

/// `IRONLLM_TIME_GRAPHS`: unset -> no timing; a number -> that context; anything else -> context 1.
fn time_graphs_context() -> Option<usize> {
    let v = std::env::var("IRONLLM_TIME_GRAPHS").ok()?;
    Some(v.trim().parse::<usize>().ok().filter(|&c| c > 1).unwrap_or(1))
}

/// One batch size's decode graphs, by the decode attention's share count.
type PlanGraphs = Vec<(DecodePlan, DecodeGraph)>;

/// A captured decode graph. cudarc's `CudaGraph` holds raw driver handles and is not `Send`.
struct DecodeGraph(CudaGraph);

// SAFETY: graph and graph-exec handles are plain driver objects usable from any thread that has the
// context current (cudarc binds it on every launch); the runner owns its graphs exclusively and uses them
// from one thread at a time (it moves to the engine thread once, before any launch).
unsafe impl Send for DecodeGraph {}

/// Row counts at which the GEMM algorithms are timed: the decode graphs' batch sizes, then a ladder of
/// prefill sizes (x1.5 and x4/3 in turn: 384, 512, 768, 1024, ...) up to and including `max_tokens`. A
/// GEMM of m rows runs the winner of the nearest size at or above m.
pub fn gemm_tuning_sizes(max_num_seqs: usize, max_tokens: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = graph_batch_sizes(max_num_seqs).into_iter().filter(|&m| m <= max_tokens).collect();
    let mut m = 384;
    while m < max_tokens {
        if sizes.last().is_none_or(|&l| m > l) {
            sizes.push(m);
        }
        m = if m.is_power_of_two() { m * 3 / 2 } else { m * 4 / 3 };
    }
    if sizes.last().is_none_or(|&l| max_tokens > l) {
        sizes.push(max_tokens);
    }
    sizes
}

/// Batch sizes to capture decode graphs for, as vLLM does: 1, 2, 4, then steps of 8 up to 64 and of 16
/// beyond, up to `max_num_seqs` (capped at 512).
pub fn graph_batch_sizes(max_num_seqs: usize) -> Vec<usize> {
    let cap = max_num_seqs.clamp(1, 512);
    let mut sizes: Vec<usize> = [1, 2, 4].into_iter().filter(|&b| b <= cap).collect();
    let mut b = 8;
    while b <= cap {
        sizes.push(b);
        b += if b < 64 { 8 } else { 16 };
    }
    if sizes.last() != Some(&cap) {
        sizes.push(cap);
    }
    sizes
}

impl CudaModelRunner {
    /// Allocates the workspace, profiles a forward pass of the largest step and sizes the KV cache.
    pub fn new(model: Arc<CudaLlama>, cfg: &CudaRunnerConfig) -> Result<CudaModelRunner, CudaError> {
        let gpu = model.gpu().clone();
        let started = Instant::now();
        let c = &model.config;
        let max_tokens = cfg.max_num_batched_tokens.max(1);
        // Logits rows: one per sampling sequence and draft token, never more than the tokens. Prompt
        // logprobs come in chunks through their own buffer, so the profiled peak (and so the KV cache)
        // does not pay a vocabulary-wide f32 row for every token of the step.
        let max_rows = cfg.max_num_seqs.saturating_mul(1 + cfg.num_speculative_tokens).min(max_tokens).max(1);
        let max_prompt_rows = PROMPT_LOGPROB_CHUNK_ROWS.min(max_tokens);
        gpu.synchronize()?;
        let (free_before, _) = gpu.mem_info()?;
        let ws = Workspace::new(&gpu, &model, max_tokens, max_rows, max_prompt_rows)?;
        let sampler = GpuSampler::new(gpu.clone(), c.vocab_size)?;
        // Metadata buffers at their largest, so they never move: captured graphs read them by address.
        let graph_table_stride = cfg.max_model_len.div_ceil(cfg.block_size).max(1);
        let max_seqs = cfg.max_num_seqs.max(1);
        // The row list holds the prompt-logprob rows too (after the sampling rows); it is never reallocated.
        let dev =
            DeviceBatch::new(&gpu, max_tokens, max_seqs, graph_table_stride, max_tokens.max(max_seqs), c.vocab_size)?;
        // The draft's first forward of a round may hold every scheduled token plus one per sequence.
        let mut draft = match &cfg.draft {
            Some((m, k)) => Some(CudaDraftModel::new(m.clone(), *k, max_tokens + max_seqs, max_seqs, cfg.block_size)?),
            None => None,
        };
        // Profile: one sequence of max_tokens tokens in a throwaway cache just big enough for it.
        let profile_blocks = max_tokens.div_ceil(cfg.block_size) + 1;
        let profile_kv = CudaKvCache::new(&gpu, &model, profile_blocks, cfg.block_size)?;
        let mut runner = CudaModelRunner {
            gpu: gpu.clone(),
            model: model.clone(),
            kv: profile_kv,
            ws,
            sampler,
            engine_rng: Rng::seeded(cfg.seed),
            reqs: RunnerRequests::default(),
            spec: None,
            draft: None,
            host: HostBatch::default(),
            dev,
            in_flight: None,
            finished: std::collections::VecDeque::new(),
            graph_table_stride,
            graphs: Vec::new(),
            check_graphs: std::env::var_os("IRONLLM_GRAPH_CHECK").is_some(),
            step_timer: None,
            op_timer: None,
            memory: CudaMemoryReport {
                total_bytes: gpu.info.total_memory,
                weight_bytes: model.weight_bytes(),
                peak_activation_bytes: 0,
                kv_cache_bytes: 0,
                num_blocks: 0,
                profile_seconds: 0.0,
                graph_batch_sizes: Vec::new(),
                graph_count: 0,
                graph_capture_seconds: 0.0,
            },
        };
        let profile_len = max_tokens.min(model.max_positions);
        let prompt: Vec<u32> = (0..profile_len).map(|i| (i % c.vocab_size) as u32).collect();
        let blocks: Vec<u32> = (0..profile_len.div_ceil(cfg.block_size) as u32).collect();
        runner.run_profile(&prompt, &blocks)?;
        gpu.synchronize()?;
        let (free_after, total) = gpu.mem_info()?;
        let profile_kv_bytes = CudaKvCache::bytes_per_block(c, model.dtype, cfg.block_size) * profile_blocks;
        runner.kv = CudaKvCache::new(&gpu, &model, 1, cfg.block_size)?; // free the profile cache
        gpu.synchronize()?;
        let (free_now, _) = gpu.mem_info()?;
        // A draft model's KV shares the target's blocks, so one block costs both.
        let bytes_per_block = CudaKvCache::bytes_per_block(c, model.dtype, cfg.block_size)
            + draft.as_ref().map_or(0, |d| d.bytes_per_block(cfg.block_size));
        let kv_bytes = match cfg.kv_cache {
            KvCacheSize::Bytes(b) => b,
            KvCacheSize::Utilization(u) => {
                if !(0.0..=1.0).contains(&u) || u == 0.0 {
                    return Err(CudaError::Invalid(format!("gpu_memory_utilization must be in (0, 1], got {u}")));
                }
                let used = total - free_now;
                let budget = (total as f64 * u) as usize;
                budget.checked_sub(used).ok_or_else(|| {
                    CudaError::OutOfMemory(format!(
                        "{:.2} GiB are already in use (weights {:.2} GiB) but --gpu-memory-utilization {u} allows {:.2} GiB; raise it",
                        used as f64 / GIB,
                        model.weight_bytes() as f64 / GIB,
                        budget as f64 / GIB
                    ))
                })?
            }
        };
        let num_blocks = kv_bytes / bytes_per_block;
        if num_blocks < 2 {
            return Err(CudaError::OutOfMemory(format!(
                "no room for the KV cache ({kv_bytes} bytes for blocks of {bytes_per_block}); raise --gpu-memory-utilization or lower --max-num-batched-tokens"
            )));
        }
        runner.kv = CudaKvCache::new(&gpu, &model, num_blocks, cfg.block_size)?;
        if let Some(d) = draft.as_mut() {
            d.set_num_blocks(num_blocks, cfg.block_size)?;
        }
        runner.draft = draft;
        gpu.synchronize()?;
        runner.memory.peak_activation_bytes = free_before.saturating_sub(free_after).saturating_sub(profile_kv_bytes);
        runner.memory.kv_cache_bytes = num_blocks * bytes_per_block;
        runner.memory.num_blocks = num_blocks;
        runner.memory.profile_seconds = started.elapsed().as_secs_f64();
        runner.reqs.clear();
        if std::env::var("IRONLLM_GEMM_TUNING").map_or(true, |v| v != "0") {
            runner.tune_gemms(cfg.max_num_seqs)?;
        }
        // Timing starts with served steps (not the profile run or the capture).
        runner.step_timer = StepTimer::from_env();
        runner.op_timer = OpTimer::from_env();
        if !cfg.enforce_eager {
            let t0 = Instant::now();
            runner.capture_graphs(&graph_batch_sizes(cfg.max_num_seqs))?;
            runner.memory.graph_capture_seconds = t0.elapsed().as_secs_f64();
            runner.memory.graph_batch_sizes = runner.graphs.iter().map(|(b, _)| *b).collect();
            runner.memory.graph_count = runner.graphs.iter().map(|(_, g)| g.len()).sum();
        }
        Ok(runner)
    }

    /// Times cuBLASLt's algorithms for the model's GEMMs at the sizes steps will have (before the graphs
    /// are captured, so they use the winners), and logs what changed.
    fn tune_gemms(&mut self, max_num_seqs: usize) -> Result<(), CudaError> {
        let t0 = Instant::now();
        let sizes = gemm_tuning_sizes(max_num_seqs, self.ws.max_tokens());
        let head_sizes = graph_batch_sizes(max_num_seqs);
        let results = self.model.tune_gemms(&mut self.ws, &sizes, &head_sizes)?;
        self.gpu.save_gemm_tuning();
        let cached = results.iter().filter(|(_, _, r)| r.cached).count();
        let switched: Vec<_> = results.iter().filter(|(_, _, r)| r.best_ms < r.first_ms).collect();
        for (name, m, r) in &results {
            tracing::debug!(
                "gemm {name} m={m}: {} candidates, first {:.4} ms, kept {:.4} ms",
                r.candidates,
                r.first_ms,
                r.best_ms
            );
        }
        let saved: f64 = switched.iter().map(|(_, _, r)| 1.0 - r.best_ms / r.first_ms).fold(0.0, f64::max);
        if !results.is_empty() {
            tracing::info!(
                "timed cuBLASLt's algorithms for {} GEMM shapes ({} of them from the tuning cache) in {:.2}s: another than the heuristic's first choice is faster for {} (by up to {:.1}%)",
                results.len(),
                cached,
                t0.elapsed().as_secs_f64(),
                switched.len(),
                100.0 * saved
            );
        }
        Ok(())
    }

    /// Captures one decode graph per batch size: the whole forward of a batch of single-token sequences,
    /// reading its metadata from the fixed device buffers. Padding rows write no KV (slot -1) and attend
    /// to one cached position of block 0, so any real block table works with any padded size.
    fn capture_graphs(&mut self, sizes: &[usize]) -> Result<(), CudaError> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        let gpu = self.gpu.clone();
        let max_context = self.graph_table_stride * self.kv.block_size;
        if time_graphs_context().is_some() && std::env::var_os("IRONLLM_TIME_GRAPHS_ZERO_KV").is_none() {
            // The replays read keys and values like a real cache's, not zeros: zeros draw less power (H200,
            // batch 128, context 1120: ~80 W less), and near the 700 W limit that reads ~1% fast (9.89
            // against 10.00 ms; the engine's own step 10.03-10.07). The engine writes every position before
            // attending to it, so the values left behind are never read. IRONLLM_TIME_GRAPHS_ZERO_KV keeps
            // the zeros, as the replays before 2026-11-28 16:00 read.
            self.kv.fill_random(&gpu, 0x6b76)?;
        }
        for &b in sizes {
            if b > self.ws_max_rows() {
                break;
            }
            let mut by_plan = Vec::new();
            for plan in self.model.graph_plans(b, max_context) {
                self.fill_padding_batch(b)?;
                // One eager run first: cuBLAS picks and initializes its kernels outside the capture.
                self.forward_decode(b, plan)?;
                gpu.synchronize()?;
                gpu.stream()
                    .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .at(|| format!("starting the capture of the batch-{b} decode graph"))?;
                let captured = self.forward_decode(b, plan);
                let graph = gpu
                    .stream()
                    .end_capture(CUgraphInstantiate_flags(0))
                    .at(|| format!("instantiating the batch-{b} decode graph"))?;
                captured?;
                let graph =
                    graph.ok_or_else(|| CudaError::Invalid(format!("the batch-{b} decode capture was empty")))?;
                graph.upload().at(|| format!("uploading the batch-{b} decode graph"))?;
                by_plan.push((plan, DecodeGraph(graph)));
            }
            if let Some(context) = time_graphs_context() {
                self.time_graphs(b, context, &by_plan)?;
            }
            self.graphs.push((b, by_plan));
        }
        gpu.synchronize()
    }

    /// Measurement aid (`IRONLLM_TIME_GRAPHS`): the GPU time of one decode step of each of a batch size's
    /// graphs (every row at `context` tokens; their keys are whatever the cache holds), without any host
    /// work, to set against the end-to-end step time. The graph a step at that context would replay is
    /// logged first as "decode graph batch B: ...", the others (other plans) after it, "(not
    /// chosen)"; where there are several, a second pass logs the chosen one again, "(again)".
    fn time_graphs(&mut self, b: usize, context: usize, graphs: &[(DecodePlan, DecodeGraph)]) -> Result<(), CudaError> {
        const WARM_UP: u32 = 3;
        // IRONLLM_TIME_GRAPHS_REPLAYS: longer bursts (default 20), e.g. to see a batch reach the power limit.
        let replays: u32 = std::env::var("IRONLLM_TIME_GRAPHS_REPLAYS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(20);
        let gpu = self.gpu.clone();
        let plans: Vec<DecodePlan> = graphs.iter().map(|(p, _)| *p).collect();
        let chosen = self.model.graph_plan_choice(b, context, &plans);
        self.fill_timing_batch(b, context)?;
        let order: Vec<usize> = std::iter::once(chosen).chain((0..graphs.len()).filter(|&i| i != chosen)).collect();
        // Twice over when there are several: in the first pass, a graph captured after another of its
        // batch size has read ~1% high (batch 128, context 1024 on an H200: 9.630 ms, then 9.518 in the
        // second pass, 9.513 with one graph for the size; end to end the two do not differ).
        let passes = if graphs.len() > 1 { 2 } else { 1 };
        for (pass, &i) in (0..passes).flat_map(|p| order.iter().map(move |i| (p, i))) {
            let (plan, graph) = (&graphs[i].0, &graphs[i].1 .0);
            // A few launches first: a graph's first replays after its capture can run ~1% slow.
            for _ in 0..WARM_UP {
                graph.launch().at(|| "warming up a decode graph".into())?;
            }
            gpu.synchronize()?;
            let t0 = Instant::now();
            for _ in 0..replays {
                graph.launch().at(|| "timing a decode graph".into())?;
            }
            gpu.synchronize()?;
            let ms = t0.elapsed().as_secs_f64() * 1e3 / f64::from(replays);
            let label = match (i == chosen, pass) {
                (true, 0) => format!("batch {b}"),
                (true, _) => format!("batch {b} (again)"),
                (false, _) => format!("batch {b} (not chosen)"),
            };
            tracing::info!("decode graph {label}: {ms:.3} ms per replay (GPU only, context {context}, {plan})");
        }
        Ok(())
    }

    /// Metadata of `b` rows that each attend to `context` positions (capped by the cache and the table
    /// stride) and write no KV: the timing batch of `IRONLLM_TIME_GRAPHS`. Rows get blocks of their own
    /// while the cache has room (shared blocks would be read from L2 and flatter the attention).
    fn fill_timing_batch(&mut self, b: usize, context: usize) -> Result<(), CudaError> {
        let block_size = self.kv.block_size;
        let blocks = context.div_ceil(block_size).clamp(1, self.graph_table_stride.min(self.kv.num_blocks));
        let context = context.clamp(1, blocks * block_size);
        let num_blocks = self.kv.num_blocks;
        self.fill_padding_batch(b)?;
        let h = &mut self.host;
        h.positions = vec![context as i32 - 1; b];
        h.context_lens = vec![context as i32; b];
        for (r, row) in h.block_tables.chunks_mut(self.graph_table_stride).enumerate() {
            for (i, slot) in row.iter_mut().take(blocks).enumerate() {
                *slot = ((r * blocks + i) % num_blocks) as i32;
            }
        }
        self.upload_host()
    }

    fn ws_max_rows(&self) -> usize {
        self.ws.max_rows().min(self.ws.max_tokens())
    }

    /// Metadata of a batch of `b` padding rows (the capture's inputs; contents do not matter to a graph).
    fn fill_padding_batch(&mut self, b: usize) -> Result<(), CudaError> {
        let h = &mut self.host;
        h.token_ids = vec![0; b];
        h.positions = vec![0; b];
        h.slots = vec![-1; b];
        h.block_tables = vec![0; b * self.graph_table_stride];
        h.query_start_loc = (0..=b as i32).collect();
        h.context_lens = vec![1; b];
        h.token_to_seq = (0..b as i32).collect();
        h.logits_rows = (0..b as i32).collect();
        h.tiles.clear();
        self.upload_host()
    }

    fn upload_host(&mut self) -> Result<(), CudaError> {
        self.dev.upload(&self.gpu, &self.host)
    }

    /// Structured output: fills the bitmask of every constrained row that samples this step (on the host,
    /// while the GPU runs the forward already queued) and applies them to the logits.
    fn apply_grammar_masks(
        &mut self,
        order: &[(&String, usize)],
        sample_rows: &[(usize, usize)],
    ) -> Result<(), CudaError> {
        let vocab = self.model.config.vocab_size;
        let words = vocab.div_ceil(32);
        let mut masks: Vec<u32> = Vec::new();
        let mut rows: Vec<i32> = Vec::new();
        for (row, &(ri, r)) in sample_rows.iter().enumerate() {
            // A request's rows are consecutive: all of its masks are filled at its first row.
            if r != 0 {
                continue;
            }
            let Some(st) = self.reqs.get_mut(order[ri].0) else { continue };
            if st.grammar.is_none() {
                continue;
            }
            let drafts = st.drafts().to_vec();
            let Some(m) = st.grammar.as_mut() else { continue };
            let start = masks.len();
            masks.resize(start + (drafts.len() + 1) * words, 0);
            fill_spec_masks(m.as_mut(), &drafts, &mut masks[start..], words);
            rows.extend((0..=drafts.len()).map(|j| (row + j) as i32));
        }
        if rows.is_empty() {
            return Ok(());
        }
        let gpu = &*self.gpu;
        upload_into(gpu, &mut self.dev.masks, &masks)?;
        upload_into(gpu, &mut self.dev.mask_rows, &rows)?;
        let f = gpu.function("apply_token_bitmask_f32")?;
        let (vocab_i, words_i) = (vocab as i32, words as i32);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (rows.len() as u32, vocab.div_ceil(1024) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: masks hold rows.len() x words words; each row index is < the step's sampling rows,
        // which the logits buffer holds.
        unsafe {
            use cudarc::driver::PushKernelArg;
            gpu.stream()
                .launch_builder(f)
                .arg(&mut self.ws.logits.data)
                .arg(&vocab_i)
                .arg(&self.dev.masks)
                .arg(&self.dev.mask_rows)
                .arg(&words_i)
                .launch(cfg)
        }
        .at(|| "apply_token_bitmask_f32".into())?;
        Ok(())
    }

    /// Debugging aid (`IRONLLM_GRAPH_CHECK=1`): recomputes a replayed step eagerly over the same padded
    /// metadata and logs how far the graph's logits are from the eager ones.
    fn check_graph_step(&mut self, b: usize, plan: DecodePlan, rows: usize) -> Result<(), CudaError> {
        let vocab = self.model.config.vocab_size;
        let read = |ws: &Workspace, gpu: &Gpu| -> Result<Vec<f32>, CudaError> {
            let all = ws.logits.to_f32(gpu)?;
            Ok(all[..rows * vocab].to_vec())
        };
        let graph = read(&self.ws, &self.gpu)?;
        self.forward_decode(b, plan)?;
        let eager = read(&self.ws, &self.gpu)?;
        let diff = graph.iter().zip(&eager).map(|(a, e)| (a - e).abs()).fold(0.0f32, f32::max);
        tracing::warn!("graph check: batch {b} ({rows} real rows, {plan}): max |graph - eager| = {diff:e}");
        Ok(())
    }

    /// The forward of `b` single-token sequences over the fixed buffers, as graphs capture it, with
    /// `splits` shares of the decode attention's keys (1, or any count, without split-KV).
    fn forward_decode(&mut self, b: usize, plan: DecodePlan) -> Result<(), CudaError> {
        let stride = self.graph_table_stride;
        let meta = self.dev.meta(b, b, stride, b, 0, stride * self.kv.block_size, Some(plan));
        self.model.forward(&self.dev.token_ids, &meta, &self.dev.logits_rows, b, &mut self.kv, &mut self.ws, None)
    }

    /// Blocks of the KV cache.
    pub fn num_blocks(&self) -> usize {
        self.kv.num_blocks
    }

    pub fn model(&self) -> &Arc<CudaLlama> {
        &self.model
    }

    fn run_profile(&mut self, prompt: &[u32], blocks: &[u32]) -> Result<(), CudaError> {
        use ironllm_core::outputs::NewRequestData;
        let params = Arc::new(SamplingParams { max_tokens: Some(1), ..SamplingParams::default() });
        let plan = SchedulerOutput {
            scheduled_new_reqs: vec![NewRequestData {
                req_id: "__profile__".into(),
                prompt_token_ids: prompt.to_vec(),
                output_token_ids: Vec::new(),
                sampling_params: params,
                block_ids: blocks.iter().map(|&b| ironllm_core::outputs::BlockId(b)).collect(),
                num_computed_tokens: 0,
            }],
            num_scheduled_tokens: vec![("__profile__".into(), prompt.len())],
            total_num_scheduled_tokens: prompt.len(),
            ..SchedulerOutput::default()
        };
        self.step(&plan).map(|_| ())
    }

    /// Turns speculative decoding on (n-gram drafts; a draft model is not supported on the GPU yet).
    pub fn set_proposer(&mut self, proposer: Proposer) -> Result<(), CudaError> {
        if matches!(proposer, Proposer::DraftModel(_)) {
            return Err(CudaError::Invalid(
                "the draft_model speculative method is not supported on the CUDA backend yet; use ngram, or --device cpu".into(),
            ));
        }
        self.spec = Some(proposer);
        Ok(())
    }

    /// Runs one step to completion (launch, then finish), with speculative proposals.
    fn step(&mut self, plan: &SchedulerOutput) -> Result<ModelRunnerOutput, CudaError> {
        let pending = self.launch_step(plan, None)?;
        let mut out = self.finish_step(pending)?;
        if let Some(proposer) = self.spec.as_mut() {
            out.spec_token_ids = proposer.propose(plan, &out, &self.reqs, self.kv.block_size);
        } else if let Some(draft) = self.draft.as_mut() {
            out.spec_token_ids = draft.propose(plan, &out, &self.reqs, self.kv.block_size)?;
        }
        Ok(out)
    }

    /// Whether step `plan` can be launched before `prev` is finished: every request `prev` samples for
    /// that `plan` computes again must be one whose inputs to `plan` do not need the sampled token on the
    /// host (no penalties, bad words or grammar) and that the scheduler continues rather than resumes.
    fn can_launch_before_finish(&self, plan: &SchedulerOutput, prev: &PendingStep) -> bool {
        if self.spec.is_some() || self.draft.is_some() || prev.sample.rows() == 0 {
            return false;
        }
        let scheduled: std::collections::HashSet<&str> =
            plan.num_scheduled_tokens.iter().map(|(id, _)| id.as_str()).collect();
        let resumed: std::collections::HashSet<&str> =
            plan.scheduled_new_reqs.iter().map(|r| r.req_id.as_str()).collect();
        prev.sample_rows.iter().all(|&(ri, r)| {
            let id = prev.order[ri].0.as_str();
            if !scheduled.contains(id) {
                return true;
            }
            r == 0
                && !resumed.contains(id)
                && self.reqs.get(id).is_some_and(|st| {
                    st.num_drafts == 0
                        && st.grammar.is_none()
                        && !st.params.has_penalties()
                        && st.params.bad_words_token_ids.is_empty()
                })
        })
    }

    /// Everything of a step up to the sampled ids' copy to the host, without waiting for the GPU (a step
    /// that wants prompt logprobs or long logprob lists waits for those inside). With `prev` (a step
    /// still in flight that [`can_launch_before_finish`](Self::can_launch_before_finish) approved), the
    /// tokens `prev` samples are fed to this step on the device.
    fn launch_step(
        &mut self,
        plan: &SchedulerOutput,
        prev: Option<&mut PendingStep>,
    ) -> Result<PendingStep, CudaError> {
        let engine_rng = &mut self.engine_rng;
        self.reqs
            .apply_plan(plan, |new| new.sampling_params.seed.unwrap_or_else(|| engine_rng.next_u64()))
            .map_err(CudaError::Invalid)?;
        // Requests of `prev` that this plan continues: (placeholder index, sampler output word) for those
        // `prev` samples for.
        let mut fed_src: std::collections::HashMap<String, (usize, i32)> = std::collections::HashMap::new();
        if let Some(prev) = prev {
            let scheduled: std::collections::HashSet<&str> =
                plan.num_scheduled_tokens.iter().map(|(id, _)| id.as_str()).collect();
            for (ri, (id, _)) in prev.order.iter().enumerate() {
                prev.replanned[ri] = scheduled.contains(id.as_str()) || plan.preempted_req_ids.contains(id);
            }
            let stride = prev.sample.out_stride();
            for (row, &(ri, _)) in prev.sample_rows.iter().enumerate() {
                let id = prev.order[ri].0.as_str();
                if !scheduled.contains(id) {
                    continue;
                }
                let st = self
                    .reqs
                    .get_mut(id)
                    .ok_or_else(|| CudaError::Invalid(format!("request `{id}` scheduled but unknown")))?;
                let index = st.token_ids.len();
                st.token_ids.push(0);
                prev.fed[ri] = Some(index);
                let word = i32::try_from(row * stride)
                    .map_err(|_| CudaError::Invalid("sampler output too large to feed from".into()))?;
                fed_src.insert(id.to_string(), (index, word));
            }
        }
        let block_size = self.kv.block_size;
        let max_pos = self.model.max_positions;
        let h = &mut self.host;
        h.clear();

        let order: Vec<(&String, usize)> = plan.num_scheduled_tokens.iter().map(|(id, n)| (id, *n)).collect();
        // A decode-only step (every sequence one token, all sampling, no prompt logprobs) replays the
        // smallest captured graph that fits, padded.
        let graph_size = if order.is_empty() || order.iter().any(|(_, n)| *n != 1) {
            None
        } else {
            let all_sample = order.iter().all(|(id, n)| {
                self.reqs.get(id).is_some_and(|st| {
                    st.num_computed_tokens + n == st.token_ids.len() && st.params.prompt_logprobs.is_none()
                })
            });
            self.graphs.iter().map(|(b, _)| *b).find(|&b| b >= order.len()).filter(|_| all_sample)
        };
        // Decode (single-token) sequences first: they form the paged kernel's prefix of the batch.
        let mut batch_order: Vec<usize> = (0..order.len()).filter(|&i| order[i].1 == 1).collect();
        let num_decode_seqs = batch_order.len();
        batch_order.extend((0..order.len()).filter(|&i| order[i].1 != 1));
        // Block-table row stride: graphs bake in the one for max_model_len; eager steps use the longest
        // table of the step, so their upload stays small.
        let max_blocks = match graph_size {
            Some(_) => self.graph_table_stride,
            None => batch_order
                .iter()
                .map(|&i| {
                    self.reqs.get(order[i].0).map_or(0, |st| (st.num_computed_tokens + order[i].1).div_ceil(block_size))
                })
                .max()
                .unwrap_or(0)
                .max(1),
        };
        // Per request (in plan order): query start in the batch, whether it samples, prompt-logprob range.
        let mut query_start = vec![0usize; order.len()];
        let mut samples = vec![false; order.len()];
        let mut prompt_lp = vec![0..0; order.len()];
        h.query_start_loc.push(0);
        for (seq, &ri) in batch_order.iter().enumerate() {
            let (id, n) = order[ri];
            let st =
                self.reqs.get(id).ok_or_else(|| CudaError::Invalid(format!("request `{id}` scheduled but unknown")))?;
            let start = st.num_computed_tokens;
            let end = start + n;
            if end > st.token_ids.len() || end > st.block_table.len() * block_size {
                return Err(CudaError::Invalid(format!(
                    "plan for `{id}` covers tokens {start}..{end} but it has {} tokens and {} blocks",
                    st.token_ids.len(),
                    st.block_table.len()
                )));
            }
            if end > max_pos {
                return Err(CudaError::Invalid(format!("position {} beyond the model's {max_pos}", end - 1)));
            }
            query_start[ri] = h.token_ids.len();
            let feed = fed_src.get(id.as_str()).copied();
            for pos in start..end {
                if let Some((_, word)) = feed.filter(|&(index, _)| index == pos) {
                    h.fed.push(h.token_ids.len() as i32);
                    h.fed.push(word);
                }
                h.token_ids.push(st.token_ids[pos]);
                h.positions.push(pos as i32);
                h.slots.push(st.block_table[pos / block_size] as i64 * block_size as i64 + (pos % block_size) as i64);
                h.token_to_seq.push(seq as i32);
            }
            h.query_start_loc.push(h.token_ids.len() as i32);
            h.context_lens.push(end as i32);
            let table_start = h.block_tables.len();
            h.block_tables.extend(st.block_table.iter().take(max_blocks).map(|&b| b as i32));
            h.block_tables.resize(table_start + max_blocks, 0);
            if seq >= num_decode_seqs {
                for tile in (0..n).step_by(FLASH_BLOCK_M) {
                    h.tiles.push(seq as i32);
                    h.tiles.push(tile as i32);
                }
            }
            samples[ri] = end == st.token_ids.len();
            if st.params.prompt_logprobs.is_some() {
                let last = st.num_prompt_tokens.saturating_sub(1);
                prompt_lp[ri] = start.min(last)..end.min(last);
            }
        }
        let num_decode_tokens = num_decode_seqs;
        // The longest context: which of a batch size's graphs (plans) a replay takes.
        let step_context = h.context_lens.iter().copied().max().unwrap_or(1).max(1) as usize;
        // Logits rows: the sample rows of each sampling request in plan order (its last position, or its
        // last k + 1 with k drafts), then the prompt-logprob rows.
        let mut sample_rows: Vec<(usize, usize)> = Vec::new(); // (request, row within the request)
        for ri in 0..order.len() {
            if samples[ri] {
                let rows = self.reqs.get(order[ri].0).map_or(1, RunnerRequest::num_sample_rows);
                if rows > order[ri].1 {
                    return Err(CudaError::Invalid(format!("`{}` has more drafts than scheduled tokens", order[ri].0)));
                }
                for r in 0..rows {
                    h.logits_rows.push((query_start[ri] + order[ri].1 - rows + r) as i32);
                    sample_rows.push((ri, r));
                }
            }
        }
        let num_sample_rows = h.logits_rows.len();
        let mut prompt_targets: Vec<u32> = Vec::new();
        for ri in 0..order.len() {
            let st = self.reqs.get(order[ri].0).ok_or_else(|| CudaError::Invalid("request vanished".into()))?;
            for pos in prompt_lp[ri].clone() {
                h.logits_rows.push((query_start[ri] + pos - st.num_computed_tokens) as i32);
                prompt_targets.push(st.token_ids[pos + 1]);
            }
        }
        let t = h.token_ids.len();
        let num_rows = h.logits_rows.len();
        let num_seqs = batch_order.len();
        let num_tiles = h.tiles.len() / 2;
        if let Some(b) = graph_size {
            for i in num_seqs..b {
                h.token_ids.push(0);
                h.positions.push(0);
                h.slots.push(-1);
                h.token_to_seq.push(i as i32);
                h.query_start_loc.push(i as i32 + 1);
                h.context_lens.push(1);
                h.block_tables.extend(std::iter::repeat_n(0, max_blocks));
                h.logits_rows.push(i as i32);
            }
        }
        let mut timing = self.step_timer.as_ref().map(|_| StepTimer::begin(&self.gpu)).transpose()?;
        self.upload_host()?;
        self.feed_sampled_tokens()?;
        if let Some(t) = timing.as_mut() {
            t.mark(&self.gpu)?;
        }
        let mut op_marks = match self.op_timer {
            Some(_) => {
                let work = op_step_work(&self.host, num_decode_tokens);
                Some(OpMarks::begin(&self.gpu, t, graph_size.is_none(), work)?)
            }
            None => None,
        };
        match graph_size {
            Some(b) => {
                let graphs =
                    &self.graphs.iter().find(|(size, _)| *size == b).expect("chosen from the captured sizes").1;
                let plans: Vec<DecodePlan> = graphs.iter().map(|(p, _)| *p).collect();
                let (plan, graph) = &graphs[self.model.graph_plan_choice(b, step_context, &plans)];
                graph.0.launch().at(|| format!("replaying the batch-{b} decode graph"))?;
                op_timer::mark(&mut op_marks.as_mut(), &self.gpu, Op::Graph, Work::Unknown)?;
                if self.check_graphs {
                    self.check_graph_step(b, *plan, num_rows)?;
                }
            }
            None => {
                let meta =
                    self.dev.meta(t, num_seqs, max_blocks, num_decode_tokens, num_tiles, max_blocks * block_size, None);
                self.model.forward(
                    &self.dev.token_ids,
                    &meta,
                    &self.dev.logits_rows,
                    num_sample_rows,
                    &mut self.kv,
                    &mut self.ws,
                    op_marks.as_mut(),
                )?;
            }
        }

        if let Some(t) = timing.as_mut() {
            t.mark(&self.gpu)?;
        }
        let vocab = self.model.config.vocab_size;
        let mut prompt_lps: Vec<Option<Vec<PositionLogprobs>>> = vec![None; order.len()];
        if !prompt_targets.is_empty() {
            let mut offset = 0;
            for ri in 0..order.len() {
                let count = prompt_lp[ri].len();
                if count == 0 {
                    continue;
                }
                let k = self.reqs.get(order[ri].0).and_then(|st| st.params.prompt_logprobs).unwrap_or(0);
                let mut positions = Vec::with_capacity(count);
                let chunk = self.ws.max_prompt_rows();
                for start in (offset..offset + count).step_by(chunk) {
                    let n = chunk.min(offset + count - start);
                    let rows = &self.host.logits_rows[num_sample_rows + start..num_sample_rows + start + n];
                    upload_into(&self.gpu, &mut self.dev.prompt_rows, rows)?;
                    self.model.prompt_logits(&mut self.ws, &self.dev.prompt_rows, n)?;
                    let view = self.ws.prompt_logits.data.slice(0..n * vocab * 4);
                    // SAFETY: the bytes are f32 logits written by the LM head GEMM.
                    let view = unsafe { view.transmute::<f32>(n * vocab) }
                        .ok_or_else(|| CudaError::Invalid("logits view".into()))?;
                    // Synchronous: the next chunk may overwrite the buffer.
                    positions.extend(self.sampler.prompt_logprobs(&view, &prompt_targets[start..start + n], k)?);
                }
                prompt_lps[ri] = Some(positions);
                offset += count;
            }
        }
        self.apply_grammar_masks(&order, &sample_rows)?;
        let mut rows: Vec<GpuSamplingRow<'_>> = Vec::with_capacity(sample_rows.len());
        for &(ri, r) in &sample_rows {
            let st = self.reqs.get(order[ri].0).ok_or_else(|| CudaError::Invalid("request vanished".into()))?;
            rows.push(GpuSamplingRow {
                params: &st.params,
                prompt_token_ids: &st.token_ids[..st.num_prompt_tokens],
                output_token_ids: st.output_before_row(r),
                seed: st.sampling,
            });
        }
        let sample = if rows.is_empty() {
            PendingSample::default()
        } else {
            let mut view = self.ws.logits.data.slice_mut(0..num_sample_rows * vocab * 4);
            // SAFETY: as above.
            let mut view = unsafe { view.transmute_mut::<f32>(num_sample_rows * vocab) }
                .ok_or_else(|| CudaError::Invalid("logits view".into()))?;
            self.sampler.launch(&mut view, &rows)?
        };
        drop(rows);
        if let Some(t) = timing.as_mut() {
            t.mark(&self.gpu)?;
        }
        op_timer::mark(&mut op_marks.as_mut(), &self.gpu, Op::Sampler, Work::Unknown)?;
        Ok(PendingStep {
            timing,
            op_marks,
            order: order.iter().map(|(id, n)| ((*id).clone(), *n)).collect(),
            fed: vec![None; order.len()],
            replanned: vec![false; order.len()],
            samples,
            sample_rows,
            prompt_logprobs: prompt_lps,
            sample,
        })
    }

    /// Async scheduling: copies the previous step's sampled ids over this step's placeholders (the pairs
    /// in `dev.fed`), after the inputs' upload and before the forward.
    fn feed_sampled_tokens(&mut self) -> Result<(), CudaError> {
        let n = self.host.fed.len() / 2;
        if n == 0 {
            return Ok(());
        }
        let gpu = &*self.gpu;
        let f = gpu.function("feed_sampled_tokens")?;
        let n_i = n as i32;
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (n.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every pair indexes a token of this step (< the uploaded token count, which `token_ids`
        // holds) and a word of the previous step's sampler output (row * stride for one of its rows,
        // which the output buffer holds; stream order puts this after that step's sampler).
        unsafe {
            use cudarc::driver::PushKernelArg;
            gpu.stream()
                .launch_builder(f)
                .arg(&mut self.dev.token_ids)
                .arg(self.sampler.device_output())
                .arg(&self.dev.fed)
                .arg(&n_i)
                .launch(cfg)
        }
        .at(|| "feed_sampled_tokens".into())?;
        Ok(())
    }

    /// Waits for a launched step's sampled ids and advances its requests (accepting drafts). A request
    /// the next step already re-planned keeps the computed count that plan gave it; one the next step
    /// was fed a placeholder for gets the sampled id written over it.
    fn finish_step(&mut self, pending: PendingStep) -> Result<ModelRunnerOutput, CudaError> {
        let PendingStep { order, fed, replanned, samples, sample_rows, prompt_logprobs, sample, timing, op_marks } =
            pending;
        let sampled = self.sampler.finish(sample)?;
        if let (Some(timer), Some(events)) = (self.step_timer.as_mut(), timing) {
            timer.add(events)?;
        }
        if let (Some(timer), Some(marks)) = (self.op_timer.as_mut(), op_marks) {
            timer.add(marks)?;
        }
        let n = order.len();
        let mut step_samples = StepSamples::group(sampled, &sample_rows, n);
        let mut out = ModelRunnerOutput {
            req_ids: order.iter().map(|(id, _)| id.clone()).collect(),
            sampled_token_ids: vec![Vec::new(); n],
            logprobs: vec![None; n],
            prompt_logprobs,
            spec_token_ids: Vec::new(),
        };
        for (ri, (id, num_scheduled)) in order.iter().enumerate() {
            let Some(st) = self.reqs.get_mut(id.as_str()) else { continue };
            if !samples[ri] {
                if !replanned[ri] {
                    st.num_computed_tokens += num_scheduled;
                }
                continue;
            }
            let emitted = match fed[ri] {
                Some(index) => {
                    let token = step_samples.tokens[ri].first().copied().ok_or_else(|| {
                        CudaError::Invalid(format!("no token sampled for `{id}`, whose next step was fed one"))
                    })?;
                    let slot = st
                        .token_ids
                        .get_mut(index)
                        .ok_or_else(|| CudaError::Invalid(format!("`{id}` lost the placeholder of its fed token")))?;
                    *slot = token;
                    if let Some(m) = st.grammar.as_mut() {
                        if !m.is_terminated() && !m.accept_token(token) {
                            tracing::debug!("structured output: token {token} rejected by the grammar");
                        }
                    }
                    vec![token]
                }
                None if replanned[ri] => {
                    let computed = st.num_computed_tokens;
                    let emitted = st.finish_step(*num_scheduled, &step_samples.tokens[ri]);
                    st.num_computed_tokens = computed;
                    emitted
                }
                None => st.finish_step(*num_scheduled, &step_samples.tokens[ri]),
            };
            out.logprobs[ri] = step_samples.emitted_logprobs(ri, emitted.len());
            out.sampled_token_ids[ri] = emitted;
        }
        Ok(out)
    }
}

/// A step launched on the GPU and not finished yet: what its finish needs to build the output.
struct PendingStep {
    /// Scheduled requests in plan order with their token counts.
    order: Vec<(String, usize)>,
    /// Per request: the index of the placeholder the next step (launched before this one finished) was
    /// given for this step's sampled token.
    fed: Vec<Option<usize>>,
    /// Per request: whether the next step's plan (applied before this step finished) set its state.
    replanned: Vec<bool>,
    /// Per request: whether it samples this step.
    samples: Vec<bool>,
    /// Sample rows as (request index, row within the request).
    sample_rows: Vec<(usize, usize)>,
    prompt_logprobs: Vec<Option<Vec<PositionLogprobs>>>,
    sample: PendingSample,
    /// `IRONLLM_STEP_TIMING`: the step's events.
    timing: Option<StepEvents>,
    /// `IRONLLM_OP_TIMING`: the step's per-op events.
    op_marks: Option<OpMarks>,
}

/// What a step's attention reads and computes, from its host-side batch: the decode rows' keys, and the
/// prefill rows' causal (query, key) pairs (a chunk of `q` queries ending at context `ctx` sees
/// `ctx - q + 1 ..= ctx` keys).
fn op_step_work(h: &HostBatch, num_decode_seqs: usize) -> StepWork {
    let mut w = StepWork::default();
    let seqs = h.context_lens.len().min(h.query_start_loc.len().saturating_sub(1));
    for i in 0..seqs {
        let ctx = f64::from(h.context_lens[i]);
        if i < num_decode_seqs {
            w.decode_keys += ctx;
        } else {
            let q = f64::from(h.query_start_loc[i + 1] - h.query_start_loc[i]);
            w.prefill_pairs += q * (ctx - q) + q * (q + 1.0) / 2.0;
        }
    }
    w
}

const GIB: f64 = (1u64 << 30) as f64;

impl ModelExecutor for CudaModelRunner {
    fn execute_model(&mut self, plan: &SchedulerOutput) -> Result<ModelRunnerOutput, CoreError> {
        if let Some(pending) = self.in_flight.take() {
            // A sync step after async ones (not done by the engine, but keep the order right).
            let out = self.finish_step(pending).map_err(|e| CoreError::Execution(e.to_string()))?;
            self.finished.push_back(out);
        }
        self.step(plan).map_err(|e| CoreError::Execution(e.to_string()))
    }

    /// Launches this step and finishes the one in flight (its output waits for `collect_model`), then
    /// returns without waiting for the GPU: the new step is queued behind the old one, fed its sampled
    /// ids on the device, unless its inputs need them on the host (then the old step is finished first).
    /// Speculative decoding is refused with async scheduling (the engine checks), so there is nothing to
    /// propose here.
    fn submit_model(&mut self, plan: &SchedulerOutput) -> Result<Submitted, CoreError> {
        let run = |runner: &mut CudaModelRunner| -> Result<(), CudaError> {
            match runner.in_flight.take() {
                Some(mut prev) if runner.can_launch_before_finish(plan, &prev) => {
                    let launched = runner.launch_step(plan, Some(&mut prev));
                    // Finish the old step whatever happened to the new one, so the states stay whole.
                    let out = runner.finish_step(prev)?;
                    runner.finished.push_back(out);
                    runner.in_flight = Some(launched?);
                }
                Some(prev) => {
                    let out = runner.finish_step(prev)?;
                    runner.finished.push_back(out);
                    runner.in_flight = Some(runner.launch_step(plan, None)?);
                }
                None => runner.in_flight = Some(runner.launch_step(plan, None)?),
            }
            Ok(())
        };
        run(self).map_err(|e| CoreError::Execution(e.to_string()))?;
        Ok(Submitted::InFlight)
    }

    fn collect_model(&mut self) -> Result<ModelRunnerOutput, CoreError> {
        if let Some(out) = self.finished.pop_front() {
            return Ok(out);
        }
        let pending = self
            .in_flight
            .take()
            .ok_or_else(|| CoreError::Execution("collect_model called with no step in flight".to_string()))?;
        self.finish_step(pending).map_err(|e| CoreError::Execution(e.to_string()))
    }

    fn supports_structured_output(&self) -> bool {
        true
    }
}

/// The compute dtype for `--dtype` on the GPU: `auto` is bf16 for bf16, fp16 and fp32 checkpoints alike
/// (and for GGUF files, dequantized at load); an explicit `--dtype` is honoured.
pub fn resolve_dtype(requested: ironllm_model::loader::DType) -> GpuDType {
    use ironllm_model::loader::DType;
    match requested {
        DType::Float32 => GpuDType::F32,
        DType::Float16 => GpuDType::F16,
        DType::BFloat16 | DType::Auto => GpuDType::BF16,
    }
}

/// The KV cache's element type for `--kv-cache-dtype` on the GPU, whose cache holds K/V in the compute
/// dtype: `auto` or the compute dtype's own name; anything else is refused with the values that work.
pub fn resolve_kv_cache_dtype(
    requested: ironllm_model::loader::KvCacheDType,
    compute: GpuDType,
) -> Result<GpuDType, String> {
    use ironllm_model::loader::KvCacheDType;
    let wanted = match requested {
        KvCacheDType::Auto => return Ok(compute),
        KvCacheDType::Float32 => GpuDType::F32,
        KvCacheDType::Float16 => GpuDType::F16,
        KvCacheDType::BFloat16 => GpuDType::BF16,
        KvCacheDType::Fp8(name) => {
            return Err(format!(
                "--kv-cache-dtype {name} is not supported yet on the GPU; with compute dtype {} choose from auto, {}",
                compute.name(),
                compute.name()
            ))
        }
    };
    if wanted == compute {
        Ok(compute)
    } else {
        Err(format!(
            "--kv-cache-dtype {} is not supported on the GPU with compute dtype {}: the GPU keeps K/V in the \
             model's dtype; choose from auto, {} (or change --dtype)",
            requested.name(),
            compute.name(),
            compute.name()
        ))
    }
}

#[cfg(test)]
mod tests {
    use ironllm_model::loader::KvCacheDType;

    use super::*;

    #[test]
    fn kv_cache_dtype_is_the_compute_dtype() {
        for compute in [GpuDType::BF16, GpuDType::F16, GpuDType::F32] {
            assert_eq!(resolve_kv_cache_dtype(KvCacheDType::Auto, compute), Ok(compute));
            let own: KvCacheDType = compute.name().parse().expect("a GPU dtype name is a cache dtype");
            assert_eq!(resolve_kv_cache_dtype(own, compute), Ok(compute));
        }
        let err = resolve_kv_cache_dtype(KvCacheDType::Float16, GpuDType::BF16).expect_err("f16 cache, bf16 model");
        assert!(err.contains("--kv-cache-dtype float16") && err.contains("choose from auto, bfloat16"), "{err}");
        let err = resolve_kv_cache_dtype(KvCacheDType::Fp8("fp8_e4m3"), GpuDType::F16).expect_err("fp8");
        assert!(err.contains("fp8_e4m3") && err.contains("not supported yet"), "{err}");
    }

    #[test]
    fn op_step_work_counts_decode_keys_and_causal_prefill_pairs() {
        // Two decode rows (contexts 10 and 20), then a 3-token prompt from scratch and a 2-token chunk
        // after 5 cached tokens.
        let h = HostBatch {
            query_start_loc: vec![0, 1, 2, 5, 7],
            context_lens: vec![10, 20, 3, 7],
            ..HostBatch::default()
        };
        let w = op_step_work(&h, 2);
        assert_eq!(w.decode_keys, 30.0);
        // prompt: 1 + 2 + 3 keys; chunk: 6 + 7 keys
        assert_eq!(w.prefill_pairs, 6.0 + 13.0);
        let none = op_step_work(&HostBatch::default(), 0);
        assert_eq!((none.decode_keys, none.prefill_pairs), (0.0, 0.0));
    }

    #[test]
    fn gemm_tuning_sizes_are_the_graph_sizes_then_a_prefill_ladder_to_the_token_budget() {
        let sizes = gemm_tuning_sizes(256, 8192);
        assert_eq!(&sizes[..5], &[1, 2, 4, 8, 16]);
        let graphs = graph_batch_sizes(256);
        assert_eq!(&sizes[..graphs.len()], &graphs[..]);
        assert_eq!(&sizes[graphs.len()..], &[384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192]);
        // The budget is always a size; nothing beyond it; strictly increasing.
        assert_eq!(gemm_tuning_sizes(256, 2500).last(), Some(&2500));
        assert_eq!(gemm_tuning_sizes(256, 300).last(), Some(&300));
        assert_eq!(gemm_tuning_sizes(4, 2), vec![1, 2]);
        for (seqs, tokens) in [(256, 8192), (1, 1), (512, 16384), (64, 100), (300, 5000)] {
            let s = gemm_tuning_sizes(seqs, tokens);
            assert!(s.windows(2).all(|w| w[0] < w[1]), "{seqs} {tokens}: {s:?}");
            assert_eq!(s.last(), Some(&tokens), "{seqs} {tokens}");
        }
    }
}
