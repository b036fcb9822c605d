//! Tests for GGUF quantization: layouts (against an element-wise reading of each layout and
//! against fixtures from the `gguf` Python package), the matmul (against f64 with a tolerance
//! derived from the activation quantization), scalar vs AVX2, batch invariance, and errors.

use super::act::{quantize_rows, BlockQ8, BlockQ8K, BlockQ8x2};
use super::blocks::{k4_scales_mins, q3k_scales};
use super::*;

/// splitmix64: a seeded generator, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }
    /// Roughly normal (Irwin-Hall with 4 terms), mean 0, std ~0.58 * scale.
    fn normalish(&mut self, scale: f32) -> f32 {
        (self.unit() + self.unit() + self.unit() + self.unit() - 2.0) * scale
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

fn put_f16(b: &mut [u8], off: usize, v: f32) {
    b[off..off + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
}

/// Activations with some structure: a per-row scale, and a few zero blocks.
fn random_x(rng: &mut Rng, m: usize, k: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(m * k);
    for i in 0..m {
        let scale = rng.range(0.1, 3.0);
        for c in 0..k {
            x.push(if i == 1 && c < 32 { 0.0 } else { rng.normalish(scale) });
        }
    }
    x
}

/// Random but valid GGUF bytes for a `rows x cols` tensor: random quant bits (every bit pattern
/// is a valid block) with the f16/f32 scale fields overwritten by sane values, like those of
/// weights of magnitude ~0.01..1.
fn random_weights(rng: &mut Rng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let n = rows * cols;
    match ty {
        GgmlType::F32 => return (0..n).flat_map(|_| rng.normalish(1.0).to_le_bytes()).collect(),
        GgmlType::F16 => return (0..n).flat_map(|_| half::f16::from_f32(rng.normalish(1.0)).to_le_bytes()).collect(),
        GgmlType::BF16 => return (0..n).flat_map(|_| half::bf16::from_f32(rng.normalish(1.0)).to_le_bytes()).collect(),
        _ => {}
    }
    let mut data = rng.bytes(ty.row_bytes(n).unwrap());
    // (offset, low, high) of each scale field; a negative low allows either sign.
    let fields: &[(usize, f32, f32)] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[(0, -0.05, 0.05)],
        GgmlType::Q4_1 | GgmlType::Q5_1 => &[(0, 0.001, 0.05), (2, -0.5, 0.5)],
        GgmlType::Q8_1 => &[(0, -0.05, 0.05), (2, -1.0, 1.0)],
        GgmlType::Q2_K => &[(80, 0.001, 0.02), (82, 0.001, 0.02)],
        GgmlType::Q3_K => &[(108, -0.02, 0.02)],
        GgmlType::Q4_K | GgmlType::Q5_K => &[(0, 0.0005, 0.01), (2, 0.0005, 0.01)],
        GgmlType::Q6_K => &[(208, -0.002, 0.002)],
        GgmlType::Q8_K => &[],
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!(),
    };
    for block in data.chunks_exact_mut(ty.type_size()) {
        for &(off, lo, hi) in fields {
            let v = rng.range(lo, hi);
            put_f16(block, off, v);
        }
        if ty == GgmlType::Q8_K {
            block[0..4].copy_from_slice(&rng.range(0.001, 0.01).to_le_bytes());
        }
    }
    data
}

fn f16v(b: &[u8], off: usize) -> f64 {
    half::f16::from_le_bytes([b[off], b[off + 1]]).to_f64()
}

/// Element `i` of one block, read straight from the layout description in f64, with the sum of
/// the magnitudes of its terms (the scale of its rounding error). Written per element, unlike
/// `dequantize`, so that a mistake would have to be made twice in different shapes.
fn ref_element(ty: GgmlType, b: &[u8], i: usize) -> (f64, f64) {
    let nib = |qs: &[u8], i: usize| if i < 16 { qs[i] & 0x0F } else { qs[i - 16] >> 4 } as i64;
    let bit = |word: u32, i: usize| ((word >> i) & 1) as i64;
    let both = |a: f64, c: f64| (a + c, a.abs() + c.abs());
    match ty {
        GgmlType::F32 => both(f32::from_le_bytes(b[0..4].try_into().unwrap()) as f64, 0.0),
        GgmlType::F16 => both(f16v(b, 0), 0.0),
        GgmlType::BF16 => both(half::bf16::from_le_bytes([b[0], b[1]]).to_f64(), 0.0),
        GgmlType::Q4_0 => both(f16v(b, 0) * (nib(&b[2..], i) - 8) as f64, 0.0),
        GgmlType::Q4_1 => both(f16v(b, 0) * nib(&b[4..], i) as f64, f16v(b, 2)),
        GgmlType::Q5_0 => {
            let qh = u32::from_le_bytes(b[2..6].try_into().unwrap());
            both(f16v(b, 0) * (nib(&b[6..], i) + 16 * bit(qh, i) - 16) as f64, 0.0)
        }
        GgmlType::Q5_1 => {
            let qh = u32::from_le_bytes(b[4..8].try_into().unwrap());
            both(f16v(b, 0) * (nib(&b[8..], i) + 16 * bit(qh, i)) as f64, f16v(b, 2))
        }
        GgmlType::Q8_0 => both(f16v(b, 0) * b[2 + i] as i8 as f64, 0.0),
        GgmlType::Q8_1 => both(f16v(b, 0) * b[4 + i] as i8 as f64, 0.0),
        GgmlType::Q8_K => both(f32::from_le_bytes(b[0..4].try_into().unwrap()) as f64 * b[4 + i] as i8 as f64, 0.0),
        GgmlType::Q2_K => {
            // Half h, shift j: element 128h + 32j + l is bits 2j..2j+2 of qs[32h + l].
            let (h, j, l) = (i / 128, (i % 128) / 32, i % 32);
            let q = ((b[16 + 32 * h + l] >> (2 * j)) & 3) as f64;
            let sc = b[i / 16];
            both(f16v(b, 80) * (sc & 15) as f64 * q, -f16v(b, 82) * (sc >> 4) as f64)
        }
        GgmlType::Q3_K => {
            let (h, j, l) = (i / 128, (i % 128) / 32, i % 32);
            let low = ((b[32 + 32 * h + l] >> (2 * j)) & 3) as i64;
            let high = ((b[l] >> (4 * h + j)) & 1) as i64;
            let s = &b[96..108];
            let g = i / 16;
            let sc_low = if g < 8 { s[g] & 15 } else { s[g - 8] >> 4 } as i64;
            let sc_high = ((s[8 + g % 4] >> (2 * (g / 4))) & 3) as i64;
            let sc = (sc_low + 16 * sc_high - 32) as f64;
            both(f16v(b, 108) * sc * (low + 4 * high - 4) as f64, 0.0)
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let s = i / 32; // sub-block
            let s12 = &b[4..16];
            let (sc, mn) = if s < 4 {
                (s12[s] & 63, s12[s + 4] & 63)
            } else {
                ((s12[s + 4] & 15) | ((s12[s - 4] >> 6) << 4), (s12[s + 4] >> 4) | ((s12[s] >> 6) << 4))
            };
            let (qs_off, fifth) = if ty == GgmlType::Q4_K { (16, 0) } else { (48, ((b[16 + i % 32] >> s) & 1) as i64) };
            let byte = b[qs_off + 32 * (s / 2) + i % 32];
            let q = if s.is_multiple_of(2) { byte & 15 } else { byte >> 4 } as i64 + 16 * fifth;
            both(f16v(b, 0) * sc as f64 * q as f64, -f16v(b, 2) * mn as f64)
        }
        GgmlType::Q6_K => {
            let (h, c, l) = (i / 128, (i % 128) / 32, i % 32);
            let byte = b[64 * h + 32 * (c % 2) + l];
            let low = if c < 2 { byte & 15 } else { byte >> 4 } as i64;
            let high = ((b[128 + 32 * h + l] >> (2 * c)) & 3) as i64;
            let sc = b[192 + i / 16] as i8 as f64;
            both(f16v(b, 208) * sc * (low + 16 * high - 32) as f64, 0.0)
        }
    }
}

fn dequant_vec(ty: GgmlType, data: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    dequantize(ty, data, &mut out).unwrap();
    out
}

#[test]
fn dequantize_matches_elementwise_reading_of_each_layout() {
    let mut rng = Rng(1);
    for ty in GgmlType::ALL {
        let n = 2 * blocks::QK_K;
        let data = random_weights(&mut rng, ty, 1, n);
        let got = dequant_vec(ty, &data, n);
        let (bs, ts) = (ty.block_size(), ty.type_size());
        for (i, &g) in got.iter().enumerate() {
            let (want, mag) = ref_element(ty, &data[i / bs * ts..][..ts], i % bs);
            // f32 evaluation of a product of two or three factors, maybe minus a min: a few ulps
            // of the largest term.
            let tol = 1e-6 * mag.max(want.abs()) + 1e-30;
            assert!((g as f64 - want).abs() <= tol, "{ty} element {i}: got {g}, want {want}");
        }
    }
}

#[test]
fn scale_unpacking_round_trips() {
    // Pack known six-bit values the way the format describes, then unpack them.
    let sc: [u8; 8] = [0, 1, 17, 63, 32, 5, 48, 62];
    let mn: [u8; 8] = [63, 2, 0, 31, 33, 60, 7, 16];
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4);
    }
    assert_eq!(k4_scales_mins(&s), (sc, mn));

    let want: [i8; 16] = std::array::from_fn(|j| (j as i8 * 4) - 32);
    let mut s = [0u8; 12];
    for (j, &w) in want.iter().enumerate() {
        let u = (w + 32) as u8;
        s[j % 8] |= (u & 15) << (4 * (j / 8));
        s[8 + j % 4] |= (u >> 4) << (2 * (j / 4));
    }
    assert_eq!(q3k_scales(&s), want);
}

/// `(dequantized W) @ x` in f64, and for each output the bound on the error that activation
/// quantization may cause. Each activation is rounded to a multiple of its block's step
/// `d = max|x| / 127`, so it moves by at most `d / 2` (0.501 d allows for the f32 product
/// `x * (1/d)`); the output moves by at most `sum_k |w_k| * d_k / 2`. On top, f32
/// accumulation: 1e-5 of `sum_k |w_k x_k|`. Dense weights skip quantization, so only the latter.
fn reference(ty: GgmlType, w: &[f32], x: &[f32], m: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let quantized = !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_1 | GgmlType::Q8_K);
    let act_block = if ty.block_size() == blocks::QK_K { blocks::QK_K } else { blocks::QK };
    let step: Vec<f64> = x
        .chunks(act_block)
        .map(|b| if quantized { b.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 127.0 } else { 0.0 })
        .collect();
    let (mut want, mut tol) = (vec![0f64; m * n], vec![0f64; m * n]);
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut abs, mut quant_err) = (0f64, 0f64, 0f64);
            for c in 0..k {
                let (wv, xv) = (w[j * k + c] as f64, x[i * k + c] as f64);
                s += wv * xv;
                abs += (wv * xv).abs();
                quant_err += wv.abs() * 0.501 * step[(i * k + c) / act_block];
            }
            want[i * n + j] = s;
            tol[i * n + j] = quant_err + 1e-5 * abs + 1e-12;
        }
    }
    (want, tol)
}

fn run(kernel: Kernel, x: &[f32], m: usize, w: &QuantMatrix) -> Vec<f32> {
    let mut out = vec![f32::NAN; m * w.rows];
    check_matmul(x, m, w, &mut out).unwrap();
    matmul_with(kernel, x, m, w, &mut out);
    out
}

fn kernels() -> Vec<Kernel> {
    let best = Kernel::best();
    if matches!(best, Kernel::Scalar) {
        eprintln!("note: this CPU has no AVX2; only the scalar kernels are tested");
        vec![Kernel::Scalar]
    } else {
        let mut all = vec![Kernel::Scalar, best];
        // With AVX-512 VNNI present, also the plain AVX2 kernels that other CPUs run.
        if let Kernel::Avx2(token) = best {
            if token.vnni() {
                all.push(Kernel::Avx2(token.without_vnni()));
            }
        }
        all
    }
}

#[test]
fn vnni_kernels_match_avx2_bitwise() {
    let Kernel::Avx2(token) = Kernel::best() else {
        eprintln!("note: no AVX2 on this CPU, nothing to compare");
        return;
    };
    if !token.vnni() {
        eprintln!("note: no AVX-512 VNNI on this CPU, nothing to compare");
        return;
    }
    let mut rng = Rng(11);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0] {
        let (n, k) = (13, 25 * blocks::QK);
        let data = random_weights(&mut rng, ty, n, k);
        let w = QuantMatrix::new(ty, &data, n, k).unwrap();
        for m in 1..=19 {
            let x = random_x(&mut rng, m, k);
            let vnni = run(Kernel::Avx2(token), &x, m, &w);
            let avx2 = run(Kernel::Avx2(token.without_vnni()), &x, m, &w);
            assert!(
                vnni.iter().zip(&avx2).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{ty} m={m}: VNNI and AVX2 results differ"
            );
        }
    }
}

#[test]
fn matmul_matches_f64_reference_within_activation_quantization_error() {
    let mut rng = Rng(2);
    // Besides a common width, an odd number of blocks (the pair loops' tail) and, for the
    // one-element "blocks" of dense types, a width that is not a multiple of 8 (SIMD tails).
    let shapes = GgmlType::ALL.into_iter().flat_map(|ty| {
        let odd = match ty.block_size() {
            1 => 44,
            bs => 7 * bs,
        };
        [(ty, 2 * blocks::QK_K), (ty, odd)]
    });
    for (ty, k) in shapes {
        let n = 37;
        let data = random_weights(&mut rng, ty, n, k);
        let w = QuantMatrix::new(ty, &data, n, k).unwrap();
        let w_f32 = dequant_vec(ty, &data, n * k);
        for m in [1, 3, 4, 6, 9] {
            let x = random_x(&mut rng, m, k);
            let (want, tol) = reference(ty, &w_f32, &x, m, n, k);
            for kernel in kernels() {
                let got = run(kernel, &x, m, &w);
                for (idx, (&g, (&wv, &t))) in got.iter().zip(want.iter().zip(&tol)).enumerate() {
                    assert!(
                        (g as f64 - wv).abs() <= t,
                        "{ty} {kernel:?} m={m} out[{idx}]: got {g}, want {wv} (tolerance {t})"
                    );
                    // The usual rule of thumb, 1e-2 of the norm product; the bound above is the
                    // binding one here (observed errors stay near 1e-3 of the norm product).
                    let (i, j) = (idx / n, idx % n);
                    let norm = |v: &[f32]| v.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
                    let norms = norm(&w_f32[j * k..(j + 1) * k]) * norm(&x[i * k..(i + 1) * k]);
                    assert!((g as f64 - wv).abs() <= 1e-2 * norms + 1e-12, "{ty} {kernel:?} m={m} out[{idx}]");
                }
            }
        }
    }
}

#[test]
fn avx2_kernels_agree_with_scalar() {
    let mut rng = Rng(3);
    if matches!(Kernel::best(), Kernel::Scalar) {
        eprintln!("note: no AVX2 on this CPU, nothing to compare");
        return;
    }
    for ty in GgmlType::ALL {
        // Odd block counts and a dense width off the SIMD width, to reach every tail.
        let k = match ty.block_size() {
            1 => 45,
            blocks::QK => 25 * blocks::QK,
            _ => 3 * blocks::QK_K,
        };
        let n = 13;
        let data = random_weights(&mut rng, ty, n, k);
        let w = QuantMatrix::new(ty, &data, n, k).unwrap();
        let w_f32 = dequant_vec(ty, &data, n * k);
        for m in 1..=9 {
            let x = random_x(&mut rng, m, k);
            let scalar = run(Kernel::Scalar, &x, m, &w);
            let simd = run(Kernel::best(), &x, m, &w);
            for i in 0..m {
                for j in 0..n {
                    // Both compute every block's integer dot exactly; they differ only in the
                    // order of f32 additions and where block offsets are applied, so they agree
                    // to 1e-5 of the sum of the magnitudes of the products.
                    let mag: f64 = (0..k).map(|c| (w_f32[j * k + c] * x[i * k + c]).abs() as f64).sum();
                    let (a, b) = (scalar[i * n + j], simd[i * n + j]);
                    assert!(
                        ((a - b) as f64).abs() <= 1e-5 * mag + 1e-12,
                        "{ty} m={m} out[{i},{j}]: scalar {a}, avx2 {b}"
                    );
                }
            }
        }
    }
}

const PACKED_TYPES: [GgmlType; 3] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0];

#[test]
fn packing_round_trips_to_the_file_layout() {
    let mut rng = Rng(21);
    // 37 rows: two full groups and a padded one; 5 blocks per row.
    for ty in PACKED_TYPES {
        let (n, k) = (37, 5 * blocks::QK);
        let data = random_weights(&mut rng, ty, n, k);
        let w = QuantMatrix::new(ty, &data, n, k).unwrap();
        let p = PackedMatrix::pack_layout(&w).expect("packable type");
        assert_eq!((p.ty(), p.rows(), p.cols()), (ty, n, k));
        assert_eq!(p.nbytes() % 64, 0);
        let rb = ty.row_bytes(k).unwrap();
        let mut row = vec![0u8; rb];
        let mut deq = vec![0f32; k];
        let mut want = vec![0f32; k];
        for r in 0..n {
            p.unpack_row(r, &mut row).unwrap();
            assert_eq!(row, data[r * rb..(r + 1) * rb], "{ty} row {r}");
            p.dequantize_row(r, &mut deq).unwrap();
            dequantize(ty, &data[r * rb..(r + 1) * rb], &mut want).unwrap();
            assert!(deq.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{ty} row {r}");
        }
        assert!(p.unpack_row(n, &mut row).is_err());
        assert!(p.unpack_row(0, &mut row[1..]).is_err());
        assert!(p.dequantize_row(0, &mut deq[1..]).is_err());
    }
    // Types without a packed kernel stay in the file layout.
    for ty in [GgmlType::Q4_K, GgmlType::Q5_0, GgmlType::F16, GgmlType::F32] {
        let (n, k) = (16, blocks::QK_K);
        let data = random_weights(&mut rng, ty, n, k);
        let w = QuantMatrix::new(ty, &data, n, k).unwrap();
        assert!(PackedMatrix::pack_layout(&w).is_none(), "{ty}");
    }
}

/// Packs `w`, or `None` (with a note) when this CPU has no packed kernel.
fn pack_here(w: &QuantMatrix) -> Option<PackedMatrix> {
    let p = PackedMatrix::pack(w);
    if p.is_none() {
        eprintln!("note: no AVX-512 VNNI here; the packed kernel is not exercised");
    }
    p
}

fn run_packed(x: &[f32], m: usize, p: &PackedMatrix) -> Vec<f32> {
    let mut out = vec![f32::NAN; m * p.rows()];
    packed_matmul(x, m, p, &mut out).unwrap();
    out
}

#[test]
fn packed_matmul_matches_f64_reference_within_activation_quantization_error() {
    let mut rng = Rng(22);
    for ty in PACKED_TYPES {
        // Row counts with full and padded groups; one and many blocks; m over full and partial
        // tiles of 8 (and large enough for the parallel driver at the bigger shapes).
        for (n, k) in [(16, blocks::QK), (37, 7 * blocks::QK), (300, 18 * blocks::QK)] {
            let data = random_weights(&mut rng, ty, n, k);
            let w = QuantMatrix::new(ty, &data, n, k).unwrap();
            let Some(p) = pack_here(&w) else { return };
            let w_f32 = dequant_vec(ty, &data, n * k);
            for m in [1, 2, 5, 8, 9, 17] {
                let x = random_x(&mut rng, m, k);
                let (want, tol) = reference(ty, &w_f32, &x, m, n, k);
                let got = run_packed(&x, m, &p);
                for (idx, (&g, (&wv, &t))) in got.iter().zip(want.iter().zip(&tol)).enumerate() {
                    assert!(
                        (g as f64 - wv).abs() <= t,
                        "{ty} n={n} k={k} m={m} out[{idx}]: got {g}, want {wv} (tol {t})"
                    );
                }
                // The row kernels quantize activations the same way, so the two differ only by
                // f32 summation order.
                let rows = run(Kernel::best(), &x, m, &w);
                for (idx, (&g, &r)) in got.iter().zip(&rows).enumerate() {
                    let (i, j) = (idx / n, idx % n);
                    let abs: f64 = (0..k).map(|c| (w_f32[j * k + c] as f64 * x[i * k + c] as f64).abs()).sum::<f64>();
                    assert!(
                        (g as f64 - r as f64).abs() <= 1e-5 * abs + 1e-12,
                        "{ty} m={m} out[{idx}]: packed {g}, row kernel {r}"
                    );
                }
            }
        }
    }
}

#[test]
fn packed_rows_do_not_depend_on_the_batch() {
    let mut rng = Rng(23);
    for ty in PACKED_TYPES {
        let (n, k) = (300, 18 * blocks::QK);
        let data = random_weights(&mut rng, ty, n, k);
        let w = QuantMatrix::new(ty, &data, n, k).unwrap();
        let Some(p) = pack_here(&w) else { return };
        let m = 19;
        let x = random_x(&mut rng, m, k);
        let batched = run_packed(&x, m, &p);
        for i in 0..m {
            let alone = run_packed(&x[i * k..(i + 1) * k], 1, &p);
            assert!(
                alone.iter().zip(&batched[i * n..(i + 1) * n]).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{ty}: row {i} differs between m=1 and m={m}"
            );
        }
    }
}

#[test]
fn packed_matmul_checks_shapes() {
    let mut rng = Rng(24);
    let (n, k) = (20, 2 * blocks::QK);
    let data = random_weights(&mut rng, GgmlType::Q4_1, n, k);
    let w = QuantMatrix::new(GgmlType::Q4_1, &data, n, k).unwrap();
    // The layout-only packing exists everywhere, so shape errors are checked on every CPU.
    let p = PackedMatrix::pack_layout(&w).unwrap();
    let x = vec![0.5f32; 3 * k];
    let mut out = vec![0f32; 3 * n];
    assert!(packed_matmul(&x, 3, &p, &mut out).is_ok());
    assert!(matches!(packed_matmul(&x, 2, &p, &mut out), Err(QuantError::LengthMismatch { .. })));
    assert!(matches!(packed_matmul(&x, 3, &p, &mut out[1..]), Err(QuantError::LengthMismatch { .. })));
    assert!(packed_matmul(&[], 0, &p, &mut []).is_ok());
    // And the result, on whichever path this CPU takes, matches the file-layout matmul closely.
    let mut want = vec![0f32; 3 * n];
    quant_matmul(&x, 3, &w, &mut want).unwrap();
    assert!(out.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-4 * (1.0 + b.abs())));
}

#[test]
fn row_results_do_not_depend_on_the_batch() {
    // Large enough for the parallel driver, with m spanning full and partial tiles of 8 and 4 rows.
    let mut rng = Rng(4);
    for ty in [GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::F16] {
        let (n, k) = (300, 2 * blocks::QK_K);
        let data = random_weights(&mut rng, ty, n, k);
        let w = QuantMatrix::new(ty, &data, n, k).unwrap();
        let m = 19;
        let x = random_x(&mut rng, m, k);
        for kernel in kernels() {
            let batched = run(kernel, &x, m, &w);
            for i in 0..m {
                let alone = run(kernel, &x[i * k..(i + 1) * k], 1, &w);
                assert!(
                    alone.iter().zip(&batched[i * n..(i + 1) * n]).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ty} {kernel:?}: row {i} differs between m=1 and m={m}"
                );
            }
        }
    }
}

#[test]
fn activation_quantization_keeps_values_in_range_and_sums_consistent() {
    let mut rng = Rng(5);
    let mut x = random_x(&mut rng, 1, 512);
    x[7] = f32::INFINITY;
    x[300] = f32::NAN;
    for b in quantize_rows::<BlockQ8>(Kernel::Scalar, &x, 512) {
        assert!(b.qs.iter().all(|&q| q != i8::MIN));
    }
    for kernel in kernels() {
        for b in quantize_rows::<BlockQ8x2>(kernel, &x, 512) {
            assert!(b.lo.iter().chain(&b.hi).all(|&q| q != i8::MIN));
        }
        for b in quantize_rows::<BlockQ8K>(kernel, &x, 512) {
            assert!(b.qs.iter().all(|&q| q != i8::MIN));
        }
    }

    let x = random_x(&mut rng, 2, 512);
    for (xb, b) in x.chunks(32).zip(quantize_rows::<BlockQ8>(Kernel::Scalar, &x, 512)) {
        let sum: i32 = b.qs.iter().map(|&q| q as i32).sum();
        assert_eq!(b.s, b.d * sum as f32);
        assert_eq!(b.d, xb.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0);
        for (&xv, &q) in xb.iter().zip(&b.qs) {
            assert!((xv - b.d * q as f32).abs() <= 0.501 * b.d + 1e-7);
        }
    }
    for b in quantize_rows::<BlockQ8K>(Kernel::Scalar, &x, 512) {
        for (g, &bs) in b.bsums.iter().enumerate() {
            let want: i32 = b.qs[16 * g..16 * g + 16].iter().map(|&q| q as i32).sum();
            assert_eq!(bs as i32, want);
        }
    }
}

/// `BlockQ8`s of rows of `blocks_per_row` blocks, regrouped into the pair layout.
fn to_pairs(blocks: &[BlockQ8], blocks_per_row: usize) -> Vec<BlockQ8x2> {
    let mut out = Vec::new();
    for row in blocks.chunks(blocks_per_row) {
        for two in row.chunks(2) {
            let mut p = BlockQ8x2 { ds: [0.0; 4], lo: [0; 32], hi: [0; 32] };
            for (h, b) in two.iter().enumerate() {
                p.ds[2 * h] = b.d;
                p.ds[2 * h + 1] = b.s;
                p.lo[16 * h..16 * h + 16].copy_from_slice(&b.qs[..16]);
                p.hi[16 * h..16 * h + 16].copy_from_slice(&b.qs[16..]);
            }
            out.push(p);
        }
    }
    out
}

#[test]
fn activation_quantization_is_identical_on_every_kernel() {
    // Ties included: multiples of d/2 where d = 127 / 127 = 1 (max |x| is 127). Rows of 7
    // blocks, so every row ends with a half-empty pair.
    let mut rng = Rng(8);
    let k = 7 * 32;
    let mut x = random_x(&mut rng, 3, k);
    x[0] = 127.0;
    for (i, v) in x[1..32].iter_mut().enumerate() {
        *v = i as f32 * 0.5 - 7.5;
    }
    let q8 = quantize_rows::<BlockQ8>(Kernel::Scalar, &x, k);
    assert_eq!(&q8[0].qs[..6], &[127, -8, -7, -6, -6, -6]);
    let pairs = to_pairs(&q8, 7);
    let xk = random_x(&mut rng, 3, 512);
    let q8k = quantize_rows::<BlockQ8K>(Kernel::Scalar, &xk, 512);
    for kernel in kernels() {
        assert!(quantize_rows::<BlockQ8x2>(kernel, &x, k) == pairs, "{kernel:?}");
        assert!(quantize_rows::<BlockQ8K>(kernel, &xk, 512) == q8k, "{kernel:?}");
    }
}

/// Fixtures written by `fixtures/make_quant_fixtures.py` with the `gguf` Python package:
/// (type, raw bytes, gguf's dequantization), each 4 rows x 512 columns.
fn gguf_fixtures() -> Vec<(GgmlType, &'static [u8], Vec<f32>)> {
    macro_rules! fixture {
        ($ty:ident) => {
            (
                GgmlType::$ty,
                include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/quant_", stringify!($ty), ".bin"))
                    .as_slice(),
                include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/quant_", stringify!($ty), ".f32"))
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            )
        };
    }
    vec![
        fixture!(F32),
        fixture!(F16),
        fixture!(BF16),
        fixture!(Q4_0),
        fixture!(Q4_1),
        fixture!(Q5_0),
        fixture!(Q5_1),
        fixture!(Q8_0),
        fixture!(Q2_K),
        fixture!(Q3_K),
        fixture!(Q4_K),
        fixture!(Q5_K),
        fixture!(Q6_K),
    ]
}

#[test]
fn dequantize_matches_gguf_python_reference() {
    for (ty, raw, want) in gguf_fixtures() {
        assert_eq!(want.len(), 4 * 512, "{ty} fixture");
        let got = dequant_vec(ty, raw, want.len());
        // Same f32 operations in the same order as gguf's numpy code, so bit-for-bit equal.
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(g.to_bits() == w.to_bits(), "{ty} element {i}: ours {g}, gguf {w}");
        }
    }
}

#[test]
fn matmul_on_gguf_quantized_weights_matches_gguf_dequantization() {
    let mut rng = Rng(6);
    for (ty, raw, w_f32) in gguf_fixtures() {
        let (n, k, m) = (4, 512, 5);
        let w = QuantMatrix::new(ty, raw, n, k).unwrap();
        let x = random_x(&mut rng, m, k);
        let (want, tol) = reference(ty, &w_f32, &x, m, n, k);
        for kernel in kernels() {
            let got = run(kernel, &x, m, &w);
            for (idx, (&g, (&wv, &t))) in got.iter().zip(want.iter().zip(&tol)).enumerate() {
                assert!((g as f64 - wv).abs() <= t, "{ty} {kernel:?} out[{idx}]: got {g}, want {wv}");
            }
        }
    }
}

#[test]
fn type_table_is_consistent() {
    for ty in GgmlType::ALL {
        assert_eq!(GgmlType::from_u32(ty.id()), Some(ty));
        assert_eq!(ty.to_string(), ty.name());
        assert_eq!(ty.row_bytes(3 * ty.block_size()), Some(3 * ty.type_size()));
    }
    assert_eq!(GgmlType::from_u32(4), None);
    assert_eq!(GgmlType::Q4_K.row_bytes(100), None);
    assert_eq!(GgmlType::Q4_1.row_bytes(576), Some(360));
    let sizes: Vec<_> = GgmlType::ALL.iter().map(|t| (t.block_size(), t.type_size())).collect();
    assert_eq!(
        sizes,
        [
            (1, 4),
            (1, 2),
            (32, 18),
            (32, 20),
            (32, 22),
            (32, 24),
            (32, 34),
            (32, 36),
            (256, 84),
            (256, 110),
            (256, 144),
            (256, 176),
            (256, 210),
            (256, 292),
            (1, 2)
        ]
    );
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let data = vec![0u8; 2 * 20];
    let mut out = vec![0f32; 64];
    assert!(matches!(dequantize(GgmlType::Q4_1, &data, &mut out[..63]), Err(QuantError::NotBlockMultiple { .. })));
    assert!(matches!(
        dequantize(GgmlType::Q4_1, &data[..39], &mut out),
        Err(QuantError::LengthMismatch { expected: 40, got: 39, .. })
    ));
    assert!(dequantize(GgmlType::Q4_1, &data, &mut out).is_ok());

    let w = QuantMatrix { ty: GgmlType::Q4_1, data: &data, rows: 2, cols: 32 };
    let x = vec![1f32; 3 * 32];
    let mut out = vec![0f32; 3 * 2];
    assert!(quant_matmul(&x, 3, &w, &mut out).is_ok());
    assert!(matches!(quant_matmul(&x, 2, &w, &mut out), Err(QuantError::LengthMismatch { .. })));
    assert!(matches!(quant_matmul(&x, 3, &w, &mut out[..5]), Err(QuantError::LengthMismatch { .. })));
    let short = QuantMatrix { rows: 3, ..w };
    assert!(matches!(quant_matmul(&x, 3, &short, &mut [0f32; 9]), Err(QuantError::LengthMismatch { .. })));
    let ragged = QuantMatrix { cols: 33, ..w };
    assert!(matches!(quant_matmul(&x, 3, &ragged, &mut out), Err(QuantError::NotBlockMultiple { .. })));
    let huge = QuantMatrix { rows: usize::MAX, ..w };
    assert!(quant_matmul(&x, 3, &huge, &mut out).is_err());
    assert!(QuantMatrix::new(GgmlType::Q4_1, &data, 1, 32).is_err());
    let msg = quant_matmul(&x, 2, &w, &mut out).unwrap_err().to_string();
    assert!(msg.contains("expected 64"), "{msg}");

    // Empty shapes are valid and do nothing (or write zeros for k = 0).
    assert!(quant_matmul(&[], 0, &w, &mut []).is_ok());
    let empty = QuantMatrix { ty: GgmlType::Q4_1, data: &[], rows: 2, cols: 0 };
    let mut out = vec![f32::NAN; 6];
    quant_matmul(&[], 3, &empty, &mut out).unwrap();
    assert_eq!(out, [0.0; 6]);
}

/// Best time per call of `f` over about half a second, in batches of 10 calls.
fn best_time(mut f: impl FnMut()) -> f64 {
    let mut best = f64::INFINITY;
    let start = std::time::Instant::now();
    while start.elapsed().as_secs_f64() < 0.5 {
        let t = std::time::Instant::now();
        for _ in 0..10 {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / 10.0);
    }
    best
}

/// Throughput for the lead's information, not asserted: `cargo test -p ironllm-kernels --release
/// -- --ignored --nocapture quant_matmul_throughput`. "pool" calls from a rayon worker thread (as
/// when the forward pass runs inside `ThreadPool::install`), "outside" from a plain thread, which
/// pays rayon's cross-thread hand-off on every call.
#[test]
#[ignore]
fn quant_matmul_throughput() {
    let mut rng = Rng(7);
    let cases = [
        (GgmlType::Q4_1, 1, 1536, 576),
        (GgmlType::Q4_1, 16, 1536, 576),
        (GgmlType::Q4_1, 1, 576, 1536),
        (GgmlType::Q4_1, 64, 1536, 576),
        (GgmlType::Q8_0, 1, 49152, 576),
        (GgmlType::Q4_K, 1, 1536, 768),
        (GgmlType::Q6_K, 1, 1536, 768),
    ];
    println!("rayon threads: {}", rayon::current_num_threads());
    for (ty, m, n, k) in cases {
        let data = random_weights(&mut rng, ty, n, k);
        let w = QuantMatrix::new(ty, &data, n, k).unwrap();
        let x = random_x(&mut rng, m, k);
        let mut out = vec![0f32; m * n];
        let packed = PackedMatrix::pack(&w);
        let runs = [
            ("packed", Kernel::best(), true),
            ("pool", Kernel::best(), true),
            ("outside", Kernel::best(), false),
            ("scalar", Kernel::Scalar, true),
        ];
        for (label, kernel, in_pool) in runs {
            if label == "packed" && packed.is_none() {
                continue;
            }
            let mut time = || {
                best_time(|| match (&packed, label) {
                    (Some(p), "packed") => packed_matmul(&x, m, p, &mut out).unwrap(),
                    _ => matmul_with(kernel, &x, m, &w, &mut out),
                })
            };
            let best = if in_pool { rayon::scope(|_| time()) } else { time() };
            let gflops = 2.0 * (m * n * k) as f64 / best / 1e9;
            let gbs = data.len() as f64 / best / 1e9;
            println!(
                "{ty} m={m:<3} n={n:<5} k={k:<5} {label:<7}: {:>8.1} us  {gflops:>6.1} GFLOP/s  {gbs:>6.2} GB/s (weights)",
                best * 1e6
            );
        }
    }
}

/// All the matmuls of one SmolLM2-135M forward step (Q4_1 projections, the tied Q8_0 lm_head),
/// ~96 MB of weights, so they stream from memory as in real decoding. For the lead's information:
/// `cargo test -p ironllm-kernels --release -- --ignored --nocapture smollm2_135m_step`.
#[test]
#[ignore]
fn smollm2_135m_step_matmul_time() {
    let mut rng = Rng(10);
    let (hidden, kv, inter, vocab, layers) = (576, 192, 1536, 49152, 30);
    let layer_shapes = [
        (hidden, hidden),
        (kv, hidden),
        (kv, hidden),
        (hidden, hidden),
        (inter, hidden),
        (inter, hidden),
        (hidden, inter),
    ];
    let mut mats: Vec<(GgmlType, usize, usize, Vec<u8>)> = Vec::new();
    for _ in 0..layers {
        for &(n, k) in &layer_shapes {
            mats.push((GgmlType::Q4_1, n, k, random_weights(&mut rng, GgmlType::Q4_1, n, k)));
        }
    }
    mats.push((GgmlType::Q8_0, vocab, hidden, random_weights(&mut rng, GgmlType::Q8_0, vocab, hidden)));
    let total_bytes: usize = mats.iter().map(|m| m.3.len()).sum();
    let total_macs: usize = mats.iter().map(|m| m.1 * m.2).sum();
    println!("rayon threads: {}, weights {:.1} MB", rayon::current_num_threads(), total_bytes as f64 / 1e6);
    let packed: Vec<Option<PackedMatrix>> = mats
        .iter()
        .map(|(ty, n, k, data)| PackedMatrix::pack(&QuantMatrix { ty: *ty, data, rows: *n, cols: *k }))
        .collect();
    for m in [1, 4, 16, 64] {
        let x = random_x(&mut rng, m, inter);
        let mut out = vec![0f32; m * vocab];
        for (in_pool, use_packed) in [(true, true), (true, false), (false, false)] {
            if use_packed && packed.iter().any(Option::is_none) {
                continue;
            }
            let mut step = || {
                let mut best = f64::INFINITY;
                for _ in 0..8 {
                    let t = std::time::Instant::now();
                    for ((ty, n, k, data), p) in mats.iter().zip(&packed) {
                        match p {
                            Some(p) if use_packed => packed_matmul(&x[..m * k], m, p, &mut out[..m * n]).unwrap(),
                            _ => {
                                let w = QuantMatrix { ty: *ty, data, rows: *n, cols: *k };
                                quant_matmul(&x[..m * k], m, &w, &mut out[..m * n]).unwrap()
                            }
                        }
                    }
                    best = best.min(t.elapsed().as_secs_f64());
                }
                best
            };
            let best = if in_pool { rayon::scope(|_| step()) } else { step() };
            println!(
                "m={m:<3} {:<7}: {:>7.2} ms per step ({} matmuls), {:>6.1} GFLOP/s, {:>5.1} GB/s of weights",
                if use_packed {
                    "packed"
                } else if in_pool {
                    "pool"
                } else {
                    "outside"
                },
                best * 1e3,
                mats.len(),
                2.0 * (m * total_macs) as f64 / best / 1e9,
                total_bytes as f64 / best / 1e9
            );
        }
    }
}

/// The tied Q8_0 LM head of the default model (30 MB, streamed from memory) at m = 1, packed and
/// in the file layout, in alternating rounds: `cargo test -p ironllm-kernels --release --
/// --ignored --nocapture lm_head_packed_ab`.
#[test]
#[ignore]
fn lm_head_packed_ab() {
    let mut rng = Rng(12);
    let (n, k) = (49152, 576);
    for ty in [GgmlType::Q8_0, GgmlType::Q4_1] {
        let data = random_weights(&mut rng, ty, n, k);
        let w = QuantMatrix::new(ty, &data, n, k).unwrap();
        let Some(p) = PackedMatrix::pack(&w) else { return };
        for m in [1, 16] {
            let x = random_x(&mut rng, m, k);
            let mut out = vec![0f32; m * n];
            for round in 0..3 {
                let a = rayon::scope(|_| best_time(|| packed_matmul(&x, m, &p, &mut out).unwrap()));
                let b = rayon::scope(|_| best_time(|| quant_matmul(&x, m, &w, &mut out).unwrap()));
                println!("{ty} m={m} round {round}: packed {:.0} us, rows {:.0} us", a * 1e6, b * 1e6);
            }
        }
    }
}
