//! CPU kernels. Every public function checks its slice lengths and panics only on programmer error
//! (shape mismatches between internal buffers), never on user input.

pub mod activation;
pub mod attention;
pub mod matmul;
pub mod norm;
mod par;
pub mod quant;
pub mod rope;
pub mod simd;
pub mod vexp;
