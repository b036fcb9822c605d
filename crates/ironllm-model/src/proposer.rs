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
//!
//! [`DraftRounds`] is the part every draft model shares (which tokens each request's draft has seen, the
//! catch-up forward, feeding drafts back, the limits); a backend supplies only its forward-and-argmax
//! (the CPU's here, the GPU's in `ironllm-cuda::draft`).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;

use ironllm_core::ngram_proposer::NgramProposer;
use ironllm_core::outputs::{ModelRunnerOutput, SchedulerOutput};
use ironllm_kernels::cpu::attention::{KvDType, SeqSpan};

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
        match self {
            Proposer::Ngram(ngram) => {
                let wanted: HashSet<&str> = plan.spec_propose_req_ids.iter().map(String::as_str).collect();
                let mut drafts = vec![Vec::new(); out.req_ids.len()];
                for (ri, id) in out.req_ids.iter().enumerate() {
                    if out.sampled_token_ids[ri].is_empty() || !wanted.contains(id.as_str()) {
                        continue;
                    }
                    if let Some(st) = reqs.get(id) {
                        drafts[ri] = ngram.propose(&st.token_ids);
                    }
                }
                drafts
            }
            Proposer::DraftModel(draft) => draft.propose(plan, out, reqs, block_size),
        }
    }
}

/// One sequence of a draft forward: `tokens` fed from position `first_pos` on, against `table`.
pub struct DraftSeq<'a> {
    /// Index into the round's requests.
    pub item: usize,
    pub tokens: Vec<u32>,
    pub first_pos: usize,
    pub table: &'a [u32],
}

/// A drafting round's limits: the draft model's positions and vocabulary, the tokens and sequences one
/// of its forwards may hold, and the number of drafts per request.
pub struct DraftLimits {
    pub max_positions: usize,
    pub vocab_size: usize,
    pub max_tokens: usize,
    pub max_seqs: usize,
    pub num_speculative_tokens: usize,
}

/// What a draft model keeps between rounds, whatever it runs on: how many tokens of each request it has
/// computed KV for from real (non-draft) tokens.
#[derive(Default)]
pub struct DraftRounds {
    computed: HashMap<String, usize>,
}

impl DraftRounds {
    /// One drafting round after a step (see the module docs): picks the requests of `out` that sampled and
    /// that `plan` asks drafts for, feeds each the tokens the draft has not seen through `forward` (which
    /// returns the argmax after each sequence's last token), then feeds back each draft until there are
    /// `num_speculative_tokens`. A request stops drafting where its block table or the model's positions
    /// end; one that would overflow a forward's limits waits for a later round.
    pub fn propose<S, E>(
        &mut self,
        plan: &SchedulerOutput,
        out: &ModelRunnerOutput,
        reqs: &RunnerRequests<S>,
        block_size: usize,
        limits: &DraftLimits,
        mut forward: impl FnMut(&[DraftSeq<'_>]) -> Result<Vec<u32>, E>,
    ) -> Result<Vec<Vec<u32>>, E> {
        for id in plan.finished_req_ids.iter().chain(&plan.preempted_req_ids) {
            self.computed.remove(id);
        }
        for new in &plan.scheduled_new_reqs {
            // Fresh blocks, or prefix-cache blocks whose draft KV may never have been written.
            self.computed.remove(&new.req_id);
        }
        let wanted: HashSet<&str> = plan.spec_propose_req_ids.iter().map(String::as_str).collect();
        let mut drafts = vec![Vec::new(); out.req_ids.len()];
        let capacity = |table: &[u32]| (table.len() * block_size).min(limits.max_positions.max(1));
        // (row of `out`, real tokens)
        let mut items: Vec<(usize, &[u32])> = Vec::new();
        let mut seqs: Vec<DraftSeq<'_>> = Vec::new();
        let mut budget = limits.max_tokens;
        for (ri, id) in out.req_ids.iter().enumerate() {
            if out.sampled_token_ids[ri].is_empty() || !wanted.contains(id.as_str()) {
                continue;
            }
            let Some(st) = reqs.get(id) else { continue };
            let (tokens, table) = (st.token_ids.as_slice(), st.block_table.as_slice());
            let len = tokens.len();
            if len == 0 || len > capacity(table) || seqs.len() == limits.max_seqs {
                continue;
            }
            let start = self.computed.get(id.as_str()).copied().unwrap_or(0).min(len - 1);
            if len - start > budget {
                continue;
            }
            budget -= len - start;
            // A draft vocabulary may be shorter than the target's (padding rows): ids past it are never
            // real text, so any in-range id keeps the draft running.
            let fed = tokens[start..].iter().map(|&t| if (t as usize) < limits.vocab_size { t } else { 0 }).collect();
            seqs.push(DraftSeq { item: items.len(), tokens: fed, first_pos: start, table });
            items.push((ri, tokens));
            self.computed.insert(id.clone(), len);
        }
        let mut step = 0;
        while !seqs.is_empty() {
            let next = forward(&seqs)?;
            for (seq, &tok) in seqs.iter().zip(&next) {
                drafts[items[seq.item].0].push(tok);
            }
            step += 1;
            if step == limits.num_speculative_tokens {
                break;
            }
            // Feed each draft at the position it would take, where a slot was reserved for it.
            seqs = seqs
                .into_iter()
                .zip(next)
                .filter_map(|(seq, tok)| {
                    let pos = items[seq.item].1.len() + step - 1;
                    (pos < capacity(seq.table)).then_some(DraftSeq { tokens: vec![tok], first_pos: pos, ..seq })
                })
                .collect();
        }
        Ok(drafts)
    }
}

/// A small model drafting greedily on the CPU, with a KV cache laid out like the target's.
pub struct DraftModel {
    model: Arc<LlamaModel>,
    kv: KvCache,
    ws: Workspace,
    num_speculative_tokens: usize,
    rounds: DraftRounds,
}

impl DraftModel {
    /// A draft model over `num_blocks` blocks of `block_size` tokens of `kv_dtype` (the target's cache
    /// geometry and element type).
    pub fn new(
        model: Arc<LlamaModel>,
        num_blocks: usize,
        block_size: usize,
        kv_dtype: KvDType,
        num_speculative_tokens: usize,
    ) -> Self {
        let kv = KvCache::new(&model.config, num_blocks, block_size, kv_dtype);
        DraftModel { model, kv, ws: Workspace::default(), num_speculative_tokens, rounds: DraftRounds::default() }
    }

    fn propose<S>(
        &mut self,
        plan: &SchedulerOutput,
        out: &ModelRunnerOutput,
        reqs: &RunnerRequests<S>,
        block_size: usize,
    ) -> Vec<Vec<u32>> {
        let DraftModel { model, kv, ws, num_speculative_tokens, rounds } = self;
        let limits = DraftLimits {
            max_positions: model.config.max_position_embeddings,
            vocab_size: model.config.vocab_size,
            max_tokens: usize::MAX,
            max_seqs: usize::MAX,
            num_speculative_tokens: *num_speculative_tokens,
        };
        let forward = |seqs: &[DraftSeq<'_>]| Ok::<_, Infallible>(forward_argmax(model, kv, ws, seqs, block_size));
        match rounds.propose(plan, out, reqs, block_size, &limits, forward) {
            Ok(drafts) => drafts,
            Err(never) => match never {},
        }
    }
}

/// One forward of `seqs` and the argmax after each sequence's last token.
fn forward_argmax(
    model: &LlamaModel,
    kv: &mut KvCache,
    ws: &mut Workspace,
    seqs: &[DraftSeq<'_>],
    block_size: usize,
) -> Vec<u32> {
    let (mut token_ids, mut positions, mut slots, mut rows) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut spans = Vec::with_capacity(seqs.len());
    for seq in seqs {
        let query_start = token_ids.len();
        for (j, &t) in seq.tokens.iter().enumerate() {
            let pos = seq.first_pos + j;
            token_ids.push(t);
            positions.push(pos);
            slots.push(seq.table[pos / block_size] as usize * block_size + pos % block_size);
        }
        rows.push(token_ids.len() - 1);
        spans.push(SeqSpan {
            query_start,
            query_len: seq.tokens.len(),
            context_len: seq.first_pos + seq.tokens.len(),
            block_table: seq.table,
        });
    }
    let batch = ForwardBatch {
        token_ids: &token_ids,
        positions: &positions,
        slot_mapping: &slots,
        seqs: &spans,
        logits_rows: &rows,
    };
    model.forward(&batch, kv, ws);
    let vocab = model.config.vocab_size;
    (0..seqs.len()).map(|r| argmax(&ws.logits[r * vocab..(r + 1) * vocab])).collect()
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
