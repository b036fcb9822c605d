//! Tokenizers: text to token ids and back, built on Hugging Face's `tokenizers` crate.
//!
//! A [`Tokenizer`] wraps a real `tokenizers::Tokenizer` plus what the engine needs beside it: the
//! special tokens (BOS/EOS/UNK/PAD and which ids are special), whether BOS/EOS are added on encode,
//! and the model's chat template. It is built from
//! - a Hugging Face directory ([`Tokenizer::from_hf_dir`]): `tokenizer.json` with
//!   `tokenizer_config.json`, `special_tokens_map.json` and `chat_template.jinja` when present, read
//!   the way transformers reads them;
//! - a bare `tokenizer.json` ([`Tokenizer::from_file`]);
//! - a GGUF file's metadata ([`Tokenizer::from_gguf`], in `gguf.rs`), rebuilt so that it encodes
//!   exactly like the model's original Hugging Face tokenizer.
//!
//! The invariant: ids out of [`Tokenizer::encode`] are the ids transformers gives for the same text
//! and `add_special_tokens` flag, and [`Tokenizer::decode`] returns transformers' `decode` string.
//! `tests/fixtures/tokenizer/parity.json` holds the reference values this is checked against.

mod gguf;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::processors::template::{SpecialToken, TemplateProcessing, Tokens};
use tokenizers::AddedToken;

/// A tokenizer and the special-token facts the engine, the detokenizer and chat templates need.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    unk_token: Option<String>,
    pad_token: Option<String>,
    add_bos_token: bool,
    add_eos_token: bool,
    /// The default chat template (the one named "default" when the config lists several).
    chat_template: Option<String>,
    /// Every named template (`tool_use`, `rag`, ...) including "default" when names were given.
    named_chat_templates: BTreeMap<String, String>,
    /// transformers' `clean_up_tokenization_spaces`: undo " ." / " n't" spacing after decode.
    clean_up_tokenization_spaces: bool,
    /// Ids of added tokens flagged special; `decode(.., skip_special_tokens=true)` drops these.
    special_ids: HashSet<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("add_bos_token", &self.add_bos_token)
            .field("add_eos_token", &self.add_eos_token)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// The parts of a tokenizer that are not in `tokenizers::Tokenizer` itself.
#[derive(Debug, Clone, Default)]
struct Extras {
    bos_token: Option<String>,
    eos_token: Option<String>,
    unk_token: Option<String>,
    pad_token: Option<String>,
    add_bos_token: bool,
    add_eos_token: bool,
    chat_template: Option<String>,
    named_chat_templates: BTreeMap<String, String>,
    clean_up_tokenization_spaces: bool,
}

impl Tokenizer {
    fn assemble(inner: tokenizers::Tokenizer, extras: Extras) -> Tokenizer {
        let special_ids =
            inner.get_added_tokens_decoder().into_iter().filter(|(_, t)| t.special).map(|(id, _)| id).collect();
        Tokenizer {
            inner,
            bos_token: extras.bos_token,
            eos_token: extras.eos_token,
            unk_token: extras.unk_token,
            pad_token: extras.pad_token,
            add_bos_token: extras.add_bos_token,
            add_eos_token: extras.add_eos_token,
            chat_template: extras.chat_template,
            named_chat_templates: extras.named_chat_templates,
            clean_up_tokenization_spaces: extras.clean_up_tokenization_spaces,
            special_ids,
        }
    }

    /// A Hugging Face tokenizer directory: `tokenizer.json`, and when present `tokenizer_config.json`
    /// (special tokens, `add_bos_token`/`add_eos_token`, `added_tokens_decoder`, `chat_template` as a
    /// string or a list of `{name, template}`), `special_tokens_map.json` and `chat_template.jinja`
    /// (which wins over the config's template, as in transformers).
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer, TokenizerError> {
        let mut inner = load_tokenizer_json(&dir.join("tokenizer.json"))?;
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_if_exists(&config_path)?.unwrap_or(Value::Null);
        let special_map = read_json_if_exists(&dir.join("special_tokens_map.json"))?.unwrap_or(Value::Null);

        // Tokens the config declares but tokenizer.json lacks (old repos keep them only in the config).
        if let Some(decoder) = config.get("added_tokens_decoder").and_then(Value::as_object) {
            let mut missing = Vec::new();
            for (id, token) in decoder {
                let Some(content) = token.get("content").and_then(Value::as_str) else {
                    continue;
                };
                if inner.token_to_id(content).is_none() {
                    let special = token.get("special").and_then(Value::as_bool).unwrap_or(false);
                    let flag = |k: &str, default: bool| token.get(k).and_then(Value::as_bool).unwrap_or(default);
                    tracing::debug!(id = %id, content, "adding a token declared only in tokenizer_config.json");
                    missing.push(
                        AddedToken::from(content.to_string(), special)
                            .single_word(flag("single_word", false))
                            .lstrip(flag("lstrip", false))
                            .rstrip(flag("rstrip", false))
                            .normalized(flag("normalized", !special)),
                    );
                }
            }
            // transformers adds special and non-special ones alike through the same path.
            for token in missing {
                if token.special {
                    inner.add_special_tokens(&[token]);
                } else {
                    inner.add_tokens(&[token]);
                }
            }
        }

        let special = |key: &str| {
            config.get(key).and_then(token_content).or_else(|| special_map.get(key).and_then(token_content))
        };
        let mut extras = Extras {
            bos_token: special("bos_token"),
            eos_token: special("eos_token"),
            unk_token: special("unk_token"),
            pad_token: special("pad_token"),
            clean_up_tokenization_spaces: config
                .get("clean_up_tokenization_spaces")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            ..Extras::default()
        };

        // transformers (v5) rebuilds the post-processor from add_bos_token/add_eos_token only when
        // the config states one of them or tokenizer.json has no post-processor; otherwise the
        // post-processor in tokenizer.json decides what encode adds.
        let add_bos = config.get("add_bos_token").and_then(Value::as_bool);
        let add_eos = config.get("add_eos_token").and_then(Value::as_bool);
        if add_bos.is_some() || add_eos.is_some() || inner.get_post_processor().is_none() {
            extras.add_bos_token = add_bos.unwrap_or(false);
            extras.add_eos_token = add_eos.unwrap_or(false);
            let processor = template_processor(
                &inner,
                extras.add_bos_token.then_some(extras.bos_token.as_deref()).flatten(),
                extras.add_eos_token.then_some(extras.eos_token.as_deref()).flatten(),
            )?;
            inner.with_post_processor(Some(processor));
        } else {
            // Report what tokenizer.json's post-processor does, by asking it.
            let probe = inner.encode_fast("", true).map_err(|source| TokenizerError::Encode { source })?;
            let ids = probe.get_ids();
            let bos_id = extras.bos_token.as_deref().and_then(|t| inner.token_to_id(t));
            let eos_id = extras.eos_token.as_deref().and_then(|t| inner.token_to_id(t));
            extras.add_bos_token = bos_id.is_some() && ids.first().copied() == bos_id;
            extras.add_eos_token = eos_id.is_some() && ids.last().copied() == eos_id;
        }

        match config.get("chat_template") {
            Some(Value::String(t)) => extras.chat_template = Some(t.clone()),
            Some(Value::Array(list)) => {
                for entry in list {
                    if let (Some(name), Some(template)) =
                        (entry.get("name").and_then(Value::as_str), entry.get("template").and_then(Value::as_str))
                    {
                        extras.named_chat_templates.insert(name.to_string(), template.to_string());
                    }
                }
                extras.chat_template = extras.named_chat_templates.get("default").cloned();
            }
            Some(Value::Null) | None => {}
            Some(other) => {
                return Err(TokenizerError::Config {
                    path: config_path,
                    what: format!("chat_template must be a string or a list of {{name, template}}, got {other}"),
                })
            }
        }
        // Newer repos keep the template in its own file, which takes precedence.
        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.exists() {
            let t = std::fs::read_to_string(&jinja_path)
                .map_err(|source| TokenizerError::Io { path: jinja_path.clone(), source })?;
            extras.chat_template = Some(t);
        } else if let Some(v) = read_json_if_exists(&dir.join("chat_template.json"))? {
            // Processor-style repos: {"chat_template": "..."}.
            if let Some(t) = v.get("chat_template").and_then(Value::as_str) {
                extras.chat_template = Some(t.to_string());
            }
        }
        Ok(Tokenizer::assemble(inner, extras))
    }

    /// A bare `tokenizer.json`: no config, so special tokens are only what the file itself says and
    /// there is no chat template. BOS/EOS are whatever the file's post-processor adds.
    pub fn from_file(path: &Path) -> Result<Tokenizer, TokenizerError> {
        let inner = load_tokenizer_json(path)?;
        Ok(Tokenizer::assemble(inner, Extras::default()))
    }

    /// Wraps an already-built `tokenizers::Tokenizer` with explicit special-token facts.
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        bos_token: Option<String>,
        eos_token: Option<String>,
        chat_template: Option<String>,
    ) -> Tokenizer {
        Tokenizer::assemble(inner, Extras { bos_token, eos_token, chat_template, ..Extras::default() })
    }

    /// Token ids for `text`. With `add_special_tokens` the post-processor adds BOS/EOS as the model's
    /// tokenizer does; special-token text such as `<|im_start|>` is always matched as one token.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding =
            self.inner.encode_fast(text, add_special_tokens).map_err(|source| TokenizerError::Encode { source })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text for `ids`. Unknown ids are skipped (as `tokenizers` does).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        let text = self.inner.decode(ids, skip_special_tokens).map_err(|source| TokenizerError::Decode { source })?;
        Ok(if self.clean_up_tokenization_spaces { clean_up_tokenization(&text) } else { text })
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether `id` is an added token flagged special (skipped by `skip_special_tokens`).
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// Ids of every special added token.
    pub fn special_ids(&self) -> &HashSet<u32> {
        &self.special_ids
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn unk_token(&self) -> Option<&str> {
        self.unk_token.as_deref()
    }

    pub fn pad_token(&self) -> Option<&str> {
        self.pad_token.as_deref()
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Whether `encode(.., add_special_tokens=true)` starts with BOS.
    pub fn add_bos_token(&self) -> bool {
        self.add_bos_token
    }

    /// Whether `encode(.., add_special_tokens=true)` ends with EOS.
    pub fn add_eos_token(&self) -> bool {
        self.add_eos_token
    }

    /// The default chat template source, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// A named chat template (`"tool_use"`, `"rag"`, ...), when the config lists several.
    pub fn named_chat_template(&self, name: &str) -> Option<&str> {
        self.named_chat_templates.get(name).map(String::as_str)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// A post-processor that adds `bos` before and `eos` after each sequence (either may be absent), as
/// transformers' `update_post_processor` builds it. Token names go through the special-token table
/// rather than the template string, so contents with spaces or colons are safe.
fn template_processor(
    inner: &tokenizers::Tokenizer,
    bos: Option<&str>,
    eos: Option<&str>,
) -> Result<TemplateProcessing, TokenizerError> {
    let resolve = |token: Option<&str>| -> Option<(String, u32)> {
        let token = token?;
        match inner.token_to_id(token) {
            Some(id) => Some((token.to_string(), id)),
            None => {
                tracing::warn!(token, "special token to add is not in the vocabulary; not adding it");
                None
            }
        }
    };
    let (bos, eos) = (resolve(bos), resolve(eos));
    let mut special = Vec::new();
    for (name, resolved) in [("BOS", &bos), ("EOS", &eos)] {
        if let Some((token, id)) = resolved {
            let entry = SpecialToken::new(name.to_string(), vec![*id], vec![token.clone()])
                .map_err(|source| TokenizerError::Build { what: format!("{name} special token"), source })?;
            special.push(entry);
        }
    }
    let bos = bos.map(|_| "BOS");
    let eos = eos.map(|_| "EOS");
    let join = |parts: Vec<String>| parts.join(" ");
    let mut single = Vec::new();
    let mut pair = Vec::new();
    if let Some(b) = &bos {
        single.push(format!("{b}:0"));
        pair.push(format!("{b}:0"));
    }
    single.push("$A:0".to_string());
    pair.push("$A:0".to_string());
    if let Some(e) = &eos {
        single.push(format!("{e}:0"));
        pair.push(format!("{e}:0"));
    }
    if let Some(b) = &bos {
        pair.push(format!("{b}:1"));
    }
    pair.push("$B:1".to_string());
    if let Some(e) = &eos {
        pair.push(format!("{e}:1"));
    }
    let build_err = |what: &str, e: String| TokenizerError::Build { what: what.to_string(), source: e.into() };
    TemplateProcessing::builder()
        .try_single(join(single))
        .map_err(|e| build_err("post-processor template", e))?
        .try_pair(join(pair))
        .map_err(|e| build_err("post-processor pair template", e))?
        .special_tokens(Tokens::from(special))
        .build()
        .map_err(|e| build_err("post-processor", e.to_string()))
}

/// The content of a special-token entry: a plain string or an `AddedToken` object.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn load_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })?;
    tokenizers::Tokenizer::from_bytes(&bytes)
        .map_err(|source| TokenizerError::Load { path: path.to_path_buf(), source })
}

fn read_json_if_exists(path: &Path) -> Result<Option<Value>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(TokenizerError::Io { path: path.to_path_buf(), source }),
    };
    serde_json::from_str(&text).map(Some).map_err(|source| TokenizerError::Json { path: path.to_path_buf(), source })
}

/// transformers' `clean_up_tokenization`: removes the spaces that old word-level tokenizers put
/// before punctuation and English contractions.
fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

/// Everything that can go wrong loading a tokenizer or running it.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot load tokenizer {path}: {source}")]
    Load {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    #[error("{path}: {what}")]
    Config { path: PathBuf, what: String },
    #[error("GGUF tokenizer: metadata key {key:?} is missing")]
    MissingGgufKey { key: String },
    #[error("GGUF tokenizer: metadata {key:?} should be {expected}, found {found}")]
    GgufKeyType { key: String, expected: &'static str, found: String },
    #[error("GGUF tokenizer: {what}")]
    InvalidGguf { what: String },
    #[error("GGUF tokenizer model {model:?} is not supported (supported: \"gpt2\", \"llama\")")]
    UnsupportedGgufModel { model: String },
    #[error("cannot build tokenizer ({what}): {source}")]
    Build {
        what: String,
        #[source]
        source: tokenizers::Error,
    },
    #[error("tokenizer encode failed: {source}")]
    Encode {
        #[source]
        source: tokenizers::Error,
    },
    #[error("tokenizer decode failed: {source}")]
    Decode {
        #[source]
        source: tokenizers::Error,
    },
}

#[cfg(test)]
mod tests;
