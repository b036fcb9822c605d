//! Quantized matmuls on the default model's real Q4_1 / Q8_0 tensors agree with f32 matmuls over the
//! dequantized weights, within the error that quantizing activations to 8 bits introduces.

use std::path::PathBuf;

use ironllm_kernels::cpu::matmul::matmul_f32;
use ironllm_kernels::cpu::quant::{quant_matmul, GgmlType, QuantMatrix};
use ironllm_model::gguf::GgufFile;

fn gguf_path() -> Option<PathBuf> {
    let p = std::env::var_os("IRONLLM_TEST_GGUF").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap_or_default())
            .join(".cache/ironllm/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    p.exists().then_some(p)
}

#[test]
fn real_tensors_quantized_vs_dequantized() {
    let Some(path) = gguf_path() else {
        eprintln!("default model not cached; skipping (scripts/fixtures.sh fetches it)");
        return;
    };
    let g = GgufFile::open(&path).unwrap();
    for name in ["blk.0.attn_q.weight", "blk.3.ffn_down.weight", "token_embd.weight"] {
        let info = g.tensor(name).unwrap();
        let ty = GgmlType::from_u32(info.ggml_type).unwrap();
        let (cols, rows) = (info.dims[0] as usize, info.dims[1] as usize);
        let rows = rows.min(4096);
        let nbytes = ty.row_bytes(cols).unwrap() * rows;
        let data = g.tensor_bytes(info, nbytes).unwrap();
        let mut w = vec![0f32; rows * cols];
        ironllm_kernels::cpu::quant::dequantize(ty, data, &mut w).unwrap();
        for m in [1usize, 3, 7] {
            let x: Vec<f32> = (0..m * cols).map(|i| (i * 7919 % 1000) as f32 / 500.0 - 1.0).collect();
            let mut q = vec![f32::NAN; m * rows];
            let mut f = vec![f32::NAN; m * rows];
            quant_matmul(&x, m, &QuantMatrix { ty, data, rows, cols }, &mut q).unwrap();
            matmul_f32(&x, m, &w, rows, cols, None, &mut f);
            let norm: f32 = f.iter().map(|v| v * v).sum::<f32>().sqrt();
            let err: f32 = q.iter().zip(&f).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
            eprintln!("{name} ({}) m={m}: relative error {:.2e}", ty.name(), err / norm);
            assert!(err / norm < 2e-2, "{name} m={m}: relative error {}", err / norm);
        }
    }
}
