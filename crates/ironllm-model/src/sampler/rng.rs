//! The sampler's random number generator: xoshiro256++ seeded through splitmix64.
//!
//! Every sampling request owns one [`Rng`], so the uniforms it draws depend only on its seed and on how
//! many draws it has made, never on the batch it runs in or on thread scheduling. We write the generator
//! here rather than take `rand` because the sampler's reproducibility promise ("same seed, same tokens,
//! on every release") must not move when a dependency changes its algorithm or its seeding; xoshiro256++
//! and splitmix64 are fixed, published algorithms (Blackman and Vigna) with known test vectors.

/// One step of splitmix64: advances `state` and returns a well-mixed 64-bit value.
///
/// Used to expand a 64-bit seed into xoshiro's 256-bit state, because xoshiro's own output is poor for
/// states with few set bits (such as a small seed copied into one word).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A small, fast, seedable generator (xoshiro256++): 32 bytes of state, a few instructions a draw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    state: [u64; 4],
}

impl Rng {
    /// A generator whose whole output stream is a function of `seed`.
    pub fn seeded(seed: u64) -> Self {
        let mut sm = seed;
        // Four consecutive splitmix64 outputs are never all zero (splitmix64 is a bijection of its
        // counter, so at most one of them can be zero), which is the one state xoshiro must avoid.
        let state = [splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm)];
        Rng { state }
    }

    /// The next 64 uniformly distributed bits.
    pub fn next_u64(&mut self) -> u64 {
        let [s0, s1, s2, s3] = &mut self.state;
        let result = s0.wrapping_add(*s3).rotate_left(23).wrapping_add(*s0);
        let t = *s1 << 17;
        *s2 ^= *s0;
        *s3 ^= *s1;
        *s1 ^= *s2;
        *s0 ^= *s3;
        *s2 ^= t;
        *s3 = s3.rotate_left(45);
        result
    }

    /// A uniform draw in `[0, 1)` with 53 bits of precision (every representable multiple of 2^-53).
    pub fn next_f64(&mut self) -> f64 {
        // The top 53 bits are used because xoshiro's low bits are its weakest.
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Discards `n` draws. Used to line a recreated generator up with a request's output position.
    pub fn skip(&mut self, n: usize) {
        for _ in 0..n {
            self.next_u64();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_vector() {
        // First output of the reference splitmix64 for seed 0.
        let mut state = 0u64;
        assert_eq!(splitmix64(&mut state), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn xoshiro256pp_matches_the_reference_step() {
        // With state [1, 2, 3, 4] the first output is rotl(1 + 4, 23) + 1; the second follows from the
        // reference state update.
        let mut rng = Rng { state: [1, 2, 3, 4] };
        assert_eq!(rng.next_u64(), (5u64 << 23) + 1);
        assert_eq!(rng.state, [7, 0, 262_146, 211_106_232_532_992]);
    }

    #[test]
    fn same_seed_same_stream_and_floats_in_unit_interval() {
        let mut a = Rng::seeded(42);
        let mut b = Rng::seeded(42);
        let mut c = Rng::seeded(43);
        let xs: Vec<f64> = (0..1000).map(|_| a.next_f64()).collect();
        let ys: Vec<f64> = (0..1000).map(|_| b.next_f64()).collect();
        let zs: Vec<f64> = (0..1000).map(|_| c.next_f64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
        assert!(xs.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((mean - 0.5).abs() < 0.05, "mean {mean}");
    }

    #[test]
    fn skip_equals_drawing() {
        let mut a = Rng::seeded(5);
        let mut b = Rng::seeded(5);
        a.skip(3);
        for _ in 0..3 {
            b.next_f64();
        }
        assert_eq!(a, b);
    }
}
