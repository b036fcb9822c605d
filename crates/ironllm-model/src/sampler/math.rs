//! The numeric kernels the sampler runs over whole vocabulary rows: maximum, and exponentials shifted
//! by the row maximum, written so the compiler vectorises them.
//!
//! `f32::exp` is a call into libm per element, and exponentials over a 50k vocabulary dominated the
//! random path and the logprobs; [`exp_nonpositive`] is a branch-free polynomial (Cephes' `expf`
//! reduction and coefficients, about 2 ulp) that inlines into packed instructions. It only needs
//! arguments `<= 0` because every caller subtracts the row maximum first, and it returns exactly 0 for
//! masked (`-inf`) entries, which is what keeps masked tokens from ever being drawn.

/// Largest value in `xs`, ignoring NaN; `-inf` for an empty or fully masked row.
pub(super) fn max_value(xs: &[f32]) -> f32 {
    // Eight independent lanes let the compiler turn this into packed max instructions; a plain fold
    // is a serial dependency chain.
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            if x > *lane {
                *lane = x;
            }
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &x in lanes.iter().chain(tail) {
        if x > max {
            max = x;
        }
    }
    max
}

/// `exp(x)` for `x <= 0`: relative error about 2 ulp for `x >= -87`, exactly 0 below (and for `-inf`),
/// where the true value is under `f32`'s normal range anyway.
#[inline(always)]
pub(super) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that `n * LN2_HI` is exact (LN2_HI has few mantissa bits).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to the nearest integer and leaves it in the low mantissa bits: a
    // rounding that needs no float-to-int conversion, so it vectorises on plain SSE2.
    const ROUND: f32 = 12_582_912.0;
    const LOWEST: f32 = -87.0;

    let clamped = if x < LOWEST { LOWEST } else { x };
    let shifted = clamped * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let exp_r = p * r * r + r + 1.0;
    // n is in [-126, 0], so 2^n is a normal float built directly from its exponent bits.
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let two_to_n = f32::from_bits(((n_int + 127) as u32) << 23);
    let y = exp_r * two_to_n;
    // `!(x >= LOWEST)` also maps NaN to 0, so a NaN logit cannot poison a row's sums.
    if x >= LOWEST {
        y
    } else {
        0.0
    }
}

/// Elements per block whose exponentials are summed in `f32` lanes before the block's sum is added to
/// an `f64` total: `f32` lanes keep the loop vectorised (`f64` lanes halve the width and need
/// conversions), and 32 terms per lane keep the `f32` rounding near 1e-7.
const SUM_BLOCK: usize = 256;

/// `sum(exp(x - max))` over `xs`.
pub(super) fn sum_exp_shifted(xs: &[f32], max: f32) -> f64 {
    let mut total = 0.0f64;
    for block in xs.chunks(SUM_BLOCK) {
        let mut lanes = [0.0f32; 8];
        let chunks = block.chunks_exact(8);
        let tail = chunks.remainder();
        for chunk in chunks {
            for (lane, &x) in lanes.iter_mut().zip(chunk) {
                *lane += exp_nonpositive(x - max);
            }
        }
        for &x in tail {
            lanes[0] += exp_nonpositive(x - max);
        }
        total += lanes.iter().map(|&l| f64::from(l)).sum::<f64>();
    }
    total
}

/// Replaces every `x` with `exp(x - max)` and returns the sum.
pub(super) fn exp_shifted_in_place(xs: &mut [f32], max: f32) -> f64 {
    let mut total = 0.0f64;
    for block in xs.chunks_mut(SUM_BLOCK) {
        let mut lanes = [0.0f32; 8];
        let mut chunks = block.chunks_exact_mut(8);
        for chunk in &mut chunks {
            for (lane, x) in lanes.iter_mut().zip(chunk) {
                *x = exp_nonpositive(*x - max);
                *lane += *x;
            }
        }
        for x in chunks.into_remainder() {
            *x = exp_nonpositive(*x - max);
            lanes[0] += *x;
        }
        total += lanes.iter().map(|&l| f64::from(l)).sum::<f64>();
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_on_the_whole_range() {
        let mut worst = 0.0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let want = f64::from(x).exp();
            let got = f64::from(exp_nonpositive(x));
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-87.5), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(f32::NAN), 0.0);
    }

    #[test]
    fn max_and_sums_agree_with_plain_loops() {
        let xs: Vec<f32> = (0..1003).map(|i| ((i * 7919) % 1009) as f32 / 100.0 - 5.0).collect();
        let max = max_value(&xs);
        assert_eq!(max, xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        let want: f64 = xs.iter().map(|&x| (f64::from(x) - f64::from(max)).exp()).sum();
        assert!((sum_exp_shifted(&xs, max) - want).abs() / want < 1e-6);
        let mut ys = xs.clone();
        assert!((exp_shifted_in_place(&mut ys, max) - want).abs() / want < 1e-6);
        assert!((f64::from(ys[17]) - (f64::from(xs[17]) - f64::from(max)).exp()).abs() < 1e-6);
        assert_eq!(max_value(&[]), f32::NEG_INFINITY);
        assert_eq!(max_value(&[f32::NAN, -1.0]), -1.0);
    }
}
