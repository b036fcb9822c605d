//! ironllm's library API.
//!
//! - [`LLM`]: the offline engine (`LLM::new(EngineArgs)`, then `generate(prompts, params)`).
//! - [`engine::Engine`]: the synchronous engine every entry point drives (request preprocessing, one
//!   engine-core step, output processing), composed of a frontend side ([`InputProcessor`],
//!   [`OutputStage`]) and an engine-core side ([`Core`], no tokenizer) that the server runs apart.
//! - [`EngineArgs`]: vLLM's engine flags and defaults.
//! - [`default_model`]: fetching and caching the default model (SmolLM2-135M-Instruct, Q4_1 GGUF).

pub mod default_model;
pub mod engine;
pub mod engine_args;
pub mod llm;

pub use engine::{Core, Engine, InputProcessor, OutputStage, ProcessedRequest, Prompt, Registration, Usage};
pub use engine_args::{Device, EngineArgs};
pub use ironllm_core::output_processor::{CompletionOutput, OutputKind, RequestOutput};
pub use ironllm_core::SamplingParams;
pub use llm::LLM;

/// Errors of the library API.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error(transparent)]
    Model(#[from] ironllm_model::ModelError),
    #[error("{0}")]
    Core(ironllm_core::CoreError),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    InvalidArgs(String),
    #[error("fetching the default model: {0}")]
    Fetch(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// The GPU backend could not start (no device, a kernel that failed to compile, out of memory).
    #[error("GPU backend: {0}")]
    Device(String),
}
