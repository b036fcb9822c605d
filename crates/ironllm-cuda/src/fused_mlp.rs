//! The MLP's gate/up projection with SiLU-and-mul in the GEMM's epilogue (`kernels/gemm_sm90.cu`,
//! Hopper only): `act = silu(x Wg^T) * (x Wu^T)` in one kernel, so the `[tokens, 2 * inter]` gate/up
//! activation is never written nor read back. Its operands reach the kernel as tensor maps (the copy
//! engine's descriptors of a 2-D tile walk), encoded on the host for each launch.
//!
//! Used for steps of at least [`DEFAULT_MIN_ROWS`] tokens (`IRONLLM_FUSED_GATE_UP_MIN_ROWS`; the kernel
//! takes 128-row tiles, so below that cuBLASLt's tuned algorithms and the separate SiLU-and-mul are as
//! fast or faster); `IRONLLM_DISABLE_FUSED_GATE_UP=1` turns it off for side-by-side measurements.

use std::ffi::c_void;

use cudarc::driver::{sys, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

use crate::device::Gpu;
use crate::error::{CudaError, DriverContext};
use crate::ops;
use crate::tensor::{DevBuf, GpuDType};

/// Rows of a step from which the fused kernel takes the gate/up projection.
pub const DEFAULT_MIN_ROWS: usize = 1024;

/// `GS_SMEM_BYTES` of `gemm_sm90.cu` (GS_STAGES = 3): 1 KiB of alignment slack, three stages of a 128 x 64
/// tile of x and a 256 x 64 tile of W, a 128 x 128 output staging tile, two mbarriers per stage.
pub const SMEM_BYTES: usize = 1024 + 3 * (128 + 256) * 64 * 2 + 128 * 128 * 2 + 2 * 3 * 8;

const THREADS: u32 = 384;
const TILE_ROWS: usize = 128;
const TILE_COLS: usize = 128;
const TILE_K: usize = 64;

/// Dynamic shared memory of the kernels of `gemm_sm90.cu`, by name.
pub fn dynamic_smem_of(kernel: &str) -> Option<usize> {
    (kernel.starts_with("gemm_swiglu_sm90_") || kernel.starts_with("gemm_plain_sm90_")).then_some(SMEM_BYTES)
}

/// The smallest step (in tokens) that takes the fused kernel for a model of this dtype and shape on this
/// GPU, or `None` where it never does: no kernel (not Hopper), float32, an intermediate size that is not a
/// multiple of 128 or a hidden size that is not a multiple of 64, a gate/up bias, or switched off.
pub fn min_rows(gpu: &Gpu, dtype: GpuDType, hidden: usize, inter: usize, has_bias: bool) -> Option<usize> {
    let env = |k: &str| std::env::var(k).ok();
    let disabled = env("IRONLLM_DISABLE_FUSED_GATE_UP").is_some_and(|v| v != "0");
    let min = env("IRONLLM_FUSED_GATE_UP_MIN_ROWS").and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_MIN_ROWS);
    let shape_ok = inter.is_multiple_of(TILE_COLS) && hidden.is_multiple_of(TILE_K) && inter > 0 && hidden > 0;
    let kernel = dtype != GpuDType::F32 && gpu.has_function(&kernel_name(dtype));
    (!disabled && shape_ok && kernel && !has_bias).then_some(min.max(1))
}

fn kernel_name(dtype: GpuDType) -> String {
    format!("gemm_swiglu_sm90_{}", dtype.suffix())
}

/// The driver's `CUtensorMap` (128 opaque bytes, 64-byte aligned), passed to the kernel by value.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct TensorMap([u64; 16]);

// SAFETY: plain bytes that the kernel takes by value as a `__grid_constant__` parameter of the same size
// and alignment (`GsTmap` in gemm_sm90.cu).
unsafe impl DeviceRepr for TensorMap {}

/// A tensor map of a row-major `[rows, cols]` 16-bit matrix in `buf`, walked in boxes of 128 rows x 64
/// columns (128 bytes, the swizzle width) with the 128-byte swizzle that wgmma's descriptors expect.
fn tensor_map(gpu: &Gpu, buf: &DevBuf, rows: usize, cols: usize) -> Result<TensorMap, CudaError> {
    let data_type = match buf.dtype {
        GpuDType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        GpuDType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        GpuDType::F32 => return Err(CudaError::Invalid("fused gate/up: float32 has no fused kernel".into())),
    };
    let (ptr, _sync) = buf.data.device_ptr(gpu.stream());
    let dims = [cols as u64, rows as u64];
    let strides = [(cols * buf.dtype.size()) as u64];
    let boxes = [TILE_K as u32, TILE_ROWS as u32];
    let element_strides = [1u32, 1];
    let mut map = TensorMap([0; 16]);
    // SAFETY: every array has the rank's length (strides one less); the map is written in place and the
    // address it records stays valid for the launch (the buffer outlives it; the driver reads nothing now).
    unsafe {
        sys::cuTensorMapEncodeTiled(
            (&mut map as *mut TensorMap).cast::<sys::CUtensorMap>(),
            data_type,
            2,
            ptr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()
    }
    .at(|| format!("encoding a tensor map of [{rows}, {cols}]"))?;
    Ok(map)
}

/// `act[m, inter] = silu(x @ w[:inter]^T) * (x @ w[inter:]^T)` for `w` = `[gate | up]` rows `[2 * inter,
/// k]`, rounded as `ops::gemm` then `ops::silu_and_mul` round (the gate and up products to the dtype, then
/// silu, then the product), so the two paths differ only by the GEMMs' summation order. The caller checks
/// [`min_rows`] first.
pub fn gate_up_silu(
    gpu: &Gpu,
    act: &mut DevBuf,
    x: &DevBuf,
    w: &DevBuf,
    m: usize,
    inter: usize,
    k: usize,
) -> Result<(), CudaError> {
    let dtype = ops::same_dtype(&[act, x, w], "fused gate/up")?;
    if !inter.is_multiple_of(TILE_COLS) || !k.is_multiple_of(TILE_K) {
        return Err(CudaError::Invalid(format!("fused gate/up: inter {inter} or k {k} off the kernel's tiles")));
    }
    ops::gate_up_sizes("fused gate/up", act, x, w, (m, inter, k))?;
    if m == 0 {
        return Ok(());
    }
    let name = kernel_name(dtype);
    let f = gpu.function(&name)?;
    let map_x = tensor_map(gpu, x, m, k)?;
    let map_w = tensor_map(gpu, w, 2 * inter, k)?;
    let map_out = tensor_map(gpu, act, m, inter)?;
    let (mi, ni, ki) = (ops::i32_of(m, "m")?, ops::i32_of(inter, "intermediate")?, ops::i32_of(k, "k")?);
    let tiles = m.div_ceil(TILE_ROWS) * (inter / TILE_COLS);
    let grid = tiles.min(gpu.info.multiprocessors.max(1)) as u32;
    let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: SMEM_BYTES as u32 };
    let mut b = gpu.stream().launch_builder(f);
    b.arg(&map_x).arg(&map_w).arg(&map_out).arg(&mi).arg(&ni).arg(&ki).arg(&ni);
    // SAFETY: the maps cover buffers checked above to hold [m, k], [2 inter, k] and [m, inter] elements;
    // the kernel reads and writes only through them; the parameters match the kernel's in order and size.
    unsafe { b.launch(cfg) }.at(|| name)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_matches_the_kernel_header_and_fits_a_hopper_block() {
        // GS_SMEM_BYTES with GS_STAGES = 3; an H100 grants a block at most 227 KiB.
        assert_eq!(SMEM_BYTES, 181_296);
        const { assert!(SMEM_BYTES <= 227 * 1024) };
        assert_eq!(dynamic_smem_of("gemm_swiglu_sm90_bf16"), Some(SMEM_BYTES));
        assert_eq!(dynamic_smem_of("gemm_plain_sm90_f16"), Some(SMEM_BYTES));
        assert_eq!(dynamic_smem_of("gemm_f32_nt"), None);
    }

    #[test]
    fn the_tensor_map_has_the_drivers_size_and_alignment() {
        assert_eq!(std::mem::size_of::<TensorMap>(), std::mem::size_of::<sys::CUtensorMap>());
        assert_eq!(std::mem::align_of::<TensorMap>(), 64);
    }
}
