//! `ironllm serve [MODEL]`: the OpenAI-compatible server, with `vllm serve`'s flags and defaults.
//! Engine flags are shared with the other subcommands ([`EngineFlags`]); the frontend flags live here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{ArgAction, Args};
use ironllm::default_model::DEFAULT_MODEL_NAME;
use ironllm::engine_args::parse_bytes;
use ironllm::{Engine, Usage};
use ironllm_server::ServerConfig;

use crate::args::EngineFlags;

/// Flags of `ironllm serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Model: a Hugging Face directory or a .gguf file (default: SmolLM2-135M-Instruct).
    pub model: Option<String>,
    /// Host to bind (default: every interface).
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Names the model is served under; the first is reported in responses and metrics
    /// (default: the model argument).
    #[arg(long, num_args = 1..)]
    pub served_model_name: Vec<String>,
    /// Require `Authorization: Bearer <key>` on /v1 endpoints.
    #[arg(long, env = "VLLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// A chat template (a file, or the template itself) replacing the model's.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// The role of generated chat messages.
    #[arg(long, default_value = "assistant")]
    pub response_role: String,
    /// Accept `chat_template` in requests.
    #[arg(long)]
    pub trust_request_chat_template: bool,
    /// Report cached prompt tokens in `usage.prompt_tokens_details`.
    #[arg(long)]
    pub enable_prompt_tokens_details: bool,
    /// Do not log throughput statistics every 10 seconds.
    #[arg(long)]
    pub disable_log_stats: bool,
    /// Log each request's prompt and sampling parameters.
    #[arg(long, action = ArgAction::SetTrue, overrides_with = "disable_log_requests")]
    pub enable_log_requests: bool,
    /// Do not log requests (the default; kept for compatibility).
    #[arg(long, action = ArgAction::SetTrue)]
    pub disable_log_requests: bool,
    /// Level of the HTTP access log: critical, error, warning, info, debug, trace.
    #[arg(long, default_value = "info")]
    pub uvicorn_log_level: String,
    /// Do not log one line per HTTP request.
    #[arg(long)]
    pub disable_uvicorn_access_log: bool,
    /// Seconds in-flight requests may run after SIGTERM/SIGINT before they are aborted (0: abort at
    /// once).
    #[arg(long, default_value_t = 0)]
    pub shutdown_timeout: u64,
    /// Largest accepted request body, e.g. 16MiB (HTTP 413 above it).
    #[arg(long, default_value = "16MiB")]
    pub max_request_body_bytes: String,
    #[command(flatten)]
    pub engine: EngineFlags,
}

/// vLLM's `load_chat_template`: a readable file is read; text that looks like a template is used
/// as is; anything else is an error.
fn load_chat_template(arg: &str) -> anyhow::Result<String> {
    let path = Path::new(arg);
    if path.is_file() {
        return std::fs::read_to_string(path).with_context(|| format!("reading chat template {arg}"));
    }
    if arg.contains(['{', '}', '\n']) {
        return Ok(arg.to_string());
    }
    bail!("The supplied chat template ({arg}) looks like a file path, but it failed to be opened.")
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let access_log = match args.uvicorn_log_level.as_str() {
        "trace" | "debug" | "info" => !args.disable_uvicorn_access_log,
        "warning" | "error" | "critical" => false,
        other => {
            bail!("invalid --uvicorn-log-level `{other}` (choose from critical, error, warning, info, debug, trace)")
        }
    };
    let chat_template = args.chat_template.as_deref().map(load_chat_template).transpose()?;
    let max_request_body_bytes =
        parse_bytes(&args.max_request_body_bytes).map_err(|e| anyhow::anyhow!("--max-request-body-bytes: {e}"))?;
    let engine_args = args.engine.to_engine_args(args.model.as_ref().map(PathBuf::from))?;
    let served_model_names = if args.served_model_name.is_empty() {
        vec![args.model.clone().unwrap_or_else(|| DEFAULT_MODEL_NAME.to_string())]
    } else {
        args.served_model_name.clone()
    };
    tracing::info!("Loading model {}", args.model.as_deref().unwrap_or(DEFAULT_MODEL_NAME));
    let engine = Engine::new(&engine_args, Usage::Serving)?;
    let config = ServerConfig {
        host: args.host,
        port: args.port,
        served_model_names,
        api_key: args.api_key.filter(|k| !k.is_empty()),
        chat_template,
        response_role: args.response_role,
        trust_request_chat_template: args.trust_request_chat_template,
        enable_prompt_tokens_details: args.enable_prompt_tokens_details,
        log_stats: !args.disable_log_stats,
        log_requests: args.enable_log_requests,
        access_log,
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
        max_request_body_bytes,
        priority_scheduling: engine_args.scheduling_policy_priority,
        max_logprobs: engine_args.max_logprobs,
    };
    ironllm_server::run(engine, config)?;
    Ok(())
}
