//! The Llama-family decoder on the GPU (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2), the same
//! architecture as `ironllm_model::llama` over GPU kernels: merged QKV and gate/up projections (one GEMM
//! each), residual add fused into the o_proj and down GEMMs' epilogue (cuBLASLt, beta = 1) or, where
//! those GEMMs cannot accumulate (float32, the skinny GEMM's rows), into the next RMSNorm, q/k norm + RoPE
//! fused with the KV-cache write, attention over the paged cache, SiLU-and-mul (in the gate/up GEMM's
//! epilogue on Hopper for steps of many tokens: `fused_mlp`), and the final norm and LM head only for the
//! rows that produce logits.
//!
//! Weights go to the GPU one tensor at a time in the compute dtype (bf16 checkpoints are copied as they
//! are; f32/f16 are converted and GGUF blocks dequantized per tensor on the host), so the host never
//! holds the whole model. `--load-format dummy` fills the tensors with random values on the GPU.

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use ironllm_model::config::ModelConfig;
use ironllm_model::llama::rope_table;
use ironllm_model::weights::{StoredTensor, StoredType, WeightSource};

use crate::device::Gpu;
use crate::error::{CudaError, DriverContext};
use crate::fused_mlp;
use crate::lt_gemm::TuneResult;
use crate::op_timer::{self, Op, OpMarks, Work};
use crate::ops::{self, AttnShape, BatchMeta};
use crate::tensor::{DevBuf, GpuDType};

struct Layer {
    input_norm: DevBuf,
    /// [q + 2 kv, hidden]
    qkv: DevBuf,
    qkv_bias: Option<DevBuf>,
    q_norm: Option<DevBuf>,
    k_norm: Option<DevBuf>,
    /// [hidden, q]
    o_proj: DevBuf,
    o_bias: Option<DevBuf>,
    post_norm: DevBuf,
    /// [2 inter, hidden]
    gate_up: DevBuf,
    gate_up_bias: Option<DevBuf>,
    /// [hidden, inter]
    down: DevBuf,
    down_bias: Option<DevBuf>,
}

/// A Llama-family model resident on the GPU.
pub struct CudaLlama {
    pub config: ModelConfig,
    pub dtype: GpuDType,
    gpu: Arc<Gpu>,
    embed: DevBuf,
    lm_head: Option<DevBuf>,
    layers: Vec<Layer>,
    final_norm: DevBuf,
    /// [max_positions, head_dim / 2]
    rope_cos: CudaSlice<f32>,
    rope_sin: CudaSlice<f32>,
    pub max_positions: usize,
    weight_bytes: usize,
    /// The tensor-core attention kernels for this dtype and head size, if any (resolved once).
    attn_kernels: ops::AttnKernels,
    /// Split-KV decode attention allowed (bf16/f16 only; `IRONLLM_DISABLE_SPLIT_KV` turns it off for
    /// side-by-side measurements).
    split_kv: bool,
    /// Cap on the decode attention's split count (`IRONLLM_MAX_DECODE_SPLITS`, for side-by-side
    /// measurements; default `ops::DEFAULT_MAX_DECODE_SPLITS`).
    max_decode_splits: usize,
    /// Fewest keys of a split share in the kernels (`IRONLLM_DECODE_SPLIT_MIN_KEYS`, for side-by-side
    /// measurements; default `ops::DECODE_SPLIT_MIN_KEYS`).
    decode_split_min_keys: usize,
    /// How the decode attention's split count is chosen: the cost model of the kernel's waves on this GPU,
    /// or (side-by-side measurements) `IRONLLM_DECODE_SPLIT_RULE=wave`, `IRONLLM_DECODE_SPLIT_FILL=N`'s
    /// earlier rules or `IRONLLM_DECODE_SPLITS=N`.
    decode_split_rule: ops::SplitRule,
    /// The o_proj and down GEMMs add into the residual stream themselves where they can
    /// (`ops::gemm_accumulate`); `IRONLLM_DISABLE_RESIDUAL_EPILOGUE` turns it off for side-by-side
    /// measurements.
    residual_epilogue: bool,
    /// Steps of at least this many tokens take the gate/up GEMM with SiLU-and-mul in its epilogue
    /// (`fused_mlp::min_rows`); `None` where that kernel is not used.
    fused_gate_up_min_rows: Option<usize>,
    /// Steps the skinny GEMM serves (one or two decode rows) run gate/up with SiLU-and-mul in its epilogue
    /// (`ops::gemv_swiglu`); `IRONLLM_DISABLE_GEMV_SWIGLU` turns it off for side-by-side measurements.
    gemv_swiglu: bool,
    /// Steps the skinny GEMM serves normalize the residual stream in the QKV and gate/up GEMMs' prologue
    /// (`ops::gemm_normed`, `ops::gemv_swiglu` with a norm) instead of a norm kernel each;
    /// `IRONLLM_DISABLE_GEMV_NORM` turns it off for side-by-side measurements.
    gemv_norm: bool,
}

/// Whether the residual stream already holds the last projection's output, which decides the next norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Residual {
    /// Nothing is pending: the embedding wrote it, or the GEMM added its product in its epilogue. The
    /// norm only reads it (`rms_norm`).
    Summed,
    /// The projection is in `proj`; the norm adds it first (`add_rms_norm`).
    PlusProj,
}

impl Residual {
    /// Rows of hidden size per token the next norm moves: reads the residual and writes the normed rows,
    /// plus, for a pending projection, reads it and writes the sum back.
    fn norm_rows(self) -> usize {
        match self {
            Residual::Summed => 2,
            Residual::PlusProj => 4,
        }
    }
}

/// `normed = rms_norm(residual) * w`, adding a pending projection (`proj`) into `residual` first.
#[allow(clippy::too_many_arguments)]
fn residual_norm(
    gpu: &Gpu,
    state: Residual,
    residual: &mut DevBuf,
    proj: &DevBuf,
    w: &DevBuf,
    normed: &mut DevBuf,
    rows: usize,
    hidden: usize,
    eps: f32,
) -> Result<(), CudaError> {
    match state {
        Residual::Summed => ops::rms_norm(gpu, normed, residual, w, rows, hidden, eps),
        Residual::PlusProj => ops::add_rms_norm(gpu, residual, proj, w, normed, rows, hidden, eps),
    }
}

/// Resident CTAs per SM of the split-KV decode kernel the model uses (the driver's occupancy figure for its
/// block and shared memory), of its deep form when `deep`; the earlier rule's 4 where that kernel is not
/// the tensor-core one or the driver gives no figure.
fn decode_split_resident(gpu: &Gpu, kernels: &ops::AttnKernels, head_dim: usize, deep: bool) -> usize {
    let forms = if deep { &kernels.decode_deep } else { &kernels.decode };
    let Some((_, split)) = forms else { return ops::OLD_SPLIT_BLOCKS_PER_SM };
    gpu.function(split)
        .ok()
        .and_then(|f| {
            let smem = ops::flash_decode_smem(head_dim, deep);
            f.occupancy_max_active_blocks_per_multiprocessor(128, smem, None).ok()
        })
        .map_or(ops::OLD_SPLIT_BLOCKS_PER_SM, |n| (n as usize).max(1))
}

/// A side-by-side measurement knob: the variable `name` as a count in `1..=most`, else `default`.
fn env_count(name: &str, default: usize, most: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok()).map_or(default, |v| v.clamp(1, most))
}

/// The paged KV cache on the GPU: per layer, K and V of layout `[num_blocks, num_kv_heads, block_size,
/// head_dim]` in the compute dtype.
pub struct CudaKvCache {
    pub num_blocks: usize,
    pub block_size: usize,
    layers: Vec<(DevBuf, DevBuf)>,
}

impl CudaKvCache {
    pub fn new(gpu: &Gpu, model: &CudaLlama, num_blocks: usize, block_size: usize) -> Result<CudaKvCache, CudaError> {
        let c = &model.config;
        let len = num_blocks * c.num_key_value_heads * block_size * c.head_dim;
        let layers = (0..c.num_hidden_layers)
            .map(|_| Ok((DevBuf::zeros(gpu, model.dtype, len)?, DevBuf::zeros(gpu, model.dtype, len)?)))
            .collect::<Result<Vec<_>, CudaError>>()?;
        Ok(CudaKvCache { num_blocks, block_size, layers })
    }

    /// Fills every layer's K and V with random values (measurement aid: GPU-only replays over a cache of
    /// zeros draw less power than real steps and read ~1% fast at batch 128 on an H200).
    pub fn fill_random(&mut self, gpu: &Gpu, seed: u64) -> Result<(), CudaError> {
        for (i, (k, v)) in self.layers.iter_mut().enumerate() {
            ops::fill_uniform(gpu, k, seed ^ (2 * i as u64), -2.0, 2.0)?;
            ops::fill_uniform(gpu, v, seed ^ (2 * i as u64 + 1), -2.0, 2.0)?;
        }
        Ok(())
    }

    /// Bytes one block takes over all layers (K and V).
    pub fn bytes_per_block(config: &ModelConfig, dtype: GpuDType, block_size: usize) -> usize {
        2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * block_size * dtype.size()
    }
}

/// Activation buffers, allocated for the largest step and reused.
pub struct Workspace {
    residual: DevBuf,
    normed: DevBuf,
    qkv: DevBuf,
    attn: DevBuf,
    proj: DevBuf,
    gate_up: DevBuf,
    act: DevBuf,
    rows_a: DevBuf,
    rows_b: DevBuf,
    rows_normed: DevBuf,
    /// [rows, vocab] f32: the sampling rows of a step.
    pub logits: DevBuf,
    /// [prompt rows, vocab] f32: one chunk of prompt-logprob rows (`CudaLlama::prompt_logits`), so the
    /// step's logits buffer needs no row per prompt token.
    pub prompt_logits: DevBuf,
    /// The residual stream's state after the last forward, for `prompt_logits`.
    final_state: Option<Residual>,
    /// Split-KV decode attention scratch (see `ops::decode_splits`).
    part_o: CudaSlice<f32>,
    part_lse: CudaSlice<f32>,
    max_tokens: usize,
    max_rows: usize,
    max_prompt_rows: usize,
}

impl Workspace {
    /// Buffers for steps of up to `max_tokens` tokens and `max_rows` logits rows, and prompt-logprob
    /// chunks of up to `max_prompt_rows` rows.
    pub fn new(
        gpu: &Gpu,
        model: &CudaLlama,
        max_tokens: usize,
        max_rows: usize,
        max_prompt_rows: usize,
    ) -> Result<Workspace, CudaError> {
        let c = &model.config;
        let d = model.dtype;
        let (t, r, h) = (max_tokens.max(1), max_rows.max(1), c.hidden_size);
        let pr = max_prompt_rows.max(1);
        // The gathered rows serve both the sampling rows and a prompt chunk.
        let gathered = r.max(pr);
        let qkv_w = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim;
        let split_rows = ops::decode_split_rows(gpu.info.multiprocessors.max(1), c.num_queries_per_kv());
        Ok(Workspace {
            residual: DevBuf::zeros(gpu, d, t * h)?,
            normed: DevBuf::zeros(gpu, d, t * h)?,
            qkv: DevBuf::zeros(gpu, d, t * qkv_w)?,
            attn: DevBuf::zeros(gpu, d, t * c.num_attention_heads * c.head_dim)?,
            proj: DevBuf::zeros(gpu, d, t * h)?,
            gate_up: DevBuf::zeros(gpu, d, model.gate_up_rows(t) * 2 * c.intermediate_size)?,
            act: DevBuf::zeros(gpu, d, t * c.intermediate_size)?,
            rows_a: DevBuf::zeros(gpu, d, gathered * h)?,
            rows_b: DevBuf::zeros(gpu, d, gathered * h)?,
            rows_normed: DevBuf::zeros(gpu, d, gathered * h)?,
            logits: DevBuf::zeros(gpu, GpuDType::F32, r * c.vocab_size)?,
            prompt_logits: DevBuf::zeros(gpu, GpuDType::F32, pr * c.vocab_size)?,
            final_state: None,
            part_o: gpu.alloc_zeros::<f32>(split_rows * c.head_dim)?,
            part_lse: gpu.alloc_zeros::<f32>(split_rows)?,
            max_tokens: t,
            max_rows: r,
            max_prompt_rows: pr,
        })
    }
}

impl Workspace {
    /// Largest number of tokens a step may have.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Largest number of logits rows a step may have.
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// Largest chunk of prompt-logprob rows `CudaLlama::prompt_logits` takes.
    pub fn max_prompt_rows(&self) -> usize {
        self.max_prompt_rows
    }
}

/// Converts one stored tensor to `dtype` bytes (a bf16 checkpoint in bf16 is borrowed as is: the upload
/// reads the memory-mapped file straight away instead of a copy of it).
fn encode<'t>(t: &'t StoredTensor<'_>, dtype: GpuDType) -> Result<std::borrow::Cow<'t, [u8]>, CudaError> {
    match (t.dtype, dtype) {
        (StoredType::BF16, GpuDType::BF16) | (StoredType::F16, GpuDType::F16) | (StoredType::F32, GpuDType::F32) => {
            let size = dtype.size();
            if t.data.len() != t.numel() * size {
                return Err(CudaError::Invalid(format!(
                    "tensor `{}` has {} bytes for {} elements",
                    t.name,
                    t.data.len(),
                    t.numel()
                )));
            }
            Ok(std::borrow::Cow::Borrowed(&t.data[..]))
        }
        _ => Ok(std::borrow::Cow::Owned(dtype.encode(&t.to_f32()?))),
    }
}

struct Loader<'a> {
    gpu: &'a Gpu,
    source: &'a WeightSource,
    dtype: GpuDType,
    dummy_seed: Option<u64>,
    bytes: usize,
}

impl Loader<'_> {
    fn shape_of(&self, name: &str) -> Result<Option<Vec<usize>>, CudaError> {
        Ok(self.source.get(name)?.map(|t| t.shape))
    }

    /// Rows of several tensors (each `[rows_i, cols]`) stacked into one device buffer.
    fn stacked(&mut self, names: &[String], rows: &[usize], cols: usize) -> Result<DevBuf, CudaError> {
        let total: usize = rows.iter().sum::<usize>() * cols;
        let mut buf = DevBuf::zeros(self.gpu, self.dtype, total)?;
        self.bytes += buf.nbytes();
        if let Some(seed) = self.dummy_seed {
            let scale = 1.0 / (cols as f32).sqrt();
            ops::fill_uniform(self.gpu, &mut buf, seed ^ fnv(&names[0]), -scale, scale)?;
            return Ok(buf);
        }
        let mut offset = 0;
        for (name, &r) in names.iter().zip(rows) {
            let t = self.source.require(name)?;
            if t.numel() != r * cols {
                return Err(CudaError::Invalid(format!(
                    "tensor `{name}` has shape {:?}, the config implies [{r}, {cols}]",
                    t.shape
                )));
            }
            let bytes = encode(&t, self.dtype)?;
            let mut view = buf.view_mut(offset, r * cols)?;
            self.gpu.stream().memcpy_htod(&bytes[..], &mut view).at(|| format!("copying `{name}` to the GPU"))?;
            offset += r * cols;
        }
        Ok(buf)
    }

    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<DevBuf, CudaError> {
        self.stacked(&[name.to_string()], &[rows], cols)
    }

    /// A 1-D tensor (norm weight or bias); `None` when absent and optional.
    fn vector(&mut self, name: &str, len: usize, required: bool) -> Result<Option<DevBuf>, CudaError> {
        if let Some(seed) = self.dummy_seed {
            if !required && self.shape_of(name)?.is_none() {
                return Ok(None);
            }
            let mut buf = DevBuf::zeros(self.gpu, self.dtype, len)?;
            let (lo, hi) = if name.ends_with("norm.weight") { (0.9, 1.1) } else { (-0.05, 0.05) };
            ops::fill_uniform(self.gpu, &mut buf, seed ^ fnv(name), lo, hi)?;
            self.bytes += buf.nbytes();
            return Ok(Some(buf));
        }
        let t = match self.source.get(name)? {
            Some(t) => t,
            None if required => return Err(CudaError::Invalid(format!("checkpoint has no tensor `{name}`"))),
            None => return Ok(None),
        };
        if t.numel() != len {
            return Err(CudaError::Invalid(format!("tensor `{name}` has {} elements, expected {len}", t.numel())));
        }
        let buf = DevBuf::from_bytes(self.gpu, self.dtype, &encode(&t, self.dtype)?)?;
        self.bytes += buf.nbytes();
        Ok(Some(buf))
    }

    /// q/k/v (or gate/up) biases stacked, when the checkpoint has them.
    fn stacked_bias(&mut self, names: &[String], lens: &[usize]) -> Result<Option<DevBuf>, CudaError> {
        let parts = names.iter().zip(lens).map(|(n, &l)| self.vector(n, l, false)).collect::<Result<Vec<_>, _>>()?;
        if parts.iter().all(Option::is_none) {
            return Ok(None);
        }
        let mut host = Vec::new();
        for (p, &l) in parts.iter().zip(lens) {
            match p {
                Some(b) => host.extend(b.to_f32(self.gpu)?),
                None => host.extend(std::iter::repeat_n(0.0, l)),
            }
        }
        Ok(Some(DevBuf::from_f32(self.gpu, self.dtype, &host)?))
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

impl CudaLlama {
    /// Loads every tensor of `source` onto the GPU in `dtype`.
    pub fn load(
        gpu: Arc<Gpu>,
        config: ModelConfig,
        source: &WeightSource,
        dtype: GpuDType,
        max_positions: usize,
        seed: u64,
    ) -> Result<CudaLlama, CudaError> {
        let c = &config;
        let dummy_seed = matches!(source, WeightSource::Dummy(_)).then_some(seed);
        let mut ld = Loader { gpu: &gpu, source, dtype, dummy_seed, bytes: 0 };
        let (h, inter, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (qw, kvw) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let embed = ld.matrix("model.embed_tokens.weight", c.vocab_size, h)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let n = |s: &str| format!("model.layers.{l}.{s}");
            let qkv_names = [n("self_attn.q_proj.weight"), n("self_attn.k_proj.weight"), n("self_attn.v_proj.weight")];
            let qkv_bias_names = [n("self_attn.q_proj.bias"), n("self_attn.k_proj.bias"), n("self_attn.v_proj.bias")];
            let gu_names = [n("mlp.gate_proj.weight"), n("mlp.up_proj.weight")];
            let gu_bias_names = [n("mlp.gate_proj.bias"), n("mlp.up_proj.bias")];
            let layer = Layer {
                input_norm: ld.vector(&n("input_layernorm.weight"), h, true)?.expect("required"),
                qkv: ld.stacked(&qkv_names, &[qw, kvw, kvw], h)?,
                qkv_bias: if c.qkv_bias || dummy_seed.is_none() {
                    ld.stacked_bias(&qkv_bias_names, &[qw, kvw, kvw])?
                } else {
                    None
                },
                q_norm: if c.qk_norm { ld.vector(&n("self_attn.q_norm.weight"), hd, true)? } else { None },
                k_norm: if c.qk_norm { ld.vector(&n("self_attn.k_norm.weight"), hd, true)? } else { None },
                o_proj: ld.matrix(&n("self_attn.o_proj.weight"), h, qw)?,
                o_bias: ld.vector(&n("self_attn.o_proj.bias"), h, false)?,
                post_norm: ld.vector(&n("post_attention_layernorm.weight"), h, true)?.expect("required"),
                gate_up: ld.stacked(&gu_names, &[inter, inter], h)?,
                gate_up_bias: if c.mlp_bias || dummy_seed.is_none() {
                    ld.stacked_bias(&gu_bias_names, &[inter, inter])?
                } else {
                    None
                },
                down: ld.matrix(&n("mlp.down_proj.weight"), h, inter)?,
                down_bias: ld.vector(&n("mlp.down_proj.bias"), h, false)?,
            };
            layers.push(layer);
        }
        let final_norm = ld.vector("model.norm.weight", h, true)?.expect("required");
        let has_head = match dummy_seed {
            Some(_) => !c.tie_word_embeddings,
            None => source.get("lm_head.weight")?.is_some(),
        };
        let lm_head = if has_head { Some(ld.matrix("lm_head.weight", c.vocab_size, h)?) } else { None };
        let freq_factors = source.get("rope_freqs")?.map(|t| t.to_f32()).transpose()?;
        let rope = rope_table(c, freq_factors.as_deref(), max_positions);
        let (cos, sin) = rope.tables();
        let rope_cos = gpu.upload(cos)?;
        let rope_sin = gpu.upload(sin)?;
        let weight_bytes = ld.bytes;
        let attn_kernels = ops::AttnKernels::resolve(&gpu, dtype, c.head_dim, c.num_queries_per_kv());
        let sms = gpu.info.multiprocessors.max(1);
        let decode_split_rule = if std::env::var_os("IRONLLM_DECODE_SPLITS").is_some() {
            let splits = env_count("IRONLLM_DECODE_SPLITS", 1, ops::MAX_DECODE_SPLITS);
            ops::SplitRule::Fixed { splits, ctas: ops::decode_split_ctas(sms) }
        } else if std::env::var_os("IRONLLM_DECODE_SPLIT_FILL").is_some() {
            let per_sm =
                env_count("IRONLLM_DECODE_SPLIT_FILL", ops::OLD_SPLIT_BLOCKS_PER_SM, ops::OLD_SPLIT_BLOCKS_PER_SM);
            ops::SplitRule::Fill(per_sm * sms)
        } else {
            let wave = ops::decode_split_wave(sms, decode_split_resident(&gpu, &attn_kernels, c.head_dim, false));
            let deep_wave = match attn_kernels.decode_deep {
                Some(_) => ops::decode_split_wave(sms, decode_split_resident(&gpu, &attn_kernels, c.head_dim, true)),
                None => 0,
            };
            match std::env::var("IRONLLM_DECODE_SPLIT_RULE").as_deref() {
                Ok("wave") => ops::SplitRule::Wave(wave),
                _ => ops::SplitRule::Cost { wave, ctas: ops::decode_split_ctas(sms), deep_wave },
            }
        };
        tracing::info!("split-KV decode attention: {decode_split_rule:?} (CTAs)");
        let gate_up_bias = layers.iter().any(|l| l.gate_up_bias.is_some());
        let fused_gate_up_min_rows = fused_mlp::min_rows(&gpu, dtype, h, inter, gate_up_bias);
        if let Some(min) = fused_gate_up_min_rows {
            tracing::info!("gate/up GEMM with SiLU-and-mul in its epilogue for steps of at least {min} tokens");
        }
        gpu.synchronize()?;
        Ok(CudaLlama {
            config,
            dtype,
            gpu,
            embed,
            lm_head,
            layers,
            final_norm,
            rope_cos,
            rope_sin,
            max_positions,
            weight_bytes,
            split_kv: attn_kernels.prefill.is_some() && std::env::var_os("IRONLLM_DISABLE_SPLIT_KV").is_none(),
            max_decode_splits: env_count(
                "IRONLLM_MAX_DECODE_SPLITS",
                ops::DEFAULT_MAX_DECODE_SPLITS,
                ops::MAX_DECODE_SPLITS,
            ),
            decode_split_min_keys: env_count("IRONLLM_DECODE_SPLIT_MIN_KEYS", ops::DECODE_SPLIT_MIN_KEYS, 1 << 20),
            decode_split_rule,
            residual_epilogue: std::env::var_os("IRONLLM_DISABLE_RESIDUAL_EPILOGUE").is_none(),
            attn_kernels,
            fused_gate_up_min_rows,
            gemv_swiglu: std::env::var_os("IRONLLM_DISABLE_GEMV_SWIGLU").is_none(),
            gemv_norm: std::env::var_os("IRONLLM_DISABLE_GEMV_NORM").is_none(),
        })
    }

    /// Whether a step of `t` tokens takes the fused gate/up + SiLU-and-mul kernel.
    fn fused_gate_up(&self, t: usize) -> bool {
        self.fused_gate_up_min_rows.is_some_and(|min| t >= min)
    }

    /// Rows the unfused gate/up output buffer needs for steps of up to `t` tokens: steps the fused kernel
    /// takes never write it, so with that kernel it stays below its threshold (at the 8B shape's 16k-token
    /// budget, 0.9 GiB that the KV cache gets instead).
    fn gate_up_rows(&self, t: usize) -> usize {
        match self.fused_gate_up_min_rows {
            Some(min) => t.min(min.saturating_sub(1)).max(1),
            None => t,
        }
    }

    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// The decode attention's plans (share count and kernel form) to capture the decode graph of `batch`
    /// rows with, one graph each, for contexts up to `max_context` (`ops::graph_plans`); one share on the
    /// plain form without split-KV.
    pub fn graph_plans(&self, batch: usize, max_context: usize) -> Vec<ops::DecodePlan> {
        if !self.split_kv {
            return vec![ops::DecodePlan::plain(1)];
        }
        let kv = self.config.num_key_value_heads;
        ops::graph_plans(batch, kv, self.decode_split_rule, max_context, self.max_decode_splits)
    }

    /// Which of a batch's graphs (their plans, from [`CudaLlama::graph_plans`]) serves a step whose
    /// longest context is `context`: an index into `captured`.
    pub fn graph_plan_choice(&self, batch: usize, context: usize, captured: &[ops::DecodePlan]) -> usize {
        let pairs = batch * self.config.num_key_value_heads;
        ops::graph_plan_choice(pairs, context, self.decode_split_rule, captured)
    }

    /// Times cuBLASLt's algorithms for this model's projections (layer 0's weights, every layer has the
    /// same shapes) at each of `sizes` rows, and the LM head at each of `head_sizes`, on the workspace's
    /// buffers (see `lt_gemm`). Sizes the skinny GEMM serves, or beyond the workspace, are skipped; f32
    /// models (our own kernel) have nothing to tune. Returns (projection, m, result) per timed shape.
    pub fn tune_gemms(
        &self,
        ws: &mut Workspace,
        sizes: &[usize],
        head_sizes: &[usize],
    ) -> Result<Vec<(&'static str, usize, TuneResult)>, CudaError> {
        let mut out = Vec::new();
        let (gpu, c) = (&*self.gpu, &self.config);
        let Some(layer) = self.layers.first() else { return Ok(out) };
        if self.dtype == GpuDType::F32 {
            return Ok(out);
        }
        let served = |m: usize| m > ops::GEMV_MAX_M || !gpu.skinny_gemm;
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let qw = c.num_attention_heads * c.head_dim;
        let qkv_w = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim;
        let f = &mut DevBuf::zeros(gpu, GpuDType::F32, ops::l2_flush_bytes(gpu) / 4)?;
        let (max_tokens, max_rows) = (ws.max_tokens, ws.max_rows);
        let Workspace { normed, qkv, attn, proj, gate_up, act, rows_normed, logits, .. } = ws;
        for &m in sizes.iter().filter(|&&m| served(m) && m <= max_tokens) {
            out.push(("qkv", m, ops::tune_gemm(gpu, qkv, normed, &layer.qkv, m, qkv_w, h, f)?));
            out.push(("o", m, ops::tune_gemm(gpu, proj, attn, &layer.o_proj, m, h, qw, f)?));
            if !self.fused_gate_up(m) {
                out.push(("gate_up", m, ops::tune_gemm(gpu, gate_up, normed, &layer.gate_up, m, 2 * inter, h, f)?));
            }
            out.push(("down", m, ops::tune_gemm(gpu, proj, act, &layer.down, m, h, inter, f)?));
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        for &m in head_sizes.iter().filter(|&&m| served(m) && m <= max_rows) {
            out.push(("lm_head", m, ops::tune_gemm(gpu, logits, rows_normed, head, m, c.vocab_size, h, f)?));
        }
        Ok(out)
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// `residual += x @ w^T (+ bias)` for a projection back to the hidden size (o_proj, down): in the
    /// GEMM's epilogue where it can (`ops::gemm_accumulate`), else the GEMM into `proj`, left for the
    /// next norm to add. Says which.
    #[allow(clippy::too_many_arguments)]
    fn project_into_residual(
        &self,
        residual: &mut DevBuf,
        proj: &mut DevBuf,
        x: &DevBuf,
        w: &DevBuf,
        bias: Option<&DevBuf>,
        t: usize,
        k: usize,
    ) -> Result<Residual, CudaError> {
        let (gpu, h) = (&*self.gpu, self.config.hidden_size);
        if self.residual_epilogue && ops::gemm_accumulate(gpu, residual, x, w, bias, t, h, k)? {
            return Ok(Residual::Summed);
        }
        ops::gemm(gpu, proj, x, w, bias, t, h, k)?;
        Ok(Residual::PlusProj)
    }

    /// Runs one step's flattened batch; leaves f32 logits `[num_logits_rows, vocab]` in `ws.logits`.
    /// `prof` (IRONLLM_OP_TIMING) gets an event after each op.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        token_ids: &CudaSlice<u32>,
        meta: &BatchMeta<'_>,
        logits_rows: &CudaSlice<i32>,
        num_logits_rows: usize,
        kv: &mut CudaKvCache,
        ws: &mut Workspace,
        mut prof: Option<&mut OpMarks>,
    ) -> Result<(), CudaError> {
        let gpu = &*self.gpu;
        let c = &self.config;
        let t = meta.num_tokens;
        if t > ws.max_tokens || num_logits_rows > ws.max_rows {
            return Err(CudaError::Invalid(format!(
                "step of {t} tokens / {num_logits_rows} logits rows exceeds the workspace ({} / {})",
                ws.max_tokens, ws.max_rows
            )));
        }
        if t == 0 {
            return Ok(());
        }
        let (h, hd, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let shape = AttnShape {
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: hd,
            block_size: kv.block_size,
            num_blocks: kv.num_blocks,
        };
        let qkv_w = shape.qkv_width();
        let qw = c.num_attention_heads * hd;
        let eps = c.rms_norm_eps;
        let scale = 1.0 / (hd as f32).sqrt();
        // Split-KV only with the tensor-core prefill kernel (bf16/f16): float32 rows must not depend on
        // the batch.
        let plan = match meta.decode_plan {
            _ if !self.split_kv => ops::DecodePlan::plain(1),
            Some(plan) => ops::DecodePlan { splits: plan.splits.clamp(1, ops::MAX_DECODE_SPLITS), ..plan },
            None => ops::decode_plan(
                meta.num_decode_tokens,
                c.num_key_value_heads,
                self.decode_split_rule,
                meta.max_context_len,
                self.max_decode_splits,
            ),
        };
        let Workspace {
            residual,
            normed,
            qkv,
            attn,
            proj,
            gate_up,
            act,
            rows_a,
            rows_b,
            rows_normed,
            logits,
            part_o,
            part_lse,
            final_state,
            ..
        } = ws;
        // Work of each op for IRONLLM_OP_TIMING (f64 throughout: only read when timing).
        let e = self.dtype.size() as f64;
        let tf = t as f64;
        let gemm_flops = |n: usize, k: usize| Work::Flops(2.0 * tf * n as f64 * k as f64);
        let norm_bytes = |state: Residual| Work::Bytes(state.norm_rows() as f64 * tf * h as f64 * e);
        let (decode_keys, prefill_pairs) =
            prof.as_ref().map_or((0.0, 0.0), |p| (p.work.decode_keys, p.work.prefill_pairs));
        let kv_row = (c.num_key_value_heads * hd) as f64 * e;
        let fused_gate_up = self.fused_gate_up(t);
        ops::embedding(gpu, residual, &self.embed, token_ids, t, h)?;
        op_timer::mark(&mut prof, gpu, Op::Embed, Work::Bytes(2.0 * tf * h as f64 * e))?;
        // Where the last o_proj / down output is; the embedding leaves nothing pending.
        let mut state = Residual::Summed;
        for (li, layer) in self.layers.iter().enumerate() {
            // The norm in the QKV GEMM's prologue where it takes it (the residual stream complete), else
            // a norm kernel first.
            let input_norm = ops::InputNorm { weight: &layer.input_norm, eps };
            let qkv_bias = layer.qkv_bias.as_ref();
            if !(self.gemv_norm
                && state == Residual::Summed
                && ops::gemm_normed(gpu, qkv, residual, input_norm, &layer.qkv, qkv_bias, t, qkv_w, h)?)
            {
                residual_norm(gpu, state, residual, proj, &layer.input_norm, normed, t, h, eps)?;
                op_timer::mark(&mut prof, gpu, Op::Norm, norm_bytes(state))?;
                ops::gemm(gpu, qkv, normed, &layer.qkv, qkv_bias, t, qkv_w, h)?;
            }
            op_timer::mark(&mut prof, gpu, Op::QkvGemm, gemm_flops(qkv_w, h))?;
            let (kc, vc) = &mut kv.layers[li];
            let qk_norm = layer.q_norm.as_ref().zip(layer.k_norm.as_ref());
            ops::qk_norm_rope_kv(gpu, qkv, kc, vc, &self.rope_cos, &self.rope_sin, qk_norm, &shape, meta, eps)?;
            op_timer::mark(&mut prof, gpu, Op::RopeKv, Work::Bytes(tf * (2 * qkv_w) as f64 * e + tf * 2.0 * kv_row))?;
            let min_keys = self.decode_split_min_keys;
            let split = ops::DecodeSplit {
                num_splits: plan.splits,
                deep: plan.deep,
                min_keys,
                part_o: &mut *part_o,
                part_lse: &mut *part_lse,
            };
            let inputs = ops::AttnInputs {
                qkv,
                k_cache: kc,
                v_cache: vc,
                shape: &shape,
                meta,
                scale,
                kernels: &self.attn_kernels,
            };
            ops::attention_paged(gpu, attn, &inputs, Some(split))?;
            op_timer::mark(&mut prof, gpu, Op::AttnDecode, Work::Bytes(decode_keys * 2.0 * kv_row))?;
            ops::attention_prefill(gpu, attn, &inputs)?;
            let attn_flops = prefill_pairs * 4.0 * (c.num_attention_heads * hd) as f64;
            op_timer::mark(&mut prof, gpu, Op::AttnPrefill, Work::Flops(attn_flops))?;
            state = self.project_into_residual(residual, proj, attn, &layer.o_proj, layer.o_bias.as_ref(), t, qw)?;
            op_timer::mark(&mut prof, gpu, Op::OGemm, gemm_flops(h, qw))?;
            // Gate/up with SiLU-and-mul: the skinny GEMM with the norm in its prologue, else a norm kernel
            // and then the Hopper kernel with SiLU in its epilogue, the skinny GEMM with it, or a GEMM and
            // a SiLU-and-mul kernel.
            let swiglu = !fused_gate_up && self.gemv_swiglu && layer.gate_up_bias.is_none();
            let post_norm = ops::InputNorm { weight: &layer.post_norm, eps };
            let normed_in_gemm = swiglu
                && self.gemv_norm
                && state == Residual::Summed
                && ops::gemv_swiglu(gpu, act, residual, Some(post_norm), &layer.gate_up, t, inter, h)?;
            let gate_up_work = gemm_flops(2 * inter, h);
            if normed_in_gemm {
                op_timer::mark(&mut prof, gpu, Op::GateUpGemm, gate_up_work)?;
            } else {
                residual_norm(gpu, state, residual, proj, &layer.post_norm, normed, t, h, eps)?;
                op_timer::mark(&mut prof, gpu, Op::Norm, norm_bytes(state))?;
                if fused_gate_up {
                    fused_mlp::gate_up_silu(gpu, act, normed, &layer.gate_up, t, inter, h)?;
                    op_timer::mark(&mut prof, gpu, Op::GateUpGemm, gate_up_work)?;
                } else if swiglu && ops::gemv_swiglu(gpu, act, normed, None, &layer.gate_up, t, inter, h)? {
                    op_timer::mark(&mut prof, gpu, Op::GateUpGemm, gate_up_work)?;
                } else {
                    let bias = layer.gate_up_bias.as_ref();
                    ops::gemm(gpu, gate_up, normed, &layer.gate_up, bias, t, 2 * inter, h)?;
                    op_timer::mark(&mut prof, gpu, Op::GateUpGemm, gate_up_work)?;
                    ops::silu_and_mul(gpu, act, gate_up, t, inter)?;
                    op_timer::mark(&mut prof, gpu, Op::SiluMul, Work::Bytes(3.0 * tf * inter as f64 * e))?;
                }
            }
            state = self.project_into_residual(residual, proj, act, &layer.down, layer.down_bias.as_ref(), t, inter)?;
            op_timer::mark(&mut prof, gpu, Op::DownGemm, gemm_flops(h, inter))?;
        }
        *final_state = Some(state);
        let r = num_logits_rows;
        if r == 0 {
            return Ok(());
        }
        let gathered = Gathered { residual, proj, rows_a, rows_b, rows_normed };
        self.head(gathered, state, logits, logits_rows, r)?;
        op_timer::mark(&mut prof, gpu, Op::Head, Work::Flops(2.0 * r as f64 * c.vocab_size as f64 * h as f64))?;
        Ok(())
    }

    /// Logits of `r` more rows of the last forward's tokens (`rows` index them) into `ws.prompt_logits`:
    /// prompt logprobs, a chunk at a time, after the step's sampling rows.
    pub(crate) fn prompt_logits(&self, ws: &mut Workspace, rows: &CudaSlice<i32>, r: usize) -> Result<(), CudaError> {
        let Workspace {
            residual, proj, rows_a, rows_b, rows_normed, prompt_logits, final_state, max_prompt_rows, ..
        } = ws;
        let state = final_state.ok_or_else(|| CudaError::Invalid("prompt logits before any forward".into()))?;
        if r > *max_prompt_rows {
            return Err(CudaError::Invalid(format!("{r} prompt-logprob rows exceed the chunk of {max_prompt_rows}")));
        }
        self.head(Gathered { residual, proj, rows_a, rows_b, rows_normed }, state, prompt_logits, rows, r)
    }

    /// The last residual add (if the down GEMM left it pending), the final norm and the LM head, for the
    /// `r` rows that produce logits only.
    fn head(
        &self,
        g: Gathered<'_>,
        state: Residual,
        logits: &mut DevBuf,
        rows: &CudaSlice<i32>,
        r: usize,
    ) -> Result<(), CudaError> {
        let gpu = &*self.gpu;
        let c = &self.config;
        let h = c.hidden_size;
        ops::gather_rows(gpu, g.rows_a, g.residual, rows, r, h)?;
        if state == Residual::PlusProj {
            ops::gather_rows(gpu, g.rows_b, g.proj, rows, r, h)?;
        }
        residual_norm(gpu, state, g.rows_a, g.rows_b, &self.final_norm, g.rows_normed, r, h, c.rms_norm_eps)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        ops::gemm(gpu, logits, g.rows_normed, head, None, r, c.vocab_size, h)
    }
}

/// The workspace buffers the LM head reads (the last layer's output) and gathers into.
struct Gathered<'a> {
    residual: &'a DevBuf,
    proj: &'a DevBuf,
    rows_a: &'a mut DevBuf,
    rows_b: &'a mut DevBuf,
    rows_normed: &'a mut DevBuf,
}
