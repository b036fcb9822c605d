//! Choosing one token from a row of processed logits: greedy argmax, or vLLM V1's random path
//! (temperature, min-p, top-k, top-p, then a draw from the renormalised distribution).
//!
//! The random path works on the row in place (the logits are the caller's scratch) and, when top-k or
//! top-p truncates, on a candidate list of `(logit, token_id)` pairs. A 50k vocabulary is never sorted:
//! top-k finds the k-th largest logit with a k-entry window (or partial selection for large k), and
//! top-p bins the candidates' mass by distance from the maximum and sorts only the bin where the mass
//! crosses `top_p`. The draw is inverse-CDF with exactly one uniform per row; the caller takes the
//! uniform, which is what ties a seeded request's tokens to its seed and output position alone.
//!
//! Ties: greedy takes the lowest id among equal maxima (as `torch.argmax`); top-k keeps every token
//! equal to the k-th largest logit (as vLLM's `logits < kth_value` mask); top-p orders equal logits by
//! id before cutting.

use std::cmp::Ordering;

use ironllm_core::SamplingParams;

use super::math::{exp_nonpositive, exp_shifted_in_place, max_value, sum_exp_shifted};

/// Index of the largest logit, lowest id among ties; 0 for a row with no finite or infinite maximum
/// (every entry NaN or `-inf`), which mirrors `torch.argmax` on a fully masked row.
pub(super) fn argmax(logits: &[f32]) -> u32 {
    // Two vectorised passes (the maximum, then which 32-wide chunk holds it first) beat one scalar
    // pass that tracks value and index together by about 4x on a 50k row.
    let max = max_value(logits);
    let mut chunk_start = 0;
    for chunk in logits.chunks(32) {
        if chunk.iter().fold(false, |found, &x| found | (x == max)) {
            let offset = chunk.iter().position(|&x| x == max).unwrap_or(0);
            return (chunk_start + offset) as u32;
        }
        chunk_start += chunk.len();
    }
    0
}

/// Descending by logit, then ascending by id: a total order, so truncation and the draw are
/// deterministic functions of the row.
pub(super) fn by_logit_desc(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Fills `out` with the `k` largest `(logit, id)` pairs of the row, sorted by [`by_logit_desc`];
/// NaN entries are skipped.
pub(super) fn largest_into(logits: &[f32], k: usize, out: &mut Vec<(f32, u32)>) {
    out.clear();
    let k = k.min(logits.len());
    if k == 0 {
        return;
    }
    if k <= 64 {
        // A sorted window of k entries. After the first few hundred elements almost nothing beats the
        // k-th best, so this is about one compare per element and needs no vocabulary-sized buffer.
        // Once the window is full, a vectorised test skips each 32-wide chunk with nothing above
        // the current k-th value, which is almost every chunk.
        let mut chunk_start = 0;
        for chunk in logits.chunks(32) {
            if out.len() == k {
                let kth = out[k - 1].0;
                if !chunk.iter().fold(false, |above, &x| above | (x > kth)) {
                    chunk_start += chunk.len();
                    continue;
                }
            }
            for (offset, &x) in chunk.iter().enumerate() {
                // Strictly greater: an equal later (higher) id never displaces an earlier one.
                if (out.len() < k || x > out[out.len() - 1].0) && !x.is_nan() {
                    let at = out.partition_point(|&(y, _)| y >= x);
                    out.insert(at, (x, (chunk_start + offset) as u32));
                    out.truncate(k);
                }
            }
            chunk_start += chunk.len();
        }
    } else {
        // Large k: partial selection over the whole row, then sort the head.
        out.extend(logits.iter().enumerate().filter(|(_, x)| !x.is_nan()).map(|(id, &x)| (x, id as u32)));
        if k < out.len() {
            out.select_nth_unstable_by(k - 1, by_logit_desc);
            out.truncate(k);
        }
        out.sort_unstable_by(by_logit_desc);
    }
}

/// The random path for one non-greedy row. `uniform` is the row's draw in `[0, 1)`; `candidates` is
/// scratch. Returns the sampled token id.
pub(super) fn sample_random(
    logits: &mut [f32],
    params: &SamplingParams,
    uniform: f64,
    candidates: &mut Vec<(f32, u32)>,
) -> u32 {
    // vLLM divides by the temperature (greedy rows never get here, so it is > 0).
    if params.temperature != 1.0 {
        let temperature = params.temperature;
        for x in logits.iter_mut() {
            *x /= temperature;
        }
    }
    let max = max_value(logits);
    if max == f32::NEG_INFINITY || max.is_nan() {
        // Every token is masked: there is no distribution to sample from. vLLM would produce NaNs
        // here; we return the argmax fallback so the step stays well defined.
        return argmax(logits);
    }

    // min-p: drop tokens with prob < min_p * max_prob, i.e. exp(x - max) < min_p, i.e.
    // x < max + ln(min_p). Comparing logits avoids an exp per vocabulary entry. The maximum always
    // survives because ln(min_p) <= 0.
    if params.min_p > 0.0 {
        let threshold = max + params.min_p.ln();
        for x in logits.iter_mut() {
            if *x < threshold {
                *x = f32::NEG_INFINITY;
            }
        }
    }

    let vocab_size = logits.len();
    let top_k = params.top_k_enabled().filter(|&k| k < vocab_size);
    let top_p = (params.top_p < 1.0).then_some(params.top_p);
    if top_k.is_none() && top_p.is_none() {
        return draw_from_row(logits, max, uniform);
    }

    // Candidates, in id order: with top-k, the live tokens at or above the k-th largest logit (ties
    // with the k-th included, as vLLM's `logits < kth_value` mask does); with top-p alone, the live
    // tokens that can still belong to the top-p head (see `top_p_reach`).
    let (floor, full_mass) = match (top_k, top_p) {
        (Some(k), _) => {
            largest_into(logits, k, candidates);
            let kth_value = candidates.last().map_or(f32::NEG_INFINITY, |&(x, _)| x);
            (kth_value, None)
        }
        (None, Some(p)) => {
            let total = sum_exp_shifted(logits, max);
            (max - top_p_reach(vocab_size, total, p), Some(total))
        }
        (None, None) => unreachable!("handled above"),
    };
    candidates.clear();
    candidates.extend(
        logits
            .iter()
            .enumerate()
            .filter(|(_, x)| **x >= floor && **x > f32::NEG_INFINITY)
            .map(|(id, &x)| (x, id as u32)),
    );
    let (num_kept, kept_mass) = match top_p {
        Some(p) => {
            // vLLM's top-p mass is relative to the distribution after top-k.
            let total =
                full_mass.unwrap_or_else(|| candidates.iter().map(|&(x, _)| f64::from(exp_nonpositive(x - max))).sum());
            let (n, mass) = top_p_prefix(candidates, max, p, total);
            (n, Some(mass))
        }
        None => (candidates.len(), None),
    };
    draw_from_candidates(&candidates[..num_kept], max, uniform, kept_mass)
}

/// How far below the maximum (in logits) a token can be and still belong to the top-p head, for a row
/// of `vocab_size` tokens whose `exp(x - max)` sum to `total`.
///
/// Tokens more than `reach = ln(vocab_size / ((1 - top_p) * total)) + 1` below the maximum weigh less
/// than `e^-reach` each, so together less than `(1 - top_p) * total / e`; everything above them then
/// holds more than `top_p` of the mass, so the head is complete before reaching them. Dropping them up
/// front turns top-p over a peaked 50k distribution into work over a few hundred candidates.
fn top_p_reach(vocab_size: usize, total: f64, top_p: f32) -> f32 {
    let tail_budget = (1.0 - f64::from(top_p)) * total;
    let reach = (vocab_size as f64 / tail_budget).ln() + 1.0;
    // A top_p within rounding of 1 gives an infinite (or NaN) reach: keep every live token.
    if reach.is_finite() {
        reach.max(0.0) as f32
    } else {
        f32::INFINITY
    }
}

/// Resolution of the top-p histogram: bins of 1/32 logit, covering 32 logits below the maximum (the
/// last bin takes everything further down, whose mass is below e^-32 of the maximum's).
const TOP_P_BINS_PER_LOGIT: f32 = 32.0;
const TOP_P_NUM_BINS: usize = 1024;

fn top_p_bin(x: f32, max: f32) -> usize {
    // `as usize` saturates, so huge distances land in the last bin.
    (((max - x) * TOP_P_BINS_PER_LOGIT) as usize).min(TOP_P_NUM_BINS - 1)
}

/// Reorders `candidates` so that the smallest set of highest-logit tokens holding at least `top_p` of
/// `total` (the sum of `exp(x - max)` over the distribution) comes first. Returns its size (at least
/// one token) and its mass.
///
/// This is vLLM's rule restated: it drops a token when the mass of it and everything below it is
/// `<= 1 - top_p`, which keeps exactly the smallest head with mass `>= top_p`; equal logits are
/// ordered by id. Instead of sorting, one pass builds a histogram of mass by distance from the
/// maximum; every bin above the one where the running mass crosses `top_p` is kept whole, and only the
/// crossing bin is sorted.
fn top_p_prefix(candidates: &mut [(f32, u32)], max: f32, top_p: f32, total: f64) -> (usize, f64) {
    let mut bin_mass = [0.0f64; TOP_P_NUM_BINS];
    for &(x, _) in candidates.iter() {
        bin_mass[top_p_bin(x, max)] += f64::from(exp_nonpositive(x - max));
    }
    let target = f64::from(top_p) * total;
    let mut mass_above = 0.0f64;
    let mut crossing = TOP_P_NUM_BINS - 1;
    for (bin, &mass) in bin_mass.iter().enumerate() {
        if mass_above + mass >= target {
            crossing = bin;
            break;
        }
        mass_above += mass;
    }

    // One three-way partition pass: bins above the crossing, then the crossing bin, then the rest.
    let (mut num_above, mut next, mut rest_start) = (0, 0, candidates.len());
    while next < rest_start {
        let bin = top_p_bin(candidates[next].0, max);
        if bin < crossing {
            candidates.swap(num_above, next);
            num_above += 1;
            next += 1;
        } else if bin == crossing {
            next += 1;
        } else {
            rest_start -= 1;
            candidates.swap(next, rest_start);
        }
    }
    candidates[num_above..rest_start].sort_unstable_by(by_logit_desc);
    let mut mass = mass_above;
    for (i, &(x, _)) in candidates[num_above..rest_start].iter().enumerate() {
        mass += f64::from(exp_nonpositive(x - max));
        if mass >= target {
            return (num_above + i + 1, mass);
        }
    }
    // Rounding left the running sum a hair below the target: keep the whole crossing bin.
    (rest_start.max(1).min(candidates.len()), mass)
}

/// Inverse-CDF draw over the whole row in id order: the row is overwritten with `exp(x - max)` so the
/// exponentials are computed once.
fn draw_from_row(logits: &mut [f32], max: f32, uniform: f64) -> u32 {
    let total = exp_shifted_in_place(logits, max);
    let target = uniform * total;
    let mut cumulative = 0.0f64;
    let mut last_positive = 0;
    for (id, &weight) in logits.iter().enumerate() {
        if weight > 0.0 {
            cumulative += f64::from(weight);
            last_positive = id;
            if cumulative > target {
                return id as u32;
            }
        }
    }
    // Only reachable through rounding (uniform just below 1): the last token with weight.
    last_positive as u32
}

/// Inverse-CDF draw over `kept` in list order. `max` is at least every kept logit; `kept_mass` is the
/// kept set's sum of `exp(x - max)` when the caller already has it.
fn draw_from_candidates(kept: &[(f32, u32)], max: f32, uniform: f64, kept_mass: Option<f64>) -> u32 {
    let total = kept_mass.unwrap_or_else(|| kept.iter().map(|&(x, _)| f64::from(exp_nonpositive(x - max))).sum());
    let target = uniform * total;
    let mut cumulative = 0.0f64;
    for &(x, id) in kept {
        cumulative += f64::from(exp_nonpositive(x - max));
        if cumulative > target {
            return id;
        }
    }
    kept.last().map_or(0, |&(_, id)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOGITS: [f32; 8] = [1.0, 2.0, 0.5, 3.0, -1.0, 0.0, 1.5, 2.5];

    fn softmax(xs: &[f32], temperature: f32) -> Vec<f64> {
        let scaled: Vec<f64> = xs.iter().map(|&x| f64::from(x) / f64::from(temperature)).collect();
        let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = scaled.iter().map(|x| (x - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        exps.iter().map(|e| e / sum).collect()
    }

    /// Frequencies of each token over an evenly spaced grid of uniforms: a deterministic, quasi-Monte
    /// Carlo picture of the distribution the inverse CDF samples from (exact to 1/num_points).
    fn grid_frequencies(params: &SamplingParams, logits: &[f32], num_points: usize) -> Vec<f64> {
        let mut counts = vec![0usize; logits.len()];
        let mut scratch = Vec::new();
        for i in 0..num_points {
            let uniform = (i as f64 + 0.5) / num_points as f64;
            let mut row = logits.to_vec();
            counts[sample_random(&mut row, params, uniform, &mut scratch) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / num_points as f64).collect()
    }

    fn assert_close(got: &[f64], want: &[f64], tolerance: f64) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tolerance, "token {i}: got {g}, want {w}");
        }
    }

    #[test]
    fn argmax_takes_the_lowest_id_among_ties_and_ignores_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.5]), 1);
        let long: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32).collect();
        assert_eq!(argmax(&long) as usize, long.iter().position(|&x| x == 999.0).unwrap());
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
    }

    #[test]
    fn full_vocab_draw_follows_the_softmax() {
        let params = SamplingParams::default();
        let got = grid_frequencies(&params, &LOGITS, 100_000);
        assert_close(&got, &softmax(&LOGITS, 1.0), 2e-5);
    }

    #[test]
    fn temperature_scales_the_logits() {
        let params = SamplingParams { temperature: 0.5, ..Default::default() };
        let got = grid_frequencies(&params, &LOGITS, 100_000);
        assert_close(&got, &softmax(&LOGITS, 0.5), 2e-5);
        let params = SamplingParams { temperature: 2.0, ..Default::default() };
        let got = grid_frequencies(&params, &LOGITS, 100_000);
        assert_close(&got, &softmax(&LOGITS, 2.0), 2e-5);
    }

    #[test]
    fn min_p_drops_tokens_below_the_scaled_maximum() {
        // Probabilities: 3 -> 0.403, 7 -> 0.244, 1 -> 0.148, 6 -> 0.090, ...; min_p 0.3 keeps those
        // with p >= 0.121, i.e. tokens 3, 7 and 1, renormalised.
        let params = SamplingParams { min_p: 0.3, ..Default::default() };
        let got = grid_frequencies(&params, &LOGITS, 100_000);
        let mut want = vec![0.0; 8];
        let z = (3.0f64).exp() + (2.5f64).exp() + (2.0f64).exp();
        want[3] = (3.0f64).exp() / z;
        want[7] = (2.5f64).exp() / z;
        want[1] = (2.0f64).exp() / z;
        assert_close(&got, &want, 2e-5);
    }

    #[test]
    fn top_k_keeps_the_k_largest_and_their_ties() {
        let params = SamplingParams { top_k: 3, ..Default::default() };
        let got = grid_frequencies(&params, &LOGITS, 10_000);
        let kept: Vec<usize> = (0..8).filter(|&i| got[i] > 0.0).collect();
        assert_eq!(kept, [1, 3, 7]);

        let tied = [1.0, 2.0, 2.0, 0.0, 2.0];
        let params = SamplingParams { top_k: 2, ..Default::default() };
        let got = grid_frequencies(&params, &tied, 9_999);
        assert_close(&got, &[0.0, 1.0 / 3.0, 1.0 / 3.0, 0.0, 1.0 / 3.0], 1e-3);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_equal_greedy() {
        for params in
            [SamplingParams { top_k: 1, ..Default::default() }, SamplingParams { top_p: 1e-6, ..Default::default() }]
        {
            let got = grid_frequencies(&params, &LOGITS, 1000);
            assert_eq!(got[argmax(&LOGITS) as usize], 1.0);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_head_with_enough_mass() {
        // Head masses: 0.403, 0.647, 0.795, 0.885 -> top_p 0.8 keeps tokens 3, 7, 1, 6.
        let params = SamplingParams { top_p: 0.8, ..Default::default() };
        let got = grid_frequencies(&params, &LOGITS, 100_000);
        let p = softmax(&LOGITS, 1.0);
        let z = p[3] + p[7] + p[1] + p[6];
        let want: Vec<f64> = (0..8).map(|i| if [3, 7, 1, 6].contains(&i) { p[i] / z } else { 0.0 }).collect();
        assert_close(&got, &want, 2e-5);
    }

    #[test]
    fn top_p_over_a_large_vocabulary_matches_a_full_sort() {
        // 5000 tokens with a slowly decaying distribution: the head for top_p 0.9 spans many bins.
        let logits: Vec<f32> = (0..5000).map(|i| -((i * 37 % 5000) as f32) / 1000.0).collect();
        let mut candidates: Vec<(f32, u32)> = logits.iter().enumerate().map(|(i, &x)| (x, i as u32)).collect();
        let total: f64 = logits.iter().map(|&x| f64::from(x).exp()).sum();
        let (n, _) = top_p_prefix(&mut candidates, 0.0, 0.9, total);
        let mut sorted = logits.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let total: f64 = sorted.iter().map(|&x| f64::from(x).exp()).sum();
        let mut mass = 0.0;
        let want = sorted
            .iter()
            .position(|&x| {
                mass += f64::from(x).exp() / total;
                mass >= 0.9
            })
            .unwrap()
            + 1;
        assert!(n > 1000, "head of {n} tokens should span many bins");
        assert!(n.abs_diff(want) <= 1, "got {n}, want {want}");
        // The kept head is exactly the n largest logits.
        let mut head: Vec<f32> = candidates[..n].iter().map(|c| c.0).collect();
        head.sort_by(|a, b| b.total_cmp(a));
        assert_eq!(head[..], sorted[..n]);
    }

    #[test]
    fn top_p_reach_drops_only_tokens_outside_the_head() {
        // A 50k row: 34 tokens 4 to 6 logits above a long tail that falls away over 30 logits. The
        // top-p 0.9 head takes the 34 and part of the tail.
        let vocab_size = 50_000;
        let logits: Vec<f32> = (0..vocab_size)
            .map(|i| {
                let spread = ((i * 7919) % 10_007) as f32 / 10_007.0;
                if i % 1500 == 0 {
                    6.0 - 2.0 * spread
                } else {
                    0.3 - 30.0 * spread
                }
            })
            .collect();
        let max = max_value(&logits);
        let total = sum_exp_shifted(&logits, max);
        let floor = max - top_p_reach(vocab_size, total, 0.9);
        let mut candidates: Vec<(f32, u32)> =
            logits.iter().enumerate().filter(|(_, &x)| x >= floor).map(|(i, &x)| (x, i as u32)).collect();
        assert!(candidates.len() < vocab_size / 4, "{} candidates", candidates.len());
        let (n, _) = top_p_prefix(&mut candidates, max, 0.9, total);
        let mut kept: Vec<u32> = candidates[..n].iter().map(|c| c.1).collect();
        kept.sort_unstable();

        // Reference: sort everything, accumulate in f64.
        let mut order: Vec<u32> = (0..vocab_size as u32).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        let weights: Vec<f64> = logits.iter().map(|&x| f64::from(x - max).exp()).collect();
        let total_ref: f64 = weights.iter().sum();
        let mut mass = 0.0;
        let head = order
            .iter()
            .position(|&i| {
                mass += weights[i as usize] / total_ref;
                mass >= 0.9
            })
            .unwrap();
        let mut want = order[..=head].to_vec();
        want.sort_unstable();
        assert_eq!(kept, want);
        // The head reaches into the tail, so the prefilter's cut really mattered.
        assert!(want.len() > 1000, "head of {}", want.len());
    }

    #[test]
    fn top_k_and_top_p_compose_over_the_renormalised_top_k() {
        // top_k 3 leaves {3, 7, 1} with masses 0.506, 0.307, 0.186: top_p 0.7 keeps {3, 7}.
        let params = SamplingParams { top_k: 3, top_p: 0.7, ..Default::default() };
        let got = grid_frequencies(&params, &LOGITS, 10_000);
        let kept: Vec<usize> = (0..8).filter(|&i| got[i] > 0.0).collect();
        assert_eq!(kept, [3, 7]);
    }

    #[test]
    fn masked_tokens_are_never_drawn() {
        let logits = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0];
        let params = SamplingParams::default();
        let got = grid_frequencies(&params, &logits, 1000);
        assert_eq!(got, [0.0, 0.5, 0.0, 0.5]);
        let params = SamplingParams { top_p: 0.9, ..Default::default() };
        let got = grid_frequencies(&params, &logits, 1000);
        assert_eq!(got, [0.0, 0.5, 0.0, 0.5]);
    }
}
