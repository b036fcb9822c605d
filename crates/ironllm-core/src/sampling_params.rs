//! vLLM's sampling parameters, with vLLM's defaults and validation messages.
//!
//! A request's parameters are validated once at the edge (server, CLI, library) and then flow through the
//! engine read-only (`Arc<SamplingParams>`). Derived fields that need the tokenizer (`bad_words` as token
//! sequences, the EOS ids) are filled by the frontend before the request enters the engine.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::structured::{GrammarHandle, StructuredOutputsParams};
use crate::CoreError;

/// Temperatures below this are treated as greedy, as in vLLM.
pub const GREEDY_EPSILON: f32 = 1e-5;

/// Sampling parameters for one request (vLLM `SamplingParams`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Number of output sequences to return.
    pub n: usize,
    /// Number of sequences generated, of which the `n` best (by cumulative logprob) are returned.
    pub best_of: Option<usize>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub repetition_penalty: f32,
    pub temperature: f32,
    pub top_p: f32,
    /// 0 or -1 disables top-k.
    pub top_k: i32,
    pub min_p: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// `None` means "up to the context length".
    pub max_tokens: Option<usize>,
    pub min_tokens: usize,
    /// Number of top logprobs to return per generated token (the sampled token's is always included).
    pub logprobs: Option<usize>,
    /// Number of top logprobs to return per prompt token.
    pub prompt_logprobs: Option<usize>,
    pub detokenize: bool,
    pub skip_special_tokens: bool,
    pub spaces_between_special_tokens: bool,
    pub include_stop_str_in_output: bool,
    /// Token id -> bias added to its logit.
    pub logit_bias: BTreeMap<u32, f32>,
    /// When set, only these tokens may be sampled.
    pub allowed_token_ids: Option<Vec<u32>>,
    /// Words that must not be generated (tokenized by the frontend into `bad_words_token_ids`).
    pub bad_words: Vec<String>,
    /// Token sequences that must not be generated; the last token of each is banned when the output
    /// ends with the rest of the sequence.
    pub bad_words_token_ids: Vec<Vec<u32>>,
    /// EOS ids of the model and generation config; filled by the frontend, not by users.
    #[serde(skip)]
    pub eos_token_ids: Vec<u32>,
    /// Structured output: the output must follow this JSON schema, regex, choice list or grammar.
    pub structured_outputs: Option<StructuredOutputsParams>,
    /// `structured_outputs` compiled by the frontend (never by users); the runner builds each
    /// sequence's matcher from it. A constrained request without it is refused by the engine.
    #[serde(skip)]
    pub compiled_grammar: Option<GrammarHandle>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            n: 1,
            best_of: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            max_tokens: Some(16),
            min_tokens: 0,
            logprobs: None,
            prompt_logprobs: None,
            detokenize: true,
            skip_special_tokens: true,
            spaces_between_special_tokens: true,
            include_stop_str_in_output: false,
            logit_bias: BTreeMap::new(),
            allowed_token_ids: None,
            bad_words: Vec::new(),
            bad_words_token_ids: Vec::new(),
            eos_token_ids: Vec::new(),
            structured_outputs: None,
            compiled_grammar: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with the given output length.
    pub fn greedy(max_tokens: usize) -> Self {
        SamplingParams { temperature: 0.0, max_tokens: Some(max_tokens), ..SamplingParams::default() }
    }

    /// Whether sampling reduces to argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_EPSILON
    }

    /// Whether top-k is active.
    pub fn top_k_enabled(&self) -> Option<usize> {
        (self.top_k > 0).then_some(self.top_k as usize)
    }

    /// The number of sequences to generate (`best_of`, or `n`).
    pub fn num_sequences(&self) -> usize {
        self.best_of.unwrap_or(self.n).max(self.n)
    }

    /// Whether the request needs penalties applied.
    pub fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || self.repetition_penalty != 1.0
    }

    /// Checks every field against vLLM's bounds. `vocab_size` bounds token ids; `max_logprobs` bounds
    /// `logprobs` and `prompt_logprobs` (vLLM's `--max-logprobs`, default 20).
    pub fn validate(&self, vocab_size: usize, max_logprobs: usize) -> Result<(), CoreError> {
        let bad = |msg: String| Err(CoreError::InvalidParams(msg));
        if self.n < 1 {
            return bad(format!("n must be at least 1, got {}.", self.n));
        }
        if let Some(best_of) = self.best_of {
            if best_of < self.n {
                return bad(format!(
                    "best_of must be greater than or equal to n, got n={} and best_of={}.",
                    self.n, best_of
                ));
            }
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad(format!("presence_penalty must be in [-2, 2], got {}.", self.presence_penalty));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad(format!("frequency_penalty must be in [-2, 2], got {}.", self.frequency_penalty));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!("repetition_penalty must be greater than zero, got {}.", self.repetition_penalty));
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature must be non-negative, got {}.", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}.", self.top_p));
        }
        if self.top_k < -1 {
            return bad(format!("top_k must be 0 (disable), or at least 1, got {}.", self.top_k));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}.", self.min_p));
        }
        if let Some(max_tokens) = self.max_tokens {
            if max_tokens < 1 {
                return bad(format!("max_tokens must be at least 1, got {max_tokens}."));
            }
            if self.min_tokens > max_tokens {
                return bad(format!(
                    "min_tokens must be less than or equal to max_tokens={max_tokens}, got {}.",
                    self.min_tokens
                ));
            }
        }
        for (field, value) in [("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)] {
            if let Some(k) = value {
                if k > max_logprobs {
                    return bad(format!("Requested {field} of {k}, which is greater than max allowed: {max_logprobs}"));
                }
            }
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return bad("stop cannot contain an empty string.".to_string());
        }
        if !self.stop.is_empty() && !self.detokenize {
            return bad(
                "stop strings are only supported when detokenize is True. Set detokenize=True to use stop.".to_string()
            );
        }
        let out_of_vocab = |ids: &mut dyn Iterator<Item = u32>| {
            let mut found = None;
            for id in ids {
                if id as usize >= vocab_size {
                    found = Some(id);
                    break;
                }
            }
            found
        };
        if let Some(id) = out_of_vocab(&mut self.stop_token_ids.iter().copied()) {
            return bad(format!("stop_token_ids contains out-of-vocab token id {id}."));
        }
        if let Some(id) = out_of_vocab(&mut self.logit_bias.keys().copied()) {
            return bad(format!("token_id {id} in logit_bias contains out-of-vocab token id"));
        }
        if let Some(allowed) = &self.allowed_token_ids {
            if allowed.is_empty() {
                return bad("allowed_token_ids is not None and empty!".to_string());
            }
            if out_of_vocab(&mut allowed.iter().copied()).is_some() {
                return bad("allowed_token_ids contains out-of-vocab token id!".to_string());
            }
        }
        if let Some(id) = out_of_vocab(&mut self.bad_words_token_ids.iter().flatten().copied()) {
            return bad(format!("bad_words contains out-of-vocab token id {id}."));
        }
        if self.logit_bias.values().any(|b| !b.is_finite()) {
            return bad("logit_bias values must be finite numbers.".to_string());
        }
        if let Some(structured) = &self.structured_outputs {
            structured.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        SamplingParams::default().validate(100, 20).unwrap();
        assert!(SamplingParams::greedy(4).is_greedy());
    }

    #[test]
    fn messages_name_the_field_and_bound() {
        let check = |p: SamplingParams, needle: &str| {
            let err = p.validate(100, 20).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should mention {needle}");
        };
        check(SamplingParams { top_p: 1.5, ..Default::default() }, "top_p must be in (0, 1], got 1.5");
        check(SamplingParams { n: 0, ..Default::default() }, "n must be at least 1");
        check(SamplingParams { n: 3, best_of: Some(2), ..Default::default() }, "best_of must be greater");
        check(SamplingParams { temperature: -1.0, ..Default::default() }, "temperature");
        check(SamplingParams { top_k: -2, ..Default::default() }, "top_k");
        check(SamplingParams { min_p: 2.0, ..Default::default() }, "min_p");
        check(SamplingParams { max_tokens: Some(0), ..Default::default() }, "max_tokens");
        check(SamplingParams { min_tokens: 20, max_tokens: Some(4), ..Default::default() }, "min_tokens");
        check(SamplingParams { logprobs: Some(21), ..Default::default() }, "logprobs of 21");
        check(SamplingParams { stop: vec![String::new()], ..Default::default() }, "empty string");
        check(SamplingParams { stop_token_ids: vec![100], ..Default::default() }, "out-of-vocab");
        check(SamplingParams { allowed_token_ids: Some(vec![]), ..Default::default() }, "empty");
        check(SamplingParams { repetition_penalty: 0.0, ..Default::default() }, "repetition_penalty");
        check(SamplingParams { presence_penalty: 3.0, ..Default::default() }, "presence_penalty");
    }
}
