//! The GPU sampler against the CPU sampler (`ironllm_model::sampler::Sampler`), on fresh random logits:
//! every deterministic part must agree (greedy tokens under every processor, logprobs, ranks, top lists,
//! prompt logprobs); random draws must follow the distribution the CPU code's filtering defines
//! (chi-square at p = 0.001); a seeded row's token must not depend on the batch around it.
//!
//! Every test passes with a printed SKIP line on a machine without a CUDA device, so CPU CI stays green.

mod common;

use std::collections::BTreeMap;

use common::open_gpu;
use cudarc::driver::CudaSlice;
use ironllm_core::outputs::PositionLogprobs;
use ironllm_core::SamplingParams;
use ironllm_cuda::sampler::{GpuSampler, GpuSamplingRow, DEVICE_MAX_LOGPROBS};
use ironllm_cuda::Gpu;
use ironllm_model::sampler::{Rng, SampledToken, Sampler, SamplerState, SamplingRow};

/// One request of a test batch.
struct Req {
    params: SamplingParams,
    prompt: Vec<u32>,
    output: Vec<u32>,
    seed: u64,
}

impl Req {
    fn new(params: SamplingParams) -> Self {
        Req { params, prompt: Vec::new(), output: Vec::new(), seed: 0 }
    }
    fn with_tokens(mut self, prompt: Vec<u32>, output: Vec<u32>) -> Self {
        self.prompt = prompt;
        self.output = output;
        self
    }
    fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}

fn random_logits(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) * scale) as f32).collect()
}

fn upload(gpu: &Gpu, host: &[f32]) -> CudaSlice<f32> {
    gpu.upload(host).expect("upload logits")
}

fn gpu_sample(gpu: &Gpu, sampler: &mut GpuSampler, logits: &[f32], reqs: &[Req]) -> Vec<SampledToken> {
    let mut dev = upload(gpu, logits);
    let rows: Vec<GpuSamplingRow<'_>> = reqs
        .iter()
        .map(|r| GpuSamplingRow {
            params: &r.params,
            prompt_token_ids: &r.prompt,
            output_token_ids: &r.output,
            seed: r.seed,
        })
        .collect();
    sampler.sample(&mut dev.as_view_mut(), &rows).expect("GPU sample")
}

fn cpu_sample(vocab: usize, logits: &[f32], reqs: &[Req]) -> Vec<SampledToken> {
    let mut engine_rng = Rng::seeded(1);
    let mut states: Vec<SamplerState> = reqs.iter().map(|r| SamplerState::new(&r.params, &mut engine_rng)).collect();
    let mut rows: Vec<SamplingRow<'_>> = reqs
        .iter()
        .zip(states.iter_mut())
        .map(|(r, state)| SamplingRow {
            params: &r.params,
            prompt_token_ids: &r.prompt,
            output_token_ids: &r.output,
            state,
        })
        .collect();
    let mut scratch = logits.to_vec();
    Sampler::new(vocab).sample(&mut scratch, &mut rows, &mut engine_rng)
}

fn assert_logprobs_close(got: &PositionLogprobs, want: &PositionLogprobs, what: &str) {
    assert_eq!(got.chosen.token_id, want.chosen.token_id, "{what}: chosen id");
    assert_eq!(got.chosen.rank, want.chosen.rank, "{what}: chosen rank");
    let close = |a: f32, b: f32| (a == b) || (a - b).abs() <= 1e-4;
    assert!(
        close(got.chosen.logprob, want.chosen.logprob),
        "{what}: chosen {} vs {}",
        got.chosen.logprob,
        want.chosen.logprob
    );
    assert_eq!(got.top.len(), want.top.len(), "{what}: top length");
    for (i, (g, w)) in got.top.iter().zip(&want.top).enumerate() {
        assert_eq!((g.token_id, g.rank), (w.token_id, w.rank), "{what}: top[{i}]");
        assert!(close(g.logprob, w.logprob), "{what}: top[{i}] logprob {} vs {}", g.logprob, w.logprob);
    }
}

/// Parameter sets that exercise every processor, alone and together, for a vocabulary of `vocab`.
fn processor_params(rng: &mut Rng, vocab: usize) -> Vec<(String, SamplingParams)> {
    let id = |rng: &mut Rng| (rng.next_u64() % vocab as u64) as u32;
    let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
    let allowed: Vec<u32> = (0..20).map(|_| id(rng)).collect();
    let bias: BTreeMap<u32, f32> = (0..10).map(|_| (id(rng), (rng.next_f64() * 12.0 - 4.0) as f32)).collect();
    let mut sets = vec![
        ("plain".to_string(), greedy.clone()),
        ("allowed".to_string(), SamplingParams { allowed_token_ids: Some(allowed.clone()), ..greedy.clone() }),
        ("allowed empty".to_string(), SamplingParams { allowed_token_ids: Some(Vec::new()), ..greedy.clone() }),
        ("bias".to_string(), SamplingParams { logit_bias: bias.clone(), ..greedy.clone() }),
        ("repetition".to_string(), SamplingParams { repetition_penalty: 1.8, ..greedy.clone() }),
        ("repetition < 1".to_string(), SamplingParams { repetition_penalty: 0.6, ..greedy.clone() }),
        ("frequency".to_string(), SamplingParams { frequency_penalty: 0.9, ..greedy.clone() }),
        ("presence".to_string(), SamplingParams { presence_penalty: 1.5, ..greedy.clone() }),
        (
            "min tokens".to_string(),
            SamplingParams {
                min_tokens: 1000,
                eos_token_ids: vec![id(rng)],
                stop_token_ids: vec![id(rng), id(rng)],
                ..greedy.clone()
            },
        ),
    ];
    sets.push((
        "everything".to_string(),
        SamplingParams {
            allowed_token_ids: Some((0..vocab as u32).filter(|i| i % 3 != 0).collect()),
            logit_bias: bias,
            repetition_penalty: 1.3,
            frequency_penalty: 0.4,
            presence_penalty: 0.7,
            min_tokens: 1000,
            eos_token_ids: vec![id(rng)],
            ..greedy.clone()
        },
    ));
    sets
}

/// A request whose output holds several of the row's top tokens (so penalties and bad words move the
/// argmax) and whose bad words match the end of that output.
fn request_for(params: SamplingParams, logits: &[f32], rng: &mut Rng, with_bad_words: bool) -> Req {
    let vocab = logits.len();
    let mut order: Vec<u32> = (0..vocab as u32).collect();
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    let output: Vec<u32> = (0..12).map(|i| order[i % 6]).collect();
    let prompt: Vec<u32> =
        (0..40).map(|i| if i % 4 == 0 { order[6 + i % 3] } else { (rng.next_u64() % vocab as u64) as u32 }).collect();
    let mut params = params;
    if with_bad_words {
        let last = *output.last().expect("non-empty output");
        params.bad_words_token_ids = vec![vec![order[0]], vec![last, order[1]], vec![order[7], order[2]]];
    }
    Req::new(params).with_tokens(prompt, output)
}

#[test]
fn greedy_tokens_match_the_cpu_under_every_processor() {
    let Some(gpu) = open_gpu("greedy_tokens_match_the_cpu_under_every_processor") else { return };
    let mut rng = Rng::seeded(7);
    for vocab in [1000usize, 32_000, 151_936] {
        let mut sampler = GpuSampler::new(gpu.clone(), vocab).expect("sampler");
        let sets = processor_params(&mut rng, vocab);
        let mut logits = Vec::new();
        let mut reqs = Vec::new();
        let mut names = Vec::new();
        for (name, params) in &sets {
            for bad_words in [false, true] {
                for logprobs in [None, Some(5)] {
                    let row = random_logits(&mut rng, vocab, 6.0);
                    let params = SamplingParams { logprobs, ..params.clone() };
                    reqs.push(request_for(params, &row, &mut rng, bad_words));
                    logits.extend_from_slice(&row);
                    names.push(format!("vocab {vocab}, {name}, bad words {bad_words}, logprobs {logprobs:?}"));
                }
            }
        }
        let want = cpu_sample(vocab, &logits, &reqs);
        let got = gpu_sample(&gpu, &mut sampler, &logits, &reqs);
        for ((g, w), name) in got.iter().zip(&want).zip(&names) {
            assert_eq!(g.token_id, w.token_id, "{name}");
            match (&g.logprobs, &w.logprobs) {
                (Some(g), Some(w)) => assert_logprobs_close(g, w, name),
                (None, None) => {}
                _ => panic!("{name}: logprobs presence differs"),
            }
        }
    }
}

#[test]
fn logprobs_of_random_rows_match_the_cpu() {
    let Some(gpu) = open_gpu("logprobs_of_random_rows_match_the_cpu") else { return };
    let vocab = 5000;
    let mut rng = Rng::seeded(11);
    let mut sampler = GpuSampler::new(gpu.clone(), vocab).expect("sampler");
    let mut cpu = Sampler::new(vocab);
    let mut logits = Vec::new();
    let mut reqs = Vec::new();
    for (i, k) in [0usize, 1, 5, 20, 64, 300, DEVICE_MAX_LOGPROBS, DEVICE_MAX_LOGPROBS + 500].into_iter().enumerate() {
        for variant in 0..4 {
            let mut row = random_logits(&mut rng, vocab, 8.0);
            if variant == 1 {
                // Many exact ties: the tie rules (lower id first; rank counts ties) decide.
                for x in row.iter_mut() {
                    *x = (*x * 2.0).round() / 2.0;
                }
            }
            if variant == 2 {
                for x in row.iter_mut().step_by(7) {
                    *x = f32::NEG_INFINITY;
                }
            }
            let params = SamplingParams {
                logprobs: Some(k),
                temperature: if variant == 3 { 0.0 } else { 0.9 },
                top_k: if variant == 0 { 40 } else { 0 },
                repetition_penalty: if variant == 2 { 1.2 } else { 1.0 },
                ..Default::default()
            };
            reqs.push(Req::new(params).with_tokens(vec![1, 2, 3], vec![4, 5]).with_seed(i as u64 * 10 + variant));
            logits.extend_from_slice(&row);
        }
    }
    let got = gpu_sample(&gpu, &mut sampler, &logits, &reqs);
    for (r, (g, req)) in got.iter().zip(&reqs).enumerate() {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let k = req.params.logprobs.expect("logprobs set");
        let want = cpu.prompt_logprobs(row, &[g.token_id], k).pop().expect("one position");
        let got = g.logprobs.as_ref().expect("logprobs returned");
        assert_logprobs_close(got, &want, &format!("row {r}, k {k}"));
    }
}

#[test]
fn prompt_logprobs_match_the_cpu() {
    let Some(gpu) = open_gpu("prompt_logprobs_match_the_cpu") else { return };
    let mut rng = Rng::seeded(5);
    for vocab in [3000usize, 128_256] {
        let mut sampler = GpuSampler::new(gpu.clone(), vocab).expect("sampler");
        let mut cpu = Sampler::new(vocab);
        let num = 9;
        let mut logits = random_logits(&mut rng, num * vocab, 10.0);
        // A row of ties and a row with masked entries.
        for x in logits[..vocab].iter_mut() {
            *x = x.round();
        }
        for x in logits[vocab..2 * vocab].iter_mut().step_by(3) {
            *x = f32::NEG_INFINITY;
        }
        let mut targets: Vec<u32> = (0..num).map(|_| (rng.next_u64() % vocab as u64) as u32).collect();
        targets[2] = vocab as u32 - 1;
        let dev = upload(&gpu, &logits);
        for k in [0usize, 1, 3, 20, DEVICE_MAX_LOGPROBS + 1] {
            let got = sampler.prompt_logprobs(&dev.as_view(), &targets, k).expect("GPU prompt logprobs");
            let want = cpu.prompt_logprobs(&logits, &targets, k);
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_logprobs_close(g, w, &format!("vocab {vocab}, k {k}, position {i}"));
            }
        }
    }
}

/// The probabilities the CPU sampler's random path draws from (select.rs): divide by the temperature,
/// min-p against the maximum, top-k keeping ties with the k-th value, top-p as the smallest head (by
/// value, then id) with at least top_p of the mass left by top-k.
fn reference_probabilities(logits: &[f32], p: &SamplingParams) -> Vec<f64> {
    let n = logits.len();
    let mut v: Vec<f32> = logits.iter().map(|&x| x / p.temperature).collect();
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if p.min_p > 0.0 {
        let threshold = max + p.min_p.ln();
        for x in v.iter_mut() {
            if *x < threshold {
                *x = f32::NEG_INFINITY;
            }
        }
    }
    if let Some(k) = p.top_k_enabled().filter(|&k| k < n) {
        let mut sorted = v.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[k - 1];
        for x in v.iter_mut() {
            if *x < kth {
                *x = f32::NEG_INFINITY;
            }
        }
    }
    let mut w: Vec<f64> = v.iter().map(|&x| (f64::from(x) - f64::from(max)).exp()).collect();
    if p.top_p < 1.0 {
        let mut order: Vec<usize> = (0..n).filter(|&i| w[i] > 0.0).collect();
        order.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
        let total: f64 = order.iter().map(|&i| w[i]).sum();
        let target = f64::from(p.top_p) * total;
        let mut mass = 0.0;
        let mut keep = vec![false; n];
        for &i in &order {
            keep[i] = true;
            mass += w[i];
            if mass >= target {
                break;
            }
        }
        for i in 0..n {
            if !keep[i] {
                w[i] = 0.0;
            }
        }
    }
    let total: f64 = w.iter().sum();
    w.iter().map(|x| x / total).collect()
}

/// Chi-square critical values at p = 0.001 for 1..=15 degrees of freedom.
const CHI2_CRITICAL_P001: [f64; 15] = [
    10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877, 29.588, 31.264, 32.909, 34.528, 36.123,
    37.697,
];

#[test]
fn random_draws_follow_the_cpu_distribution() {
    let Some(gpu) = open_gpu("random_draws_follow_the_cpu_distribution") else { return };
    let base: Vec<f32> = vec![1.0, 2.0, 0.5, 3.0, -1.0, 0.0, 1.5, 2.5, -0.5, 2.2, 0.8, 1.9];
    let cases: Vec<(&str, Vec<f32>, SamplingParams)> = vec![
        ("temperature 1", base.clone(), SamplingParams::default()),
        ("temperature 0.7", base.clone(), SamplingParams { temperature: 0.7, ..Default::default() }),
        ("temperature 1.6", base.clone(), SamplingParams { temperature: 1.6, ..Default::default() }),
        ("top_k 4", base.clone(), SamplingParams { top_k: 4, ..Default::default() }),
        ("top_p 0.8", base.clone(), SamplingParams { top_p: 0.8, ..Default::default() }),
        ("min_p 0.2", base.clone(), SamplingParams { min_p: 0.2, ..Default::default() }),
        (
            "top_k 6 + top_p 0.7 + temperature 0.8",
            base.clone(),
            SamplingParams { top_k: 6, top_p: 0.7, temperature: 0.8, ..Default::default() },
        ),
        ("top_k ties", vec![1.0, 2.0, 2.0, 0.0, 2.0, -1.0], SamplingParams { top_k: 2, ..Default::default() }),
        ("top_p ties", vec![0.0; 8], SamplingParams { top_p: 0.5, ..Default::default() }),
        (
            "masked",
            vec![f32::NEG_INFINITY, 0.3, f32::NEG_INFINITY, 0.0, 1.0, f32::NEG_INFINITY],
            SamplingParams { top_p: 0.9, ..Default::default() },
        ),
    ];
    let rows_per_launch = 4000;
    let launches = 10;
    for (c, (name, row, params)) in cases.iter().enumerate() {
        let vocab = row.len();
        let mut sampler = GpuSampler::new(gpu.clone(), vocab).expect("sampler");
        let mut counts = vec![0u64; vocab];
        for launch in 0..launches {
            let logits: Vec<f32> = row.iter().copied().cycle().take(rows_per_launch * vocab).collect();
            // Different seeds and positions: every draw is an independent sample of the same row.
            let reqs: Vec<Req> = (0..rows_per_launch)
                .map(|i| {
                    let seed = 0x5eed_0000 + (c * 1_000_000 + launch * rows_per_launch + i) as u64;
                    Req::new(params.clone()).with_tokens(vec![1], vec![0; i % 5]).with_seed(seed)
                })
                .collect();
            for s in gpu_sample(&gpu, &mut sampler, &logits, &reqs) {
                counts[s.token_id as usize] += 1;
            }
        }
        let want = reference_probabilities(row, params);
        let total = (rows_per_launch * launches) as f64;
        let mut chi2 = 0.0;
        let mut categories = 0;
        for (i, (&got, &p)) in counts.iter().zip(&want).enumerate() {
            if p == 0.0 {
                assert_eq!(got, 0, "{name}: token {i} has probability 0 but was drawn {got} times");
                continue;
            }
            let expected = p * total;
            chi2 += (got as f64 - expected).powi(2) / expected;
            categories += 1;
        }
        if categories > 1 {
            let critical = CHI2_CRITICAL_P001[categories - 2];
            println!("{name}: chi2 = {chi2:.2} over {} degrees of freedom (critical {critical})", categories - 1);
            assert!(chi2 < critical, "{name}: chi2 {chi2:.2} >= {critical} (counts {counts:?}, want {want:?})");
        }
    }
}

#[test]
fn truncation_over_a_large_vocabulary_keeps_only_the_cpu_set() {
    let Some(gpu) = open_gpu("truncation_over_a_large_vocabulary_keeps_only_the_cpu_set") else { return };
    let vocab = 151_936;
    let mut rng = Rng::seeded(3);
    let mut sampler = GpuSampler::new(gpu.clone(), vocab).expect("sampler");
    let params_list = [
        SamplingParams { top_k: 50, ..Default::default() },
        SamplingParams { top_p: 0.5, ..Default::default() },
        SamplingParams { top_p: 0.95, temperature: 0.7, ..Default::default() },
        SamplingParams { top_k: 1000, top_p: 0.9, min_p: 0.01, ..Default::default() },
        SamplingParams { min_p: 0.1, ..Default::default() },
    ];
    let mut logits = Vec::new();
    let mut reqs = Vec::new();
    for (i, params) in params_list.iter().enumerate() {
        for j in 0..6 {
            // A peaked head over a long tail; some rows quantized so top-k / top-p cut through ties.
            let mut row = random_logits(&mut rng, vocab, 4.0);
            for x in row.iter_mut().step_by(997) {
                *x += 10.0;
            }
            if j % 2 == 1 {
                for x in row.iter_mut() {
                    *x = (*x * 4.0).round() / 4.0;
                }
            }
            logits.extend_from_slice(&row);
            reqs.push(Req::new(params.clone()).with_seed((i * 100 + j) as u64));
        }
    }
    for step in 0..4 {
        for r in reqs.iter_mut() {
            r.output = vec![7; step];
        }
        let got = gpu_sample(&gpu, &mut sampler, &logits, &reqs);
        for (r, (g, req)) in got.iter().zip(&reqs).enumerate() {
            let probs = reference_probabilities(&logits[r * vocab..(r + 1) * vocab], &req.params);
            assert!(
                probs[g.token_id as usize] > 0.0,
                "row {r} step {step}: token {} is outside the kept set",
                g.token_id
            );
        }
    }
}

#[test]
fn a_seeded_token_depends_only_on_seed_and_position() {
    let Some(gpu) = open_gpu("a_seeded_token_depends_only_on_seed_and_position") else { return };
    let vocab = 50_000;
    let mut rng = Rng::seeded(9);
    let mut sampler = GpuSampler::new(gpu.clone(), vocab).expect("sampler");
    let target_row = random_logits(&mut rng, vocab, 3.0);
    let params = SamplingParams { top_p: 0.95, top_k: 500, ..Default::default() };
    let target = || Req::new(params.clone()).with_tokens(vec![1, 2], vec![3; 17]).with_seed(4242);
    let alone = gpu_sample(&gpu, &mut sampler, &target_row, &[target()])[0].token_id;
    for (num_before, num_after) in [(1usize, 0usize), (5, 9), (0, 30)] {
        let mut logits = Vec::new();
        let mut reqs = Vec::new();
        for i in 0..num_before + num_after + 1 {
            if i == num_before {
                logits.extend_from_slice(&target_row);
                reqs.push(target());
            } else {
                logits.extend(random_logits(&mut rng, vocab, 3.0));
                let other =
                    SamplingParams { temperature: 0.5 + i as f32 * 0.1, logprobs: Some(3), ..Default::default() };
                reqs.push(Req::new(other).with_tokens(vec![5], vec![6; i]).with_seed(i as u64));
            }
        }
        let got = gpu_sample(&gpu, &mut sampler, &logits, &reqs);
        assert_eq!(got[num_before].token_id, alone, "batch of {} with the row at {num_before}", reqs.len());
    }
    // And again later: nothing carries over between steps.
    assert_eq!(gpu_sample(&gpu, &mut sampler, &target_row, &[target()])[0].token_id, alone);
}

#[test]
fn plain_rows_split_over_blocks_pick_the_one_block_token() {
    let Some(gpu) = open_gpu("plain_rows_split_over_blocks_pick_the_one_block_token") else { return };
    let vocab = 128_257; // Llama 3's vocabulary plus one: the last 4-token group is partial
    let mut rng = Rng::seeded(21);
    let mut sampler = GpuSampler::new(gpu.clone(), vocab).expect("sampler");
    let settings = [
        SamplingParams::greedy(1),
        SamplingParams { temperature: 1.0, ..Default::default() },
        SamplingParams { temperature: 0.3, ..Default::default() },
        SamplingParams { temperature: 2.5, ..Default::default() },
    ];
    for num_rows in [1usize, 3, 32, 128, 300] {
        let mut logits = random_logits(&mut rng, num_rows * vocab, 6.0);
        if num_rows >= 3 {
            // Row 0: a tie for the maximum (lowest id wins); row 1: every value -inf; row 2: NaN and -inf
            // only. Rows 1 and 2 have no token to draw: both paths fall back to the argmax, which skips NaN
            // and takes the lowest id among the -inf (id 0 in row 1, id 1 in row 2).
            logits[1000] = 50.0;
            logits[90_000] = 50.0;
            logits[vocab..2 * vocab].fill(f32::NEG_INFINITY);
            for (i, v) in logits[2 * vocab..3 * vocab].iter_mut().enumerate() {
                *v = if i % 3 == 0 { f32::NAN } else { f32::NEG_INFINITY };
            }
        }
        for (si, params) in settings.iter().enumerate() {
            let reqs: Vec<Req> = (0..num_rows)
                .map(|r| {
                    Req::new(params.clone()).with_tokens(vec![1], vec![2; r % 7]).with_seed(r as u64 * 31 + si as u64)
                })
                .collect();
            sampler.set_split_plain_rows(true);
            let split: Vec<u32> = gpu_sample(&gpu, &mut sampler, &logits, &reqs).iter().map(|t| t.token_id).collect();
            sampler.set_split_plain_rows(false);
            let whole: Vec<u32> = gpu_sample(&gpu, &mut sampler, &logits, &reqs).iter().map(|t| t.token_id).collect();
            assert_eq!(split, whole, "{num_rows} rows, setting {si}");
            if num_rows >= 3 && si == 0 {
                assert_eq!(&split[..3], &[1000, 0, 1], "ties and masked rows");
            }
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let Some(gpu) = open_gpu("bad_shapes_are_errors") else { return };
    let mut sampler = GpuSampler::new(gpu.clone(), 100).expect("sampler");
    let req = Req::new(SamplingParams::default());
    let rows = [GpuSamplingRow { params: &req.params, prompt_token_ids: &[], output_token_ids: &[], seed: 0 }];
    let mut dev = upload(&gpu, &[0.0; 150]);
    assert!(sampler.sample(&mut dev.as_view_mut(), &rows).is_err());
    assert!(sampler.prompt_logprobs(&dev.as_view(), &[1], 2).is_err());
    assert!(GpuSampler::new(gpu, 0).is_err());
}
