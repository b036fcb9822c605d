//! The half-precision GEMMs (`ops::gemm`: cuBLASLt for three rows and more, the skinny GEMM below) against
//! a float64 product of the same rounded inputs, before and after `ops::tune_gemm` has timed and chosen
//! algorithms, at sizes on and between the timed ones, with bf16/f16 and f32 outputs; and
//! `ops::gemm_accumulate` (`y += x w^T` in cuBLASLt's or the skinny GEMM's epilogue) against `ops::gemm` plus
//! the add on the host, where it declines (returns false) leaving y as it was; the two gate/up GEMMs with
//! SiLU-and-mul in their epilogue (the Hopper GEMM for prefill steps, the skinny GEMM for decode steps of one
//! or two rows) against the GEMM and `ops::silu_and_mul` they replace; and the skinny GEMM with the RMSNorm in
//! its prologue against `ops::rms_norm` and the GEMM.
//!
//! Every test passes with a printed SKIP line on a machine without a CUDA device, so CPU CI stays green.

mod common;

use common::open_gpu;
use ironllm_cuda::tensor::{DevBuf, GpuDType};
use ironllm_cuda::{ops, Gpu};
use ironllm_model::sampler::Rng;

fn random(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) * scale) as f32).collect()
}

/// Values as the GPU holds them (rounded to the dtype).
fn rounded(d: GpuDType, v: &[f32]) -> Vec<f32> {
    d.decode(&d.encode(v))
}

/// Checks y = x w^T from the GPU against float64 on the rounded inputs: f32 accumulation error (k terms)
/// plus one rounding of the output.
#[allow(clippy::too_many_arguments)]
fn check(what: &str, y: &[f32], x: &[f32], w: &[f32], m: usize, n: usize, k: usize, out: GpuDType) {
    let out_eps = match out {
        GpuDType::F32 => 0.0,
        GpuDType::BF16 => 2f64.powi(-8),
        GpuDType::F16 => 2f64.powi(-11),
    };
    let mut bad = 0;
    let mut worst = 0f64;
    for i in 0..m {
        for j in 0..n {
            let (mut r, mut mag) = (0f64, 0f64);
            for t in 0..k {
                let p = f64::from(x[i * k + t]) * f64::from(w[j * k + t]);
                r += p;
                mag += p.abs();
            }
            let err = (f64::from(y[i * n + j]) - r).abs();
            let bound = 1.01 * k as f64 * 2f64.powi(-24) * mag + out_eps * r.abs() + 1e-30;
            if err.is_nan() || err > bound {
                bad += 1;
                worst = worst.max(err / bound);
            }
        }
    }
    assert_eq!(bad, 0, "{what}: {bad} of {} outputs beyond the bound (worst {worst:.2}x)", m * n);
}

#[test]
fn half_gemms_match_float64_before_and_after_algorithm_timing() {
    let Some(gpu) = open_gpu("half_gemms_match_float64_before_and_after_algorithm_timing") else { return };
    let mut rng = Rng::seeded(7);
    let mut flush = DevBuf::zeros(&gpu, GpuDType::F32, ops::l2_flush_bytes(&gpu) / 4).expect("flush");
    for dt in [GpuDType::BF16, GpuDType::F16] {
        // (n, k) like a small model's projections; k % 8 == 0 as every real hidden size.
        for (n, k) in [(384, 256), (1000, 512), (96, 1024)] {
            let max_m = 300;
            let w = rounded(dt, &random(&mut rng, n * k, 1.0 / (k as f64).sqrt()));
            let x = rounded(dt, &random(&mut rng, max_m * k, 1.0));
            let wd = DevBuf::from_f32(&gpu, dt, &w).expect("w");
            let xd = DevBuf::from_f32(&gpu, dt, &x).expect("x");
            for out in [dt, GpuDType::F32] {
                let mut yd = DevBuf::zeros(&gpu, out, max_m * n).expect("y");
                let sizes = [1usize, 2, 3, 5, 16, 17, 64, 100, 256, 300];
                for &m in &sizes {
                    ops::gemm(&gpu, &mut yd, &xd, &wd, None, m, n, k).expect("gemm");
                    let y = yd.to_f32(&gpu).expect("y");
                    check(&format!("{dt:?}->{out:?} m={m} n={n} k={k}, untimed"), &y, &x, &w, m, n, k, out);
                }
                // Time algorithms at a few sizes; GEMMs at, between and beyond them use the winners.
                for m in [4, 64, 256] {
                    let r = ops::tune_gemm(&gpu, &mut yd, &xd, &wd, m, n, k, &mut flush).expect("tune");
                    assert!(r.candidates >= 1 && r.best_ms > 0.0 && r.best_ms <= r.first_ms, "{r:?}");
                }
                for &m in &sizes {
                    ops::gemm(&gpu, &mut yd, &xd, &wd, None, m, n, k).expect("gemm");
                    let y = yd.to_f32(&gpu).expect("y");
                    check(&format!("{dt:?}->{out:?} m={m} n={n} k={k}, timed"), &y, &x, &w, m, n, k, out);
                }
            }
        }
    }
}

#[test]
fn tuned_algorithms_come_back_from_the_disk_cache_on_the_next_open() {
    let Some(first) = open_gpu("tuned_algorithms_come_back_from_the_disk_cache_on_the_next_open") else { return };
    drop(first);
    // A fresh folder holding only the compiled kernels (no recompiles, no earlier tuning file).
    let dir = std::env::temp_dir().join(format!("ironllm-tuning-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    if let Some(kernels) = ironllm_cuda::compile::default_cache_dir() {
        for entry in std::fs::read_dir(kernels).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "cubin" || e == "names") {
                let _ = std::fs::copy(&path, dir.join(entry.file_name()));
            }
        }
    }
    let (m, n, k, dt) = (64, 384, 256, GpuDType::BF16);
    let mut rng = Rng::seeded(11);
    let w = rounded(dt, &random(&mut rng, n * k, 1.0 / (k as f64).sqrt()));
    let x = rounded(dt, &random(&mut rng, m * k, 1.0));
    let run = |expect_cached: bool| {
        let gpu = ironllm_cuda::Gpu::open_with_cache(0, Some(dir.clone())).expect("open");
        let mut flush = DevBuf::zeros(&gpu, GpuDType::F32, ops::l2_flush_bytes(&gpu) / 4).expect("flush");
        let (wd, xd) = (DevBuf::from_f32(&gpu, dt, &w).expect("w"), DevBuf::from_f32(&gpu, dt, &x).expect("x"));
        let mut yd = DevBuf::zeros(&gpu, dt, m * n).expect("y");
        let r = ops::tune_gemm(&gpu, &mut yd, &xd, &wd, m, n, k, &mut flush).expect("tune");
        assert_eq!(r.cached, expect_cached, "{r:?}");
        gpu.save_gemm_tuning();
        ops::gemm(&gpu, &mut yd, &xd, &wd, None, m, n, k).expect("gemm");
        check(&format!("m={m} n={n} k={k}, cached {expect_cached}"), &yd.to_f32(&gpu).expect("y"), &x, &w, m, n, k, dt);
        r
    };
    let timed = run(false);
    let cached = run(true);
    // The second open reports the first one's timing: the same winner, not a new race.
    assert_eq!((cached.candidates, cached.best_ms.to_bits()), (timed.candidates, timed.best_ms.to_bits()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tuning_refuses_what_it_cannot_time() {
    let Some(gpu) = open_gpu("tuning_refuses_what_it_cannot_time") else { return };
    let mut flush = DevBuf::zeros(&gpu, GpuDType::F32, 1 << 20).expect("flush");
    let x = DevBuf::zeros(&gpu, GpuDType::BF16, 64).expect("x");
    let w = DevBuf::zeros(&gpu, GpuDType::BF16, 64).expect("w");
    let mut y = DevBuf::zeros(&gpu, GpuDType::BF16, 64).expect("y");
    // y too small for 8 x 8 rows of k = 8: a shape error, not a launch.
    assert!(ops::tune_gemm(&gpu, &mut y, &x, &w, 8, 16, 8, &mut flush).is_err());
    // f32 GEMMs run our own kernel: nothing to time.
    let xf = DevBuf::zeros(&gpu, GpuDType::F32, 64).expect("x");
    let wf = DevBuf::zeros(&gpu, GpuDType::F32, 64).expect("w");
    let mut yf = DevBuf::zeros(&gpu, GpuDType::F32, 64).expect("y");
    assert!(ops::tune_gemm(&gpu, &mut yf, &xf, &wf, 4, 4, 4, &mut flush).is_err());
    assert!(ops::tune_gemm(&gpu, &mut y, &x, &w, 0, 4, 4, &mut flush).is_err());
}

/// Checks y0 + (x w^T + b) accumulated on the GPU against `p` = `ops::gemm`'s x w^T + b added to y0 on
/// the host (rounded to bf16 as the residual add would). Each side's error from the exact sum is its f32
/// accumulation error plus one bf16 rounding per add (the product, the bias, the host's sum for one; the
/// sum and the bias for the other), which bounds their difference: a missing or doubled y0 is far beyond.
#[allow(clippy::too_many_arguments)]
fn check_sum(
    what: &str,
    got: &[f32],
    y0: &[f32],
    p: &[f32],
    b: &[f32],
    x: &[f32],
    w: &[f32],
    mnk: (usize, usize, usize),
) {
    let (m, n, k) = mnk;
    let eps = 2f64.powi(-8);
    let mut bad = 0;
    let mut worst = 0f64;
    for i in 0..m {
        for j in 0..n {
            let mag: f64 = (0..k).map(|t| (f64::from(x[i * k + t]) * f64::from(w[j * k + t])).abs()).sum();
            let (y, p, b) = (f64::from(y0[i * n + j]), f64::from(p[i * n + j]), f64::from(b[j]));
            let host = f64::from(rounded(GpuDType::BF16, &[(y + p) as f32])[0]);
            let err = (f64::from(got[i * n + j]) - host).abs();
            let rounding = eps * 1.01 * (3.0 * y.abs() + 5.0 * p.abs() + 4.0 * b.abs());
            let bound = 2.02 * k as f64 * 2f64.powi(-24) * mag + rounding + 1e-30;
            if err.is_nan() || err > bound {
                bad += 1;
                worst = worst.max(err / bound);
            }
        }
    }
    assert_eq!(bad, 0, "{what}: {bad} of {} outputs beyond the bound (worst {worst:.2}x)", m * n);
}

#[test]
fn gemm_accumulate_adds_into_y_where_cublaslt_runs_and_declines_elsewhere() {
    let Some(gpu) = open_gpu("gemm_accumulate_adds_into_y_where_cublaslt_runs_and_declines_elsewhere") else {
        return;
    };
    let mut rng = Rng::seeded(11);
    let mut flush = DevBuf::zeros(&gpu, GpuDType::F32, ops::l2_flush_bytes(&gpu) / 4).expect("flush");
    let dt = GpuDType::BF16;
    let (n, k, max_m) = (384, 512, 300);
    let w = rounded(dt, &random(&mut rng, n * k, 1.0 / (k as f64).sqrt()));
    let x = rounded(dt, &random(&mut rng, max_m * k, 1.0));
    let y0 = rounded(dt, &random(&mut rng, max_m * n, 2.0));
    let b = rounded(dt, &random(&mut rng, n, 0.1));
    let (wd, xd, bd) = (
        DevBuf::from_f32(&gpu, dt, &w).expect("w"),
        DevBuf::from_f32(&gpu, dt, &x).expect("x"),
        DevBuf::from_f32(&gpu, dt, &b).expect("bias"),
    );
    let zeros = vec![0f32; n];
    let mut pd = DevBuf::zeros(&gpu, dt, max_m * n).expect("p");
    for timed in [false, true] {
        if timed {
            // Timed winners (split-K among them at few rows) must accumulate in place too.
            for m in [4, 64, 256] {
                ops::tune_gemm(&gpu, &mut pd, &xd, &wd, m, n, k, &mut flush).expect("tune");
            }
        }
        for m in [1, 2, 3, 17, 64, 300] {
            for bias in [None, Some(&bd)] {
                let what = format!("m={m} bias={} timed={timed}", bias.is_some());
                let mut yd = DevBuf::from_f32(&gpu, dt, &y0).expect("y");
                let done = ops::gemm_accumulate(&gpu, &mut yd, &xd, &wd, bias, m, n, k).expect("gemm_accumulate");
                let got = yd.to_f32(&gpu).expect("y");
                assert!(done, "{what}: declined");
                if gpu.skinny_gemm && m <= ops::GEMV_MAX_M {
                    // The skinny GEMM's rows: the product rounded as ops::gemm rounds it, then the sum in
                    // f32 rounded once more, bit for bit (what add_rms_norm does with gemm's output).
                    assert_eq!(got[m * n..], y0[m * n..], "{what}: rows past m changed");
                    ops::gemm(&gpu, &mut pd, &xd, &wd, None, m, n, k).expect("gemm");
                    let p = pd.to_f32(&gpu).expect("p");
                    let mut want: Vec<f32> = (0..m * n).map(|i| y0[i] + p[i]).collect();
                    want = rounded(dt, &want);
                    if bias.is_some() {
                        want = rounded(dt, &(0..m * n).map(|i| want[i] + b[i % n]).collect::<Vec<_>>());
                    }
                    let differ = (0..m * n).filter(|&i| got[i].to_bits() != want[i].to_bits()).count();
                    assert_eq!(differ, 0, "{what}: {differ} sums differ from gemm + add");
                    continue;
                }
                assert_eq!(got[m * n..], y0[m * n..], "{what}: rows past m changed");
                ops::gemm(&gpu, &mut pd, &xd, &wd, bias, m, n, k).expect("gemm");
                let p = pd.to_f32(&gpu).expect("p");
                let b = if bias.is_some() { &b } else { &zeros };
                check_sum(&what, &got, &y0, &p, b, &x, &w, (m, n, k));
            }
        }
    }
    // An f32 output (the logits' form) and float32 inputs are never accumulated into: declined, untouched.
    let mut yf = DevBuf::from_f32(&gpu, GpuDType::F32, &y0).expect("y");
    assert!(!ops::gemm_accumulate(&gpu, &mut yf, &xd, &wd, None, 64, n, k).expect("f32 y"));
    assert_eq!(yf.to_f32(&gpu).expect("y"), y0);
    let xf = DevBuf::from_f32(&gpu, GpuDType::F32, &x).expect("x");
    let wf = DevBuf::from_f32(&gpu, GpuDType::F32, &w).expect("w");
    assert!(!ops::gemm_accumulate(&gpu, &mut yf, &xf, &wf, None, 64, n, k).expect("f32 inputs"));
    // A buffer too small is an error, not a launch.
    let mut small = DevBuf::zeros(&gpu, dt, 16).expect("y");
    assert!(ops::gemm_accumulate(&gpu, &mut small, &xd, &wd, None, 64, n, k).is_err());
}

/// A gate/up case: random x `[m, k]` and stacked `[gate; up]` weight `[2 inter, k]` on the device, the
/// output buffer of a fused form (`m + 3` rows of 7.0, so writes past m show), and the unfused result the
/// fused forms replace: `ops::gemm` into `[m, 2 inter]`, then `ops::silu_and_mul`.
struct SwigluCase {
    x: DevBuf,
    w: DevBuf,
    fused: DevBuf,
    unfused: Vec<f32>,
}

fn swiglu_case(gpu: &Gpu, rng: &mut Rng, dt: GpuDType, m: usize, inter: usize, k: usize) -> SwigluCase {
    let w = rounded(dt, &random(rng, 2 * inter * k, 1.0 / (k as f64).sqrt()));
    let x = rounded(dt, &random(rng, m * k, 2.0));
    let (w, x) = (DevBuf::from_f32(gpu, dt, &w).expect("w"), DevBuf::from_f32(gpu, dt, &x).expect("x"));
    let fused = DevBuf::from_f32(gpu, dt, &vec![7.0; (m + 3) * inter]).expect("act");
    let mut gu = DevBuf::zeros(gpu, dt, m * 2 * inter).expect("gate_up");
    let mut act = DevBuf::zeros(gpu, dt, m * inter).expect("act");
    ops::gemm(gpu, &mut gu, &x, &w, None, m, 2 * inter, k).expect("gemm");
    ops::silu_and_mul(gpu, &mut act, &gu, m, inter).expect("silu_and_mul");
    SwigluCase { x, w, fused, unfused: act.to_f32(gpu).expect("act") }
}

/// The fused gate/up + SiLU-and-mul kernel (`fused_mlp`, Hopper) against the two ops it replaces
/// (`ops::gemm` into [m, 2 inter], then `ops::silu_and_mul`). They round at the same points, so they
/// differ only where the two GEMMs' f32 sums (ours against cuBLASLt's order) round gate or up to a
/// neighbouring value: most outputs must match bit for bit, and every one within 4 ulps of the dtype
/// relative (one ulp on each of gate and up, carried through silu and the product, plus the product's
/// rounding; relative, since each rounding is relative to its own value), plus 2^-8 of an ulp at the
/// output's largest magnitude for values near zero. Rows past m must be left as they were.
#[test]
fn fused_gate_up_silu_matches_the_gemm_and_silu_and_mul_it_replaces() {
    let test = "fused_gate_up_silu_matches_the_gemm_and_silu_and_mul_it_replaces";
    let Some(gpu) = open_gpu(test) else { return };
    if !gpu.has_function("gemm_swiglu_sm90_bf16") {
        println!("SKIP {test}: the fused kernel is Hopper-only ({})", gpu.info.arch);
        return;
    }
    let mut rng = Rng::seeded(11);
    for dt in [GpuDType::BF16, GpuDType::F16] {
        let eps = if dt == GpuDType::BF16 { 2f64.powi(-8) } else { 2f64.powi(-11) };
        for (m, inter, k) in [(1usize, 128usize, 64usize), (200, 256, 512), (1030, 384, 256), (129, 1536, 576)] {
            let SwigluCase { x, w, mut fused, unfused: want } = swiglu_case(&gpu, &mut rng, dt, m, inter, k);
            ironllm_cuda::fused_mlp::gate_up_silu(&gpu, &mut fused, &x, &w, m, inter, k).expect("fused");
            let got = fused.to_f32(&gpu).expect("fused");
            let what = format!("{dt:?} m={m} inter={inter} k={k}");
            let scale = want.iter().map(|v| f64::from(*v).abs()).fold(0.0, f64::max);
            let mut exact = 0;
            for (i, (&g, &r)) in got.iter().zip(&want).enumerate() {
                let (g, r) = (f64::from(g), f64::from(r));
                exact += usize::from(g == r);
                let bound = 4.0 * eps * r.abs() + eps * scale * 2f64.powi(-8);
                assert!((g - r).abs() <= bound, "{what}: output {i} is {g}, unfused {r} (bound {bound:e})");
            }
            let share = exact as f64 / want.len() as f64;
            assert!(share >= 0.95, "{what}: only {:.1}% bit-equal to the unfused path", 100.0 * share);
            assert!(got[m * inter..].iter().all(|&v| v == 7.0), "{what}: rows past m were written");
            println!("{what}: {:.2}% bit-equal", 100.0 * share);
        }
    }
}

/// `ops::gemv_swiglu` (the skinny GEMM with SiLU-and-mul in its epilogue, for one or two decode rows) is
/// `ops::gemm` (which takes the same kernel's plain form at these m) followed by `ops::silu_and_mul`, bit for
/// bit: both round the gate and up sums to the dtype and apply the same SiLU. Rows past m are left as they
/// were, and where the skinny GEMM does not serve (three rows, a k that is not a multiple of 8) it declines.
#[test]
fn gemv_swiglu_is_the_skinny_gemm_then_silu_and_mul_bit_for_bit() {
    let test = "gemv_swiglu_is_the_skinny_gemm_then_silu_and_mul_bit_for_bit";
    let Some(gpu) = open_gpu(test) else { return };
    if !gpu.skinny_gemm {
        println!("SKIP {test}: IRONLLM_DISABLE_GEMV is set");
        return;
    }
    let mut rng = Rng::seeded(12);
    for dt in [GpuDType::BF16, GpuDType::F16] {
        for (m, inter, k) in [(1usize, 128usize, 64usize), (2, 136, 512), (1, 1536, 576), (2, 3000, 4096)] {
            let SwigluCase { x, w, mut fused, unfused: want } = swiglu_case(&gpu, &mut rng, dt, m, inter, k);
            assert!(ops::gemv_swiglu(&gpu, &mut fused, &x, None, &w, m, inter, k).expect("gemv_swiglu"));
            let got = fused.to_f32(&gpu).expect("fused");
            let what = format!("{dt:?} m={m} inter={inter} k={k}");
            let differ = got[..m * inter].iter().zip(&want).filter(|(g, r)| g.to_bits() != r.to_bits()).count();
            assert_eq!(differ, 0, "{what}: {differ} outputs differ from gemm + silu_and_mul");
            assert!(got[m * inter..].iter().all(|&v| v == 7.0), "{what}: rows past m were written");
        }
        // Declines where the skinny GEMM does not serve, writing nothing.
        let (inter, k) = (64usize, 64usize);
        let wd = DevBuf::from_f32(&gpu, dt, &vec![0.5; 2 * inter * (k + 4)]).expect("w");
        let xd = DevBuf::from_f32(&gpu, dt, &vec![0.5; 3 * (k + 4)]).expect("x");
        let mut act = DevBuf::from_f32(&gpu, dt, &vec![7.0; 3 * inter]).expect("act");
        assert!(!ops::gemv_swiglu(&gpu, &mut act, &xd, None, &wd, 3, inter, k).expect("three rows"));
        assert!(!ops::gemv_swiglu(&gpu, &mut act, &xd, None, &wd, 1, inter, k + 4).expect("k % 8 != 0"));
        assert!(act.to_f32(&gpu).expect("act").iter().all(|&v| v == 7.0), "{dt:?}: a declined call wrote");
    }
}

/// The skinny GEMM with the RMSNorm in its prologue (`ops::gemm_normed`, and `ops::gemv_swiglu` with a norm:
/// the decode step of one or two rows without a norm kernel) is `ops::rms_norm` into a buffer followed by
/// `ops::gemm` / `ops::gemv_swiglu`, bit for bit: each block normalizes the rows with the norm kernel's
/// arithmetic and summation order. Row counts that leave the last block part empty (its idle warps still
/// take part in the norm), a bias, rows past m left as they were, and the shapes it declines: three rows,
/// k not a multiple of 8, rows too wide for its shared memory, weights over the 16 MB it prefetches whole.
#[test]
fn gemv_with_the_norm_in_its_prologue_is_rms_norm_then_the_gemm_bit_for_bit() {
    let test = "gemv_with_the_norm_in_its_prologue_is_rms_norm_then_the_gemm_bit_for_bit";
    let Some(gpu) = open_gpu(test) else { return };
    if !gpu.skinny_gemm {
        println!("SKIP {test}: IRONLLM_DISABLE_GEMV is set");
        return;
    }
    let mut rng = Rng::seeded(13);
    let eps = 1e-5;
    for dt in [GpuDType::BF16, GpuDType::F16] {
        for (m, n, k) in [
            (1usize, 131usize, 64usize),
            (2, 200, 512),
            (1, 1024, 4096),
            (2, 1001, 4096),
            (1, 64, 16384),
            (2, 40, 8192),
        ] {
            let what = format!("{dt:?} m={m} n={n} k={k}");
            let x = DevBuf::from_f32(&gpu, dt, &rounded(dt, &random(&mut rng, m * k, 3.0))).expect("x");
            let g = DevBuf::from_f32(&gpu, dt, &rounded(dt, &random(&mut rng, k, 1.5))).expect("norm weight");
            let w = DevBuf::from_f32(&gpu, dt, &rounded(dt, &random(&mut rng, 2 * n * k, 1.0 / (k as f64).sqrt())))
                .expect("w");
            let bias = DevBuf::from_f32(&gpu, dt, &rounded(dt, &random(&mut rng, n, 0.1))).expect("bias");
            let norm = ops::InputNorm { weight: &g, eps };
            // The unfused path: the norm kernel, then the skinny GEMM.
            let mut normed = DevBuf::zeros(&gpu, dt, m * k).expect("normed");
            ops::rms_norm(&gpu, &mut normed, &x, &g, m, k, eps).expect("rms_norm");
            for with_bias in [false, true] {
                let b = with_bias.then_some(&bias);
                let mut want = DevBuf::zeros(&gpu, dt, m * n).expect("y");
                ops::gemm(&gpu, &mut want, &normed, &w, b, m, n, k).expect("gemm");
                let mut y = DevBuf::from_f32(&gpu, dt, &vec![7.0; (m + 2) * n]).expect("y");
                assert!(ops::gemm_normed(&gpu, &mut y, &x, norm, &w, b, m, n, k).expect("gemm_normed"), "{what}");
                let (got, want) = (y.to_f32(&gpu).expect("y"), want.to_f32(&gpu).expect("want"));
                let differ = got[..m * n].iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                assert_eq!(differ, 0, "{what} bias={with_bias}: {differ} outputs differ from rms_norm + gemm");
                assert!(got[m * n..].iter().all(|&v| v == 7.0), "{what}: rows past m were written");
            }
            // Gate/up with SiLU-and-mul: n intermediate columns of the [2n, k] weight.
            let mut want = DevBuf::zeros(&gpu, dt, m * n).expect("act");
            assert!(ops::gemv_swiglu(&gpu, &mut want, &normed, None, &w, m, n, k).expect("gemv_swiglu"));
            let mut act = DevBuf::from_f32(&gpu, dt, &vec![7.0; (m + 2) * n]).expect("act");
            assert!(ops::gemv_swiglu(&gpu, &mut act, &x, Some(norm), &w, m, n, k).expect("normed swiglu"), "{what}");
            let (got, want) = (act.to_f32(&gpu).expect("act"), want.to_f32(&gpu).expect("want"));
            let differ = got[..m * n].iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(differ, 0, "{what}: {differ} SwiGLU outputs differ from rms_norm + gemv_swiglu");
            assert!(got[m * n..].iter().all(|&v| v == 7.0), "{what}: rows past m were written");
        }
        // Declined, nothing written: three rows; k % 8 != 0; two rows of 16384 (64 KiB of shared memory,
        // over its 32); a weight of 16 MB and 2 rows more (the SwiGLU form's [gate; up] twice that).
        let big = 16384;
        let wide = (16 << 20) / (2 * big) + 2;
        let x = DevBuf::from_f32(&gpu, dt, &vec![0.5; 3 * big]).expect("x");
        let g = DevBuf::from_f32(&gpu, dt, &vec![1.0; big]).expect("g");
        let w = DevBuf::from_f32(&gpu, dt, &vec![0.5; 2 * wide * big]).expect("w");
        let norm = ops::InputNorm { weight: &g, eps };
        let mut y = DevBuf::from_f32(&gpu, dt, &vec![7.0; 3 * wide]).expect("y");
        for (m, n, k) in [(3, 16, 64), (1, 16, 60), (2, 16, big), (1, wide, big)] {
            assert!(!ops::gemm_normed(&gpu, &mut y, &x, norm, &w, None, m, n, k).expect("declined"), "{m} {n} {k}");
            assert!(!ops::gemv_swiglu(&gpu, &mut y, &x, Some(norm), &w, m, n, k).expect("declined"), "{m} {n} {k}");
        }
        assert!(y.to_f32(&gpu).expect("y").iter().all(|&v| v == 7.0), "{dt:?}: a declined call wrote");
    }
}
