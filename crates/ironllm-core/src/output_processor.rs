//! The frontend side of a request: turns the engine core's per-step token outputs into text and
//! [`RequestOutput`]s — incremental detokenization, stop strings (found across token boundaries and
//! trimmed as vLLM does), logprobs, and the fan-out of `n` / `best_of` into child sequences and back.
//!
//! Stop strings are found here, not in the engine, because only here is the text known; when one is
//! found the caller must tell the engine to finish that child (`ProcessResult::stopped`).

use std::collections::HashMap;
use std::sync::Arc;

use crate::detokenizer::IncrementalDetokenizer;
use crate::outputs::{EngineCoreOutput, FinishReason, PositionLogprobs, StopReason};
use crate::SamplingParams;

/// How much of the output each [`RequestOutput`] carries (vLLM's `RequestOutputKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputKind {
    /// Everything so far, every step.
    Cumulative,
    /// Only what is new since the last output (streaming).
    Delta,
    /// One output when the request is finished.
    #[default]
    FinalOnly,
}

/// One generated sequence of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionOutput {
    pub index: usize,
    pub text: String,
    pub token_ids: Vec<u32>,
    pub cumulative_logprob: Option<f64>,
    pub logprobs: Option<Vec<PositionLogprobs>>,
    pub finish_reason: Option<FinishReason>,
    pub stop_reason: Option<StopReason>,
}

/// A request's result (or, in delta mode, what changed).
#[derive(Debug, Clone, PartialEq)]
pub struct RequestOutput {
    pub request_id: String,
    pub prompt_token_ids: Vec<u32>,
    /// First entry `None` (no logprob for the first prompt token), as vLLM reports it.
    pub prompt_logprobs: Option<Vec<Option<PositionLogprobs>>>,
    pub outputs: Vec<CompletionOutput>,
    pub finished: bool,
    pub num_cached_tokens: usize,
}

struct Child {
    parent: String,
    index: usize,
    detok: Option<IncrementalDetokenizer>,
    text: String,
    token_ids: Vec<u32>,
    logprobs: Vec<PositionLogprobs>,
    cumulative_logprob: f64,
    finish_reason: Option<FinishReason>,
    stop_reason: Option<StopReason>,
    /// Characters of `text` already sent (delta mode).
    sent_chars: usize,
    sent_tokens: usize,
    sent_logprobs: usize,
    finish_sent: bool,
}

struct Parent {
    prompt_token_ids: Vec<u32>,
    params: Arc<SamplingParams>,
    kind: OutputKind,
    children: Vec<String>,
    prompt_logprobs: Option<Vec<Option<PositionLogprobs>>>,
    sent_prompt_logprobs: bool,
    num_cached_tokens: usize,
    /// Characters held back while streaming so a partial stop string is never sent.
    stop_buffer: usize,
}

/// The result of processing one step's engine outputs.
#[derive(Debug, Default)]
pub struct ProcessResult {
    pub request_outputs: Vec<RequestOutput>,
    /// Child ids that hit a stop string: the engine must finish them (reason stop).
    pub stopped: Vec<(String, String)>,
}

/// Tracks every live request on the frontend side.
#[derive(Default)]
pub struct OutputProcessor {
    children: HashMap<String, Child>,
    parents: HashMap<String, Parent>,
}

/// The id of the `index`-th child of a request with `n` / `best_of` above 1 (vLLM's convention).
pub fn child_request_id(parent: &str, index: usize) -> String {
    format!("{index}_{parent}")
}

impl OutputProcessor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a request whose `child_ids` sequences were added to the engine. `detokenize` is false
    /// when no tokenizer is available (outputs then carry token ids only).
    pub fn add_request(
        &mut self,
        request_id: &str,
        prompt_token_ids: Vec<u32>,
        params: Arc<SamplingParams>,
        kind: OutputKind,
        child_ids: &[String],
        detokenize: bool,
    ) {
        for (index, id) in child_ids.iter().enumerate() {
            let detok = (detokenize && params.detokenize).then(|| {
                IncrementalDetokenizer::new(
                    &prompt_token_ids,
                    params.skip_special_tokens,
                    params.spaces_between_special_tokens,
                )
            });
            self.children.insert(
                id.clone(),
                Child {
                    parent: request_id.to_string(),
                    index,
                    detok,
                    text: String::new(),
                    token_ids: Vec::new(),
                    logprobs: Vec::new(),
                    cumulative_logprob: 0.0,
                    finish_reason: None,
                    stop_reason: None,
                    sent_chars: 0,
                    sent_tokens: 0,
                    sent_logprobs: 0,
                    finish_sent: false,
                },
            );
        }
        let stop_buffer = if params.include_stop_str_in_output {
            0
        } else {
            params.stop.iter().map(|s| s.len()).max().unwrap_or(1).saturating_sub(1)
        };
        self.parents.insert(
            request_id.to_string(),
            Parent {
                prompt_token_ids,
                params,
                kind,
                children: child_ids.to_vec(),
                prompt_logprobs: None,
                sent_prompt_logprobs: false,
                num_cached_tokens: 0,
                stop_buffer,
            },
        );
    }

    /// Whether the processor still tracks `request_id`.
    pub fn has_request(&self, request_id: &str) -> bool {
        self.parents.contains_key(request_id)
    }

    /// Number of requests still tracked.
    pub fn num_requests(&self) -> usize {
        self.parents.len()
    }

    /// The child ids of a request (to abort them in the engine).
    pub fn child_ids(&self, request_id: &str) -> Vec<String> {
        self.parents.get(request_id).map(|p| p.children.clone()).unwrap_or_default()
    }

    /// Forgets a request (after an abort); returns its child ids.
    pub fn remove_request(&mut self, request_id: &str) -> Vec<String> {
        let Some(p) = self.parents.remove(request_id) else { return Vec::new() };
        for c in &p.children {
            self.children.remove(c);
        }
        p.children
    }

    /// Applies one step's engine outputs.
    pub fn process(
        &mut self,
        outputs: Vec<EngineCoreOutput>,
        tokenizer: Option<&tokenizers::Tokenizer>,
    ) -> ProcessResult {
        let mut result = ProcessResult::default();
        let mut touched: Vec<String> = Vec::new();
        for out in outputs {
            let Some(child) = self.children.get_mut(&out.req_id) else { continue };
            let Some(parent) = self.parents.get_mut(&child.parent) else { continue };
            if child.finish_reason.is_some() {
                continue;
            }
            if let Some(plp) = out.new_prompt_logprobs {
                let all = parent.prompt_logprobs.get_or_insert_with(|| vec![None]);
                if child.index == 0 {
                    all.extend(plp.into_iter().map(Some));
                }
            }
            if out.num_cached_tokens > 0 {
                parent.num_cached_tokens = out.num_cached_tokens;
            }
            let params = parent.params.clone();
            child.token_ids.extend_from_slice(&out.new_token_ids);
            if let Some(lps) = out.new_logprobs {
                for lp in lps {
                    child.cumulative_logprob += lp.chosen.logprob as f64;
                    child.logprobs.push(lp);
                }
            }
            // An EOS or stop token ends the text before it unless the user wants stop strings kept.
            let stop_terminated = out.finish_reason == Some(FinishReason::Stop) && !params.include_stop_str_in_output;
            let detok_ids: &[u32] = if stop_terminated && !out.new_token_ids.is_empty() {
                &out.new_token_ids[..out.new_token_ids.len() - 1]
            } else {
                &out.new_token_ids
            };
            let mut finish = out.finish_reason.map(|r| (r, out.stop_reason.clone()));
            if let (Some(detok), Some(tok)) = (child.detok.as_mut(), tokenizer) {
                let before = child.text.len();
                match detok.step(tok, detok_ids) {
                    Ok(new_text) => child.text.push_str(&new_text),
                    Err(e) => tracing::warn!("detokenization failed for {}: {e}", out.req_id),
                }
                if finish.is_some() {
                    // The sequence ends: release text held back for a character that may never complete.
                    match detok.flush(tok) {
                        Ok(rest) => child.text.push_str(&rest),
                        Err(e) => tracing::warn!("detokenization failed for {}: {e}", out.req_id),
                    }
                }
                if finish.is_none() && !params.stop.is_empty() {
                    if let Some((cut, stop)) =
                        find_stop_string(&child.text, before, &params.stop, params.include_stop_str_in_output)
                    {
                        child.text.truncate(cut);
                        finish = Some((FinishReason::Stop, Some(StopReason::String(stop.clone()))));
                        result.stopped.push((out.req_id.clone(), stop));
                    }
                }
            }
            if let Some((reason, stop_reason)) = finish {
                child.finish_reason = Some(reason);
                // vLLM reports no stop_reason for the model's own EOS.
                child.stop_reason = stop_reason.filter(|r| *r != StopReason::Eos);
            }
            if !touched.contains(&child.parent) {
                touched.push(child.parent.clone());
            }
        }
        for parent_id in touched {
            if let Some(out) = self.make_output(&parent_id) {
                result.request_outputs.push(out);
            }
        }
        result
    }

    /// Marks every child of `request_id` aborted and returns its final output (for a client abort).
    pub fn abort_request(&mut self, request_id: &str) -> Option<RequestOutput> {
        let children = self.parents.get(request_id)?.children.clone();
        for c in &children {
            if let Some(child) = self.children.get_mut(c) {
                if child.finish_reason.is_none() {
                    child.finish_reason = Some(FinishReason::Abort);
                }
            }
        }
        self.make_output(request_id)
    }

    fn make_output(&mut self, parent_id: &str) -> Option<RequestOutput> {
        let parent = self.parents.get_mut(parent_id)?;
        let finished = parent.children.iter().all(|c| self.children.get(c).is_none_or(|c| c.finish_reason.is_some()));
        if parent.kind == OutputKind::FinalOnly && !finished {
            return None;
        }
        let delta = parent.kind == OutputKind::Delta;
        let want_logprobs = parent.params.logprobs.is_some();
        let mut outputs = Vec::new();
        for cid in &parent.children {
            let Some(c) = self.children.get_mut(cid) else { continue };
            let done = c.finish_reason.is_some();
            if delta {
                // Hold back the stop buffer while running so a partial stop string is never sent.
                let limit = if done { c.text.len() } else { c.text.len().saturating_sub(parent.stop_buffer) };
                let mut limit = limit.max(c.sent_chars);
                while !c.text.is_char_boundary(limit) {
                    limit -= 1;
                }
                let text = c.text[c.sent_chars..limit].to_string();
                let token_ids = c.token_ids[c.sent_tokens..].to_vec();
                let logprobs = want_logprobs.then(|| c.logprobs[c.sent_logprobs..].to_vec());
                let changed = !text.is_empty() || !token_ids.is_empty() || (done && !c.finish_sent);
                c.sent_chars = limit;
                c.sent_tokens = c.token_ids.len();
                c.sent_logprobs = c.logprobs.len();
                c.finish_sent = done;
                if !changed {
                    continue;
                }
                outputs.push(CompletionOutput {
                    index: c.index,
                    text,
                    token_ids,
                    cumulative_logprob: want_logprobs.then_some(c.cumulative_logprob),
                    logprobs,
                    finish_reason: c.finish_reason,
                    stop_reason: c.stop_reason.clone(),
                });
            } else {
                outputs.push(CompletionOutput {
                    index: c.index,
                    text: c.text.clone(),
                    token_ids: c.token_ids.clone(),
                    cumulative_logprob: want_logprobs.then_some(c.cumulative_logprob),
                    logprobs: want_logprobs.then(|| c.logprobs.clone()),
                    finish_reason: c.finish_reason,
                    stop_reason: c.stop_reason.clone(),
                });
            }
        }
        // best_of: keep the n sequences with the highest cumulative logprob, renumbered.
        let n = parent.params.n;
        if finished && parent.params.best_of.is_some_and(|b| b > n) && !delta {
            let cums: HashMap<usize, f64> = parent
                .children
                .iter()
                .filter_map(|cid| self.children.get(cid).map(|c| (c.index, c.cumulative_logprob)))
                .collect();
            outputs.sort_by(|a, b| {
                let (ca, cb) =
                    (cums.get(&a.index).copied().unwrap_or(f64::MIN), cums.get(&b.index).copied().unwrap_or(f64::MIN));
                cb.partial_cmp(&ca).unwrap_or(std::cmp::Ordering::Equal)
            });
            outputs.truncate(n);
            for (i, o) in outputs.iter_mut().enumerate() {
                o.index = i;
            }
        }
        // A chunked prefill delivers prompt logprobs chunk by chunk; a delta output carries them once, whole
        // (every prompt position known, or the request over), as the client reads them from one output.
        let prompt_complete = parent.prompt_logprobs.as_ref().is_some_and(|p| p.len() >= parent.prompt_token_ids.len());
        let prompt_logprobs = if delta && (parent.sent_prompt_logprobs || !(prompt_complete || finished)) {
            None
        } else {
            parent.prompt_logprobs.clone()
        };
        if prompt_logprobs.is_some() {
            parent.sent_prompt_logprobs = true;
        }
        let out = RequestOutput {
            request_id: parent_id.to_string(),
            prompt_token_ids: parent.prompt_token_ids.clone(),
            prompt_logprobs,
            outputs,
            finished,
            num_cached_tokens: parent.num_cached_tokens,
        };
        if finished {
            self.remove_request(parent_id);
        }
        Some(out)
    }
}

/// Looks for a stop string that ends in the text added after byte `new_from`. Returns where to cut the
/// text and which stop string matched (the earliest match wins).
fn find_stop_string(text: &str, new_from: usize, stops: &[String], include: bool) -> Option<(usize, String)> {
    let mut best: Option<(usize, usize, &String)> = None;
    for s in stops {
        // A match must end inside the new text; it may start in the old text.
        let mut from = new_from.saturating_sub(s.len().saturating_sub(1));
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        if let Some(pos) = text[from..].find(s.as_str()) {
            let idx = from + pos;
            if best.is_none_or(|(b, _, _)| idx < b) {
                best = Some((idx, s.len(), s));
            }
        }
    }
    best.map(|(idx, len, s)| (if include { idx + len } else { idx }, s.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outputs::TokenLogprob;

    fn position(token_id: u32) -> PositionLogprobs {
        let chosen = TokenLogprob { token_id, logprob: -1.0, rank: 1 };
        PositionLogprobs { chosen: chosen.clone(), top: vec![chosen] }
    }

    #[test]
    fn delta_outputs_carry_the_whole_prompt_logprobs_of_a_chunked_prefill_once() {
        let mut op = OutputProcessor::new();
        let prompt: Vec<u32> = (1..=6).collect();
        let params = Arc::new(SamplingParams { prompt_logprobs: Some(1), ..SamplingParams::default() });
        op.add_request("r", prompt.clone(), params, OutputKind::Delta, &["r".to_string()], false);
        let out = |plp: Vec<PositionLogprobs>, tokens: Vec<u32>| EngineCoreOutput {
            req_id: "r".into(),
            new_token_ids: tokens,
            new_logprobs: None,
            new_prompt_logprobs: Some(plp),
            finish_reason: None,
            stop_reason: None,
            num_cached_tokens: 0,
        };
        // First chunk: positions 1..=3 of 6; nothing to send yet.
        let r1 = op.process(vec![out(vec![position(2), position(3), position(4)], vec![])], None);
        assert!(r1.request_outputs.iter().all(|o| o.prompt_logprobs.is_none()));
        // Second chunk completes the prompt and samples: all 6 entries (the first is None) at once.
        let r2 = op.process(vec![out(vec![position(5), position(6)], vec![9])], None);
        let plp = r2.request_outputs[0].prompt_logprobs.as_ref().expect("sent when complete");
        assert_eq!(plp.len(), prompt.len());
        assert!(plp[0].is_none());
        let ids: Vec<u32> = plp[1..].iter().map(|p| p.as_ref().unwrap().chosen.token_id).collect();
        assert_eq!(ids, vec![2, 3, 4, 5, 6]);
        // Later deltas do not repeat them.
        let later = EngineCoreOutput { new_prompt_logprobs: None, ..out(vec![], vec![10]) };
        let r3 = op.process(vec![later], None);
        assert!(r3.request_outputs[0].prompt_logprobs.is_none());
    }

    #[test]
    fn stop_strings_found_across_chunks_and_trimmed() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        // "EN" arrived earlier, "D!" now: the match spans both.
        assert_eq!(find_stop_string("abc EN", 4, &stops, false), None);
        assert_eq!(find_stop_string("abc END!", 6, &stops, false), Some((4, "END".to_string())));
        assert_eq!(find_stop_string("abc END!", 6, &stops, true), Some((7, "END".to_string())));
        // The earliest of several matches wins.
        assert_eq!(find_stop_string("x\n\nEND", 1, &stops, false), Some((1, "\n\n".to_string())));
        // Multi-byte text before the boundary does not break slicing.
        assert_eq!(find_stop_string("ééEND", 4, &stops, false), Some((4, "END".to_string())));
    }
}
