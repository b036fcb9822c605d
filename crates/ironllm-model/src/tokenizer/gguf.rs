//! Rebuilding a model's Hugging Face tokenizer from GGUF metadata.
//!
//! A GGUF file carries no `tokenizer.json`, only llama.cpp's description of the vocabulary:
//! `tokenizer.ggml.model` (the algorithm), `.tokens`, `.scores`, `.token_type`, `.merges`, `.pre`
//! (which pre-tokenizer the vocabulary was trained with) and the special-token ids and flags. From
//! these we build a real `tokenizers::Tokenizer` — BPE model, pre-tokenizer, decoder and
//! post-processor — that must encode exactly like the original tokenizer:
//!
//! - `"gpt2"`: byte-level BPE from tokens and merges. The pre-tokenizer is picked by
//!   `tokenizer.ggml.pre`; getting it wrong gives plausible but different ids (SmolLM2's `smollm`
//!   splits every numeric character first, so `"  1"` and `"²"` tokenize differently without it).
//!   The table follows transformers' GGUF loader and llama.cpp's pre-type list; unknown pre-types
//!   fall back to the GPT-2 regex with a warning.
//! - `"llama"`: SentencePiece-style BPE with byte fallback (`<0xE4>` tokens) as in Llama 2 and
//!   Mistral. Merges come from the file, or are recovered from the vocabulary and scores the way
//!   transformers' `generate_merges` does. Spaces become `▁` and one `▁` is prepended to each run of
//!   text (after every special token too), which is what both sentencepiece's dummy prefix and
//!   llama.cpp do; the decoder turns `▁` back into spaces and strips the prepended one.
//!
//! Control and unknown tokens (types 3, 2) and the BOS/EOS/UNK/PAD tokens become special added
//! tokens and user-defined tokens (type 4) plain added tokens, so their text is matched whole. Byte tokens (type 6) stay ordinary vocabulary entries
//! that byte fallback uses, as in the original tokenizers.

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::{template_processor, Extras, Tokenizer, TokenizerError};
use crate::gguf::{GgufFile, GgufValue};

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Llama 3's split regex (also Falcon 3, DBRX, Smaug, Pixtral, ...): digits in groups of up to 3.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's split regex: every digit on its own.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-4o's split regex (also Llama 4): case-aware words, digits in groups of up to 3.
const GPT4O_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
/// Mistral's Tekken split regex: every digit on its own.
const TEKKEN_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
/// DeepSeek LLM's splits (llama.cpp's `deepseek-llm`), applied in order before byte-level.
const DEEPSEEK_LLM_SPLITS: [&str; 5] = [
    r"[\r\n]",
    r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
];

/// How the text is cut before byte-level BPE, by `tokenizer.ggml.pre`.
enum ByteLevelPre {
    /// GPT-2's own regex inside the ByteLevel pre-tokenizer.
    Gpt2,
    /// `Digits(individual)` then GPT-2's regex (SmolLM / SmolLM2).
    DigitsThenGpt2,
    /// One custom regex, then byte-level without its own regex.
    Regex(&'static str),
    /// DeepSeek LLM: several isolating splits and single digits, then byte-level without regex.
    DeepSeekLlm,
}

fn byte_level_pre(pre: Option<&str>) -> ByteLevelPre {
    match pre {
        None | Some("default") | Some("gpt2") | Some("gpt-2") => ByteLevelPre::Gpt2,
        Some("smollm") => ByteLevelPre::DigitsThenGpt2,
        Some(
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" | "dbrx"
            | "smaug-bpe",
        ) => ByteLevelPre::Regex(LLAMA3_SPLIT),
        Some("qwen2" | "deepseek-r1-qwen" | "megrez") => ByteLevelPre::Regex(QWEN2_SPLIT),
        Some("gpt-4o" | "llama4") => ByteLevelPre::Regex(GPT4O_SPLIT),
        Some("tekken") => ByteLevelPre::Regex(TEKKEN_SPLIT),
        Some("deepseek-llm") => ByteLevelPre::DeepSeekLlm,
        Some(other) => {
            tracing::warn!(
                pre = other,
                "unknown tokenizer.ggml.pre; using the GPT-2 pre-tokenizer, ids may differ from the original tokenizer"
            );
            ByteLevelPre::Gpt2
        }
    }
}

fn isolate(pattern: &str) -> Result<PreTokenizerWrapper, TokenizerError> {
    Split::new(SplitPattern::Regex(pattern.to_string()), SplitDelimiterBehavior::Isolated, false)
        .map(PreTokenizerWrapper::Split)
        .map_err(|source| TokenizerError::Build { what: format!("pre-tokenizer regex {pattern:?}"), source })
}

fn byte_level_pre_tokenizer(pre: ByteLevelPre) -> Result<PreTokenizerWrapper, TokenizerError> {
    // `add_prefix_space=false` everywhere: GGUF byte-level vocabularies never prepend a space.
    let with_regex = ByteLevel::new(false, true, true);
    let without_regex = ByteLevel::new(false, true, false);
    Ok(match pre {
        ByteLevelPre::Gpt2 => PreTokenizerWrapper::ByteLevel(with_regex),
        ByteLevelPre::DigitsThenGpt2 => PreTokenizerWrapper::Sequence(PreTokenizerSequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(with_regex),
        ])),
        ByteLevelPre::Regex(pattern) => PreTokenizerWrapper::Sequence(PreTokenizerSequence::new(vec![
            isolate(pattern)?,
            PreTokenizerWrapper::ByteLevel(without_regex),
        ])),
        ByteLevelPre::DeepSeekLlm => {
            let mut steps = DEEPSEEK_LLM_SPLITS.iter().map(|p| isolate(p)).collect::<Result<Vec<_>, _>>()?;
            steps.push(PreTokenizerWrapper::Digits(Digits::new(true)));
            steps.push(PreTokenizerWrapper::ByteLevel(without_regex));
            PreTokenizerWrapper::Sequence(PreTokenizerSequence::new(steps))
        }
    })
}

/// GPT-2's reversible byte-to-character map: printable bytes stand for themselves, the others are
/// shifted to U+0100 and up, so every byte string is spelled in visible characters.
fn bytes_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        map[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\u{FFFD}');
            next += 1;
            c
        };
    }
    map
}

/// Typed access to the tokenizer metadata, with errors that name the key.
struct Meta<'a> {
    g: &'a GgufFile,
}

impl<'a> Meta<'a> {
    fn wrong(key: &str, expected: &'static str, found: &GgufValue) -> TokenizerError {
        TokenizerError::GgufKeyType { key: key.to_string(), expected, found: found.type_name().to_string() }
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>, TokenizerError> {
        match self.g.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| Self::wrong(key, "a string", v)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, TokenizerError> {
        match self.g.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| Self::wrong(key, "a bool", v)),
        }
    }

    fn token_id(&self, key: &str, vocab_len: usize) -> Result<Option<u32>, TokenizerError> {
        let Some(v) = self.g.get(key) else {
            return Ok(None);
        };
        // Some converters write -1 (as i32) for "no such token".
        if v.as_i64() == Some(-1) {
            return Ok(None);
        }
        let id = v.as_u64().ok_or_else(|| Self::wrong(key, "a token id", v))?;
        if id >= vocab_len as u64 {
            return Err(TokenizerError::InvalidGguf {
                what: format!("{key} is {id}, but the vocabulary has {vocab_len} tokens"),
            });
        }
        Ok(Some(id as u32))
    }

    fn array(&self, key: &str) -> Result<Option<&'a [GgufValue]>, TokenizerError> {
        match self.g.get(key) {
            None => Ok(None),
            Some(v) => v.as_array().map(Some).ok_or_else(|| Self::wrong(key, "an array", v)),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>, TokenizerError> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| v.as_str().ok_or_else(|| Self::wrong(key, "an array of strings", v)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn numbers<T>(
        &self,
        key: &str,
        len: usize,
        f: impl Fn(&GgufValue) -> Option<T>,
    ) -> Result<Option<Vec<T>>, TokenizerError> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        if items.len() != len {
            return Err(TokenizerError::InvalidGguf {
                what: format!("{key} has {} entries for {len} tokens", items.len()),
            });
        }
        items
            .iter()
            .map(|v| f(v).ok_or_else(|| Self::wrong(key, "an array of numbers", v)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

impl Tokenizer {
    /// Rebuilds the model's tokenizer from a GGUF file's `tokenizer.*` metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        let meta = Meta { g };
        let model_key = "tokenizer.ggml.model";
        let model =
            meta.str(model_key)?.ok_or_else(|| TokenizerError::MissingGgufKey { key: model_key.to_string() })?;
        let tokens_key = "tokenizer.ggml.tokens";
        let tokens =
            meta.strings(tokens_key)?.ok_or_else(|| TokenizerError::MissingGgufKey { key: tokens_key.to_string() })?;
        if tokens.is_empty() || tokens.len() > u32::MAX as usize {
            return Err(TokenizerError::InvalidGguf { what: format!("{tokens_key} has {} tokens", tokens.len()) });
        }
        let token_types = meta.numbers("tokenizer.ggml.token_type", tokens.len(), GgufValue::as_i64)?;
        let merges = meta.strings("tokenizer.ggml.merges")?;
        let token_id = |key: &str| meta.token_id(key, tokens.len());
        let bos_id = token_id("tokenizer.ggml.bos_token_id")?;
        let eos_id = token_id("tokenizer.ggml.eos_token_id")?;
        let unk_id = token_id("tokenizer.ggml.unknown_token_id")?;
        let pad_id = token_id("tokenizer.ggml.padding_token_id")?;
        let is_spm = model == "llama";
        // llama.cpp (and transformers) add BOS for sentencepiece vocabularies that do not say.
        let add_bos = meta.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(is_spm);
        let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let token_of = |id: Option<u32>| id.map(|i| tokens[i as usize].to_string());

        let mut inner = match model {
            "gpt2" => {
                let pre = byte_level_pre(meta.str("tokenizer.ggml.pre")?);
                build_byte_level(&tokens, token_types.as_deref(), merges.as_deref(), pre)?
            }
            "llama" => {
                let scores = meta.numbers("tokenizer.ggml.scores", tokens.len(), |v| v.as_f64().map(|f| f as f32))?;
                let add_space_prefix = meta.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
                build_sentencepiece_bpe(
                    &tokens,
                    scores.as_deref(),
                    merges.as_deref(),
                    unk_id.map(|i| tokens[i as usize]),
                    add_space_prefix,
                )?
            }
            other => return Err(TokenizerError::UnsupportedGgufModel { model: other.to_string() }),
        };

        let named_special: Vec<u32> = [bos_id, eos_id, unk_id, pad_id].into_iter().flatten().collect();
        add_typed_tokens(&mut inner, &tokens, token_types.as_deref(), &named_special);

        let bos_token = token_of(bos_id);
        let eos_token = token_of(eos_id);
        let add_bos = add_bos && bos_token.is_some();
        let add_eos = add_eos && eos_token.is_some();
        if add_bos || add_eos {
            let processor = template_processor(
                &inner,
                add_bos.then_some(bos_token.as_deref()).flatten(),
                add_eos.then_some(eos_token.as_deref()).flatten(),
            )?;
            inner.with_post_processor(Some(processor));
        } else if !is_spm {
            // What a byte-level tokenizer.json carries: offsets only, no added tokens.
            inner.with_post_processor(Some(PostProcessorWrapper::ByteLevel(ByteLevel::new(true, false, true))));
        }

        // `tokenizer.chat_template` is the default; llama.cpp writes named ones as
        // `tokenizer.chat_template.<name>`.
        let chat_template = meta.str("tokenizer.chat_template")?.map(str::to_string);
        let mut named_chat_templates = std::collections::BTreeMap::new();
        for (key, value) in g.metadata.range("tokenizer.chat_template.".to_string()..) {
            let Some(name) = key.strip_prefix("tokenizer.chat_template.") else {
                break;
            };
            if let Some(t) = value.as_str() {
                named_chat_templates.insert(name.to_string(), t.to_string());
            }
        }

        let extras = Extras {
            bos_token,
            eos_token,
            unk_token: token_of(unk_id),
            pad_token: token_of(pad_id),
            add_bos_token: add_bos,
            add_eos_token: add_eos,
            chat_template,
            named_chat_templates,
            clean_up_tokenization_spaces: false,
        };
        Ok(Tokenizer::assemble(inner, extras))
    }
}

/// Splits a GGUF merge `"Ġ t"` into its pair.
fn parse_merges(merges: &[&str]) -> Result<Vec<(String, String)>, TokenizerError> {
    merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| TokenizerError::InvalidGguf {
                what: format!("merge #{i} {m:?} is not two tokens separated by a space"),
            })
        })
        .collect()
}

fn is_added_type(token_types: Option<&[i64]>, id: usize) -> bool {
    token_types.is_some_and(|t| matches!(t[id], TOKEN_TYPE_UNKNOWN | TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
}

/// Maps every token to its id. Later duplicates win, as in a Python dict built from the list (what
/// transformers does); a warning names them because one id then has no spelling.
fn vocab_from(spellings: impl Iterator<Item = String>) -> Vocab {
    let mut vocab = Vocab::default();
    let mut duplicates = 0usize;
    for (id, token) in spellings.enumerate() {
        if vocab.insert(token, id as u32).is_some() {
            duplicates += 1;
        }
    }
    if duplicates > 0 {
        tracing::warn!(duplicates, "GGUF vocabulary spells some tokens more than once");
    }
    vocab
}

fn build_byte_level(
    tokens: &[&str],
    token_types: Option<&[i64]>,
    merges: Option<&[&str]>,
    pre: ByteLevelPre,
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let alphabet = bytes_to_unicode();
    let in_alphabet: std::collections::HashSet<char> = alphabet.iter().copied().collect();
    // Byte-level vocabularies spell every token in the byte alphabet; some converters store plain
    // UTF-8 instead, so respell those (as transformers does). Added tokens keep their text: they
    // are matched in the raw input, and the byte-level decoder passes non-alphabet text through.
    let spellings = tokens.iter().enumerate().map(|(id, t)| {
        if is_added_type(token_types, id) || t.chars().all(|c| in_alphabet.contains(&c)) {
            t.to_string()
        } else {
            t.bytes().map(|b| alphabet[b as usize]).collect()
        }
    });
    let vocab = vocab_from(spellings);
    let merges = match merges {
        Some(m) => parse_merges(m)?,
        None => return Err(TokenizerError::MissingGgufKey { key: "tokenizer.ggml.merges".to_string() }),
    };
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|source| TokenizerError::Build {
        what: "byte-level BPE from GGUF tokens and merges".into(),
        source,
    })?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(byte_level_pre_tokenizer(pre)?));
    inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(true, true, true))));
    Ok(inner)
}

fn build_sentencepiece_bpe(
    tokens: &[&str],
    scores: Option<&[f32]>,
    merges: Option<&[&str]>,
    unk_token: Option<&str>,
    add_space_prefix: bool,
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let merges = match (merges, scores) {
        (Some(m), _) => parse_merges(m)?,
        (None, Some(s)) => merges_from_scores(tokens, s),
        (None, None) => {
            return Err(TokenizerError::MissingGgufKey {
                key: "tokenizer.ggml.scores (needed when there are no merges)".into(),
            })
        }
    };
    let vocab = vocab_from(tokens.iter().map(|t| t.to_string()));
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).fuse_unk(true).byte_fallback(true);
    if let Some(unk) = unk_token {
        builder = builder.unk_token(unk.to_string());
    }
    let bpe = builder
        .build()
        .map_err(|source| TokenizerError::Build { what: "sentencepiece BPE from GGUF tokens".into(), source })?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let build_err = |what: &str| {
        let what = what.to_string();
        move |source| TokenizerError::Build { what, source }
    };
    if add_space_prefix {
        // Sentencepiece's dummy prefix, applied to each run of text between special tokens (as
        // llama.cpp does), then spaces as `▁`. A Metaspace pre-tokenizer would skip the prefix
        // when the text already starts with a space and after special tokens.
        inner.with_normalizer(Some(NormalizerSequence::new(vec![
            Prepend::new("▁".to_string()).into(),
            Replace::new(" ", "▁").map_err(build_err("▁ normalizer"))?.into(),
        ])));
    } else {
        inner.with_normalizer(Some(Replace::new(" ", "▁").map_err(build_err("▁ normalizer"))?));
    }
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ").map_err(build_err("▁ decoder"))?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(inner)
}

/// transformers' `generate_merges` for a vocabulary with scores: every way of cutting a token into
/// two tokens is a merge with the whole token's score; higher scores merge first, ties broken by
/// longer left then longer right piece, then by vocabulary order.
pub(super) fn merges_from_scores(tokens: &[&str], scores: &[f32]) -> Vec<(String, String)> {
    // Later duplicates win, as in the Python dicts the reference builds.
    let mut id_of: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut score_of: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (id, (&t, &s)) in tokens.iter().zip(scores).enumerate() {
        if id_of.insert(t, id).is_none() {
            order.push(t);
        }
        score_of.insert(t, s);
    }
    struct Candidate<'t> {
        left: &'t str,
        right: &'t str,
        score: f32,
        left_chars: usize,
        right_chars: usize,
    }
    let mut candidates = Vec::new();
    for &token in &order {
        let score = score_of[token];
        let mut local: Vec<Candidate> = token
            .char_indices()
            .skip(1)
            .filter_map(|(i, _)| {
                let (left, right) = token.split_at(i);
                (id_of.contains_key(left) && id_of.contains_key(right)).then(|| Candidate {
                    left,
                    right,
                    score,
                    left_chars: left.chars().count(),
                    right_chars: right.chars().count(),
                })
            })
            .collect();
        local.sort_by_key(|c| (id_of[c.left], id_of[c.right]));
        candidates.extend(local);
    }
    // A stable sort on the reversed comparison keeps equal keys in their original order, exactly
    // like Python's `sorted(..., reverse=True)`.
    candidates.sort_by(|a, b| {
        b.score.total_cmp(&a.score).then(b.left_chars.cmp(&a.left_chars)).then(b.right_chars.cmp(&a.right_chars))
    });
    candidates.into_iter().map(|c| (c.left.to_string(), c.right.to_string())).collect()
}

/// Control and unknown-type tokens, and the tokens named as BOS/EOS/UNK/PAD, become special added
/// tokens (transformers registers the named ones as special too); user-defined tokens become plain
/// added tokens. None is normalized, so their text is matched exactly as written.
fn add_typed_tokens(
    inner: &mut tokenizers::Tokenizer,
    tokens: &[&str],
    token_types: Option<&[i64]>,
    named_special: &[u32],
) {
    let mut special = Vec::new();
    let mut user_defined = Vec::new();
    for (id, &token) in tokens.iter().enumerate() {
        if token.is_empty() {
            continue;
        }
        let ty = token_types.map(|t| t[id]);
        if ty == Some(TOKEN_TYPE_CONTROL) || ty == Some(TOKEN_TYPE_UNKNOWN) || named_special.contains(&(id as u32)) {
            special.push(AddedToken::from(token.to_string(), true).normalized(false));
        } else if ty == Some(TOKEN_TYPE_USER_DEFINED) {
            user_defined.push(AddedToken::from(token.to_string(), false).normalized(false));
        }
    }
    inner.add_special_tokens(&special);
    inner.add_tokens(&user_defined);
}
