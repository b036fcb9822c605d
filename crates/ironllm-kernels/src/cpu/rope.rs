//! Rotary position embedding in the `rotate_half` (GPT-NeoX) layout that Hugging Face Llama-family code
//! uses: dimension i pairs with i + d/2. GGUF Llama weights, stored permuted for interleaved RoPE, are
//! un-permuted at load so this one layout serves every format.
//!
//! Frequencies follow transformers' float32 arithmetic (inverse frequencies in f32, angle = position ×
//! inv_freq in f32), including Llama 3's wavelength-dependent scaling and GGUF's per-dimension frequency
//! factors, so angles match the reference to the last bit or two.

/// Llama 3 rope scaling parameters (`rope_scaling` with `rope_type: "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// Precomputed cos/sin tables for positions `0..max_positions`.
#[derive(Debug, Clone)]
pub struct RopeTable {
    head_dim: usize,
    rotary_dim: usize,
    /// [max_positions, rotary_dim / 2]
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Builds the table. `freq_factors` (GGUF `rope_freqs.weight`) divide the frequencies when present.
    pub fn new(
        head_dim: usize,
        rotary_dim: usize,
        theta: f32,
        max_positions: usize,
        llama3: Option<Llama3Scaling>,
        linear_factor: Option<f32>,
        freq_factors: Option<&[f32]>,
    ) -> RopeTable {
        assert!(rotary_dim <= head_dim && rotary_dim.is_multiple_of(2), "rope: bad rotary_dim");
        let half = rotary_dim / 2;
        let mut inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                let exponent = (2 * i) as f32 / rotary_dim as f32;
                1.0 / theta.powf(exponent)
            })
            .collect();
        if let Some(s) = llama3 {
            let old_len = s.original_max_position_embeddings as f32;
            let low_wavelen = old_len / s.low_freq_factor;
            let high_wavelen = old_len / s.high_freq_factor;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= s.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        if let Some(factors) = freq_factors {
            for (f, d) in inv_freq.iter_mut().zip(factors) {
                *f /= d;
            }
        }
        let scale = linear_factor.unwrap_or(1.0);
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            let pos = p as f32 / scale;
            for f in &inv_freq {
                let angle = pos * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        RopeTable { head_dim, rotary_dim, cos, sin }
    }

    /// The `[max_positions, rotary_dim / 2]` cos and sin tables (the GPU backend uploads them).
    pub fn tables(&self) -> (&[f32], &[f32]) {
        (&self.cos, &self.sin)
    }

    /// Positions covered by the table.
    pub fn max_positions(&self) -> usize {
        self.cos.len() / (self.rotary_dim / 2).max(1)
    }

    /// Rotates every head of `x` ([tokens, num_heads * head_dim]) by its token's position.
    pub fn apply(&self, x: &mut [f32], num_heads: usize, positions: &[usize]) {
        let hd = self.head_dim;
        let half = self.rotary_dim / 2;
        assert_eq!(x.len(), positions.len() * num_heads * hd, "rope: x is not [tokens, heads * head_dim]");
        for (row, &pos) in x.chunks_mut(num_heads * hd).zip(positions) {
            assert!(pos < self.max_positions(), "rope: position {pos} beyond the table");
            let cos = &self.cos[pos * half..(pos + 1) * half];
            let sin = &self.sin[pos * half..(pos + 1) * half];
            for head in row.chunks_mut(hd) {
                for i in 0..half {
                    let a = head[i];
                    let b = head[i + half];
                    head[i] = a * cos[i] - b * sin[i];
                    head[i + half] = b * cos[i] + a * sin[i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_identity_and_norm_is_kept() {
        let t = RopeTable::new(8, 8, 10000.0, 16, None, None, None);
        let orig: Vec<f32> = (0..16).map(|i| i as f32 - 7.5).collect();
        let mut x = orig.clone();
        t.apply(&mut x, 2, &[0]);
        assert_eq!(x, orig);
        t.apply(&mut x, 2, &[5]);
        let n0: f32 = orig[..8].iter().map(|v| v * v).sum();
        let n1: f32 = x[..8].iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-3);
    }

    #[test]
    fn rotation_matches_formula() {
        let t = RopeTable::new(4, 4, 100.0, 8, None, None, None);
        let mut x = vec![1.0f32, 2.0, 3.0, 4.0];
        t.apply(&mut x, 1, &[3]);
        let f = [1.0f64, 1.0 / 10.0];
        let (a, b) = (3.0 * f[0], 3.0 * f[1]);
        let want = [
            1.0 * a.cos() - 3.0 * a.sin(),
            2.0 * b.cos() - 4.0 * b.sin(),
            3.0 * a.cos() + 1.0 * a.sin(),
            4.0 * b.cos() + 2.0 * b.sin(),
        ];
        for i in 0..4 {
            assert!((x[i] as f64 - want[i]).abs() < 1e-5);
        }
    }
}
