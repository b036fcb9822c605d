//! ironllm's OpenAI-compatible HTTP server, a drop-in for `vllm serve`: same endpoints, request
//! fields, response and error shapes, status codes and metric names.
//!
//! Main types:
//! - [`AsyncEngine`]: the engine core ([`ironllm::Core`]) on its own thread and the output processor
//!   (detokenization, stop strings) on a frontend thread, driven over channels; each request gets a
//!   [`async_engine::RequestStream`] of outputs, and dropping it (a client that went away) aborts the
//!   request and frees its KV blocks.
//! - [`ServerConfig`] and [`serve`]/[`run`]: the axum app on tokio, its middleware (API key, panic
//!   guard, access log) and its lifecycle (SIGINT/SIGTERM drain and abort).
//! - [`protocol`]: wire types (serde), kept apart from the engine's types; [`validate`] turns them
//!   into typed requests with messages that name the field and the bound.
//! - [`completions`] and [`chat_completions`]: the two generation endpoints, JSON and server-sent
//!   events; [`routes`]: health, version, models, metrics, tokenize, detokenize.
//! - [`metrics::Metrics`]: Prometheus metrics under vLLM's names; [`error::ApiError`]: vLLM's error
//!   body and status codes.
//!
//! Only this crate knows HTTP and JSON; it never touches tensors or the scheduler directly.

pub mod async_engine;
pub mod chat;
pub mod chat_completions;
pub mod completions;
pub mod error;
pub mod generate;
pub mod logprobs;
pub mod metrics;
pub mod protocol;
pub mod routes;
pub mod server;
pub mod structured;
pub mod validate;

pub use async_engine::{AsyncEngine, EngineRequest};
pub use error::{ApiError, ServerError};
pub use server::{router, run, serve, AppState, ServerConfig};
