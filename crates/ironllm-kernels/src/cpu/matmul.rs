//! Dense f32 matrix multiplication in "dot-product form": `out[m, n] = x[m, k] · w[n, k]ᵀ`, the layout of
//! every linear layer's weight in Hugging Face and GGUF checkpoints (each output row is a contiguous row
//! of the weight), so no transpose or packing copy is needed.
//!
//! Work is split over weight rows across the rayon pool; inside a task, a register tile of 3 activation
//! rows × 4 weight rows keeps twelve 8-lane accumulators busy. Every output element is accumulated with
//! exactly the lane structure and reduction tree of [`crate::cpu::simd::dot`], so a row's result does not
//! depend on which tile, task or batch it was computed in (batch invariance, bit for bit).

use rayon::prelude::*;

use super::par::OutPtr;
use super::simd;

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` (+ `bias[n]` when given).
pub fn matmul_f32(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, bias: Option<&[f32]>, out: &mut [f32]) {
    assert_eq!(x.len(), m * k, "matmul_f32: x is not [m, k]");
    assert_eq!(w.len(), n * k, "matmul_f32: w is not [n, k]");
    assert_eq!(out.len(), m * n, "matmul_f32: out is not [m, n]");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "matmul_f32: bias is not [n]");
    }
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    // Enough chunks to balance two to four threads, each a multiple of the 4-row tile.
    let chunk = (n.div_ceil(threads * 4)).div_ceil(4).max(1) * 4;
    let out_ptr = OutPtr::new(out);
    (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let n0 = c * chunk;
        let n1 = (n0 + chunk).min(n);
        // SAFETY: this task writes only columns n0..n1 of every row, disjoint from other tasks, and
        // `out` has m * n elements (asserted above).
        unsafe { matmul_cols(x, m, w, n, k, n0, n1, bias, out_ptr.get()) };
    });
}

/// Computes columns `n0..n1` of every output row.
///
/// # Safety
/// `out` must point to `m * n` writable floats and no other thread may touch columns `n0..n1`.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_cols(
    x: &[f32],
    m: usize,
    w: &[f32],
    n: usize,
    k: usize,
    n0: usize,
    n1: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
) {
    let mut j = n0;
    while j < n1 {
        let nr = (n1 - j).min(4);
        let mut i = 0;
        while i < m {
            let mr = (m - i).min(3);
            let mut tile = [[0f32; 4]; 3];
            dot_tile(x, i, mr, w, j, nr, k, &mut tile);
            for (a, row) in tile.iter().enumerate().take(mr) {
                for (b, v) in row.iter().enumerate().take(nr) {
                    let v = match bias {
                        Some(bias) => v + bias[j + b],
                        None => *v,
                    };
                    // SAFETY: (i + a) < m and (j + b) < n1 <= n, inside the buffer; column owned by us.
                    *out.add((i + a) * n + j + b) = v;
                }
            }
            i += mr;
        }
        j += nr;
    }
}

/// Dot products of `mr` rows of x (from `i`) with `nr` rows of w (from `j`).
#[allow(clippy::too_many_arguments)]
#[inline]
fn dot_tile(x: &[f32], i: usize, mr: usize, w: &[f32], j: usize, nr: usize, k: usize, tile: &mut [[f32; 4]; 3]) {
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx2_fma() {
        // SAFETY: AVX2/FMA checked; row ranges lie inside x and w (callers keep i+mr <= m, j+nr <= n).
        unsafe {
            match (mr, nr) {
                (3, 4) => avx2::tile::<3, 4>(x, i, w, j, k, tile),
                (2, 4) => avx2::tile::<2, 4>(x, i, w, j, k, tile),
                (1, 4) => avx2::tile::<1, 4>(x, i, w, j, k, tile),
                (3, _) => avx2::tile_dyn(x, i, 3, w, j, nr, k, tile),
                _ => avx2::tile_dyn(x, i, mr, w, j, nr, k, tile),
            }
        }
        return;
    }
    for (a, row) in tile.iter_mut().enumerate().take(mr) {
        for (b, v) in row.iter_mut().enumerate().take(nr) {
            *v = simd::dot_portable(&x[(i + a) * k..(i + a + 1) * k], &w[(j + b) * k..(j + b + 1) * k]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::cpu::simd::avx2::hsum;

    /// A full MR×NR register tile.
    ///
    /// # Safety
    /// AVX2/FMA available; rows i..i+MR of x and j..j+NR of w exist (each k long).
    // Index loops mirror the register tile; iterator chains over two arrays would obscure it.
    #[allow(clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile<const MR: usize, const NR: usize>(
        x: &[f32],
        i: usize,
        w: &[f32],
        j: usize,
        k: usize,
        out: &mut [[f32; 4]; 3],
    ) {
        debug_assert!((i + MR) * k <= x.len() && (j + NR) * k <= w.len());
        let k8 = k / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let xp = x.as_ptr().add(i * k);
        let wp = w.as_ptr().add(j * k);
        let mut p = 0;
        while p < k8 {
            let mut xv = [_mm256_setzero_ps(); MR];
            for (a, v) in xv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(xp.add(a * k + p));
            }
            for b in 0..NR {
                let wv = _mm256_loadu_ps(wp.add(b * k + p));
                for a in 0..MR {
                    acc[a][b] = _mm256_fmadd_ps(xv[a], wv, acc[a][b]);
                }
            }
            p += 8;
        }
        for a in 0..MR {
            for b in 0..NR {
                let mut s = hsum(acc[a][b]);
                for q in k8..k {
                    s = (*xp.add(a * k + q)).mul_add(*wp.add(b * k + q), s);
                }
                out[a][b] = s;
            }
        }
    }

    /// Edge tiles of any size up to 3×4, with the same accumulation order.
    ///
    /// # Safety
    /// As for [`tile`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_dyn(
        x: &[f32],
        i: usize,
        mr: usize,
        w: &[f32],
        j: usize,
        nr: usize,
        k: usize,
        out: &mut [[f32; 4]; 3],
    ) {
        for (a, row) in out.iter_mut().enumerate().take(mr) {
            for (b, v) in row.iter_mut().enumerate().take(nr) {
                *v = crate::cpu::simd::avx2::dot(&x[(i + a) * k..(i + a + 1) * k], &w[(j + b) * k..(j + b + 1) * k]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_f64_reference_on_odd_shapes() {
        for (m, n, k) in [(1, 1, 1), (1, 7, 13), (5, 9, 64), (7, 33, 577), (16, 130, 96), (3, 4, 8)] {
            let x = rand_vec(m * k, 1 + m as u64);
            let w = rand_vec(n * k, 2 + n as u64);
            let bias = rand_vec(n, 3);
            let mut out = vec![f32::NAN; m * n];
            matmul_f32(&x, m, &w, n, k, Some(&bias), &mut out);
            for i in 0..m {
                for j in 0..n {
                    let r: f64 =
                        (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum::<f64>() + bias[j] as f64;
                    assert!((out[i * n + j] as f64 - r).abs() < 1e-4 * (1.0 + r.abs()), "({m},{n},{k}) [{i},{j}]");
                }
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_its_batch() {
        let (n, k) = (37, 200);
        let w = rand_vec(n * k, 9);
        let x = rand_vec(11 * k, 10);
        let mut batched = vec![0.0; 11 * n];
        matmul_f32(&x, 11, &w, n, k, None, &mut batched);
        for i in 0..11 {
            let mut alone = vec![0.0; n];
            matmul_f32(&x[i * k..(i + 1) * k], 1, &w, n, k, None, &mut alone);
            for j in 0..n {
                assert_eq!(alone[j].to_bits(), batched[i * n + j].to_bits());
                assert_eq!(alone[j].to_bits(), simd::dot(&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]).to_bits());
            }
        }
    }
}
