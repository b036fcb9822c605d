//! Where weights come from: Hugging Face safetensors files (single or sharded), GGUF files and random
//! dummy weights. Every source answers the same question — "the tensor with this Hugging Face name" —
//! so the architecture code is written once. GGUF names are mapped to Hugging Face names here, and the
//! Q/K row permutation that llama.cpp's converter applies for interleaved RoPE is undone here.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use ironllm_kernels::cpu::quant::{self, GgmlType};
use memmap2::Mmap;

use crate::config::{Architecture, ModelConfig};
use crate::gguf::GgufFile;
use crate::ModelError;

/// Element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredType {
    F32,
    F16,
    BF16,
    /// A GGUF block-quantized type (or GGUF's own F32/F16/BF16).
    Ggml(GgmlType),
}

/// One tensor as stored: Hugging Face shape order (`[rows, cols]` for a linear weight).
#[derive(Debug, Clone)]
pub struct StoredTensor<'a> {
    pub name: String,
    pub dtype: StoredType,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

impl StoredTensor<'_> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Converts (dequantizes) to f32.
    pub fn to_f32(&self) -> Result<Vec<f32>, ModelError> {
        let n = self.numel();
        let bad = |what: &str| ModelError::Weights(format!("tensor `{}`: {what}", self.name));
        let expect = |bytes: usize| -> Result<(), ModelError> {
            if self.data.len() == bytes {
                Ok(())
            } else {
                Err(bad(&format!("holds {} bytes, its shape needs {bytes}", self.data.len())))
            }
        };
        match self.dtype {
            StoredType::F32 | StoredType::Ggml(GgmlType::F32) => {
                expect(4 * n)?;
                Ok(self.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
            }
            StoredType::F16 | StoredType::Ggml(GgmlType::F16) => {
                expect(2 * n)?;
                Ok(self.data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect())
            }
            StoredType::BF16 | StoredType::Ggml(GgmlType::BF16) => {
                expect(2 * n)?;
                Ok(self.data.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect())
            }
            StoredType::Ggml(ty) => {
                let mut out = vec![0f32; n];
                quant::dequantize(ty, &self.data, &mut out).map_err(|e| bad(&e.to_string()))?;
                Ok(out)
            }
        }
    }
}

/// A provider of tensors by Hugging Face name.
pub enum WeightSource {
    Safetensors(SafetensorsSource),
    Gguf(GgufSource),
    Dummy(DummySource),
}

impl WeightSource {
    /// The tensor called `name` (Hugging Face naming), or `None` when the checkpoint lacks it.
    pub fn get(&self, name: &str) -> Result<Option<StoredTensor<'_>>, ModelError> {
        match self {
            WeightSource::Safetensors(s) => s.get(name),
            WeightSource::Gguf(s) => s.get(name),
            WeightSource::Dummy(s) => Ok(s.get(name)),
        }
    }

    /// Like [`get`](Self::get) but a missing tensor is an error.
    pub fn require(&self, name: &str) -> Result<StoredTensor<'_>, ModelError> {
        self.get(name)?.ok_or_else(|| ModelError::Weights(format!("checkpoint has no tensor `{name}`")))
    }
}

struct SafetensorsEntry {
    file: usize,
    dtype: StoredType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// Memory-mapped safetensors files of one checkpoint.
pub struct SafetensorsSource {
    files: Vec<Mmap>,
    entries: HashMap<String, SafetensorsEntry>,
}

impl SafetensorsSource {
    /// Opens `model.safetensors`, or every shard listed in `model.safetensors.index.json`, or every
    /// `*.safetensors` file of the directory.
    pub fn open_dir(dir: &Path) -> Result<SafetensorsSource, ModelError> {
        let index = dir.join("model.safetensors.index.json");
        let mut paths: Vec<PathBuf> = Vec::new();
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::Weights(format!("{}: invalid JSON: {e}", index.display())))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Weights(format!("{}: no `weight_map`", index.display())))?;
            let mut shards: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
            shards.sort_unstable();
            shards.dedup();
            for s in shards {
                if s.contains('/') || s.contains("..") {
                    return Err(ModelError::Weights(format!("{}: suspicious shard name `{s}`", index.display())));
                }
                paths.push(dir.join(s));
            }
        } else if dir.join("model.safetensors").exists() {
            paths.push(dir.join("model.safetensors"));
        } else {
            let rd = std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
            for entry in rd.flatten() {
                let p = entry.path();
                if p.extension().is_some_and(|e| e == "safetensors") {
                    paths.push(p);
                }
            }
            paths.sort();
        }
        if paths.is_empty() {
            return Err(ModelError::Weights(format!("no *.safetensors files in {}", dir.display())));
        }
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
            // SAFETY: the file is opened read-only; like every mmap-based loader we assume it is not
            // truncated by another process while we run.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
            let (header_len, meta) = safetensors::SafeTensors::read_metadata(&mmap)
                .map_err(|e| ModelError::Weights(format!("{}: {e}", path.display())))?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                let dtype = match info.dtype {
                    safetensors::Dtype::F32 => StoredType::F32,
                    safetensors::Dtype::F16 => StoredType::F16,
                    safetensors::Dtype::BF16 => StoredType::BF16,
                    other => {
                        // Integer buffers (e.g. rotary caches) are not weights we read; skip them.
                        tracing::debug!("skipping tensor {name} of dtype {other:?}");
                        continue;
                    }
                };
                let (s, e) = info.data_offsets;
                entries.insert(
                    name.clone(),
                    SafetensorsEntry { file: fi, dtype, shape: info.shape.clone(), start: base + s, end: base + e },
                );
            }
            files.push(mmap);
        }
        Ok(SafetensorsSource { files, entries })
    }

    fn get(&self, name: &str) -> Result<Option<StoredTensor<'_>>, ModelError> {
        let Some(e) = self.entries.get(name) else { return Ok(None) };
        let data = self.files[e.file]
            .get(e.start..e.end)
            .ok_or_else(|| ModelError::Weights(format!("tensor `{name}` lies outside its file")))?;
        Ok(Some(StoredTensor {
            name: name.to_string(),
            dtype: e.dtype,
            shape: e.shape.clone(),
            data: Cow::Borrowed(data),
        }))
    }
}

/// Tensors of a GGUF file, served under Hugging Face names.
pub struct GgufSource {
    file: GgufFile,
    /// Heads of Q and K, for undoing llama.cpp's Q/K permutation (Llama-architecture files only).
    unpermute: Option<(usize, usize)>,
}

impl GgufSource {
    /// Wraps an opened GGUF file.
    pub fn new(file: GgufFile, config: &ModelConfig) -> GgufSource {
        let permuted = matches!(config.architecture, Architecture::Llama | Architecture::Mistral);
        let unpermute = permuted.then_some((config.num_attention_heads, config.num_key_value_heads));
        GgufSource { file, unpermute }
    }

    /// The underlying file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    fn gguf_name(hf: &str) -> Option<String> {
        let simple = match hf {
            "model.embed_tokens.weight" => Some("token_embd.weight"),
            "model.norm.weight" => Some("output_norm.weight"),
            "lm_head.weight" => Some("output.weight"),
            "rope_freqs" => Some("rope_freqs.weight"),
            _ => None,
        };
        if let Some(s) = simple {
            return Some(s.to_string());
        }
        let rest = hf.strip_prefix("model.layers.")?;
        let (layer, tail) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (module, kind) = tail.rsplit_once('.')?;
        let g = match module {
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "self_attn.q_norm" => "attn_q_norm",
            "self_attn.k_norm" => "attn_k_norm",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            "input_layernorm" => "attn_norm",
            "post_attention_layernorm" => "ffn_norm",
            _ => return None,
        };
        Some(format!("blk.{layer}.{g}.{kind}"))
    }

    fn get(&self, name: &str) -> Result<Option<StoredTensor<'_>>, ModelError> {
        let Some(gname) = Self::gguf_name(name) else { return Ok(None) };
        let Some(info) = self.file.tensor(&gname) else { return Ok(None) };
        let bad = |m: String| ModelError::Weights(format!("GGUF tensor `{gname}`: {m}"));
        let ty =
            GgmlType::from_u32(info.ggml_type).ok_or_else(|| bad(format!("unsupported type id {}", info.ggml_type)))?;
        let dims: Vec<usize> = info.dims.iter().map(|&d| d as usize).collect();
        let cols = *dims.first().ok_or_else(|| bad("no dimensions".into()))?;
        let rows: usize = dims[1..].iter().product();
        let row_bytes = ty
            .row_bytes(cols)
            .ok_or_else(|| bad(format!("{cols} columns is not a whole number of {} blocks", ty.name())))?;
        let nbytes = row_bytes.checked_mul(rows).ok_or_else(|| bad("size overflows".into()))?;
        let data = self.file.tensor_bytes(info, nbytes).map_err(|e| bad(e.to_string()))?;
        // Hugging Face order: outermost first.
        let shape: Vec<usize> = dims.iter().rev().copied().collect();
        let mut data = Cow::Borrowed(data);
        if let Some((nh, nkv)) = self.unpermute {
            let heads = if gname.ends_with("attn_q.weight") || gname.ends_with("attn_q.bias") {
                Some(nh)
            } else if gname.ends_with("attn_k.weight") || gname.ends_with("attn_k.bias") {
                Some(nkv)
            } else {
                None
            };
            if let Some(heads) = heads {
                let elem_row = if gname.ends_with(".bias") { ty.row_bytes(1).unwrap_or(4) } else { row_bytes };
                let n_rows = if gname.ends_with(".bias") { cols } else { rows };
                data = Cow::Owned(unpermute_rows(&data, n_rows, elem_row, heads).map_err(bad)?);
            }
        }
        let dtype = StoredType::Ggml(ty);
        Ok(Some(StoredTensor { name: name.to_string(), dtype, shape, data }))
    }
}

/// Undoes llama.cpp's permutation of Q/K rows: within each head, GGUF row `2j + a` holds Hugging Face
/// row `a * head_dim / 2 + j`. Rows move whole, so this works on quantized rows too.
fn unpermute_rows(data: &[u8], rows: usize, row_bytes: usize, heads: usize) -> Result<Vec<u8>, String> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) || data.len() != rows * row_bytes
    {
        return Err(format!("cannot un-permute {rows} rows into {heads} heads"));
    }
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for j in 0..half {
            for a in 0..2 {
                let src = h * hd + 2 * j + a;
                let dst = h * hd + a * half + j;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    Ok(out)
}

/// Random weights of the shapes a config implies (`--load-format dummy`), for benchmarks.
pub struct DummySource {
    shapes: HashMap<String, Vec<usize>>,
    seed: u64,
}

impl DummySource {
    /// Plans every tensor of a Llama-family model with the given config.
    pub fn new(c: &ModelConfig, seed: u64) -> DummySource {
        let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        let mut shapes = HashMap::new();
        shapes.insert("model.embed_tokens.weight".to_string(), vec![v, h]);
        shapes.insert("model.norm.weight".to_string(), vec![h]);
        if !c.tie_word_embeddings {
            shapes.insert("lm_head.weight".to_string(), vec![v, h]);
        }
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}.");
            let mut add = |n: &str, s: Vec<usize>| {
                shapes.insert(format!("{p}{n}"), s);
            };
            add("self_attn.q_proj.weight", vec![q, h]);
            add("self_attn.k_proj.weight", vec![kv, h]);
            add("self_attn.v_proj.weight", vec![kv, h]);
            add("self_attn.o_proj.weight", vec![h, q]);
            if c.qkv_bias {
                add("self_attn.q_proj.bias", vec![q]);
                add("self_attn.k_proj.bias", vec![kv]);
                add("self_attn.v_proj.bias", vec![kv]);
            }
            if c.o_bias {
                add("self_attn.o_proj.bias", vec![h]);
            }
            if c.qk_norm {
                add("self_attn.q_norm.weight", vec![c.head_dim]);
                add("self_attn.k_norm.weight", vec![c.head_dim]);
            }
            add("mlp.gate_proj.weight", vec![i, h]);
            add("mlp.up_proj.weight", vec![i, h]);
            add("mlp.down_proj.weight", vec![h, i]);
            if c.mlp_bias {
                add("mlp.gate_proj.bias", vec![i]);
                add("mlp.up_proj.bias", vec![i]);
                add("mlp.down_proj.bias", vec![h]);
            }
            add("input_layernorm.weight", vec![h]);
            add("post_attention_layernorm.weight", vec![h]);
        }
        DummySource { shapes, seed }
    }

    fn get(&self, name: &str) -> Option<StoredTensor<'_>> {
        let shape = self.shapes.get(name)?.clone();
        let n: usize = shape.iter().product();
        let is_norm = name.ends_with("norm.weight");
        // A per-tensor seed so weights do not depend on the order tensors are requested in.
        let mut s = self.seed ^ fnv1a(name.as_bytes());
        let fan_in = *shape.last().unwrap_or(&1) as f32;
        let scale = 1.0 / fan_in.sqrt();
        let mut bytes = Vec::with_capacity(n * 4);
        for _ in 0..n {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            let w = if is_norm { 1.0 + 0.1 * u } else { u * scale };
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        Some(StoredTensor { name: name.to_string(), dtype: StoredType::F32, shape, data: Cow::Owned(bytes) })
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: reshape(heads, 2, hd/2) -> swap axes -> rows (heads, hd/2, 2).
        let (heads, hd) = (2usize, 6usize);
        let hf_rows: Vec<u8> = (0..(heads * hd) as u8).collect();
        let mut permuted = vec![0u8; hf_rows.len()];
        for h in 0..heads {
            for a in 0..2 {
                for j in 0..hd / 2 {
                    permuted[h * hd + j * 2 + a] = hf_rows[h * hd + a * (hd / 2) + j];
                }
            }
        }
        assert_eq!(unpermute_rows(&permuted, heads * hd, 1, heads).unwrap(), hf_rows);
        assert!(unpermute_rows(&permuted, heads * hd, 1, 5).is_err());
    }

    #[test]
    fn gguf_names_map() {
        assert_eq!(GgufSource::gguf_name("model.layers.12.mlp.down_proj.weight").unwrap(), "blk.12.ffn_down.weight");
        assert_eq!(GgufSource::gguf_name("model.layers.0.self_attn.q_proj.bias").unwrap(), "blk.0.attn_q.bias");
        assert_eq!(GgufSource::gguf_name("model.embed_tokens.weight").unwrap(), "token_embd.weight");
        assert!(GgufSource::gguf_name("model.layers.x.mlp.down_proj.weight").is_none());
    }
}
