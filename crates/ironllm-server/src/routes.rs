//! The small endpoints: `/health`, `/ping`, `/version`, `/metrics`, `/v1/models`, `/tokenize`,
//! `/detokenize`, and the body reader every POST handler shares.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};

use crate::chat::{self, RenderOptions};
use crate::error::ApiError;
use crate::protocol::{DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse};
use crate::server::AppState;
use crate::validate::{self, check_model};

/// How far past the limit an oversized body is still read (and discarded) before the 413 is sent:
/// a client that is still writing when the server closes the connection would see a reset instead
/// of the answer.
const OVERSIZED_BODY_DRAIN_BYTES: usize = 64 << 20;

/// Reads a JSON body: over the size limit is HTTP 413, anything unreadable or malformed is 400.
pub async fn body_json<T: DeserializeOwned>(state: &AppState, body: Body) -> Result<T, ApiError> {
    let limit = state.config.max_request_body_bytes;
    let too_large = || ApiError::payload_too_large(limit);
    let mut stream = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("Could not read the request body: {e}")))?;
        total = total.saturating_add(chunk.len());
        if total <= limit {
            buf.extend_from_slice(&chunk);
        } else {
            buf = Vec::new();
            if total > limit.saturating_add(OVERSIZED_BODY_DRAIN_BYTES) {
                break;
            }
        }
    }
    if total > limit {
        return Err(too_large());
    }
    validate::parse_json(&buf)
}

/// `/health` and `/ping`: 200 with an empty body while the engine runs, 503 once it died.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.engine.is_alive() {
        StatusCode::OK.into_response()
    } else {
        StatusCode::SERVICE_UNAVAILABLE.into_response()
    }
}

pub async fn version() -> Response {
    Json(json!({ "version": env!("CARGO_PKG_VERSION") })).into_response()
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.encode())
        .into_response()
}

pub async fn models(State(state): State<Arc<AppState>>) -> Response {
    let data = state
        .model
        .served_names
        .iter()
        .map(|name| ModelCard {
            id: name.clone(),
            object: "model",
            created: state.model.created,
            owned_by: "vllm",
            root: state.model.root.clone(),
            parent: None,
            max_model_len: state.model.max_model_len,
            permission: vec![json!({
                "id": format!("modelperm-{}", crate::server::random_uuid()),
                "object": "model_permission",
                "created": state.model.created,
                "allow_create_engine": false,
                "allow_sampling": true,
                "allow_logprobs": true,
                "allow_search_indices": false,
                "allow_view": true,
                "allow_fine_tuning": false,
                "organization": "*",
                "group": null,
                "is_blocking": false,
            })],
        })
        .collect();
    Json(ModelList { object: "list", data }).into_response()
}

pub async fn tokenize(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let req: TokenizeRequest = body_json(&state, body).await?;
    check_model(&state, req.model.as_deref())?;
    let s = state.clone();
    let tokens = tokio::task::spawn_blocking(move || tokenize_blocking(&s, req))
        .await
        .map_err(|e| ApiError::internal(format!("tokenization task failed: {e}")))??;
    Ok(Json(tokens).into_response())
}

fn tokenize_blocking(state: &AppState, req: TokenizeRequest) -> Result<TokenizeResponse, ApiError> {
    let (text, default_special) = match (&req.messages, &req.prompt) {
        (Some(messages), _) if !messages.is_null() => {
            let messages = chat::normalize_messages(Some(messages))?;
            let template = chat_template_for(state, req.chat_template.as_deref())?;
            let mut extra: Map<String, Value> = req.chat_template_kwargs.clone().unwrap_or_default();
            if let Some(tools) = &req.tools {
                extra.insert("tools".into(), tools.clone());
            }
            let opts = RenderOptions {
                add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
                continue_final_message: req.continue_final_message.unwrap_or(false),
                extra,
            };
            (chat::render(&template, &messages, &opts)?, false)
        }
        (_, Some(Value::String(p))) => (p.clone(), true),
        (_, Some(other)) => {
            return Err(ApiError::bad_request(format!("`prompt` must be a string, got {}", validate::json_kind(other)))
                .with_param("prompt"))
        }
        _ => return Err(ApiError::bad_request("Either `prompt` or `messages` must be given").with_param("prompt")),
    };
    let tokens =
        validate::encode(state.tokenizer.as_deref(), &text, req.add_special_tokens.unwrap_or(default_special))?;
    let token_strs = (req.return_token_strs == Some(true)).then(|| {
        tokens.iter().map(|&id| state.tokenizer.as_ref().and_then(|t| t.id_to_token(id)).unwrap_or_default()).collect()
    });
    Ok(TokenizeResponse { count: tokens.len(), max_model_len: state.model.max_model_len, tokens, token_strs })
}

/// The chat template for a request: its own `chat_template` (only with
/// `--trust-request-chat-template`) or the server's.
pub fn chat_template_for(
    state: &AppState,
    requested: Option<&str>,
) -> Result<Arc<ironllm_model::chat_template::ChatTemplate>, ApiError> {
    match requested {
        Some(_) if !state.config.trust_request_chat_template => Err(ApiError::bad_request(
                "Chat template is passed with request, but --trust-request-chat-template is not set. Refused request with untrusted chat template.",
            )
            .with_param("chat_template")),
        Some(src) => Ok(Arc::new(state.compile_template(src)?)),
        None => state.chat_template.clone().ok_or_else(|| {
            ApiError::bad_request(
                "As of transformers v4.44, default chat template is no longer allowed, so you must provide a chat template if the tokenizer does not define one.",
            )
        }),
    }
}

pub async fn detokenize(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let req: DetokenizeRequest = body_json(&state, body).await?;
    check_model(&state, req.model.as_deref())?;
    let ids = validate::wire_token_ids(req.tokens.as_deref().unwrap_or_default(), "tokens")?;
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= state.model.vocab_size) {
        return Err(ApiError::bad_request(format!("Token id {bad} is out of vocabulary")).with_param("tokens"));
    }
    let tok = state.tokenizer.as_ref().ok_or_else(|| ApiError::bad_request("This model has no tokenizer"))?;
    let prompt = tok.decode(&ids, false).map_err(|e| ApiError::bad_request(format!("Detokenization failed: {e}")))?;
    Ok(Json(DetokenizeResponse { prompt }).into_response())
}
