//! Per-request state a model runner keeps across steps, shared by the CPU and GPU runners: token ids,
//! block table, computed tokens, the structured-output matcher and the backend's sampling state, kept
//! in step with the scheduler's plans (vLLM's persistent batch, minus the tensors).
//!
//! Speculative decoding lives here too, because it is bookkeeping rather than arithmetic: a request with
//! draft tokens gets them appended to its `token_ids` for the step, so batch assembly, positions, slots
//! and sampling histories treat them as ordinary tokens; its last `k + 1` positions are all sampled;
//! [`RunnerRequest::finish_step`] then keeps the longest prefix of drafts the target's own samples agree
//! with, plus the first sample that disagreed (or the bonus sample after the last draft), and rewinds the
//! rest. Because every proposer here is deterministic (n-gram lookup, a greedy draft model), "sample each
//! position from the target and accept while it equals the draft" is exactly the rejection sampler with
//! a one-hot draft distribution: a draft token d is kept with probability p(d), and after a rejection the
//! emitted token follows p without d, renormalized. The output distribution is therefore the target's,
//! for every sampling setting, and greedy output is token-for-token what decoding without drafts gives.

use std::collections::HashMap;
use std::sync::Arc;

use ironllm_core::outputs::{NewRequestData, PositionLogprobs, SchedulerOutput};
use ironllm_core::structured::GrammarMatcher;
use ironllm_core::SamplingParams;

use crate::sampler::SampledToken;

/// One request as the runner sees it; `S` is the backend's sampling state (the CPU sampler's
/// generator and counts, or the GPU sampler's seed).
pub struct RunnerRequest<S> {
    /// Prompt, every output token known so far, then this step's draft tokens (if any).
    pub token_ids: Vec<u32>,
    pub num_prompt_tokens: usize,
    pub block_table: Vec<u32>,
    pub num_computed_tokens: usize,
    pub params: Arc<SamplingParams>,
    /// The structured-output matcher, advanced with every emitted token (`None`: unconstrained).
    pub grammar: Option<Box<dyn GrammarMatcher>>,
    /// Draft tokens at the end of `token_ids` this step, verified by [`RunnerRequest::finish_step`].
    pub num_drafts: usize,
    pub sampling: S,
}

impl<S> RunnerRequest<S> {
    /// Tokens that are real (not drafts).
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len() - self.num_drafts
    }

    /// This step's draft tokens.
    pub fn drafts(&self) -> &[u32] {
        &self.token_ids[self.num_tokens()..]
    }

    /// Rows this request samples when it reaches the end of its tokens: one per draft and one more.
    pub fn num_sample_rows(&self) -> usize {
        self.num_drafts + 1
    }

    /// The output history the sampler sees at sample row `row`: real output plus the drafts before it.
    pub fn output_before_row(&self, row: usize) -> &[u32] {
        &self.token_ids[self.num_prompt_tokens..self.num_tokens() + row]
    }

    /// Applies the step's samples: `row_tokens[i]` was sampled at sample row `i` (all
    /// [`num_sample_rows`](Self::num_sample_rows) of them). Keeps the drafts the samples agree with,
    /// then one sample; advances computed tokens by the `num_scheduled` tokens minus the rejected
    /// drafts; feeds the emitted tokens to the grammar. Returns the emitted tokens (`i`-th from row `i`).
    pub fn finish_step(&mut self, num_scheduled: usize, row_tokens: &[u32]) -> Vec<u32> {
        let base = self.num_tokens();
        let mut emitted = Vec::with_capacity(self.num_drafts + 1);
        for (i, &sampled) in row_tokens.iter().enumerate().take(self.num_drafts + 1) {
            emitted.push(sampled);
            if i == self.num_drafts || self.token_ids[base + i] != sampled {
                break;
            }
        }
        let num_rejected = self.num_drafts + 1 - emitted.len().max(1);
        self.token_ids.truncate(base);
        self.num_drafts = 0;
        self.num_computed_tokens += num_scheduled - num_rejected;
        self.token_ids.extend_from_slice(&emitted);
        if let Some(m) = self.grammar.as_mut() {
            for &t in &emitted {
                if m.is_terminated() || !m.accept_token(t) {
                    tracing::debug!("structured output: token {t} rejected by the grammar");
                    break;
                }
            }
        }
        emitted
    }
}

/// Fills a constrained request's bitmasks for its sample rows (`out`: `drafts.len() + 1` rows of `words`
/// words): row `i` is the grammar's state after the first `i` drafts. A draft the grammar refuses cannot be
/// accepted (its row forbids it), so the rows after it just repeat its mask. The matcher is rolled back to
/// where it was.
pub fn fill_spec_masks(matcher: &mut dyn GrammarMatcher, drafts: &[u32], out: &mut [u32], words: usize) {
    let mut advanced = 0;
    let mut rows = out.chunks_mut(words);
    let mut last: Option<Vec<u32>> = None;
    for i in 0..=drafts.len() {
        let Some(row) = rows.next() else { break };
        match &last {
            Some(mask) => row.copy_from_slice(mask),
            None => {
                matcher.fill_next_token_bitmask(row);
                if i < drafts.len() {
                    if !matcher.is_terminated() && matcher.accept_token(drafts[i]) {
                        advanced += 1;
                    } else {
                        last = Some(row.to_vec());
                    }
                }
            }
        }
    }
    if advanced > 0 && !matcher.rollback(advanced) {
        tracing::warn!("structured output: the grammar could not roll back {advanced} draft tokens");
    }
}

/// A step's samples grouped by request (a request with k drafts has k + 1).
pub struct StepSamples {
    /// Per request (plan order), its sampled tokens in row order.
    pub tokens: Vec<Vec<u32>>,
    logprobs: Vec<Vec<Option<PositionLogprobs>>>,
}

impl StepSamples {
    /// Groups `sampled` (one per sample row) by request; `rows[i]` names sample `i`'s request.
    pub fn group(sampled: Vec<SampledToken>, rows: &[(usize, usize)], num_requests: usize) -> StepSamples {
        let mut tokens = vec![Vec::new(); num_requests];
        let mut logprobs = vec![Vec::new(); num_requests];
        for (tok, &(ri, _)) in sampled.into_iter().zip(rows) {
            tokens[ri].push(tok.token_id);
            logprobs[ri].push(tok.logprobs);
        }
        StepSamples { tokens, logprobs }
    }

    /// The logprobs of request `ri`'s first `num_emitted` samples, when it asked for logprobs.
    pub fn emitted_logprobs(&mut self, ri: usize, num_emitted: usize) -> Option<Vec<PositionLogprobs>> {
        let lps = self.logprobs.get_mut(ri)?;
        lps.truncate(num_emitted);
        (!lps.is_empty() && lps.iter().all(Option::is_some)).then(|| lps.drain(..).flatten().collect())
    }
}

/// Every request the runner holds state for.
pub struct RunnerRequests<S> {
    map: HashMap<String, RunnerRequest<S>>,
}

impl<S> Default for RunnerRequests<S> {
    fn default() -> Self {
        RunnerRequests { map: HashMap::new() }
    }
}

impl<S> RunnerRequests<S> {
    /// Brings the states in line with `plan`: drops finished requests, clears preempted ones' blocks (a
    /// preempted request keeps its sampling state and matcher, so seeded draws continue and the grammar
    /// needs no replay), adds or resumes new ones (`new_sampling` builds a first-seen request's
    /// sampling state), extends block tables, and appends each request's draft tokens.
    pub fn apply_plan(
        &mut self,
        plan: &SchedulerOutput,
        mut new_sampling: impl FnMut(&NewRequestData) -> S,
    ) -> Result<(), String> {
        for id in &plan.finished_req_ids {
            self.map.remove(id);
        }
        for id in &plan.preempted_req_ids {
            if let Some(st) = self.map.get_mut(id) {
                st.block_table.clear();
                st.num_computed_tokens = 0;
            }
        }
        for new in &plan.scheduled_new_reqs {
            let mut token_ids = new.prompt_token_ids.clone();
            token_ids.extend_from_slice(&new.output_token_ids);
            let block_table = new.block_ids.iter().map(|b| b.0).collect();
            match self.map.get_mut(&new.req_id) {
                Some(st) => {
                    st.token_ids = token_ids;
                    st.block_table = block_table;
                    st.num_computed_tokens = new.num_computed_tokens;
                    st.num_drafts = 0;
                }
                None => {
                    // A request this runner has not seen starts its grammar at the output's start and
                    // replays any output it already has.
                    let grammar = new.sampling_params.compiled_grammar.as_ref().map(|g| {
                        let mut matcher = g.new_matcher();
                        for &t in &new.output_token_ids {
                            matcher.accept_token(t);
                        }
                        matcher
                    });
                    let sampling = new_sampling(new);
                    self.map.insert(
                        new.req_id.clone(),
                        RunnerRequest {
                            token_ids,
                            num_prompt_tokens: new.prompt_token_ids.len(),
                            block_table,
                            num_computed_tokens: new.num_computed_tokens,
                            params: new.sampling_params.clone(),
                            grammar,
                            num_drafts: 0,
                            sampling,
                        },
                    );
                }
            }
        }
        for cached in &plan.scheduled_cached_reqs {
            let st = self.map.get_mut(&cached.req_id).ok_or_else(|| format!("unknown request `{}`", cached.req_id))?;
            st.block_table.extend(cached.new_block_ids.iter().map(|b| b.0));
            st.num_computed_tokens = cached.num_computed_tokens;
        }
        for (id, drafts) in &plan.scheduled_spec_decode_tokens {
            let st = self.map.get_mut(id).ok_or_else(|| format!("drafts for unknown request `{id}`"))?;
            st.token_ids.extend_from_slice(drafts);
            st.num_drafts = drafts.len();
        }
        Ok(())
    }

    /// Forgets every request (after a profiling run).
    pub fn clear(&mut self) {
        self.map.clear();
    }

    pub fn get(&self, id: &str) -> Option<&RunnerRequest<S>> {
        self.map.get(id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut RunnerRequest<S>> {
        self.map.get_mut(id)
    }

    /// Mutable references to the requests of `order`, in that order; an unknown or repeated id is an
    /// error.
    pub fn many_mut<'a>(&'a mut self, order: &[&str]) -> Result<Vec<&'a mut RunnerRequest<S>>, String> {
        let mut by_id: HashMap<&str, &mut RunnerRequest<S>> =
            self.map.iter_mut().map(|(id, st)| (id.as_str(), st)).collect();
        order
            .iter()
            .map(|id| by_id.remove(id).ok_or_else(|| format!("request `{id}` scheduled twice or unknown")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironllm_core::outputs::{BlockId, CachedRequestData};

    fn state(tokens: &[u32], num_prompt: usize, drafts: &[u32]) -> RunnerRequest<()> {
        let mut token_ids = tokens.to_vec();
        token_ids.extend_from_slice(drafts);
        RunnerRequest {
            token_ids,
            num_prompt_tokens: num_prompt,
            block_table: vec![0, 1, 2],
            num_computed_tokens: tokens.len() - 1,
            params: Arc::new(SamplingParams::default()),
            grammar: None,
            num_drafts: drafts.len(),
            sampling: (),
        }
    }

    #[test]
    fn finish_step_keeps_the_agreeing_prefix_and_one_sample() {
        // Prompt [1, 2], output [3]; drafts [4, 5, 6]. Samples agree on 4, disagree at 5 (sampled 9).
        let mut st = state(&[1, 2, 3], 2, &[4, 5, 6]);
        assert_eq!(st.output_before_row(0), &[3]);
        assert_eq!(st.output_before_row(2), &[3, 4, 5]);
        let emitted = st.finish_step(4, &[4, 9, 6, 7]);
        assert_eq!(emitted, vec![4, 9]);
        assert_eq!(st.token_ids, vec![1, 2, 3, 4, 9]);
        // Computed: the last real token and the accepted draft; 9 has no KV yet.
        assert_eq!(st.num_computed_tokens, 4);
        assert_eq!(st.num_drafts, 0);

        // All accepted: the bonus sample follows.
        let mut st = state(&[1, 2, 3], 2, &[4, 5]);
        assert_eq!(st.finish_step(3, &[4, 5, 8]), vec![4, 5, 8]);
        assert_eq!(st.num_computed_tokens, 5);
        assert_eq!(st.token_ids.len(), 6);

        // First draft rejected.
        let mut st = state(&[1, 2, 3], 2, &[4, 5]);
        assert_eq!(st.finish_step(3, &[7, 5, 8]), vec![7]);
        assert_eq!(st.num_computed_tokens, 3);

        // No drafts: one token, as always.
        let mut st = state(&[1, 2, 3], 2, &[]);
        assert_eq!(st.finish_step(1, &[6]), vec![6]);
        assert_eq!(st.num_computed_tokens, 3);
    }

    /// A grammar that accepts exactly one token sequence.
    struct Sequence {
        tokens: Vec<u32>,
        pos: usize,
    }

    impl GrammarMatcher for Sequence {
        fn fill_next_token_bitmask(&mut self, bitmask: &mut [u32]) {
            bitmask.fill(0);
            if let Some(&t) = self.tokens.get(self.pos) {
                bitmask[t as usize / 32] |= 1 << (t % 32);
            }
        }
        fn accept_token(&mut self, token_id: u32) -> bool {
            let ok = self.tokens.get(self.pos) == Some(&token_id);
            self.pos += usize::from(ok);
            ok
        }
        fn is_terminated(&self) -> bool {
            self.pos == self.tokens.len()
        }
        fn rollback(&mut self, num_tokens: usize) -> bool {
            self.pos -= num_tokens;
            true
        }
    }

    #[test]
    fn spec_masks_follow_the_drafts_and_roll_back() {
        let allowed =
            |row: &[u32]| -> Vec<u32> { (0..64u32).filter(|&t| row[t as usize / 32] & (1 << (t % 32)) != 0).collect() };
        let mut m = Sequence { tokens: vec![1, 2, 3, 4], pos: 0 };
        let mut out = vec![0u32; 3 * 2];
        // The second draft (5) is refused: its row and the rows after it keep the mask that refused it.
        fill_spec_masks(&mut m, &[1, 5], &mut out, 2);
        assert_eq!(allowed(&out[0..2]), vec![1]);
        assert_eq!(allowed(&out[2..4]), vec![2]);
        assert_eq!(allowed(&out[4..6]), vec![2]);
        assert_eq!(m.pos, 0, "the matcher is rolled back");
        let mut out = vec![0u32; 3 * 2];
        fill_spec_masks(&mut m, &[1, 2], &mut out, 2);
        assert_eq!(allowed(&out[4..6]), vec![3]);
        assert_eq!(m.pos, 0);
    }

    #[test]
    fn apply_plan_appends_drafts_and_tracks_blocks() {
        let mut reqs: RunnerRequests<u32> = RunnerRequests::default();
        let plan = SchedulerOutput {
            scheduled_new_reqs: vec![NewRequestData {
                req_id: "a".into(),
                prompt_token_ids: vec![1, 2, 3],
                output_token_ids: vec![],
                sampling_params: Arc::new(SamplingParams::default()),
                block_ids: vec![BlockId(7)],
                num_computed_tokens: 0,
            }],
            num_scheduled_tokens: vec![("a".into(), 3)],
            total_num_scheduled_tokens: 3,
            ..Default::default()
        };
        reqs.apply_plan(&plan, |_| 42).unwrap();
        assert_eq!(reqs.get("a").map(|s| s.sampling), Some(42));
        reqs.get_mut("a").unwrap().token_ids.push(4);
        let plan = SchedulerOutput {
            scheduled_cached_reqs: vec![CachedRequestData {
                req_id: "a".into(),
                new_block_ids: vec![BlockId(8)],
                num_computed_tokens: 3,
            }],
            num_scheduled_tokens: vec![("a".into(), 3)],
            total_num_scheduled_tokens: 3,
            scheduled_spec_decode_tokens: vec![("a".into(), vec![5, 6])],
            ..Default::default()
        };
        reqs.apply_plan(&plan, |_| 0).unwrap();
        let st = reqs.get("a").unwrap();
        assert_eq!(st.block_table, vec![7, 8]);
        assert_eq!(st.drafts(), &[5, 6]);
        assert_eq!(st.num_tokens(), 4);
        assert!(reqs.many_mut(&["a", "a"]).is_err());
        assert!(reqs.many_mut(&["b"]).is_err());
    }
}
