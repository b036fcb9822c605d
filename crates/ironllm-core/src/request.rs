//! One sequence's state inside the engine core: its tokens, how many of them have KV in the cache, its
//! status, and the hashes of its full blocks (the keys of the prefix cache).
//!
//! Invariant: `num_computed_tokens <= num_tokens() + num_output_placeholders()` (the placeholders are
//! tokens in-flight steps will sample, async scheduling only); tokens are only ever appended, so a full block's
//! hash, once computed, never changes and is cached here for the life of the request.
//!
//! The shape follows vLLM V1's `Request` (`vllm/v1/request.py`) and nano-vllm's `Sequence`: there is no
//! prefill or decode phase, only "tokens left to compute" (`num_tokens() - num_computed_tokens`).
//! One request is one sequence: `n > 1` / `best_of` fan out into several requests in the frontend, as in
//! vLLM V1's `ParentRequest`.

use std::sync::Arc;
use std::time::Instant;

use crate::block_pool::{hash_block_tokens, BlockHash};
use crate::outputs::FinishReason;
use crate::spec_decode::DraftGate;
use crate::SamplingParams;

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestStatus {
    /// Queued, never scheduled yet.
    Waiting,
    /// Holds KV blocks and is scheduled every step it has budget for.
    Running,
    /// Was running, lost its KV blocks to make room; queued to be recomputed.
    Preempted,
    /// Done; its blocks are freed.
    Finished(FinishReason),
}

/// One sequence to generate.
#[derive(Debug, Clone)]
pub struct Request {
    pub request_id: String,
    pub sampling_params: Arc<SamplingParams>,
    /// When the frontend received the request; orders requests of equal priority.
    pub arrival_time: Instant,
    /// Lower is scheduled sooner (vLLM's convention); only used by the priority policy.
    pub priority: i32,
    pub status: RequestStatus,
    /// Tokens (prompt, then outputs) whose KV is in the cache.
    pub num_computed_tokens: usize,
    /// Prompt tokens served from the prefix cache the first time the request was scheduled; `None`
    /// until then.
    pub num_cached_tokens: Option<usize>,
    /// `max_tokens` resolved against the model's context when the scheduler admits the request:
    /// `min(params.max_tokens, max_model_len - prompt_len)`.
    pub max_tokens: usize,
    /// Extra input to every block hash, so equal tokens under a different adapter or media never share
    /// KV (a LoRA id or a media hash; `None` for plain text).
    pub extra_key: Option<u64>,
    /// How many times this request lost its KV blocks.
    pub num_preemptions: usize,
    /// Prompt and output tokens, in order. One vector so a block spanning both is one slice.
    token_ids: Vec<u32>,
    num_prompt_tokens: usize,
    /// Hashes of the full blocks of `token_ids`, filled lazily by [`Request::update_block_hashes`].
    block_hashes: Vec<BlockHash>,
    /// The block size `block_hashes` were computed with (0 = none yet).
    hashed_block_size: usize,
    /// Admission order, set by the scheduler; breaks ties between equal (priority, arrival_time).
    pub(crate) arrival_index: u64,
    /// Prompt positions whose prompt logprobs were already reported, so a recompute after preemption does
    /// not report them twice.
    pub(crate) num_prompt_logprobs_sent: usize,
    /// Draft tokens the runner proposed after the last step, verified in the next one (speculative
    /// decoding); never part of `token_ids`.
    pub spec_token_ids: Vec<u32>,
    /// Whether this request's drafts are currently worth verifying.
    pub(crate) draft_gate: DraftGate,
    /// Async scheduling: tokens that scheduled, not yet collected steps will sample for this request.
    /// They already count in `num_computed_tokens` once a later step schedules them as input.
    pub(crate) num_output_placeholders: usize,
    /// The plan (`SchedulerOutput::step_id`) that first scheduled this request; `None` before.
    pub(crate) first_step_id: Option<u64>,
}

impl Request {
    /// A fresh request, waiting. `max_tokens` is resolved when the scheduler admits it.
    pub fn new(
        request_id: impl Into<String>,
        prompt_token_ids: Vec<u32>,
        sampling_params: Arc<SamplingParams>,
    ) -> Request {
        let max_tokens = sampling_params.max_tokens.unwrap_or(usize::MAX);
        Request {
            request_id: request_id.into(),
            sampling_params,
            arrival_time: Instant::now(),
            priority: 0,
            status: RequestStatus::Waiting,
            num_computed_tokens: 0,
            num_cached_tokens: None,
            max_tokens,
            extra_key: None,
            num_preemptions: 0,
            num_prompt_tokens: prompt_token_ids.len(),
            token_ids: prompt_token_ids,
            block_hashes: Vec::new(),
            hashed_block_size: 0,
            arrival_index: 0,
            num_prompt_logprobs_sent: 0,
            spec_token_ids: Vec::new(),
            draft_gate: DraftGate::default(),
            num_output_placeholders: 0,
            first_step_id: None,
        }
    }

    /// Sets the scheduling priority (lower = sooner).
    pub fn with_priority(mut self, priority: i32) -> Request {
        self.priority = priority;
        self
    }

    /// Sets the arrival time (defaults to construction time).
    pub fn with_arrival_time(mut self, arrival_time: Instant) -> Request {
        self.arrival_time = arrival_time;
        self
    }

    /// Sets the extra block-hash key (LoRA id, media hash).
    pub fn with_extra_key(mut self, extra_key: Option<u64>) -> Request {
        self.extra_key = extra_key;
        self.block_hashes.clear();
        self
    }

    pub fn prompt_token_ids(&self) -> &[u32] {
        &self.token_ids[..self.num_prompt_tokens]
    }

    pub fn output_token_ids(&self) -> &[u32] {
        &self.token_ids[self.num_prompt_tokens..]
    }

    /// Prompt then output tokens.
    pub fn all_token_ids(&self) -> &[u32] {
        &self.token_ids
    }

    pub fn num_prompt_tokens(&self) -> usize {
        self.num_prompt_tokens
    }

    pub fn num_output_tokens(&self) -> usize {
        self.token_ids.len() - self.num_prompt_tokens
    }

    /// Prompt plus output tokens.
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Tokens whose KV still has to be computed before the next token can be sampled, counting the
    /// tokens in-flight steps will sample (async scheduling) as known.
    pub fn num_tokens_to_compute(&self) -> usize {
        (self.token_ids.len() + self.num_output_placeholders).saturating_sub(self.num_computed_tokens)
    }

    /// Async scheduling: tokens that scheduled steps will sample for this request and that have not
    /// come back yet (always 0 in synchronous mode).
    pub fn num_output_placeholders(&self) -> usize {
        self.num_output_placeholders
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.status, RequestStatus::Finished(_))
    }

    /// Appends a sampled token.
    pub(crate) fn append_output_token(&mut self, token_id: u32) {
        self.token_ids.push(token_id);
    }

    /// Hashes of the full blocks computed so far (see [`Request::update_block_hashes`]).
    pub fn block_hashes(&self) -> &[BlockHash] {
        &self.block_hashes
    }

    /// Extends the block-hash cache to every full block of the current tokens. Each hash chains on its
    /// parent's, so a hit on block i implies the whole prefix up to block i matches.
    pub fn update_block_hashes(&mut self, block_size: usize) {
        if block_size == 0 {
            return;
        }
        if self.hashed_block_size != block_size {
            self.block_hashes.clear();
            self.hashed_block_size = block_size;
        }
        let num_full_blocks = self.token_ids.len() / block_size;
        while self.block_hashes.len() < num_full_blocks {
            let block_idx = self.block_hashes.len();
            let parent = block_idx.checked_sub(1).map(|i| self.block_hashes[i]);
            let tokens = &self.token_ids[block_idx * block_size..(block_idx + 1) * block_size];
            self.block_hashes.push(hash_block_tokens(parent, tokens, self.extra_key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_views_split_prompt_and_output() {
        let mut req = Request::new("r", vec![1, 2, 3], Arc::new(SamplingParams::greedy(4)));
        req.append_output_token(9);
        assert_eq!(req.prompt_token_ids(), &[1, 2, 3]);
        assert_eq!(req.output_token_ids(), &[9]);
        assert_eq!(req.all_token_ids(), &[1, 2, 3, 9]);
        assert_eq!((req.num_tokens(), req.num_output_tokens()), (4, 1));
        assert_eq!(req.num_tokens_to_compute(), 4);
    }

    #[test]
    fn block_hashes_cover_only_full_blocks_and_chain() {
        let mut req = Request::new("r", (0..10).collect(), Arc::new(SamplingParams::default()));
        req.update_block_hashes(4);
        assert_eq!(req.block_hashes().len(), 2);
        let first = hash_block_tokens(None, &[0, 1, 2, 3], None);
        let second = hash_block_tokens(Some(first), &[4, 5, 6, 7], None);
        assert_eq!(req.block_hashes(), &[first, second]);
        req.append_output_token(10);
        req.append_output_token(11);
        req.update_block_hashes(4);
        assert_eq!(req.block_hashes().len(), 3);
        // An extra key (LoRA id) changes every hash.
        let mut lora =
            Request::new("l", (0..10).collect(), Arc::new(SamplingParams::default())).with_extra_key(Some(7));
        lora.update_block_hashes(4);
        assert_ne!(lora.block_hashes()[0], first);
    }
}
