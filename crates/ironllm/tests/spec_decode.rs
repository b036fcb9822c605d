//! Speculative decoding must be lossless: with n-gram or draft-model drafts, greedy output is the same
//! token for token as without speculation (alone, batched, chunked, with prefix-cache hits, under
//! preemption, a long prompt in chunks), seeded sampling gives the same tokens (draws are tied to output positions), and the
//! distribution of sampled tokens at drafted positions matches the one without drafts (chi-square).
//! Runs the default model from its GGUF; drafts are checked to have been proposed, accepted and rejected,
//! so the tests cannot pass by never speculating.

mod common;

use std::collections::HashMap;

use ironllm::{EngineArgs, Prompt, SamplingParams};
use ironllm_core::spec_decode::{SpeculativeConfig, SpeculativeMethod};
use ironllm_model::loader::DType;

/// Prompts whose continuations repeat earlier text (lists, code, quotes), so prompt lookup finds
/// matches, mixed with ordinary ones.
fn prompts() -> Vec<Prompt> {
    let mut out = Vec::new();
    let code = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n";
    for i in 0..12 {
        let text = match i % 4 {
            0 => format!("{code}{code}Rewrite the functions above with type hints:\n"),
            1 => "Monday, Tuesday, Wednesday, Thursday, Friday. Monday, Tuesday, Wednesday, Thursday,".repeat(1 + i % 3),
            2 => format!("Quote the sentence exactly. Sentence: \"The quick brown fox jumps over the lazy dog number {i}.\" Quote:"),
            _ => format!("<|im_start|>user\nTell me about the number {i}.<|im_end|>\n<|im_start|>assistant\n"),
        };
        out.push(Prompt::Text(text));
    }
    out
}

/// Speculation stays on for every batch size here (the default turns it off for large batches).
fn ngram(k: usize) -> SpeculativeConfig {
    SpeculativeConfig { disable_by_batch_size: Some(4096), ..SpeculativeConfig::ngram(k, 1, 3) }
}

fn draft_model(path: &std::path::Path, k: usize) -> SpeculativeConfig {
    SpeculativeConfig {
        method: SpeculativeMethod::DraftModel { model: path.display().to_string() },
        num_speculative_tokens: k,
        disable_by_batch_size: Some(4096),
    }
}

fn base() -> EngineArgs {
    EngineArgs { max_model_len: Some(1024), ..common::test_args(common::default_gguf(), DType::Auto) }
}

/// Output tokens per prompt and the acceptance counters.
fn run(args: EngineArgs, prompts: &[Prompt], params: &SamplingParams) -> (Vec<Vec<u32>>, (u64, u64, u64)) {
    let mut llm = common::llm(args);
    let outs = llm.generate(prompts, params).expect("generate");
    let s = llm.engine().stats().spec_decoding;
    (
        outs.into_iter().map(|o| o.outputs[0].token_ids.clone()).collect(),
        (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens),
    )
}

fn greedy() -> SamplingParams {
    SamplingParams { ignore_eos: true, ..SamplingParams::greedy(40) }
}

/// Drafts were verified, some accepted and some rejected.
fn assert_exercised(label: &str, (drafts, drafted, accepted): (u64, u64, u64)) {
    eprintln!("{label}: {drafts} verification rounds, {drafted} draft tokens, {accepted} accepted");
    assert!(drafts > 0 && accepted > 0, "{label}: no draft was accepted");
    assert!(accepted < drafted, "{label}: no draft was rejected, the rejection path went untested");
}

#[test]
fn ngram_greedy_output_is_identical_alone_batched_chunked_cached_and_preempted() {
    let prompts = prompts();
    let plain = EngineArgs { enable_prefix_caching: false, ..base() };
    let (want, _) = run(EngineArgs { max_num_seqs: Some(1), ..plain.clone() }, &prompts, &greedy());

    let spec = |args: EngineArgs| EngineArgs { speculative_config: Some(ngram(3)), ..args };
    let (alone, stats) = run(spec(EngineArgs { max_num_seqs: Some(1), ..plain.clone() }), &prompts, &greedy());
    assert_eq!(alone, want, "alone");
    assert_exercised("alone", stats);

    let (batched, stats) = run(spec(plain.clone()), &prompts, &greedy());
    assert_eq!(batched, want, "batched");
    assert_exercised("batched", stats);

    // A small budget chunks the prompts and cuts drafts short when the budget runs out.
    let chunked = EngineArgs { max_num_batched_tokens: Some(20), max_num_seqs: Some(12), ..plain.clone() };
    let (out, stats) = run(spec(chunked), &prompts, &greedy());
    assert_eq!(out, want, "chunked prefill, tight budget");
    assert_exercised("chunked", stats);

    // Prefix caching: the second pass hits blocks written while drafts were being verified.
    let mut llm = common::llm(spec(base()));
    let first = llm.generate(&prompts, &greedy()).expect("generate");
    let second = llm.generate(&prompts, &greedy()).expect("generate");
    assert!(second.iter().map(|o| o.num_cached_tokens).sum::<usize>() > 0, "no prefix-cache hit");
    for ((a, b), w) in first.iter().zip(&second).zip(&want) {
        assert_eq!(&a.outputs[0].token_ids, w, "prefix caching, first pass");
        assert_eq!(&b.outputs[0].token_ids, w, "prefix caching, cache hits");
    }

    // A long prompt (~800 tokens) prefilled in chunks of 64 tokens, then decoded with drafts.
    let code = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n";
    let long = vec![Prompt::Text(format!("{}Rewrite the last function with type hints:\n", code.repeat(22)))];
    let small_budget = EngineArgs { max_num_batched_tokens: Some(64), max_num_seqs: Some(4), ..plain.clone() };
    let (want_long, _) = run(small_budget.clone(), &long, &greedy());
    let (got_long, stats) = run(spec(small_budget), &long, &greedy());
    assert_eq!(got_long, want_long, "long prompt, chunked prefill");
    assert!(stats.0 > 0, "the long prompt was never drafted for");

    // 20 blocks of 16 tokens cannot hold 12 requests at once: preemption and recompute.
    // vLLM's admission (no headroom), so the decodes run out of blocks.
    let tight = EngineArgs {
        kv_cache_memory_bytes: Some(46_080 * 16 * 20),
        max_model_len: Some(256),
        admission_headroom_tokens: Some(0),
        ..plain.clone()
    };
    let mut llm = common::llm(spec(tight));
    let outs = llm.generate(&prompts, &greedy()).expect("generate");
    assert!(llm.engine().stats().num_preemptions > 0, "the tight KV budget must preempt");
    let got: Vec<Vec<u32>> = outs.into_iter().map(|o| o.outputs[0].token_ids.clone()).collect();
    assert_eq!(got, want, "under preemption");
}

#[test]
fn draft_model_greedy_output_is_identical_and_a_perfect_draft_is_always_accepted() {
    let prompts = prompts();
    let model = common::default_gguf();
    let plain = EngineArgs { enable_prefix_caching: false, ..base() };
    let (want, _) = run(plain.clone(), &prompts, &greedy());

    // The target drafting for itself: its greedy drafts are exactly its own next tokens (the kernels are
    // batch-invariant: the CPU's, and the GPU's in float32), so every draft is accepted.
    let (out, (drafts, drafted, accepted)) =
        run(EngineArgs { speculative_config: Some(draft_model(&model, 4)), ..plain.clone() }, &prompts, &greedy());
    assert_eq!(out, want, "self-draft");
    assert!(drafts > 0);
    assert_eq!(accepted, drafted, "a perfect draft must always be accepted");

    // A tiny random-weight model as the draft: mostly rejected, output unchanged; the gate pauses it.
    let tiny = common::fixtures().join("reference/tiny_llama3");
    let (out, stats) =
        run(EngineArgs { speculative_config: Some(draft_model(&tiny, 3)), ..plain.clone() }, &prompts, &greedy());
    assert_eq!(out, want, "random draft model");
    let steps = (prompts.len() * 40) as u64;
    assert!(stats.0 > 0 && stats.0 < steps / 2, "low acceptance must pause drafting: {stats:?}");

    // With chunked prefill, prefix caching and preemption together.
    let tight = EngineArgs {
        // The self-draft doubles the KV per token: 20 blocks for both models.
        kv_cache_memory_bytes: Some(2 * 46_080 * 16 * 20),
        max_model_len: Some(256),
        max_num_batched_tokens: Some(32),
        max_num_seqs: Some(12),
        enable_prefix_caching: true,
        admission_headroom_tokens: Some(0),
        speculative_config: Some(draft_model(&model, 3)),
        ..base()
    };
    let mut llm = common::llm(tight);
    let outs = llm.generate(&prompts, &greedy()).expect("generate");
    let stats = llm.engine().stats();
    assert!(stats.num_preemptions > 0, "the tight KV budget must preempt");
    assert!(stats.spec_decoding.num_accepted_tokens > 0);
    let got: Vec<Vec<u32>> = outs.into_iter().map(|o| o.outputs[0].token_ids.clone()).collect();
    assert_eq!(got, want, "draft model under chunking, caching and preemption");
}

#[test]
fn seeded_sampling_gives_the_same_tokens_with_and_without_drafts() {
    // Sampled text of a random-weight model never repeats, so prompt lookup would find nothing to draft.
    if !common::needs_trained_weights("seeded_sampling_gives_the_same_tokens_with_and_without_drafts") {
        return;
    }
    let prompts = prompts();
    let plain = EngineArgs { enable_prefix_caching: false, ..base() };
    for params in [
        SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            ignore_eos: true,
            max_tokens: Some(32),
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            seed: Some(11),
            ignore_eos: true,
            max_tokens: Some(32),
            ..Default::default()
        },
    ] {
        let (want, _) = run(plain.clone(), &prompts, &params);
        let (got, stats) = run(EngineArgs { speculative_config: Some(ngram(3)), ..plain.clone() }, &prompts, &params);
        assert_eq!(got, want, "seeded sampling with n-gram drafts, {params:?}");
        assert_exercised("seeded sampling", stats);
    }
}

/// Two-sample chi-square statistic over the categories of `a` and `b`; categories with few samples
/// are pooled so every expected count is at least 5.
fn chi_square_two_sample(a: &HashMap<Vec<u32>, u64>, b: &HashMap<Vec<u32>, u64>) -> (f64, usize) {
    let (na, nb) = (a.values().sum::<u64>() as f64, b.values().sum::<u64>() as f64);
    let mut keys: Vec<&Vec<u32>> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut cells: Vec<(f64, f64)> = Vec::new();
    let mut pooled = (0.0, 0.0);
    for k in keys {
        let (x, y) = (*a.get(k).unwrap_or(&0) as f64, *b.get(k).unwrap_or(&0) as f64);
        if (x + y) * na.min(nb) / (na + nb) < 5.0 {
            pooled.0 += x;
            pooled.1 += y;
        } else {
            cells.push((x, y));
        }
    }
    if pooled.0 + pooled.1 > 0.0 {
        cells.push(pooled);
    }
    let mut stat = 0.0;
    for (x, y) in &cells {
        let total = x + y;
        for (obs, n) in [(x, na), (y, nb)] {
            let expected = total * n / (na + nb);
            if expected > 0.0 {
                stat += (obs - expected).powi(2) / expected;
            }
        }
    }
    (stat, cells.len().saturating_sub(1))
}

/// The chi-square quantile at p = 0.001 for `df` degrees of freedom (Wilson-Hilferty approximation).
fn chi_square_critical_001(df: usize) -> f64 {
    let d = df.max(1) as f64;
    let z = 3.090_232; // standard normal quantile at 0.999
    d * (1.0 - 2.0 / (9.0 * d) + z * (2.0 / (9.0 * d)).sqrt()).powi(3)
}

#[test]
fn sampled_tokens_at_drafted_positions_follow_the_target_distribution() {
    if !common::needs_trained_weights("sampled_tokens_at_drafted_positions_follow_the_target_distribution") {
        return;
    }
    // A prompt that prompt lookup drafts for from the first output token on. Independent seeds on each
    // side, so the two samples are independent draws and the test is a real two-sample comparison.
    let prompt = Prompt::Text("red green blue red green blue red green blue red green".into());
    let n = 600u64;
    let sample = |spec: bool, seed_base: u64, top_p: f32| {
        let mut args = EngineArgs { enable_prefix_caching: true, ..base() };
        if spec {
            args.speculative_config =
                Some(SpeculativeConfig { disable_by_batch_size: Some(4096), ..SpeculativeConfig::ngram(3, 1, 2) });
        }
        let mut llm = common::llm(args);
        let prompts: Vec<Prompt> = (0..n).map(|_| prompt.clone()).collect();
        let params: Vec<SamplingParams> = (0..n)
            .map(|i| SamplingParams {
                temperature: 1.0,
                top_p,
                seed: Some(seed_base + i),
                max_tokens: Some(3),
                ignore_eos: true,
                ..Default::default()
            })
            .collect();
        let outs = llm.generate_each(&prompts, &params).expect("generate");
        let mut counts: HashMap<Vec<u32>, u64> = HashMap::new();
        for o in outs {
            // The 2nd and 3rd tokens are the ones verified against drafts.
            *counts.entry(o.outputs[0].token_ids[1..].to_vec()).or_default() += 1;
        }
        (counts, llm.engine().stats().spec_decoding)
    };
    for top_p in [1.0, 0.8] {
        let (plain, _) = sample(false, 0, top_p);
        let (spec, stats) = sample(true, 1_000_000, top_p);
        assert!(stats.num_accepted_tokens > 0 && stats.num_accepted_tokens < stats.num_draft_tokens, "{stats:?}");
        let (stat, df) = chi_square_two_sample(&plain, &spec);
        let critical = chi_square_critical_001(df);
        eprintln!("top_p {top_p}: chi-square {stat:.1} with {df} df (critical {critical:.1}); {stats:?}");
        assert!(df >= 3, "too few categories for a meaningful test");
        assert!(stat < critical, "distributions differ: chi-square {stat:.1} >= {critical:.1} ({df} df)");
    }
}
