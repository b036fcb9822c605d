//! Engine flags with vLLM's names and defaults, shared by every subcommand, resolved once into
//! [`ironllm::EngineArgs`].

use std::path::PathBuf;

use anyhow::Context;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{ArgAction, Args};
use ironllm::engine_args::parse_bytes;
use ironllm::{Device, EngineArgs};
use ironllm_core::spec_decode::SpeculativeConfig;
use ironllm_model::loader::{GenerationConfigSource, KvCacheDType};

/// Flags that shape the engine (vLLM's `EngineArgs`).
#[derive(Debug, Clone, Args)]
pub struct EngineFlags {
    /// Tokenizer directory or tokenizer.json (default: the model's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Data type: auto, half, float16, bfloat16, float, float32. On the CPU, `auto` keeps GGUF weights
    /// quantized; `float32` dequantizes them.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Device: auto, cpu, cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// auto, safetensors, gguf or dummy (random weights of the config's shapes).
    #[arg(long, default_value = "auto")]
    pub load_format: String,
    /// Context length (default: the model's).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Maximum sequences per step (default, as vLLM: 1024 on a GPU of at least 70 GiB other than an A100,
    /// else 256).
    #[arg(long)]
    pub max_num_seqs: Option<usize>,
    /// Token budget per step (default, as vLLM: 16384 offline and 8192 serving on a GPU of at least 70 GiB
    /// other than an A100, else 8192 and 2048).
    #[arg(long)]
    pub max_num_batched_tokens: Option<usize>,
    /// Tokens per KV cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Automatic prefix caching (on by default).
    #[arg(long, action = ArgAction::SetTrue, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    #[arg(long, action = ArgAction::SetTrue)]
    pub no_enable_prefix_caching: bool,
    /// Chunked prefill (on by default).
    #[arg(long, action = ArgAction::SetTrue, overrides_with = "no_enable_chunked_prefill")]
    pub enable_chunked_prefill: bool,
    #[arg(long, action = ArgAction::SetTrue)]
    pub no_enable_chunked_prefill: bool,
    /// KV cache size, e.g. 4GiB. Default: 4GiB on the CPU; on the GPU, what --gpu-memory-utilization
    /// leaves after the weights and the profiled activations.
    #[arg(long, alias = "kv-cache-memory", env = "IRONLLM_KV_CACHE_MEMORY")]
    pub kv_cache_memory_bytes: Option<String>,
    /// KV cache element type: auto (float32 on the CPU, the model's dtype on the GPU), float16 (half),
    /// bfloat16, float32 (float). vLLM's fp8 names are accepted but not supported yet. A 2-byte type
    /// fits twice the tokens in the same --kv-cache-memory-bytes.
    #[arg(long, default_value = "auto", value_parser = kv_cache_dtype_parser())]
    pub kv_cache_dtype: KvCacheDType,
    /// Fraction of GPU memory the engine may use in all (GPU backend; accepted on the CPU).
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// Run the GPU eagerly (no CUDA graphs).
    #[arg(long)]
    pub enforce_eager: bool,
    /// Seconds a structured-output grammar (JSON schema, regex, choice, Lark) may take to compile.
    #[arg(long, default_value_t = 10.0)]
    pub structured_outputs_compile_timeout: f64,
    /// Seed for requests that bring none.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `auto` (the model's generation_config.json), `vllm` (vLLM's defaults) or a directory.
    #[arg(long, default_value = "auto")]
    pub generation_config: String,
    /// Maximum `logprobs` / `prompt_logprobs` a request may ask for.
    #[arg(long, default_value_t = 20)]
    pub max_logprobs: usize,
    /// fcfs or priority.
    #[arg(long, default_value = "fcfs")]
    pub scheduling_policy: String,
    /// Speculative decoding, as a JSON object with vLLM's keys, e.g.
    /// '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}' or
    /// '{"method": "draft_model", "model": "/path/to/draft", "num_speculative_tokens": 3}'.
    /// Methods: ngram (prompt lookup; prompt_lookup_min/max, default 5) and draft_model.
    /// Off when absent.
    #[arg(long, value_name = "JSON")]
    pub speculative_config: Option<String>,
    /// Plan the next step while the current one runs, hiding host work behind the device (vLLM's
    /// `--async-scheduling`). Default: on with --device cuda unless --speculative-config is given, off
    /// on the CPU. Not with --speculative-config.
    #[arg(long, action = ArgAction::SetTrue, overrides_with = "no_async_scheduling")]
    pub async_scheduling: bool,
    #[arg(long, action = ArgAction::SetTrue)]
    pub no_async_scheduling: bool,
}

/// `--kv-cache-dtype`: one of [`KvCacheDType::NAMES`], so an unknown value is a clap error that lists
/// them (and `--help` does too).
fn kv_cache_dtype_parser() -> impl TypedValueParser<Value = KvCacheDType> {
    PossibleValuesParser::new(KvCacheDType::NAMES).try_map(|name| name.parse::<KvCacheDType>())
}

impl EngineFlags {
    /// Resolves the flags into engine arguments.
    pub fn to_engine_args(&self, model: Option<PathBuf>) -> anyhow::Result<EngineArgs> {
        let device: Device = self.device.parse().map_err(anyhow::Error::msg)?;
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            anyhow::bail!("--gpu-memory-utilization must be in (0, 1], got {}", self.gpu_memory_utilization);
        }
        let policy_priority = match self.scheduling_policy.as_str() {
            "fcfs" => false,
            "priority" => true,
            other => anyhow::bail!("invalid --scheduling-policy `{other}` (choose from fcfs, priority)"),
        };
        let generation_config = match self.generation_config.as_str() {
            "auto" => GenerationConfigSource::Auto,
            "vllm" => GenerationConfigSource::Vllm,
            dir => GenerationConfigSource::Dir(PathBuf::from(dir)),
        };
        // Parsed here, before any model loads, so a bad config fails the command at once.
        let speculative_config = self
            .speculative_config
            .as_deref()
            .map(SpeculativeConfig::from_json)
            .transpose()
            .context("invalid --speculative-config")?;
        Ok(EngineArgs {
            model,
            tokenizer: self.tokenizer.clone(),
            dtype: self.dtype.parse().map_err(anyhow::Error::msg)?,
            load_format: self.load_format.parse().map_err(anyhow::Error::msg)?,
            max_model_len: self.max_model_len,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            // IRONLLM_ADMISSION_HEADROOM or the scheduler's default (no vLLM flag to mirror).
            admission_headroom_tokens: None,
            block_size: self.block_size,
            enable_prefix_caching: !self.no_enable_prefix_caching,
            enable_chunked_prefill: !self.no_enable_chunked_prefill,
            kv_cache_memory_bytes: self
                .kv_cache_memory_bytes
                .as_deref()
                .map(parse_bytes)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--kv-cache-memory-bytes: {e}"))?,
            kv_cache_dtype: self.kv_cache_dtype,
            device,
            gpu_memory_utilization: self.gpu_memory_utilization,
            enforce_eager: self.enforce_eager,
            structured_outputs_compile_timeout: std::time::Duration::try_from_secs_f64(
                self.structured_outputs_compile_timeout,
            )
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                anyhow::anyhow!("--structured-outputs-compile-timeout must be a positive number of seconds")
            })?,
            seed: self.seed,
            generation_config,
            max_logprobs: self.max_logprobs,
            skip_tokenizer_init: false,
            scheduling_policy_priority: policy_priority,
            speculative_config,
            async_scheduling: match (self.async_scheduling, self.no_async_scheduling) {
                (true, _) => Some(true),
                (false, true) => Some(false),
                (false, false) => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use ironllm_core::spec_decode::SpeculativeMethod;

    use super::*;

    /// The flags as a command line would give them.
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        engine: EngineFlags,
    }

    fn engine_args(argv: &[&str]) -> anyhow::Result<EngineArgs> {
        let cli = Cli::try_parse_from(std::iter::once("ironllm").chain(argv.iter().copied()))?;
        cli.engine.to_engine_args(None)
    }

    #[test]
    fn speculative_config_is_off_by_default() {
        let args = engine_args(&[]).expect("default flags resolve");
        assert_eq!(args.speculative_config, None);
    }

    #[test]
    fn speculative_config_parses_vllm_json() {
        let args = engine_args(&[
            "--speculative-config",
            r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}"#,
        ])
        .expect("a valid ngram config resolves");
        let config = args.speculative_config.expect("speculation is on");
        assert_eq!(config.num_speculative_tokens, 4);
        assert_eq!(config.method, SpeculativeMethod::Ngram { prompt_lookup_min: 4, prompt_lookup_max: 4 });
    }

    #[test]
    fn async_scheduling_is_auto_unless_a_flag_says_otherwise() {
        let flag = |argv: &[&str]| engine_args(argv).expect("valid flags").async_scheduling;
        assert_eq!(flag(&[]), None);
        assert_eq!(flag(&["--async-scheduling"]), Some(true));
        assert_eq!(flag(&["--no-async-scheduling"]), Some(false));
        // The last of the pair wins, as with vLLM's boolean flags.
        assert_eq!(flag(&["--async-scheduling", "--no-async-scheduling"]), Some(false));
        assert_eq!(flag(&["--no-async-scheduling", "--async-scheduling"]), Some(true));
    }

    #[test]
    fn kv_cache_dtype_takes_vllm_names_and_aliases() {
        assert_eq!(engine_args(&[]).expect("defaults").kv_cache_dtype, KvCacheDType::Auto);
        for (flag, want) in [
            ("float16", KvCacheDType::Float16),
            ("half", KvCacheDType::Float16),
            ("bfloat16", KvCacheDType::BFloat16),
            ("float", KvCacheDType::Float32),
            ("fp8_e4m3", KvCacheDType::Fp8("fp8_e4m3")),
        ] {
            let args = engine_args(&["--kv-cache-dtype", flag]).expect(flag);
            assert_eq!(args.kv_cache_dtype, want, "{flag}");
        }
        let message = engine_args(&["--kv-cache-dtype", "int4"]).expect_err("not a dtype").to_string();
        assert!(message.contains("--kv-cache-dtype") && message.contains("int4"), "{message}");
        assert!(message.contains("bfloat16") && message.contains("fp8_e5m2"), "{message}");
    }

    #[test]
    fn bad_speculative_config_names_the_flag_and_the_reason() {
        for (json, reason) in [
            (r#"{"method": "eagle", "num_speculative_tokens": 2}"#, "eagle"),
            ("{not json", "not valid JSON"),
            (r#"{"method": "ngram"}"#, "num_speculative_tokens"),
        ] {
            let err = engine_args(&["--speculative-config", json]).expect_err(json);
            // `{:#}` is how `main` prints errors: the context, then the cause.
            let message = format!("{err:#}");
            assert!(message.contains("--speculative-config"), "{message}");
            assert!(message.contains(reason), "{message}");
        }
    }
}
