//! Models for ironllm: configuration, weight loading (Hugging Face safetensors directories, GGUF files,
//! dummy weights), tokenizers and chat templates, the Llama-family architecture, the batch sampler and
//! the CPU model runner.
//!
//! Main types: [`config::ModelConfig`] (resolved hyper-parameters), [`weights::WeightSource`] (tensors by
//! Hugging Face name from any format), [`llama::LlamaModel`] (the forward pass over a flattened batch),
//! [`sampler::Sampler`], [`runner::CpuModelRunner`] (implements the core's `ModelExecutor`) and
//! [`loader`] (resolve a path into a ready model, tokenizer and generation defaults).

pub mod chat_template;
pub mod config;
pub mod error;
pub mod generation_config;
pub mod gguf;
pub mod linear;
pub mod llama;
pub mod loader;
mod profile;
pub mod proposer;
pub mod runner;
pub mod runner_state;
pub mod sampler;
pub mod structured;
pub mod tokenizer;
pub mod weights;

pub use error::ModelError;
