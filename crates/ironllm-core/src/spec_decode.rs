//! Speculative decoding on the engine side (issue 6): the `--speculative-config` JSON, the per-request
//! gate that decides how many proposed draft tokens the scheduler verifies, and the acceptance counters
//! behind the `vllm:spec_decode_*` metrics.
//!
//! The flow of one request: after a step in which it sampled, the runner proposes up to
//! `num_speculative_tokens` draft tokens (n-gram lookup or a draft model); the scheduler stores them on
//! the request and, in the next step, schedules the uncomputed token plus the drafts the gate allows,
//! counting them against the token budget; the runner scores all of them in one forward and keeps the
//! longest prefix its own sampler agrees with, plus one token; the scheduler rewinds
//! `num_computed_tokens` past the rejected drafts, whose KV slots are simply overwritten later.
//!
//! Speculation is a bet that extra tokens in a forward are nearly free (decode is memory-bound). The
//! gate turns it down where the bet loses: when the batch already has many sequences (the forward is
//! compute-bound; `disable_by_batch_size`) and, per request, when recent drafts were mostly rejected
//! (it pauses that request's drafts for a while, doubling the pause each time the acceptance stays low).

use serde_json::{Map, Value};

use crate::CoreError;

/// Where draft tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpeculativeMethod {
    /// Prompt lookup: the tokens that followed the latest earlier occurrence of the current suffix.
    Ngram { prompt_lookup_min: usize, prompt_lookup_max: usize },
    /// A smaller model with the same tokenizer, run greedily for `num_speculative_tokens` steps.
    DraftModel { model: String },
}

impl SpeculativeMethod {
    /// vLLM's spelling of the method.
    pub fn name(&self) -> &'static str {
        match self {
            SpeculativeMethod::Ngram { .. } => "ngram",
            SpeculativeMethod::DraftModel { .. } => "draft_model",
        }
    }
}

/// vLLM's `SpeculativeConfig`, the part ironllm implements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpeculativeConfig {
    pub method: SpeculativeMethod,
    /// Most draft tokens verified per request and step (k).
    pub num_speculative_tokens: usize,
    /// No drafts are scheduled in a step when at least this many requests are running (`None`: the
    /// backend's default, see [`SpeculativeConfig::resolved_disable_by_batch_size`]).
    pub disable_by_batch_size: Option<usize>,
}

/// Keys of vLLM's speculative config that are accepted only at their default value.
const DEFAULT_ONLY_KEYS: [&str; 6] =
    ["draft_tensor_parallel_size", "quantization", "revision", "code_revision", "max_model_len", "enforce_eager"];

impl SpeculativeConfig {
    /// Parses `--speculative-config` (a JSON object with vLLM's keys).
    pub fn from_json(text: &str) -> Result<SpeculativeConfig, CoreError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| bad(format!("--speculative-config is not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(bad("--speculative-config must be a JSON object".into()));
        };
        Self::from_map(&map)
    }

    fn from_map(map: &Map<String, Value>) -> Result<SpeculativeConfig, CoreError> {
        const KNOWN: [&str; 6] = [
            "method",
            "model",
            "num_speculative_tokens",
            "prompt_lookup_min",
            "prompt_lookup_max",
            "disable_by_batch_size",
        ];
        for key in map.keys() {
            if !KNOWN.contains(&key.as_str()) && !DEFAULT_ONLY_KEYS.contains(&key.as_str()) {
                return Err(bad(format!("unknown speculative config key `{key}`")));
            }
        }
        for key in DEFAULT_ONLY_KEYS {
            match (key, map.get(key)) {
                (_, None | Some(Value::Null)) => {}
                ("draft_tensor_parallel_size", Some(v)) if v.as_u64() == Some(1) => {}
                (_, Some(v)) => {
                    return Err(bad(format!("speculative config `{key}` = {v} is not supported (leave it unset)")))
                }
            }
        }
        let get_usize = |key: &str| -> Result<Option<usize>, CoreError> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| bad(format!("speculative config `{key}` must be a non-negative integer, got {v}"))),
            }
        };
        let get_str = |key: &str| -> Result<Option<String>, CoreError> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(v) => Err(bad(format!("speculative config `{key}` must be a string, got {v}"))),
            }
        };
        let model = get_str("model")?;
        let method = match (get_str("method")?.as_deref(), model.as_deref()) {
            (Some("ngram"), _) | (None, Some("ngram" | "[ngram]")) => "ngram",
            (Some("draft_model"), _) | (None, Some(_)) => "draft_model",
            (Some(other), _) => {
                return Err(bad(format!(
                    "speculative method `{other}` is not supported; ironllm implements `ngram` and `draft_model`"
                )))
            }
            (None, None) => {
                return Err(bad("speculative config needs a `method` (\"ngram\" or \"draft_model\")".into()))
            }
        };
        let num_speculative_tokens = get_usize("num_speculative_tokens")?
            .ok_or_else(|| bad("speculative config needs `num_speculative_tokens`".into()))?;
        if num_speculative_tokens == 0 {
            return Err(bad("`num_speculative_tokens` must be at least 1".into()));
        }
        if num_speculative_tokens > MAX_SPECULATIVE_TOKENS {
            return Err(bad(format!("`num_speculative_tokens` must be at most {MAX_SPECULATIVE_TOKENS}")));
        }
        let method = if method == "ngram" {
            // vLLM's defaults: both 5, or one copied from the other.
            let (min, max) = match (get_usize("prompt_lookup_min")?, get_usize("prompt_lookup_max")?) {
                (None, None) => (5, 5),
                (Some(min), None) => (min, min),
                (None, Some(max)) => (max, max),
                (Some(min), Some(max)) => (min, max),
            };
            if min == 0 {
                return Err(bad("`prompt_lookup_min` must be at least 1".into()));
            }
            if max < min {
                return Err(bad(format!("`prompt_lookup_max` ({max}) must be at least `prompt_lookup_min` ({min})")));
            }
            SpeculativeMethod::Ngram { prompt_lookup_min: min, prompt_lookup_max: max }
        } else {
            for key in ["prompt_lookup_min", "prompt_lookup_max"] {
                if map.get(key).is_some_and(|v| !v.is_null()) {
                    return Err(bad(format!("`{key}` applies to the ngram method only")));
                }
            }
            let model = model.filter(|m| !m.is_empty() && m != "ngram" && m != "[ngram]").ok_or_else(|| {
                bad("the draft_model method needs `model`: a local model directory or GGUF file".into())
            })?;
            SpeculativeMethod::DraftModel { model }
        };
        let disable_by_batch_size = get_usize("disable_by_batch_size")?;
        if disable_by_batch_size.is_some_and(|n| n < 2) {
            return Err(bad("`disable_by_batch_size` must be at least 2".into()));
        }
        Ok(SpeculativeConfig { method, num_speculative_tokens, disable_by_batch_size })
    }

    /// A plain n-gram config (tests, the library API).
    pub fn ngram(num_speculative_tokens: usize, prompt_lookup_min: usize, prompt_lookup_max: usize) -> Self {
        SpeculativeConfig {
            method: SpeculativeMethod::Ngram { prompt_lookup_min, prompt_lookup_max },
            num_speculative_tokens,
            disable_by_batch_size: None,
        }
    }

    /// Extra KV slots the scheduler reserves past a request's scheduled tokens: a draft model writes KV
    /// for the drafts it feeds itself, one step ahead of the target.
    pub fn num_lookahead_tokens(&self) -> usize {
        match self.method {
            SpeculativeMethod::Ngram { .. } => 0,
            SpeculativeMethod::DraftModel { .. } => self.num_speculative_tokens,
        }
    }

    /// `disable_by_batch_size`, or `default` (the backend's point where a forward stops being
    /// memory-bound, see the runners) when unset.
    pub fn resolved_disable_by_batch_size(&self, default: usize) -> usize {
        self.disable_by_batch_size.unwrap_or(default).max(2)
    }
}

/// Upper bound on k: the runners keep per-request rows for k + 1 positions.
pub const MAX_SPECULATIVE_TOKENS: usize = 16;

fn bad(message: String) -> CoreError {
    CoreError::InvalidConfig(message)
}

/// Cumulative acceptance counters (vLLM's `SpecDecodingStats`, summed since start).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecDecodingStats {
    /// Verification rounds (a request with at least one draft token in a step).
    pub num_drafts: u64,
    pub num_draft_tokens: u64,
    pub num_accepted_tokens: u64,
    /// Entry i: rounds whose draft token at position i was accepted.
    pub num_accepted_tokens_per_pos: Vec<u64>,
}

impl SpecDecodingStats {
    /// Records one verification round of `num_draft_tokens` tokens of which the first
    /// `num_accepted_tokens` were kept.
    pub fn observe(&mut self, num_draft_tokens: usize, num_accepted_tokens: usize) {
        if num_draft_tokens == 0 {
            return;
        }
        self.num_drafts += 1;
        self.num_draft_tokens += num_draft_tokens as u64;
        self.num_accepted_tokens += num_accepted_tokens as u64;
        if self.num_accepted_tokens_per_pos.len() < num_draft_tokens {
            self.num_accepted_tokens_per_pos.resize(num_draft_tokens, 0);
        }
        for count in &mut self.num_accepted_tokens_per_pos[..num_accepted_tokens.min(num_draft_tokens)] {
            *count += 1;
        }
    }
}

/// Below this smoothed acceptance rate a request stops speculating for a while.
const MIN_ACCEPTANCE: f64 = 0.25;
/// Weight of the newest round in the smoothed acceptance rate.
const ACCEPTANCE_SMOOTHING: f64 = 0.3;
const FIRST_PAUSE_STEPS: u32 = 4;
const MAX_PAUSE_STEPS: u32 = 128;

/// One request's speculation gate: a smoothed acceptance rate and, when it fell too low, a pause.
#[derive(Debug, Clone, PartialEq)]
pub struct DraftGate {
    acceptance: f64,
    paused_steps_left: u32,
    next_pause: u32,
}

impl Default for DraftGate {
    fn default() -> Self {
        // Start optimistic: a request has to show low acceptance before it loses its drafts.
        DraftGate { acceptance: 1.0, paused_steps_left: 0, next_pause: FIRST_PAUSE_STEPS }
    }
}

impl DraftGate {
    /// Whether this request's drafts are verified in the coming step. Counts down a pause.
    pub fn allows_drafts(&mut self) -> bool {
        if self.paused_steps_left > 0 {
            self.paused_steps_left -= 1;
            return false;
        }
        true
    }

    /// Whether the request is in a pause (proposing drafts for it would be wasted work).
    pub fn is_paused(&self) -> bool {
        self.paused_steps_left > 0
    }

    /// Feeds one verification round's outcome.
    pub fn observe(&mut self, num_draft_tokens: usize, num_accepted_tokens: usize) {
        if num_draft_tokens == 0 {
            return;
        }
        let rate = num_accepted_tokens as f64 / num_draft_tokens as f64;
        self.acceptance = (1.0 - ACCEPTANCE_SMOOTHING) * self.acceptance + ACCEPTANCE_SMOOTHING * rate;
        if self.acceptance < MIN_ACCEPTANCE {
            self.paused_steps_left = self.next_pause;
            self.next_pause = (self.next_pause * 2).min(MAX_PAUSE_STEPS);
            // After the pause the request gets a fresh, neutral chance.
            self.acceptance = 0.5;
        } else if rate >= 0.5 {
            self.next_pause = FIRST_PAUSE_STEPS;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SpeculativeConfig, String> {
        SpeculativeConfig::from_json(text).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_vllm_ngram_configs_with_its_defaults() {
        let c = parse(r#"{"method": "ngram", "num_speculative_tokens": 4}"#).unwrap();
        assert_eq!(c.method, SpeculativeMethod::Ngram { prompt_lookup_min: 5, prompt_lookup_max: 5 });
        assert_eq!(c.num_speculative_tokens, 4);
        assert_eq!(c.num_lookahead_tokens(), 0);
        let c = parse(r#"{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}"#).unwrap();
        assert_eq!(c.method, SpeculativeMethod::Ngram { prompt_lookup_min: 4, prompt_lookup_max: 4 });
        let c = parse(
            r#"{"model": "[ngram]", "num_speculative_tokens": 2, "prompt_lookup_min": 2, "prompt_lookup_max": 6}"#,
        )
        .unwrap();
        assert_eq!(c.method, SpeculativeMethod::Ngram { prompt_lookup_min: 2, prompt_lookup_max: 6 });
    }

    #[test]
    fn parses_draft_model_configs() {
        let c = parse(r#"{"model": "/m/draft", "num_speculative_tokens": 3, "disable_by_batch_size": 8}"#).unwrap();
        assert_eq!(c.method, SpeculativeMethod::DraftModel { model: "/m/draft".into() });
        assert_eq!(c.num_lookahead_tokens(), 3);
        assert_eq!(c.resolved_disable_by_batch_size(32), 8);
        let c = parse(
            r#"{"method": "draft_model", "model": "d", "num_speculative_tokens": 1, "draft_tensor_parallel_size": 1}"#,
        )
        .unwrap();
        assert_eq!(c.resolved_disable_by_batch_size(32), 32);
    }

    #[test]
    fn rejects_bad_configs_with_a_reason() {
        for (text, needle) in [
            ("not json", "not valid JSON"),
            ("[1]", "JSON object"),
            (r#"{"method": "ngram"}"#, "num_speculative_tokens"),
            (r#"{"method": "ngram", "num_speculative_tokens": 0}"#, "at least 1"),
            (r#"{"method": "ngram", "num_speculative_tokens": 99}"#, "at most"),
            (r#"{"method": "eagle", "num_speculative_tokens": 2}"#, "not supported"),
            (r#"{"num_speculative_tokens": 2}"#, "method"),
            (r#"{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}"#, "prompt_lookup_min"),
            (
                r#"{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}"#,
                "prompt_lookup_max",
            ),
            (r#"{"method": "draft_model", "num_speculative_tokens": 2}"#, "needs `model`"),
            (
                r#"{"method": "draft_model", "model": "d", "num_speculative_tokens": 2, "prompt_lookup_max": 3}"#,
                "ngram method only",
            ),
            (r#"{"method": "ngram", "num_speculative_tokens": 2, "bogus": 1}"#, "unknown"),
            (r#"{"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2}"#, "not supported"),
            (r#"{"method": "ngram", "num_speculative_tokens": -1}"#, "non-negative integer"),
            (r#"{"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 1}"#, "at least 2"),
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn stats_count_rounds_tokens_and_positions() {
        let mut s = SpecDecodingStats::default();
        s.observe(3, 2);
        s.observe(2, 0);
        s.observe(0, 0);
        s.observe(4, 4);
        assert_eq!(s.num_drafts, 3);
        assert_eq!(s.num_draft_tokens, 9);
        assert_eq!(s.num_accepted_tokens, 6);
        assert_eq!(s.num_accepted_tokens_per_pos, vec![2, 2, 1, 1]);
    }

    #[test]
    fn gate_pauses_low_acceptance_and_backs_off() {
        let mut g = DraftGate::default();
        assert!(g.allows_drafts());
        // Mostly accepted: never paused.
        for _ in 0..20 {
            g.observe(4, 3);
            assert!(g.allows_drafts());
        }
        // Rejected rounds push the smoothed rate under the bar, then a pause of 4 steps.
        let mut rounds = 0;
        while !g.is_paused() {
            g.observe(4, 0);
            rounds += 1;
            assert!(rounds < 10);
        }
        let paused: usize = (0..4).filter(|_| !g.allows_drafts()).count();
        assert_eq!(paused, 4);
        assert!(g.allows_drafts());
        // Still bad: the next pause is twice as long.
        while !g.is_paused() {
            g.observe(4, 0);
        }
        let paused: usize = (0..20).filter(|_| !g.allows_drafts()).count();
        assert_eq!(paused, 8);
    }
}
