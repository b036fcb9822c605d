//! Tokenizers built from small synthetic GGUF files and HF directories, where the right answer can be
//! worked out by hand. Parity with the real SmolLM2 tokenizer is in `tests/tokenizer_parity.rs`.

use super::*;
use crate::gguf::{GgufFile, GgufValue, GgufWriter};

/// A Llama-2-style vocabulary: `<unk>`, `<s>`, `</s>`, the 256 byte tokens, then pieces whose scores
/// fall with length, with a three-way tie at the end to exercise merge ordering.
fn spm_vocab() -> (Vec<String>, Vec<f32>) {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    tokens.extend((0..=255u32).map(|b| format!("<0x{b:02X}>")));
    let mut scores = vec![0.0f32; tokens.len()];
    let pieces: [(&str, f32); 22] = [
        ("▁", -1.0),
        ("h", -2.0),
        ("e", -3.0),
        ("l", -4.0),
        ("o", -5.0),
        ("w", -6.0),
        ("r", -7.0),
        ("d", -8.0),
        ("he", -10.0),
        ("ll", -11.0),
        ("llo", -12.0),
        ("hello", -13.0),
        ("▁hello", -14.0),
        ("or", -15.0),
        ("ld", -16.0),
        ("orld", -17.0),
        ("world", -18.0),
        ("▁world", -19.0),
        ("▁h", -20.0),
        ("lo", -30.0),
        ("el", -30.0),
        ("hel", -30.0),
    ];
    for (t, s) in pieces {
        tokens.push(t.to_string());
        scores.push(s);
    }
    (tokens, scores)
}

/// A GGUF holding [`spm_vocab`] as llama.cpp writes a Llama 2 tokenizer (no merges: they are
/// recovered from the scores), plus `extra` metadata.
fn spm_gguf(extra: &[(&str, GgufValue)]) -> GgufWriter {
    let (tokens, scores) = spm_vocab();
    let types: Vec<GgufValue> = tokens
        .iter()
        .map(|t| {
            GgufValue::I32(match t.as_str() {
                "<unk>" => 2,
                "<s>" | "</s>" => 3,
                t if t.starts_with("<0x") => 6,
                _ => 1,
            })
        })
        .collect();
    let base: Vec<(&str, GgufValue)> = vec![
        ("general.architecture", GgufValue::String("llama".into())),
        ("tokenizer.ggml.model", GgufValue::String("llama".into())),
        ("tokenizer.ggml.tokens", GgufValue::Array(tokens.into_iter().map(GgufValue::String).collect())),
        ("tokenizer.ggml.scores", GgufValue::Array(scores.into_iter().map(GgufValue::F32).collect())),
        ("tokenizer.ggml.token_type", GgufValue::Array(types)),
        ("tokenizer.ggml.bos_token_id", GgufValue::U32(1)),
        ("tokenizer.ggml.eos_token_id", GgufValue::U32(2)),
        ("tokenizer.ggml.unknown_token_id", GgufValue::U32(0)),
        ("tokenizer.chat_template", GgufValue::String("{{ messages }}".into())),
    ];
    // Extra keys replace base keys of the same name.
    let mut w = GgufWriter::new();
    for (k, v) in base {
        if !extra.iter().any(|(e, _)| *e == k) {
            w.metadata(k, v);
        }
    }
    for (k, v) in extra {
        w.metadata(*k, v.clone());
    }
    w
}

/// GPT-2's byte alphabet, indexed by byte.
fn gpt2_alphabet() -> Vec<char> {
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            if (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b) {
                char::from(b)
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            }
        })
        .collect()
}

#[test]
fn merges_from_scores_match_transformers() {
    let (tokens, scores) = spm_vocab();
    let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let merges = super::gguf::merges_from_scores(&tokens, &scores);
    // transformers.tokenization_utils_base.generate_merges on the same vocabulary and scores.
    let expected = [
        ("h", "e"),
        ("l", "l"),
        ("ll", "o"),
        ("l", "lo"),
        ("hel", "lo"),
        ("he", "llo"),
        ("▁", "hello"),
        ("o", "r"),
        ("l", "d"),
        ("or", "ld"),
        ("w", "orld"),
        ("▁", "world"),
        ("▁", "h"),
        ("he", "l"),
        ("h", "el"),
        ("l", "o"),
        ("e", "l"),
    ];
    let got: Vec<(&str, &str)> = merges.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(got, expected);
}

#[test]
fn sentencepiece_gguf_encodes_and_decodes() {
    let g = GgufFile::from_bytes(spm_gguf(&[]).to_bytes()).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let id = |t: &str| tok.token_to_id(t).unwrap_or_else(|| panic!("no token {t}"));

    // The dummy prefix makes "hello" one piece, "▁hello".
    assert_eq!(tok.encode("hello", false).unwrap(), vec![id("▁hello")]);
    assert_eq!(tok.encode("hello world", false).unwrap(), vec![id("▁hello"), id("▁world")]);
    // A leading space is kept as its own ▁ (sentencepiece and llama.cpp do the same).
    assert_eq!(tok.encode(" hello", false).unwrap(), vec![id("▁"), id("▁hello")]);
    // Llama adds BOS by default.
    assert!(tok.add_bos_token());
    assert_eq!(tok.encode("hello", true).unwrap(), vec![1, id("▁hello")]);
    assert_eq!(tok.encode("", true).unwrap(), vec![1]);
    assert_eq!(tok.encode("", false).unwrap(), Vec::<u32>::new());
    // Special-token text is one token, and the text after it gets its own dummy prefix.
    assert_eq!(tok.encode("<s>hello", false).unwrap(), vec![1, id("▁hello")]);

    // Byte fallback: 'é' is not in the vocabulary, so it becomes its UTF-8 bytes.
    let e_acute = tok.encode("hé", false).unwrap();
    assert_eq!(e_acute, vec![id("▁h"), id("<0xC3>"), id("<0xA9>")]);
    assert_eq!(tok.decode(&e_acute, false).unwrap(), "hé");
    // A lone continuation byte cannot be decoded; it becomes U+FFFD, as in transformers.
    assert_eq!(tok.decode(&[id("<0xA9>")], false).unwrap(), "\u{FFFD}");

    // Decoding strips the prepended space and keeps real ones.
    assert_eq!(tok.decode(&[id("▁hello"), id("▁world")], false).unwrap(), "hello world");
    assert_eq!(tok.decode(&[id("▁"), id("▁hello")], false).unwrap(), " hello");
    assert_eq!(tok.decode(&[1, id("▁hello"), 2], false).unwrap(), "<s> hello</s>");
    assert_eq!(tok.decode(&[1, id("▁hello"), 2], true).unwrap(), "hello");

    assert_eq!(tok.bos_token(), Some("<s>"));
    assert_eq!(tok.eos_token(), Some("</s>"));
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_id(), Some(2));
    assert!(tok.is_special(1) && tok.is_special(2) && tok.is_special(0));
    assert!(!tok.is_special(id("▁hello")));
    assert_eq!(tok.vocab_size(), spm_vocab().0.len());
    assert_eq!(tok.chat_template(), Some("{{ messages }}"));
}

#[test]
fn sentencepiece_flags_from_metadata() {
    // No BOS on encode, no dummy prefix, an EOS on encode, a user-defined token.
    let g = GgufFile::from_bytes(
        spm_gguf(&[
            ("tokenizer.ggml.add_bos_token", GgufValue::Bool(false)),
            ("tokenizer.ggml.add_eos_token", GgufValue::Bool(true)),
            ("tokenizer.ggml.add_space_prefix", GgufValue::Bool(false)),
        ])
        .to_bytes(),
    )
    .unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let id = |t: &str| tok.token_to_id(t).unwrap();
    // Without the dummy prefix "hello" merges to "hello", not "▁hello".
    assert_eq!(tok.encode("hello", true).unwrap(), vec![id("hello"), 2]);
    assert_eq!(tok.encode("hello", false).unwrap(), vec![id("hello")]);
    assert_eq!(tok.encode(" hello", false).unwrap(), vec![id("▁hello")]);
    assert_eq!(tok.decode(&[id("▁hello")], false).unwrap(), " hello");
}

#[test]
fn gguf_errors_name_the_key() {
    let mut w = GgufWriter::new();
    w.metadata("tokenizer.ggml.model", GgufValue::String("llama".into()));
    let g = GgufFile::from_bytes(w.to_bytes()).unwrap();
    let err = Tokenizer::from_gguf(&g).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.tokens"), "{err}");

    let mut w = GgufWriter::new();
    w.metadata("tokenizer.ggml.model", GgufValue::String("t5".into()))
        .metadata("tokenizer.ggml.tokens", GgufValue::Array(vec![GgufValue::String("a".into())]));
    let g = GgufFile::from_bytes(w.to_bytes()).unwrap();
    assert!(matches!(Tokenizer::from_gguf(&g).unwrap_err(), TokenizerError::UnsupportedGgufModel { .. }));

    let g =
        GgufFile::from_bytes(spm_gguf(&[("tokenizer.ggml.bos_token_id", GgufValue::U32(100_000))]).to_bytes()).unwrap();
    let err = Tokenizer::from_gguf(&g).unwrap_err();
    assert!(err.to_string().contains("bos_token_id"), "{err}");

    let g = GgufFile::from_bytes(spm_gguf(&[("tokenizer.ggml.add_bos_token", GgufValue::U8(1))]).to_bytes()).unwrap();
    let err = Tokenizer::from_gguf(&g).unwrap_err();
    assert!(matches!(err, TokenizerError::GgufKeyType { .. }), "{err}");
}

#[test]
fn byte_level_gguf_respells_and_adds_tokens() {
    // A tiny byte-level vocabulary: the 256 byte symbols, one merge, a control token and a
    // user-defined token written in plain UTF-8.
    let alphabet = gpt2_alphabet();
    let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    let mut types = vec![GgufValue::I32(1); 256];
    tokens.push("Ġh".into());
    types.push(GgufValue::I32(1));
    tokens.push("<|end|>".into());
    types.push(GgufValue::I32(3));
    tokens.push("<think>".into());
    types.push(GgufValue::I32(4));
    // "中" stored as plain UTF-8 by a sloppy converter; it must be respelled in the byte alphabet
    // ("ä¸Ń") for the merges to reach it. (Characters like "é" are already in the alphabet.)
    let spell = |s: &str| s.bytes().map(|b| alphabet[b as usize]).collect::<String>();
    let (zh, zh2) = (spell("中"), spell("中").chars().take(2).collect::<String>());
    tokens.push(zh2.clone());
    types.push(GgufValue::I32(1));
    tokens.push("中".into());
    types.push(GgufValue::I32(1));
    let split = |s: &str, at: usize| {
        let (a, b) = s.split_at(s.char_indices().nth(at).unwrap().0);
        GgufValue::String(format!("{a} {b}"))
    };
    let mut w = GgufWriter::new();
    w.metadata("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
        .metadata("tokenizer.ggml.pre", GgufValue::String("smollm".into()))
        .metadata(
            "tokenizer.ggml.tokens",
            GgufValue::Array(tokens.iter().map(|t| GgufValue::String(t.clone())).collect()),
        )
        .metadata("tokenizer.ggml.token_type", GgufValue::Array(types))
        .metadata(
            "tokenizer.ggml.merges",
            GgufValue::Array(vec![GgufValue::String("Ġ h".into()), split(&zh2, 1), split(&zh, 2)]),
        )
        .metadata("tokenizer.ggml.eos_token_id", GgufValue::U32(257));
    let g = GgufFile::from_bytes(w.to_bytes()).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    assert!(!tok.add_bos_token());
    let ids = tok.encode(" h<|end|><think>中 12", true).unwrap();
    // The first 256 tokens are the byte symbols in byte order.
    let byte = |b: u8| u32::from(b);
    assert_eq!(ids, vec![256, 257, 258, 260, byte(b' '), byte(b'1'), byte(b'2')]);
    assert_eq!(tok.decode(&ids, false).unwrap(), " h<|end|><think>中 12");
    assert_eq!(tok.decode(&ids, true).unwrap(), " h<think>中 12");
    assert!(tok.is_special(257));
    assert!(!tok.is_special(258));
    assert_eq!(tok.eos_token_id(), Some(257));
}

#[test]
fn hf_dir_reads_config_and_templates() {
    let g = GgufFile::from_bytes(spm_gguf(&[]).to_bytes()).unwrap();
    let base = Tokenizer::from_gguf(&g).unwrap();
    let dir = std::env::temp_dir().join(format!("ironllm-tok-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    base.inner().save(dir.join("tokenizer.json"), false).unwrap();

    // A named template list, no BOS on encode, tokens given as AddedToken objects.
    let config = serde_json::json!({
        "add_bos_token": false,
        "bos_token": {"content": "<s>", "special": true},
        "eos_token": "</s>",
        "chat_template": [
            {"name": "default", "template": "default {{ messages }}"},
            {"name": "tool_use", "template": "tools {{ tools }}"}
        ]
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    assert!(!tok.add_bos_token());
    assert_eq!(tok.encode("hello", true).unwrap(), tok.encode("hello", false).unwrap());
    assert_eq!(tok.bos_token(), Some("<s>"));
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.chat_template(), Some("default {{ messages }}"));
    assert_eq!(tok.named_chat_template("tool_use"), Some("tools {{ tools }}"));

    // chat_template.jinja wins; without add_bos_token the tokenizer.json post-processor decides.
    let config = serde_json::json!({"bos_token": "<s>", "chat_template": "old"});
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("chat_template.jinja"), "new").unwrap();
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!(tok.chat_template(), Some("new"));
    assert!(tok.add_bos_token());
    assert_eq!(tok.encode("hello", true).unwrap()[0], 1);

    std::fs::write(dir.join("tokenizer_config.json"), "{ not json").unwrap();
    let err = Tokenizer::from_hf_dir(&dir).unwrap_err();
    assert!(matches!(err, TokenizerError::Json { .. }), "{err}");
    std::fs::remove_dir_all(&dir).ok();

    let err = Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json")).unwrap_err();
    assert!(matches!(err, TokenizerError::Io { .. }), "{err}");
}

#[test]
fn clean_up_matches_transformers() {
    assert_eq!(
        clean_up_tokenization("Hello , world ! I do n't know . It 's fine ?"),
        "Hello, world! I don't know. It's fine?"
    );
}
