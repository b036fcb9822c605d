//! Plumbing both generation endpoints share: submitting a request's prompts to the engine,
//! accumulating outputs for a non-streaming answer, merging the streams of several prompts, and
//! server-sent events.
//!
//! A streaming response is produced by a task that writes SSE frames into a bounded channel the
//! HTTP body reads from. When the client goes away the body — and so the channel's receiver — is
//! dropped; the task sees the channel close, stops, and drops its [`RequestStream`]s, which aborts
//! the requests in the engine and frees their KV blocks.

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::Response;
use futures_util::stream::{self, BoxStream, SelectAll};
use futures_util::{FutureExt, Stream, StreamExt};
use ironllm::RequestOutput;
use ironllm_core::outputs::{FinishReason, PositionLogprobs, StopReason};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::async_engine::{EngineError, EngineEvent, EngineRequest, RequestStream};
use crate::error::ApiError;
use crate::server::AppState;

/// The client-facing error for an engine refusal.
pub fn engine_error(e: EngineError) -> ApiError {
    match e {
        EngineError::InvalidRequest(msg) => ApiError::bad_request(msg),
        EngineError::Dead | EngineError::ShuttingDown => ApiError::unavailable(e.to_string()),
    }
}

/// Adds one engine request per prompt. If one is refused, those already added are aborted (their
/// streams are dropped) and the refusal is returned.
pub async fn add_all(state: &AppState, requests: Vec<EngineRequest>) -> Result<Vec<RequestStream>, ApiError> {
    let mut streams = Vec::with_capacity(requests.len());
    for r in requests {
        streams.push(state.engine.add_request(r).await.map_err(engine_error)?);
    }
    Ok(streams)
}

/// One sequence's output so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeqAccum {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<PositionLogprobs>,
    pub finish_reason: Option<FinishReason>,
    pub stop_reason: Option<StopReason>,
}

/// One prompt's outputs so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestAccum {
    pub seqs: Vec<SeqAccum>,
    pub prompt_token_ids: Vec<u32>,
    pub prompt_logprobs: Option<Vec<Option<PositionLogprobs>>>,
    pub num_cached_tokens: usize,
}

impl RequestAccum {
    /// Applies an output: deltas are appended; cumulative outputs (used for `best_of`, whose final
    /// output keeps only the best `n`, renumbered) replace what was there.
    pub fn apply(&mut self, out: RequestOutput, cumulative: bool) {
        if out.prompt_logprobs.is_some() {
            self.prompt_logprobs = out.prompt_logprobs;
        }
        self.prompt_token_ids = out.prompt_token_ids;
        self.num_cached_tokens = self.num_cached_tokens.max(out.num_cached_tokens);
        if cumulative {
            self.seqs.clear();
        }
        for o in out.outputs {
            if self.seqs.len() <= o.index {
                self.seqs.resize(o.index + 1, SeqAccum::default());
            }
            let seq = &mut self.seqs[o.index];
            seq.text.push_str(&o.text);
            seq.token_ids.extend_from_slice(&o.token_ids);
            seq.logprobs.extend(o.logprobs.unwrap_or_default());
            if o.finish_reason.is_some() {
                seq.finish_reason = o.finish_reason;
                seq.stop_reason = o.stop_reason;
            }
        }
    }

    pub fn num_generated_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.token_ids.len()).sum()
    }
}

/// `stop_reason` as vLLM reports it: the stop string, the stop token id, or null (EOS, length).
pub fn stop_reason_json(r: Option<&StopReason>) -> Option<Value> {
    match r {
        Some(StopReason::String(s)) => Some(Value::String(s.clone())),
        Some(StopReason::TokenId(id)) => Some(Value::from(*id)),
        Some(StopReason::Eos) | None => None,
    }
}

pub fn finish_reason_str(r: Option<FinishReason>) -> Option<String> {
    r.map(|r| r.as_str().to_string())
}

/// Every prompt's events in arrival order, tagged with the prompt's index.
pub fn merge(streams: Vec<RequestStream>) -> SelectAll<BoxStream<'static, (usize, EngineEvent)>> {
    stream::select_all(
        streams
            .into_iter()
            .enumerate()
            .map(|(i, s)| stream::unfold(s, move |mut s| async move { s.next().await.map(|ev| ((i, ev), s)) }).boxed()),
    )
}

/// Waits for every prompt to finish (non-streaming). An engine failure is HTTP 500.
pub async fn collect_all(streams: Vec<RequestStream>, cumulative: bool) -> Result<Vec<RequestAccum>, ApiError> {
    let mut accums = vec![RequestAccum::default(); streams.len()];
    let mut merged = merge(streams);
    while let Some((i, ev)) = merged.next().await {
        match ev {
            EngineEvent::Output(out) => accums[i].apply(out, cumulative),
            EngineEvent::Failed(msg) => return Err(ApiError::internal(msg)),
        }
    }
    Ok(accums)
}

/// Why a streaming producer stopped early: the client went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientGone;

/// Writes server-sent events.
#[derive(Clone)]
pub struct SseSender {
    tx: mpsc::Sender<Bytes>,
}

impl SseSender {
    /// Sends `data: <json>\n\n`.
    pub async fn data<T: Serialize>(&self, value: &T) -> Result<(), ClientGone> {
        let json =
            serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\": \"serialization failed: {e}\"}}"));
        self.tx.send(Bytes::from(format!("data: {json}\n\n"))).await.map_err(|_| ClientGone)
    }

    /// Sends an error event in vLLM's shape.
    pub async fn error(&self, e: &ApiError) -> Result<(), ClientGone> {
        self.data(&e.body()).await
    }

    /// Sends `data: [DONE]\n\n`.
    pub async fn done(&self) -> Result<(), ClientGone> {
        self.tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await.map_err(|_| ClientGone)
    }
}

/// A `text/event-stream` response fed by `produce`, which runs as its own task and is dropped as
/// soon as the client disconnects. A panic in it ends the stream with an error event.
pub fn sse_response<F, Fut>(produce: F) -> Response
where
    F: FnOnce(SseSender) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let watcher = SseSender { tx: tx.clone() };
    let fut = produce(SseSender { tx });
    tokio::spawn(async move {
        tokio::select! {
            _ = watcher.tx.closed() => {}
            result = AssertUnwindSafe(fut).catch_unwind() => {
                if result.is_err() {
                    tracing::error!("a streaming response task panicked");
                    let _ = watcher.error(&ApiError::internal("Internal server error")).await;
                    let _ = watcher.done().await;
                }
            }
        }
    });
    let body: Pin<Box<dyn Stream<Item = Result<Bytes, Infallible>> + Send>> =
        Box::pin(stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok(b), rx)) }));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// Runs CPU-bound request preparation (chat templates, tokenization) off the async threads.
pub async fn blocking<T: Send + 'static>(
    state: &Arc<AppState>,
    f: impl FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let s = state.clone();
    tokio::task::spawn_blocking(move || f(&s))
        .await
        .map_err(|e| ApiError::internal(format!("request preparation failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironllm::CompletionOutput;

    fn out(index: usize, text: &str, ids: &[u32], finish: Option<FinishReason>) -> RequestOutput {
        RequestOutput {
            request_id: "r".into(),
            prompt_token_ids: vec![1, 2],
            prompt_logprobs: None,
            outputs: vec![CompletionOutput {
                index,
                text: text.into(),
                token_ids: ids.to_vec(),
                cumulative_logprob: None,
                logprobs: None,
                finish_reason: finish,
                stop_reason: None,
            }],
            finished: finish.is_some(),
            num_cached_tokens: 0,
        }
    }

    #[test]
    fn deltas_accumulate_per_index() {
        let mut a = RequestAccum::default();
        a.apply(out(1, "b", &[5], None), false);
        a.apply(out(0, "a", &[4], None), false);
        a.apply(out(1, "c", &[6], Some(FinishReason::Length)), false);
        assert_eq!(a.seqs[1].text, "bc");
        assert_eq!(a.seqs[1].token_ids, vec![5, 6]);
        assert_eq!(a.seqs[1].finish_reason, Some(FinishReason::Length));
        assert_eq!(a.num_generated_tokens(), 3);
    }

    #[test]
    fn cumulative_outputs_replace() {
        let mut a = RequestAccum::default();
        a.apply(out(0, "ab", &[4, 5], None), true);
        a.apply(out(0, "abc", &[4, 5, 6], Some(FinishReason::Stop)), true);
        assert_eq!(a.seqs.len(), 1);
        assert_eq!(a.seqs[0].text, "abc");
    }

    #[test]
    fn stop_reasons_as_vllm_reports_them() {
        assert_eq!(stop_reason_json(Some(&StopReason::String("x".into()))), Some(Value::String("x".into())));
        assert_eq!(stop_reason_json(Some(&StopReason::TokenId(7))), Some(Value::from(7)));
        assert_eq!(stop_reason_json(Some(&StopReason::Eos)), None);
    }
}
