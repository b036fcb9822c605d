//! Test doubles for the engine core: [`FakeModel`], a deterministic model that executes plans against a
//! simulated paged KV cache; [`SplitMix64`], a small seeded RNG; and invariant checks over a
//! [`Scheduler`] and its plans. Always compiled (small, no dependencies) so integration tests and other
//! crates' tests can drive a real [`crate::engine::EngineCore`] without a model.
//!
//! The fake model's "KV" at position p is a hash of every token up to p, computed from the KV at p - 1
//! *read back from the slot the block table names*, and its next token is a hash of the KV at the last
//! position. So a request's output depends on its exact token history, and it changes if the block
//! manager ever hands out a wrong block: a prefix hit on a block with other content, a block reused
//! while still held, a table that lost a block across preemption. Tests can therefore check that
//! chunking, prefix hits and preemption never change outputs by comparing against a request run alone.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::engine::EngineCore;
use crate::executor::{ModelExecutor, Submitted};
use crate::outputs::{
    BlockId, EngineCoreOutput, FinishReason, ModelRunnerOutput, PositionLogprobs, SchedulerOutput, StopReason,
    TokenLogprob,
};
use crate::request::{Request, RequestStatus};
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::{CoreError, SamplingParams};

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, well-mixed, seedable generator for randomized tests.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)`; `n` must be positive.
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "below(0)");
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `[lo, hi]`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The fake KV before position 0.
const FAKE_KV_SEED: u64 = 0x5EED_0FFA_4E00_0001;

/// The fake model's KV at `position` holding `token_id`, given the KV at `position - 1`.
pub fn fake_kv(previous_kv: u64, token_id: u32, position: usize) -> u64 {
    let mut h = previous_kv ^ (token_id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= (position as u64).rotate_left(32);
    h = (h ^ (h >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^ (h >> 29)
}

/// The token the fake model samples from the KV at the last position.
pub fn fake_token_from_kv(kv: u64, vocab_size: u32) -> u32 {
    ((kv >> 17) % vocab_size as u64) as u32
}

/// The token the fake model samples after `token_ids` (no KV cache involved): the reference.
pub fn fake_next_token(token_ids: &[u32], vocab_size: u32) -> u32 {
    let kv = token_ids.iter().enumerate().fold(FAKE_KV_SEED, |kv, (p, &t)| fake_kv(kv, t, p));
    fake_token_from_kv(kv, vocab_size)
}

fn fake_logprob(token_id: u32, rank: u32) -> TokenLogprob {
    TokenLogprob { token_id, logprob: -((token_id % 13) as f32) / 4.0 - rank as f32, rank }
}

fn fake_position_logprobs(token_id: u32, num_top: usize, vocab_size: u32) -> PositionLogprobs {
    PositionLogprobs {
        chosen: fake_logprob(token_id, 1),
        top: (0..num_top as u32).map(|i| fake_logprob((token_id + i) % vocab_size, i + 1)).collect(),
    }
}

/// What the fake runner holds per request, like a real runner's persistent batch row.
#[derive(Debug, Clone)]
struct FakeSequence {
    token_ids: Vec<u32>,
    num_prompt_tokens: usize,
    block_ids: Vec<BlockId>,
    num_computed_tokens: usize,
    params: Arc<SamplingParams>,
    /// Draft tokens at the end of `token_ids` this step.
    num_drafts: usize,
}

/// Speculative drafting by the fake model: up to `k` drafts per request, each the true next token with
/// probability `accuracy` (else a random one), so both acceptance and rejection happen.
#[derive(Debug, Clone)]
pub struct FakeSpeculation {
    pub k: usize,
    pub accuracy: f64,
    pub rng: SplitMix64,
}

/// One request's share of a fake step's output.
struct ComputedRow {
    sampled: Vec<u32>,
    logprobs: Option<Vec<PositionLogprobs>>,
    prompt_logprobs: Option<Vec<PositionLogprobs>>,
}

/// A deterministic [`ModelExecutor`] over a simulated paged KV cache. Errors (rather than guessing) on
/// any plan that breaks the executor contract, so scheduler bugs surface as failed steps.
#[derive(Debug, Clone)]
pub struct FakeModel {
    vocab_size: u32,
    block_size: usize,
    /// [num_blocks * block_size]: the fake KV per slot; `None` until written.
    kv_slots: Vec<Option<u64>>,
    sequences: HashMap<String, FakeSequence>,
    /// Steps executed.
    pub num_steps: usize,
    /// When set, the step with this index (0-based) fails, to test error handling.
    pub fail_at_step: Option<usize>,
    /// When set, the model proposes drafts and verifies scheduled ones like a real runner.
    pub speculation: Option<FakeSpeculation>,
    /// When set, `submit_model` computes the step but hands its output out only from `collect_model`,
    /// like a runner whose device is still busy (async scheduling).
    pub deferred: bool,
    /// When set, the collect with this index (0-based) fails, to test errors in the second phase.
    pub fail_at_collect: Option<usize>,
    /// Collects so far.
    pub num_collects: usize,
    /// Outputs of submitted steps not collected yet, oldest first.
    completed: VecDeque<ModelRunnerOutput>,
}

impl FakeModel {
    pub fn new(num_blocks: usize, block_size: usize, vocab_size: u32) -> FakeModel {
        FakeModel {
            vocab_size,
            block_size,
            kv_slots: vec![None; num_blocks * block_size],
            sequences: HashMap::new(),
            num_steps: 0,
            fail_at_step: None,
            speculation: None,
            deferred: false,
            fail_at_collect: None,
            num_collects: 0,
            completed: VecDeque::new(),
        }
    }

    /// A fake model sized for `config`'s KV cache.
    pub fn for_config(config: &SchedulerConfig, vocab_size: u32) -> FakeModel {
        FakeModel::new(config.num_blocks, config.block_size, vocab_size)
    }

    /// Steps submitted and not collected yet.
    pub fn num_in_flight(&self) -> usize {
        self.completed.len()
    }

    /// Requests the runner currently holds state for.
    pub fn num_sequences(&self) -> usize {
        self.sequences.len()
    }

    fn slot(&self, seq: &FakeSequence, position: usize) -> Result<usize, CoreError> {
        let block = seq
            .block_ids
            .get(position / self.block_size)
            .ok_or_else(|| CoreError::Execution(format!("no block for position {position} in the block table")))?;
        Ok(block.0 as usize * self.block_size + position % self.block_size)
    }

    /// Computes `num_tokens` more tokens of `req_id`, writing their KV into its blocks, and samples
    /// when that reaches the end of its known tokens.
    fn compute(&mut self, req_id: &str, num_tokens: usize) -> Result<ComputedRow, CoreError> {
        let unknown = || CoreError::Execution(format!("request `{req_id}` is not held by the runner"));
        let seq = self.sequences.get(req_id).ok_or_else(unknown)?;
        let start = seq.num_computed_tokens;
        let end = start + num_tokens;
        if end > seq.token_ids.len() {
            return Err(CoreError::Execution(format!(
                "`{req_id}`: {num_tokens} tokens scheduled after {start} computed, but it has {}",
                seq.token_ids.len()
            )));
        }
        let mut kv = if start == 0 {
            FAKE_KV_SEED
        } else {
            let slot = self.slot(seq, start - 1)?;
            self.kv_slots[slot].ok_or_else(|| {
                CoreError::Execution(format!("`{req_id}` reads unwritten KV at position {}", start - 1))
            })?
        };
        let mut writes = Vec::with_capacity(num_tokens);
        for position in start..end {
            kv = fake_kv(kv, seq.token_ids[position], position);
            writes.push((self.slot(seq, position)?, kv));
        }
        let prompt_logprobs = seq.params.prompt_logprobs.map(|k| {
            (start..end.min(seq.num_prompt_tokens.saturating_sub(1)))
                .map(|p| fake_position_logprobs(seq.token_ids[p + 1], k, self.vocab_size))
                .collect::<Vec<_>>()
        });
        let prompt_logprobs = prompt_logprobs.filter(|entries| !entries.is_empty());
        // With k drafts the last k + 1 positions each sample; the drafts the samples agree with are
        // kept, then one sample (a real runner's verification).
        let num_drafts = seq.num_drafts;
        let base = seq.token_ids.len() - num_drafts;
        let mut sampled = Vec::new();
        if end == seq.token_ids.len() {
            for j in 0..=num_drafts {
                let kv_at = writes.get(writes.len() - 1 - num_drafts + j).map_or(kv, |w| w.1);
                let token = fake_token_from_kv(kv_at, self.vocab_size);
                sampled.push(token);
                if j == num_drafts || seq.token_ids[base + j] != token {
                    break;
                }
            }
        }
        let num_rejected = if sampled.is_empty() { 0 } else { num_drafts + 1 - sampled.len() };
        let logprobs = seq
            .params
            .logprobs
            .filter(|_| !sampled.is_empty())
            .map(|k| sampled.iter().map(|&t| fake_position_logprobs(t, k, self.vocab_size)).collect());
        for (slot, value) in writes {
            self.kv_slots[slot] = Some(value);
        }
        let seq = self.sequences.get_mut(req_id).ok_or_else(unknown)?;
        seq.num_computed_tokens = end - num_rejected;
        if !sampled.is_empty() {
            seq.token_ids.truncate(base);
            seq.num_drafts = 0;
        }
        seq.token_ids.extend_from_slice(&sampled);
        Ok(ComputedRow { sampled, logprobs, prompt_logprobs })
    }
}

impl ModelExecutor for FakeModel {
    fn execute_model(&mut self, plan: &SchedulerOutput) -> Result<ModelRunnerOutput, CoreError> {
        let step = self.num_steps;
        self.num_steps += 1;
        if self.fail_at_step == Some(step) {
            return Err(CoreError::Execution(format!("injected failure at step {step}")));
        }
        // Forget first: an id may be finished or preempted and come back as new in the same plan.
        for req_id in plan.finished_req_ids.iter().chain(&plan.preempted_req_ids) {
            self.sequences.remove(req_id);
        }
        for new in &plan.scheduled_new_reqs {
            if self.sequences.contains_key(&new.req_id) {
                return Err(CoreError::Execution(format!("`{}` is new but already held", new.req_id)));
            }
            let mut token_ids = new.prompt_token_ids.clone();
            token_ids.extend_from_slice(&new.output_token_ids);
            let seq = FakeSequence {
                token_ids,
                num_prompt_tokens: new.prompt_token_ids.len(),
                block_ids: new.block_ids.clone(),
                num_computed_tokens: new.num_computed_tokens,
                params: new.sampling_params.clone(),
                num_drafts: 0,
            };
            self.sequences.insert(new.req_id.clone(), seq);
        }
        for cached in &plan.scheduled_cached_reqs {
            let seq = self
                .sequences
                .get_mut(&cached.req_id)
                .ok_or_else(|| CoreError::Execution(format!("cached request `{}` is not held", cached.req_id)))?;
            if seq.num_computed_tokens != cached.num_computed_tokens {
                return Err(CoreError::Execution(format!(
                    "`{}`: runner computed {} tokens, scheduler says {}",
                    cached.req_id, seq.num_computed_tokens, cached.num_computed_tokens
                )));
            }
            seq.block_ids.extend_from_slice(&cached.new_block_ids);
        }
        for (req_id, drafts) in &plan.scheduled_spec_decode_tokens {
            let seq = self
                .sequences
                .get_mut(req_id)
                .ok_or_else(|| CoreError::Execution(format!("drafts for `{req_id}`, which is not held")))?;
            seq.token_ids.extend_from_slice(drafts);
            seq.num_drafts = drafts.len();
        }
        let mut output = ModelRunnerOutput::default();
        for (req_id, num_tokens) in &plan.num_scheduled_tokens {
            let row = self.compute(req_id, *num_tokens)?;
            output.req_ids.push(req_id.clone());
            output.sampled_token_ids.push(row.sampled);
            output.logprobs.push(row.logprobs);
            output.prompt_logprobs.push(row.prompt_logprobs);
        }
        if let Some(spec) = self.speculation.as_mut() {
            for (row, req_id) in output.req_ids.iter().enumerate() {
                let mut drafts = Vec::new();
                let seq = self.sequences.get(req_id);
                if let Some(seq) = seq.filter(|_| !output.sampled_token_ids[row].is_empty()) {
                    if plan.spec_propose_req_ids.contains(req_id) {
                        let mut tokens = seq.token_ids.clone();
                        for _ in 0..spec.rng.range(0, spec.k + 1) {
                            let t = if spec.rng.chance(spec.accuracy) {
                                fake_next_token(&tokens, self.vocab_size)
                            } else {
                                spec.rng.below(self.vocab_size as usize) as u32
                            };
                            tokens.push(t);
                            drafts.push(t);
                        }
                    }
                }
                output.spec_token_ids.push(drafts);
            }
        }
        Ok(output)
    }

    fn submit_model(&mut self, plan: &SchedulerOutput) -> Result<Submitted, CoreError> {
        let output = self.execute_model(plan)?;
        if !self.deferred {
            return Ok(Submitted::Done(output));
        }
        self.completed.push_back(output);
        Ok(Submitted::InFlight)
    }

    fn collect_model(&mut self) -> Result<ModelRunnerOutput, CoreError> {
        let collect = self.num_collects;
        self.num_collects += 1;
        let output = self.completed.pop_front().ok_or_else(|| CoreError::Execution("nothing in flight".into()))?;
        if self.fail_at_collect == Some(collect) {
            return Err(CoreError::Execution(format!("injected failure at collect {collect}")));
        }
        Ok(output)
    }
}

/// Everything the engine reported for one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CollectedOutput {
    pub token_ids: Vec<u32>,
    pub finish_reason: Option<FinishReason>,
    pub stop_reason: Option<StopReason>,
    pub num_logprobs: usize,
    pub prompt_logprobs: Vec<PositionLogprobs>,
    pub num_cached_tokens: usize,
}

impl CollectedOutput {
    /// Folds one engine output in; `Err` if the request had already finished.
    pub fn absorb(&mut self, output: EngineCoreOutput) -> Result<(), String> {
        if self.finish_reason.is_some() {
            return Err(format!("`{}` reported output after finishing", output.req_id));
        }
        self.token_ids.extend_from_slice(&output.new_token_ids);
        self.num_logprobs += output.new_logprobs.map_or(0, |l| l.len());
        self.prompt_logprobs.extend(output.new_prompt_logprobs.unwrap_or_default());
        self.finish_reason = output.finish_reason;
        self.stop_reason = output.stop_reason;
        self.num_cached_tokens = output.num_cached_tokens;
        Ok(())
    }
}

/// A config with room for anything up to `max_model_len`: one request never waits or chunks.
pub fn roomy_config(max_model_len: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: max_model_len.max(4),
        block_size: 16,
        num_blocks: max_model_len.div_ceil(16) + 1,
        enable_prefix_caching: false,
        ..SchedulerConfig::new(max_model_len, 1)
    }
}

/// What the fake model produces for one request run alone in a roomy engine.
pub fn generate_alone(
    prompt_token_ids: Vec<u32>,
    params: Arc<SamplingParams>,
    max_model_len: usize,
    vocab_size: u32,
) -> Result<CollectedOutput, CoreError> {
    let config = roomy_config(max_model_len);
    let model = FakeModel::for_config(&config, vocab_size);
    let mut engine = EngineCore::new(config, model)?;
    engine.add_request(Request::new("alone", prompt_token_ids, params))?;
    let mut collected = CollectedOutput::default();
    while engine.has_unfinished_requests() {
        for output in engine.step()? {
            collected.absorb(output).map_err(CoreError::Execution)?;
        }
    }
    Ok(collected)
}

/// Checks that a plan respects the config's caps and is internally consistent.
pub fn check_plan(config: &SchedulerConfig, plan: &SchedulerOutput) -> Result<(), String> {
    let total: usize = plan.num_scheduled_tokens.iter().map(|(_, n)| n).sum();
    if total != plan.total_num_scheduled_tokens {
        return Err(format!("total {} != sum {total}", plan.total_num_scheduled_tokens));
    }
    if total > config.max_num_batched_tokens {
        return Err(format!("{total} tokens > budget {}", config.max_num_batched_tokens));
    }
    if plan.num_scheduled_tokens.len() > config.max_num_seqs {
        return Err(format!("{} sequences > max_num_seqs", plan.num_scheduled_tokens.len()));
    }
    let mut listed = HashSet::new();
    let new_ids = plan.scheduled_new_reqs.iter().map(|r| &r.req_id);
    for id in new_ids.chain(plan.scheduled_cached_reqs.iter().map(|r| &r.req_id)) {
        if !listed.insert(id.as_str()) {
            return Err(format!("`{id}` listed twice"));
        }
    }
    let scheduled: HashSet<&str> = plan.num_scheduled_tokens.iter().map(|(id, _)| id.as_str()).collect();
    if scheduled != listed || scheduled.len() != plan.num_scheduled_tokens.len() {
        return Err("scheduled ids and request data disagree".to_string());
    }
    if plan.num_scheduled_tokens.iter().any(|(_, n)| *n == 0) {
        return Err("a request was scheduled with 0 tokens".to_string());
    }
    Ok(())
}

/// Checks the scheduler's block accounting from its public state: every block's reference count equals
/// the number of running requests' block tables holding it, exactly the running requests hold tables,
/// no block is both free and referenced, free + used = total, and waiting requests hold nothing.
pub fn check_scheduler_invariants(scheduler: &Scheduler) -> Result<(), String> {
    let kv = scheduler.kv_cache_manager();
    let pool = kv.block_pool();
    pool.check_invariants()?;
    let config = scheduler.config();
    let mut holders = vec![0u32; pool.num_blocks()];
    let running: HashSet<&str> = scheduler.running_request_ids().collect();
    if running.len() != scheduler.num_running() || running.len() > config.max_num_seqs {
        return Err(format!("{} running (max {})", running.len(), config.max_num_seqs));
    }
    for &req_id in &running {
        let request = scheduler.request(req_id).ok_or(format!("running `{req_id}` unknown"))?;
        if request.status != RequestStatus::Running {
            return Err(format!("running `{req_id}` has status {:?}", request.status));
        }
        let table = kv.block_table(req_id).ok_or(format!("running `{req_id}` has no table"))?;
        if request.num_computed_tokens > request.num_tokens() + request.num_output_placeholders()
            || request.num_computed_tokens > table.len() * config.block_size
        {
            return Err(format!("`{req_id}` computed tokens exceed its tokens or table"));
        }
        let unique: HashSet<_> = table.iter().collect();
        if unique.len() != table.len() {
            return Err(format!("`{req_id}` holds a block twice"));
        }
        for block in table {
            holders[block.0 as usize] += 1;
        }
    }
    let with_tables: HashSet<&str> = kv.request_ids().collect();
    if with_tables != running {
        return Err("block tables exist for requests that are not running".to_string());
    }
    for req_id in scheduler.waiting_request_ids() {
        let request = scheduler.request(req_id).ok_or(format!("waiting `{req_id}` unknown"))?;
        if !matches!(request.status, RequestStatus::Waiting | RequestStatus::Preempted)
            || request.num_computed_tokens != 0
        {
            return Err(format!("waiting `{req_id}` is {:?}", request.status));
        }
    }
    let mut num_used = 0;
    for (idx, &count) in holders.iter().enumerate() {
        let block = BlockId(idx as u32);
        if pool.ref_count(block) != count {
            return Err(format!("block {idx}: ref count {} but held by {count} tables", pool.ref_count(block)));
        }
        if count > 0 {
            num_used += 1;
            if pool.is_free(block) {
                return Err(format!("block {idx} is free and referenced"));
            }
        }
    }
    if num_used + pool.num_free_blocks() != pool.num_blocks() {
        return Err(format!("{num_used} used + {} free != {} blocks", pool.num_free_blocks(), pool.num_blocks()));
    }
    if scheduler.num_running() + scheduler.num_waiting() != scheduler.num_unfinished_requests() {
        return Err("a tracked request is neither running nor waiting".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_in_range() {
        let mut a = SplitMix64::new(7);
        let mut b = SplitMix64::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
            assert!(a.range(3, 5) >= 3);
            assert!(b.range(3, 5) <= 5);
        }
    }

    #[test]
    fn engine_alone_matches_the_reference_loop() {
        let prompt = vec![5, 6, 7, 8, 9];
        let params = Arc::new(SamplingParams { ignore_eos: true, ..SamplingParams::greedy(12) });
        let out = generate_alone(prompt.clone(), params, 64, 50).unwrap();
        let mut tokens = prompt;
        for _ in 0..12 {
            tokens.push(fake_next_token(&tokens, 50));
        }
        assert_eq!(out.token_ids, &tokens[5..]);
        assert_eq!(out.finish_reason, Some(FinishReason::Length));
    }
}
