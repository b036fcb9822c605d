//! SwiGLU activation: `out = silu(gate) * up` over a fused `[tokens, 2 * inter]` gate/up buffer, as the
//! Llama MLP needs between its gate/up and down projections (`vexp::silu_mul` per row).

use rayon::prelude::*;

/// Rows below which parallel dispatch costs more than it saves.
const PAR_ROWS: usize = 8;

/// `gate_up` is `[t, 2 * inter]` with the gate half first; writes `out[t, inter]`.
pub fn silu_and_mul(gate_up: &[f32], inter: usize, out: &mut [f32]) {
    assert!(inter > 0 && gate_up.len().is_multiple_of(2 * inter), "silu_and_mul: bad gate_up shape");
    assert_eq!(out.len() * 2, gate_up.len(), "silu_and_mul: out is not [t, inter]");
    let body = |(o, gu): (&mut [f32], &[f32])| {
        let (g, u) = gu.split_at(inter);
        super::vexp::silu_mul(g, u, o);
    };
    // A decode step's few rows take a couple of microseconds, less than a rayon fork/join.
    if out.len() / inter >= PAR_ROWS {
        out.par_chunks_mut(inter).zip(gate_up.par_chunks(2 * inter)).for_each(body);
    } else {
        out.chunks_mut(inter).zip(gate_up.chunks(2 * inter)).for_each(body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silu_times_up() {
        let gu = [1.0f32, -2.0, 3.0, 4.0];
        let mut out = [0.0f32; 2];
        silu_and_mul(&gu, 2, &mut out);
        // Bit-exact against the scalar definition (whose accuracy `vexp` tests).
        assert_eq!(out, [super::super::vexp::silu(1.0) * 3.0, super::super::vexp::silu(-2.0) * 4.0]);
        let exact = |x: f64| x / (1.0 + (-x).exp());
        assert!((out[0] as f64 - exact(1.0) * 3.0).abs() < 1e-6 && (out[1] as f64 - exact(-2.0) * 4.0).abs() < 1e-6);
    }
}
