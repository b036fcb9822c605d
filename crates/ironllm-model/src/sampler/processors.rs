//! The logits processors that can change which token is the argmax, applied to one row in vLLM V1's
//! order: allowed-token mask, bad words, min-tokens, logit bias, then the repetition, frequency and
//! presence penalties.
//!
//! Each one touches only the ids it names (the allowed mask aside), so a request that uses none of them
//! pays nothing, and one that uses them pays in proportion to its own lists, not to the vocabulary.
//! Masked tokens are set to `-inf`, which every later stage (penalties, temperature, softmax) preserves.

use ironllm_core::SamplingParams;

use super::state::SamplerState;

/// Whether any processor in this module would change the row for this step. When none does, a greedy
/// row is a single argmax pass over the model's logits.
pub(super) fn any_active(params: &SamplingParams, output_token_ids: &[u32]) -> bool {
    params.allowed_token_ids.is_some()
        || !params.bad_words_token_ids.is_empty()
        || min_tokens_active(params, output_token_ids)
        || !params.logit_bias.is_empty()
        || params.has_penalties()
}

fn min_tokens_active(params: &SamplingParams, output_token_ids: &[u32]) -> bool {
    output_token_ids.len() < params.min_tokens && !(params.eos_token_ids.is_empty() && params.stop_token_ids.is_empty())
}

/// Sets `logits[token_id]` when the id is inside the row. Ids are validated against the vocabulary at
/// the edge, so an id out of range here is a configuration mismatch we ignore rather than panic on.
fn set(logits: &mut [f32], token_id: u32, f: impl FnOnce(f32) -> f32) {
    if let Some(x) = logits.get_mut(token_id as usize) {
        *x = f(*x);
    }
}

/// Applies every active processor to one row of logits (`[vocab]`), in vLLM V1's order.
/// `kept` is scratch for the allowed-token mask.
pub(super) fn apply(
    logits: &mut [f32],
    params: &SamplingParams,
    prompt_token_ids: &[u32],
    output_token_ids: &[u32],
    state: &mut SamplerState,
    kept: &mut Vec<(u32, f32)>,
) {
    if let Some(allowed) = &params.allowed_token_ids {
        apply_allowed_token_ids(logits, allowed, kept);
    }
    apply_bad_words(logits, &params.bad_words_token_ids, output_token_ids);
    if min_tokens_active(params, output_token_ids) {
        apply_min_tokens(logits, params);
    }
    for (&token_id, &bias) in &params.logit_bias {
        set(logits, token_id, |x| x + bias);
    }
    if params.has_penalties() {
        state.update_token_stats(prompt_token_ids, output_token_ids);
        apply_penalties(logits, params, state);
    }
}

/// Everything outside `allowed` becomes `-inf`. The allowed values are saved and restored around a
/// fill, which is one vectorised pass instead of a membership test per vocabulary entry.
fn apply_allowed_token_ids(logits: &mut [f32], allowed: &[u32], kept: &mut Vec<(u32, f32)>) {
    kept.clear();
    kept.extend(allowed.iter().filter_map(|&id| logits.get(id as usize).map(|&x| (id, x))));
    logits.fill(f32::NEG_INFINITY);
    for &(id, x) in kept.iter() {
        logits[id as usize] = x;
    }
}

/// Bans the last token of every bad-word sequence whose other tokens are exactly the end of the output
/// (so a one-token bad word is always banned). As in vLLM, only generated tokens count as "the end of the
/// output": a bad word cannot be completed across the prompt/output boundary.
fn apply_bad_words(logits: &mut [f32], bad_words_token_ids: &[Vec<u32>], output_token_ids: &[u32]) {
    for word in bad_words_token_ids {
        if let Some((&last, prefix)) = word.split_last() {
            if output_token_ids.ends_with(prefix) {
                set(logits, last, |_| f32::NEG_INFINITY);
            }
        }
    }
}

/// While the output is shorter than `min_tokens`, the tokens that would stop the request are banned:
/// the stop token ids and the EOS ids. vLLM bans the EOS ids even with `ignore_eos` (its
/// `_all_stop_token_ids` always includes the model's EOS): `ignore_eos` only means "EOS does not stop";
/// not generating EOS during the first `min_tokens` tokens is still what the user asked for.
fn apply_min_tokens(logits: &mut [f32], params: &SamplingParams) {
    for &token_id in params.eos_token_ids.iter().chain(&params.stop_token_ids) {
        set(logits, token_id, |_| f32::NEG_INFINITY);
    }
}

/// vLLM's penalties: the repetition penalty (the CTRL paper's) over every token seen in the prompt or
/// the output, dividing positive logits and multiplying the others; then OpenAI's frequency penalty
/// (times the count) and presence penalty (once) over output tokens only.
fn apply_penalties(logits: &mut [f32], params: &SamplingParams, state: &SamplerState) {
    let prompt_set: &[u32] = state.prompt_token_set.as_deref().unwrap_or(&[]);
    let repetition = params.repetition_penalty;
    if repetition != 1.0 {
        let penalise = |x: f32| {
            if x > 0.0 {
                x / repetition
            } else {
                x * repetition
            }
        };
        for &token_id in prompt_set {
            set(logits, token_id, penalise);
        }
        // Output tokens that also occur in the prompt were penalised above; once per token, as vLLM's
        // `prompt_mask | output_mask` does.
        for &token_id in state.output_token_counts.keys() {
            if prompt_set.binary_search(&token_id).is_err() {
                set(logits, token_id, penalise);
            }
        }
    }
    let frequency = params.frequency_penalty;
    let presence = params.presence_penalty;
    if frequency != 0.0 || presence != 0.0 {
        for (&token_id, &count) in &state.output_token_counts {
            // Two subtractions, in vLLM's order, so the rounding matches its two tensor ops.
            set(logits, token_id, |x| x - frequency * count as f32 - presence);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const NEG: f32 = f32::NEG_INFINITY;

    fn run(params: &SamplingParams, prompt: &[u32], output: &[u32], logits: &[f32]) -> Vec<f32> {
        let mut row = logits.to_vec();
        let mut state = SamplerState::default();
        apply(&mut row, params, prompt, output, &mut state, &mut Vec::new());
        row
    }

    #[test]
    fn no_processor_leaves_the_row_alone() {
        let params = SamplingParams::default();
        assert!(!any_active(&params, &[]));
        assert_eq!(run(&params, &[1, 2], &[3], &[1.0, 2.0, 3.0, 4.0]), [1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn allowed_token_ids_mask_everything_else() {
        let params = SamplingParams { allowed_token_ids: Some(vec![1, 3]), ..Default::default() };
        assert_eq!(run(&params, &[], &[], &[5.0, 1.0, 7.0, 2.0]), [NEG, 1.0, NEG, 2.0]);
    }

    #[test]
    fn bad_words_ban_the_last_token_when_the_prefix_matches() {
        let params =
            SamplingParams { bad_words_token_ids: vec![vec![2], vec![0, 1, 3], vec![4, 1, 0]], ..Default::default() };
        let logits = [1.0; 5];
        // [2] is always banned; [0, 1, 3] bans 3 after "... 0 1"; [4, 1, 0] does not match.
        assert_eq!(run(&params, &[], &[4, 0, 1], &logits), [1.0, 1.0, NEG, NEG, 1.0]);
        // Prefix not at the end of the output: only the single-token word.
        assert_eq!(run(&params, &[], &[0, 1, 4], &logits), [1.0, 1.0, NEG, 1.0, 1.0]);
        // The prompt does not count towards a prefix.
        assert_eq!(run(&params, &[0], &[1], &logits), [1.0, 1.0, NEG, 1.0, 1.0]);
        // Output shorter than the prefix.
        assert_eq!(run(&params, &[], &[1], &logits), [1.0, 1.0, NEG, 1.0, 1.0]);
    }

    #[test]
    fn min_tokens_bans_eos_and_stop_ids_until_reached() {
        let params = SamplingParams {
            min_tokens: 2,
            eos_token_ids: vec![0],
            stop_token_ids: vec![3],
            ignore_eos: true,
            ..Default::default()
        };
        let logits = [9.0, 1.0, 2.0, 8.0];
        assert!(any_active(&params, &[7]));
        assert_eq!(run(&params, &[], &[7], &logits), [NEG, 1.0, 2.0, NEG]);
        assert!(!any_active(&params, &[7, 7]));
        assert_eq!(run(&params, &[], &[7, 7], &logits), logits);
    }

    #[test]
    fn logit_bias_is_added() {
        let params = SamplingParams { logit_bias: BTreeMap::from([(0, -1.5), (2, 10.0)]), ..Default::default() };
        assert_eq!(run(&params, &[], &[], &[1.0, 1.0, 1.0]), [-0.5, 1.0, 11.0]);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits_once() {
        let params = SamplingParams { repetition_penalty: 2.0, ..Default::default() };
        // Token 0 in the prompt, 1 in the output (twice), 2 in both, 3 in neither.
        let got = run(&params, &[0, 2], &[1, 2, 1], &[4.0, -4.0, 6.0, 3.0]);
        assert_eq!(got, [2.0, -8.0, 3.0, 3.0]);
    }

    #[test]
    fn frequency_and_presence_penalties_use_output_tokens_only() {
        let params = SamplingParams { frequency_penalty: 0.5, presence_penalty: 0.25, ..Default::default() };
        // Token 0 only in the prompt; token 1 three times in the output; token 2 once.
        let got = run(&params, &[0], &[1, 2, 1, 1], &[1.0, 1.0, 1.0, 1.0]);
        assert_eq!(got, [1.0, 1.0 - 1.5 - 0.25, 1.0 - 0.5 - 0.25, 1.0]);
    }

    #[test]
    fn penalty_counts_accumulate_across_steps() {
        let params = SamplingParams { frequency_penalty: 1.0, ..Default::default() };
        let mut state = SamplerState::default();
        let mut scratch = Vec::new();
        let mut row = vec![0.0; 3];
        apply(&mut row, &params, &[], &[1], &mut state, &mut scratch);
        assert_eq!(row, [0.0, -1.0, 0.0]);
        let mut row = vec![0.0; 3];
        apply(&mut row, &params, &[], &[1, 1, 2], &mut state, &mut scratch);
        assert_eq!(row, [0.0, -2.0, -1.0]);
    }

    #[test]
    fn processors_run_in_vllm_order() {
        // Bias before penalties: (1 + 1) / 2 = 1, not 1 / 2 + 1 = 1.5.
        let params =
            SamplingParams { logit_bias: BTreeMap::from([(0, 1.0)]), repetition_penalty: 2.0, ..Default::default() };
        assert_eq!(run(&params, &[0], &[], &[1.0, 0.0]), [1.0, 0.0]);
    }
}
