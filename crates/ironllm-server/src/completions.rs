//! `POST /v1/completions`: prompts (a string, strings, token ids, lists of token ids) in, choices
//! out — one engine request per prompt, choice index `prompt_index * n + i` — as JSON or as
//! server-sent events, with `echo`, `logprobs`, `prompt_logprobs`, `n`/`best_of` and usage.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use ironllm::{OutputKind, SamplingParams};
use ironllm_core::outputs::PositionLogprobs;

use crate::async_engine::{EngineEvent, EngineRequest, RequestStream};
use crate::error::ApiError;
use crate::generate::{self, finish_reason_str, stop_reason_json, RequestAccum, SseSender};
use crate::logprobs::{self, CompletionLogprobsBuilder};
use crate::protocol::{
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, CompletionStreamChoice,
    CompletionStreamResponse, Usage,
};
use crate::routes::body_json;
use crate::server::{random_uuid, unix_now, AppState};
use crate::validate::{self, check_model, PromptInput, SamplingFields};

/// OpenAI's default `max_tokens` for completions.
const DEFAULT_MAX_TOKENS: i64 = 16;

/// A completion request after validation and tokenization.
struct Prepared {
    id: String,
    prompt_ids: Vec<Vec<u32>>,
    /// The prompt text per prompt (for `echo`).
    prompt_texts: Vec<String>,
    params: Vec<SamplingParams>,
    stream: bool,
    include_usage: bool,
    continuous_usage: bool,
    echo: bool,
    logprobs: Option<usize>,
    n: usize,
    cumulative: bool,
    priority: i32,
    return_token_ids: bool,
}

pub async fn create_completion(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let req: CompletionRequest = body_json(&state, body).await?;
    check_model(&state, req.model.as_deref())?;
    let p = generate::blocking(&state, move |s| prepare(s, req)).await?;
    let kind = if p.cumulative { OutputKind::Cumulative } else { OutputKind::Delta };
    let requests: Vec<EngineRequest> = p
        .prompt_ids
        .iter()
        .zip(&p.params)
        .enumerate()
        .map(|(i, (ids, params))| EngineRequest {
            request_id: format!("{}-{i}", p.id),
            prompt_token_ids: ids.clone(),
            params: params.clone(),
            output_kind: kind,
            priority: p.priority,
            arrival,
        })
        .collect();
    if state.config.log_requests {
        for r in &requests {
            tracing::info!(
                "Received request {}: prompt_token_ids: {:?}, params: {:?}",
                r.request_id,
                truncated(&r.prompt_token_ids),
                r.params
            );
        }
    }
    let streams = generate::add_all(&state, requests).await?;
    if p.stream {
        let s = state.clone();
        return Ok(generate::sse_response(move |tx| stream_completion(s, p, streams, tx)));
    }
    let accums = generate::collect_all(streams, p.cumulative).await?;
    Ok(Json(build_response(&state, &p, accums)).into_response())
}

pub(crate) fn truncated(ids: &[u32]) -> &[u32] {
    &ids[..ids.len().min(64)]
}

fn prepare(state: &AppState, req: CompletionRequest) -> Result<Prepared, ApiError> {
    let stream = req.stream.unwrap_or(false);
    let (include_usage, continuous_usage) = validate::stream_options(stream, req.stream_options.as_ref())?;
    if req.suffix.is_some() {
        return Err(ApiError::bad_request("suffix is not currently supported").with_param("suffix"));
    }
    if req.prompt_embeds.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(
            ApiError::bad_request("`prompt_embeds` is not supported by this server").with_param("prompt_embeds")
        );
    }
    let structured = crate::structured::parse(&crate::structured::StructuredFields {
        response_format: req.response_format.as_ref(),
        structured_outputs: req.structured_outputs.as_ref(),
        guided_json: req.guided_json.as_ref(),
        guided_regex: req.guided_regex.as_ref(),
        guided_choice: req.guided_choice.as_ref(),
        guided_grammar: req.guided_grammar.as_ref(),
    })?;
    let priority = validate::check_priority(state, req.priority)?;
    let logprobs = match req.logprobs {
        Some(k) if k < 0 => {
            return Err(ApiError::bad_request("`logprobs` must be a positive value.").with_param("logprobs"));
        }
        k => k.map(|k| k as usize),
    };
    if stream && req.prompt_logprobs.is_some_and(|k| k != 0) {
        return Err(ApiError::bad_request("`prompt_logprobs` are not available when `stream=True`.")
            .with_param("prompt_logprobs"));
    }
    let echo = req.echo.unwrap_or(false);
    let n = req.n.unwrap_or(1);
    if stream && req.best_of.is_some_and(|b| b != n) {
        return Err(ApiError::bad_request("`best_of` must equal `n` when streaming").with_param("best_of"));
    }
    let cumulative = req.best_of.is_some_and(|b| b > n);
    let requested_max = match req.max_tokens {
        None => Some(DEFAULT_MAX_TOKENS),
        Some(m) => m,
    };
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
        stop: req.stop.clone(),
        stop_token_ids: req.stop_token_ids.clone(),
        ignore_eos: req.ignore_eos,
        min_tokens: req.min_tokens,
        logprobs,
        prompt_logprobs: req.prompt_logprobs,
        skip_special_tokens: req.skip_special_tokens,
        spaces_between_special_tokens: req.spaces_between_special_tokens,
        include_stop_str_in_output: req.include_stop_str_in_output,
        logit_bias: req.logit_bias.clone(),
        allowed_token_ids: req.allowed_token_ids.clone(),
        bad_words: req.bad_words.clone(),
        use_beam_search: req.use_beam_search,
    };
    let prompts = validate::parse_prompts(req.prompt.as_ref())?;
    let add_special_tokens = req.add_special_tokens.unwrap_or(true);
    let mut prompt_ids = Vec::with_capacity(prompts.len());
    let mut prompt_texts = Vec::with_capacity(prompts.len());
    let mut params = Vec::with_capacity(prompts.len());
    for prompt in &prompts {
        let ids = validate::tokenize_prompt(state, prompt, add_special_tokens, req.truncate_prompt_tokens)?;
        let max_tokens = validate::resolve_max_tokens(state, ids.len(), requested_max)?;
        let mut p = validate::build_sampling_params(state, fields.clone(), max_tokens)?;
        p.structured_outputs = structured.clone();
        if echo {
            if let Some(k) = logprobs {
                p.prompt_logprobs = Some(p.prompt_logprobs.unwrap_or(0).max(k));
            }
        }
        let text = match prompt {
            PromptInput::Text(t) if req.truncate_prompt_tokens.is_none() => t.clone(),
            _ if echo => state.tokenizer.as_ref().and_then(|t| t.decode(&ids, false).ok()).unwrap_or_default(),
            _ => String::new(),
        };
        prompt_ids.push(ids);
        prompt_texts.push(text);
        params.push(p);
    }
    let n = params.first().map_or(1, |p| p.n);
    let id = format!("cmpl-{}", req.request_id.clone().unwrap_or_else(random_uuid));
    Ok(Prepared {
        id,
        prompt_ids,
        prompt_texts,
        params,
        stream,
        include_usage,
        continuous_usage,
        echo,
        logprobs,
        n,
        cumulative,
        priority,
        return_token_ids: req.return_token_ids.unwrap_or(false),
    })
}

fn usage(state: &AppState, p: &Prepared, accums: &[RequestAccum]) -> Usage {
    let prompt_tokens = p.prompt_ids.iter().map(Vec::len).sum();
    let completion_tokens = accums.iter().map(RequestAccum::num_generated_tokens).sum();
    let cached = state.config.enable_prompt_tokens_details.then(|| accums.iter().map(|a| a.num_cached_tokens).sum());
    Usage::new(prompt_tokens, completion_tokens, cached)
}

fn build_response(state: &AppState, p: &Prepared, accums: Vec<RequestAccum>) -> CompletionResponse {
    let tok = state.tokenizer.as_deref();
    let usage = usage(state, p, &accums);
    let mut choices = Vec::new();
    for (pi, acc) in accums.iter().enumerate() {
        let prompt_logprobs = acc.prompt_logprobs.as_deref().map(|plp| logprobs::prompt_logprobs(tok, plp));
        for (i, seq) in acc.seqs.iter().enumerate() {
            let mut text = String::new();
            let mut lp = None;
            if p.echo {
                text.push_str(&p.prompt_texts[pi]);
            }
            if let Some(k) = p.logprobs {
                let mut l = CompletionLogprobs::default();
                let mut b = CompletionLogprobsBuilder::new(0, k);
                if p.echo {
                    b.append_prompt(&mut l, tok, &p.prompt_ids[pi], acc.prompt_logprobs.as_deref());
                }
                b.append(&mut l, tok, &seq.token_ids, &seq.logprobs);
                lp = Some(l);
            }
            text.push_str(&seq.text);
            choices.push(CompletionChoice {
                index: pi * p.n + i,
                text,
                logprobs: lp,
                finish_reason: finish_reason_str(seq.finish_reason),
                stop_reason: stop_reason_json(seq.stop_reason.as_ref()),
                prompt_logprobs: prompt_logprobs.clone(),
                token_ids: p.return_token_ids.then(|| seq.token_ids.clone()),
                prompt_token_ids: p.return_token_ids.then(|| p.prompt_ids[pi].clone()),
            });
        }
    }
    CompletionResponse {
        id: p.id.clone(),
        object: "text_completion",
        created: unix_now(),
        model: state.model_name().to_string(),
        choices,
        service_tier: None,
        system_fingerprint: None,
        usage,
        kv_transfer_params: None,
    }
}

async fn stream_completion(state: Arc<AppState>, p: Prepared, streams: Vec<RequestStream>, tx: SseSender) {
    let tok = state.tokenizer.as_deref();
    let model = state.model_name().to_string();
    let created = unix_now();
    let num_choices = p.prompt_ids.len() * p.n;
    let mut num_tokens = vec![0usize; num_choices];
    let mut echoed = vec![false; num_choices];
    let mut builders: Vec<CompletionLogprobsBuilder> =
        (0..num_choices).map(|_| CompletionLogprobsBuilder::new(0, p.logprobs.unwrap_or(0))).collect();
    let mut prompt_logprobs: Vec<Option<Vec<Option<PositionLogprobs>>>> = vec![None; p.prompt_ids.len()];
    let mut cached_tokens = vec![0usize; p.prompt_ids.len()];
    let mut merged = generate::merge(streams);
    while let Some((pi, ev)) = merged.next().await {
        let out = match ev {
            EngineEvent::Output(out) => out,
            EngineEvent::Failed(msg) => {
                let _ = tx.error(&ApiError::internal(msg)).await;
                let _ = tx.done().await;
                return;
            }
        };
        if out.prompt_logprobs.is_some() {
            prompt_logprobs[pi] = out.prompt_logprobs.clone();
        }
        cached_tokens[pi] = cached_tokens[pi].max(out.num_cached_tokens);
        for o in out.outputs {
            let idx = pi * p.n + o.index;
            if idx >= num_choices {
                continue;
            }
            let mut text = String::new();
            let mut lp = p.logprobs.map(|_| CompletionLogprobs::default());
            if p.echo && !echoed[idx] {
                echoed[idx] = true;
                text.push_str(&p.prompt_texts[pi]);
                if let Some(l) = lp.as_mut() {
                    builders[idx].append_prompt(l, tok, &p.prompt_ids[pi], prompt_logprobs[pi].as_deref());
                }
            }
            text.push_str(&o.text);
            num_tokens[idx] += o.token_ids.len();
            if let Some(l) = lp.as_mut() {
                builders[idx].append(l, tok, &o.token_ids, o.logprobs.as_deref().unwrap_or_default());
            }
            // A token may add no text yet (an incomplete UTF-8 sequence); its chunk is still sent when the
            // client asked for token ids, or they would be lost.
            let ids_to_send = p.return_token_ids && !o.token_ids.is_empty();
            if text.is_empty()
                && o.finish_reason.is_none()
                && lp.as_ref().is_none_or(|l| l.tokens.is_empty())
                && !ids_to_send
            {
                continue;
            }
            let chunk = CompletionStreamResponse {
                id: p.id.clone(),
                object: "text_completion",
                created,
                model: model.clone(),
                choices: vec![CompletionStreamChoice {
                    index: idx,
                    text,
                    logprobs: lp,
                    finish_reason: finish_reason_str(o.finish_reason),
                    stop_reason: stop_reason_json(o.stop_reason.as_ref()),
                    token_ids: p.return_token_ids.then(|| o.token_ids.clone()),
                    prompt_token_ids: None,
                }],
                usage: p.continuous_usage.then(|| Usage::new(p.prompt_ids[pi].len(), num_tokens[idx], None)),
            };
            if tx.data(&chunk).await.is_err() {
                return;
            }
        }
    }
    if p.include_usage {
        let prompt_tokens = p.prompt_ids.iter().map(Vec::len).sum();
        let cached = state.config.enable_prompt_tokens_details.then(|| cached_tokens.iter().sum());
        let chunk = CompletionStreamResponse {
            id: p.id.clone(),
            object: "text_completion",
            created,
            model,
            choices: Vec::new(),
            usage: Some(Usage::new(prompt_tokens, num_tokens.iter().sum(), cached)),
        };
        if tx.data(&chunk).await.is_err() {
            return;
        }
    }
    let _ = tx.done().await;
}
