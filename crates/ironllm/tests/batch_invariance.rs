//! A request's greedy tokens must not depend on the batch it runs in: alone or among 32 requests of
//! mixed lengths, with its prompt split by chunked prefill or not, with or without prefix-cache hits,
//! and after being preempted and recomputed. Runs the default model from its Q4_1 GGUF (quantized
//! matmuls, the path users run).

mod common;

use ironllm::{EngineArgs, Prompt, SamplingParams};
use ironllm_model::loader::DType;

fn prompts() -> Vec<Prompt> {
    let subjects = [
        "the ocean",
        "a lighthouse keeper",
        "prime numbers",
        "the history of bread",
        "Rust ownership",
        "a cat named Io",
        "volcanoes",
        "the moon landing",
        "jazz",
        "a haunted library",
        "photosynthesis",
        "chess openings",
        "the Silk Road",
        "quantum tunnelling",
        "a robot gardener",
        "winter in Oslo",
    ];
    let mut out = Vec::new();
    for (i, s) in subjects.iter().enumerate() {
        // Mixed lengths: short questions and long, repetitive context.
        let filler = "Consider every detail carefully. ".repeat(i % 5 * 6);
        out.push(Prompt::Text(format!(
            "<|im_start|>user\n{filler}Tell me about {s}.<|im_end|>\n<|im_start|>assistant\n"
        )));
        out.push(Prompt::Text(format!("{filler}Write one sentence about {s}:")));
    }
    out
}

fn params() -> SamplingParams {
    SamplingParams { ignore_eos: true, ..SamplingParams::greedy(24) }
}

fn run(args: EngineArgs, prompts: &[Prompt]) -> Vec<Vec<u32>> {
    let mut llm = common::llm(args);
    let outs = llm.generate(prompts, &params()).expect("generate");
    outs.into_iter().map(|o| o.outputs[0].token_ids.clone()).collect()
}

#[test]
fn greedy_tokens_do_not_depend_on_batch_chunking_caching_or_preemption() {
    let model = common::default_gguf();
    let base = common::test_args(model, DType::Auto);
    let prompts = prompts();
    assert_eq!(prompts.len(), 32);

    // Alone: one engine per request would be slow; a fresh engine with max_num_seqs 1 runs each alone.
    let alone = run(EngineArgs { max_num_seqs: Some(1), enable_prefix_caching: false, ..base.clone() }, &prompts);

    let batched = run(EngineArgs { enable_prefix_caching: false, ..base.clone() }, &prompts);
    assert_eq!(batched, alone, "batched vs alone");

    // Chunked prefill with a tiny budget splits every prompt over several steps.
    let chunked = run(
        EngineArgs {
            max_num_batched_tokens: Some(24),
            max_num_seqs: Some(16),
            enable_prefix_caching: false,
            ..base.clone()
        },
        &prompts,
    );
    assert_eq!(chunked, alone, "chunked prefill vs alone");

    // Prefix caching: run everything twice in one engine; the second pass hits the cache.
    let mut llm = common::llm(base.clone());
    let first = llm.generate(&prompts, &params()).expect("generate");
    let second = llm.generate(&prompts, &params()).expect("generate");
    let hits: usize = second.iter().map(|o| o.num_cached_tokens).sum();
    assert!(hits > 0, "the second pass must hit the prefix cache");
    for ((a, b), want) in first.iter().zip(&second).zip(&alone) {
        assert_eq!(&a.outputs[0].token_ids, want, "first pass with caching vs alone");
        assert_eq!(&b.outputs[0].token_ids, want, "prefix-cache hit vs alone");
    }
    let stats = llm.engine().stats();
    assert!(stats.prefix_cache_hits > 0 && stats.prefix_cache_queries >= stats.prefix_cache_hits);
}

#[test]
fn tight_kv_budget_forces_preemption_and_64_requests_complete_correctly() {
    let model = common::default_gguf();
    let base = common::test_args(model, DType::Auto);
    let mut prompts = prompts();
    prompts.extend(prompts.clone().into_iter().map(|p| match p {
        Prompt::Text(t) => Prompt::Text(format!("Q: {t}")),
        other => other,
    }));
    assert_eq!(prompts.len(), 64);
    let alone = run(EngineArgs { max_num_seqs: Some(1), enable_prefix_caching: false, ..base.clone() }, &prompts);
    // SmolLM2 needs 46,080 bytes of KV per token: 48 blocks of 16 tokens hold 768 tokens, far less than
    // 64 requests need at once, so the scheduler must preempt and recompute.
    let bytes = 46_080 * 16 * 48;
    let mut llm = common::llm(EngineArgs {
        kv_cache_memory_bytes: Some(bytes),
        max_model_len: Some(512),
        enable_prefix_caching: false,
        // vLLM's admission: the cache fills with prompts and decodes preempt (the headroom would wait).
        admission_headroom_tokens: Some(0),
        ..base.clone()
    });
    let outs = llm.generate(&prompts, &params()).expect("generate");
    let preemptions = llm.engine().stats().num_preemptions;
    assert!(preemptions > 0, "the tight budget must force preemption");
    for (o, want) in outs.iter().zip(&alone) {
        assert_eq!(&o.outputs[0].token_ids, want, "after preemption vs alone");
    }
    let stats = llm.engine().stats();
    assert_eq!((stats.num_running, stats.num_waiting), (0, 0));
    eprintln!("64 requests under a 768-token KV budget: {preemptions} preemptions, all outputs identical to solo runs");
}
