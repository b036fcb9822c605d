//! GGUF files: llama.cpp's single-file format for a model's metadata and (usually quantized) weights.
//!
//! A GGUF file is, little-endian: the magic `GGUF`, a version (2 or 3 here; version 1 used 32-bit
//! counts and is long gone), a tensor count and a metadata count, the metadata key/value pairs, one
//! info record per tensor (name, dims, GGML type id, offset), padding up to the file's alignment
//! (`general.alignment`, default 32) and then the data section that every tensor offset is relative to.
//!
//! [`GgufFile::open`] memory-maps the file and parses everything before the data section eagerly; the
//! weights stay in the page cache and [`GgufFile::tensor_bytes`] hands out borrowed slices of them.
//! The invariant this module keeps: every length read from the file is checked against the bytes that
//! are actually left before anything is allocated or sliced, so a truncated or corrupt file gives a
//! [`GgufError`] naming the path, the byte offset and what was wrong, never a panic or a huge
//! allocation.
//!
//! Tensor byte sizes depend on the GGML type's block layout, which the kernels crate owns; to keep the
//! reader independent of it, [`GgufFile::tensor_bytes`] takes the byte count from the caller.
//!
//! [`GgufWriter`] writes the same format; tests use it to build small files in memory.

mod reader;
mod writer;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub use writer::GgufWriter;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Data-section alignment when the file does not set `general.alignment`.
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;
/// Metadata key that overrides [`GGUF_DEFAULT_ALIGNMENT`].
pub const GGUF_ALIGNMENT_KEY: &str = "general.alignment";

/// One metadata value. Arrays may nest (GGUF allows arrays of arrays).
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// Any integer that fits in a `u64` (negative signed values do not).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(u64::from(v)),
            GgufValue::U16(v) => Some(u64::from(v)),
            GgufValue::U32(v) => Some(u64::from(v)),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer that fits in an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::U8(v) => Some(i64::from(v)),
            GgufValue::U16(v) => Some(i64::from(v)),
            GgufValue::U32(v) => Some(i64::from(v)),
            GgufValue::U64(v) => i64::try_from(v).ok(),
            GgufValue::I8(v) => Some(i64::from(v)),
            GgufValue::I16(v) => Some(i64::from(v)),
            GgufValue::I32(v) => Some(i64::from(v)),
            GgufValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Floats, and integers converted to `f64` (converters write e.g. `rope.freq_base` either way).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(f64::from(v)),
            GgufValue::F64(v) => Some(v),
            // Integers above 2^53 lose precision here; metadata never holds such values as floats.
            _ => self.as_i64().map(|v| v as f64).or_else(|| self.as_u64().map(|v| v as f64)),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF name of this value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F32(_) => "f32",
            GgufValue::F64(_) => "f64",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
        }
    }

    /// The GGUF type id written before a value of this type.
    pub(crate) fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }
}

impl fmt::Display for GgufValue {
    /// Short human-readable form; long arrays are elided so a tokenizer vocabulary does not flood logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgufValue::U8(v) => write!(f, "{v}"),
            GgufValue::I8(v) => write!(f, "{v}"),
            GgufValue::U16(v) => write!(f, "{v}"),
            GgufValue::I16(v) => write!(f, "{v}"),
            GgufValue::U32(v) => write!(f, "{v}"),
            GgufValue::I32(v) => write!(f, "{v}"),
            GgufValue::U64(v) => write!(f, "{v}"),
            GgufValue::I64(v) => write!(f, "{v}"),
            GgufValue::F32(v) => write!(f, "{v}"),
            GgufValue::F64(v) => write!(f, "{v}"),
            GgufValue::Bool(v) => write!(f, "{v}"),
            GgufValue::String(s) => write!(f, "{s:?}"),
            GgufValue::Array(a) if a.len() > 8 => write!(f, "[{} items]", a.len()),
            GgufValue::Array(a) => {
                write!(f, "[")?;
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{v}")?;
                }
                write!(f, "]")
            }
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` is the contiguous (innermost) dimension, the reverse of PyTorch's shape.
    pub dims: Vec<u64>,
    /// GGML type id (0 = F32, 1 = F16, 2 = Q4_0, 3 = Q4_1, 8 = Q8_0, ...); the kernels crate maps it.
    pub ggml_type: u32,
    /// Byte offset from the start of the data section; a multiple of the file's alignment.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Product of the dims, or `None` if it overflows `u64`.
    pub fn num_elements(&self) -> Option<u64> {
        self.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }
}

/// The bytes behind a [`GgufFile`]: a read-only mapping of the file, or an owned buffer for
/// in-memory files.
enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file: metadata and tensor infos in memory, tensor data mapped from disk.
pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    path: PathBuf,
    alignment: u64,
    /// Absolute byte offset of the data section.
    data_offset: u64,
    storage: Storage,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("num_metadata", &self.metadata.len())
            .field("num_tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps `path` and parses its header, metadata and tensor infos.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let file = std::fs::File::open(path).map_err(|source| GgufError::Io { path: path.to_path_buf(), source })?;
        // SAFETY: the mapping is read-only and private to this struct. Memory-mapping is only unsound
        // if another process truncates or rewrites the file while it is mapped; model files are not
        // modified in place while a server reads them, which is the same assumption llama.cpp,
        // safetensors and candle make.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|source| GgufError::Io { path: path.to_path_buf(), source })?;
        Self::parse(path.to_path_buf(), Storage::Mmap(mmap))
    }

    /// Parses a GGUF image held in memory (tests, or files fetched into a buffer). Errors name the
    /// path `<memory>`.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        Self::parse(PathBuf::from("<memory>"), Storage::Owned(bytes))
    }

    fn parse(path: PathBuf, storage: Storage) -> Result<GgufFile, GgufError> {
        let parsed = reader::parse(&path, storage.bytes())?;
        Ok(GgufFile {
            version: parsed.version,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            path,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
            storage,
        })
    }

    /// The `nbytes` bytes of `info`'s data. The caller computes `nbytes` from the dims and the GGML
    /// type's block size; this checks that they lie inside the file.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo, nbytes: usize) -> Result<&[u8], GgufError> {
        let bytes = self.storage.bytes();
        let out_of_bounds = || GgufError::TensorOutOfBounds {
            path: self.path.clone(),
            name: info.name.clone(),
            offset: self.data_offset.saturating_add(info.offset),
            nbytes: nbytes as u64,
            file_len: bytes.len() as u64,
        };
        let start = self.data_offset.checked_add(info.offset).ok_or_else(out_of_bounds)?;
        let end = start.checked_add(nbytes as u64).ok_or_else(out_of_bounds)?;
        if end > bytes.len() as u64 {
            return Err(out_of_bounds());
        }
        // Both bounds are <= bytes.len(), which is a usize, so the casts cannot truncate.
        Ok(&bytes[start as usize..end as usize])
    }

    /// The tensor named `name`, if the file has one.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The metadata value under `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// `general.architecture` (e.g. `"llama"`), which prefixes the model's hyperparameter keys.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(GgufValue::as_str)
    }

    /// Where the file came from (`<memory>` for [`GgufFile::from_bytes`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Alignment of tensor offsets and of the data section.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute byte offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Total size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.storage.bytes().len() as u64
    }
}

/// Everything that can go wrong reading a GGUF file. Variants carry the path and, where it applies,
/// the byte offset at which the problem was found.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read GGUF file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a GGUF file: magic is {found:?}, expected \"GGUF\"")]
    BadMagic { path: PathBuf, found: [u8; 4] },
    #[error("{path}: {message}")]
    UnsupportedVersion { path: PathBuf, version: u32, message: String },
    #[error("{path}: truncated at byte {offset} while reading {what}: needs {needed} bytes, {available} left")]
    Truncated { path: PathBuf, offset: u64, what: String, needed: u64, available: u64 },
    #[error("{path}: corrupt at byte {offset}: {what}")]
    Corrupt { path: PathBuf, offset: u64, what: String },
    #[error(
        "{path}: tensor {name:?} needs bytes {offset}..{offset}+{nbytes}, beyond the end of the {file_len}-byte file"
    )]
    TensorOutOfBounds { path: PathBuf, name: String, offset: u64, nbytes: u64, file_len: u64 },
}

#[cfg(test)]
mod tests;
