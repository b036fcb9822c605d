//! Token-for-token parity with Hugging Face for SmolLM2's tokenizer, loaded two ways: from the
//! corrected `tokenizer.json` fixture directory and rebuilt from the GGUF file's metadata.
//!
//! The reference ids and decodes in `tests/fixtures/tokenizer/parity.json` come from transformers
//! (`tests/fixtures/tokenizer/make_tokenizer_fixtures.py`). The GGUF test needs the model file: it
//! looks at `$IRONLLM_TEST_GGUF`, then `~/.cache/ironllm/models/SmolLM2-135M-Instruct.Q4_1.gguf`,
//! and passes with a note when neither exists (CI fetches the file, so it runs there).

use std::path::{Path, PathBuf};

use ironllm_model::gguf::GgufFile;
use ironllm_model::tokenizer::Tokenizer;
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer")
}

fn parity_cases() -> Vec<Value> {
    let path = fixture_dir().join("parity.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let v: Value = serde_json::from_str(&text).expect("parity.json is JSON");
    v["cases"].as_array().expect("cases array").clone()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// The SmolLM2 GGUF, if this machine has it.
fn smollm2_gguf() -> Option<PathBuf> {
    std::env::var_os("IRONLLM_TEST_GGUF")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/ironllm/models/SmolLM2-135M-Instruct.Q4_1.gguf")),
        )
        .find(|p| p.exists())
}

/// Checks every case; returns how many of the four checks per case matched, and fails listing the
/// first mismatches.
fn check_parity(tok: &Tokenizer, source: &str) {
    let cases = parity_cases();
    let mut failures = Vec::new();
    let mut checks = 0usize;
    for case in &cases {
        let text = case["text"].as_str().expect("text");
        let want = ids(&case["ids"]);
        let want_special = ids(&case["ids_with_special"]);
        let got = tok.encode(text, false).expect("encode");
        let got_special = tok.encode(text, true).expect("encode");
        let skip = tok.decode(&want, true).expect("decode");
        let keep = tok.decode(&want, false).expect("decode");
        for (what, ok, detail) in [
            ("ids", got == want, format!("got {got:?}, want {want:?}")),
            ("ids_with_special", got_special == want_special, format!("got {got_special:?}, want {want_special:?}")),
            (
                "decode_skip_special",
                skip == case["decode_skip_special"].as_str().unwrap_or_default(),
                format!("got {skip:?}"),
            ),
            (
                "decode_keep_special",
                keep == case["decode_keep_special"].as_str().unwrap_or_default(),
                format!("got {keep:?}"),
            ),
        ] {
            checks += 1;
            if !ok {
                failures.push(format!("{what} for {text:?}: {detail}"));
            }
        }
    }
    eprintln!("{source}: {} of {checks} checks match over {} strings", checks - failures.len(), cases.len());
    assert!(
        failures.is_empty(),
        "{source}: {} mismatches, first ones:\n{}",
        failures.len(),
        failures.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn hf_dir_tokenizer_matches_transformers() {
    let tok = Tokenizer::from_hf_dir(&fixture_dir().join("smollm2")).expect("load fixture tokenizer");
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.bos_token_id(), Some(1));
    assert!(!tok.add_bos_token());
    assert!(tok.is_special(0) && tok.is_special(1) && tok.is_special(2));
    assert!(tok.chat_template().is_some_and(|t| t.contains("<|im_start|>")));
    check_parity(&tok, "tokenizer.json fixture");
}

#[test]
fn gguf_tokenizer_matches_transformers() {
    let Some(path) = smollm2_gguf() else {
        eprintln!("note: SmolLM2 GGUF not found (set IRONLLM_TEST_GGUF); skipping the GGUF tokenizer parity test");
        return;
    };
    let g = GgufFile::open(&path).expect("open GGUF");
    let tok = Tokenizer::from_gguf(&g).expect("tokenizer from GGUF");
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.pad_token_id(), Some(2));
    assert!(!tok.add_bos_token());
    for id in 0..17 {
        assert!(tok.is_special(id), "id {id} should be special");
    }
    assert!(!tok.is_special(17));
    // Same template as the one transformers saved beside the fixture tokenizer.
    let fixture = Tokenizer::from_hf_dir(&fixture_dir().join("smollm2")).expect("fixture");
    assert_eq!(tok.chat_template(), fixture.chat_template());
    check_parity(&tok, "GGUF metadata");
}
