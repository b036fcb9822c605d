//! A small GGUF writer, the inverse of the reader: tests use it to build files in memory (a synthetic
//! tokenizer, a corrupt header), and tools can use it to write metadata-only files.
//!
//! It writes version 3, little-endian, with the alignment taken from `general.alignment` when the
//! caller set it (as a u32), else 32. Tensor data is placed in the order tensors were added, each
//! padded to the alignment, exactly as llama.cpp lays files out.

use super::{GgufValue, GGUF_ALIGNMENT_KEY, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC};

/// Builds a GGUF file image. Metadata keeps insertion order, as in the files llama.cpp writes.
#[derive(Debug, Default, Clone)]
pub struct GgufWriter {
    pub(super) metadata: Vec<(String, GgufValue)>,
    pub(super) tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata key/value (later keys with the same name are written too, which the reader
    /// rejects; tests use that to build corrupt files).
    pub fn metadata(&mut self, key: impl Into<String>, value: GgufValue) -> &mut Self {
        self.metadata.push((key.into(), value));
        self
    }

    /// Adds a tensor with GGUF-order `dims` (innermost first), a GGML type id and its raw bytes.
    pub fn tensor(&mut self, name: impl Into<String>, dims: Vec<u64>, ggml_type: u32, data: Vec<u8>) -> &mut Self {
        self.tensors.push((name.into(), dims, ggml_type, data));
        self
    }

    fn alignment(&self) -> u64 {
        self.metadata
            .iter()
            .find(|(k, _)| k == GGUF_ALIGNMENT_KEY)
            .and_then(|(_, v)| match v {
                GgufValue::U32(a) if *a > 0 => Some(u64::from(*a)),
                _ => None,
            })
            .unwrap_or(GGUF_DEFAULT_ALIGNMENT)
    }

    /// The complete file image.
    pub fn to_bytes(&self) -> Vec<u8> {
        let alignment = self.alignment();
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_string(&mut out, key);
            out.extend_from_slice(&value.type_id().to_le_bytes());
            write_value(&mut out, value);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for (_, _, _, data) in &self.tensors {
            offsets.push(offset);
            offset = (offset + data.len() as u64).div_ceil(alignment) * alignment;
        }
        for ((name, dims, ggml_type, _), offset) in self.tensors.iter().zip(&offsets) {
            write_string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ggml_type.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        }
        pad_to(&mut out, alignment);
        for (_, _, _, data) in &self.tensors {
            out.extend_from_slice(data);
            pad_to(&mut out, alignment);
        }
        out
    }
}

fn pad_to(out: &mut Vec<u8>, alignment: u64) {
    let len = out.len() as u64;
    let padded = len.div_ceil(alignment) * alignment;
    out.resize(padded as usize, 0);
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, value: &GgufValue) {
    match value {
        GgufValue::U8(v) => out.push(*v),
        GgufValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::Bool(v) => out.push(u8::from(*v)),
        GgufValue::String(s) => write_string(out, s),
        GgufValue::Array(items) => {
            // GGUF arrays are homogeneous: the element type is written once, taken from the first
            // item (callers must not mix types). An empty array has no item to take it from; any type
            // reads back as an empty array, so u8 is as good as any.
            let elem_type = items.first().map_or(0, GgufValue::type_id);
            out.extend_from_slice(&elem_type.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(out, item);
            }
        }
    }
}
