//! Speculative decoding's verification step (issue 6): given the target model's distributions at the k
//! drafted positions and one more, keep a prefix of the draft and add one token, so that the emitted
//! tokens are distributed exactly as if the target had sampled them one by one (the rejection sampling
//! of Leviathan et al. / Chen et al., 2023, written here from the algorithm's statement).
//!
//! At draft position i with target distribution p and draft distribution q, the drafted token d is kept
//! with probability min(1, p(d) / q(d)); on the first rejection the emitted token is drawn from the
//! residual max(0, p - q) renormalized, and verification stops; when every draft token is kept, a bonus
//! token is drawn from the distribution after the last one. An n-gram draft is deterministic (q is one-hot
//! on d), so d is kept with probability p(d) and the residual is p without d. Greedy requests keep the
//! draft while it equals the target's argmax, then emit the argmax.

/// Distributions are rows of `vocab` probabilities that sum to 1 (after the request's processors,
/// temperature, top-k/top-p/min-p); `uniform` yields draws in [0, 1) from the request's generator.
pub fn verify_random(
    target: &[f32],
    vocab: usize,
    draft: &[u32],
    draft_probs: Option<&[f32]>,
    uniform: &mut impl FnMut() -> f64,
) -> Vec<u32> {
    let k = draft.len();
    assert_eq!(target.len(), (k + 1) * vocab, "target must hold k + 1 rows");
    if let Some(q) = draft_probs {
        assert_eq!(q.len(), k * vocab, "draft probabilities must hold k rows");
    }
    let mut out = Vec::with_capacity(k + 1);
    for (i, &d) in draft.iter().enumerate() {
        let p = &target[i * vocab..(i + 1) * vocab];
        let d = d as usize;
        let (pd, qd) = match draft_probs {
            Some(q) => (p.get(d).copied().unwrap_or(0.0), q[i * vocab..(i + 1) * vocab].get(d).copied().unwrap_or(0.0)),
            None => (p.get(d).copied().unwrap_or(0.0), 1.0),
        };
        let keep = qd > 0.0 && uniform() < (pd as f64 / qd as f64).min(1.0);
        if keep {
            out.push(d as u32);
            continue;
        }
        // Residual max(0, p - q): for a one-hot q that is p with d removed.
        let residual: Vec<f64> = match draft_probs {
            Some(q) => {
                let q = &q[i * vocab..(i + 1) * vocab];
                p.iter().zip(q).map(|(&a, &b)| (a as f64 - b as f64).max(0.0)).collect()
            }
            None => p.iter().enumerate().map(|(t, &a)| if t == d { 0.0 } else { a as f64 }).collect(),
        };
        out.push(draw(&residual, uniform()).unwrap_or_else(|| draw_f32(p, uniform())));
        return out;
    }
    out.push(draw_f32(&target[k * vocab..], uniform()));
    out
}

/// Greedy verification: the draft is kept while it equals the target's argmax at its position.
pub fn verify_greedy(target_argmax: &[u32], draft: &[u32]) -> Vec<u32> {
    assert_eq!(target_argmax.len(), draft.len() + 1, "one argmax per draft position and one more");
    let mut out = Vec::with_capacity(draft.len() + 1);
    for (&d, &a) in draft.iter().zip(target_argmax) {
        out.push(a);
        if d != a {
            return out;
        }
    }
    out.push(target_argmax[draft.len()]);
    out
}

/// Inverse-CDF draw from unnormalized weights; `None` when they sum to zero.
fn draw(weights: &[f64], u: f64) -> Option<u32> {
    let total: f64 = weights.iter().sum();
    if total <= 0.0 || !total.is_finite() {
        return None;
    }
    let target = u * total;
    let mut acc = 0.0;
    let mut last = None;
    for (t, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            acc += w;
            last = Some(t as u32);
            if target < acc {
                return last;
            }
        }
    }
    last
}

fn draw_f32(p: &[f32], u: f64) -> u32 {
    let w: Vec<f64> = p.iter().map(|&x| x as f64).collect();
    draw(&w, u).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::Rng;

    fn random_dist(rng: &mut Rng, vocab: usize, sparse: bool) -> Vec<f32> {
        let mut w: Vec<f64> = (0..vocab).map(|_| rng.next_f64() + 0.05).collect();
        if sparse {
            w[0] = 0.0; // a token the distribution never produces
        }
        let s: f64 = w.iter().sum();
        w.iter().map(|x| (x / s) as f32).collect()
    }

    /// Pearson chi-square of observed counts against expected probabilities.
    fn chi_square(counts: &[usize], probs: &[f32]) -> f64 {
        let n: usize = counts.iter().sum();
        counts
            .iter()
            .zip(probs)
            .filter(|(_, &p)| p > 0.0)
            .map(|(&c, &p)| {
                let e = n as f64 * p as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum()
    }

    /// The first emitted token is distributed as the target's first row, whatever the draft: for an
    /// n-gram draft (fixed token) and for a draft model (token drawn from q). Vocabulary 6 (5 degrees of
    /// freedom): the chi-square critical value at p = 0.001 is 20.52.
    #[test]
    fn emitted_tokens_follow_the_target_distribution() {
        let vocab = 6;
        let mut rng = Rng::seeded(7);
        for case in 0..6 {
            let p1 = random_dist(&mut rng, vocab, case % 2 == 0);
            let p2 = random_dist(&mut rng, vocab, false);
            let q = random_dist(&mut rng, vocab, case % 3 == 0);
            let target: Vec<f32> = p1.iter().chain(&p2).copied().collect();
            let n = 60_000;
            let (mut first, mut second_given_kept) = (vec![0usize; vocab], vec![0usize; vocab]);
            for _ in 0..n {
                let use_model = case >= 3;
                let d = if use_model { draw_f32(&q, rng.next_f64()) } else { (case % vocab) as u32 };
                let out = verify_random(&target, vocab, &[d], use_model.then_some(&q[..]), &mut || rng.next_f64());
                first[out[0] as usize] += 1;
                if out.len() == 2 {
                    second_given_kept[out[1] as usize] += 1;
                }
            }
            let c1 = chi_square(&first, &p1);
            assert!(c1 < 20.52, "case {case}: first token chi-square {c1:.1} over {first:?} vs {p1:?}");
            if p1[0] == 0.0 {
                assert_eq!(first[0], 0, "a zero-probability token was emitted");
            }
            // When the draft is kept, the bonus token follows the next row.
            if second_given_kept.iter().sum::<usize>() > 5_000 {
                let c2 = chi_square(&second_given_kept, &p2);
                assert!(c2 < 20.52, "case {case}: bonus token chi-square {c2:.1}");
            }
        }
    }

    #[test]
    fn a_sure_draft_is_always_kept_and_an_impossible_one_never() {
        let vocab = 4;
        let mut sure = vec![0.0f32; 3 * vocab];
        sure[2] = 1.0; // row 0: token 2 certain
        sure[vocab + 1] = 1.0; // row 1: token 1 certain
        sure[2 * vocab + 3] = 1.0; // bonus row: token 3
        let mut u = Rng::seeded(1);
        assert_eq!(verify_random(&sure, vocab, &[2, 1], None, &mut || u.next_f64()), vec![2, 1, 3]);
        // Draft token 0 has probability 0 at row 0: rejected, replaced by the residual (token 2).
        assert_eq!(verify_random(&sure, vocab, &[0, 1], None, &mut || u.next_f64()), vec![2]);
    }

    #[test]
    fn greedy_keeps_the_matching_prefix_then_the_argmax() {
        assert_eq!(verify_greedy(&[5, 6, 7, 8], &[5, 6, 7]), vec![5, 6, 7, 8]);
        assert_eq!(verify_greedy(&[5, 6, 7, 8], &[5, 9, 7]), vec![5, 6]);
        assert_eq!(verify_greedy(&[5], &[]), vec![5]);
        assert_eq!(verify_greedy(&[4, 6], &[5]), vec![4]);
    }
}
