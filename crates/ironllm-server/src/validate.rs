//! Parse, don't validate: wire requests become typed values here, once, at the edge. Every error is
//! an [`ApiError`] whose message names the field and the bound, in vLLM's words where clients parse
//! them (context length, unknown model, sampling parameter bounds).

use std::collections::BTreeMap;

use ironllm::SamplingParams;
use ironllm_model::tokenizer::Tokenizer;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::ApiError;
use crate::server::AppState;

/// Most sequences one request may ask for (`n`, `best_of`): a bound vLLM does not have, so that one
/// request cannot allocate without limit.
pub const MAX_SEQUENCES_PER_REQUEST: i64 = 256;

/// Parses a JSON body into a wire request. Malformed JSON and wrong types are HTTP 400 (vLLM turns
/// FastAPI's 422 into 400), with the path of the offending field.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid JSON in the request body: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request(format!(
            "The request body must be a JSON object, got {}",
            json_kind(&value)
        )));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let err = ApiError::bad_request(format!("Invalid value for `{path}`: {inner}"));
        let field = path.split(['.', '[']).next().unwrap_or_default().to_string();
        if field.is_empty() || field == "?" {
            err
        } else {
            err.with_param(&field)
        }
    })
}

pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// An absent or empty `model` means the served model; any other name must be one it is served under.
pub fn check_model(state: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        None | Some("") => Ok(()),
        Some(m) if state.model.served_names.iter().any(|n| n == m) => Ok(()),
        Some(m) => Err(ApiError::model_not_found(m)),
    }
}

/// A prompt before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

/// Reads a completions `prompt`: a string, a list of strings, a list of token ids or a list of
/// lists of token ids.
pub fn parse_prompts(prompt: Option<&Value>) -> Result<Vec<PromptInput>, ApiError> {
    let shape_error = || {
        ApiError::bad_request(
            "`prompt` must be a string, a list of strings, a list of token ids or a list of lists of token ids",
        )
        .with_param("prompt")
    };
    let prompt = match prompt {
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request("Either prompt or prompt_embeds must be provided and non-empty.")
                .with_param("prompt"))
        }
        Some(p) => p,
    };
    match prompt {
        Value::String(s) => Ok(vec![PromptInput::Text(s.clone())]),
        Value::Array(items) if items.is_empty() => {
            Err(ApiError::bad_request("`prompt` must contain at least one prompt").with_param("prompt"))
        }
        Value::Array(items) => match &items[0] {
            Value::String(_) => items
                .iter()
                .map(|v| v.as_str().map(|s| PromptInput::Text(s.to_string())).ok_or_else(shape_error))
                .collect(),
            Value::Number(_) => Ok(vec![PromptInput::Tokens(token_ids(items, "prompt")?)]),
            Value::Array(_) => items
                .iter()
                .map(|v| match v {
                    Value::Array(ids) => Ok(PromptInput::Tokens(token_ids(ids, "prompt")?)),
                    _ => Err(shape_error()),
                })
                .collect(),
            _ => Err(shape_error()),
        },
        _ => Err(shape_error()),
    }
}

fn token_ids(items: &[Value], field: &str) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .map(|v| {
            v.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| {
                ApiError::bad_request(format!("`{field}` token ids must be non-negative integers, got {v}"))
                    .with_param(field)
            })
        })
        .collect()
}

/// Converts wire token ids (a list of integers) into ids, naming the field on error.
pub fn wire_token_ids(ids: &[i64], field: &str) -> Result<Vec<u32>, ApiError> {
    ids.iter()
        .map(|&x| {
            u32::try_from(x).map_err(|_| {
                ApiError::bad_request(format!("`{field}` must contain non-negative token ids, got {x}"))
                    .with_param(field)
            })
        })
        .collect()
}

/// Tokenizes a prompt, truncates it (`truncate_prompt_tokens`, keeping the last tokens) and checks
/// it against the vocabulary and the context length.
pub fn tokenize_prompt(
    state: &AppState,
    prompt: &PromptInput,
    add_special_tokens: bool,
    truncate_prompt_tokens: Option<i64>,
) -> Result<Vec<u32>, ApiError> {
    let mut ids = match prompt {
        PromptInput::Tokens(ids) => ids.clone(),
        PromptInput::Text(text) => encode(state.tokenizer.as_deref(), text, add_special_tokens)?,
    };
    if let Some(k) = truncate_prompt_tokens {
        let max_model_len = state.model.max_model_len as i64;
        if k < -1 {
            return Err(ApiError::bad_request(format!("`truncate_prompt_tokens` must be at least -1, got {k}"))
                .with_param("truncate_prompt_tokens"));
        }
        if k > max_model_len {
            return Err(ApiError::bad_request(
                "truncate_prompt_tokens value is greater than max_model_len. Please, select a smaller truncation size.",
            )
            .with_param("truncate_prompt_tokens"));
        }
        let keep = if k == -1 { max_model_len as usize } else { k as usize };
        if ids.len() > keep {
            ids.drain(..ids.len() - keep);
        }
    }
    if ids.is_empty() {
        return Err(ApiError::bad_request("The decoder prompt cannot be empty").with_param("prompt"));
    }
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= state.model.vocab_size) {
        return Err(ApiError::bad_request(format!("Token id {bad} is out of vocabulary")).with_param("prompt"));
    }
    Ok(ids)
}

pub fn encode(tokenizer: Option<&Tokenizer>, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ApiError> {
    let tok =
        tokenizer.ok_or_else(|| ApiError::bad_request("This model has no tokenizer; give the prompt as token ids"))?;
    tok.encode(text, add_special_tokens).map_err(|e| ApiError::bad_request(format!("Tokenization failed: {e}")))
}

/// Checks a prompt against the context length and resolves `max_tokens` as vLLM does: a request's
/// `max_tokens` must fit beside the prompt; without one, generation may run to the context length;
/// the model's `max_new_tokens` (generation config) caps both.
pub fn resolve_max_tokens(state: &AppState, prompt_len: usize, requested: Option<i64>) -> Result<usize, ApiError> {
    let max_model_len = state.model.max_model_len;
    if prompt_len >= max_model_len {
        return Err(ApiError::invalid_param(
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, your request has {prompt_len} input tokens. Please reduce the length of the input messages."
            ),
            "input_tokens",
            Some(prompt_len.to_string()),
        ));
    }
    match requested {
        Some(m) if m < 1 => Err(ApiError::bad_request(format!("max_tokens must be at least 1, got {m}."))
            .with_param("max_tokens")),
        Some(m) if (prompt_len as u64).saturating_add(m as u64) > max_model_len as u64 => Err(ApiError::invalid_param(
            format!(
                "'max_tokens' or 'max_completion_tokens' is too large: {m}. This model's maximum context length is {max_model_len} tokens and your request has {prompt_len} input tokens ({m} > {max_model_len} - {prompt_len})."
            ),
            "max_tokens",
            Some(m.to_string()),
        )),
        // As vLLM's `get_max_tokens`: the smallest of the request's value, the room left in the
        // context and the generation config's `max_new_tokens`.
        requested => {
            let room = max_model_len - prompt_len;
            let m = requested.map_or(room, |m| m as usize);
            Ok(state.model.default_max_new_tokens.map_or(m, |d| d.min(m)))
        }
    }
}

/// The sampling fields both generation endpoints share, still in wire form.
#[derive(Debug, Clone, Default)]
pub struct SamplingFields {
    pub n: Option<i64>,
    pub best_of: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<Value>,
    pub stop_token_ids: Option<Vec<i64>>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<i64>,
    /// Already resolved by the endpoint (completions: `logprobs`; chat: `top_logprobs`).
    pub logprobs: Option<usize>,
    pub prompt_logprobs: Option<i64>,
    pub skip_special_tokens: Option<bool>,
    pub spaces_between_special_tokens: Option<bool>,
    pub include_stop_str_in_output: Option<bool>,
    pub logit_bias: Option<Value>,
    pub allowed_token_ids: Option<Vec<i64>>,
    pub bad_words: Option<Vec<String>>,
    pub use_beam_search: Option<bool>,
}

/// Builds and validates the engine's sampling parameters: the request's fields over the model's
/// generation-config defaults over vLLM's defaults.
pub fn build_sampling_params(
    state: &AppState,
    f: SamplingFields,
    max_tokens: usize,
) -> Result<SamplingParams, ApiError> {
    if f.use_beam_search == Some(true) {
        return Err(
            ApiError::bad_request("Beam search is not supported by this server yet.").with_param("use_beam_search")
        );
    }
    let mut p = state.default_params.clone();
    p.max_tokens = Some(max_tokens);
    if let Some(n) = f.n {
        p.n = sequences("n", n)?;
    }
    if let Some(b) = f.best_of {
        p.best_of = Some(sequences("best_of", b)?);
    }
    let float = |name: &str, v: f64| -> Result<f32, ApiError> {
        let x = v as f32;
        if x.is_finite() {
            Ok(x)
        } else {
            Err(ApiError::bad_request(format!("`{name}` must be a finite number, got {v}")).with_param(name))
        }
    };
    if let Some(v) = f.presence_penalty {
        p.presence_penalty = float("presence_penalty", v)?;
    }
    if let Some(v) = f.frequency_penalty {
        p.frequency_penalty = float("frequency_penalty", v)?;
    }
    if let Some(v) = f.repetition_penalty {
        p.repetition_penalty = float("repetition_penalty", v)?;
    }
    if let Some(v) = f.temperature {
        p.temperature = float("temperature", v)?;
    }
    if let Some(v) = f.top_p {
        p.top_p = float("top_p", v)?;
    }
    if let Some(v) = f.min_p {
        p.min_p = float("min_p", v)?;
    }
    if let Some(k) = f.top_k {
        if k < -1 {
            return Err(ApiError::bad_request(format!("top_k must be 0 (disable), or at least 1, got {k}."))
                .with_param("top_k"));
        }
        p.top_k = k.min(i32::MAX as i64) as i32;
    }
    if let Some(seed) = f.seed {
        p.seed = Some(seed as u64);
    }
    if let Some(stop) = &f.stop {
        p.stop = parse_stop(stop)?;
    }
    if let Some(ids) = &f.stop_token_ids {
        p.stop_token_ids = wire_token_ids(ids, "stop_token_ids")?;
    }
    if let Some(v) = f.ignore_eos {
        p.ignore_eos = v;
    }
    if let Some(m) = f.min_tokens {
        if m < 0 {
            return Err(ApiError::bad_request(format!("min_tokens must be greater than or equal to 0, got {m}."))
                .with_param("min_tokens"));
        }
        p.min_tokens = m as usize;
    }
    p.logprobs = f.logprobs;
    if let Some(k) = f.prompt_logprobs {
        p.prompt_logprobs = Some(match k {
            -1 => state.model.vocab_size,
            k if k < 0 => {
                return Err(ApiError::bad_request(format!(
                    "`prompt_logprobs` must be a positive value or -1, got {k}."
                ))
                .with_param("prompt_logprobs"))
            }
            k => k as usize,
        });
    }
    if let Some(v) = f.skip_special_tokens {
        p.skip_special_tokens = v;
    }
    if let Some(v) = f.spaces_between_special_tokens {
        p.spaces_between_special_tokens = v;
    }
    if let Some(v) = f.include_stop_str_in_output {
        p.include_stop_str_in_output = v;
    }
    if let Some(bias) = &f.logit_bias {
        p.logit_bias = parse_logit_bias(bias)?;
    }
    if let Some(ids) = &f.allowed_token_ids {
        p.allowed_token_ids = Some(wire_token_ids(ids, "allowed_token_ids")?);
    }
    if let Some(words) = f.bad_words {
        p.bad_words = words;
    }
    p.validate(state.model.vocab_size, state.config.max_logprobs).map_err(|e| {
        let msg = e.to_string();
        let mut words = msg.split_whitespace();
        let param = match words.next() {
            Some("Requested") => words.next(),
            Some("token_id") => Some("logit_bias"),
            w => w,
        }
        .map(|w| w.trim_end_matches([',', '.', ':']).to_string());
        let err = ApiError::bad_request(msg.clone());
        match param {
            Some(f) if f.chars().all(|c| c.is_ascii_lowercase() || c == '_') => err.with_param(&f),
            _ => err,
        }
    })?;
    Ok(p)
}

fn sequences(name: &str, v: i64) -> Result<usize, ApiError> {
    if v < 1 {
        return Err(ApiError::bad_request(format!("{name} must be at least 1, got {v}.")).with_param(name));
    }
    if v > MAX_SEQUENCES_PER_REQUEST {
        return Err(ApiError::bad_request(format!("{name} must be at most {MAX_SEQUENCES_PER_REQUEST}, got {v}."))
            .with_param(name));
    }
    Ok(v as usize)
}

/// `stop`: a string or a list of strings (null: none).
pub fn parse_stop(v: &Value) -> Result<Vec<String>, ApiError> {
    let err = || ApiError::bad_request("`stop` must be a string or a list of strings").with_param("stop");
    match v {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => items.iter().map(|i| i.as_str().map(str::to_string).ok_or_else(err)).collect(),
        _ => Err(err()),
    }
}

/// `logit_bias`: `{"token_id": bias}`; biases are clamped to [-100, 100] as vLLM does.
pub fn parse_logit_bias(v: &Value) -> Result<BTreeMap<u32, f32>, ApiError> {
    let obj = match v {
        Value::Null => return Ok(BTreeMap::new()),
        Value::Object(o) => o,
        other => {
            return Err(ApiError::bad_request(format!(
                "`logit_bias` must be an object mapping token ids to biases, got {}",
                json_kind(other)
            ))
            .with_param("logit_bias"))
        }
    };
    let mut out = BTreeMap::new();
    for (k, b) in obj {
        let id: u32 = k.trim().parse().map_err(|_| {
            ApiError::bad_request(format!("`logit_bias` keys must be token ids, got `{k}`")).with_param("logit_bias")
        })?;
        let bias = b.as_f64().ok_or_else(|| {
            ApiError::bad_request(format!("`logit_bias` values must be numbers, got {b} for token {id}"))
                .with_param("logit_bias")
        })?;
        out.insert(id, bias.clamp(-100.0, 100.0) as f32);
    }
    Ok(out)
}

/// `priority` is only allowed with `--scheduling-policy priority` (vLLM's rule and message).
pub fn check_priority(state: &AppState, priority: Option<i64>) -> Result<i32, ApiError> {
    let p = priority.unwrap_or(0);
    if p != 0 && !state.config.priority_scheduling {
        return Err(ApiError::bad_request(format!("Got priority {p} but Priority scheduling is not enabled."))
            .with_param("priority"));
    }
    i32::try_from(p)
        .map_err(|_| ApiError::bad_request(format!("`priority` must fit in 32 bits, got {p}")).with_param("priority"))
}

/// `stream_options` is only allowed with `stream: true`; returns (include_usage, continuous_usage_stats).
pub fn stream_options(
    stream: bool,
    options: Option<&crate::protocol::StreamOptions>,
) -> Result<(bool, bool), ApiError> {
    match options {
        None => Ok((false, false)),
        Some(_) if !stream => Err(ApiError::bad_request("Stream options can only be defined when `stream=True`.")
            .with_param("stream_options")),
        Some(o) => Ok((o.include_usage.unwrap_or(true), o.continuous_usage_stats.unwrap_or(false))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prompts_of_every_shape() {
        assert_eq!(parse_prompts(Some(&json!("hi"))).unwrap(), vec![PromptInput::Text("hi".into())]);
        assert_eq!(parse_prompts(Some(&json!(["a", "b"]))).unwrap().len(), 2);
        assert_eq!(parse_prompts(Some(&json!([1, 2, 3]))).unwrap(), vec![PromptInput::Tokens(vec![1, 2, 3])]);
        assert_eq!(parse_prompts(Some(&json!([[1], [2, 3]]))).unwrap().len(), 2);
        for bad in [json!([]), json!(5), json!([-1]), json!([1, "a"]), json!({"a": 1}), json!([[1], "x"]), json!(null)]
        {
            let e = parse_prompts(Some(&bad)).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{bad}");
            assert_eq!(e.param.as_deref(), Some("prompt"), "{bad}");
        }
    }

    #[test]
    fn malformed_json_is_400_naming_the_field() {
        let e = parse_json::<crate::protocol::CompletionRequest>(b"{\"prompt\": ").unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        assert!(e.message.starts_with("Invalid JSON"), "{}", e.message);
        let e = parse_json::<crate::protocol::CompletionRequest>(br#"{"temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        assert!(e.message.contains("`temperature`"), "{}", e.message);
        let e = parse_json::<crate::protocol::CompletionRequest>(b"[1]").unwrap_err();
        assert!(e.message.contains("JSON object"), "{}", e.message);
    }

    #[test]
    fn stop_and_logit_bias_shapes() {
        assert_eq!(parse_stop(&json!("x")).unwrap(), vec!["x"]);
        assert_eq!(parse_stop(&json!(["a", "b"])).unwrap(), vec!["a", "b"]);
        assert!(parse_stop(&json!([1])).is_err());
        let b = parse_logit_bias(&json!({"5": 300, "7": -1.5})).unwrap();
        assert_eq!(b[&5], 100.0);
        assert_eq!(b[&7], -1.5);
        assert!(parse_logit_bias(&json!({"x": 1})).is_err());
        assert!(parse_logit_bias(&json!({"1": "a"})).is_err());
    }
}
