//! The offline API end to end on the default model: sampling parameters behave as vLLM documents them
//! (n, best_of, seeds, stop strings and tokens, min_tokens, logprobs, penalties, masks), invalid
//! parameters are rejected with clear messages, and text matches the tokens.

mod common;

use ironllm::{Prompt, SamplingParams, LLM};
use ironllm_core::outputs::{FinishReason, StopReason};
use ironllm_model::loader::DType;

fn llm() -> LLM {
    common::llm(common::test_args(common::default_gguf(), DType::Auto))
}

fn chat(q: &str) -> Prompt {
    Prompt::Text(format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"))
}

#[test]
fn greedy_text_matches_tokens_and_finishes_on_eos() {
    if !common::needs_trained_weights("greedy_text_matches_tokens_and_finishes_on_eos") {
        return;
    }
    let mut llm = llm();
    let out = llm
        .generate(&[chat("What is the capital of France? Answer in one sentence.")], &SamplingParams::greedy(64))
        .unwrap();
    let o = &out[0].outputs[0];
    assert_eq!(o.finish_reason, Some(FinishReason::Stop), "a short answer ends with <|im_end|>");
    assert_eq!(o.stop_reason, None, "EOS reports no stop_reason, as vLLM");
    assert_eq!(*o.token_ids.last().unwrap(), 2, "the EOS token is in token_ids");
    let tok = llm.engine().tokenizer().unwrap().clone();
    assert_eq!(o.text, tok.decode(&o.token_ids, true).unwrap(), "text is the decode of the tokens");
    assert!(o.text.contains("Paris"), "{}", o.text);
}

#[test]
fn length_limit_and_n_with_seeds() {
    let mut llm = llm();
    let p = SamplingParams {
        n: 3,
        temperature: 1.0,
        seed: Some(7),
        max_tokens: Some(12),
        ignore_eos: true,
        ..Default::default()
    };
    let a = llm.generate(&[chat("Write a poem.")], &p).unwrap();
    assert_eq!(a[0].outputs.len(), 3);
    for (i, o) in a[0].outputs.iter().enumerate() {
        assert_eq!(o.index, i);
        assert_eq!(o.token_ids.len(), 12);
        assert_eq!(o.finish_reason, Some(FinishReason::Length));
    }
    // The same seed gives the same samples, also when other requests share the batch.
    let others = [chat("Tell me a joke."), chat("Write a poem."), Prompt::Text("Once upon a time".into())];
    let mut params = vec![SamplingParams { temperature: 0.8, max_tokens: Some(12), ..Default::default() }; 3];
    params[1] = p.clone();
    let b = llm.generate_each(&others, &params).unwrap();
    assert_eq!(a[0].outputs, b[1].outputs, "seeded samples independent of the batch");
    let distinct: std::collections::HashSet<_> = a[0].outputs.iter().map(|o| o.token_ids.clone()).collect();
    assert!(distinct.len() > 1, "n samples differ from each other");
}

#[test]
fn best_of_returns_the_most_likely_sequences() {
    let mut llm = llm();
    let p = SamplingParams {
        n: 2,
        best_of: Some(4),
        temperature: 1.0,
        seed: Some(3),
        max_tokens: Some(8),
        logprobs: Some(0),
        ..Default::default()
    };
    let out = llm.generate(&[chat("Name a fruit.")], &p).unwrap();
    assert_eq!(out[0].outputs.len(), 2);
    let cum: Vec<f64> = out[0].outputs.iter().map(|o| o.cumulative_logprob.unwrap()).collect();
    assert!(cum[0] >= cum[1], "sorted by cumulative logprob: {cum:?}");
    // The kept ones are the best of all four children: rerun with n=4 and the same seed.
    let all = llm.generate(&[chat("Name a fruit.")], &SamplingParams { n: 4, best_of: None, ..p.clone() }).unwrap();
    let mut all_cum: Vec<f64> = all[0].outputs.iter().map(|o| o.cumulative_logprob.unwrap()).collect();
    all_cum.sort_by(|a, b| b.total_cmp(a));
    assert!((all_cum[0] - cum[0]).abs() < 1e-6 && (all_cum[1] - cum[1]).abs() < 1e-6, "{all_cum:?} vs {cum:?}");
}

#[test]
fn stop_strings_are_trimmed_or_kept_and_stop_tokens_reported() {
    if !common::needs_trained_weights("stop_strings_are_trimmed_or_kept_and_stop_tokens_reported") {
        return;
    }
    let mut llm = llm();
    let prompt = [chat("Count from 1 to 20, separated by commas.")];
    let free = llm.generate(&prompt, &SamplingParams { ignore_eos: true, ..SamplingParams::greedy(40) }).unwrap();
    let text = free[0].outputs[0].text.clone();
    let idx = text.find('5').expect("the count reaches 5");
    let stop = SamplingParams { stop: vec!["5".into()], ..SamplingParams::greedy(40) };
    let cut = llm.generate(&prompt, &stop).unwrap();
    let o = &cut[0].outputs[0];
    assert_eq!(o.text, text[..idx], "text ends right before the stop string");
    assert_eq!(o.finish_reason, Some(FinishReason::Stop));
    assert_eq!(o.stop_reason, Some(StopReason::String("5".into())));
    let keep = llm.generate(&prompt, &SamplingParams { include_stop_str_in_output: true, ..stop.clone() }).unwrap();
    assert_eq!(keep[0].outputs[0].text, text[..idx + 1]);
    // A stop token id: generation ends at it and reports it.
    let ids = &free[0].outputs[0].token_ids;
    let at = (2..ids.len()).find(|&i| !ids[..i].contains(&ids[i])).expect("a token not seen before");
    let first = ids[at];
    let by_id =
        llm.generate(&prompt, &SamplingParams { stop_token_ids: vec![first], ..SamplingParams::greedy(40) }).unwrap();
    let o = &by_id[0].outputs[0];
    assert_eq!(o.token_ids, ids[..=at]);
    assert_eq!(o.stop_reason, Some(StopReason::TokenId(first)));
}

#[test]
fn min_tokens_ignore_eos_and_masks() {
    if !common::needs_trained_weights("min_tokens_ignore_eos_and_masks") {
        return;
    }
    let mut llm = llm();
    let prompt = [chat("Say hi.")];
    let short = llm.generate(&prompt, &SamplingParams::greedy(64)).unwrap();
    let n = short[0].outputs[0].token_ids.len();
    assert_eq!(short[0].outputs[0].finish_reason, Some(FinishReason::Stop), "the answer ends by itself");
    assert!(n + 5 <= 64, "a short answer");
    let longer = llm.generate(&prompt, &SamplingParams { min_tokens: n + 5, ..SamplingParams::greedy(64) }).unwrap();
    assert!(longer[0].outputs[0].token_ids.len() >= n + 5, "min_tokens keeps EOS away");
    let all = llm.generate(&prompt, &SamplingParams { ignore_eos: true, ..SamplingParams::greedy(40) }).unwrap();
    assert_eq!(all[0].outputs[0].token_ids.len(), 40);
    // allowed_token_ids restricts every sampled token; logit_bias can force one.
    let allowed = vec![28u32, 29, 30];
    let masked = llm
        .generate(
            &prompt,
            &SamplingParams {
                allowed_token_ids: Some(allowed.clone()),
                temperature: 1.0,
                seed: Some(1),
                max_tokens: Some(10),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(masked[0].outputs[0].token_ids.iter().all(|t| allowed.contains(t)));
    let mut bias = std::collections::BTreeMap::new();
    bias.insert(1000u32, 100.0f32);
    let biased = llm.generate(&prompt, &SamplingParams { logit_bias: bias, ..SamplingParams::greedy(5) }).unwrap();
    assert!(biased[0].outputs[0].token_ids.iter().all(|&t| t == 1000));
    // bad_words: the greedy answer's first word never appears.
    let tok = llm.engine().tokenizer().unwrap().clone();
    let first_word = tok.decode(&short[0].outputs[0].token_ids[..1], true).unwrap();
    let banned = llm
        .generate(
            &prompt,
            &SamplingParams { bad_words: vec![first_word.trim().to_string()], ..SamplingParams::greedy(8) },
        )
        .unwrap();
    assert_ne!(banned[0].outputs[0].token_ids[0], short[0].outputs[0].token_ids[0]);
}

#[test]
fn logprobs_shapes_and_ranks() {
    let mut llm = llm();
    let p = SamplingParams { logprobs: Some(4), prompt_logprobs: Some(2), ..SamplingParams::greedy(6) };
    let out = llm.generate(&[chat("Hello!")], &p).unwrap();
    let o = &out[0].outputs[0];
    let lps = o.logprobs.as_ref().unwrap();
    assert_eq!(lps.len(), o.token_ids.len());
    for (lp, &t) in lps.iter().zip(&o.token_ids) {
        assert_eq!(lp.chosen.token_id, t);
        assert_eq!(lp.chosen.rank, 1, "greedy picks rank 1");
        assert_eq!(lp.top.len(), 4);
        assert!(lp.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        assert!(lp.chosen.logprob <= 0.0);
    }
    let plp = out[0].prompt_logprobs.as_ref().unwrap();
    assert_eq!(plp.len(), out[0].prompt_token_ids.len());
    assert!(plp[0].is_none());
    for (i, e) in plp.iter().enumerate().skip(1) {
        let e = e.as_ref().unwrap();
        assert_eq!(e.chosen.token_id, out[0].prompt_token_ids[i]);
        assert_eq!(e.top.len(), 2);
    }
}

#[test]
fn prompt_logprobs_of_a_long_prompt_do_not_depend_on_the_step_size() {
    // 700 prompt positions in one step take two passes through the GPU runner's prompt-logprob chunk
    // (512 rows); with a 128-token budget every step's rows fit one pass. Both must give the same values,
    // position by position (to 1e-3: the two step shapes sum in different orders).
    let prompt: Vec<u32> = (0..700u32).map(|i| (i * 37 + 11) % 20_000).collect();
    let p = SamplingParams { prompt_logprobs: Some(1), ..SamplingParams::greedy(1) };
    let whole = llm().generate(&[Prompt::Tokens(prompt.clone())], &p).unwrap();
    let small_steps = ironllm::EngineArgs {
        max_num_batched_tokens: Some(128),
        max_num_seqs: Some(4),
        ..common::test_args(common::default_gguf(), DType::Auto)
    };
    let chunked = common::llm(small_steps).generate(&[Prompt::Tokens(prompt.clone())], &p).unwrap();
    let (a, b) = (whole[0].prompt_logprobs.as_ref().unwrap(), chunked[0].prompt_logprobs.as_ref().unwrap());
    assert_eq!((a.len(), b.len()), (700, 700));
    for i in 1..700 {
        let (x, y) = (a[i].as_ref().unwrap(), b[i].as_ref().unwrap());
        assert_eq!((x.chosen.token_id, y.chosen.token_id), (prompt[i], prompt[i]));
        assert!((x.chosen.logprob - y.chosen.logprob).abs() < 1e-3, "position {i}: {x:?} vs {y:?}");
        assert!((x.top[0].logprob - y.top[0].logprob).abs() < 1e-3, "position {i}: {x:?} vs {y:?}");
    }
}

#[test]
fn without_chunked_prefill_a_prompt_longer_than_the_given_budget_runs_whole() {
    // vLLM's engine arguments raise the token budget to the context length when chunked prefill is off
    // (a prompt must then fit one step), where a budget below it would otherwise refuse such prompts.
    let args = ironllm::EngineArgs {
        enable_chunked_prefill: false,
        max_num_batched_tokens: Some(64),
        max_num_seqs: Some(4),
        max_model_len: Some(512),
        ..common::test_args(common::default_gguf(), DType::Auto)
    };
    let mut llm = common::llm(args);
    assert_eq!(llm.engine().info().max_num_batched_tokens, 512);
    let prompt: Vec<u32> = (0..300u32).map(|i| (i * 37 + 11) % 20_000).collect();
    let p = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(4) };
    let out = llm.generate(&[Prompt::Tokens(prompt.clone()), Prompt::Tokens(prompt[..200].to_vec())], &p).unwrap();
    assert!(out.iter().all(|o| o.outputs[0].token_ids.len() == 4), "{out:?}");
}

#[test]
fn penalties_change_repetitive_output() {
    if !common::needs_trained_weights("penalties_change_repetitive_output") {
        return;
    }
    let mut llm = llm();
    let prompt = [Prompt::Text("the the the the the the".into())];
    let plain = llm.generate(&prompt, &SamplingParams { ignore_eos: true, ..SamplingParams::greedy(16) }).unwrap();
    let penal = llm
        .generate(
            &prompt,
            &SamplingParams {
                repetition_penalty: 1.8,
                frequency_penalty: 1.0,
                ignore_eos: true,
                ..SamplingParams::greedy(16)
            },
        )
        .unwrap();
    let count = |ids: &[u32]| {
        let mut v = ids.to_vec();
        v.sort();
        v.dedup();
        v.len()
    };
    assert!(count(&penal[0].outputs[0].token_ids) > count(&plain[0].outputs[0].token_ids), "penalties diversify");
}

#[test]
fn invalid_requests_are_rejected_with_messages() {
    let mut llm = llm();
    let p = [chat("hi")];
    let err = |llm: &mut LLM, p: &[Prompt], s: SamplingParams| llm.generate(p, &s).unwrap_err().to_string();
    assert!(err(&mut llm, &p, SamplingParams { top_p: 1.5, ..Default::default() })
        .contains("top_p must be in (0, 1], got 1.5"));
    assert!(err(&mut llm, &p, SamplingParams { temperature: -0.5, ..Default::default() }).contains("temperature"));
    assert!(err(&mut llm, &p, SamplingParams { logprobs: Some(50), ..Default::default() }).contains("max allowed: 20"));
    assert!(err(&mut llm, &p, SamplingParams { stop_token_ids: vec![10_000_000], ..Default::default() })
        .contains("out-of-vocab"));
    assert!(err(&mut llm, &[Prompt::Tokens(vec![])], SamplingParams::default()).contains("empty"));
    assert!(err(&mut llm, &[Prompt::Tokens(vec![49152])], SamplingParams::default()).contains("out of vocabulary"));
    let long = Prompt::Tokens(vec![100; 9000]);
    assert!(err(&mut llm, &[long], SamplingParams::default()).contains("maximum model length"));
    // The engine is still usable and nothing was left queued.
    assert_eq!(llm.generate(&p, &SamplingParams::greedy(2)).unwrap()[0].outputs[0].token_ids.len(), 2);
    assert!(!llm.engine().has_unfinished_requests());
}

#[test]
fn abort_frees_blocks_at_once() {
    let mut llm = llm();
    let engine = llm_engine(&mut llm);
    engine
        .add_request(
            "a",
            &chat("Write a long story."),
            SamplingParams { ignore_eos: true, ..SamplingParams::greedy(200) },
            ironllm::OutputKind::Delta,
            0,
        )
        .unwrap();
    for _ in 0..3 {
        engine.step().unwrap();
    }
    assert!(engine.stats().kv_cache_usage > 0.0);
    let out = engine.abort_request("a");
    assert_eq!(out.and_then(|o| o.outputs.first().and_then(|c| c.finish_reason)), Some(FinishReason::Abort));
    assert_eq!(engine.stats().kv_cache_usage, 0.0, "blocks freed at once");
    while engine.has_unfinished_requests() {
        engine.step().unwrap();
    }
    assert_eq!((engine.stats().num_running, engine.stats().num_waiting), (0, 0));
}

fn llm_engine(llm: &mut LLM) -> &mut ironllm::Engine {
    llm.engine_mut()
}
