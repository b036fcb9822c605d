//! The model configuration every architecture reads, resolved once from a Hugging Face `config.json` or
//! from GGUF metadata, so the architecture code never looks at either format.

use std::path::Path;

use serde_json::Value;

use crate::gguf::GgufFile;
use crate::ModelError;

/// The Llama-family variants we run; they differ only in the flags of [`ModelConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Architecture {
    /// The Hugging Face class name.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// How positions are scaled before rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    Linear { factor: f32 },
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: usize },
}

/// Resolved model hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections (Qwen2, Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// `torch_dtype` / `dtype` of the checkpoint, when stated.
    pub torch_dtype: Option<String>,
}

fn get_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|x| x as usize)
}

fn get_f32(v: &Value, key: &str) -> Option<f32> {
    v.get(key).and_then(Value::as_f64).map(|x| x as f32)
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    /// Query heads per KV head (the GQA group size; at least 1).
    pub fn num_queries_per_kv(&self) -> usize {
        (self.num_attention_heads / self.num_key_value_heads.max(1)).max(1)
    }

    /// Reads `config.json` from a Hugging Face model directory.
    pub fn from_hf_dir(dir: &Path) -> Result<ModelConfig, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config(format!("{}: invalid JSON: {e}", path.display())))?;
        Self::from_hf_json(&v).map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))
    }

    /// Parses a Hugging Face config object.
    pub fn from_hf_json(v: &Value) -> Result<ModelConfig, String> {
        let arch_name = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .or_else(|| v.get("model_type").and_then(Value::as_str))
            .ok_or("no `architectures` or `model_type`")?;
        let architecture = match arch_name {
            "LlamaForCausalLM" | "llama" => Architecture::Llama,
            "MistralForCausalLM" | "mistral" => Architecture::Mistral,
            "Qwen2ForCausalLM" | "qwen2" => Architecture::Qwen2,
            "Qwen3ForCausalLM" | "qwen3" => Architecture::Qwen3,
            other => {
                return Err(format!(
                    "unsupported architecture `{other}`; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"
                ))
            }
        };
        let need = |key: &str| get_usize(v, key).ok_or(format!("missing or invalid `{key}`"));
        let hidden_size = need("hidden_size")?;
        let num_attention_heads = need("num_attention_heads")?;
        let num_key_value_heads = get_usize(v, "num_key_value_heads").unwrap_or(num_attention_heads);
        let head_dim = match v.get("head_dim") {
            Some(Value::Number(n)) => n.as_u64().ok_or("invalid `head_dim`")? as usize,
            _ => hidden_size.checked_div(num_attention_heads).ok_or("`num_attention_heads` is 0")?,
        };
        let rope_scaling = parse_rope_scaling(v.get("rope_scaling").or_else(|| v.get("rope_parameters")))?;
        let rope_theta = get_f32(v, "rope_theta")
            .or_else(|| v.get("rope_parameters").and_then(|r| get_f32(r, "rope_theta")))
            .unwrap_or(10000.0);
        let attention_bias = v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let sliding_window = match architecture {
            Architecture::Mistral => get_usize(v, "sliding_window"),
            Architecture::Qwen2 | Architecture::Qwen3 => {
                if v.get("use_sliding_window").and_then(Value::as_bool).unwrap_or(false) {
                    get_usize(v, "sliding_window")
                } else {
                    None
                }
            }
            Architecture::Llama => None,
        };
        let cfg = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: need("intermediate_size")?,
            num_hidden_layers: need("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: need("vocab_size")?,
            rms_norm_eps: get_f32(v, "rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: get_usize(v, "max_position_embeddings").unwrap_or(4096),
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: v.get("mlp_bias").and_then(Value::as_bool).unwrap_or(false),
            qk_norm: architecture == Architecture::Qwen3,
            sliding_window,
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(v.get("eos_token_id")),
            torch_dtype: v.get("torch_dtype").or_else(|| v.get("dtype")).and_then(Value::as_str).map(str::to_string),
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Reads the configuration from GGUF metadata (`{arch}.*` keys).
    pub fn from_gguf(g: &GgufFile) -> Result<ModelConfig, ModelError> {
        let bad = |m: String| ModelError::Config(format!("GGUF metadata: {m}"));
        let arch = g.architecture().ok_or_else(|| bad("missing `general.architecture`".into()))?.to_string();
        let architecture = match arch.as_str() {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
            other => {
                return Err(bad(format!("unsupported architecture `{other}`; supported: llama, mistral, qwen2, qwen3")))
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let num = |k: &str| g.get(&key(k)).and_then(|v| v.as_u64()).map(|x| x as usize);
        let need = |k: &str| num(k).ok_or_else(|| bad(format!("missing `{}`", key(k))));
        let hidden_size = need("embedding_length")?;
        let num_attention_heads = need("attention.head_count")?;
        let head_dim = match num("attention.key_length") {
            Some(d) => d,
            None => hidden_size.checked_div(num_attention_heads).ok_or_else(|| bad("head_count is 0".into()))?,
        };
        let vocab_size = match num("vocab_size") {
            Some(v) => v,
            None => g
                .get("tokenizer.ggml.tokens")
                .and_then(|t| t.as_array())
                .map(|a| a.len())
                .or_else(|| g.tensor("token_embd.weight").and_then(|t| t.dims.get(1).map(|d| *d as usize)))
                .ok_or_else(|| bad("cannot tell the vocabulary size".into()))?,
        };
        let rope_scaling = match g.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
            Some("linear") => RopeScaling::Linear {
                factor: g.get(&key("rope.scaling.factor")).and_then(|v| v.as_f64()).unwrap_or(1.0) as f32,
            },
            _ => RopeScaling::None,
        };
        let eos: Vec<u32> =
            g.get("tokenizer.ggml.eos_token_id").and_then(|v| v.as_u64()).map(|x| vec![x as u32]).unwrap_or_default();
        let cfg = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: need("feed_forward_length")?,
            num_hidden_layers: need("block_count")?,
            num_attention_heads,
            num_key_value_heads: num("attention.head_count_kv").unwrap_or(num_attention_heads),
            head_dim,
            vocab_size,
            rms_norm_eps: g.get(&key("attention.layer_norm_rms_epsilon")).and_then(|v| v.as_f64()).unwrap_or(1e-5)
                as f32,
            rope_theta: g.get(&key("rope.freq_base")).and_then(|v| v.as_f64()).unwrap_or(10000.0) as f32,
            rope_scaling,
            max_position_embeddings: num("context_length").unwrap_or(4096),
            tie_word_embeddings: g.tensor("output.weight").is_none(),
            qkv_bias: g.tensor("blk.0.attn_q.bias").is_some(),
            o_bias: g.tensor("blk.0.attn_output.bias").is_some(),
            mlp_bias: g.tensor("blk.0.ffn_up.bias").is_some(),
            qk_norm: g.tensor("blk.0.attn_q_norm.weight").is_some(),
            sliding_window: None,
            bos_token_id: g.get("tokenizer.ggml.bos_token_id").and_then(|v| v.as_u64()).map(|x| x as u32),
            eos_token_ids: eos,
            torch_dtype: None,
        };
        cfg.check().map_err(bad)?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), String> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("`{name}` must be positive"));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim must be even for rotary embedding, got {}", self.head_dim));
        }
        Ok(())
    }

    /// Parameters in the dense weights (embeddings counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers * layer + h + head
    }
}

fn parse_rope_scaling(v: Option<&Value>) -> Result<RopeScaling, String> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(RopeScaling::None) };
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(Value::as_str).unwrap_or("default");
    let factor = get_f32(v, "factor");
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: factor.ok_or("rope_scaling: missing `factor`")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: factor.ok_or("rope_scaling: missing `factor`")?,
            low_freq_factor: get_f32(v, "low_freq_factor").ok_or("rope_scaling: missing `low_freq_factor`")?,
            high_freq_factor: get_f32(v, "high_freq_factor").ok_or("rope_scaling: missing `high_freq_factor`")?,
            original_max_position_embeddings: get_usize(v, "original_max_position_embeddings")
                .ok_or("rope_scaling: missing `original_max_position_embeddings`")?,
        }),
        other => Err(format!("unsupported rope_scaling type `{other}` (supported: default, linear, llama3)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qwen3_with_explicit_head_dim_and_llama3_scaling() {
        let v: Value = serde_json::json!({
            "architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "vocab_size": 512, "tie_word_embeddings": true, "eos_token_id": [1, 2],
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        });
        let c = ModelConfig::from_hf_json(&v).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen3);
        assert_eq!(c.head_dim, 32);
        assert!(c.qk_norm && c.tie_word_embeddings && !c.qkv_bias);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { original_max_position_embeddings: 64, .. }));
    }

    #[test]
    fn rejects_unknown_architectures_and_bad_shapes() {
        let v = serde_json::json!({"architectures": ["GPT2LMHeadModel"]});
        assert!(ModelConfig::from_hf_json(&v).unwrap_err().contains("unsupported architecture"));
        let v = serde_json::json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 1,
            "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 2, "vocab_size": 5});
        assert!(ModelConfig::from_hf_json(&v).unwrap_err().contains("multiple"));
    }
}
