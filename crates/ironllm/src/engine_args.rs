//! Engine arguments with vLLM's names and defaults, resolved once into the configs that flow down
//! (load options, scheduler config, KV cache size). The CLI and the server fill this from flags.

use std::path::PathBuf;

use ironllm_core::spec_decode::SpeculativeConfig;
use ironllm_model::loader::{DType, GenerationConfigSource, KvCacheDType, LoadFormat};

/// `--device`: where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The GPU when one is there (a CUDA driver that reports a device), else the CPU.
    #[default]
    Auto,
    Cuda,
    Cpu,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Device::Auto),
            "cuda" | "gpu" => Ok(Device::Cuda),
            "cpu" => Ok(Device::Cpu),
            other => Err(format!("invalid device `{other}` (choose from auto, cuda, cpu)")),
        }
    }
}

/// Everything that shapes an engine, as `vllm serve` / `LLM(...)` take it.
#[derive(Debug, Clone)]
pub struct EngineArgs {
    /// A Hugging Face directory or GGUF file; `None` = the default model (fetched on first use).
    pub model: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub dtype: DType,
    pub load_format: LoadFormat,
    pub max_model_len: Option<usize>,
    /// `None` picks vLLM's default for the hardware: 1024 on a GPU of at least 70 GiB other than an A100,
    /// else 256.
    pub max_num_seqs: Option<usize>,
    /// `None` picks vLLM's default for the usage and hardware: on a GPU of at least 70 GiB other than an
    /// A100 8192 for serving and 16384 offline, else 2048 and 8192.
    pub max_num_batched_tokens: Option<usize>,
    /// Tokens of decode growth per running request that admission keeps free (ours; see
    /// `SchedulerConfig::admission_headroom_tokens`). `None`: `IRONLLM_ADMISSION_HEADROOM` if set, else
    /// the scheduler's default; `Some(0)` admits as vLLM does.
    pub admission_headroom_tokens: Option<usize>,
    pub block_size: usize,
    pub enable_prefix_caching: bool,
    pub enable_chunked_prefill: bool,
    /// KV cache size in bytes (vLLM's `--kv-cache-memory-bytes`); `None`: 4 GiB on the CPU, and on the
    /// GPU what `gpu_memory_utilization` leaves after weights and activations.
    pub kv_cache_memory_bytes: Option<usize>,
    /// `--kv-cache-dtype`: `auto` is float32 on the CPU and the model's dtype on the GPU.
    pub kv_cache_dtype: KvCacheDType,
    /// `--device`.
    pub device: Device,
    /// Fraction of the GPU's memory the engine may use in all (vLLM's `--gpu-memory-utilization`).
    pub gpu_memory_utilization: f64,
    /// `--enforce-eager`: no CUDA graphs on the GPU.
    pub enforce_eager: bool,
    /// The longest a structured-output grammar may take to compile before the request is refused.
    pub structured_outputs_compile_timeout: std::time::Duration,
    pub seed: u64,
    pub generation_config: GenerationConfigSource,
    pub max_logprobs: usize,
    pub skip_tokenizer_init: bool,
    /// `fcfs` or `priority`.
    pub scheduling_policy_priority: bool,
    /// `--speculative-config` (parsed with [`SpeculativeConfig::from_json`]); `None`: no speculation.
    pub speculative_config: Option<SpeculativeConfig>,
    /// `--async-scheduling` / `--no-async-scheduling`: plan step N+1 while step N runs. `None` (the
    /// default, as in vLLM) turns it on where it helps and is supported: the CUDA backend without
    /// speculative decoding.
    pub async_scheduling: Option<bool>,
}

impl Default for EngineArgs {
    fn default() -> Self {
        EngineArgs {
            model: None,
            tokenizer: None,
            dtype: DType::Auto,
            load_format: LoadFormat::Auto,
            max_model_len: None,
            max_num_seqs: None,
            max_num_batched_tokens: None,
            admission_headroom_tokens: None,
            block_size: 16,
            enable_prefix_caching: true,
            enable_chunked_prefill: true,
            kv_cache_memory_bytes: None,
            kv_cache_dtype: KvCacheDType::Auto,
            device: Device::Auto,
            gpu_memory_utilization: 0.9,
            enforce_eager: false,
            structured_outputs_compile_timeout: ironllm_model::structured::DEFAULT_COMPILE_TIMEOUT,
            seed: 0,
            generation_config: GenerationConfigSource::Auto,
            max_logprobs: 20,
            skip_tokenizer_init: false,
            scheduling_policy_priority: false,
            speculative_config: None,
            async_scheduling: None,
        }
    }
}

/// The CPU backend's KV cache size when none is given.
pub const DEFAULT_CPU_KV_CACHE_BYTES: usize = 4 << 30;

/// Parses sizes such as `4GiB`, `512MiB`, `2G`, `1000000`.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("invalid size `{s}`"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" | "ki" => 1024.0,
        "mib" | "mi" => 1024.0 * 1024.0,
        "gib" | "gi" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("invalid size unit `{other}` in `{s}`")),
    };
    let bytes = value * mult;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(format!("size `{s}` must be positive"));
    }
    Ok(bytes as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_bytes("2G").unwrap(), 2_000_000_000);
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert!(parse_bytes("x").is_err());
        assert!(parse_bytes("0").is_err());
    }
}
