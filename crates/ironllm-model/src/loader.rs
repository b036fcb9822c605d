//! Resolves what the user named (a Hugging Face model directory, a GGUF file, or a config directory with
//! `--load-format dummy`) into a ready model, its tokenizer, chat template and generation defaults.
//! A hub downloader would slot in before [`load`] by turning a repository id into a local directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ironllm_kernels::cpu::attention::KvDType;

use crate::config::ModelConfig;
use crate::generation_config::GenerationDefaults;
use crate::gguf::GgufFile;
use crate::llama::LlamaModel;
use crate::tokenizer::Tokenizer;
use crate::weights::{DummySource, GgufSource, SafetensorsSource, WeightSource};
use crate::ModelError;

/// `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DType {
    #[default]
    Auto,
    Float32,
    BFloat16,
    Float16,
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DType::Auto),
            "float32" | "float" => Ok(DType::Float32),
            "bfloat16" => Ok(DType::BFloat16),
            "float16" | "half" => Ok(DType::Float16),
            other => {
                Err(format!("invalid dtype `{other}` (choose from auto, half, float16, bfloat16, float, float32)"))
            }
        }
    }
}

/// `--kv-cache-dtype`: the element type of the KV cache. vLLM's values (`auto`, `bfloat16`, and the fp8
/// formats, which ironllm accepts on the command line as vLLM does and refuses at start-up) plus
/// `float16` (alias `half`) and `float32` (alias `float`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDType {
    /// float32 on the CPU; the model's compute dtype on the GPU.
    #[default]
    Auto,
    Float32,
    Float16,
    BFloat16,
    /// An fp8 format, by vLLM's name: `fp8`, `fp8_e4m3`, `fp8_e5m2` or `fp8_inc`. Not supported yet.
    Fp8(&'static str),
}

impl KvCacheDType {
    /// Every value `--kv-cache-dtype` accepts.
    pub const NAMES: [&'static str; 10] =
        ["auto", "float16", "half", "bfloat16", "float32", "float", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc"];

    /// The canonical name (aliases resolved).
    pub fn name(self) -> &'static str {
        match self {
            KvCacheDType::Auto => "auto",
            KvCacheDType::Float32 => "float32",
            KvCacheDType::Float16 => "float16",
            KvCacheDType::BFloat16 => "bfloat16",
            KvCacheDType::Fp8(name) => name,
        }
    }

    /// The CPU cache's element type: `auto` is float32, as before the flag existed; `None` for fp8.
    pub fn cpu_element(self) -> Option<KvDType> {
        match self {
            KvCacheDType::Auto | KvCacheDType::Float32 => Some(KvDType::F32),
            KvCacheDType::Float16 => Some(KvDType::F16),
            KvCacheDType::BFloat16 => Some(KvDType::BF16),
            KvCacheDType::Fp8(_) => None,
        }
    }
}

impl std::str::FromStr for KvCacheDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(KvCacheDType::Auto),
            "float32" | "float" => Ok(KvCacheDType::Float32),
            "float16" | "half" => Ok(KvCacheDType::Float16),
            "bfloat16" => Ok(KvCacheDType::BFloat16),
            "fp8" => Ok(KvCacheDType::Fp8("fp8")),
            "fp8_e4m3" => Ok(KvCacheDType::Fp8("fp8_e4m3")),
            "fp8_e5m2" => Ok(KvCacheDType::Fp8("fp8_e5m2")),
            "fp8_inc" => Ok(KvCacheDType::Fp8("fp8_inc")),
            other => Err(format!("invalid kv cache dtype `{other}` (choose from {})", KvCacheDType::NAMES.join(", "))),
        }
    }
}

/// `--load-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadFormat {
    #[default]
    Auto,
    Safetensors,
    Gguf,
    Dummy,
}

impl std::str::FromStr for LoadFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(LoadFormat::Auto),
            "safetensors" => Ok(LoadFormat::Safetensors),
            "gguf" => Ok(LoadFormat::Gguf),
            "dummy" => Ok(LoadFormat::Dummy),
            other => Err(format!("invalid load format `{other}` (choose from auto, safetensors, gguf, dummy)")),
        }
    }
}

/// Where generation defaults come from (`--generation-config`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GenerationConfigSource {
    /// The model's own `generation_config.json`.
    #[default]
    Auto,
    /// vLLM's built-in defaults only.
    Vllm,
    /// A directory holding a `generation_config.json`.
    Dir(PathBuf),
}

/// Everything needed to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub model: PathBuf,
    /// A tokenizer directory or `tokenizer.json` other than the model's.
    pub tokenizer: Option<PathBuf>,
    pub dtype: DType,
    pub load_format: LoadFormat,
    pub max_model_len: Option<usize>,
    pub seed: u64,
    pub generation_config: GenerationConfigSource,
    /// Skip loading a tokenizer (prompts must then be token ids).
    pub skip_tokenizer_init: bool,
}

/// A model resolved but not yet loaded: its config, where its weights come from, and what the frontend
/// needs around it. A backend builds its model from `source` (the CPU through [`load`], the GPU itself).
pub struct PreparedModel {
    pub config: ModelConfig,
    pub source: WeightSource,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub chat_template: Option<String>,
    pub generation: GenerationDefaults,
    pub max_model_len: usize,
    /// EOS ids: the tokenizer's, the config's and the generation config's, deduplicated.
    pub eos_token_ids: Vec<u32>,
    pub started: Instant,
}

/// A loaded model with what the frontend needs around it.
pub struct LoadedModel {
    pub model: Arc<LlamaModel>,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub chat_template: Option<String>,
    pub generation: GenerationDefaults,
    pub max_model_len: usize,
    /// EOS ids: the tokenizer's, the config's and the generation config's, deduplicated.
    pub eos_token_ids: Vec<u32>,
    pub load_seconds: f64,
}

/// Loads a model for the CPU backend as the options say.
pub fn load(opts: &LoadOptions) -> Result<LoadedModel, ModelError> {
    let p = prepare(opts)?;
    let model = cpu_model(&p, opts.dtype)?;
    Ok(LoadedModel {
        model: Arc::new(model),
        tokenizer: p.tokenizer,
        chat_template: p.chat_template,
        generation: p.generation,
        max_model_len: p.max_model_len,
        eos_token_ids: p.eos_token_ids,
        load_seconds: p.started.elapsed().as_secs_f64(),
    })
}

/// Loads a prepared model's weights for the CPU backend: f32 math, GGUF blocks kept quantized unless
/// `--dtype float32` (bf16/fp16 requests are treated as float32, with a warning).
pub fn cpu_model(p: &PreparedModel, dtype: DType) -> Result<LlamaModel, ModelError> {
    if dtype == DType::BFloat16 || dtype == DType::Float16 {
        tracing::warn!("the CPU backend computes in float32; --dtype {dtype:?} is treated as float32");
    }
    LlamaModel::load(p.config.clone(), &p.source, dtype != DType::Float32, p.max_model_len)
}

/// Resolves the model (config, weight source, tokenizer, chat template, generation defaults, context
/// length) without loading weights.
pub fn prepare(opts: &LoadOptions) -> Result<PreparedModel, ModelError> {
    let started = Instant::now();
    let path = &opts.model;
    if !path.exists() {
        return Err(ModelError::Unsupported(format!(
            "model path `{}` does not exist (give a Hugging Face model directory or a .gguf file; no model hub is reachable)",
            path.display()
        )));
    }
    let is_gguf_file = path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let format = match opts.load_format {
        LoadFormat::Auto if is_gguf_file => LoadFormat::Gguf,
        LoadFormat::Auto => LoadFormat::Safetensors,
        f => f,
    };
    let (config, source, tokenizer, generation_dir) = match format {
        LoadFormat::Gguf => {
            if !is_gguf_file {
                return Err(ModelError::Unsupported(format!("`{}` is not a .gguf file", path.display())));
            }
            let file = GgufFile::open(path).map_err(|e| ModelError::Weights(e.to_string()))?;
            let config = ModelConfig::from_gguf(&file)?;
            let tokenizer = if opts.skip_tokenizer_init || opts.tokenizer.is_some() {
                None
            } else {
                Some(Tokenizer::from_gguf(&file).map_err(|e| ModelError::Tokenizer(e.to_string()))?)
            };
            let source = WeightSource::Gguf(GgufSource::new(file, &config));
            (config, source, tokenizer, None)
        }
        LoadFormat::Safetensors | LoadFormat::Dummy => {
            let dir = if path.is_file() { path.parent().unwrap_or(Path::new(".")).to_path_buf() } else { path.clone() };
            let config = ModelConfig::from_hf_dir(&dir)?;
            let source = if format == LoadFormat::Dummy {
                WeightSource::Dummy(DummySource::new(&config, opts.seed))
            } else {
                WeightSource::Safetensors(SafetensorsSource::open_dir(&dir)?)
            };
            let tokenizer =
                if opts.skip_tokenizer_init || opts.tokenizer.is_some() || !dir.join("tokenizer.json").exists() {
                    None
                } else {
                    Some(Tokenizer::from_hf_dir(&dir).map_err(|e| ModelError::Tokenizer(e.to_string()))?)
                };
            (config, source, tokenizer, Some(dir))
        }
        LoadFormat::Auto => unreachable!("resolved above"),
    };
    let tokenizer = match (&opts.tokenizer, opts.skip_tokenizer_init) {
        (Some(t), false) => Some(
            if t.is_dir() { Tokenizer::from_hf_dir(t) } else { Tokenizer::from_file(t) }
                .map_err(|e| ModelError::Tokenizer(e.to_string()))?,
        ),
        _ => tokenizer,
    };
    let generation = match (&opts.generation_config, &generation_dir) {
        (GenerationConfigSource::Vllm, _) => GenerationDefaults::default(),
        (GenerationConfigSource::Dir(d), _) => GenerationDefaults::from_dir(d)?,
        (GenerationConfigSource::Auto, Some(d)) => GenerationDefaults::from_dir(d)?,
        (GenerationConfigSource::Auto, None) => GenerationDefaults::default(),
    };
    let max_model_len = match opts.max_model_len {
        Some(0) => return Err(ModelError::Config("max_model_len must be positive".into())),
        Some(n) if n > config.max_position_embeddings => {
            return Err(ModelError::Config(format!(
                "User-specified max_model_len ({n}) is greater than the derived max_model_len (max_position_embeddings={} in model's config.json).",
                config.max_position_embeddings
            )))
        }
        Some(n) => n,
        None => config.max_position_embeddings,
    };
    // Sliding-window attention is not implemented: within the window it equals full attention, so the
    // context is capped at the window rather than computing wrong attention beyond it.
    let max_model_len = match config.sliding_window {
        Some(w) if w < max_model_len => {
            tracing::warn!("sliding-window attention is not supported yet; capping max_model_len at the window of {w}");
            w
        }
        _ => max_model_len,
    };
    let mut eos_token_ids = config.eos_token_ids.clone();
    eos_token_ids.extend(generation.eos_token_ids.iter().copied());
    if let Some(t) = tokenizer.as_ref().and_then(|t| t.eos_token_id()) {
        eos_token_ids.push(t);
    }
    eos_token_ids.sort_unstable();
    eos_token_ids.dedup();
    let chat_template = tokenizer.as_ref().and_then(|t| t.chat_template().map(str::to_string));
    Ok(PreparedModel {
        config,
        source,
        tokenizer: tokenizer.map(Arc::new),
        chat_template,
        generation,
        max_model_len,
        eos_token_ids,
        started,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_cache_dtype_names_and_aliases() {
        for name in KvCacheDType::NAMES {
            let parsed: KvCacheDType = name.parse().expect("every listed name parses");
            assert_eq!(parsed.name().parse::<KvCacheDType>(), Ok(parsed), "{name}");
        }
        assert_eq!("half".parse(), Ok(KvCacheDType::Float16));
        assert_eq!("float".parse(), Ok(KvCacheDType::Float32));
        assert_eq!(KvCacheDType::default().cpu_element(), Some(KvDType::F32));
        assert_eq!(KvCacheDType::BFloat16.cpu_element(), Some(KvDType::BF16));
        assert_eq!("fp8_e5m2".parse::<KvCacheDType>().map(KvCacheDType::cpu_element), Ok(None));
        let err = "int8".parse::<KvCacheDType>().expect_err("not a cache dtype");
        assert!(err.contains("int8") && err.contains("bfloat16"), "{err}");
    }
}
