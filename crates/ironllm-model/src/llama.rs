//! The Llama-family decoder, written once for Llama 2/3, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm) and
//! SmolLM2: embeddings, pre-norm attention with grouped-query heads over the paged KV cache, SwiGLU MLP,
//! final norm and the LM head (tied or not).
//!
//! One `forward` runs the whole flattened batch of a step — prefills, chunked prefills and decodes mixed —
//! and produces logits only for the rows that sample.

use std::sync::Arc;

use half::{bf16, f16};
use ironllm_kernels::cpu::activation::silu_and_mul;
use ironllm_kernels::cpu::attention::{paged_attention, write_kv, KvDType, KvElement, KvLayout, SeqSpan};
use ironllm_kernels::cpu::norm::{add_rms_norm, rms_norm, rms_norm_inplace};
use ironllm_kernels::cpu::rope::{Llama3Scaling, RopeTable};

use crate::config::{ModelConfig, RopeScaling};
use crate::linear::{Linear, Matrix};
use crate::profile::{Clock, Op};
use crate::weights::WeightSource;
use crate::ModelError;

struct Layer {
    input_norm: Vec<f32>,
    qkv: Linear,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    o_proj: Linear,
    post_norm: Vec<f32>,
    gate_up: Linear,
    down: Linear,
}

/// A loaded Llama-family model.
pub struct LlamaModel {
    pub config: ModelConfig,
    embed: Arc<Matrix>,
    layers: Vec<Layer>,
    final_norm: Vec<f32>,
    lm_head: Linear,
    rope: RopeTable,
}

/// The paged KV cache: per layer, K and V of layout `[num_blocks, num_kv_heads, block_size, head_dim]`,
/// in the element type `--kv-cache-dtype` chose (f32, f16 or bf16).
pub struct KvCache {
    pub layout: KvLayout,
    layers: KvLayers,
}

/// Per layer (K, V), in the cache's element type.
enum KvLayers {
    F32(Vec<(Vec<f32>, Vec<f32>)>),
    F16(Vec<(Vec<f16>, Vec<f16>)>),
    BF16(Vec<(Vec<bf16>, Vec<bf16>)>),
}

fn alloc_layers<T: KvElement>(num_layers: usize, layout: &KvLayout) -> Vec<(Vec<T>, Vec<T>)> {
    (0..num_layers).map(|_| (T::zeroed(layout.layer_len()), T::zeroed(layout.layer_len()))).collect()
}

impl KvCache {
    /// Allocates `num_blocks` blocks of `dtype` elements for every layer of `config`.
    pub fn new(config: &ModelConfig, num_blocks: usize, block_size: usize, dtype: KvDType) -> KvCache {
        let layout =
            KvLayout { num_blocks, num_kv_heads: config.num_key_value_heads, block_size, head_dim: config.head_dim };
        let n = config.num_hidden_layers;
        let layers = match dtype {
            KvDType::F32 => KvLayers::F32(alloc_layers(n, &layout)),
            KvDType::F16 => KvLayers::F16(alloc_layers(n, &layout)),
            KvDType::BF16 => KvLayers::BF16(alloc_layers(n, &layout)),
        };
        KvCache { layout, layers }
    }

    /// The element type the cache holds.
    pub fn dtype(&self) -> KvDType {
        match self.layers {
            KvLayers::F32(_) => KvDType::F32,
            KvLayers::F16(_) => KvDType::F16,
            KvLayers::BF16(_) => KvDType::BF16,
        }
    }

    /// Bytes one token's K and V take over all layers in a cache of `dtype`.
    pub fn bytes_per_token(config: &ModelConfig, dtype: KvDType) -> usize {
        2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.size_bytes()
    }

    /// Stores this step's K and V (`[tokens, num_kv_heads * head_dim]`, f32) of layer `li` in their slots.
    fn write(&mut self, li: usize, k: &[f32], v: &[f32], slots: &[usize]) {
        let layout = &self.layout;
        match &mut self.layers {
            KvLayers::F32(l) => {
                let (kc, vc) = &mut l[li];
                write_kv(layout, k, v, slots, kc, vc)
            }
            KvLayers::F16(l) => {
                let (kc, vc) = &mut l[li];
                write_kv(layout, k, v, slots, kc, vc)
            }
            KvLayers::BF16(l) => {
                let (kc, vc) = &mut l[li];
                write_kv(layout, k, v, slots, kc, vc)
            }
        }
    }

    /// Paged attention of `q` over layer `li`'s cache (see [`paged_attention`]).
    fn attend(&self, li: usize, q: &[f32], num_heads: usize, seqs: &[SeqSpan<'_>], scale: f32, out: &mut [f32]) {
        let layout = &self.layout;
        match &self.layers {
            KvLayers::F32(l) => paged_attention(layout, q, num_heads, &l[li].0, &l[li].1, seqs, scale, out),
            KvLayers::F16(l) => paged_attention(layout, q, num_heads, &l[li].0, &l[li].1, seqs, scale, out),
            KvLayers::BF16(l) => paged_attention(layout, q, num_heads, &l[li].0, &l[li].1, seqs, scale, out),
        }
    }
}

/// One step's flattened batch, as the model runner prepared it.
#[derive(Debug, Clone, Copy)]
pub struct ForwardBatch<'a> {
    /// [num_tokens]
    pub token_ids: &'a [u32],
    /// [num_tokens]
    pub positions: &'a [usize],
    /// [num_tokens] cache slot of each token (`block_id * block_size + offset`).
    pub slot_mapping: &'a [usize],
    /// One span per sequence, in batch order.
    pub seqs: &'a [SeqSpan<'a>],
    /// Rows of the batch whose logits are needed, in output order.
    pub logits_rows: &'a [usize],
}

/// Activation buffers reused across steps; they only grow.
#[derive(Default)]
pub struct Workspace {
    residual: Vec<f32>,
    normed: Vec<f32>,
    qkv: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    rows: Vec<f32>,
    rows_normed: Vec<f32>,
    scratch: Vec<f32>,
    /// [logits_rows, vocab]
    pub logits: Vec<f32>,
}

fn grow(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

/// The rotary tables a config implies (rope scaling, GGUF frequency factors) for `max_positions`.
pub fn rope_table(c: &ModelConfig, freq_factors: Option<&[f32]>, max_positions: usize) -> RopeTable {
    let (llama3, linear) = match c.rope_scaling {
        RopeScaling::None => (None, None),
        RopeScaling::Linear { factor } => (None, Some(factor)),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            (Some(Llama3Scaling { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }), None)
        }
    };
    RopeTable::new(c.head_dim, c.head_dim, c.rope_theta, max_positions, llama3, linear, freq_factors)
}

impl LlamaModel {
    /// Loads every tensor from `source`. `keep_quantized` keeps GGUF block weights as they are
    /// (quantized matmuls); otherwise everything becomes f32.
    pub fn load(
        config: ModelConfig,
        source: &WeightSource,
        keep_quantized: bool,
        max_positions: usize,
    ) -> Result<LlamaModel, ModelError> {
        let c = &config;
        let vec_of = |name: &str| -> Result<Vec<f32>, ModelError> { source.require(name)?.to_f32() };
        let opt_vec =
            |name: &str| -> Result<Option<Vec<f32>>, ModelError> { source.get(name)?.map(|t| t.to_f32()).transpose() };
        let mat = |name: &str, rows: usize, cols: usize| -> Result<Matrix, ModelError> {
            let m = Matrix::from_stored(&source.require(name)?, keep_quantized)?;
            if m.rows != rows || m.cols != cols {
                return Err(ModelError::Weights(format!(
                    "tensor `{name}` is [{}, {}], the config implies [{rows}, {cols}]",
                    m.rows, m.cols
                )));
            }
            Ok(m)
        };
        let check_len = |name: &str, v: &Vec<f32>, n: usize| -> Result<(), ModelError> {
            if v.len() == n {
                Ok(())
            } else {
                Err(ModelError::Weights(format!("tensor `{name}` has {} elements, expected {n}", v.len())))
            }
        };
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let (q_width, kv_width) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        // Packed when possible: tied models use it as the LM head too, and the row lookups of the
        // embedding read the packed layout just as well.
        let embed = Arc::new(mat("model.embed_tokens.weight", c.vocab_size, h)?.packed());
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}.");
            let n = |s: &str| format!("{p}{s}");
            let input_norm = vec_of(&n("input_layernorm.weight"))?;
            check_len(&n("input_layernorm.weight"), &input_norm, h)?;
            let post_norm = vec_of(&n("post_attention_layernorm.weight"))?;
            check_len(&n("post_attention_layernorm.weight"), &post_norm, h)?;
            let qkv = Linear::new(
                vec![
                    mat(&n("self_attn.q_proj.weight"), q_width, h)?,
                    mat(&n("self_attn.k_proj.weight"), kv_width, h)?,
                    mat(&n("self_attn.v_proj.weight"), kv_width, h)?,
                ],
                vec![
                    opt_vec(&n("self_attn.q_proj.bias"))?,
                    opt_vec(&n("self_attn.k_proj.bias"))?,
                    opt_vec(&n("self_attn.v_proj.bias"))?,
                ],
            )?;
            let o_proj = Linear::new(
                vec![mat(&n("self_attn.o_proj.weight"), h, q_width)?],
                vec![opt_vec(&n("self_attn.o_proj.bias"))?],
            )?;
            let (q_norm, k_norm) = if c.qk_norm {
                let q = vec_of(&n("self_attn.q_norm.weight"))?;
                let k = vec_of(&n("self_attn.k_norm.weight"))?;
                check_len(&n("self_attn.q_norm.weight"), &q, c.head_dim)?;
                check_len(&n("self_attn.k_norm.weight"), &k, c.head_dim)?;
                (Some(q), Some(k))
            } else {
                (None, None)
            };
            let gate_up = Linear::new(
                vec![mat(&n("mlp.gate_proj.weight"), inter, h)?, mat(&n("mlp.up_proj.weight"), inter, h)?],
                vec![opt_vec(&n("mlp.gate_proj.bias"))?, opt_vec(&n("mlp.up_proj.bias"))?],
            )?;
            let down = Linear::new(
                vec![mat(&n("mlp.down_proj.weight"), h, inter)?],
                vec![opt_vec(&n("mlp.down_proj.bias"))?],
            )?;
            layers.push(Layer { input_norm, qkv, q_norm, k_norm, o_proj, post_norm, gate_up, down });
        }
        let final_norm = vec_of("model.norm.weight")?;
        check_len("model.norm.weight", &final_norm, h)?;
        let lm_head = match source.get("lm_head.weight")? {
            Some(t) => {
                let m = Matrix::from_stored(&t, keep_quantized)?;
                if m.rows != c.vocab_size || m.cols != h {
                    return Err(ModelError::Weights(
                        "`lm_head.weight` does not match [vocab_size, hidden_size]".into(),
                    ));
                }
                Linear::new(vec![m], vec![None])?
            }
            _ => Linear::shared(embed.clone()),
        };
        let freq_factors = opt_vec("rope_freqs")?;
        let rope = rope_table(c, freq_factors.as_deref(), max_positions);
        Ok(LlamaModel { config, embed, layers, final_norm, lm_head, rope })
    }

    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| l.qkv.nbytes() + l.o_proj.nbytes() + l.gate_up.nbytes() + l.down.nbytes() + 8 * l.input_norm.len())
            .sum();
        let head = if Arc::ptr_eq(self.lm_head.matrix(), &self.embed) { 0 } else { self.lm_head.nbytes() };
        self.embed.nbytes() + layers + head
    }

    /// Storage format of the linear layers (first layer's), for the start-up summary.
    pub fn weight_format(&self) -> &'static str {
        self.layers.first().map_or("f32", |l| l.qkv.matrix().format_name())
    }

    /// Runs the batch; returns logits `[batch.logits_rows.len(), vocab_size]` in `ws.logits`.
    pub fn forward(&self, batch: &ForwardBatch<'_>, kv: &mut KvCache, ws: &mut Workspace) {
        let c = &self.config;
        let t = batch.token_ids.len();
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let (qw, kvw) = (nh * hd, nkv * hd);
        let qkv_w = qw + 2 * kvw;
        let inter = c.intermediate_size;
        assert!(batch.positions.len() == t && batch.slot_mapping.len() == t, "forward: batch arrays differ in length");
        let scale = 1.0 / (hd as f32).sqrt();

        let Workspace { residual, normed, qkv, q, k, v, attn, proj, gate_up, act, rows, rows_normed, scratch, logits } =
            ws;
        let mut clock = Clock::start();
        let residual = grow(residual, t * h);
        for (row, &tok) in residual.chunks_mut(h).zip(batch.token_ids) {
            self.embed.row(tok as usize, row);
        }
        let normed = grow(normed, t * h);
        let proj = grow(proj, t * h);
        clock.lap(Op::Embed);
        for (li, layer) in self.layers.iter().enumerate() {
            if li == 0 {
                rms_norm(residual, &layer.input_norm, c.rms_norm_eps, normed);
            } else {
                add_rms_norm(proj, residual, &layer.input_norm, c.rms_norm_eps, normed);
            }
            clock.lap(Op::Norms);
            let qkv = grow(qkv, t * qkv_w);
            layer.qkv.forward(normed, t, qkv, scratch);
            clock.lap(Op::QkvProj);
            let (q, k, v) = (grow(q, t * qw), grow(k, t * kvw), grow(v, t * kvw));
            for (i, row) in qkv.chunks(qkv_w).enumerate() {
                q[i * qw..(i + 1) * qw].copy_from_slice(&row[..qw]);
                k[i * kvw..(i + 1) * kvw].copy_from_slice(&row[qw..qw + kvw]);
                v[i * kvw..(i + 1) * kvw].copy_from_slice(&row[qw + kvw..]);
            }
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                rms_norm_inplace(q, qn, c.rms_norm_eps);
                rms_norm_inplace(k, kn, c.rms_norm_eps);
            }
            self.rope.apply(q, nh, batch.positions);
            self.rope.apply(k, nkv, batch.positions);
            kv.write(li, k, v, batch.slot_mapping);
            clock.lap(Op::RopeKvWrite);
            let attn = grow(attn, t * qw);
            kv.attend(li, q, nh, batch.seqs, scale, attn);
            clock.lap(Op::Attention);
            layer.o_proj.forward(attn, t, proj, scratch);
            clock.lap(Op::OProj);
            add_rms_norm(proj, residual, &layer.post_norm, c.rms_norm_eps, normed);
            clock.lap(Op::Norms);
            let gate_up = grow(gate_up, t * 2 * inter);
            layer.gate_up.forward(normed, t, gate_up, scratch);
            clock.lap(Op::GateUpProj);
            let act = grow(act, t * inter);
            silu_and_mul(gate_up, inter, act);
            clock.lap(Op::SiluMul);
            layer.down.forward(act, t, proj, scratch);
            clock.lap(Op::DownProj);
        }
        // Only the rows that produce logits need the last residual add, the final norm and the LM head.
        let r = batch.logits_rows.len();
        let rows = grow(rows, r * h);
        for (dst, &row) in rows.chunks_mut(h).zip(batch.logits_rows) {
            for i in 0..h {
                dst[i] = residual[row * h + i] + proj[row * h + i];
            }
        }
        let rows_normed = grow(rows_normed, r * h);
        rms_norm(rows, &self.final_norm, c.rms_norm_eps, rows_normed);
        clock.lap(Op::Norms);
        if logits.len() != r * c.vocab_size {
            logits.resize(r * c.vocab_size, 0.0);
        }
        self.lm_head.forward(rows_normed, r, logits, scratch);
        clock.lap(Op::LmHead);
    }
}
