//! Draft-token proposers of speculative decoding (issue 6), run by the CPU runner after a step has
//! sampled: prompt lookup ([`NgramProposer`]) or a smaller draft model of the same tokenizer.
//!
//! The draft model keeps its own KV cache with the target's block layout and reads and writes it through
//! the target's block tables, so it shares the target's block pool (one allocation decides for both)
//! and needs no bookkeeping of its own beyond how many tokens of each request it has seen. It drafts
//! greedily: its proposal is a deterministic function of the context, which is what makes the runner's
//! sample-and-compare verification exact (see `runner_state`). Drafted tokens' KV is written at the
//! positions they would take, into slots the scheduler reserved ahead (`num_lookahead_tokens`); the next
//! step starts again from the last token the draft has seen for real, so rejected drafts are simply
//! overwritten.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ironllm_core::ngram_proposer::NgramProposer;
use ironllm_core::outputs::{ModelRunnerOutput, SchedulerOutput};
use ironllm_kernels::cpu::attention::SeqSpan;

use crate::llama::{ForwardBatch, KvCache, LlamaModel, Workspace};
use crate::runner_state::RunnerRequests;

/// Where a runner's draft tokens come from.
pub enum Proposer {
    Ngram(NgramProposer),
    DraftModel(Box<DraftModel>),
}

impl Proposer {
    /// Draft tokens for every request of `out` that sampled this step and that `plan` asks drafts for
    /// (one entry per row of `out`, empty where none).
    pub fn propose<S>(
        &mut self,
        plan: &SchedulerOutput,
        out: &ModelRunnerOutput,
        reqs: &RunnerRequests<S>,
        block_size: usize,
    ) -> Vec<Vec<u32>> {
        let wanted: HashSet<&str> = plan.spec_propose_req_ids.iter().map(String::as_str).collect();
        let mut drafts = vec![Vec::new(); out.req_ids.len()];
        match self {
            Proposer::Ngram(ngram) => {
                for (ri, id) in out.req_ids.iter().enumerate() {
                    if out.sampled_token_ids[ri].is_empty() || !wanted.contains(id.as_str()) {
                        continue;
                    }
                    if let Some(st) = reqs.get(id) {
                        drafts[ri] = ngram.propose(&st.token_ids);
                    }
                }
            }
            Proposer::DraftModel(draft) => {
                draft.apply_plan(plan);
                let mut batch = Vec::new();
                for (ri, id) in out.req_ids.iter().enumerate() {
                    if out.sampled_token_ids[ri].is_empty() || !wanted.contains(id.as_str()) {
                        continue;
                    }
                    if let Some(st) = reqs.get(id) {
                        batch.push((ri, id.as_str(), st.token_ids.as_slice(), st.block_table.as_slice()));
                    }
                }
                for (ri, tokens) in draft.propose(&batch, block_size) {
                    drafts[ri] = tokens;
                }
            }
        }
        drafts
    }
}

/// A small model drafting greedily, with a KV cache laid out like the target's.
pub struct DraftModel {
    model: Arc<LlamaModel>,
    kv: KvCache,
    ws: Workspace,
    num_speculative_tokens: usize,
    /// Tokens of each request whose KV the draft has computed from real (non-draft) tokens.
    computed: HashMap<String, usize>,
}

impl DraftModel {
    /// A draft model over `num_blocks` blocks of `block_size` tokens (the target's cache geometry).
    pub fn new(model: Arc<LlamaModel>, num_blocks: usize, block_size: usize, num_speculative_tokens: usize) -> Self {
        let kv = KvCache::new(&model.config, num_blocks, block_size);
        DraftModel { model, kv, ws: Workspace::default(), num_speculative_tokens, computed: HashMap::new() }
    }

    /// Forgets finished requests; a new or resumed request (fresh blocks, or prefix-cache blocks whose
    /// draft KV may never have been written) is drafted from its first token again.
    fn apply_plan(&mut self, plan: &SchedulerOutput) {
        for id in plan.finished_req_ids.iter().chain(&plan.preempted_req_ids) {
            self.computed.remove(id);
        }
        for new in &plan.scheduled_new_reqs {
            self.computed.remove(&new.req_id);
        }
    }

    /// Drafts up to `num_speculative_tokens` tokens for each `(row, id, tokens, block table)`: one
    /// forward over every token the draft has not seen yet, then one single-token forward per further
    /// draft. A request stops drafting where its block table or the model's positions end.
    fn propose(&mut self, reqs: &[(usize, &str, &[u32], &[u32])], block_size: usize) -> Vec<(usize, Vec<u32>)> {
        let max_pos = self.model.config.max_position_embeddings.max(1);
        let vocab = self.model.config.vocab_size;
        let capacity = |table: &[u32]| (table.len() * block_size).min(max_pos);
        let slot = |table: &[u32], pos: usize| table[pos / block_size] as usize * block_size + pos % block_size;
        let mut drafts: Vec<Vec<u32>> = vec![Vec::new(); reqs.len()];
        // Requests still drafting, by index into `reqs`.
        let mut live: Vec<usize> = Vec::new();
        let (mut token_ids, mut positions, mut slots, mut rows) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut spans_src: Vec<(usize, usize, usize)> = Vec::new(); // (query start, query len, context len)
        for (i, &(_, id, tokens, table)) in reqs.iter().enumerate() {
            let len = tokens.len();
            let start = self.computed.get(id).copied().unwrap_or(0).min(len.saturating_sub(1));
            if len == 0 || len > capacity(table) {
                continue;
            }
            let query_start = token_ids.len();
            for (pos, &t) in tokens.iter().enumerate().skip(start) {
                // A draft vocabulary may be shorter than the target's (padding rows): ids past it are
                // never real text, so any in-range id keeps the draft running.
                token_ids.push(if (t as usize) < vocab { t } else { 0 });
                positions.push(pos);
                slots.push(slot(table, pos));
            }
            spans_src.push((query_start, len - start, len));
            rows.push(token_ids.len() - 1);
            live.push(i);
            self.computed.insert(id.to_owned(), len);
        }
        let mut step = 0;
        while !live.is_empty() {
            let spans: Vec<SeqSpan<'_>> = live
                .iter()
                .zip(&spans_src)
                .map(|(&i, &(query_start, query_len, context_len))| SeqSpan {
                    query_start,
                    query_len,
                    context_len,
                    block_table: reqs[i].3,
                })
                .collect();
            let batch = ForwardBatch {
                token_ids: &token_ids,
                positions: &positions,
                slot_mapping: &slots,
                seqs: &spans,
                logits_rows: &rows,
            };
            self.model.forward(&batch, &mut self.kv, &mut self.ws);
            for (r, &i) in live.iter().enumerate() {
                drafts[i].push(argmax(&self.ws.logits[r * vocab..(r + 1) * vocab]));
            }
            step += 1;
            if step == self.num_speculative_tokens {
                break;
            }
            // Feed each draft at the position it would take, where a slot was reserved for it.
            let prev = std::mem::take(&mut live);
            token_ids.clear();
            positions.clear();
            slots.clear();
            rows.clear();
            spans_src.clear();
            for i in prev {
                let table = reqs[i].3;
                let pos = reqs[i].2.len() + step - 1;
                if pos >= capacity(table) {
                    continue;
                }
                let query_start = token_ids.len();
                token_ids.push(*drafts[i].last().unwrap_or(&0));
                positions.push(pos);
                slots.push(slot(table, pos));
                rows.push(query_start);
                spans_src.push((query_start, 1, pos + 1));
                live.push(i);
            }
        }
        reqs.iter().zip(drafts).map(|(r, d)| (r.0, d)).collect()
    }
}

/// The index of the largest value (the first on ties), as a token id.
fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}
