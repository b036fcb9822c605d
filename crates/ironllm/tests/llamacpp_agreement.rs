//! The default model run directly from its Q4_1 GGUF (quantized matmuls, `--dtype auto`) against
//! llama.cpp (llama-cpp-python, fixture made by tests/fixtures/llamacpp/make_llamacpp_reference.py):
//! greedy output must agree on the first 16 tokens for most prompts. Both engines quantize activations
//! differently from float32 and keep different KV precisions, so exact agreement on every prompt is not
//! expected; the rate is printed and must be a majority.

mod common;

use ironllm::{Prompt, SamplingParams};
use ironllm_model::loader::DType;
use serde_json::Value;

#[test]
fn q4_1_greedy_agrees_with_llama_cpp_on_most_prompts() {
    let path = common::fixtures().join("llamacpp/smollm2_q4_1_greedy.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("JSON");
    let cases = fixture["cases"].as_array().expect("cases");
    let prompts: Vec<Prompt> = cases
        .iter()
        .map(|c| Prompt::Tokens(serde_json::from_value(c["prompt_ids"].clone()).expect("prompt_ids")))
        .collect();
    let mut llm = common::llm(common::test_args(common::default_gguf(), DType::Auto));
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(16) };
    let outs = llm.generate(&prompts, &params).expect("generate");
    let (mut full, mut tokens_agreeing, mut total) = (0, 0, 0);
    for (c, o) in cases.iter().zip(&outs) {
        let want: Vec<u32> = serde_json::from_value(c["output_ids"].clone()).expect("output_ids");
        let got = &o.outputs[0].token_ids;
        let prefix = want.iter().zip(got).take_while(|(a, b)| a == b).count();
        tokens_agreeing += prefix;
        total += want.len();
        if prefix == want.len() {
            full += 1;
        }
    }
    eprintln!(
        "llama.cpp agreement: {full}/{} prompts identical for 16 tokens; {tokens_agreeing}/{total} tokens before the first divergence",
        cases.len()
    );
    assert!(full * 2 > cases.len(), "only {full} of {} prompts agree with llama.cpp", cases.len());
}
