//! The GPU: driver context, the one stream all work is ordered on, the cuBLASLt handle and every compiled
//! kernel by name. Opening a `Gpu` compiles (or loads from the disk cache) all kernel files for the
//! card's architecture, so a missing or broken kernel is found at start-up, not mid-request.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};

use crate::compile::{compile_file, default_cache_dir, SOURCES};
use crate::error::{CudaError, DriverContext};
use crate::gemm_cache::TuneCache;
use crate::lt_gemm::{tuning_context, LtGemm};

/// Whether a CUDA driver library is present and reports at least one device.
pub fn cuda_available() -> bool {
    // SAFETY: only probes whether the driver library can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return false;
    }
    CudaContext::device_count().is_ok_and(|n| n > 0)
}

/// Facts about the card, read once.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
    pub multiprocessors: usize,
    pub l2_cache_bytes: usize,
    /// The NVRTC target, e.g. `sm_90a`.
    pub arch: String,
    pub kernel_compile_seconds: f64,
    pub kernels_from_cache: bool,
}

/// An opened GPU with its kernels loaded.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    lt: LtGemm,
    functions: HashMap<String, CudaFunction>,
    pub info: GpuInfo,
    /// Our skinny GEMM serves bf16/f16 GEMMs of up to `ops::GEMV_MAX_M` rows instead of cuBLAS
    /// (`IRONLLM_DISABLE_GEMV` turns it off, for side-by-side measurements).
    pub skinny_gemm: bool,
    /// The skinny GEMM is launched as a programmatic dependent (Hopper and later; `IRONLLM_DISABLE_PDL`
    /// turns it off for side-by-side measurements), so it starts streaming weights before the kernel
    /// that feeds it ends.
    pub programmatic_launch: bool,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("info", &self.info).finish_non_exhaustive()
    }
}

impl Gpu {
    /// Opens device `ordinal` and loads every kernel (compiling those not in the disk cache).
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>, CudaError> {
        Gpu::open_with_cache(ordinal, default_cache_dir())
    }

    /// Like [`open`](Self::open) with an explicit kernel cache folder (`None`: no cache).
    pub fn open_with_cache(ordinal: usize, cache_dir: Option<PathBuf>) -> Result<Arc<Gpu>, CudaError> {
        // SAFETY: only probes whether the libraries can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::Unavailable("the CUDA driver library (libcuda.so) was not found".into()));
        }
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(CudaError::Unavailable("the NVRTC library (libnvrtc.so) was not found".into()));
        }
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            return Err(CudaError::Unavailable("the cuBLASLt library (libcublasLt.so) was not found".into()));
        }
        let count = CudaContext::device_count().at(|| "counting CUDA devices".into())?;
        if ordinal >= count.max(0) as usize {
            return Err(CudaError::Unavailable(format!("no CUDA device {ordinal} ({count} found)")));
        }
        let ctx = CudaContext::new(ordinal).at(|| format!("creating a context on CUDA device {ordinal}"))?;
        // Everything runs on one stream, so cudarc's per-buffer event tracking (an event record and a
        // stream wait per kernel argument) is pure launch overhead; it must be off before any allocation.
        // SAFETY: no buffer exists yet, and this backend never uses a second stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().at(|| "creating a stream".into())?;
        let name = ctx.name().at(|| "reading the device name".into())?;
        let cc = ctx.compute_capability().at(|| "reading the compute capability".into())?;
        // A fixed workspace, so GEMMs captured into CUDA graphs never allocate; tuning results of earlier
        // starts come from the kernel cache folder.
        let tuning_dir =
            cache_dir.as_deref().filter(|_| std::env::var("IRONLLM_GEMM_TUNING_CACHE").map_or(true, |v| v != "0"));
        let lt = LtGemm::new(&stream, TuneCache::open(tuning_dir, &tuning_context(&name, cc)))?;
        let total_memory = ctx.total_mem().at(|| "reading the memory size".into())?;
        let multiprocessors = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .at(|| "reading the multiprocessor count".into())? as usize;
        let l2_cache_bytes = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .at(|| "reading the L2 cache size".into())?
            .max(0) as usize;
        // Hopper's architecture-specific target unlocks wgmma and the bulk tensor copies.
        let arch = if cc == (9, 0) { "sm_90a".to_string() } else { format!("sm_{}{}", cc.0, cc.1) };
        let started = Instant::now();
        let mut functions = HashMap::new();
        let mut all_cached = true;
        for (file, src) in SOURCES {
            let compiled = compile_file(file, src, &arch, cache_dir.as_deref())?;
            all_cached &= compiled.cached;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(compiled.cubin))
                .at(|| format!("loading the compiled module {file}"))?;
            for kernel in compiled.kernel_names {
                let f = module.load_function(&kernel).at(|| format!("loading kernel {kernel} of {file}"))?;
                if let Some(bytes) = crate::ops::dynamic_smem_of(&kernel) {
                    // A card that cannot grant the shared memory does without the kernel (callers check
                    // `has_function` and fall back) rather than failing at the first launch.
                    let attr =
                        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
                    if let Err(e) = f.set_attribute(attr, bytes as i32) {
                        tracing::warn!("kernel {kernel} left out: {bytes} bytes of shared memory refused ({e:?})");
                        continue;
                    }
                }
                functions.insert(kernel, f);
            }
        }
        let info = GpuInfo {
            ordinal,
            name,
            compute_capability: cc,
            total_memory,
            multiprocessors,
            l2_cache_bytes,
            arch,
            kernel_compile_seconds: started.elapsed().as_secs_f64(),
            kernels_from_cache: all_cached,
        };
        tracing::info!(
            "CUDA device {ordinal}: {} (sm_{}{}, {:.1} GiB, {} SMs); {} kernels {} in {:.2}s",
            info.name,
            cc.0,
            cc.1,
            total_memory as f64 / (1u64 << 30) as f64,
            multiprocessors,
            functions.len(),
            if all_cached { "loaded from the cache" } else { "compiled" },
            info.kernel_compile_seconds
        );
        let skinny_gemm = std::env::var_os("IRONLLM_DISABLE_GEMV").is_none();
        let programmatic_launch = cc.0 >= 9 && std::env::var_os("IRONLLM_DISABLE_PDL").is_none();
        Ok(Arc::new(Gpu { ctx, stream, lt, functions, info, skinny_gemm, programmatic_launch }))
    }

    /// The stream every operation of this backend is ordered on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Writes the GEMM algorithms tuning chose to the disk cache (the runner does after its tuning).
    pub fn save_gemm_tuning(&self) {
        self.lt.save_tuning();
    }

    /// The half-precision GEMMs (cuBLASLt, algorithms per shape).
    pub(crate) fn lt(&self) -> &LtGemm {
        &self.lt
    }

    /// A kernel by its `extern "C"` name.
    pub fn function(&self, name: &str) -> Result<&CudaFunction, CudaError> {
        self.functions.get(name).ok_or_else(|| CudaError::MissingKernel(name.to_string()))
    }

    /// Whether a kernel exists.
    pub fn has_function(&self, name: &str) -> bool {
        self.functions.contains_key(name)
    }

    /// A zeroed device buffer of `n` elements.
    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>, CudaError> {
        self.stream.alloc_zeros::<T>(n.max(1)).at(|| format!("allocating {n} elements of GPU memory"))
    }

    /// Copies a host slice to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>, CudaError> {
        self.stream.clone_htod(host).at(|| format!("copying {} elements to the GPU", host.len()))
    }

    /// Copies a device buffer to the host (synchronizes the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>, CudaError> {
        self.stream.clone_dtoh(dev).at(|| "copying from the GPU".into())
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().at(|| "waiting for the GPU".into())
    }

    /// (free, total) bytes of device memory.
    pub fn mem_info(&self) -> Result<(usize, usize), CudaError> {
        self.ctx.mem_get_info().at(|| "reading free GPU memory".into())
    }
}
