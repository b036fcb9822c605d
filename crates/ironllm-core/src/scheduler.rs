//! The scheduler: every step it re-plans which requests compute how many tokens, under a token budget
//! (`max_num_batched_tokens`) and a cap on running sequences (`max_num_seqs`), and applies the model's
//! results (new tokens, stop checks, freeing finished requests' blocks).
//!
//! There is no prefill phase and no decode phase: a request simply has tokens left to compute
//! (`num_tokens() - num_computed_tokens`). Running requests are served first, in order, so decodes are
//! never starved by prefills; what budget remains admits waiting requests, after a prefix-cache lookup,
//! chunking their prompts to fit (chunked prefill). When a running request cannot get blocks, the
//! scheduler preempts the newest running request (FCFS) or the one with the largest (priority,
//! arrival) (priority policy): its blocks are freed and it goes back to the front of the queue to be
//! recomputed later (vLLM V1's preemption by recompute). A step that preempted admits nobody new.
//!
//! One departure from vLLM, the admission headroom: a waiting request is admitted only while the free
//! blocks also cover every running request's next `min(headroom, output left)` tokens. vLLM admits
//! whenever the prompt fits, so on a KV-bound workload the cache fills with prompts and every decode that
//! needs a block preempts (and later recomputes) someone; with the headroom the request waits instead.
//! Under the priority policy only the running requests that outrank the waiting one keep their room.
//! `admission_headroom_tokens = 0` restores vLLM's admission.
//!
//! Invariants: a request is in exactly one of `waiting` and `running` until it finishes, and then it is
//! gone; exactly the running requests hold block tables; the tokens of one plan never exceed the
//! budget. Between [`Scheduler::schedule`] and [`Scheduler::update_from_output`] the plan is in flight:
//! in synchronous mode `num_computed_tokens` advances only when its output comes back.
//!
//! Async scheduling (`--async-scheduling`, vLLM's `AsyncScheduler`): the engine plans step N+1 before
//! step N's output is back, so the host work hides behind the device. `schedule` then advances
//! `num_computed_tokens` at once and, for every request whose step samples, counts one output
//! placeholder: a token the scheduler does not know yet but may already schedule as the next step's
//! input (the runner feeds it from its own sample). `update_from_output` turns placeholders into real
//! tokens. A request that finishes at step N (EOS, stop token, abort) may still be in step N+1: it is
//! gone by then, so that entry is ignored and its blocks were freed once, when it finished. A request
//! whose in-flight steps already reach `max_tokens` or the context is not scheduled again, so neither
//! is ever exceeded. A request preempted while its step is in flight keeps that step's token (it was
//! sampled from a complete context), as in vLLM. Speculative decoding is refused with async scheduling
//! (drafts are proposed from the previous step's tokens, which are not known when the next step is
//! planned); everything else (chunked prefill, prefix caching, preemption, penalties, logprobs,
//! structured output on runners that execute in `submit`) works, because the runner, not the
//! scheduler, holds the sampled tokens the next step needs.
//!
//! Contract with the runner: it applies `finished_req_ids` and `preempted_req_ids` (dropping its state)
//! before `scheduled_new_reqs`, since an id can leave and come back as new in one plan. Those id lists
//! only ride on plans that schedule tokens, so a caller may skip executing an empty plan.
//!
//! The design is vLLM V1's `Scheduler` (`vllm/v1/core/sched/scheduler.py`), written in our own words,
//! without its feature growth (speculative decoding, structured output, KV connectors get seams of
//! their own when they land).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use crate::kv_cache_manager::KvCacheManager;
use crate::outputs::{
    BlockId, CachedRequestData, EngineCoreOutput, FinishReason, ModelRunnerOutput, NewRequestData, PositionLogprobs,
    SchedulerOutput, StopReason,
};
use crate::request::{Request, RequestStatus};
use crate::spec_decode::{SpecDecodingStats, SpeculativeConfig};
use crate::CoreError;

/// Which waiting request goes first, and which running request is preempted (`--scheduling-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SchedulingPolicy {
    /// First come, first served; preempt the most recently admitted.
    #[default]
    Fcfs,
    /// By (priority, arrival time), lower first; preempt the largest.
    Priority,
}

/// Default of [`SchedulerConfig::admission_headroom_tokens`].
/// 256: about the length of a typical chat reply (ShareGPT-like replies run ~180-270 tokens), so most
/// requests finish inside their reserve; a longer one can still be preempted. A request whose `max_tokens`
/// is smaller reserves only that.
pub const DEFAULT_ADMISSION_HEADROOM_TOKENS: usize = 256;

/// The scheduler's limits, resolved once from flags (vLLM's scheduler and cache config).
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// `--max-num-seqs`: most requests running at once.
    pub max_num_seqs: usize,
    /// `--max-num-batched-tokens`: most tokens computed in one step.
    pub max_num_batched_tokens: usize,
    /// `--max-model-len`: longest sequence (prompt plus output).
    pub max_model_len: usize,
    /// `--block-size`: tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the cache (vLLM's `num_gpu_blocks`, on whichever device holds the cache).
    pub num_blocks: usize,
    /// `--enable-prefix-caching` (on by default, as in vLLM V1).
    pub enable_prefix_caching: bool,
    /// `--enable-chunked-prefill` (on by default, as in vLLM V1).
    pub enable_chunked_prefill: bool,
    /// `--long-prefill-token-threshold`: most tokens one request computes per step (0 = no cap). Only
    /// with chunked prefill: without it a prompt must be computed whole.
    pub long_prefill_token_threshold: usize,
    pub policy: SchedulingPolicy,
    /// `--speculative-config`, with `disable_by_batch_size` already resolved for the backend.
    pub speculative: Option<SpeculativeConfig>,
    /// `--async-scheduling`: plan the next step while the current one runs (off by default, as in vLLM).
    pub async_scheduling: bool,
    /// Admission headroom, in tokens (ours; `IRONLLM_ADMISSION_HEADROOM`): a waiting request is admitted
    /// only while the free blocks also cover every running request's next `min(headroom, output left)`
    /// tokens. 0 admits whenever the prompt chunk fits, as vLLM does; then a cache filled with prompts
    /// preempts (and recomputes) requests as soon as their decodes need blocks.
    pub admission_headroom_tokens: usize,
}

impl SchedulerConfig {
    /// vLLM's defaults for the given context length and cache size.
    pub fn new(max_model_len: usize, num_blocks: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            max_model_len,
            block_size: 16,
            num_blocks,
            enable_prefix_caching: true,
            enable_chunked_prefill: true,
            long_prefill_token_threshold: 0,
            policy: SchedulingPolicy::Fcfs,
            speculative: None,
            async_scheduling: false,
            admission_headroom_tokens: DEFAULT_ADMISSION_HEADROOM_TOKENS,
        }
    }

    /// Checks the limits against each other, with vLLM's messages where vLLM has one.
    pub fn validate(&self) -> Result<(), CoreError> {
        let bad = |msg: String| Err(CoreError::InvalidConfig(msg));
        for (name, value) in [
            ("max_num_seqs", self.max_num_seqs),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
            ("max_model_len", self.max_model_len),
            ("block_size", self.block_size),
            ("num_blocks", self.num_blocks),
        ] {
            if value == 0 {
                return bad(format!("{name} must be at least 1, got 0."));
            }
        }
        if self.num_blocks >= u32::MAX as usize {
            return bad(format!("num_blocks must be below {}, got {}.", u32::MAX, self.num_blocks));
        }
        if self.async_scheduling && self.speculative.is_some() {
            return bad("--async-scheduling does not support speculative decoding yet; drop one of \
                 --async-scheduling and --speculative-config."
                .to_string());
        }
        if self.max_num_batched_tokens < self.max_num_seqs {
            return bad(format!(
                "max_num_batched_tokens ({}) must be greater than or equal to max_num_seqs ({}).",
                self.max_num_batched_tokens, self.max_num_seqs
            ));
        }
        if !self.enable_chunked_prefill && self.max_num_batched_tokens < self.max_model_len {
            return bad(format!(
                "max_num_batched_tokens ({}) is smaller than max_model_len ({}). This effectively \
                 limits the maximum sequence length to max_num_batched_tokens and makes vLLM reject \
                 longer sequences. Please increase max_num_batched_tokens or decrease max_model_len.",
                self.max_num_batched_tokens, self.max_model_len
            ));
        }
        // A lone request must always fit, or preemption could never make room for it.
        let capacity = self.num_blocks.saturating_mul(self.block_size);
        if capacity < self.max_model_len {
            return bad(format!(
                "The model's max seq len ({}) is larger than the maximum number of tokens that can be \
                 stored in KV cache ({capacity}). Try increasing `gpu_memory_utilization` or \
                 decreasing `max_model_len` when initializing the engine.",
                self.max_model_len
            ));
        }
        Ok(())
    }
}

/// A snapshot of the scheduler for metrics (vLLM's `SchedulerStats`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedulerStats {
    pub num_running: usize,
    pub num_waiting: usize,
    /// Fraction of KV blocks held, in [0, 1].
    pub kv_cache_usage: f64,
    /// Tokens looked up in the prefix cache (`vllm:prefix_cache_queries`).
    pub prefix_cache_queries: u64,
    /// Tokens found there (`vllm:prefix_cache_hits`).
    pub prefix_cache_hits: u64,
    /// Preemptions since start (`vllm:num_preemptions`).
    pub num_preemptions: u64,
    /// Speculative decoding's acceptance counters since start (`vllm:spec_decode_*`).
    pub spec_decoding: SpecDecodingStats,
}

/// Blocks `request` holds once its prompt is computed and it has grown by the admission headroom
/// (capped by its `max_tokens` and the context).
fn headroom_blocks(config: &SchedulerConfig, request: &Request) -> usize {
    let known = request.num_tokens() + request.num_output_placeholders;
    let output_left = request.max_tokens.saturating_sub(request.num_output_tokens() + request.num_output_placeholders);
    let tokens = (known + output_left.min(config.admission_headroom_tokens)).min(config.max_model_len);
    tokens.div_ceil(config.block_size)
}

/// Orders requests by (priority, arrival time, admission order).
type PriorityKey = (i32, Instant, u64);

fn priority_key(request: &Request) -> PriorityKey {
    (request.priority, request.arrival_time, request.arrival_index)
}

/// Requests waiting for their (first or next) admission, in the order the policy serves them.
#[derive(Debug, Clone)]
enum WaitingQueue {
    Fcfs(VecDeque<String>),
    Priority(BTreeMap<PriorityKey, String>),
}

impl WaitingQueue {
    fn new(policy: SchedulingPolicy) -> Self {
        match policy {
            SchedulingPolicy::Fcfs => WaitingQueue::Fcfs(VecDeque::new()),
            SchedulingPolicy::Priority => WaitingQueue::Priority(BTreeMap::new()),
        }
    }

    fn push_back(&mut self, request: &Request) {
        match self {
            WaitingQueue::Fcfs(queue) => queue.push_back(request.request_id.clone()),
            WaitingQueue::Priority(map) => {
                map.insert(priority_key(request), request.request_id.clone());
            }
        }
    }

    /// A preempted request goes first in FCFS; under priority its key already places it.
    fn push_front(&mut self, request: &Request) {
        match self {
            WaitingQueue::Fcfs(queue) => queue.push_front(request.request_id.clone()),
            WaitingQueue::Priority(_) => self.push_back(request),
        }
    }

    fn front(&self) -> Option<&str> {
        match self {
            WaitingQueue::Fcfs(queue) => queue.front().map(String::as_str),
            WaitingQueue::Priority(map) => map.first_key_value().map(|(_, id)| id.as_str()),
        }
    }

    fn pop_front(&mut self) -> Option<String> {
        match self {
            WaitingQueue::Fcfs(queue) => queue.pop_front(),
            WaitingQueue::Priority(map) => map.pop_first().map(|(_, id)| id),
        }
    }

    fn remove(&mut self, request: &Request) {
        match self {
            WaitingQueue::Fcfs(queue) => queue.retain(|id| *id != request.request_id),
            WaitingQueue::Priority(map) => {
                map.remove(&priority_key(request));
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            WaitingQueue::Fcfs(queue) => queue.len(),
            WaitingQueue::Priority(map) => map.len(),
        }
    }

    fn iter(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match self {
            WaitingQueue::Fcfs(queue) => Box::new(queue.iter().map(String::as_str)),
            WaitingQueue::Priority(map) => Box::new(map.values().map(String::as_str)),
        }
    }
}

/// Continuous-batching scheduler over one KV cache.
#[derive(Debug, Clone)]
pub struct Scheduler {
    config: SchedulerConfig,
    kv_cache_manager: KvCacheManager,
    /// Every unfinished request, waiting or running.
    requests: HashMap<String, Request>,
    waiting: WaitingQueue,
    /// In admission order: the back is the newest, FCFS's first to preempt.
    running: Vec<String>,
    /// Finished or aborted since the last plan that carried tokens; the runner drops their state.
    finished_req_ids: Vec<String>,
    /// Preempted in a plan that carried no tokens (so it may not reach the runner); sent with the next.
    unsent_preempted_req_ids: Vec<String>,
    /// Final outputs of requests finished outside `update_from_output` (aborts, stop strings).
    pending_outputs: Vec<EngineCoreOutput>,
    num_preemptions_total: u64,
    next_arrival_index: u64,
    /// `step_id` of the next plan.
    next_step_id: u64,
    spec_stats: SpecDecodingStats,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Result<Scheduler, CoreError> {
        config.validate()?;
        Ok(Scheduler {
            kv_cache_manager: KvCacheManager::new(config.num_blocks, config.block_size, config.enable_prefix_caching),
            requests: HashMap::new(),
            waiting: WaitingQueue::new(config.policy),
            running: Vec::new(),
            finished_req_ids: Vec::new(),
            unsent_preempted_req_ids: Vec::new(),
            pending_outputs: Vec::new(),
            num_preemptions_total: 0,
            next_arrival_index: 0,
            next_step_id: 0,
            spec_stats: SpecDecodingStats::default(),
            config,
        })
    }

    /// Queues a request. Rejects a duplicate id, an empty prompt, and a prompt longer than
    /// `max_model_len` or than the whole KV cache; resolves `max_tokens` against the context.
    pub fn add_request(&mut self, mut request: Request) -> Result<(), CoreError> {
        if self.requests.contains_key(&request.request_id) {
            return Err(CoreError::DuplicateRequest(request.request_id));
        }
        let prompt_len = request.num_prompt_tokens();
        if prompt_len == 0 {
            return Err(CoreError::InvalidParams("The decoder prompt cannot be empty".to_string()));
        }
        let max_model_len = self.config.max_model_len;
        if prompt_len > max_model_len {
            return Err(CoreError::TooLong(format!(
                "The decoder prompt (length {prompt_len}) is longer than the maximum model length of \
                 {max_model_len}. Make sure that `max_model_len` is no smaller than the number of \
                 text tokens."
            )));
        }
        let blocks_needed = prompt_len.div_ceil(self.config.block_size);
        if blocks_needed > self.config.num_blocks {
            return Err(CoreError::TooLong(format!(
                "The prompt (length {prompt_len}) needs {blocks_needed} KV cache blocks of {} tokens, \
                 but the KV cache has only {} blocks.",
                self.config.block_size, self.config.num_blocks
            )));
        }
        let context_left = max_model_len - prompt_len;
        request.max_tokens = request.sampling_params.max_tokens.map_or(context_left, |m| m.min(context_left));
        // From admission on, the scheduler owns the bookkeeping fields.
        request.status = RequestStatus::Waiting;
        request.num_computed_tokens = 0;
        request.num_cached_tokens = None;
        request.arrival_index = self.next_arrival_index;
        self.next_arrival_index += 1;
        self.waiting.push_back(&request);
        self.requests.insert(request.request_id.clone(), request);
        Ok(())
    }

    /// Plans one step. See the module docs for the policy.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut token_budget = self.config.max_num_batched_tokens;
        // (request id, tokens this step including drafts, drafts, blocks added this step), in running order.
        let mut scheduled_running: Vec<(String, usize, usize, Vec<BlockId>)> = Vec::new();
        let mut preempted_req_ids: Vec<String> = Vec::new();
        let lookahead = self.config.speculative.as_ref().map_or(0, SpeculativeConfig::num_lookahead_tokens);

        let mut req_idx = 0;
        while req_idx < self.running.len() && token_budget > 0 {
            let req_id = self.running[req_idx].clone();
            let request = self.tracked(&req_id);
            let num_new_tokens = self.num_tokens_to_schedule(request, token_budget);
            if num_new_tokens == 0 {
                req_idx += 1;
                continue;
            }
            let num_drafts = self.num_drafts_to_schedule(request, num_new_tokens, token_budget);
            let num_scheduled = num_new_tokens + num_drafts;
            let new_blocks = loop {
                let request = tracked(&self.requests, &req_id);
                let num_slots =
                    with_lookahead(self.config.max_model_len, request.num_computed_tokens, num_scheduled, lookahead);
                if let Some(blocks) = self.kv_cache_manager.allocate_slots(request, num_slots, &[]) {
                    break Some(blocks);
                }
                let victim_idx = self.pick_victim();
                let victim_id = self.running.remove(victim_idx);
                if victim_idx < req_idx {
                    req_idx -= 1;
                }
                // A victim already planned this step (possible under priority) gives its budget back.
                if let Some(pos) = scheduled_running.iter().position(|(id, ..)| *id == victim_id) {
                    token_budget += scheduled_running.remove(pos).1;
                }
                self.preempt(&victim_id);
                let preempted_self = victim_id == req_id;
                preempted_req_ids.push(victim_id);
                if preempted_self {
                    break None;
                }
            };
            if let Some(blocks) = new_blocks {
                token_budget -= num_scheduled;
                scheduled_running.push((req_id, num_scheduled, num_drafts, blocks));
                req_idx += 1;
            }
        }

        let mut scheduled_new: Vec<(String, usize)> = Vec::new();
        let headroom = self.config.admission_headroom_tokens;
        // Blocks each running request will claim within the headroom, with its priority key: admission
        // leaves them free.
        // Only built when someone could be admitted: most decode steps have nobody waiting.
        let may_admit = self.waiting.len() > 0 && self.running.len() < self.config.max_num_seqs;
        let mut reserves: Vec<(PriorityKey, usize)> = if headroom == 0 || !may_admit {
            Vec::new()
        } else {
            self.running
                .iter()
                .map(|id| {
                    let request = self.tracked(id);
                    let held = self.kv_cache_manager.block_table(id).map_or(0, <[BlockId]>::len);
                    (priority_key(request), headroom_blocks(&self.config, request).saturating_sub(held))
                })
                .collect()
        };
        // Admitting right after preempting would only thrash.
        while preempted_req_ids.is_empty() && token_budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(req_id) = self.waiting.front().map(str::to_owned) else {
                break;
            };
            let Some(request) = self.requests.get_mut(&req_id) else {
                tracing::error!(%req_id, "waiting request is not tracked; dropping it from the queue");
                self.waiting.pop_front();
                continue;
            };
            let (computed_blocks, num_computed_tokens) = self.kv_cache_manager.get_computed_blocks(request);
            let mut num_new_tokens = request.num_tokens() - num_computed_tokens;
            if self.config.enable_chunked_prefill {
                let threshold = self.config.long_prefill_token_threshold;
                if threshold > 0 {
                    num_new_tokens = num_new_tokens.min(threshold);
                }
                num_new_tokens = num_new_tokens.min(token_budget);
            } else if num_new_tokens > token_budget {
                break;
            }
            let num_slots = with_lookahead(self.config.max_model_len, num_computed_tokens, num_new_tokens, lookahead);
            // A lone request is always admitted: nothing else could free blocks for it. Prefix-cache hits
            // that sit in the free queue leave it when taken, so they count against the free blocks too.
            let target_blocks = if headroom == 0 { 0 } else { headroom_blocks(&self.config, request) };
            // Under the priority policy only the running requests that outrank this one keep their room:
            // the others it may preempt later, as it could under vLLM's admission.
            if headroom > 0 && !self.running.is_empty() {
                let key = priority_key(request);
                let outranks = |other: &PriorityKey| self.config.policy == SchedulingPolicy::Fcfs || *other < key;
                let reserved: usize = reserves.iter().filter(|(k, _)| outranks(k)).map(|(_, b)| b).sum();
                let pool = self.kv_cache_manager.block_pool();
                let free_hits = computed_blocks.iter().filter(|&&b| pool.is_free(b)).count();
                let need = target_blocks.saturating_sub(computed_blocks.len()) + free_hits;
                if self.kv_cache_manager.num_free_blocks() < reserved + need {
                    break;
                }
            }
            if self.kv_cache_manager.allocate_slots(request, num_slots, &computed_blocks).is_none() {
                break;
            }
            if headroom > 0 {
                let held = self.kv_cache_manager.block_table(&req_id).map_or(0, <[BlockId]>::len);
                reserves.push((priority_key(request), target_blocks.saturating_sub(held)));
            }
            self.waiting.pop_front();
            request.num_computed_tokens = num_computed_tokens;
            request.num_cached_tokens.get_or_insert(num_computed_tokens);
            request.first_step_id.get_or_insert(self.next_step_id);
            request.status = RequestStatus::Running;
            token_budget -= num_new_tokens;
            self.running.push(req_id.clone());
            scheduled_new.push((req_id, num_new_tokens));
        }

        self.build_plan(scheduled_running, scheduled_new, preempted_req_ids)
    }

    /// Turns the step's decisions into the plain-data plan the runner reads.
    fn build_plan(
        &mut self,
        scheduled_running: Vec<(String, usize, usize, Vec<BlockId>)>,
        scheduled_new: Vec<(String, usize)>,
        mut preempted_req_ids: Vec<String>,
    ) -> SchedulerOutput {
        let mut plan = SchedulerOutput::default();
        for (req_id, num_tokens, num_drafts, new_block_ids) in scheduled_running {
            // Drafts are consumed by the step that verifies them (or dropped with it: the step's new token
            // makes them stale either way).
            if let Some(request) = self.requests.get_mut(&req_id) {
                let mut drafts = std::mem::take(&mut request.spec_token_ids);
                if num_drafts > 0 {
                    drafts.truncate(num_drafts);
                    plan.scheduled_spec_decode_tokens.push((req_id.clone(), drafts));
                }
            }
            plan.scheduled_cached_reqs.push(CachedRequestData {
                num_computed_tokens: self.tracked(&req_id).num_computed_tokens,
                req_id: req_id.clone(),
                new_block_ids,
            });
            plan.num_scheduled_tokens.push((req_id, num_tokens));
        }
        for (req_id, num_tokens) in scheduled_new {
            let request = self.tracked(&req_id);
            plan.scheduled_new_reqs.push(NewRequestData {
                req_id: req_id.clone(),
                prompt_token_ids: request.prompt_token_ids().to_vec(),
                output_token_ids: request.output_token_ids().to_vec(),
                sampling_params: Arc::clone(&request.sampling_params),
                block_ids: self.kv_cache_manager.block_table(&req_id).unwrap_or_default().to_vec(),
                num_computed_tokens: request.num_computed_tokens,
            });
            plan.num_scheduled_tokens.push((req_id, num_tokens));
        }
        plan.total_num_scheduled_tokens = plan.num_scheduled_tokens.iter().map(|(_, n)| n).sum();
        plan.spec_propose_req_ids = self.spec_propose_req_ids(&plan);
        plan.step_id = self.next_step_id;
        self.next_step_id += 1;
        if self.config.async_scheduling {
            // The plan holds each request's count before this step; from now on the step counts as
            // computed, and a step that reaches the end of the known tokens owes one sampled token.
            for (req_id, num_tokens) in &plan.num_scheduled_tokens {
                let Some(request) = self.requests.get_mut(req_id) else {
                    continue;
                };
                request.num_computed_tokens += num_tokens;
                if request.num_computed_tokens == request.num_tokens() + request.num_output_placeholders {
                    request.num_output_placeholders += 1;
                    plan.async_sampling_req_ids.push(req_id.clone());
                }
            }
        }
        if plan.total_num_scheduled_tokens == 0 {
            // This plan may never reach the runner: keep its news for the next one.
            self.unsent_preempted_req_ids.append(&mut preempted_req_ids);
        } else {
            plan.finished_req_ids = std::mem::take(&mut self.finished_req_ids);
            plan.preempted_req_ids = std::mem::take(&mut self.unsent_preempted_req_ids);
            plan.preempted_req_ids.append(&mut preempted_req_ids);
        }
        plan
    }

    /// Tokens `request` computes this step: all it has left, capped by the long-prefill threshold and
    /// the remaining budget.
    fn num_tokens_to_schedule(&self, request: &Request, token_budget: usize) -> usize {
        // Async scheduling: when the steps in flight already bring the request to `max_tokens` or to the
        // end of the context, another step could only compute a token past its end.
        let num_placeholders = request.num_output_placeholders;
        if num_placeholders > 0
            && (request.num_output_tokens() + num_placeholders >= request.max_tokens
                || request.num_tokens() + num_placeholders >= self.config.max_model_len)
        {
            return 0;
        }
        let mut num_tokens = request.num_tokens_to_compute();
        let threshold = self.config.long_prefill_token_threshold;
        if self.config.enable_chunked_prefill && threshold > 0 {
            num_tokens = num_tokens.min(threshold);
        }
        num_tokens.min(token_budget)
    }

    /// How many of `request`'s proposed drafts this step verifies: none unless all its remaining tokens
    /// fit (a prefill still in chunks has no drafts), then as many as the budget, the context and
    /// `max_tokens` leave room for (the step emits at most one token past the accepted drafts).
    fn num_drafts_to_schedule(&self, request: &Request, num_new_tokens: usize, token_budget: usize) -> usize {
        if request.spec_token_ids.is_empty() || num_new_tokens < request.num_tokens_to_compute() {
            return 0;
        }
        let context_left = self.config.max_model_len.saturating_sub(request.num_tokens() + 1);
        let output_left = request.max_tokens.saturating_sub(request.num_output_tokens() + 1);
        request.spec_token_ids.len().min(token_budget - num_new_tokens).min(context_left).min(output_left)
    }

    /// Scheduled requests whose next drafts are worth proposing: speculation is on, the batch is below
    /// `disable_by_batch_size`, and the request's gate is open (which also counts down its pause).
    fn spec_propose_req_ids(&mut self, plan: &SchedulerOutput) -> Vec<String> {
        let Some(spec) = &self.config.speculative else {
            return Vec::new();
        };
        if self.running.len() >= spec.disable_by_batch_size.unwrap_or(usize::MAX) {
            return Vec::new();
        }
        let mut ids = Vec::new();
        for (req_id, _) in &plan.num_scheduled_tokens {
            if let Some(request) = self.requests.get_mut(req_id) {
                if request.draft_gate.allows_drafts() {
                    ids.push(req_id.clone());
                }
            }
        }
        ids
    }

    /// Index in `running` of the request to preempt: the newest (FCFS) or the largest (priority,
    /// arrival) (priority policy). `running` is non-empty when this is called: the request asking for
    /// blocks is in it.
    fn pick_victim(&self) -> usize {
        match self.config.policy {
            SchedulingPolicy::Fcfs => self.running.len() - 1,
            SchedulingPolicy::Priority => self
                .running
                .iter()
                .enumerate()
                .max_by_key(|(_, id)| priority_key(self.tracked(id)))
                .map_or(0, |(idx, _)| idx),
        }
    }

    /// Frees a running request's blocks and queues it at the front to be recomputed. The caller has
    /// already taken it out of `running`.
    fn preempt(&mut self, req_id: &str) {
        self.kv_cache_manager.free(req_id);
        let Some(request) = self.requests.get_mut(req_id) else {
            return;
        };
        request.status = RequestStatus::Preempted;
        request.num_computed_tokens = 0;
        // A step in flight still brings its token (kept by `update_from_output`), but nothing is
        // computed on top of it any more.
        request.num_output_placeholders = 0;
        request.spec_token_ids.clear();
        request.num_preemptions += 1;
        self.num_preemptions_total += 1;
        self.waiting.push_front(request);
    }

    /// Applies a step's results: advances computed tokens, caches newly full blocks, appends sampled
    /// tokens, checks stop conditions and frees finished requests' blocks at once. Returns one output
    /// per request that produced tokens (or prompt logprobs) or finished, after any pending outputs of
    /// aborted or externally finished requests.
    pub fn update_from_output(
        &mut self,
        plan: &SchedulerOutput,
        runner_output: ModelRunnerOutput,
    ) -> Vec<EngineCoreOutput> {
        let mut outputs = std::mem::take(&mut self.pending_outputs);
        let ModelRunnerOutput { req_ids, mut sampled_token_ids, mut logprobs, mut prompt_logprobs, mut spec_token_ids } =
            runner_output;
        let row_of: HashMap<&str, usize> = req_ids.iter().enumerate().map(|(row, id)| (id.as_str(), row)).collect();
        let drafts_of: HashMap<&str, usize> =
            plan.scheduled_spec_decode_tokens.iter().map(|(id, drafts)| (id.as_str(), drafts.len())).collect();
        let mut finished: Vec<String> = Vec::new();
        // Requests preempted while this step was in flight (async scheduling) that finish with its token:
        // they sit in the waiting queue, not in `running`.
        let mut finished_waiting: Vec<String> = Vec::new();
        let async_mode = self.config.async_scheduling;
        let async_sampling: HashSet<&str> = plan.async_sampling_req_ids.iter().map(String::as_str).collect();
        let computed_before_of: HashMap<&str, usize> = if async_mode {
            let new = plan.scheduled_new_reqs.iter().map(|r| (r.req_id.as_str(), r.num_computed_tokens));
            new.chain(plan.scheduled_cached_reqs.iter().map(|r| (r.req_id.as_str(), r.num_computed_tokens))).collect()
        } else {
            HashMap::new()
        };

        for (req_id, num_scheduled_tokens) in &plan.num_scheduled_tokens {
            // A request finished or aborted while its step was in flight is already gone.
            let Some(request) = self.requests.get_mut(req_id) else {
                continue;
            };
            // A later request that reuses the id has nothing to do with this plan.
            if request.first_step_id.is_none_or(|first| first > plan.step_id) {
                continue;
            }
            // Only async scheduling can preempt a request whose step is in flight; its token stands.
            let preempted_in_flight = async_mode && request.status == RequestStatus::Preempted;
            if request.status != RequestStatus::Running && !preempted_in_flight {
                continue;
            }
            let (num_computed_before, samples) = if async_mode {
                // `schedule` already advanced the count; this step samples iff it took a placeholder.
                let before = computed_before_of.get(req_id.as_str()).copied().unwrap_or(0);
                let samples = async_sampling.contains(req_id.as_str());
                if samples {
                    request.num_output_placeholders = request.num_output_placeholders.saturating_sub(1);
                }
                (before, samples)
            } else {
                let before = request.num_computed_tokens;
                // Scheduled drafts are not tokens yet: this stops at the last real token, and the
                // accepted drafts are added below once known.
                request.num_computed_tokens = (before + num_scheduled_tokens).min(request.num_tokens());
                (before, request.num_computed_tokens == request.num_tokens())
            };
            let num_drafts = drafts_of.get(req_id.as_str()).copied().unwrap_or(0);

            let row = row_of.get(req_id.as_str()).copied();
            let sampled = row.and_then(|r| sampled_token_ids.get_mut(r)).map(std::mem::take);
            let new_logprobs = row.and_then(|r| logprobs.get_mut(r)).and_then(Option::take);
            let new_prompt_logprobs = row
                .and_then(|r| prompt_logprobs.get_mut(r))
                .and_then(Option::take)
                .and_then(|entries| unsent_prompt_logprobs(request, num_computed_before, entries));

            let mut new_token_ids = Vec::new();
            let mut finish = None;
            // Tokens sampled after a partial prefill are meaningless; only a request that has computed
            // all its tokens takes them.
            if samples {
                let sampled = sampled.unwrap_or_default();
                if sampled.is_empty() {
                    tracing::error!(%req_id, "the model runner sampled no token; aborting the request");
                    finish = Some((FinishReason::Abort, None));
                }
                if num_drafts > 0 {
                    // The runner returns the accepted drafts and one token of its own.
                    let num_accepted = sampled.len().saturating_sub(1).min(num_drafts);
                    self.spec_stats.observe(num_drafts, num_accepted);
                    request.draft_gate.observe(num_drafts, num_accepted);
                    request.num_computed_tokens += num_accepted;
                }
                for token_id in sampled {
                    request.append_output_token(token_id);
                    new_token_ids.push(token_id);
                    finish = check_stop(request, self.config.max_model_len);
                    if finish.is_some() {
                        break;
                    }
                }
                // A stop inside the accepted drafts drops the tokens after it.
                if !async_mode {
                    request.num_computed_tokens = request.num_computed_tokens.min(request.num_tokens());
                }
                if finish.is_none() {
                    request.spec_token_ids =
                        row.and_then(|r| spec_token_ids.get_mut(r)).map(std::mem::take).unwrap_or_default();
                }
            }
            if async_mode {
                // Only up to this step's end: a later step in flight has not succeeded yet.
                let num_done = num_computed_before + num_scheduled_tokens;
                self.kv_cache_manager.cache_blocks_through(request, num_done);
            } else {
                self.kv_cache_manager.cache_blocks(request);
            }
            let new_logprobs = new_logprobs.map(|mut entries| {
                entries.truncate(new_token_ids.len());
                entries
            });
            if new_token_ids.is_empty() && finish.is_none() && new_prompt_logprobs.is_none() {
                continue;
            }
            let (finish_reason, stop_reason) = finish.map_or((None, None), |(f, s)| (Some(f), s));
            if let Some(reason) = finish_reason {
                if preempted_in_flight {
                    self.waiting.remove(request);
                    finished_waiting.push(req_id.clone());
                } else {
                    finished.push(req_id.clone());
                }
                request.status = RequestStatus::Finished(reason);
            }
            outputs.push(EngineCoreOutput {
                req_id: req_id.clone(),
                new_token_ids,
                new_logprobs,
                new_prompt_logprobs,
                finish_reason,
                stop_reason,
                num_cached_tokens: request.num_cached_tokens.unwrap_or(0),
            });
        }

        if !finished.is_empty() {
            let finished_set: HashSet<&str> = finished.iter().map(String::as_str).collect();
            self.running.retain(|id| !finished_set.contains(id.as_str()));
            for req_id in &finished {
                self.kv_cache_manager.free(req_id);
                self.requests.remove(req_id);
            }
            self.finished_req_ids.append(&mut finished);
        }
        for req_id in finished_waiting {
            // It holds no blocks (preemption freed them); the runner keeps a preempted request's
            // sampling state, so it is told it finished.
            self.requests.remove(&req_id);
            self.finished_req_ids.push(req_id);
        }
        outputs
    }

    /// Finishes requests from outside the step (stop strings found by the frontend, aborts), waiting or
    /// running: their blocks are freed now, and each gets a final output with `reason` on the next
    /// update (or [`Scheduler::take_pending_outputs`]). Unknown or already finished ids are ignored.
    /// Returns how many requests were finished.
    pub fn finish_requests<S: AsRef<str>>(
        &mut self,
        request_ids: impl IntoIterator<Item = S>,
        reason: FinishReason,
        stop_reason: Option<StopReason>,
    ) -> usize {
        let mut finished_running: HashSet<String> = HashSet::new();
        let mut num_finished = 0;
        for req_id in request_ids {
            let Some(mut request) = self.requests.remove(req_id.as_ref()) else {
                continue;
            };
            match request.status {
                RequestStatus::Running => {
                    self.kv_cache_manager.free(&request.request_id);
                    finished_running.insert(request.request_id.clone());
                }
                RequestStatus::Waiting | RequestStatus::Preempted => self.waiting.remove(&request),
                RequestStatus::Finished(_) => {}
            }
            request.status = RequestStatus::Finished(reason);
            self.pending_outputs.push(EngineCoreOutput {
                req_id: request.request_id.clone(),
                new_token_ids: Vec::new(),
                new_logprobs: None,
                new_prompt_logprobs: None,
                finish_reason: Some(reason),
                stop_reason: stop_reason.clone(),
                num_cached_tokens: request.num_cached_tokens.unwrap_or(0),
            });
            self.finished_req_ids.push(request.request_id);
            num_finished += 1;
        }
        if !finished_running.is_empty() {
            self.running.retain(|id| !finished_running.contains(id));
        }
        num_finished
    }

    /// Aborts requests (client gone, server shutting down); see [`Scheduler::finish_requests`].
    pub fn abort_requests<S: AsRef<str>>(&mut self, request_ids: impl IntoIterator<Item = S>) -> usize {
        self.finish_requests(request_ids, FinishReason::Abort, None)
    }

    /// Final outputs of requests finished outside a step, not yet handed out.
    pub fn take_pending_outputs(&mut self) -> Vec<EngineCoreOutput> {
        std::mem::take(&mut self.pending_outputs)
    }

    /// Whether any request is still queued or running, or has a final output not yet handed out.
    pub fn has_unfinished_requests(&self) -> bool {
        !self.requests.is_empty() || !self.pending_outputs.is_empty()
    }

    /// Requests queued or running.
    pub fn num_unfinished_requests(&self) -> usize {
        self.requests.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Requests queued, fresh or preempted.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Fraction of KV blocks held by requests.
    pub fn kv_cache_usage(&self) -> f64 {
        self.kv_cache_manager.usage()
    }

    pub fn num_preemptions_total(&self) -> u64 {
        self.num_preemptions_total
    }

    pub fn prefix_cache_queries(&self) -> u64 {
        self.kv_cache_manager.prefix_cache_queries()
    }

    pub fn prefix_cache_hits(&self) -> u64 {
        self.kv_cache_manager.prefix_cache_hits()
    }

    /// A snapshot for metrics.
    pub fn make_stats(&self) -> SchedulerStats {
        SchedulerStats {
            num_running: self.num_running(),
            num_waiting: self.num_waiting(),
            kv_cache_usage: self.kv_cache_usage(),
            prefix_cache_queries: self.prefix_cache_queries(),
            prefix_cache_hits: self.prefix_cache_hits(),
            num_preemptions: self.num_preemptions_total,
            spec_decoding: self.spec_stats.clone(),
        }
    }

    /// Forgets the prefix cache (`/reset_prefix_cache`); refused while any request holds blocks.
    pub fn reset_prefix_cache(&mut self) -> bool {
        self.kv_cache_manager.reset_prefix_cache()
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn kv_cache_manager(&self) -> &KvCacheManager {
        &self.kv_cache_manager
    }

    /// An unfinished request.
    pub fn request(&self, request_id: &str) -> Option<&Request> {
        self.requests.get(request_id)
    }

    /// Running requests in admission order.
    pub fn running_request_ids(&self) -> impl Iterator<Item = &str> {
        self.running.iter().map(String::as_str)
    }

    /// Waiting requests in the order they will be admitted.
    pub fn waiting_request_ids(&self) -> impl Iterator<Item = &str> {
        self.waiting.iter()
    }

    fn tracked(&self, req_id: &str) -> &Request {
        tracked(&self.requests, req_id)
    }
}

/// A request in `running` or `waiting`: both only ever hold tracked ids, so a miss is a scheduler bug.
/// A free function so callers can borrow the request map apart from the KV cache manager.
fn tracked<'a>(requests: &'a HashMap<String, Request>, req_id: &str) -> &'a Request {
    match requests.get(req_id) {
        Some(request) => request,
        None => panic!("scheduler bookkeeping lost request `{req_id}`"),
    }
}

/// Slots to allocate for `num_scheduled` tokens after `num_computed` plus the draft model's lookahead,
/// never past the context.
fn with_lookahead(max_model_len: usize, num_computed: usize, num_scheduled: usize, lookahead: usize) -> usize {
    let room = max_model_len.saturating_sub(num_computed);
    num_scheduled.max((num_scheduled + lookahead).min(room))
}

/// Whether the newest output token ends `request`, in vLLM's order: length first (`max_tokens` or the
/// context is full), then, once `min_tokens` are out, EOS (unless `ignore_eos`) and `stop_token_ids`.
fn check_stop(request: &Request, max_model_len: usize) -> Option<(FinishReason, Option<StopReason>)> {
    if request.num_tokens() >= max_model_len || request.num_output_tokens() >= request.max_tokens {
        return Some((FinishReason::Length, None));
    }
    let params = &request.sampling_params;
    if request.num_output_tokens() < params.min_tokens {
        return None;
    }
    let last = *request.output_token_ids().last()?;
    if !params.ignore_eos && params.eos_token_ids.contains(&last) {
        return Some((FinishReason::Stop, Some(StopReason::Eos)));
    }
    if params.stop_token_ids.contains(&last) {
        return Some((FinishReason::Stop, Some(StopReason::TokenId(last))));
    }
    None
}

/// Drops prompt logprobs for positions already reported (a request recomputing its prompt after
/// preemption); `entries` cover prompt positions from `first_position` on.
fn unsent_prompt_logprobs(
    request: &mut Request,
    first_position: usize,
    mut entries: Vec<PositionLogprobs>,
) -> Option<Vec<PositionLogprobs>> {
    let num_sent = request.num_prompt_logprobs_sent;
    request.num_prompt_logprobs_sent = num_sent.max(first_position + entries.len());
    let num_repeated = num_sent.saturating_sub(first_position).min(entries.len());
    entries.drain(..num_repeated);
    (!entries.is_empty()).then_some(entries)
}

#[cfg(test)]
mod tests;
