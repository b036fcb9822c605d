//! Structured output with llguidance: compiling a request's constraint (JSON schema, regex, choice,
//! Lark grammar) for this model's tokenizer, and the per-sequence matcher the CPU runner drives.
//!
//! [`StructuredOutputCompiler`] is built once per tokenizer (the token trie and llguidance's
//! `ParserFactory`), lives on the frontend side and compiles each distinct constraint once: results are
//! kept in an LRU keyed by the constraint and its options (the tokenizer is fixed per compiler), so a
//! repeated schema costs a map lookup. Compilation runs on its own thread with a time limit, so a
//! pathological schema fails with a clear error instead of holding a request handler forever; it never
//! runs on the engine thread. The compiled form is llguidance's fresh `TokenParser`; each sequence gets
//! a clone of it wrapped in a `Matcher` ([`LlgMatcher`]), whose state advances with every sampled token
//! and can be rolled back.

use std::collections::{HashMap, VecDeque};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use ironllm_core::structured::{
    CompiledGrammar, GrammarHandle, GrammarMatcher, StructuredConstraint, StructuredOutputsParams,
};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde_json::{json, Value};

use crate::tokenizer::Tokenizer;

/// Compiled constraints kept per compiler (vLLM's guidance backend keeps a similar cache).
pub const DEFAULT_CACHE_CAPACITY: usize = 256;
/// vLLM-like default for the compile time limit.
pub const DEFAULT_COMPILE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a constraint did not compile. The message names the request field and carries the parser's own
/// words, so it can go back to the client as a 400.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StructuredError {
    #[error("Invalid {what} in `{field}`: {message}")]
    Invalid { field: String, what: &'static str, message: String },
    #[error("Compiling `{field}` took longer than the {secs}s limit (--structured-outputs-compile-timeout)")]
    Timeout { field: String, secs: f64 },
    #[error("structured output is unavailable for this tokenizer: {0}")]
    Tokenizer(String),
}

/// The tokenizer as llguidance sees it: token bytes in a trie, and our tokenizer for forced text.
struct IronTokEnv {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for IronTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        // Grammar-forced text is plain bytes; invalid UTF-8 tails fall back to greedy trie tokens.
        match std::str::from_utf8(s) {
            Ok(text) => match self.tokenizer.encode(text, false) {
                Ok(ids) => ids,
                Err(_) => self.trie.greedy_tokenize(s),
            },
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// Compiles constraints for one tokenizer, with an LRU of results and a time limit.
pub struct StructuredOutputCompiler {
    factory: Arc<ParserFactory>,
    vocab_size: usize,
    timeout: Duration,
    cache: Mutex<Lru>,
}

impl std::fmt::Debug for StructuredOutputCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StructuredOutputCompiler").field("vocab_size", &self.vocab_size).finish()
    }
}

impl StructuredOutputCompiler {
    /// Builds the token trie for `tokenizer` with `vocab_size` rows of logits (ids past the tokenizer's
    /// vocabulary are never allowed) and `eos_token_ids` as the tokens that end a complete output.
    pub fn new(
        tokenizer: &Tokenizer,
        vocab_size: usize,
        eos_token_ids: &[u32],
        timeout: Duration,
    ) -> Result<StructuredOutputCompiler, StructuredError> {
        let tok_json: Value = serde_json::from_str(
            &tokenizer.inner().to_string(false).map_err(|e| StructuredError::Tokenizer(e.to_string()))?,
        )
        .map_err(|e| StructuredError::Tokenizer(e.to_string()))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&tok_json)
            .map_err(|e| StructuredError::Tokenizer(e.to_string()))?;
        words.resize(vocab_size, Vec::new());
        let eos = eos_token_ids
            .first()
            .copied()
            .or_else(|| tokenizer.eos_token_id())
            .ok_or_else(|| StructuredError::Tokenizer("the model has no EOS token".into()))?;
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let mut trie = TokTrie::from(&info, &words);
        if eos_token_ids.len() > 1 {
            trie = trie.with_eos_tokens(eos_token_ids);
        }
        let env: TokEnv = Arc::new(IronTokEnv { trie, tokenizer: tokenizer.clone() });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| StructuredError::Tokenizer(e.to_string()))?;
        factory.quiet();
        Ok(StructuredOutputCompiler {
            factory: Arc::new(factory),
            vocab_size,
            timeout,
            cache: Mutex::new(Lru::new(DEFAULT_CACHE_CAPACITY)),
        })
    }

    /// The width of the logits rows the masks cover.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Whether this constraint is already compiled (a cache hit costs no compile time).
    pub fn is_cached(&self, params: &StructuredOutputsParams) -> bool {
        self.cache.lock().expect("cache lock").peek(&cache_key(params))
    }

    /// Compiles (or finds in the cache) a request's constraint.
    pub fn compile(&self, params: &StructuredOutputsParams) -> Result<GrammarHandle, StructuredError> {
        let key = cache_key(params);
        if let Some(hit) = self.cache.lock().expect("cache lock").get(&key) {
            return Ok(hit);
        }
        let field = params.field_name();
        let grammar = to_grammar(params)?;
        let what = what_of(&params.constraint);
        let factory = Arc::clone(&self.factory);
        let (tx, rx) = mpsc::channel();
        // A thread per cache miss: misses are rare, and a compile that runs past the limit is
        // abandoned (its result dropped) without blocking anyone.
        std::thread::Builder::new()
            .name("ironllm-grammar".into())
            .spawn(move || {
                let result = factory.create_parser(grammar).map_err(|e| e.to_string());
                let _ = tx.send(result);
            })
            .map_err(|e| StructuredError::Tokenizer(format!("cannot start a compile thread: {e}")))?;
        let parser = match rx.recv_timeout(self.timeout) {
            Ok(Ok(parser)) => parser,
            Ok(Err(message)) => return Err(StructuredError::Invalid { field, what, message }),
            Err(_) => return Err(StructuredError::Timeout { field, secs: self.timeout.as_secs_f64() }),
        };
        let handle = GrammarHandle(Arc::new(LlgGrammar { parser: Mutex::new(parser) }));
        self.cache.lock().expect("cache lock").put(key, handle.clone());
        Ok(handle)
    }
}

fn what_of(c: &StructuredConstraint) -> &'static str {
    match c {
        StructuredConstraint::Json(_) | StructuredConstraint::JsonObject => "JSON schema",
        StructuredConstraint::Regex(_) => "regex",
        StructuredConstraint::Choice(_) => "choice",
        StructuredConstraint::Grammar(_) => "grammar",
    }
}

fn cache_key(params: &StructuredOutputsParams) -> String {
    let c = serde_json::to_string(&params.constraint).unwrap_or_default();
    format!("{}|{}|{c}", params.disable_any_whitespace as u8, params.disable_additional_properties as u8)
}

/// The llguidance grammar for a constraint, with vLLM's options applied.
fn to_grammar(params: &StructuredOutputsParams) -> Result<TopLevelGrammar, StructuredError> {
    Ok(match &params.constraint {
        StructuredConstraint::Json(schema) => {
            let mut schema = schema.clone();
            if params.disable_additional_properties {
                close_objects(&mut schema);
            }
            TopLevelGrammar::from_json_schema(with_json_options(schema, params.disable_any_whitespace))
        }
        StructuredConstraint::JsonObject => TopLevelGrammar::from_json_schema(with_json_options(
            json!({"type": "object"}),
            params.disable_any_whitespace,
        )),
        StructuredConstraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
        StructuredConstraint::Choice(choices) => {
            let alternatives: Vec<String> = choices.iter().map(|c| escape_regex(c)).collect();
            TopLevelGrammar::from_regex(&format!("(?:{})", alternatives.join("|")))
        }
        StructuredConstraint::Grammar(text) => TopLevelGrammar::from_lark(text.clone()),
    })
}

/// JSON layout: one line with ", " and ": " separators, or no whitespace at all with
/// `disable_any_whitespace`. We do not allow free whitespace: a small model given the choice often
/// emits newlines until it runs out of tokens, which leaves truncated JSON.
fn with_json_options(mut schema: Value, disable_any_whitespace: bool) -> Value {
    let (item, key) = if disable_any_whitespace { (",", ":") } else { (", ", ": ") };
    if let Value::Bool(b) = schema {
        schema = if b { json!({}) } else { json!({"not": {}}) };
    }
    if let Some(obj) = schema.as_object_mut() {
        obj.entry("x-guidance")
            .or_insert_with(|| json!({"item_separator": item, "key_separator": key, "whitespace_flexible": false}));
    }
    schema
}

/// `additionalProperties: false` on every object schema that does not set it (vLLM's
/// `disable_additional_properties`).
fn close_objects(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let is_object = map.get("type").is_some_and(|t| t == "object") || map.contains_key("properties");
            if is_object && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            for (key, value) in map.iter_mut() {
                if key != "enum" && key != "const" && key != "default" && key != "examples" {
                    close_objects(value);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

/// Escapes regex metacharacters so a choice matches literally.
fn escape_regex(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~/".contains(c) {
            out.push('\\');
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

/// A compiled constraint: llguidance's fresh parser, cloned for each sequence.
struct LlgGrammar {
    parser: Mutex<TokenParser>,
}

impl CompiledGrammar for LlgGrammar {
    fn new_matcher(&self) -> Box<dyn GrammarMatcher> {
        let parser = self.parser.lock().expect("parser lock").clone();
        Box::new(LlgMatcher { matcher: Matcher::new(Ok(parser)) })
    }
}

/// One sequence's matcher.
pub struct LlgMatcher {
    matcher: Matcher,
}

impl GrammarMatcher for LlgMatcher {
    fn fill_next_token_bitmask(&mut self, bitmask: &mut [u32]) {
        bitmask.fill(0);
        match self.matcher.compute_mask_or_eos() {
            Ok(mask) => {
                let words = mask.as_slice();
                let n = words.len().min(bitmask.len());
                bitmask[..n].copy_from_slice(&words[..n]);
            }
            Err(e) => {
                tracing::warn!("structured output matcher failed, ending the sequence: {e}");
                if let Ok(env) = self.matcher.tok_env() {
                    for &eos in env.tok_trie().eos_tokens() {
                        if let Some(w) = bitmask.get_mut(eos as usize / 32) {
                            *w |= 1 << (eos % 32);
                        }
                    }
                }
            }
        }
    }

    fn accept_token(&mut self, token_id: u32) -> bool {
        if self.matcher.is_stopped() {
            return false;
        }
        self.matcher.consume_token(token_id).is_ok()
    }

    fn is_terminated(&self) -> bool {
        self.matcher.is_stopped()
    }

    fn rollback(&mut self, num_tokens: usize) -> bool {
        self.matcher.rollback(num_tokens).is_ok()
    }
}

/// A small LRU: a map plus a queue of keys in use order (capacity is small, so the linear queue
/// update is cheaper than a linked structure).
struct Lru {
    capacity: usize,
    map: HashMap<String, GrammarHandle>,
    order: VecDeque<String>,
}

impl Lru {
    fn new(capacity: usize) -> Lru {
        Lru { capacity, map: HashMap::new(), order: VecDeque::new() }
    }

    fn peek(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    fn get(&mut self, key: &str) -> Option<GrammarHandle> {
        let hit = self.map.get(key)?.clone();
        self.touch(key);
        Some(hit)
    }

    fn touch(&mut self, key: &str) {
        if let Some(pos) = self.order.iter().position(|k| k == key) {
            let k = self.order.remove(pos).expect("position is in range");
            self.order.push_back(k);
        }
    }

    fn put(&mut self, key: String, value: GrammarHandle) {
        if self.map.insert(key.clone(), value).is_some() {
            self.touch(&key);
            return;
        }
        self.order.push_back(key);
        while self.map.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_are_escaped_literally() {
        assert_eq!(escape_regex("a.b(c)"), "a\\.b\\(c\\)");
    }

    #[test]
    fn close_objects_marks_nested_objects() {
        let mut s = json!({"type": "object", "properties": {"a": {"type": "object", "properties": {}}}});
        close_objects(&mut s);
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["properties"]["a"]["additionalProperties"], false);
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        struct Nothing;
        impl CompiledGrammar for Nothing {
            fn new_matcher(&self) -> Box<dyn GrammarMatcher> {
                unreachable!()
            }
        }
        let h = || GrammarHandle(Arc::new(Nothing));
        let mut lru = Lru::new(2);
        lru.put("a".into(), h());
        lru.put("b".into(), h());
        assert!(lru.get("a").is_some());
        lru.put("c".into(), h());
        assert!(lru.peek("a") && lru.peek("c") && !lru.peek("b"));
    }
}
