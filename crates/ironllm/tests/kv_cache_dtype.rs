//! `--kv-cache-dtype float16|bfloat16` on the CPU: the default model (SmolLM2-135M, Q4_1 GGUF) must
//! say what it says with a float32 cache, up to the rounding of K/V to 16 bits.
//!
//! Two paths are checked. With `--dtype float32` the math is plain f32, so the only difference between
//! the runs is the cache's rounding and the bounds below measure its effect directly. With `--dtype
//! auto` (what users run) the quantized matmuls also round every activation to 8 bits, which turns the
//! cache's tiny perturbation into occasional flips of an 8-bit step, so the bounds there are wider.
//! Teacher-forced prompt logprobs compare every position on identical inputs; greedy continuations must
//! agree token for token up to the first near-tie of the float32 run. A 16-bit cache must also keep
//! outputs independent of the batch.

mod common;

use ironllm::{Device, EngineArgs, Prompt, RequestOutput, SamplingParams};
use ironllm_model::loader::{DType, KvCacheDType};

fn prompts() -> Vec<Prompt> {
    let chat = |q: &str| Prompt::Text(format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"));
    vec![
        chat("What is the capital of France?"),
        chat("Give me three tips for staying healthy."),
        chat("Explain photosynthesis to a child in two sentences."),
        chat("Write a haiku about the sea."),
        Prompt::Text("The history of bread begins in the Neolithic, when people first ground grain".into()),
        Prompt::Text(
            "Rust's ownership model rests on three rules: each value has an owner, there is one owner at a \
             time, and when the owner goes out of scope the value is dropped. This means that"
                .into(),
        ),
        Prompt::Text("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n".into()),
        Prompt::Text("Once upon a time, in a small village at the edge of a great forest, there lived".into()),
    ]
}

fn run(dtype: DType, kv_cache_dtype: KvCacheDType) -> Vec<RequestOutput> {
    run_with(dtype, kv_cache_dtype, EngineArgs::default().max_num_seqs)
}

fn run_with(dtype: DType, kv_cache_dtype: KvCacheDType, max_num_seqs: Option<usize>) -> Vec<RequestOutput> {
    let args = EngineArgs {
        model: Some(common::default_gguf()),
        dtype,
        kv_cache_dtype,
        kv_cache_memory_bytes: Some(256 << 20),
        max_model_len: Some(2048),
        max_num_seqs,
        // The CPU cache is what is under test (the GPU keeps K/V in its compute dtype).
        device: Device::Cpu,
        ..EngineArgs::default()
    };
    let params = SamplingParams {
        ignore_eos: true,
        logprobs: Some(5),
        prompt_logprobs: Some(0),
        ..SamplingParams::greedy(GENERATED)
    };
    common::llm(args).generate(&prompts(), &params).expect("generate")
}

const GENERATED: usize = 24;

/// How a 16-bit run compares with the float32 run.
#[derive(Debug, Default)]
struct Comparison {
    /// Largest |logprob difference| of a prompt token (teacher-forced, identical inputs).
    max_prompt_diff: f32,
    /// Largest |logprob difference| of a generated token while both runs still agree.
    max_generated_diff: f32,
    /// Per prompt: tokens generated identically before the first divergence.
    agreeing: Vec<usize>,
    /// At each divergence: the float32 run's logprob of its own token minus that of the 16-bit run's
    /// token (how near a tie it was), or infinity if the other token was outside its top 5.
    divergence_margins: Vec<f32>,
}

fn compare(base: &[RequestOutput], other: &[RequestOutput]) -> Comparison {
    let mut c = Comparison::default();
    for (b, o) in base.iter().zip(other) {
        let (bp, op) = (
            b.prompt_logprobs.as_ref().expect("prompt logprobs"),
            o.prompt_logprobs.as_ref().expect("prompt logprobs"),
        );
        for (x, y) in bp.iter().zip(op).filter_map(|(x, y)| x.as_ref().zip(y.as_ref())) {
            assert_eq!(x.chosen.token_id, y.chosen.token_id);
            c.max_prompt_diff = c.max_prompt_diff.max((x.chosen.logprob - y.chosen.logprob).abs());
        }
        let (bo, oo) = (&b.outputs[0], &o.outputs[0]);
        let (blp, olp) = (bo.logprobs.as_ref().expect("logprobs"), oo.logprobs.as_ref().expect("logprobs"));
        let agree = bo.token_ids.iter().zip(&oo.token_ids).take_while(|(x, y)| x == y).count();
        for (x, y) in blp.iter().zip(olp).take(agree) {
            c.max_generated_diff = c.max_generated_diff.max((x.chosen.logprob - y.chosen.logprob).abs());
        }
        if agree < GENERATED {
            let at = &blp[agree];
            let alt = oo.token_ids[agree];
            let margin =
                at.top.iter().find(|t| t.token_id == alt).map_or(f32::INFINITY, |t| at.chosen.logprob - t.logprob);
            c.divergence_margins.push(margin);
        }
        c.agreeing.push(agree);
    }
    c
}

/// Checks `c` against a bound `b` on every logprob difference: then two logprobs at one position can
/// swap order only if the float32 run had them within `2 b` of each other, so every divergence of the
/// greedy continuations must be such a near-tie.
fn check(what: &str, c: &Comparison, b: f32) {
    eprintln!("{what}: bound {b}, {c:?}");
    assert!(c.max_prompt_diff <= b, "{what}: prompt logprobs moved by {} > {b}", c.max_prompt_diff);
    assert!(c.max_generated_diff <= b, "{what}: generated logprobs moved by {} > {b}", c.max_generated_diff);
    for m in &c.divergence_margins {
        assert!(*m <= 2.0 * b, "{what}: greedy output diverged where float32 was {m} nats from a tie");
    }
}

#[test]
fn f16_and_bf16_caches_stay_close_to_f32() {
    if !common::needs_trained_weights("f16_and_bf16_caches_stay_close_to_f32") {
        return;
    }
    // Exact f32 math: rounding K/V to a format with unit roundoff u (2^-11 for f16, 2^-8 for bf16) moves
    // the logprobs in proportion to u; here by about 11u (f16: 0.0055) and 7u (bf16: 0.026) at most.
    // 40u leaves room for other machines' libm and for changes elsewhere in the model, and is still far
    // below what a wrong cache (a misplaced or unrounded row) would do.
    let exact = run(DType::Float32, KvCacheDType::Float32);
    assert_eq!(run(DType::Float32, KvCacheDType::Auto), exact, "auto is float32 on the CPU");
    for (kv, u) in [(KvCacheDType::Float16, 2f32.powi(-11)), (KvCacheDType::BFloat16, 2f32.powi(-8))] {
        let c = compare(&exact, &run(DType::Float32, kv));
        check(&format!("--dtype float32 --kv-cache-dtype {}", kv.name()), &c, 40.0 * u);
    }

    // The quantized path rounds every activation to 8 bits, so a small change anywhere flips some of
    // those roundings: its logprobs already move by up to ~0.34 nats from the exact path's on these
    // prompts, and a 16-bit cache moves them about as much (f16 0.25, bf16 0.35). Bound: twice the
    // quantized path's own distance from exact math, measured here on the same prompts.
    let quant = run(DType::Auto, KvCacheDType::Float32);
    assert_eq!(run(DType::Auto, KvCacheDType::Auto), quant, "auto is float32 on the CPU");
    let own = compare(&exact, &quant);
    let b = 2.0 * own.max_prompt_diff.max(own.max_generated_diff);
    for kv in [KvCacheDType::Float16, KvCacheDType::BFloat16] {
        let batched = run(DType::Auto, kv);
        let c = compare(&quant, &batched);
        check(&format!("--dtype auto --kv-cache-dtype {}", kv.name()), &c, b);
        // A 16-bit cache keeps a request's output independent of its batch: one request at a time
        // gives the same tokens and logprobs, bit for bit.
        assert_eq!(run_with(DType::Auto, kv, Some(1)), batched, "--kv-cache-dtype {}: alone vs batched", kv.name());
    }
}
