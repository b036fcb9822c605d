//! Per-request sampling state that the model runner keeps across steps: the request's generator and the
//! token statistics the penalties need.
//!
//! Invariant: a request's `n`-th sampled output position consumes the `n`-th uniform of its generator.
//! The state counts its draws and, when it is recreated for a request that already has output (a request
//! resumed after preemption), skips ahead before drawing, so a seeded request's tokens depend only on its
//! seed and output position, not on the batch, the thread schedule, or whether it was preempted.

use std::collections::HashMap;

use ironllm_core::SamplingParams;

use super::rng::Rng;

/// Per-request sampling state the model runner keeps across steps.
#[derive(Debug, Clone, Default)]
pub struct SamplerState {
    /// The request's own generator: seeded from `params.seed`, else once from the engine's generator.
    /// `None` for a greedy request, which never draws (it is created lazily if a row needs one).
    pub generator: Option<Rng>,
    /// Draws taken from `generator` so far, i.e. the output position the next draw belongs to.
    pub(super) num_draws: usize,
    /// Sorted, deduplicated prompt token ids (repetition penalty only); built at the first step that
    /// needs it, because the state is created before the runner hands over the prompt.
    pub(super) prompt_token_set: Option<Vec<u32>>,
    /// Occurrences of each token in `output_token_ids[..num_counted_output_tokens]` (penalties only).
    /// Sparse: a request touches few of the vocabulary's ids, and updating a map with the step's new
    /// tokens is cheaper than rebuilding a `[vocab]` histogram every step.
    pub(super) output_token_counts: HashMap<u32, u32>,
    pub(super) num_counted_output_tokens: usize,
}

impl SamplerState {
    /// State for a request seen for the first time. A request with a seed gets a generator from that
    /// seed alone; one without a seed and with a temperature gets a generator seeded by one draw from
    /// `engine_rng`; a greedy one gets none and leaves `engine_rng` untouched.
    pub fn new(params: &SamplingParams, engine_rng: &mut Rng) -> Self {
        let generator = match params.seed {
            Some(seed) => Some(Rng::seeded(seed)),
            None if params.is_greedy() => None,
            None => Some(Rng::seeded(engine_rng.next_u64())),
        };
        SamplerState { generator, ..SamplerState::default() }
    }

    /// How often `token_id` occurs in the output tokens the penalties have counted so far.
    pub fn output_token_count(&self, token_id: u32) -> u32 {
        self.output_token_counts.get(&token_id).copied().unwrap_or(0)
    }

    /// The uniform for the output position `num_output_tokens`. `Sampler::sample` gives every
    /// non-greedy row a generator before it gets here; the seed-or-zero fallback only keeps this total.
    pub(super) fn draw(&mut self, params: &SamplingParams, num_output_tokens: usize) -> f64 {
        let generator = self.generator.get_or_insert_with(|| Rng::seeded(params.seed.unwrap_or(0)));
        // A recreated state (after preemption) starts at zero draws while the request already has
        // output; skipping keeps draw n tied to output position n. If the output shrank instead (a
        // caller rolled tokens back) a generator cannot rewind, so we simply continue.
        if self.num_draws < num_output_tokens {
            generator.skip(num_output_tokens - self.num_draws);
            self.num_draws = num_output_tokens;
        }
        self.num_draws += 1;
        generator.next_f64()
    }

    /// Brings the prompt set and the output counts up to date with this step's tokens.
    pub(super) fn update_token_stats(&mut self, prompt_token_ids: &[u32], output_token_ids: &[u32]) {
        if self.prompt_token_set.is_none() {
            let mut set = prompt_token_ids.to_vec();
            set.sort_unstable();
            set.dedup();
            self.prompt_token_set = Some(set);
        }
        // Output only grows between steps; if it ever shrank, the counts are rebuilt from scratch.
        if output_token_ids.len() < self.num_counted_output_tokens {
            self.output_token_counts.clear();
            self.num_counted_output_tokens = 0;
        }
        for &token_id in &output_token_ids[self.num_counted_output_tokens..] {
            *self.output_token_counts.entry(token_id).or_insert(0) += 1;
        }
        self.num_counted_output_tokens = output_token_ids.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_requests_ignore_the_engine_rng_and_greedy_ones_do_not_consume_it() {
        let seeded = SamplingParams { seed: Some(9), ..Default::default() };
        let mut engine_rng = Rng::seeded(1);
        let a = SamplerState::new(&seeded, &mut engine_rng);
        assert_eq!(engine_rng, Rng::seeded(1));
        assert_eq!(a.generator, Some(Rng::seeded(9)));

        let greedy = SamplingParams::greedy(4);
        assert!(SamplerState::new(&greedy, &mut engine_rng).generator.is_none());
        assert_eq!(engine_rng, Rng::seeded(1));

        let unseeded = SamplingParams::default();
        let b = SamplerState::new(&unseeded, &mut engine_rng);
        let c = SamplerState::new(&unseeded, &mut engine_rng);
        assert_ne!(b.generator, c.generator);
    }

    #[test]
    fn counts_follow_appended_output_and_rebuild_on_shrink() {
        let mut state = SamplerState::default();
        state.update_token_stats(&[5, 3, 5], &[1, 2, 1]);
        assert_eq!(state.prompt_token_set.as_deref(), Some(&[3, 5][..]));
        assert_eq!(state.output_token_count(1), 2);
        state.update_token_stats(&[5, 3, 5], &[1, 2, 1, 2, 7]);
        assert_eq!(state.output_token_count(2), 2);
        assert_eq!(state.output_token_count(7), 1);
        state.update_token_stats(&[5, 3, 5], &[4]);
        assert_eq!(state.output_token_count(1), 0);
        assert_eq!(state.output_token_count(4), 1);
    }

    #[test]
    fn draws_are_tied_to_output_positions() {
        let params = SamplingParams { seed: Some(3), ..Default::default() };
        let mut engine_rng = Rng::seeded(0);
        let mut fresh = SamplerState::new(&params, &mut engine_rng);
        let all: Vec<f64> = (0..5).map(|pos| fresh.draw(&params, pos)).collect();
        // A state recreated at position 3 (resumed after preemption) continues with draw 3.
        let mut resumed = SamplerState::new(&params, &mut engine_rng);
        assert_eq!(resumed.draw(&params, 3), all[3]);
        assert_eq!(resumed.draw(&params, 4), all[4]);
    }
}
