//! Device buffers tagged with their element type. The model picks its compute type at load time
//! (`--dtype`), so buffers are untyped bytes plus a [`GpuDType`], and kernels are chosen by suffix
//! (`rms_norm_bf16`); offsets and lengths are in elements.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

use crate::device::Gpu;
use crate::error::CudaError;

/// Element type of a device tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GpuDType {
    F32,
    BF16,
    F16,
}

impl GpuDType {
    pub fn size(self) -> usize {
        match self {
            GpuDType::F32 => 4,
            GpuDType::BF16 | GpuDType::F16 => 2,
        }
    }

    /// The kernel-name suffix.
    pub fn suffix(self) -> &'static str {
        match self {
            GpuDType::F32 => "f32",
            GpuDType::BF16 => "bf16",
            GpuDType::F16 => "f16",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GpuDType::F32 => "float32",
            GpuDType::BF16 => "bfloat16",
            GpuDType::F16 => "float16",
        }
    }

    /// Encodes f32 values in this type (little-endian bytes).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            GpuDType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            GpuDType::BF16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
            GpuDType::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        }
    }

    /// Decodes little-endian bytes of this type to f32.
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            GpuDType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            GpuDType::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            GpuDType::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        }
    }
}

/// A device buffer of `len` elements of `dtype`.
#[derive(Debug)]
pub struct DevBuf {
    pub data: CudaSlice<u8>,
    pub dtype: GpuDType,
    pub len: usize,
}

impl DevBuf {
    /// A zeroed buffer.
    pub fn zeros(gpu: &Gpu, dtype: GpuDType, len: usize) -> Result<DevBuf, CudaError> {
        Ok(DevBuf { data: gpu.alloc_zeros::<u8>(len.max(1) * dtype.size())?, dtype, len })
    }

    /// A buffer holding `bytes` (already encoded in `dtype`).
    pub fn from_bytes(gpu: &Gpu, dtype: GpuDType, bytes: &[u8]) -> Result<DevBuf, CudaError> {
        if !bytes.len().is_multiple_of(dtype.size()) {
            return Err(CudaError::Invalid(format!("{} bytes are not whole {} elements", bytes.len(), dtype.name())));
        }
        Ok(DevBuf { data: gpu.upload(bytes)?, dtype, len: bytes.len() / dtype.size() })
    }

    /// A buffer holding `values` converted to `dtype`.
    pub fn from_f32(gpu: &Gpu, dtype: GpuDType, values: &[f32]) -> Result<DevBuf, CudaError> {
        DevBuf::from_bytes(gpu, dtype, &dtype.encode(values))
    }

    /// Copies the buffer to the host as f32 (synchronizes).
    pub fn to_f32(&self, gpu: &Gpu) -> Result<Vec<f32>, CudaError> {
        let bytes = gpu.download(&self.data)?;
        Ok(self.dtype.decode(&bytes[..self.len * self.dtype.size()]))
    }

    /// Elements `[start, start + len)`.
    pub fn view(&self, start: usize, len: usize) -> Result<CudaView<'_, u8>, CudaError> {
        self.check(start, len)?;
        let s = self.dtype.size();
        Ok(self.data.slice(start * s..(start + len) * s))
    }

    /// Elements `[start, start + len)`, writable.
    pub fn view_mut(&mut self, start: usize, len: usize) -> Result<CudaViewMut<'_, u8>, CudaError> {
        self.check(start, len)?;
        let s = self.dtype.size();
        Ok(self.data.slice_mut(start * s..(start + len) * s))
    }

    pub fn nbytes(&self) -> usize {
        self.len * self.dtype.size()
    }

    fn check(&self, start: usize, len: usize) -> Result<(), CudaError> {
        if start.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(CudaError::Invalid(format!("view {start}+{len} outside a buffer of {}", self.len)));
        }
        Ok(())
    }
}
