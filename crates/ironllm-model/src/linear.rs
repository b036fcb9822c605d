//! Linear layers polymorphic over their weight format (dense f32 or GGUF blocks), chosen at load, plus
//! the token embedding that shares the same storage (tied embeddings use one copy for both).

use std::sync::Arc;

use ironllm_kernels::cpu::matmul::matmul_f32;
use ironllm_kernels::cpu::quant::{self, GgmlType, PackedMatrix, QuantMatrix};

use crate::weights::{StoredTensor, StoredType};
use crate::ModelError;

/// How a weight matrix `[rows, cols]` is held in memory.
#[derive(Debug)]
pub enum WeightData {
    F32(Vec<f32>),
    /// GGUF blocks, each row `cols / block_size` blocks.
    Quant {
        ty: GgmlType,
        data: Vec<u8>,
    },
    /// GGUF blocks repacked into interleaved row groups for the AVX-512 VNNI kernel.
    Packed(PackedMatrix),
}

/// A weight matrix `[rows, cols]`.
#[derive(Debug)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: WeightData,
}

impl Matrix {
    /// Builds from a stored tensor; block-quantized tensors stay quantized when `keep_quantized`.
    pub fn from_stored(t: &StoredTensor<'_>, keep_quantized: bool) -> Result<Matrix, ModelError> {
        let (rows, cols) = match t.shape.as_slice() {
            [r, c] => (*r, *c),
            [c] => (1, *c),
            s => return Err(ModelError::Weights(format!("tensor `{}` has shape {s:?}, expected 2-D", t.name))),
        };
        let data = match t.dtype {
            StoredType::Ggml(ty) if keep_quantized && ty.block_size() > 1 => {
                let want = ty.row_bytes(cols).map(|b| b * rows);
                if want != Some(t.data.len()) {
                    return Err(ModelError::Weights(format!("tensor `{}` has the wrong byte size", t.name)));
                }
                WeightData::Quant { ty, data: t.data.to_vec() }
            }
            _ => WeightData::F32(t.to_f32()?),
        };
        Ok(Matrix { rows, cols, data })
    }

    /// The same matrix in the packed layout when this CPU has the packed kernel for its type
    /// (Q4_0, Q4_1, Q8_0 with AVX-512 VNNI); otherwise unchanged. Done once at load, after any
    /// stacking (`concat` needs the file layout).
    pub fn packed(self) -> Matrix {
        if let WeightData::Quant { ty, data } = &self.data {
            let w = QuantMatrix { ty: *ty, data, rows: self.rows, cols: self.cols };
            if let Some(p) = PackedMatrix::pack(&w) {
                return Matrix { rows: self.rows, cols: self.cols, data: WeightData::Packed(p) };
            }
        }
        self
    }

    /// `out[m, rows] = x[m, cols] · selfᵀ`.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        match &self.data {
            WeightData::F32(w) => matmul_f32(x, m, w, self.rows, self.cols, None, out),
            WeightData::Quant { ty, data } => {
                let w = QuantMatrix { ty: *ty, data, rows: self.rows, cols: self.cols };
                // Shapes were validated at load, so a failure here is a bug, not bad input.
                if let Err(e) = quant::quant_matmul(x, m, &w, out) {
                    panic!("quantized matmul on validated shapes failed: {e}");
                }
            }
            WeightData::Packed(p) => {
                if let Err(e) = quant::packed_matmul(x, m, p, out) {
                    panic!("packed matmul on validated shapes failed: {e}");
                }
            }
        }
    }

    /// Writes row `r` as f32 into `out` (embedding lookup).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        match &self.data {
            WeightData::F32(w) => out.copy_from_slice(&w[r * self.cols..(r + 1) * self.cols]),
            WeightData::Quant { ty, data } => {
                let rb = ty.row_bytes(self.cols).unwrap_or(0);
                if let Err(e) = quant::dequantize(*ty, &data[r * rb..(r + 1) * rb], out) {
                    panic!("dequantizing a validated row failed: {e}");
                }
            }
            WeightData::Packed(p) => {
                if let Err(e) = p.dequantize_row(r, out) {
                    panic!("dequantizing a validated packed row failed: {e}");
                }
            }
        }
    }

    /// Stacks matrices with the same column count and storage type row-wise (merged QKV, gate/up).
    pub fn concat(parts: &[Matrix]) -> Option<Matrix> {
        let first = parts.first()?;
        let cols = first.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let data = match &first.data {
            WeightData::F32(_) => {
                let mut all = Vec::with_capacity(rows * cols);
                for p in parts {
                    let WeightData::F32(w) = &p.data else { return None };
                    all.extend_from_slice(w);
                }
                WeightData::F32(all)
            }
            WeightData::Packed(_) => return None,
            WeightData::Quant { ty, .. } => {
                let mut all = Vec::new();
                for p in parts {
                    match &p.data {
                        WeightData::Quant { ty: t, data } if t == ty => all.extend_from_slice(data),
                        _ => return None,
                    }
                }
                WeightData::Quant { ty: *ty, data: all }
            }
        };
        Some(Matrix { rows, cols, data })
    }

    /// A short description of the storage, for logs.
    pub fn format_name(&self) -> &'static str {
        match &self.data {
            WeightData::F32(_) => "f32",
            WeightData::Quant { ty, .. } => ty.name(),
            WeightData::Packed(p) => p.ty().name(),
        }
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        match &self.data {
            WeightData::F32(w) => w.len() * 4,
            WeightData::Quant { data, .. } => data.len(),
            WeightData::Packed(p) => p.nbytes(),
        }
    }
}

/// `y = x Wᵀ + b`, with W possibly the row-wise stack of several projections. When the parts cannot be
/// stacked (different quantization types), each part runs on its own and writes its columns.
#[derive(Debug)]
pub struct Linear {
    parts: Vec<Arc<Matrix>>,
    bias: Option<Vec<f32>>,
    out_features: usize,
    in_features: usize,
}

impl Linear {
    /// A linear layer over one or more weight matrices (stacked along the output dimension) and their
    /// optional biases (all present or all absent).
    pub fn new(mut parts: Vec<Matrix>, biases: Vec<Option<Vec<f32>>>) -> Result<Linear, ModelError> {
        let in_features = parts.first().map(|p| p.cols).ok_or_else(|| ModelError::Weights("empty linear".into()))?;
        if parts.iter().any(|p| p.cols != in_features) {
            return Err(ModelError::Weights("stacked projections differ in input size".into()));
        }
        let out_features = parts.iter().map(|p| p.rows).sum();
        let bias = if biases.iter().all(Option::is_some) && !biases.is_empty() {
            let mut all = Vec::with_capacity(out_features);
            for (b, p) in biases.into_iter().zip(&parts) {
                let b = b.unwrap_or_default();
                if b.len() != p.rows {
                    return Err(ModelError::Weights(format!("bias of length {} for {} outputs", b.len(), p.rows)));
                }
                all.extend(b);
            }
            Some(all)
        } else if biases.iter().any(Option::is_some) {
            return Err(ModelError::Weights("some but not all stacked projections have a bias".into()));
        } else {
            None
        };
        if parts.len() > 1 {
            if let Some(m) = Matrix::concat(&parts) {
                parts = vec![m];
            }
        }
        Ok(Linear { parts: parts.into_iter().map(|p| Arc::new(p.packed())).collect(), bias, out_features, in_features })
    }

    /// A linear layer that shares an existing matrix (tied embeddings).
    pub fn shared(m: Arc<Matrix>) -> Linear {
        let (out_features, in_features) = (m.rows, m.cols);
        Linear { parts: vec![m], bias: None, out_features, in_features }
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The first weight matrix (for sharing and reporting).
    pub fn matrix(&self) -> &Arc<Matrix> {
        &self.parts[0]
    }

    /// `out[m, out_features] = x[m, in_features] Wᵀ + b`. `scratch` is used when parts run separately.
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32], scratch: &mut Vec<f32>) {
        assert_eq!(x.len(), m * self.in_features, "linear: input is not [m, in_features]");
        assert_eq!(out.len(), m * self.out_features, "linear: output is not [m, out_features]");
        if self.parts.len() == 1 {
            self.parts[0].matmul(x, m, out);
        } else {
            let mut col = 0;
            for p in &self.parts {
                scratch.resize(m * p.rows, 0.0);
                p.matmul(x, m, scratch);
                for t in 0..m {
                    out[t * self.out_features + col..t * self.out_features + col + p.rows]
                        .copy_from_slice(&scratch[t * p.rows..(t + 1) * p.rows]);
                }
                col += p.rows;
            }
        }
        if let Some(b) = &self.bias {
            for row in out.chunks_mut(self.out_features) {
                for (o, bv) in row.iter_mut().zip(b) {
                    *o += bv;
                }
            }
        }
    }

    /// Bytes of weights held (shared matrices counted once per holder).
    pub fn nbytes(&self) -> usize {
        self.parts.iter().map(|p| p.nbytes()).sum::<usize>() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }
}
