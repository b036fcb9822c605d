//! Greedy output and logprobs against Hugging Face transformers in float32 (fixtures made by
//! `tests/fixtures/reference/*.py`): token-identical outputs, allowing a divergence only right after a
//! step whose reference top-1/top-2 logit gap is below 1e-3, and top logprobs within 1e-3.

mod common;

use std::path::Path;

use ironllm::{Prompt, SamplingParams};
use ironllm_model::loader::DType;
use serde_json::Value;

const GAP_TIE: f64 = 1e-3;
const LOGPROB_TOL: f64 = 1e-3;

struct Report {
    cases: usize,
    exact: usize,
    diverged_at_tie: usize,
    max_logprob_err: f64,
    max_prompt_logprob_err: f64,
}

fn check_against(reference: &Path, model: std::path::PathBuf, dtype: DType) -> Report {
    let text = std::fs::read_to_string(reference).unwrap_or_else(|e| panic!("{}: {e}", reference.display()));
    let fixture: Value = serde_json::from_str(&text).expect("fixture JSON");
    let cases = fixture["cases"].as_array().expect("cases");
    let n_new = fixture["n_new_tokens"].as_u64().expect("n_new_tokens") as usize;
    let top_k = fixture["top_k"].as_u64().unwrap_or(5) as usize;
    let mut llm = common::llm(common::test_args(model, dtype));
    let prompts: Vec<Prompt> = cases
        .iter()
        .map(|c| Prompt::Tokens(serde_json::from_value(c["prompt_ids"].clone()).expect("prompt_ids")))
        .collect();
    let params: Vec<SamplingParams> = cases
        .iter()
        .map(|c| SamplingParams {
            ignore_eos: true,
            logprobs: Some(top_k),
            prompt_logprobs: (!c["prompt_logprobs"].is_null()).then_some(top_k),
            skip_special_tokens: false,
            ..SamplingParams::greedy(n_new)
        })
        .collect();
    // All cases run as one batch: parity must hold under continuous batching too.
    let outputs = llm.generate_each(&prompts, &params).expect("generate");
    let mut report =
        Report { cases: cases.len(), exact: 0, diverged_at_tie: 0, max_logprob_err: 0.0, max_prompt_logprob_err: 0.0 };
    for (case, out) in cases.iter().zip(&outputs) {
        let name = case["name"].as_str().unwrap_or("?");
        let want: Vec<u32> = serde_json::from_value(case["output_ids"].clone()).expect("output_ids");
        let gaps: Vec<f64> = serde_json::from_value(case["gaps"].clone()).expect("gaps");
        let top_ids: Vec<Vec<u32>> = serde_json::from_value(case["top_ids"].clone()).expect("top_ids");
        let top_lps: Vec<Vec<f64>> = serde_json::from_value(case["top_logprobs"].clone()).expect("top_logprobs");
        let got = &out.outputs[0];
        assert_eq!(got.token_ids.len(), n_new, "{name}: wrong output length");
        let logprobs = got.logprobs.as_ref().expect("logprobs requested");
        let mut diverged = false;
        for i in 0..n_new {
            // Logprobs at step i are comparable while the prefixes agree (they do up to here).
            let ours = &logprobs[i];
            for (tid, want_lp) in top_ids[i].iter().zip(&top_lps[i]) {
                if let Some(t) = ours.top.iter().find(|t| t.token_id == *tid) {
                    let err = (t.logprob as f64 - want_lp).abs();
                    report.max_logprob_err = report.max_logprob_err.max(err);
                    assert!(err < LOGPROB_TOL, "{name} step {i}: logprob of {tid} is {} vs {want_lp}", t.logprob);
                } else {
                    // A candidate we do not list must be a near-tie at the tail of the top-k.
                    let kth = ours.top.last().map_or(f64::NEG_INFINITY, |t| t.logprob as f64);
                    assert!((kth - want_lp).abs() < LOGPROB_TOL, "{name} step {i}: reference top token {tid} missing");
                }
            }
            if got.token_ids[i] != want[i] {
                assert!(
                    gaps[i] < GAP_TIE,
                    "{name}: step {i} chose {} but transformers chose {} (gap {} is no tie)",
                    got.token_ids[i],
                    want[i],
                    gaps[i]
                );
                diverged = true;
                break;
            }
        }
        if diverged {
            report.diverged_at_tie += 1;
        } else {
            report.exact += 1;
        }
        if let Some(plp) = case["prompt_logprobs"].as_object() {
            let want: Vec<f64> = serde_json::from_value(plp["token_logprobs"].clone()).expect("token_logprobs");
            let ours = out.prompt_logprobs.as_ref().expect("prompt logprobs requested");
            assert_eq!(ours.len(), want.len() + 1, "{name}: prompt logprobs length (first is None)");
            assert!(ours[0].is_none());
            for (j, w) in want.iter().enumerate() {
                let lp = ours[j + 1].as_ref().expect("prompt logprob").chosen.logprob as f64;
                let err = (lp - w).abs();
                report.max_prompt_logprob_err = report.max_prompt_logprob_err.max(err);
                assert!(err < LOGPROB_TOL, "{name}: prompt position {j}: {lp} vs {w}");
            }
        }
    }
    eprintln!(
        "{}: {} cases, {} token-identical, {} diverged after a near-tie, max |Δlogprob| {:.2e}, prompt {:.2e}",
        reference.display(),
        report.cases,
        report.exact,
        report.diverged_at_tie,
        report.max_logprob_err,
        report.max_prompt_logprob_err
    );
    report
}

#[test]
fn smollm2_gguf_float32_matches_transformers() {
    let r =
        check_against(&common::fixtures().join("reference/smollm2_f32.json"), common::default_gguf(), DType::Float32);
    assert!(r.cases >= 20);
}

#[test]
fn smollm2_hf_directory_matches_transformers() {
    let dir = common::fixtures().join("reference/smollm2_hf");
    assert!(
        dir.join("model.safetensors").exists(),
        "run scripts/fixtures.sh first: it rebuilds {}/model.safetensors from the GGUF",
        dir.display()
    );
    let r = check_against(&common::fixtures().join("reference/smollm2_f32.json"), dir, DType::Auto);
    assert!(r.cases >= 20);
}

#[test]
fn tiny_random_models_match_transformers() {
    for name in ["tiny_qwen2", "tiny_qwen3", "tiny_llama3"] {
        let dir = common::fixtures().join("reference").join(name);
        let r = check_against(&dir.join("reference.json"), dir.clone(), DType::Auto);
        assert!(r.cases >= 20, "{name}");
    }
}
