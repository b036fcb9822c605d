//! Structured output as the engine core sees it: what a request asks for ([`StructuredOutputsParams`])
//! and the seam to whatever compiles and runs grammars ([`CompiledGrammar`], [`GrammarMatcher`]).
//!
//! The core knows no grammar library. The frontend compiles a request's constraint once (off the engine
//! thread, cached) into a [`GrammarHandle`] that travels inside `SamplingParams`; the model runner asks
//! it for one [`GrammarMatcher`] per sequence, which yields a token bitmask each step and advances with
//! every accepted token. This is the seam vLLM V1 has between its structured-output manager and the
//! backends (xgrammar, guidance), without the scheduler-side bitmask: our runner computes the masks.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::CoreError;

/// One kind of constraint; exactly one per request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StructuredConstraint {
    /// Output is JSON valid under this JSON schema.
    Json(serde_json::Value),
    /// Output is any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// Output matches this regular expression (the whole output).
    Regex(String),
    /// Output is exactly one of these strings.
    Choice(Vec<String>),
    /// Output is a sentence of this grammar (Lark syntax, as llguidance accepts it).
    Grammar(String),
}

impl StructuredConstraint {
    /// The vLLM `structured_outputs` key of this kind (used in error messages and cache keys).
    pub fn kind(&self) -> &'static str {
        match self {
            StructuredConstraint::Json(_) => "json",
            StructuredConstraint::JsonObject => "json_object",
            StructuredConstraint::Regex(_) => "regex",
            StructuredConstraint::Choice(_) => "choice",
            StructuredConstraint::Grammar(_) => "grammar",
        }
    }
}

/// A request's structured-output constraint with vLLM's options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StructuredOutputsParams {
    pub constraint: StructuredConstraint,
    /// JSON without any whitespace between tokens (vLLM's `disable_any_whitespace`).
    #[serde(default)]
    pub disable_any_whitespace: bool,
    /// Objects of a JSON schema that do not say otherwise get `additionalProperties: false`.
    #[serde(default)]
    pub disable_additional_properties: bool,
    /// The request field the constraint came from (`response_format`, `structured_outputs.json`,
    /// `guided_regex`, `tools`, ...), named in error messages.
    #[serde(default)]
    pub field: String,
}

impl StructuredOutputsParams {
    pub fn new(constraint: StructuredConstraint) -> Self {
        let field = format!("structured_outputs.{}", constraint.kind());
        StructuredOutputsParams {
            constraint,
            disable_any_whitespace: false,
            disable_additional_properties: false,
            field,
        }
    }

    pub fn json(schema: serde_json::Value) -> Self {
        Self::new(StructuredConstraint::Json(schema))
    }

    pub fn regex(regex: impl Into<String>) -> Self {
        Self::new(StructuredConstraint::Regex(regex.into()))
    }

    pub fn choice<S: Into<String>>(choices: impl IntoIterator<Item = S>) -> Self {
        Self::new(StructuredConstraint::Choice(choices.into_iter().map(Into::into).collect()))
    }

    pub fn grammar(grammar: impl Into<String>) -> Self {
        Self::new(StructuredConstraint::Grammar(grammar.into()))
    }

    /// The field to name in messages: the one the request used, else the `structured_outputs` key.
    pub fn field_name(&self) -> String {
        if self.field.is_empty() {
            format!("structured_outputs.{}", self.constraint.kind())
        } else {
            self.field.clone()
        }
    }

    /// Checks what can be checked without compiling: non-empty choices, regex and grammar text, and a
    /// JSON schema that is an object or a boolean. Compilation reports the rest (parser messages).
    pub fn validate(&self) -> Result<(), CoreError> {
        let field = self.field_name();
        let bad = |msg: String| Err(CoreError::InvalidParams(msg));
        match &self.constraint {
            StructuredConstraint::Choice(choices) if choices.is_empty() => {
                bad(format!("`{field}` must contain at least one choice, got an empty list."))
            }
            StructuredConstraint::Regex(r) if r.is_empty() => bad(format!("`{field}` must not be an empty regex.")),
            StructuredConstraint::Grammar(g) if g.trim().is_empty() => {
                bad(format!("`{field}` must not be an empty grammar."))
            }
            StructuredConstraint::Json(schema) if !(schema.is_object() || schema.is_boolean()) => {
                bad(format!("`{field}` must be a JSON schema (an object), got {schema}."))
            }
            _ => Ok(()),
        }
    }
}

/// A compiled constraint, shared by every request (and child sequence) that uses it.
pub trait CompiledGrammar: Send + Sync {
    /// A fresh matcher at the start of the output (prompt tokens are never fed to it).
    fn new_matcher(&self) -> Box<dyn GrammarMatcher>;
}

/// One sequence's position in its grammar.
pub trait GrammarMatcher: Send {
    /// Writes the tokens allowed at the next position: bit `t % 32` of word `t / 32` is set when token
    /// `t` is allowed; `bitmask` has `vocab_size.div_ceil(32)` words. EOS is allowed only when the
    /// grammar accepts; once the grammar is complete, only EOS is. A matcher in an error state allows
    /// only EOS, so the sequence ends instead of producing unconstrained text.
    fn fill_next_token_bitmask(&mut self, bitmask: &mut [u32]);
    /// Advances by one sampled token; `false` when the grammar does not allow it (the state is
    /// unchanged or in error).
    fn accept_token(&mut self, token_id: u32) -> bool;
    /// Whether the grammar is complete: nothing but EOS may follow.
    fn is_terminated(&self) -> bool;
    /// Undoes the last `num_tokens` accepted tokens (speculative decoding's rejected drafts).
    fn rollback(&mut self, num_tokens: usize) -> bool;
}

/// A compiled grammar inside `SamplingParams`: compared by identity (two requests that share a cache
/// entry share the handle).
#[derive(Clone)]
pub struct GrammarHandle(pub Arc<dyn CompiledGrammar>);

impl GrammarHandle {
    pub fn new_matcher(&self) -> Box<dyn GrammarMatcher> {
        self.0.new_matcher()
    }
}

impl PartialEq for GrammarHandle {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.0), Arc::as_ptr(&other.0))
    }
}

impl fmt::Debug for GrammarHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GrammarHandle(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let err = StructuredOutputsParams::choice(Vec::<String>::new()).validate().unwrap_err().to_string();
        assert!(err.contains("`structured_outputs.choice`"), "{err}");
        let mut p = StructuredOutputsParams::regex("");
        p.field = "guided_regex".into();
        assert!(p.validate().unwrap_err().to_string().contains("`guided_regex`"));
        assert!(StructuredOutputsParams::json(serde_json::json!(3)).validate().is_err());
        StructuredOutputsParams::json(serde_json::json!({"type": "object"})).validate().unwrap();
    }
}
