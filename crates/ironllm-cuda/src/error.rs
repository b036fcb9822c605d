//! The CUDA backend's error type: every driver, NVRTC and cuBLAS failure arrives here with the context of
//! what was being done, so a failed launch is an error message and never a crash.

use cudarc::driver::DriverError;

/// Errors of the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No usable CUDA driver or device (the library is missing, or it reports no GPU).
    #[error("CUDA is not available: {0}")]
    Unavailable(String),
    /// A CUDA driver call failed.
    #[error("CUDA driver error: {0}")]
    Driver(#[from] DriverError),
    /// A driver call failed while doing something named.
    #[error("{what}: {source}")]
    DriverAt {
        what: String,
        #[source]
        source: DriverError,
    },
    /// NVRTC could not compile a kernel file.
    #[error("NVRTC failed to compile `{file}` for {arch}: {log}")]
    Compile { file: String, arch: String, log: String },
    /// A cuBLAS call failed.
    #[error("cuBLAS error in {what}: {message}")]
    Cublas { what: String, message: String },
    /// A kernel the runtime needs is missing from the compiled modules.
    #[error("no CUDA kernel named `{0}` was compiled")]
    MissingKernel(String),
    /// Arguments that do not fit the kernel or the model (shapes, dtypes, sizes).
    #[error("{0}")]
    Invalid(String),
    /// Not enough GPU memory for what was asked.
    #[error("out of GPU memory: {0}")]
    OutOfMemory(String),
    /// Reading the model failed.
    #[error(transparent)]
    Model(#[from] ironllm_model::ModelError),
}

/// Adds "while doing X" to a driver error.
pub(crate) trait DriverContext<T> {
    fn at(self, what: impl FnOnce() -> String) -> Result<T, CudaError>;
}

impl<T> DriverContext<T> for Result<T, DriverError> {
    fn at(self, what: impl FnOnce() -> String) -> Result<T, CudaError> {
        self.map_err(|source| CudaError::DriverAt { what: what(), source })
    }
}
