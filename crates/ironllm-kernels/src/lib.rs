//! Compute kernels for ironllm.
//!
//! `cpu` holds the portable and SIMD (AVX2/AVX-512, runtime-dispatched) kernels the CPU backend runs:
//! dense f32 matmul, matmuls over GGUF quantized blocks, normalization, rotary embedding, activation
//! functions and paged attention. Model code calls these through safe functions that check shapes.

pub mod cpu;
