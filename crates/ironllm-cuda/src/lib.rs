//! The CUDA backend of ironllm: the same engine on an NVIDIA GPU, from the same binary.
//!
//! - [`device::Gpu`]: context, stream, cuBLASLt handle and every kernel, compiled at start-up by NVRTC
//!   for the card found and cached on disk ([`compile`]). cudarc loads the CUDA libraries dynamically, so
//!   the binary builds and runs on machines without CUDA; [`cuda_available`] says whether a GPU is there.
//! - [`tensor`]: untyped device buffers tagged with a dtype (`f32`, `bf16`, `f16`).
//! - [`ops`]: safe, shape-checked launchers for the kernels in `kernels/*.cu`, and the GEMMs (cuBLASLt for
//!   bf16/f16 with algorithms timed per shape at start-up, [`lt_gemm`]; our skinny GEMM for one or two
//!   rows; our own batch-invariant kernel for f32), and on Hopper the gate/up GEMM with SiLU-and-mul in
//!   its epilogue ([`fused_mlp`]).
//! - [`model::CudaLlama`]: the Llama-family decoder with weights loaded straight to the GPU.
//! - [`sampler::GpuSampler`]: the batch sampler on the GPU.
//! - [`runner::CudaModelRunner`]: the [`ironllm_core::executor::ModelExecutor`] for the GPU, with the KV
//!   cache sized from a profiled forward pass and `--gpu-memory-utilization`.

pub mod compile;
pub mod device;
pub mod draft;
pub mod error;
pub mod fused_mlp;
pub mod gemm_cache;
mod launch;
pub mod lt_gemm;
pub mod model;
mod op_timer;
pub mod ops;
pub mod runner;
pub mod sampler;
mod step_timer;
pub mod tensor;

pub use device::{cuda_available, Gpu, GpuInfo};
pub use error::CudaError;
