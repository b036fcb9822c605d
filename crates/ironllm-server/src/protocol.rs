//! Wire types: the JSON bodies of the OpenAI-compatible API exactly as vLLM reads and writes them.
//!
//! Request types are deliberately loose — every field optional, numbers wide (`i64`/`f64`), fields
//! with several accepted shapes (`prompt`, `stop`, `messages`, `logit_bias`) kept as raw JSON — so
//! that parsing never fails on a value that is merely out of range: [`crate::validate`] turns a wire
//! request into a typed one with messages that name the field and the bound. Unknown fields are
//! accepted and ignored, as vLLM does. Response types serialize the fields vLLM sends, nulls included.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// Tells "absent" (`None`) from "explicitly null" (`Some(None)`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// `stream_options`. vLLM defaults `include_usage` to true once the object is given.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
    pub continuous_usage_stats: Option<bool>,
}

/// `POST /v1/completions`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CompletionRequest {
    pub model: Option<String>,
    /// A string, a list of strings, a list of token ids or a list of lists of token ids.
    pub prompt: Option<Value>,
    pub prompt_embeds: Option<Value>,
    pub best_of: Option<i64>,
    pub echo: Option<bool>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<Value>,
    pub logprobs: Option<i64>,
    /// Absent means OpenAI's default of 16; `null` means "up to the context length".
    #[serde(deserialize_with = "present")]
    pub max_tokens: Option<Option<i64>>,
    pub n: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<Value>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub suffix: Option<String>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub user: Option<String>,
    // vLLM's extra sampling parameters.
    pub use_beam_search: Option<bool>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub length_penalty: Option<f64>,
    pub stop_token_ids: Option<Vec<i64>>,
    pub include_stop_str_in_output: Option<bool>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<i64>,
    pub skip_special_tokens: Option<bool>,
    pub spaces_between_special_tokens: Option<bool>,
    pub truncate_prompt_tokens: Option<i64>,
    pub allowed_token_ids: Option<Vec<i64>>,
    pub prompt_logprobs: Option<i64>,
    pub bad_words: Option<Vec<String>>,
    // vLLM's extra parameters.
    pub add_special_tokens: Option<bool>,
    pub response_format: Option<Value>,
    /// vLLM's structured outputs, and the older `guided_*` fields mapped to the same thing.
    pub structured_outputs: Option<Value>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
    pub guided_decoding_backend: Option<Value>,
    pub guided_whitespace_pattern: Option<Value>,
    pub priority: Option<i64>,
    pub request_id: Option<String>,
    pub return_token_ids: Option<bool>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ChatCompletionRequest {
    pub messages: Option<Value>,
    pub model: Option<String>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<Value>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    /// Deprecated by OpenAI in favour of `max_completion_tokens`; both accepted.
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub n: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub response_format: Option<Value>,
    pub seed: Option<i64>,
    pub stop: Option<Value>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub user: Option<String>,
    // vLLM's extra sampling parameters.
    pub best_of: Option<i64>,
    pub use_beam_search: Option<bool>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub length_penalty: Option<f64>,
    pub stop_token_ids: Option<Vec<i64>>,
    pub include_stop_str_in_output: Option<bool>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<i64>,
    pub skip_special_tokens: Option<bool>,
    pub spaces_between_special_tokens: Option<bool>,
    pub truncate_prompt_tokens: Option<i64>,
    pub prompt_logprobs: Option<i64>,
    pub allowed_token_ids: Option<Vec<i64>>,
    pub bad_words: Option<Vec<String>>,
    // vLLM's extra parameters.
    pub echo: Option<bool>,
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    pub add_special_tokens: Option<bool>,
    pub documents: Option<Value>,
    pub chat_template: Option<String>,
    pub chat_template_kwargs: Option<Map<String, Value>>,
    /// vLLM's structured outputs, and the older `guided_*` fields mapped to the same thing.
    pub structured_outputs: Option<Value>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
    pub guided_decoding_backend: Option<Value>,
    pub guided_whitespace_pattern: Option<Value>,
    pub priority: Option<i64>,
    pub request_id: Option<String>,
    pub return_token_ids: Option<bool>,
}

/// `POST /tokenize`: either a completion-style `prompt` or chat `messages`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<Value>,
    pub messages: Option<Value>,
    pub add_special_tokens: Option<bool>,
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    pub return_token_strs: Option<bool>,
    pub chat_template: Option<String>,
    pub chat_template_kwargs: Option<Map<String, Value>>,
    pub tools: Option<Value>,
}

/// `POST /detokenize`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Option<Vec<i64>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    pub token_strs: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

/// `prompt_tokens_details`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

/// Token counts of a response (`usage`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
    pub completion_tokens: usize,
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: Option<usize>) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: cached_tokens.map(|cached_tokens| PromptTokensDetails { cached_tokens }),
        }
    }
}

/// A list of `(token, logprob)` serialized as a JSON object in this order (a completions
/// `top_logprobs` entry). A later duplicate key is dropped, as a Python dict literal keeps the first
/// insertion's position.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OrderedLogprobMap(pub Vec<(String, f64)>);

impl Serialize for OrderedLogprobMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut seen = std::collections::HashSet::new();
        let entries: Vec<&(String, f64)> = self.0.iter().filter(|(k, _)| seen.insert(k.as_str())).collect();
        let mut map = s.serialize_map(Some(entries.len()))?;
        for (k, v) in entries {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// A completions choice's `logprobs`.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct CompletionLogprobs {
    pub text_offset: Vec<usize>,
    pub token_logprobs: Vec<Option<f64>>,
    pub tokens: Vec<String>,
    pub top_logprobs: Vec<Option<OrderedLogprobMap>>,
}

/// One entry of `prompt_logprobs` (vLLM's `Logprob`), keyed by token id in the response.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptLogprob {
    pub logprob: f64,
    pub rank: Option<u32>,
    pub decoded_token: Option<String>,
}

/// `prompt_logprobs`: `null` for the first prompt token, then `{token_id: Logprob}` per position.
pub type PromptLogprobs = Vec<Option<std::collections::BTreeMap<String, PromptLogprob>>>;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<String>,
    pub stop_reason: Option<Value>,
    pub prompt_logprobs: Option<PromptLogprobs>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub service_tier: Option<String>,
    pub system_fingerprint: Option<String>,
    pub usage: Usage,
    pub kv_transfer_params: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionStreamChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<String>,
    pub stop_reason: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionStreamResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionStreamChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One candidate in chat `top_logprobs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Option<Vec<u8>>,
}

/// One generated token in chat `logprobs.content`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Option<Vec<u8>>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct ChatLogprobs {
    pub content: Option<Vec<ChatTokenLogprob>>,
}

/// The assistant message of a chat choice.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<String>,
    pub refusal: Option<String>,
    pub annotations: Option<Value>,
    pub audio: Option<Value>,
    pub function_call: Option<Value>,
    pub tool_calls: Vec<Value>,
    pub reasoning_content: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
    pub stop_reason: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub service_tier: Option<String>,
    pub system_fingerprint: Option<String>,
    pub usage: Usage,
    pub prompt_logprobs: Option<PromptLogprobs>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    pub kv_transfer_params: Option<Value>,
}

/// A streamed chat delta: only the fields that are set appear.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Forced tool calls, sent whole in the choice's last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatStreamChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCompletionStreamResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatStreamChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// `GET /v1/models` entry (vLLM's `ModelCard`).
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub root: String,
    pub parent: Option<String>,
    pub max_model_len: usize,
    pub permission: Vec<Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_tokens_absent_and_null_differ() {
        let absent: CompletionRequest = serde_json::from_str(r#"{"prompt": "x"}"#).unwrap();
        assert_eq!(absent.max_tokens, None);
        let null: CompletionRequest = serde_json::from_str(r#"{"prompt": "x", "max_tokens": null}"#).unwrap();
        assert_eq!(null.max_tokens, Some(None));
        let set: CompletionRequest = serde_json::from_str(r#"{"prompt": "x", "max_tokens": 5}"#).unwrap();
        assert_eq!(set.max_tokens, Some(Some(5)));
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let r: ChatCompletionRequest =
            serde_json::from_str(r#"{"messages": [], "guided_whatever": 1, "metadata": {"a": 1}}"#).unwrap();
        assert!(r.messages.is_some());
    }

    #[test]
    fn ordered_map_keeps_order_and_first_duplicate() {
        let m = OrderedLogprobMap(vec![("b".into(), -1.0), ("a".into(), -2.0), ("b".into(), -3.0)]);
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"b":-1.0,"a":-2.0}"#);
    }

    #[test]
    fn chat_delta_omits_unset_fields() {
        let d = ChatDelta { role: None, content: Some("hi".into()), tool_calls: None };
        assert_eq!(serde_json::to_string(&d).unwrap(), r#"{"content":"hi"}"#);
    }
}
