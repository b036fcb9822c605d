//! RMS normalization as Llama-family models define it (`x / sqrt(mean(x²) + eps) * weight`, computed in
//! f32), with an optional fused residual add so the residual stream is read and written once.

use rayon::prelude::*;

/// Rows below which parallel dispatch costs more than it saves: a row is ~0.3 µs, a rayon fork/join
/// 5-17 µs on the 2-core development VM, so a 16-sequence decode step stays on one thread.
const PAR_ROWS: usize = 32;

/// `out[t] = rms_norm(x[t]) * weight` for every row t of width `weight.len()`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    assert_eq!(x.len(), out.len(), "rms_norm: x and out differ in length");
    assert!(d > 0 && x.len().is_multiple_of(d), "rms_norm: rows are not a multiple of the weight width");
    let body = |(xr, or): (&[f32], &mut [f32])| norm_row(xr, weight, eps, or);
    if x.len() / d >= PAR_ROWS {
        x.par_chunks(d).zip(out.par_chunks_mut(d)).for_each(body);
    } else {
        x.chunks(d).zip(out.chunks_mut(d)).for_each(body);
    }
}

/// `residual[t] += x[t]; out[t] = rms_norm(residual[t]) * weight`.
pub fn add_rms_norm(x: &[f32], residual: &mut [f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    assert!(x.len() == residual.len() && x.len() == out.len(), "add_rms_norm: length mismatch");
    assert!(d > 0 && x.len().is_multiple_of(d), "add_rms_norm: rows are not a multiple of the weight width");
    let body = |((xr, rr), or): ((&[f32], &mut [f32]), &mut [f32])| {
        for (r, v) in rr.iter_mut().zip(xr) {
            *r += *v;
        }
        norm_row(rr, weight, eps, or);
    };
    if x.len() / d >= PAR_ROWS {
        x.par_chunks(d).zip(residual.par_chunks_mut(d)).zip(out.par_chunks_mut(d)).for_each(body);
    } else {
        x.chunks(d).zip(residual.chunks_mut(d)).zip(out.chunks_mut(d)).for_each(body);
    }
}

/// Normalizes each `weight.len()`-wide group in place (per-head q/k norm in Qwen3).
pub fn rms_norm_inplace(x: &mut [f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    assert!(d > 0 && x.len().is_multiple_of(d), "rms_norm_inplace: not a multiple of the weight width");
    let mut tmp = vec![0f32; d];
    for row in x.chunks_mut(d) {
        norm_row(row, weight, eps, &mut tmp);
        row.copy_from_slice(&tmp);
    }
}

#[inline]
fn norm_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let ss = super::simd::dot(x, x);
    let scale = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(weight) {
        *o = g * (v * scale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_definition() {
        let x: Vec<f32> = (0..24).map(|i| (i as f32 - 11.0) / 3.0).collect();
        let w: Vec<f32> = (0..8).map(|i| 0.5 + i as f32 / 8.0).collect();
        let mut out = vec![f32::NAN; 24];
        rms_norm(&x, &w, 1e-5, &mut out);
        for t in 0..3 {
            let row = &x[t * 8..t * 8 + 8];
            let ms: f64 = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 8.0;
            for i in 0..8 {
                let r = w[i] as f64 * row[i] as f64 / (ms + 1e-5).sqrt();
                assert!((out[t * 8 + i] as f64 - r).abs() < 1e-5);
            }
        }
        let mut residual = vec![1.0f32; 24];
        let mut fused = vec![f32::NAN; 24];
        add_rms_norm(&x, &mut residual, &w, 1e-5, &mut fused);
        let summed: Vec<f32> = x.iter().map(|v| v + 1.0).collect();
        assert_eq!(residual, summed);
        rms_norm(&summed, &w, 1e-5, &mut out);
        assert_eq!(out, fused);
    }
}
