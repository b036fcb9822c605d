//! Chat messages to prompt text: OpenAI messages are normalized into what Hugging Face chat
//! templates expect (content as one string, tool-call arguments as objects), then rendered with the
//! model's template (or `--chat-template`), as vLLM does with `apply_chat_template`.
//!
//! - `content` may be a string, null (read as ""), or a list of `{"type": "text", "text": ...}` parts, joined
//!   with newlines (vLLM's "string" content format); other part types are rejected.
//! - `continue_final_message` renders without a generation prompt and cuts the text right after the
//!   final message, so the model continues it (transformers' algorithm).

use ironllm_model::chat_template::{ChatTemplate, ChatTemplateError};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::validate::json_kind;

/// Options of one rendering.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    pub add_generation_prompt: bool,
    pub continue_final_message: bool,
    /// Variables for the template: `chat_template_kwargs`, `tools`, `documents`.
    pub extra: Map<String, Value>,
}

/// Checks and normalizes `messages`.
pub fn normalize_messages(messages: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    let items = match messages {
        Some(Value::Array(items)) => items,
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request("`messages` is required").with_param("messages"));
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "`messages` must be a list of messages, got {}",
                json_kind(other)
            ))
            .with_param("messages"));
        }
    };
    items.iter().enumerate().map(|(i, m)| normalize_message(i, m)).collect()
}

fn normalize_message(i: usize, message: &Value) -> Result<Value, ApiError> {
    let bad = |msg: String| ApiError::bad_request(msg).with_param("messages");
    let Value::Object(obj) = message else {
        return Err(bad(format!("`messages[{i}]` must be an object, got {}", json_kind(message))));
    };
    let mut out = obj.clone();
    match obj.get("role") {
        Some(Value::String(_)) => {}
        None | Some(Value::Null) => return Err(bad(format!("`messages[{i}].role` is required"))),
        Some(other) => return Err(bad(format!("`messages[{i}].role` must be a string, got {}", json_kind(other)))),
    }
    match obj.get("content") {
        // vLLM turns a missing or null content (an assistant message with tool calls) into "".
        None | Some(Value::Null) => {
            out.insert("content".into(), Value::String(String::new()));
        }
        Some(Value::String(_)) => {}
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                texts.push(part_text(i, j, part)?);
            }
            out.insert("content".into(), Value::String(texts.join("\n")));
        }
        Some(other) => {
            return Err(bad(format!(
                "`messages[{i}].content` must be a string or a list of content parts, got {}",
                json_kind(other)
            )))
        }
    }
    // Templates index tool-call arguments as objects; OpenAI sends them as JSON strings.
    if let Some(Value::Array(calls)) = out.get_mut("tool_calls") {
        for call in calls.iter_mut() {
            if let Some(Value::Object(f)) = call.get_mut("function") {
                if let Some(Value::String(args)) = f.get("arguments") {
                    if let Ok(parsed) = serde_json::from_str::<Value>(args) {
                        f.insert("arguments".into(), parsed);
                    }
                }
            }
        }
    }
    Ok(Value::Object(out))
}

fn part_text(i: usize, j: usize, part: &Value) -> Result<String, ApiError> {
    let bad = |msg: String| ApiError::bad_request(msg).with_param("messages");
    let Value::Object(p) = part else {
        return match part {
            Value::String(s) => Ok(s.clone()),
            other => Err(bad(format!("`messages[{i}].content[{j}]` must be a content part, got {}", json_kind(other)))),
        };
    };
    let kind = p.get("type").and_then(Value::as_str).unwrap_or("text");
    match kind {
        "text" | "input_text" | "output_text" => match p.get("text") {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(bad(format!("`messages[{i}].content[{j}].text` must be a string"))),
        },
        "refusal" => Ok(p.get("refusal").and_then(Value::as_str).unwrap_or_default().to_string()),
        other => Err(bad(format!(
            "`messages[{i}].content[{j}]`: content part type `{other}` is not supported by this model (text only)"
        ))),
    }
}

/// The text of the final message, for `continue_final_message` and chat `echo`.
pub fn final_message_content(messages: &[Value]) -> Option<(&str, &str)> {
    let last = messages.last()?;
    let role = last.get("role")?.as_str()?;
    let content = last.get("content").and_then(Value::as_str).unwrap_or("");
    Some((role, content))
}

/// Renders `messages` with `template`.
pub fn render(template: &ChatTemplate, messages: &[Value], opts: &RenderOptions) -> Result<String, ApiError> {
    if opts.continue_final_message && opts.add_generation_prompt {
        return Err(ApiError::bad_request(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
        ));
    }
    let value = Value::Array(messages.to_vec());
    let rendered = template.render(&value, opts.add_generation_prompt, &opts.extra).map_err(template_error)?;
    if !opts.continue_final_message {
        return Ok(rendered);
    }
    let Some((_, final_message)) = final_message_content(messages) else {
        return Err(ApiError::bad_request("`continue_final_message` needs at least one message").with_param("messages"));
    };
    let stripped = final_message.trim();
    let Some(loc) = (if stripped.is_empty() { None } else { rendered.rfind(stripped) }) else {
        return Err(ApiError::bad_request(
            "continue_final_message is set but the final message does not appear in the chat after applying the chat template! This can happen if the chat template deletes portions of the final message. Please verify the chat template and final message in your chat to ensure they are compatible.",
        ));
    };
    let lstripped = final_message.trim_start();
    let end = if rendered[loc..].starts_with(lstripped) { loc + lstripped.len() } else { loc + stripped.len() };
    Ok(rendered[..end].to_string())
}

fn template_error(e: ChatTemplateError) -> ApiError {
    ApiError::bad_request(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TEMPLATE: &str = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

    fn template() -> ChatTemplate {
        ChatTemplate::new(TEMPLATE, None, None).unwrap()
    }

    #[test]
    fn text_parts_are_joined() {
        let m = normalize_messages(Some(
            &json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]),
        ))
        .unwrap();
        assert_eq!(m[0]["content"], "a\nb");
        let e =
            normalize_messages(Some(&json!([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])))
                .unwrap_err();
        assert!(e.message.contains("image_url"), "{}", e.message);
        assert!(normalize_messages(Some(&json!([{"content": "x"}]))).is_err());
        assert!(normalize_messages(Some(&json!("x"))).is_err());
    }

    #[test]
    fn tool_call_arguments_become_objects() {
        let m = normalize_messages(Some(&json!([{"role": "assistant", "content": null, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]}])))
            .unwrap();
        assert_eq!(m[0]["tool_calls"][0]["function"]["arguments"]["x"], 1);
    }

    #[test]
    fn continue_final_message_cuts_after_the_last_message() {
        let msgs = normalize_messages(Some(
            &json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello, I"}]),
        ))
        .unwrap();
        let opts = RenderOptions { continue_final_message: true, ..Default::default() };
        assert_eq!(render(&template(), &msgs, &opts).unwrap(), "<|user|>hi<|end|>\n<|assistant|>Hello, I");
        let both = RenderOptions { continue_final_message: true, add_generation_prompt: true, ..Default::default() };
        assert!(render(&template(), &msgs, &both).is_err());
    }
}
