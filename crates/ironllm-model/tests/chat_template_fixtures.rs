//! Chat templates rendered by ironllm must equal transformers' `apply_chat_template(...,
//! tokenize=False)`: SmolLM2's ChatML template and Llama-3- and Qwen-2.5-style templates (with tools,
//! tool calls, `tojson(indent=4)`, a fixed `date_string`), references in
//! `tests/fixtures/tokenizer/chat_template.json`.

use std::path::Path;

use ironllm_model::chat_template::ChatTemplate;
use serde_json::Value;

#[test]
fn templates_render_like_transformers() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer/chat_template.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let fixture: Value = serde_json::from_str(&text).expect("chat_template.json is JSON");
    let bos = fixture["bos_token"].as_str().map(str::to_string);
    let eos = fixture["eos_token"].as_str().map(str::to_string);
    let mut total = 0;
    let mut failures = Vec::new();
    for template in fixture["templates"].as_array().expect("templates") {
        let name = template["name"].as_str().unwrap_or("?");
        let source = template["source"].as_str().expect("source");
        let compiled = ChatTemplate::new(source, bos.clone(), eos.clone())
            .unwrap_or_else(|e| panic!("template {name} does not compile: {e}"));
        for (i, case) in template["cases"].as_array().expect("cases").iter().enumerate() {
            total += 1;
            let extra = case["extra"].as_object().cloned().unwrap_or_default();
            let agp = case["add_generation_prompt"].as_bool().unwrap_or(false);
            let want = case["rendered"].as_str().expect("rendered");
            match compiled.render(&case["messages"], agp, &extra) {
                Ok(got) if got == want => {}
                Ok(got) => failures.push(format!("{name} case {i}:\n--- got\n{got}\n--- want\n{want}")),
                Err(e) => failures.push(format!("{name} case {i}: error {e}")),
            }
        }
    }
    eprintln!("{} of {total} chat-template renders match transformers", total - failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
