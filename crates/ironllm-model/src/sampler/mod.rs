//! The batch sampler of the CPU model runner: one token (and, on request, its logprobs) per row of
//! logits, with vLLM V1's semantics.
//!
//! Per row, in vLLM V1's order:
//! 0. a structured-output row's grammar bitmask (tokens the grammar forbids become `-inf`), before any
//!    logits processor, as vLLM applies it;
//! 1. logprobs to return are taken from the raw logits (`log_softmax` of the model output, vLLM's
//!    default `logprobs_mode = raw_logprobs`), only when `params.logprobs` is set;
//! 2. the allowed-token mask, 3. bad words, 4. min-tokens, 5. logit bias, 6. repetition, frequency and
//!    presence penalties (`processors`);
//! 7. greedy rows (`temperature < 1e-5`) take the argmax; the others are scaled by the temperature,
//!    truncated by min-p, top-k and top-p, and drawn from with one uniform of the row's own generator
//!    (`select`).
//!
//! Invariants: a row's token depends only on its own logits, parameters, token history and generator,
//! never on the other rows or on which thread ran it, so rows run in parallel with rayon; a seeded
//! request's `n`-th token uses the `n`-th draw of a generator built from its seed ([`SamplerState`]),
//! so it is reproducible whatever batch it runs in. Scratch buffers are kept per row slot and reused,
//! so steady-state steps allocate only the returned tokens and logprobs.
//!
//! Where this differs from vLLM on purpose: vLLM draws with the exponential-race trick on the GPU
//! (`probs / Exp(1)`, argmax); we draw by inverse CDF, which needs one uniform per row and gives the
//! same distribution. Unseeded requests get their own generator seeded once from the engine's, rather
//! than sharing a global one, so their draws too are independent of batch order.

mod logprobs;
mod math;
mod processors;
pub mod rejection;
mod rng;
mod select;
mod state;

#[cfg(test)]
mod tests;

use ironllm_core::outputs::PositionLogprobs;
use ironllm_core::SamplingParams;
use rayon::prelude::*;

pub use rng::Rng;
pub use state::SamplerState;

/// One row of the batch to sample: the request's parameters, its tokens so far and its state.
pub struct SamplingRow<'a> {
    pub params: &'a SamplingParams,
    pub prompt_token_ids: &'a [u32],
    pub output_token_ids: &'a [u32],
    pub state: &'a mut SamplerState,
}

/// The token sampled for one row, with its logprobs when the request asked for them.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub token_id: u32,
    pub logprobs: Option<PositionLogprobs>,
}

/// Reusable buffers for one row slot of the batch.
#[derive(Debug, Default)]
struct RowScratch {
    /// Copy of the raw logits (`[vocab]`), kept only when logprobs are requested and the row is about
    /// to be modified, because the chosen token's raw logprob and rank are known only after sampling.
    raw_logits: Vec<f32>,
    /// `(logit, token_id)` candidates for top-k / top-p.
    candidates: Vec<(f32, u32)>,
    /// Saved values for the allowed-token mask.
    allowed: Vec<(u32, f32)>,
}

/// The batch sampler. Holds per-row scratch, grown to the largest batch seen and then reused.
#[derive(Debug)]
pub struct Sampler {
    vocab_size: usize,
    scratch: Vec<RowScratch>,
}

impl Sampler {
    pub fn new(vocab_size: usize) -> Self {
        Sampler { vocab_size, scratch: Vec::new() }
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Samples one token per row. `logits` is `[rows.len(), vocab]` row-major and is used as scratch
    /// (modified in place). `engine_rng` seeds the generator of a non-greedy row that has none yet
    /// (normally [`SamplerState::new`] has already done so); it is consulted in row order, before the
    /// parallel part, so the outcome does not depend on scheduling.
    ///
    /// # Panics
    /// If `logits.len() != rows.len() * vocab_size`.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        rows: &mut [SamplingRow<'_>],
        engine_rng: &mut Rng,
    ) -> Vec<SampledToken> {
        self.sample_with_masks(logits, rows, &[], engine_rng)
    }

    /// [`Sampler::sample`] with structured-output bitmasks: `masks[i]`, when given, is row `i`'s
    /// allowed-token bitmask (bit `t % 32` of word `t / 32` set when token `t` may be sampled;
    /// `vocab_size.div_ceil(32)` words). Rows past `masks.len()` and `None` rows are unconstrained and
    /// their logits are not touched, so they sample exactly what they would alone.
    ///
    /// # Panics
    /// If `logits.len() != rows.len() * vocab_size` or a mask is shorter than the vocabulary.
    pub fn sample_with_masks(
        &mut self,
        logits: &mut [f32],
        rows: &mut [SamplingRow<'_>],
        masks: &[Option<&[u32]>],
        engine_rng: &mut Rng,
    ) -> Vec<SampledToken> {
        let vocab_size = self.vocab_size;
        for mask in masks.iter().flatten() {
            assert!(mask.len() * 32 >= vocab_size, "a bitmask must cover the vocabulary ({vocab_size} tokens)");
        }
        let mask_of = |i: usize| masks.get(i).copied().flatten();
        assert_eq!(
            logits.len(),
            rows.len() * vocab_size,
            "logits must be [num_rows={}, vocab_size={vocab_size}]",
            rows.len()
        );
        if rows.is_empty() {
            return Vec::new();
        }
        for row in rows.iter_mut() {
            if row.state.generator.is_none() && !row.params.is_greedy() {
                let seed = row.params.seed.unwrap_or_else(|| engine_rng.next_u64());
                row.state.generator = Some(Rng::seeded(seed));
            }
        }
        if self.scratch.len() < rows.len() {
            self.scratch.resize_with(rows.len(), RowScratch::default);
        }
        let scratch = &mut self.scratch[..rows.len()];
        if rows.len() >= 2 {
            logits
                .par_chunks_mut(vocab_size)
                .zip(rows.par_iter_mut())
                .zip(scratch.par_iter_mut())
                .enumerate()
                .map(|(i, ((row_logits, row), scratch))| sample_row(row_logits, row, mask_of(i), scratch))
                .collect()
        } else {
            vec![sample_row(logits, &mut rows[0], mask_of(0), &mut scratch[0])]
        }
    }

    /// Prompt logprobs: for each row `i` of `logits` (`[targets.len(), vocab]`, raw model output), the
    /// logprob and rank of `targets[i]` plus the top `k` candidates.
    ///
    /// # Panics
    /// If `logits.len() != targets.len() * vocab_size`.
    pub fn prompt_logprobs(&mut self, logits: &[f32], targets: &[u32], k: usize) -> Vec<PositionLogprobs> {
        let vocab_size = self.vocab_size;
        assert_eq!(
            logits.len(),
            targets.len() * vocab_size,
            "logits must be [num_targets={}, vocab_size={vocab_size}]",
            targets.len()
        );
        if targets.len() >= 2 {
            logits
                .par_chunks(vocab_size)
                .zip(targets.par_iter())
                .map(|(row, &target)| logprobs::position_logprobs(row, target, k))
                .collect()
        } else {
            logits
                .chunks(vocab_size)
                .zip(targets)
                .map(|(row, &target)| logprobs::position_logprobs(row, target, k))
                .collect()
        }
    }
}

/// Sets every token whose bit is clear to `-inf` (`logits`: `[vocab]`). Works a 32-token word at a
/// time, and skips words where everything is allowed.
fn apply_bitmask(logits: &mut [f32], mask: &[u32]) {
    for (chunk, &word) in logits.chunks_mut(32).zip(mask) {
        if word == u32::MAX && chunk.len() == 32 {
            continue;
        }
        for (bit, x) in chunk.iter_mut().enumerate() {
            if word & (1 << bit) == 0 {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// The whole pipeline for one row (`logits`: `[vocab]`).
fn sample_row(
    logits: &mut [f32],
    row: &mut SamplingRow<'_>,
    mask: Option<&[u32]>,
    scratch: &mut RowScratch,
) -> SampledToken {
    let params = row.params;
    let greedy = params.is_greedy();
    let processors_active = processors::any_active(params, row.output_token_ids);

    // Greedy with no processor and no grammar: the raw row is the processed row, so one argmax pass,
    // and the logprobs (if any) read the same untouched row.
    if greedy && !processors_active && mask.is_none() {
        let token_id = select::argmax(logits);
        let logprobs = params.logprobs.map(|k| logprobs::position_logprobs(logits, token_id, k));
        return SampledToken { token_id, logprobs };
    }

    // (1) Keep the raw row for the logprobs before anything modifies it.
    if params.logprobs.is_some() {
        scratch.raw_logits.clear();
        scratch.raw_logits.extend_from_slice(logits);
    }
    // (0) The grammar first: later processors then only see tokens the grammar allows.
    if let Some(mask) = mask {
        apply_bitmask(logits, mask);
    }
    // (2)-(6)
    if processors_active {
        processors::apply(logits, params, row.prompt_token_ids, row.output_token_ids, row.state, &mut scratch.allowed);
    }
    // (7)
    let token_id = if greedy {
        select::argmax(logits)
    } else {
        let uniform = row.state.draw(params, row.output_token_ids.len());
        select::sample_random(logits, params, uniform, &mut scratch.candidates)
    };
    let logprobs = params.logprobs.map(|k| logprobs::position_logprobs(&scratch.raw_logits, token_id, k));
    SampledToken { token_id, logprobs }
}
