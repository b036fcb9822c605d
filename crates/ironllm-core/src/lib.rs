//! The engine core of ironllm: everything between "a validated request arrived" and "these tokens were
//! produced", with no tensors and no HTTP.
//!
//! Main types:
//! - [`SamplingParams`]: vLLM's sampling parameters, validated once at the edge.
//! - [`request::Request`]: one sequence's state (prompt, outputs, computed tokens, status, blocks).
//! - [`block_pool::BlockPool`] and [`kv_cache_manager::KvCacheManager`]: fixed-size KV blocks with
//!   reference counts and automatic prefix caching.
//! - [`scheduler::Scheduler`]: re-plans every step under a token budget (continuous batching, chunked
//!   prefill, preemption by recompute) and produces a [`outputs::SchedulerOutput`].
//! - [`executor::ModelExecutor`]: the one seam to the model side (forward + sample for a planned step).
//! - [`engine::EngineCore`]: schedule, execute, update — one step, used by every entry point.
//! - [`spec_decode`]: the speculative config, the per-request draft gate, acceptance counters.
//! - [`structured`]: a request's structured-output constraint and the grammar seam the runner uses.
//! - [`detokenizer::IncrementalDetokenizer`] and [`output_processor`]: text, stop strings, deltas.

pub mod block_pool;
pub mod detokenizer;
pub mod engine;
pub mod error;
pub mod executor;
pub mod kv_cache_manager;
pub mod ngram_proposer;
pub mod output_processor;
pub mod outputs;
pub mod request;
pub mod sampling_params;
pub mod scheduler;
pub mod spec_decode;
pub mod structured;
pub mod testing;

pub use engine::EngineCore;
pub use error::CoreError;
pub use request::{Request, RequestStatus};
pub use sampling_params::SamplingParams;
pub use scheduler::{Scheduler, SchedulerConfig, SchedulerStats, SchedulingPolicy};
