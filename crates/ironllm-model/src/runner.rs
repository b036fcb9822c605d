//! The CPU model runner: turns the scheduler's plan into one flattened batch (token ids, positions, slot
//! mapping, per-sequence spans over block tables, rows that produce logits), runs the model once for the
//! mixed prefill + decode batch, and samples.
//!
//! It keeps per-request state across steps (token ids, block table, sampler state), as vLLM's persistent
//! batch does. A preempted request keeps its sampler state (so a seeded generator continues where it was)
//! and gets a fresh block table when it comes back. Batch buffers are reused across steps.
//!
//! Structured output: a constrained request carries a compiled grammar; the runner keeps one matcher
//! per request (kept across preemption, like the sampler state, so it never needs a replay), fills the
//! request's token bitmask while the forward pass runs (the masks depend only on tokens already
//! sampled), hands the masks to the sampler, and advances each matcher with its sampled token.
//! Prompt tokens are never fed to a matcher. Unconstrained rows get no mask and are untouched.

use std::sync::Arc;

use ironllm_core::executor::ModelExecutor;
use ironllm_core::outputs::{ModelRunnerOutput, PositionLogprobs, SchedulerOutput};
use ironllm_core::structured::GrammarMatcher;
use ironllm_core::{CoreError, SamplingParams};
use ironllm_kernels::cpu::attention::{KvDType, SeqSpan};
use rayon::prelude::*;

use crate::llama::{ForwardBatch, KvCache, LlamaModel, Workspace};
use crate::profile::{self, Clock, Op};
use crate::proposer::Proposer;
use crate::runner_state::{fill_spec_masks, RunnerRequest, RunnerRequests, StepSamples};
use crate::sampler::{Rng, Sampler, SamplerState, SamplingRow};

/// A constrained request that samples this step: its first sample row, its index in the plan, its
/// matcher (taken out of the state while the masks are filled) and its drafts.
type GrammarRow = (usize, usize, Box<dyn GrammarMatcher>, Vec<u32>);

/// A request's place in this step's batch.
struct Planned {
    req_idx: usize,
    query_start: usize,
    query_len: usize,
    /// Whether the request reaches the end of its known tokens this step (so it samples).
    samples: bool,
    /// Prompt positions whose next-token logprobs are computed this step.
    prompt_lp: std::ops::Range<usize>,
}

/// Executes planned steps on the CPU.
pub struct CpuModelRunner {
    model: Arc<LlamaModel>,
    kv: KvCache,
    ws: Workspace,
    sampler: Sampler,
    engine_rng: Rng,
    reqs: RunnerRequests<SamplerState>,
    /// Speculative decoding's proposer (`None`: off).
    spec: Option<Proposer>,
    /// The one thread pool the kernels run on. The forward pass is entered through `install`, so every
    /// parallel kernel starts on a pool worker instead of paying a cross-thread hand-off per call.
    pool: Arc<rayon::ThreadPool>,
    // Batch buffers, reused across steps.
    token_ids: Vec<u32>,
    positions: Vec<usize>,
    slots: Vec<usize>,
    logits_rows: Vec<usize>,
    /// Structured-output bitmasks of this step, `[num_constrained_rows, vocab.div_ceil(32)]`.
    bitmask: Vec<u32>,
}

impl CpuModelRunner {
    /// A runner with an f32 KV cache of `num_blocks` blocks of `block_size` tokens. `seed` seeds the
    /// generators of requests that do not bring their own.
    pub fn new(model: Arc<LlamaModel>, num_blocks: usize, block_size: usize, seed: u64) -> CpuModelRunner {
        Self::with_kv_dtype(model, num_blocks, block_size, KvDType::F32, seed)
    }

    /// A runner whose KV cache holds `kv_dtype` elements (`--kv-cache-dtype`).
    pub fn with_kv_dtype(
        model: Arc<LlamaModel>,
        num_blocks: usize,
        block_size: usize,
        kv_dtype: KvDType,
        seed: u64,
    ) -> CpuModelRunner {
        let kv = KvCache::new(&model.config, num_blocks, block_size, kv_dtype);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ironllm-cpu-{i}"))
            .build()
            .unwrap_or_else(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a one-thread pool"));
        let vocab = model.config.vocab_size;
        CpuModelRunner {
            model,
            kv,
            ws: Workspace::default(),
            sampler: Sampler::new(vocab),
            engine_rng: Rng::seeded(seed),
            reqs: RunnerRequests::default(),
            spec: None,
            pool: Arc::new(pool),
            token_ids: Vec::new(),
            positions: Vec::new(),
            slots: Vec::new(),
            logits_rows: Vec::new(),
            bitmask: Vec::new(),
        }
    }

    /// The model this runner executes.
    pub fn model(&self) -> &Arc<LlamaModel> {
        &self.model
    }

    /// Turns speculative decoding on: after each step, the runner proposes draft tokens for the
    /// requests the plan names.
    pub fn set_proposer(&mut self, proposer: Proposer) {
        self.spec = Some(proposer);
    }
}

impl Drop for CpuModelRunner {
    fn drop(&mut self) {
        profile::report();
    }
}

impl ModelExecutor for CpuModelRunner {
    fn execute_model(&mut self, plan: &SchedulerOutput) -> Result<ModelRunnerOutput, CoreError> {
        let pool = Arc::clone(&self.pool);
        let mut clock = Clock::start();
        let out = pool.install(|| self.execute_step(plan));
        clock.lap(Op::Step);
        let num_tokens: usize = plan.num_scheduled_tokens.iter().map(|(_, n)| n).sum();
        let num_reqs = plan.num_scheduled_tokens.len();
        profile::end_step(num_tokens == num_reqs, num_reqs);
        out
    }

    fn supports_structured_output(&self) -> bool {
        true
    }
}

impl CpuModelRunner {
    fn execute_step(&mut self, plan: &SchedulerOutput) -> Result<ModelRunnerOutput, CoreError> {
        let engine_rng = &mut self.engine_rng;
        self.reqs
            .apply_plan(plan, |new| SamplerState::new(&new.sampling_params, engine_rng))
            .map_err(CoreError::Execution)?;
        let block_size = self.kv.layout.block_size;
        let max_pos = self.model.config.max_position_embeddings.max(1);
        self.token_ids.clear();
        self.positions.clear();
        self.slots.clear();
        self.logits_rows.clear();

        // Requests in batch order, with their slices of the flattened batch.
        let order: Vec<&str> = plan.num_scheduled_tokens.iter().map(|(id, _)| id.as_str()).collect();
        let mut states = self.reqs.many_mut(&order).map_err(CoreError::Execution)?;
        let mut planned = Vec::with_capacity(order.len());
        for (req_idx, ((_, n), st)) in plan.num_scheduled_tokens.iter().zip(states.iter()).enumerate() {
            let start = st.num_computed_tokens;
            let end = start + n;
            if end > st.token_ids.len() || end > st.block_table.len() * block_size {
                return Err(CoreError::Execution(format!(
                    "plan for request {req_idx} covers tokens {start}..{end} but it has {} tokens and {} blocks",
                    st.token_ids.len(),
                    st.block_table.len()
                )));
            }
            let query_start = self.token_ids.len();
            for pos in start..end {
                if pos >= max_pos {
                    return Err(CoreError::Execution(format!("position {pos} beyond the model's {max_pos}")));
                }
                self.token_ids.push(st.token_ids[pos]);
                self.positions.push(pos);
                self.slots.push(st.block_table[pos / block_size] as usize * block_size + pos % block_size);
            }
            let prompt_lp = if st.params.prompt_logprobs.is_some() {
                start.min(st.num_prompt_tokens.saturating_sub(1))..end.min(st.num_prompt_tokens.saturating_sub(1))
            } else {
                0..0
            };
            let samples = end == st.token_ids.len();
            if samples && *n < st.num_sample_rows() {
                return Err(CoreError::Execution(format!("request {req_idx} has more drafts than scheduled tokens")));
            }
            planned.push(Planned { req_idx, query_start, query_len: *n, samples, prompt_lp });
        }
        // Logits rows: the sample rows of each sampling request (its last position, or its last k + 1
        // with k drafts), then the prompt-logprob rows.
        let mut sample_rows: Vec<(usize, usize)> = Vec::new(); // (request, row within the request)
        for p in &planned {
            if p.samples {
                let rows = states[p.req_idx].num_sample_rows();
                for r in 0..rows {
                    self.logits_rows.push(p.query_start + p.query_len - rows + r);
                    sample_rows.push((p.req_idx, r));
                }
            }
        }
        let num_sample_rows = self.logits_rows.len();
        let mut prompt_targets: Vec<u32> = Vec::new();
        for p in &planned {
            let st = &states[p.req_idx];
            let first = st.num_computed_tokens;
            for pos in p.prompt_lp.clone() {
                self.logits_rows.push(p.query_start + (pos - first));
                prompt_targets.push(st.token_ids[pos + 1]);
            }
        }
        // Constrained requests that sample this step: (first sample row, request, its matcher taken out
        // so the masks can be filled while the forward runs, drafts).
        let mut grammar_rows: Vec<GrammarRow> = Vec::new();
        let mut sample_row = 0;
        for (p, st) in planned.iter().zip(states.iter_mut()) {
            if p.samples {
                if let Some(matcher) = st.grammar.take() {
                    grammar_rows.push((sample_row, p.req_idx, matcher, st.drafts().to_vec()));
                }
                sample_row += st.num_sample_rows();
            }
        }
        let vocab = self.model.config.vocab_size;
        let words = vocab.div_ceil(32);
        let mask_rows: Vec<usize> = grammar_rows.iter().map(|(_, _, _, d)| d.len() + 1).collect();
        self.bitmask.clear();
        self.bitmask.resize(mask_rows.iter().sum::<usize>() * words, 0);
        let fill_masks = |bitmask: &mut [u32], rows: &mut [GrammarRow]| {
            let mut chunks = Vec::with_capacity(rows.len());
            let mut rest = bitmask;
            for n in &mask_rows {
                let (head, tail) = rest.split_at_mut(n * words);
                chunks.push(head);
                rest = tail;
            }
            chunks.into_par_iter().zip(rows.par_iter_mut()).for_each(|(out, (_, _, m, drafts))| {
                fill_spec_masks(m.as_mut(), drafts, out, words);
            });
        };
        let spans: Vec<SeqSpan<'_>> = planned
            .iter()
            .map(|p| {
                let st = &states[p.req_idx];
                SeqSpan {
                    query_start: p.query_start,
                    query_len: p.query_len,
                    context_len: st.num_computed_tokens + p.query_len,
                    block_table: &st.block_table,
                }
            })
            .collect();
        let batch = ForwardBatch {
            token_ids: &self.token_ids,
            positions: &self.positions,
            slot_mapping: &self.slots,
            seqs: &spans,
            logits_rows: &self.logits_rows,
        };
        if !self.token_ids.is_empty() {
            let (model, kv, ws) = (&self.model, &mut self.kv, &mut self.ws);
            if grammar_rows.is_empty() {
                model.forward(&batch, kv, ws);
            } else {
                // Mask computation overlaps the forward; neither reads what the other writes.
                let bitmask = &mut self.bitmask;
                rayon::join(|| model.forward(&batch, kv, ws), || fill_masks(bitmask, &mut grammar_rows));
            }
        } else {
            fill_masks(&mut self.bitmask, &mut grammar_rows);
        }
        drop(spans);
        let (sample_logits, prompt_logits) =
            self.ws.logits[..self.logits_rows.len() * vocab].split_at_mut(num_sample_rows * vocab);

        // Prompt logprobs come from raw logits, before the sampler modifies its rows.
        let mut prompt_lps: Vec<Option<Vec<PositionLogprobs>>> = vec![None; planned.len()];
        if !prompt_targets.is_empty() {
            let mut offset = 0;
            for p in &planned {
                let count = p.prompt_lp.len();
                if count == 0 {
                    continue;
                }
                let k = states[p.req_idx].params.prompt_logprobs.unwrap_or(0);
                let rows = &prompt_logits[offset * vocab..(offset + count) * vocab];
                prompt_lps[p.req_idx] =
                    Some(self.sampler.prompt_logprobs(rows, &prompt_targets[offset..offset + count], k));
                offset += count;
            }
        }

        // Sample rows after the first of a request with drafts sample with copies of its state, each
        // seeing the drafts before it as output; the copy of the last emitted row becomes the state.
        let mut draft_states: Vec<Vec<SamplerState>> = states
            .iter()
            .map(|st| if st.num_drafts > 0 { vec![st.sampling.clone(); st.num_drafts] } else { Vec::new() })
            .collect();
        let mut rows: Vec<SamplingRow<'_>> = Vec::with_capacity(num_sample_rows);
        for ((p, st), extra) in planned.iter().zip(states.iter_mut()).zip(draft_states.iter_mut()) {
            if !p.samples {
                continue;
            }
            let st: &mut RunnerRequest<SamplerState> = st;
            let (np, num_real) = (st.num_prompt_tokens, st.num_tokens());
            let RunnerRequest { token_ids, params, sampling, .. } = st;
            let token_ids: &[u32] = token_ids.as_slice();
            let params: &SamplingParams = params;
            rows.push(SamplingRow {
                params,
                prompt_token_ids: &token_ids[..np],
                output_token_ids: &token_ids[np..num_real],
                state: sampling,
            });
            for (j, state) in extra.iter_mut().enumerate() {
                rows.push(SamplingRow {
                    params,
                    prompt_token_ids: &token_ids[..np],
                    output_token_ids: &token_ids[np..num_real + j + 1],
                    state,
                });
            }
        }
        let mut masks: Vec<Option<&[u32]>> = Vec::new();
        if !grammar_rows.is_empty() {
            masks.resize(num_sample_rows, None);
            let mut offset = 0;
            for ((row, _, _, drafts), n) in grammar_rows.iter().zip(&mask_rows) {
                for r in 0..=drafts.len() {
                    masks[row + r] = Some(&self.bitmask[(offset + r) * words..(offset + r + 1) * words]);
                }
                offset += n;
            }
        }
        let mut clock = Clock::start();
        let sampled = self.sampler.sample_with_masks(sample_logits, &mut rows, &masks, &mut self.engine_rng);
        clock.lap(Op::Sampling);
        drop(rows);

        let n = planned.len();
        let mut samples = StepSamples::group(sampled, &sample_rows, n);
        for (_, req_idx, matcher, _) in grammar_rows {
            states[req_idx].grammar = Some(matcher);
        }
        let mut out = ModelRunnerOutput {
            req_ids: order.iter().map(|s| (*s).to_owned()).collect(),
            sampled_token_ids: vec![Vec::new(); n],
            logprobs: vec![None; n],
            prompt_logprobs: prompt_lps,
            spec_token_ids: Vec::new(),
        };
        for (p, st) in planned.iter().zip(states.iter_mut()) {
            if !p.samples {
                st.num_computed_tokens += p.query_len;
                continue;
            }
            let emitted = st.finish_step(p.query_len, &samples.tokens[p.req_idx]);
            if emitted.len() > 1 {
                st.sampling = std::mem::take(&mut draft_states[p.req_idx][emitted.len() - 2]);
            }
            out.logprobs[p.req_idx] = samples.emitted_logprobs(p.req_idx, emitted.len());
            out.sampled_token_ids[p.req_idx] = emitted;
        }
        drop(states);
        if let Some(proposer) = self.spec.as_mut() {
            out.spec_token_ids = proposer.propose(plan, &out, &self.reqs, self.kv.layout.block_size);
        }
        Ok(out)
    }
}
