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

use std::collections::HashMap;
use std::sync::Arc;

use ironllm_core::executor::ModelExecutor;
use ironllm_core::outputs::{ModelRunnerOutput, PositionLogprobs, SchedulerOutput};
use ironllm_core::structured::GrammarMatcher;
use ironllm_core::{CoreError, SamplingParams};
use ironllm_kernels::cpu::attention::SeqSpan;
use rayon::prelude::*;

use crate::llama::{ForwardBatch, KvCache, LlamaModel, Workspace};
use crate::sampler::{Rng, Sampler, SamplerState, SamplingRow};

struct ReqState {
    /// Prompt followed by every output token known so far.
    token_ids: Vec<u32>,
    num_prompt_tokens: usize,
    block_table: Vec<u32>,
    num_computed_tokens: usize,
    params: Arc<SamplingParams>,
    sampler: SamplerState,
    /// The structured-output matcher, advanced with every sampled token (`None`: unconstrained).
    grammar: Option<Box<dyn GrammarMatcher>>,
}

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
    reqs: HashMap<String, ReqState>,
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
    /// A runner with a KV cache of `num_blocks` blocks of `block_size` tokens. `seed` seeds the
    /// generators of requests that do not bring their own.
    pub fn new(model: Arc<LlamaModel>, num_blocks: usize, block_size: usize, seed: u64) -> CpuModelRunner {
        let kv = KvCache::new(&model.config, num_blocks, block_size);
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
            reqs: HashMap::new(),
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

    fn apply_plan_bookkeeping(&mut self, plan: &SchedulerOutput) -> Result<(), CoreError> {
        for id in &plan.finished_req_ids {
            self.reqs.remove(id);
        }
        for id in &plan.preempted_req_ids {
            if let Some(st) = self.reqs.get_mut(id) {
                st.block_table.clear();
                st.num_computed_tokens = 0;
            }
        }
        for new in &plan.scheduled_new_reqs {
            let mut token_ids = new.prompt_token_ids.clone();
            token_ids.extend_from_slice(&new.output_token_ids);
            let block_table = new.block_ids.iter().map(|b| b.0).collect();
            match self.reqs.get_mut(&new.req_id) {
                // Resumed after preemption: keep the sampler state so seeded draws continue.
                Some(st) => {
                    st.token_ids = token_ids;
                    st.block_table = block_table;
                    st.num_computed_tokens = new.num_computed_tokens;
                }
                None => {
                    let sampler = SamplerState::new(&new.sampling_params, &mut self.engine_rng);
                    // A request this runner has not seen starts its grammar at the output's start and
                    // replays any output it already has.
                    let grammar = new.sampling_params.compiled_grammar.as_ref().map(|g| {
                        let mut matcher = g.new_matcher();
                        for &t in &new.output_token_ids {
                            matcher.accept_token(t);
                        }
                        matcher
                    });
                    self.reqs.insert(
                        new.req_id.clone(),
                        ReqState {
                            token_ids,
                            num_prompt_tokens: new.prompt_token_ids.len(),
                            block_table,
                            num_computed_tokens: new.num_computed_tokens,
                            params: new.sampling_params.clone(),
                            sampler,
                            grammar,
                        },
                    );
                }
            }
        }
        for cached in &plan.scheduled_cached_reqs {
            let st = self
                .reqs
                .get_mut(&cached.req_id)
                .ok_or_else(|| CoreError::Execution(format!("unknown request `{}`", cached.req_id)))?;
            st.block_table.extend(cached.new_block_ids.iter().map(|b| b.0));
            st.num_computed_tokens = cached.num_computed_tokens;
        }
        Ok(())
    }
}

impl ModelExecutor for CpuModelRunner {
    fn execute_model(&mut self, plan: &SchedulerOutput) -> Result<ModelRunnerOutput, CoreError> {
        let pool = Arc::clone(&self.pool);
        pool.install(|| self.execute_step(plan))
    }

    fn supports_structured_output(&self) -> bool {
        true
    }
}

impl CpuModelRunner {
    fn execute_step(&mut self, plan: &SchedulerOutput) -> Result<ModelRunnerOutput, CoreError> {
        self.apply_plan_bookkeeping(plan)?;
        let block_size = self.kv.layout.block_size;
        let max_pos = self.model.config.max_position_embeddings.max(1);
        self.token_ids.clear();
        self.positions.clear();
        self.slots.clear();
        self.logits_rows.clear();

        // Requests in batch order, with their slices of the flattened batch.
        let order: Vec<&String> = plan.num_scheduled_tokens.iter().map(|(id, _)| id).collect();
        let mut planned = Vec::with_capacity(order.len());
        let mut states: Vec<&mut ReqState> = Vec::with_capacity(order.len());
        {
            let mut by_id: HashMap<&String, &mut ReqState> = self.reqs.iter_mut().collect();
            for id in &order {
                let st = by_id
                    .remove(*id)
                    .ok_or_else(|| CoreError::Execution(format!("request `{id}` scheduled twice or unknown")))?;
                states.push(st);
            }
        }
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
            planned.push(Planned {
                req_idx,
                query_start,
                query_len: *n,
                samples: end == st.token_ids.len(),
                prompt_lp,
            });
        }
        // Logits rows: first one per sampling request, then the prompt-logprob rows.
        for p in &planned {
            if p.samples {
                self.logits_rows.push(p.query_start + p.query_len - 1);
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
        // Constrained rows that sample this step: (sample row, request, its matcher taken out so the
        // masks can be filled while the forward runs).
        let mut grammar_rows: Vec<(usize, usize, Box<dyn GrammarMatcher>)> = Vec::new();
        let mut sample_row = 0;
        for (p, st) in planned.iter().zip(states.iter_mut()) {
            if p.samples {
                if let Some(matcher) = st.grammar.take() {
                    grammar_rows.push((sample_row, p.req_idx, matcher));
                }
                sample_row += 1;
            }
        }
        let vocab = self.model.config.vocab_size;
        let words = vocab.div_ceil(32);
        self.bitmask.clear();
        self.bitmask.resize(grammar_rows.len() * words, 0);
        let fill_masks = |bitmask: &mut [u32], rows: &mut [(usize, usize, Box<dyn GrammarMatcher>)]| {
            bitmask.par_chunks_mut(words).zip(rows.par_iter_mut()).for_each(|(out, (_, _, m))| {
                m.fill_next_token_bitmask(out);
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

        let mut rows: Vec<SamplingRow<'_>> = Vec::with_capacity(num_sample_rows);
        let mut sample_req_idx = Vec::with_capacity(num_sample_rows);
        for (p, st) in planned.iter().zip(states.iter_mut()) {
            if p.samples {
                let st: &mut ReqState = st;
                let (prompt, output) = st.token_ids.split_at(st.num_prompt_tokens);
                rows.push(SamplingRow {
                    params: &st.params,
                    prompt_token_ids: prompt,
                    output_token_ids: output,
                    state: &mut st.sampler,
                });
                sample_req_idx.push(p.req_idx);
            }
        }
        let mut masks: Vec<Option<&[u32]>> = Vec::new();
        if !grammar_rows.is_empty() {
            masks.resize(num_sample_rows, None);
            for (i, (row, _, _)) in grammar_rows.iter().enumerate() {
                masks[*row] = Some(&self.bitmask[i * words..(i + 1) * words]);
            }
        }
        let sampled = self.sampler.sample_with_masks(sample_logits, &mut rows, &masks, &mut self.engine_rng);
        drop(rows);

        let mut out = ModelRunnerOutput {
            req_ids: order.iter().map(|s| (*s).clone()).collect(),
            sampled_token_ids: vec![Vec::new(); planned.len()],
            logprobs: vec![None; planned.len()],
            prompt_logprobs: prompt_lps,
        };
        for (tok, &ri) in sampled.into_iter().zip(&sample_req_idx) {
            out.sampled_token_ids[ri] = vec![tok.token_id];
            out.logprobs[ri] = tok.logprobs.map(|l| vec![l]);
        }
        for (_, req_idx, mut matcher) in grammar_rows {
            if let Some(&t) = out.sampled_token_ids[req_idx].first() {
                if !matcher.is_terminated() && !matcher.accept_token(t) {
                    tracing::debug!("structured output: token {t} rejected by the grammar");
                }
            }
            states[req_idx].grammar = Some(matcher);
        }
        for (p, st) in planned.iter().zip(states.iter_mut()) {
            st.num_computed_tokens += p.query_len;
            if let Some(&t) = out.sampled_token_ids[p.req_idx].first() {
                st.token_ids.push(t);
            }
        }
        Ok(out)
    }
}
