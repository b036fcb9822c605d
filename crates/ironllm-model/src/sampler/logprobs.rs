//! Log-probabilities under the raw model distribution: the chosen token's logprob and rank, plus the
//! top-k candidates, for one row of logits.
//!
//! These follow vLLM's default `logprobs_mode = raw_logprobs`: they are the `log_softmax` of the model's
//! output before any processor, penalty or temperature, so the values a client sees do not depend on its
//! sampling settings. The chosen token's rank is vLLM's: the number of tokens whose logprob is at least
//! the chosen one's (1 = most likely; among ties it is the last tied position). The top-k candidates
//! are ordered by descending logprob, lowest id first among ties, and ranked 1..=k by position.

use ironllm_core::outputs::{PositionLogprobs, TokenLogprob};

use super::math::{max_value, sum_exp_shifted};
use super::select::largest_into;

/// `log(sum(exp(x)))` over the row, stable: everything is shifted by the maximum first.
fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = max_value(logits);
    if !max.is_finite() {
        return max;
    }
    max + sum_exp_shifted(logits, max).ln() as f32
}

/// The chosen token's logprob and rank plus the top `k` candidates, all under `log_softmax(logits)`.
pub(super) fn position_logprobs(logits: &[f32], chosen: u32, k: usize) -> PositionLogprobs {
    let lse = log_sum_exp(logits);
    let chosen_logit = logits.get(chosen as usize).copied().unwrap_or(f32::NEG_INFINITY);
    // vLLM counts `logprobs >= chosen_logprob`; comparing logits is the same order.
    let rank = logits.iter().filter(|&&x| x >= chosen_logit).count() as u32;
    let mut top_logits = Vec::new();
    largest_into(logits, k, &mut top_logits);
    let top = top_logits
        .into_iter()
        .enumerate()
        .map(|(i, (x, token_id))| TokenLogprob { token_id, logprob: x - lse, rank: i as u32 + 1 })
        .collect();
    PositionLogprobs { chosen: TokenLogprob { token_id: chosen, logprob: chosen_logit - lse, rank }, top }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_softmax_f64(xs: &[f32]) -> Vec<f64> {
        let max = xs.iter().map(|&x| f64::from(x)).fold(f64::NEG_INFINITY, f64::max);
        let lse = max + xs.iter().map(|&x| (f64::from(x) - max).exp()).sum::<f64>().ln();
        xs.iter().map(|&x| f64::from(x) - lse).collect()
    }

    #[test]
    fn values_are_log_softmax_and_ranks_count_ties() {
        let logits = [0.5, 3.0, -1.0, 3.0, 2.0];
        let want = log_softmax_f64(&logits);
        let got = position_logprobs(&logits, 4, 3);
        assert_eq!(got.chosen.token_id, 4);
        assert!((f64::from(got.chosen.logprob) - want[4]).abs() < 1e-6);
        assert_eq!(got.chosen.rank, 3);
        let ids: Vec<u32> = got.top.iter().map(|t| t.token_id).collect();
        assert_eq!(ids, [1, 3, 4]);
        let ranks: Vec<u32> = got.top.iter().map(|t| t.rank).collect();
        assert_eq!(ranks, [1, 2, 3]);
        for t in &got.top {
            assert!((f64::from(t.logprob) - want[t.token_id as usize]).abs() < 1e-6);
        }
        // Among tied maxima vLLM's ">=" count gives both rank 2.
        assert_eq!(position_logprobs(&logits, 1, 0).chosen.rank, 2);
        assert!(position_logprobs(&logits, 1, 0).top.is_empty());
    }

    #[test]
    fn chosen_token_outside_the_top_k() {
        let logits = [0.5, 3.0, -1.0, 2.5, 2.0];
        let got = position_logprobs(&logits, 2, 2);
        assert_eq!(got.chosen.rank, 5);
        assert_eq!(got.top.iter().map(|t| t.token_id).collect::<Vec<_>>(), [1, 3]);
    }

    #[test]
    fn large_k_path_matches_the_window_path() {
        let logits: Vec<f32> = (0..3000).map(|i| ((i * 7919) % 1013) as f32 / 100.0).collect();
        let top = |k| {
            let mut out = Vec::new();
            largest_into(&logits, k, &mut out);
            out
        };
        let window = top(64);
        let selected = top(500);
        assert_eq!(window[..], selected[..64]);
        assert!(selected.windows(2).all(|w| w[0].0 > w[1].0 || (w[0].0 == w[1].0 && w[0].1 < w[1].1)));
        let mut out = Vec::new();
        largest_into(&logits[..10], 100, &mut out);
        assert_eq!(out.len(), 10);
    }
}
