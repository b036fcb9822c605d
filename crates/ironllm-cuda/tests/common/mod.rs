//! What the GPU test files share: opening the device, or a printed SKIP where there is none, so CPU CI
//! stays green.

use std::sync::Arc;

use ironllm_cuda::{cuda_available, Gpu};

pub fn open_gpu(test: &str) -> Option<Arc<Gpu>> {
    if !cuda_available() {
        println!("SKIP {test}: no CUDA device");
        return None;
    }
    match Gpu::open(0) {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            println!("SKIP {test}: cannot open the GPU: {e}");
            None
        }
    }
}
