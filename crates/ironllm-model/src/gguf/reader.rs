//! The GGUF parser: a bounds-checked cursor over the file's bytes.
//!
//! Every count and length in a GGUF file is attacker- (or bit-rot-) controlled, so before any
//! allocation the cursor checks that the bytes the count implies are really left: a string of length
//! n needs n bytes, an array of n elements needs at least n times the smallest encoding of its element
//! type. A corrupt length therefore fails fast with [`GgufError::Truncated`] instead of asking the
//! allocator for terabytes. Nested arrays are limited in depth so a crafted file cannot overflow the
//! stack.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use super::{GgufError, GgufTensorInfo, GgufValue, GGUF_ALIGNMENT_KEY, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC};

/// GGML allows at most 4 dims; a little slack lets newer files through while still rejecting garbage.
const MAX_TENSOR_DIMS: u32 = 8;
/// Upper bound on the capacity reserved for one array before its elements are read.
const MAX_PREALLOCATED_ITEMS: usize = 1 << 16;
/// Real files nest arrays at most one level; anything deeper than this is corruption.
const MAX_ARRAY_DEPTH: u32 = 16;

/// Everything before the data section.
pub(super) struct Parsed {
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    pub data_offset: u64,
}

struct Cursor<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn truncated(&self, what: &str, needed: u64) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_path_buf(),
            offset: self.pos as u64,
            what: what.to_string(),
            needed,
            available: self.remaining() as u64,
        }
    }

    fn corrupt(&self, offset: usize, what: String) -> GgufError {
        GgufError::Corrupt { path: self.path.to_path_buf(), offset: offset as u64, what }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(self.truncated(what, n as u64));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        self.array::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        self.array::<8>(what).map(u64::from_le_bytes)
    }

    /// A count that claims `count` items of at least `min_item_bytes` each; rejected unless that many
    /// bytes are left, which bounds any allocation by the file size.
    fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<usize, GgufError> {
        let at = self.pos;
        let count = self.u64(what)?;
        let needed = count.saturating_mul(min_item_bytes as u64);
        if needed > self.remaining() as u64 {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                offset: at as u64,
                what: format!("{what} ({count} items of at least {min_item_bytes} bytes)"),
                needed,
                available: self.remaining() as u64,
            });
        }
        // needed <= remaining <= usize::MAX and min_item_bytes >= 1, so count fits in usize.
        usize::try_from(count).map_err(|_| self.corrupt(at, format!("{what} {count} does not fit in memory")))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.count(what, 1)?;
        let start = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| self.corrupt(start, format!("{what} is not valid UTF-8: {e}")))
    }

    fn value(&mut self, type_id: u32, what: &str, depth: u32) -> Result<GgufValue, GgufError> {
        Ok(match type_id {
            0 => GgufValue::U8(self.array::<1>(what)?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.array::<1>(what)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array::<2>(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array::<2>(what)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array::<4>(what)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array::<4>(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array::<4>(what)?)),
            7 => {
                let at = self.pos;
                match self.array::<1>(what)?[0] {
                    0 => GgufValue::Bool(false),
                    1 => GgufValue::Bool(true),
                    b => return Err(self.corrupt(at, format!("{what}: bool byte is {b}, expected 0 or 1"))),
                }
            }
            8 => GgufValue::String(self.string(what)?),
            9 => {
                let at = self.pos;
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.corrupt(at, format!("{what}: arrays nested more than {MAX_ARRAY_DEPTH} deep")));
                }
                let elem_type = self.u32(what)?;
                let min_bytes = min_encoded_size(elem_type)
                    .ok_or_else(|| self.corrupt(at, format!("{what}: unknown array element type {elem_type}")))?;
                let len = self.count(what, min_bytes)?;
                // A parsed value is larger than its encoding (a u8 becomes a 32-byte GgufValue), so
                // reserve at most a modest amount up front and let a genuinely large array grow.
                let mut items = Vec::with_capacity(len.min(MAX_PREALLOCATED_ITEMS));
                for _ in 0..len {
                    items.push(self.value(elem_type, what, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array::<8>(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array::<8>(what)?)),
            other => {
                // The type id was just read; point the error at it.
                return Err(self.corrupt(self.pos.saturating_sub(4), format!("{what}: unknown value type {other}")));
            }
        })
    }
}

/// The fewest bytes one value of GGUF type `type_id` can take, or `None` for an unknown type.
fn min_encoded_size(type_id: u32) -> Option<usize> {
    Some(match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        // A string is at least its u64 length; an array at least its element type and count.
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}

pub(super) fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed, GgufError> {
    let mut c = Cursor { path, bytes, pos: 0 };

    let magic = c.array::<4>("magic")?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic { path: path.to_path_buf(), found: magic });
    }
    let version = c.u32("version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(GgufError::UnsupportedVersion {
                path: path.to_path_buf(),
                version,
                message:
                    "GGUF version 1 (32-bit counts) is not supported; re-convert the model with a current llama.cpp"
                        .into(),
            })
        }
        // A big-endian file stores its version byte-swapped, so 2 reads as 0x0200_0000.
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err(GgufError::UnsupportedVersion {
                path: path.to_path_buf(),
                version: v.swap_bytes(),
                message: "big-endian GGUF files are not supported".into(),
            })
        }
        v => {
            return Err(GgufError::UnsupportedVersion {
                path: path.to_path_buf(),
                version: v,
                message: format!("unsupported GGUF version {v} (supported: 2, 3)"),
            })
        }
    }

    // Smallest tensor info: empty name (8), n_dims (4), type (4), offset (8).
    let tensor_count = c.count("tensor count", 24)?;
    // Smallest key/value: empty key (8), type (4), one-byte value (1).
    let kv_count = c.count("metadata count", 13)?;

    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key_at = c.pos;
        let key = c.string(&format!("metadata key #{i}"))?;
        let type_id = c.u32(&format!("type of metadata {key:?}"))?;
        let value = c.value(type_id, &format!("metadata {key:?}"), 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(c.corrupt(key_at, format!("duplicate metadata key {key:?}")));
        }
    }

    let alignment = match metadata.get(GGUF_ALIGNMENT_KEY) {
        None => GGUF_DEFAULT_ALIGNMENT,
        Some(GgufValue::U32(a)) if *a > 0 && a.is_power_of_two() => u64::from(*a),
        Some(other) => {
            return Err(c.corrupt(
                c.pos,
                format!("{GGUF_ALIGNMENT_KEY} must be a non-zero power of two u32, got {} {other}", other.type_name()),
            ))
        }
    };

    let mut tensors = Vec::with_capacity(tensor_count);
    let mut names = HashSet::with_capacity(tensor_count);
    for i in 0..tensor_count {
        let info_at = c.pos;
        let name = c.string(&format!("name of tensor #{i}"))?;
        let n_dims_at = c.pos;
        let n_dims = c.u32(&format!("dim count of tensor {name:?}"))?;
        if n_dims > MAX_TENSOR_DIMS {
            return Err(c.corrupt(n_dims_at, format!("tensor {name:?} has {n_dims} dims (at most {MAX_TENSOR_DIMS})")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&format!("dims of tensor {name:?}"))?);
        }
        let ggml_type = c.u32(&format!("type of tensor {name:?}"))?;
        let offset_at = c.pos;
        let offset = c.u64(&format!("offset of tensor {name:?}"))?;
        if offset % alignment != 0 {
            return Err(c.corrupt(
                offset_at,
                format!("tensor {name:?} offset {offset} is not a multiple of the alignment {alignment}"),
            ));
        }
        let info = GgufTensorInfo { name, dims, ggml_type, offset };
        if info.num_elements().is_none() {
            return Err(c.corrupt(n_dims_at, format!("tensor {:?} dims {:?} overflow u64", info.name, info.dims)));
        }
        if !names.insert(info.name.clone()) {
            return Err(c.corrupt(info_at, format!("duplicate tensor name {:?}", info.name)));
        }
        tensors.push(info);
    }

    // The data section starts at the next multiple of the alignment. A file without tensors may end
    // before it; tensor offsets are checked against the real length when the bytes are asked for.
    let header_end = c.pos as u64;
    let data_offset = header_end.div_ceil(alignment) * alignment;
    if !tensors.is_empty() && data_offset > bytes.len() as u64 {
        return Err(GgufError::Truncated {
            path: path.to_path_buf(),
            offset: header_end,
            what: "padding before the data section".into(),
            needed: data_offset - header_end,
            available: bytes.len() as u64 - header_end,
        });
    }
    let data_len = (bytes.len() as u64).saturating_sub(data_offset);
    if let Some(t) = tensors.iter().find(|t| t.offset > data_len) {
        return Err(c.corrupt(
            header_end as usize,
            format!("tensor {:?} starts at data offset {}, past the {data_len}-byte data section", t.name, t.offset),
        ));
    }

    Ok(Parsed { version, metadata, tensors, alignment, data_offset })
}
