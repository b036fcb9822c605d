//! Kernel launches that may overlap the kernel before them: programmatic dependent launch (PDL) on
//! Hopper and later. A decode step at small batch sizes is a chain of ~300 kernels, most of them a few
//! microseconds long; launched the ordinary way, each starts only after the previous one has fully
//! drained, and the GPU idles for the gap. Launched with the programmatic stream-serialization
//! attribute, a kernel's blocks are scheduled as soon as the previous kernel's blocks have all called
//! `pdl_launch_dependents` (see `kernels/common.cuh`), and they block in `pdl_wait` until that kernel
//! has completed and its writes are visible; work that does not depend on it (the skinny GEMM's weight
//! stream, the decode attention's first KV tile) is started before the wait. CUDA graphs keep these
//! edges when they capture the launches.
//!
//! Only kernels that call `pdl_wait` before touching memory that earlier work reads or writes may be
//! launched through [`KernelArgs`] (their `extern "C"` entries say so); on older cards, or with
//! `IRONLLM_DISABLE_PDL`, the same call is an ordinary launch.

use cudarc::driver::{sys, CudaFunction, CudaSlice, DevicePtr, DriverError, LaunchConfig};

use crate::device::Gpu;

/// A kernel's arguments, in order, as 8-byte words: device pointers, or 4-byte scalars in the low bytes
/// (the driver copies each parameter's size from its word's address, so a little-endian word holds the
/// scalar).
pub(crate) struct KernelArgs<'a> {
    gpu: &'a Gpu,
    words: Vec<u64>,
}

impl<'a> KernelArgs<'a> {
    pub(crate) fn new(gpu: &'a Gpu) -> KernelArgs<'a> {
        KernelArgs { gpu, words: Vec::with_capacity(20) }
    }

    /// A device buffer (the kernel may read or write it; the caller's borrows say which).
    pub(crate) fn buf<T>(&mut self, buf: &CudaSlice<T>) -> &mut Self {
        let (ptr, _sync) = buf.device_ptr(self.gpu.stream());
        self.words.push(ptr);
        self
    }

    /// A null pointer (an optional input left out).
    pub(crate) fn null(&mut self) -> &mut Self {
        self.words.push(0);
        self
    }

    pub(crate) fn i32(&mut self, v: i32) -> &mut Self {
        self.words.push(u64::from(v as u32));
        self
    }

    pub(crate) fn f32(&mut self, v: f32) -> &mut Self {
        self.words.push(u64::from(v.to_bits()));
        self
    }

    /// Launches `f` on the backend's stream, as a programmatic dependent where the card supports it.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters in order and type (pointers for pointers, 4-byte
    /// scalars for `int`/`float`), every buffer must be large enough for the launch, and the kernel must
    /// call `pdl_wait` before touching memory that earlier work on the stream reads or writes.
    pub(crate) unsafe fn launch(&mut self, f: &CudaFunction, cfg: LaunchConfig) -> Result<(), DriverError> {
        self.gpu.ctx.bind_to_thread()?;
        let mut params: Vec<*mut std::ffi::c_void> =
            self.words.iter_mut().map(|w| w as *mut u64 as *mut std::ffi::c_void).collect();
        let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.gpu.stream().cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(self.gpu.programmatic_launch),
        };
        sys::cuLaunchKernelEx(&config, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()).result()
    }
}
