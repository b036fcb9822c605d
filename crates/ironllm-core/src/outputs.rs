//! Plain data that crosses the engine's internal boundaries: the scheduler's plan for a step, the model
//! runner's result, and the per-request output the engine core emits. Structs of lists, no behaviour, so
//! tests can build and compare them.

use std::sync::Arc;

use crate::SamplingParams;

/// Index of a KV cache block in the block pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

/// Why a request stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// An EOS token, a stop token id or a stop string.
    Stop,
    /// `max_tokens` or the model's context length was reached.
    Length,
    /// Aborted by the client or the server.
    Abort,
}

impl FinishReason {
    /// The OpenAI / vLLM spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// What made a `Stop` finish happen, as vLLM reports it in `stop_reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The EOS token (vLLM reports `None` for this).
    Eos,
    /// One of `stop_token_ids`.
    TokenId(u32),
    /// One of `stop` (found by the output processor).
    String(String),
}

/// A request that the runner has not seen yet, or that resumes after preemption (its KV was freed, so
/// all of `all_token_ids` before `num_computed_tokens` come from the prefix cache or must be recomputed).
#[derive(Debug, Clone, PartialEq)]
pub struct NewRequestData {
    pub req_id: String,
    /// Prompt tokens.
    pub prompt_token_ids: Vec<u32>,
    /// Tokens generated before a preemption (empty for a fresh request).
    pub output_token_ids: Vec<u32>,
    pub sampling_params: Arc<SamplingParams>,
    /// The request's whole block table so far.
    pub block_ids: Vec<BlockId>,
    /// Tokens whose KV is already in the cache (prefix-cache hits) before this step's tokens.
    pub num_computed_tokens: usize,
}

/// A request the runner already holds state for.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedRequestData {
    pub req_id: String,
    /// Blocks appended to the request's block table this step.
    pub new_block_ids: Vec<BlockId>,
    /// Tokens whose KV is in the cache before this step's tokens.
    pub num_computed_tokens: usize,
}

/// The scheduler's plan for one step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedulerOutput {
    pub scheduled_new_reqs: Vec<NewRequestData>,
    pub scheduled_cached_reqs: Vec<CachedRequestData>,
    /// Tokens to compute this step per request id, in batch order (new requests and cached ones).
    pub num_scheduled_tokens: Vec<(String, usize)>,
    pub total_num_scheduled_tokens: usize,
    /// Requests that finished or were aborted since the last step: the runner drops their state.
    pub finished_req_ids: Vec<String>,
    /// Requests preempted this step: the runner drops their state; they come back as new requests.
    pub preempted_req_ids: Vec<String>,
    /// Draft tokens to verify this step per request (speculative decoding): the request's scheduled
    /// tokens end with them, after its last real token.
    pub scheduled_spec_decode_tokens: Vec<(String, Vec<u32>)>,
    /// Requests the runner proposes draft tokens for once this step has sampled (empty when speculation
    /// is off or turned down for the whole batch).
    pub spec_propose_req_ids: Vec<String>,
    /// Async scheduling only (empty otherwise): requests this step samples a token for that the
    /// scheduler will learn only from this step's output. The next plan may already schedule that token
    /// as an input (a placeholder); the runner fills it from this step's sample.
    pub async_sampling_req_ids: Vec<String>,
    /// This plan's sequence number; with async scheduling it tells an in-flight plan's entry for a
    /// request apart from a later request that reuses the id.
    pub step_id: u64,
}

/// One candidate token with its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    /// 1-based rank among the vocabulary (1 = most likely).
    pub rank: u32,
}

/// Log-probabilities at one position: the chosen (sampled or actual prompt) token first, then the top-k
/// candidates in descending order.
#[derive(Debug, Clone, PartialEq)]
pub struct PositionLogprobs {
    pub chosen: TokenLogprob,
    pub top: Vec<TokenLogprob>,
}

/// The model runner's result for one step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelRunnerOutput {
    /// One entry per scheduled request, same order as the vectors below.
    pub req_ids: Vec<String>,
    /// Sampled tokens per request; empty while a prefill is still partial. With draft tokens scheduled:
    /// the accepted drafts followed by one token the runner sampled itself.
    pub sampled_token_ids: Vec<Vec<u32>>,
    /// Per request, one entry per sampled token when `logprobs` was requested.
    pub logprobs: Vec<Option<Vec<PositionLogprobs>>>,
    /// Per request, prompt logprobs for the prompt positions computed this step (`prompt_logprobs`).
    /// Position i holds the logprob of prompt token i+1 given tokens up to i.
    pub prompt_logprobs: Vec<Option<Vec<PositionLogprobs>>>,
    /// Per request, the draft tokens proposed for the next step (speculative decoding; may be empty, or
    /// shorter than `req_ids` when the runner proposes nothing).
    pub spec_token_ids: Vec<Vec<u32>>,
}

/// What the engine core reports for a request after a step.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineCoreOutput {
    pub req_id: String,
    pub new_token_ids: Vec<u32>,
    pub new_logprobs: Option<Vec<PositionLogprobs>>,
    pub new_prompt_logprobs: Option<Vec<PositionLogprobs>>,
    pub finish_reason: Option<FinishReason>,
    pub stop_reason: Option<StopReason>,
    /// Prompt tokens served from the prefix cache when the request was first scheduled.
    pub num_cached_tokens: usize,
}
