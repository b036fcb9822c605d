//! Default sampling parameters from a model's `generation_config.json`, applied as vLLM does with
//! `--generation-config auto`: the file's values replace vLLM's defaults for fields a request leaves
//! unset, and its EOS ids stop generation.

use std::path::Path;

use ironllm_core::SamplingParams;
use serde_json::Value;

use crate::ModelError;

/// Generation defaults a model ships with.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub eos_token_ids: Vec<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<usize>,
}

impl GenerationDefaults {
    /// Reads `generation_config.json` from `dir` if it exists.
    pub fn from_dir(dir: &Path) -> Result<GenerationDefaults, ModelError> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(GenerationDefaults::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config(format!("{}: invalid JSON: {e}", path.display())))?;
        Ok(Self::from_json(&v))
    }

    /// Parses a generation config object; unknown or mistyped fields are ignored, as transformers does.
    pub fn from_json(v: &Value) -> GenerationDefaults {
        let f = |k: &str| v.get(k).and_then(Value::as_f64).map(|x| x as f32);
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
            _ => Vec::new(),
        };
        GenerationDefaults {
            eos_token_ids,
            temperature: f("temperature"),
            top_p: f("top_p"),
            top_k: v.get("top_k").and_then(Value::as_i64).map(|x| x as i32),
            min_p: f("min_p"),
            repetition_penalty: f("repetition_penalty"),
            max_new_tokens: v.get("max_new_tokens").and_then(Value::as_u64).map(|x| x as usize),
        }
    }

    /// vLLM's `SamplingParams` defaults overridden by this file's values.
    pub fn default_params(&self) -> SamplingParams {
        let mut p = SamplingParams::default();
        if let Some(t) = self.temperature {
            p.temperature = t;
        }
        if let Some(t) = self.top_p {
            p.top_p = t;
        }
        if let Some(k) = self.top_k {
            p.top_k = k;
        }
        if let Some(m) = self.min_p {
            p.min_p = m;
        }
        if let Some(r) = self.repetition_penalty {
            p.repetition_penalty = r;
        }
        if let Some(m) = self.max_new_tokens {
            p.max_tokens = Some(m);
        }
        p
    }

    /// A one-line description of the overrides, as vLLM logs it at start-up.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(t) = self.temperature {
            parts.push(format!("'temperature': {t}"));
        }
        if let Some(t) = self.top_p {
            parts.push(format!("'top_p': {t}"));
        }
        if let Some(k) = self.top_k {
            parts.push(format!("'top_k': {k}"));
        }
        if let Some(m) = self.min_p {
            parts.push(format!("'min_p': {m}"));
        }
        if let Some(r) = self.repetition_penalty {
            parts.push(format!("'repetition_penalty': {r}"));
        }
        if let Some(m) = self.max_new_tokens {
            parts.push(format!("'max_tokens': {m}"));
        }
        format!("{{{}}}", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_defaults() {
        let g = GenerationDefaults::from_json(
            &serde_json::json!({"eos_token_id": [2, 7], "temperature": 0.6, "top_p": 0.9}),
        );
        assert_eq!(g.eos_token_ids, vec![2, 7]);
        let p = g.default_params();
        assert_eq!((p.temperature, p.top_p, p.top_k), (0.6, 0.9, 0));
    }
}
