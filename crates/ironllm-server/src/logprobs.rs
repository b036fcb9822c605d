//! Engine logprobs ([`PositionLogprobs`]) in the two wire shapes: completions'
//! `{tokens, token_logprobs, top_logprobs, text_offset}` and chat's `content[{token, logprob, bytes,
//! top_logprobs}]`, plus vLLM's `prompt_logprobs`.
//!
//! A token's text is the tokenizer's decode of that single id (special tokens kept), as vLLM's
//! `convert_ids_list_to_tokens` gives it; logprobs of -inf are reported as -9999.0, as vLLM does.

use std::collections::BTreeMap;

use ironllm_core::outputs::PositionLogprobs;
use ironllm_model::tokenizer::Tokenizer;

use crate::protocol::{
    ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs, OrderedLogprobMap, PromptLogprob, PromptLogprobs,
};

/// The text of one token.
pub fn token_text(tokenizer: Option<&Tokenizer>, id: u32) -> String {
    match tokenizer {
        Some(t) => t.decode(&[id], false).unwrap_or_default(),
        None => format!("token_id:{id}"),
    }
}

/// A logprob as JSON can carry it.
pub fn wire_logprob(lp: f32) -> f64 {
    (lp as f64).max(-9999.0)
}

/// Builds completions logprobs incrementally (the text offset runs across calls).
#[derive(Debug, Clone, Default)]
pub struct CompletionLogprobsBuilder {
    /// Characters of text before the next token.
    pub text_offset: usize,
    /// Top candidates per position (`logprobs` of the request).
    pub num_top: usize,
}

impl CompletionLogprobsBuilder {
    pub fn new(initial_text_offset: usize, num_top: usize) -> Self {
        CompletionLogprobsBuilder { text_offset: initial_text_offset, num_top }
    }

    fn push_text(&mut self, out: &mut CompletionLogprobs, text: String) {
        out.text_offset.push(self.text_offset);
        self.text_offset += text.chars().count();
        out.tokens.push(text);
    }

    /// Appends generated tokens with their logprobs.
    pub fn append(
        &mut self,
        out: &mut CompletionLogprobs,
        tokenizer: Option<&Tokenizer>,
        token_ids: &[u32],
        logprobs: &[PositionLogprobs],
    ) {
        for (&id, lp) in token_ids.iter().zip(logprobs) {
            self.push_text(out, token_text(tokenizer, id));
            out.token_logprobs.push(Some(wire_logprob(lp.chosen.logprob)));
            out.top_logprobs.push(Some(self.top_map(tokenizer, lp)));
        }
    }

    /// Appends the prompt (echo): the first token has no logprob; the rest come from
    /// `prompt_logprobs` (whose entry 0 is `None`).
    pub fn append_prompt(
        &mut self,
        out: &mut CompletionLogprobs,
        tokenizer: Option<&Tokenizer>,
        prompt_ids: &[u32],
        prompt_logprobs: Option<&[Option<PositionLogprobs>]>,
    ) {
        for (i, &id) in prompt_ids.iter().enumerate() {
            self.push_text(out, token_text(tokenizer, id));
            match prompt_logprobs.and_then(|p| p.get(i)).and_then(|p| p.as_ref()) {
                Some(lp) => {
                    out.token_logprobs.push(Some(wire_logprob(lp.chosen.logprob)));
                    out.top_logprobs.push(Some(self.top_map(tokenizer, lp)));
                }
                None => {
                    out.token_logprobs.push(None);
                    out.top_logprobs.push(None);
                }
            }
        }
    }

    /// The chosen token followed by the top candidates, as vLLM's dict has them.
    fn top_map(&self, tokenizer: Option<&Tokenizer>, lp: &PositionLogprobs) -> OrderedLogprobMap {
        let mut entries = Vec::with_capacity(self.num_top + 1);
        entries.push((token_text(tokenizer, lp.chosen.token_id), wire_logprob(lp.chosen.logprob)));
        for t in lp.top.iter().take(self.num_top) {
            entries.push((token_text(tokenizer, t.token_id), wire_logprob(t.logprob)));
        }
        OrderedLogprobMap(entries)
    }
}

/// Chat logprobs for generated tokens, with `num_top` candidates each.
pub fn chat_logprobs(
    tokenizer: Option<&Tokenizer>,
    token_ids: &[u32],
    logprobs: &[PositionLogprobs],
    num_top: usize,
) -> Vec<ChatTokenLogprob> {
    token_ids
        .iter()
        .zip(logprobs)
        .map(|(&id, lp)| {
            let token = token_text(tokenizer, id);
            ChatTokenLogprob {
                bytes: Some(token.as_bytes().to_vec()),
                token,
                logprob: wire_logprob(lp.chosen.logprob),
                top_logprobs: lp
                    .top
                    .iter()
                    .take(num_top)
                    .map(|t| {
                        let token = token_text(tokenizer, t.token_id);
                        ChatTopLogprob {
                            bytes: Some(token.as_bytes().to_vec()),
                            token,
                            logprob: wire_logprob(t.logprob),
                        }
                    })
                    .collect(),
            }
        })
        .collect()
}

/// vLLM's `prompt_logprobs`: per prompt position `null` or `{token_id: {logprob, rank, decoded_token}}`.
pub fn prompt_logprobs(tokenizer: Option<&Tokenizer>, plp: &[Option<PositionLogprobs>]) -> PromptLogprobs {
    plp.iter()
        .map(|p| {
            p.as_ref().map(|lp| {
                let mut m = BTreeMap::new();
                for t in std::iter::once(&lp.chosen).chain(lp.top.iter()) {
                    m.entry(t.token_id.to_string()).or_insert_with(|| PromptLogprob {
                        logprob: wire_logprob(t.logprob),
                        rank: Some(t.rank),
                        decoded_token: Some(token_text(tokenizer, t.token_id)),
                    });
                }
                m
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironllm_core::outputs::TokenLogprob;

    fn lp(id: u32, logprob: f32, top: &[(u32, f32)]) -> PositionLogprobs {
        PositionLogprobs {
            chosen: TokenLogprob { token_id: id, logprob, rank: 1 },
            top: top
                .iter()
                .enumerate()
                .map(|(i, &(t, l))| TokenLogprob { token_id: t, logprob: l, rank: i as u32 + 1 })
                .collect(),
        }
    }

    #[test]
    fn completion_logprobs_shape_and_offsets() {
        let mut out = CompletionLogprobs::default();
        let mut b = CompletionLogprobsBuilder::new(3, 1);
        b.append(
            &mut out,
            None,
            &[5, 6],
            &[lp(5, -0.5, &[(5, -0.5), (9, -2.0)]), lp(6, f32::NEG_INFINITY, &[(1, -0.1)])],
        );
        assert_eq!(out.tokens, vec!["token_id:5", "token_id:6"]);
        assert_eq!(out.text_offset, vec![3, 3 + "token_id:5".len()]);
        assert_eq!(out.token_logprobs, vec![Some(-0.5), Some(-9999.0)]);
        let json = serde_json::to_value(&out.top_logprobs).unwrap();
        assert_eq!(json[0], serde_json::json!({"token_id:5": -0.5}));
        assert_eq!(json[1], serde_json::json!({"token_id:6": -9999.0, "token_id:1": -0.10000000149011612}));
    }

    #[test]
    fn echo_prompt_starts_without_logprob() {
        let mut out = CompletionLogprobs::default();
        let mut b = CompletionLogprobsBuilder::new(0, 0);
        b.append_prompt(&mut out, None, &[1, 2], Some(&[None, Some(lp(2, -1.0, &[]))]));
        assert_eq!(out.token_logprobs, vec![None, Some(-1.0)]);
        assert_eq!(out.top_logprobs[0], None);
    }

    #[test]
    fn chat_logprobs_have_bytes_and_top() {
        let c = chat_logprobs(None, &[7], &[lp(7, -0.25, &[(7, -0.25), (8, -1.5), (9, -3.0)])], 2);
        assert_eq!(c[0].token, "token_id:7");
        assert_eq!(c[0].bytes.as_deref(), Some("token_id:7".as_bytes()));
        assert_eq!(c[0].top_logprobs.len(), 2);
        assert_eq!(c[0].top_logprobs[1].logprob, -1.5);
    }
}
