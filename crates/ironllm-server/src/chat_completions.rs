//! `POST /v1/chat/completions`: messages rendered with the model's chat template, one engine
//! request, `n` choices, as JSON or as server-sent events in OpenAI's order — a role delta
//! (`{"role": "assistant", "content": ""}`) per choice first, content deltas, `finish_reason` on a
//! choice's last content chunk, then the usage chunk (`stream_options.include_usage`) and
//! `data: [DONE]`.
//!
//! Forced tool calls (`tool_choice` naming a function, or `"required"`): the output is constrained to
//! the arguments' JSON schema and comes back as `tool_calls` with `finish_reason: "tool_calls"`; when
//! streaming, the calls are sent whole in the choice's last chunk (no partial arguments).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use ironllm::{OutputKind, SamplingParams};
use serde_json::Value;

use crate::async_engine::{EngineEvent, EngineRequest, RequestStream};
use crate::chat::{self, RenderOptions};
use crate::error::ApiError;
use crate::generate::{self, finish_reason_str, stop_reason_json, SseSender};
use crate::logprobs;
use crate::protocol::{
    ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamResponse, ChatDelta, ChatLogprobs,
    ChatMessage, ChatStreamChoice, Usage,
};
use crate::routes::{body_json, chat_template_for};
use crate::server::{random_uuid, unix_now, AppState};
use crate::structured::{self, StructuredFields, ToolMode};
use crate::validate::{self, check_model, PromptInput, SamplingFields};

/// A chat request after validation, templating and tokenization.
struct Prepared {
    id: String,
    prompt_ids: Vec<u32>,
    params: SamplingParams,
    stream: bool,
    include_usage: bool,
    continuous_usage: bool,
    /// `top_logprobs` when `logprobs` is on.
    logprobs: Option<usize>,
    /// The final message's text, prepended to each choice (`echo` with a final message in the
    /// response role).
    echo: Option<String>,
    n: usize,
    cumulative: bool,
    priority: i32,
    return_token_ids: bool,
    tool_mode: ToolMode,
}

pub async fn create_chat_completion(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let req: ChatCompletionRequest = body_json(&state, body).await?;
    check_model(&state, req.model.as_deref())?;
    let p = generate::blocking(&state, move |s| prepare(s, req)).await?;
    let request = EngineRequest {
        request_id: p.id.clone(),
        prompt_token_ids: p.prompt_ids.clone(),
        params: p.params.clone(),
        output_kind: if p.cumulative { OutputKind::Cumulative } else { OutputKind::Delta },
        priority: p.priority,
        arrival,
    };
    if state.config.log_requests {
        tracing::info!(
            "Received request {}: prompt_token_ids: {:?}, params: {:?}",
            request.request_id,
            crate::completions::truncated(&request.prompt_token_ids),
            request.params
        );
    }
    let streams = generate::add_all(&state, vec![request]).await?;
    if p.stream {
        let s = state.clone();
        return Ok(generate::sse_response(move |tx| stream_chat(s, p, streams, tx)));
    }
    let accums = generate::collect_all(streams, p.cumulative).await?;
    let acc = accums.into_iter().next().unwrap_or_default();
    let tok = state.tokenizer.as_deref();
    let choices = acc
        .seqs
        .iter()
        .enumerate()
        .map(|(i, seq)| {
            let tool_calls = tool_calls_of(&p.tool_mode, &seq.text, finish_reason_str(seq.finish_reason).as_deref());
            ChatChoice {
                index: i,
                message: ChatMessage {
                    role: state.config.response_role.clone(),
                    content: if tool_calls.is_some() {
                        None
                    } else {
                        Some(format!("{}{}", p.echo.as_deref().unwrap_or_default(), seq.text))
                    },
                    refusal: None,
                    annotations: None,
                    audio: None,
                    function_call: None,
                    tool_calls: tool_calls.clone().unwrap_or_default(),
                    reasoning_content: None,
                },
                logprobs: p.logprobs.map(|k| ChatLogprobs {
                    content: Some(logprobs::chat_logprobs(tok, &seq.token_ids, &seq.logprobs, k)),
                }),
                finish_reason: if tool_calls.is_some() {
                    Some("tool_calls".to_string())
                } else {
                    finish_reason_str(seq.finish_reason)
                },
                stop_reason: stop_reason_json(seq.stop_reason.as_ref()),
                token_ids: p.return_token_ids.then(|| seq.token_ids.clone()),
            }
        })
        .collect();
    let cached = state.config.enable_prompt_tokens_details.then_some(acc.num_cached_tokens);
    let response = ChatCompletionResponse {
        id: p.id.clone(),
        object: "chat.completion",
        created: unix_now(),
        model: state.model_name().to_string(),
        choices,
        service_tier: None,
        system_fingerprint: None,
        usage: Usage::new(p.prompt_ids.len(), acc.num_generated_tokens(), cached),
        prompt_logprobs: acc.prompt_logprobs.as_deref().map(|plp| logprobs::prompt_logprobs(tok, plp)),
        prompt_token_ids: p.return_token_ids.then(|| p.prompt_ids.clone()),
        kv_transfer_params: None,
    };
    Ok(Json(response).into_response())
}

fn prepare(state: &AppState, req: ChatCompletionRequest) -> Result<Prepared, ApiError> {
    let stream = req.stream.unwrap_or(false);
    let (include_usage, continuous_usage) = validate::stream_options(stream, req.stream_options.as_ref())?;
    let mut structured = structured::parse(&StructuredFields {
        response_format: req.response_format.as_ref(),
        structured_outputs: req.structured_outputs.as_ref(),
        guided_json: req.guided_json.as_ref(),
        guided_regex: req.guided_regex.as_ref(),
        guided_choice: req.guided_choice.as_ref(),
        guided_grammar: req.guided_grammar.as_ref(),
    })?;
    let priority = validate::check_priority(state, req.priority)?;
    let has_tools = matches!(&req.tools, Some(Value::Array(t)) if !t.is_empty());
    // vLLM defaults `tool_choice` to "auto" when tools are given, and "auto" needs a tool parser.
    let mut tool_mode = ToolMode::None;
    match &req.tool_choice {
        None | Some(Value::Null) if !has_tools => {}
        Some(Value::String(s)) if s == "none" => {}
        None | Some(Value::Null) => return auto_tool_choice_error(),
        Some(Value::String(s)) if s == "auto" => return auto_tool_choice_error(),
        Some(choice @ Value::String(s)) if s == "required" => {
            (tool_mode, structured) = forced_tools(structured, req.tools.as_ref(), choice)?;
        }
        Some(choice @ Value::Object(_)) => {
            (tool_mode, structured) = forced_tools(structured, req.tools.as_ref(), choice)?;
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "`tool_choice` must be `none`, `auto`, `required` or a named tool, got {other}"
            ))
            .with_param("tool_choice"))
        }
    }
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (_, Some(k)) if k < 0 => {
            return Err(ApiError::bad_request("`top_logprobs` must be a positive value.").with_param("top_logprobs"))
        }
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::bad_request("when using `top_logprobs`, `logprobs` must be set to true.")
                .with_param("top_logprobs"))
        }
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, _) => None,
    };
    if stream && req.prompt_logprobs.is_some_and(|k| k != 0) {
        return Err(ApiError::bad_request("`prompt_logprobs` are not available when `stream=True`.")
            .with_param("prompt_logprobs"));
    }
    let n = req.n.unwrap_or(1);
    if stream && req.best_of.is_some_and(|b| b != n) {
        return Err(ApiError::bad_request("`best_of` must equal `n` when streaming").with_param("best_of"));
    }
    let cumulative = req.best_of.is_some_and(|b| b > n);

    let messages = chat::normalize_messages(req.messages.as_ref())?;
    let template = chat_template_for(state, req.chat_template.as_deref())?;
    let mut extra = req.chat_template_kwargs.clone().unwrap_or_default();
    if let Some(tools) = req.tools.as_ref().filter(|t| !t.is_null()) {
        extra.insert("tools".into(), tools.clone());
    }
    if let Some(docs) = req.documents.as_ref().filter(|d| !d.is_null()) {
        extra.insert("documents".into(), docs.clone());
    }
    let opts = RenderOptions {
        add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
        continue_final_message: req.continue_final_message.unwrap_or(false),
        extra,
    };
    let text = chat::render(&template, &messages, &opts)?;
    let prompt_ids = validate::tokenize_prompt(
        state,
        &PromptInput::Text(text),
        req.add_special_tokens.unwrap_or(false),
        req.truncate_prompt_tokens,
    )?;
    let max_tokens =
        validate::resolve_max_tokens(state, prompt_ids.len(), req.max_completion_tokens.or(req.max_tokens))?;
    let fields = SamplingFields {
        n: req.n,
        best_of: req.best_of,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        repetition_penalty: req.repetition_penalty,
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        min_p: req.min_p,
        seed: req.seed,
        stop: req.stop,
        stop_token_ids: req.stop_token_ids,
        ignore_eos: req.ignore_eos,
        min_tokens: req.min_tokens,
        logprobs,
        prompt_logprobs: req.prompt_logprobs,
        skip_special_tokens: req.skip_special_tokens,
        spaces_between_special_tokens: req.spaces_between_special_tokens,
        include_stop_str_in_output: req.include_stop_str_in_output,
        logit_bias: req.logit_bias,
        allowed_token_ids: req.allowed_token_ids,
        bad_words: req.bad_words,
        use_beam_search: req.use_beam_search,
    };
    let mut params = validate::build_sampling_params(state, fields, max_tokens)?;
    params.structured_outputs = structured;
    let echo = if req.echo.unwrap_or(false) {
        chat::final_message_content(&messages)
            .filter(|(role, _)| *role == state.config.response_role)
            .map(|(_, content)| content.to_string())
    } else {
        None
    };
    Ok(Prepared {
        id: format!("chatcmpl-{}", req.request_id.unwrap_or_else(random_uuid)),
        prompt_ids,
        n: params.n,
        params,
        stream,
        include_usage,
        continuous_usage,
        logprobs,
        echo,
        cumulative,
        priority,
        return_token_ids: req.return_token_ids.unwrap_or(false),
        tool_mode,
    })
}

/// The constraint of a forced tool call; a request that also asks for another constraint is refused.
fn forced_tools(
    other: Option<ironllm_core::structured::StructuredOutputsParams>,
    tools: Option<&Value>,
    choice: &Value,
) -> Result<(ToolMode, Option<ironllm_core::structured::StructuredOutputsParams>), ApiError> {
    if let Some(other) = other {
        return Err(ApiError::bad_request(format!(
            "Only one kind of structured output may be requested, got `tool_choice` and `{}`",
            other.field
        ))
        .with_param("tool_choice"));
    }
    structured::tool_constraint(tools, Some(choice))
}

/// The tool calls of a finished choice in tool mode (only when the output completed its grammar).
fn tool_calls_of(mode: &ToolMode, text: &str, finish_reason: Option<&str>) -> Option<Vec<Value>> {
    if finish_reason != Some("stop") {
        return None;
    }
    structured::tool_calls_from_text(mode, text)
}

fn auto_tool_choice_error<T>() -> Result<T, ApiError> {
    Err(ApiError::bad_request(
        "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set",
    )
    .with_param("tool_choice"))
}

async fn stream_chat(state: Arc<AppState>, p: Prepared, streams: Vec<RequestStream>, tx: SseSender) {
    let tok = state.tokenizer.as_deref();
    let created = unix_now();
    let model = state.model_name().to_string();
    let prompt_tokens = p.prompt_ids.len();
    let chunk = |choices: Vec<ChatStreamChoice>, usage: Option<Usage>| ChatCompletionStreamResponse {
        id: p.id.clone(),
        object: "chat.completion.chunk",
        created,
        model: model.clone(),
        choices,
        usage,
    };
    let mut num_tokens = vec![0usize; p.n];
    let continuous = |num_tokens: usize| p.continuous_usage.then(|| Usage::new(prompt_tokens, num_tokens, None));
    for i in 0..p.n {
        let role = ChatStreamChoice {
            index: i,
            delta: ChatDelta {
                role: Some(state.config.response_role.clone()),
                content: Some(String::new()),
                tool_calls: None,
            },
            logprobs: None,
            finish_reason: None,
            stop_reason: None,
            token_ids: None,
        };
        if tx.data(&chunk(vec![role], continuous(0))).await.is_err() {
            return;
        }
        if let Some(echo) = &p.echo {
            let c = ChatStreamChoice {
                index: i,
                delta: ChatDelta { role: None, content: Some(echo.clone()), tool_calls: None },
                logprobs: None,
                finish_reason: None,
                stop_reason: None,
                token_ids: None,
            };
            if tx.data(&chunk(vec![c], continuous(0))).await.is_err() {
                return;
            }
        }
    }
    let mut cached_tokens = 0;
    // Tool mode: each choice's text is held back and sent as tool calls when it finishes.
    let mut tool_text = vec![String::new(); p.n];
    let tool_mode = p.tool_mode != ToolMode::None;
    let mut merged = generate::merge(streams);
    while let Some((_, ev)) = merged.next().await {
        let out = match ev {
            EngineEvent::Output(out) => out,
            EngineEvent::Failed(msg) => {
                let _ = tx.error(&ApiError::internal(msg)).await;
                let _ = tx.done().await;
                return;
            }
        };
        cached_tokens = cached_tokens.max(out.num_cached_tokens);
        for o in out.outputs {
            if o.index >= p.n {
                continue;
            }
            num_tokens[o.index] += o.token_ids.len();
            let lp = p.logprobs.map(|k| ChatLogprobs {
                content: Some(logprobs::chat_logprobs(tok, &o.token_ids, o.logprobs.as_deref().unwrap_or_default(), k)),
            });
            let has_logprobs = lp.as_ref().is_some_and(|l| l.content.as_ref().is_some_and(|c| !c.is_empty()));
            // A token may add no text yet (an incomplete UTF-8 sequence); its chunk is still sent when the
            // client asked for token ids, or they would be lost.
            let ids_to_send = p.return_token_ids && !o.token_ids.is_empty();
            if o.text.is_empty() && o.finish_reason.is_none() && !has_logprobs && !ids_to_send {
                continue;
            }
            let (content, tool_calls, finish) = if tool_mode {
                tool_text[o.index].push_str(&o.text);
                let finish = finish_reason_str(o.finish_reason);
                if finish.is_none() && !has_logprobs && !ids_to_send {
                    continue;
                }
                match finish.as_deref().and_then(|f| tool_calls_of(&p.tool_mode, &tool_text[o.index], Some(f))) {
                    Some(calls) => {
                        let indexed = calls
                            .into_iter()
                            .enumerate()
                            .map(|(i, mut c)| {
                                c["index"] = i.into();
                                c
                            })
                            .collect();
                        (None, Some(indexed), Some("tool_calls".to_string()))
                    }
                    // Not parseable (cut by length): the text goes out as content.
                    None if finish.is_some() => (Some(std::mem::take(&mut tool_text[o.index])), None, finish),
                    None => (None, None, None),
                }
            } else {
                (Some(o.text), None, finish_reason_str(o.finish_reason))
            };
            let c = ChatStreamChoice {
                index: o.index,
                delta: ChatDelta { role: None, content, tool_calls },
                logprobs: lp,
                finish_reason: finish,
                stop_reason: stop_reason_json(o.stop_reason.as_ref()),
                token_ids: p.return_token_ids.then_some(o.token_ids),
            };
            if tx.data(&chunk(vec![c], continuous(num_tokens[o.index]))).await.is_err() {
                return;
            }
        }
    }
    if p.include_usage {
        let cached = state.config.enable_prompt_tokens_details.then_some(cached_tokens);
        let usage = Usage::new(prompt_tokens, num_tokens.iter().sum(), cached);
        if tx.data(&chunk(Vec::new(), Some(usage))).await.is_err() {
            return;
        }
    }
    let _ = tx.done().await;
}
