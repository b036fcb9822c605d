//! The server: configuration, shared state, the router with its middleware (API key, access log,
//! panic guard, OpenAI-shaped 404/405), the start-up summary, and the lifecycle —
//! SIGINT/SIGTERM stop accepting, abort in-flight requests (at once, or after
//! `--shutdown-timeout` seconds of draining), stop the engine thread and return.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::FutureExt;
use ironllm::{Engine, SamplingParams};
use ironllm_model::chat_template::ChatTemplate;
use ironllm_model::tokenizer::Tokenizer;
use tokio::sync::watch;

use crate::async_engine::{AsyncEngine, AsyncEngineOptions};
use crate::error::{ApiError, ServerError};
use crate::metrics::{Metrics, StatsLogger};
use crate::{chat_completions, completions, routes};

/// How often the throughput line is logged (vLLM's default interval).
const STATS_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Everything `ironllm serve` configures beside the engine.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to bind; `None` binds every interface.
    pub host: Option<String>,
    pub port: u16,
    /// Names the model answers to; the first is reported in responses and metrics.
    pub served_model_names: Vec<String>,
    /// When set, `/v1/*` requires `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// A chat template that replaces the model's (`--chat-template`, already read).
    pub chat_template: Option<String>,
    /// The role of generated messages (`--response-role`).
    pub response_role: String,
    /// Accept a `chat_template` in requests.
    pub trust_request_chat_template: bool,
    /// Report `usage.prompt_tokens_details.cached_tokens`.
    pub enable_prompt_tokens_details: bool,
    /// Log throughput every 10 s.
    pub log_stats: bool,
    /// Log each request's prompt and parameters.
    pub log_requests: bool,
    /// Log one line per HTTP request.
    pub access_log: bool,
    /// Zero aborts in-flight requests at SIGTERM/SIGINT; otherwise they may run this long first.
    pub shutdown_timeout: Duration,
    pub max_request_body_bytes: usize,
    /// `--scheduling-policy priority` (a request's `priority` is refused otherwise).
    pub priority_scheduling: bool,
    /// `--max-logprobs`.
    pub max_logprobs: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: None,
            port: 8000,
            served_model_names: Vec::new(),
            api_key: None,
            chat_template: None,
            response_role: "assistant".into(),
            trust_request_chat_template: false,
            enable_prompt_tokens_details: false,
            log_stats: true,
            log_requests: false,
            access_log: true,
            shutdown_timeout: Duration::ZERO,
            max_request_body_bytes: 16 << 20,
            priority_scheduling: false,
            max_logprobs: 20,
        }
    }
}

/// Facts about the served model the handlers need.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub served_names: Vec<String>,
    /// The model path (`root` in `/v1/models`).
    pub root: String,
    pub max_model_len: usize,
    pub vocab_size: usize,
    /// The generation config's `max_new_tokens`, capping the default `max_tokens`.
    pub default_max_new_tokens: Option<usize>,
    pub created: u64,
}

/// State shared by every handler.
pub struct AppState {
    pub engine: AsyncEngine,
    pub metrics: Arc<Metrics>,
    pub model: ModelInfo,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub chat_template: Option<Arc<ChatTemplate>>,
    /// vLLM's defaults with the model's generation config applied.
    pub default_params: SamplingParams,
    pub config: ServerConfig,
}

impl AppState {
    /// The name responses and metrics report.
    pub fn model_name(&self) -> &str {
        &self.model.served_names[0]
    }

    /// Compiles a template with this model's special tokens.
    pub fn compile_template(&self, source: &str) -> Result<ChatTemplate, ApiError> {
        let (bos, eos) = match &self.tokenizer {
            Some(t) => (t.bos_token().map(str::to_string), t.eos_token().map(str::to_string)),
            None => (None, None),
        };
        ChatTemplate::new(source, bos, eos)
            .map_err(|e| ApiError::bad_request(e.to_string()).with_param("chat_template"))
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A random 32-hex-digit id (vLLM's `random_uuid`).
pub fn random_uuid() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let mut halves = [0u64; 2];
    for (i, h) in halves.iter_mut().enumerate() {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(count);
        hasher.write_u128(nanos);
        hasher.write_usize(i);
        *h = hasher.finish();
    }
    format!("{:016x}{:016x}", halves[0], halves[1])
}

/// Takes ownership of a loaded engine and prepares everything the handlers share; starts the
/// engine thread.
pub fn build_state(engine: Engine, config: ServerConfig) -> Result<Arc<AppState>, ServerError> {
    if config.served_model_names.is_empty() {
        return Err(ServerError::Config("at least one served model name is needed".into()));
    }
    let info = engine.info().clone();
    let tokenizer = engine.tokenizer().cloned();
    let template_source = config.chat_template.clone().or_else(|| engine.chat_template().map(str::to_string));
    let chat_template = match template_source {
        Some(src) => {
            let (bos, eos) = match &tokenizer {
                Some(t) => (t.bos_token().map(str::to_string), t.eos_token().map(str::to_string)),
                None => (None, None),
            };
            Some(Arc::new(ChatTemplate::new(&src, bos, eos).map_err(|e| ServerError::ChatTemplate(e.to_string()))?))
        }
        None => None,
    };
    let generation = engine.generation_defaults().clone();
    let overrides = generation.describe();
    if overrides != "{}" {
        tracing::info!(
            "Default sampling parameters have been overridden by the model's generation config: {overrides}. If this is not intended, relaunch with `--generation-config vllm`."
        );
    }
    let default_params = engine.default_sampling_params();
    let model = ModelInfo {
        served_names: config.served_model_names.clone(),
        root: info.model_path.clone(),
        max_model_len: info.max_model_len,
        vocab_size: info.config.vocab_size,
        default_max_new_tokens: generation.max_new_tokens,
        created: unix_now(),
    };
    let metrics = Arc::new(Metrics::new(&model.served_names[0], info.max_model_len));
    // The engine core goes to the engine thread; input and output processing stay on this side.
    let (input, output, core) = engine.into_parts();
    let options = AsyncEngineOptions { log_requests: config.log_requests };
    let engine = AsyncEngine::start(input, output, core, metrics.clone(), options);
    Ok(Arc::new(AppState { engine, metrics, model, tokenizer, chat_template, default_params, config }))
}

/// The HTTP routes and middleware.
pub fn router(state: Arc<AppState>) -> Router {
    let mut app = Router::new()
        .route("/health", get(routes::health))
        .route("/ping", get(routes::health).post(routes::health))
        .route("/version", get(routes::version))
        .route("/metrics", get(routes::metrics))
        .route("/v1/models", get(routes::models))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .route("/v1/completions", post(completions::create_completion))
        .route("/v1/chat/completions", post(chat_completions::create_chat_completion))
        .fallback(|| async { ApiError::not_found_route() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn(catch_panic));
    if state.config.access_log {
        app = app.layer(middleware::from_fn(access_log));
    }
    app.with_state(state)
}

/// `/v1/*` needs the API key when one is configured (vLLM leaves `/health`, `/metrics`, ... open).
async fn authenticate(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        if req.method() != Method::OPTIONS && req.uri().path().starts_with("/v1") {
            let expected = format!("Bearer {key}");
            let given = req.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes).unwrap_or_default();
            if !constant_time_eq(given, expected.as_bytes()) {
                return ApiError::unauthorized().into_response();
            }
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A panic in a handler answers 500 instead of dropping the connection.
async fn catch_panic(req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    match AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(resp) => resp,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!("handler for {path} panicked: {msg}");
            ApiError::internal("Internal server error").into_response()
        }
    }
}

/// One line per request, as uvicorn's access log prints it.
async fn access_log(req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.to_string()).unwrap_or_else(|| "-".into());
    let line = format!("{peer} - \"{} {} {:?}\"", req.method(), req.uri(), req.version());
    let resp = next.run(req).await;
    let status = resp.status();
    tracing::info!("{line} {} {}", status.as_u16(), status.canonical_reason().unwrap_or(""));
    resp
}

/// One line with what is served where, after the engine's own load and KV-capacity lines.
fn log_startup_summary(state: &AppState, engine_info: &ironllm::engine::EngineInfo) {
    tracing::info!(
        "Serving model {} ({}) on device {}: max_model_len {}, KV cache {} tokens ({}), maximum concurrency for {} tokens per request: {:.2}x",
        state.model_name(),
        engine_info.model_path,
        engine_info.device,
        engine_info.max_model_len,
        engine_info.kv_capacity_tokens,
        engine_info.kv_cache_dtype,
        engine_info.max_model_len,
        engine_info.max_concurrency()
    );
    if state.chat_template.is_none() {
        tracing::warn!("The model has no chat template and none was given with --chat-template: /v1/chat/completions will refuse requests");
    }
}

/// Resolves when SIGINT or SIGTERM arrives.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Serves until SIGINT/SIGTERM, then shuts down gracefully.
pub async fn serve(engine: Engine, config: ServerConfig) -> Result<(), ServerError> {
    let engine_info = engine.info().clone();
    let state = build_state(engine, config)?;
    log_startup_summary(&state, &engine_info);

    let host = state.config.host.clone().unwrap_or_else(|| "0.0.0.0".into());
    let addr = if host.contains(':') {
        format!("[{host}]:{}", state.config.port)
    } else {
        format!("{host}:{}", state.config.port)
    };
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(source) => {
            let s = state.clone();
            let _ = tokio::task::spawn_blocking(move || s.engine.shutdown()).await;
            return Err(ServerError::Bind { addr, source });
        }
    };
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or(addr);
    tracing::info!("Starting ironllm API server on http://{local}");
    tracing::info!(
        "Available routes are: /health, /ping, /version, /metrics, /v1/models, /tokenize, /detokenize, /v1/completions, /v1/chat/completions"
    );

    if state.config.log_stats {
        let s = state.clone();
        tokio::spawn(async move {
            let mut logger = StatsLogger::new(&s.metrics);
            let mut tick = tokio::time::interval(STATS_LOG_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                logger.log(&s.metrics);
            }
        });
    }

    // One watch channel fans the signal out: stop accepting connections, and drain/abort requests.
    let (signal_tx, signal_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("Shutting down: no new requests are accepted");
        let _ = signal_tx.send(true);
        // A second signal quits at once, as uvicorn does.
        shutdown_signal().await;
        tracing::warn!("Second shutdown signal: exiting immediately");
        std::process::exit(1);
    });
    let drain_state = state.clone();
    let mut drain_rx = signal_rx.clone();
    tokio::spawn(async move {
        if drain_rx.wait_for(|v| *v).await.is_err() {
            return;
        }
        drain_state.engine.stop_accepting();
        let timeout = drain_state.config.shutdown_timeout;
        if !timeout.is_zero() {
            let deadline = tokio::time::Instant::now() + timeout;
            while drain_state.engine.num_live_requests() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let left = drain_state.engine.num_live_requests();
        if left > 0 {
            tracing::info!("Aborting {left} in-flight request(s)");
        }
        drain_state.engine.abort_all();
    });

    let mut graceful_rx = signal_rx.clone();
    let server = axum::serve(listener, router(state.clone()).into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move {
            let _ = graceful_rx.wait_for(|v| *v).await;
        });
    // Connections that do not close after the drain are cut off.
    let hard_limit = state.config.shutdown_timeout + Duration::from_secs(10);
    let mut limit_rx = signal_rx.clone();
    let result = tokio::select! {
        r = server => r.map_err(ServerError::Serve),
        _ = async move {
            let _ = limit_rx.wait_for(|v| *v).await;
            tokio::time::sleep(hard_limit).await;
        } => {
            tracing::warn!("Connections still open {} s after shutdown began; closing them", hard_limit.as_secs());
            Ok(())
        }
    };
    let s = state.clone();
    let _ = tokio::task::spawn_blocking(move || s.engine.shutdown()).await;
    tracing::info!("Server stopped");
    result
}

/// Runs [`serve`] on a new multi-threaded runtime (for binaries without their own runtime).
pub fn run(engine: Engine, config: ServerConfig) -> Result<(), ServerError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ironllm-http")
        .build()
        .map_err(ServerError::Runtime)?;
    runtime.block_on(serve(engine, config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::async_engine::fake::{self, ScriptedModel};
    use crate::async_engine::{EngineEvent, EngineRequest};
    use axum::http::StatusCode;
    use std::time::Instant;

    fn state_with(model: ScriptedModel) -> Arc<AppState> {
        let metrics = Arc::new(Metrics::new("m", 64));
        Arc::new(AppState {
            engine: fake::start(model, None, metrics.clone()),
            metrics,
            model: ModelInfo {
                served_names: vec!["m".into()],
                root: "/m".into(),
                max_model_len: 64,
                vocab_size: 100,
                default_max_new_tokens: None,
                created: 0,
            },
            tokenizer: None,
            chat_template: None,
            default_params: SamplingParams::default(),
            config: ServerConfig { served_model_names: vec!["m".into()], ..ServerConfig::default() },
        })
    }

    #[test]
    fn health_turns_503_when_the_engine_dies() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let state = state_with(ScriptedModel { panic_on_step: true, ..Default::default() });
        rt.block_on(async {
            assert_eq!(routes::health(State(state.clone())).await.status(), StatusCode::OK);
            let request = EngineRequest {
                request_id: "r".into(),
                prompt_token_ids: vec![1],
                params: SamplingParams::greedy(2),
                output_kind: ironllm::OutputKind::Delta,
                priority: 0,
                arrival: Instant::now(),
            };
            let mut stream = state.engine.add_request(request).await.unwrap();
            assert!(matches!(stream.next().await, Some(EngineEvent::Failed(_))));
            for _ in 0..200 {
                if !state.engine.is_alive() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(routes::health(State(state.clone())).await.status(), StatusCode::SERVICE_UNAVAILABLE);
        });
        state.engine.shutdown();
    }

    #[test]
    fn uuids_are_distinct_hex() {
        let a = random_uuid();
        let b = random_uuid();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"Bearer k", b"Bearer k"));
        assert!(!constant_time_eq(b"Bearer x", b"Bearer k"));
        assert!(!constant_time_eq(b"Bearer", b"Bearer k"));
    }
}
