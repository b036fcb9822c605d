//! Prompt-lookup (n-gram) drafting for speculative decoding (issue 6): the draft for a request is the
//! tokens that followed the most recent earlier occurrence of its current suffix, found in its own prompt
//! and output so far. No model runs; a repetitive output (code edits, quoting the prompt) gets long
//! accepted drafts, a novel one gets none and costs nothing.
//!
//! The suffix tried is the longest `n` in `[min_n, max_n]` whose n-gram occurs earlier; among its earlier
//! occurrences the most recent wins (it is the likeliest to continue the same way). Matching uses one pass
//! of the Knuth-Morris-Pratt failure function over the reversed sequence, so a proposal costs O(length)
//! whatever `max_n` is.

/// vLLM's `prompt_lookup_min` / `prompt_lookup_max` / `num_speculative_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NgramProposer {
    pub min_n: usize,
    pub max_n: usize,
    pub num_speculative_tokens: usize,
}

impl NgramProposer {
    /// A proposer; `min_n` ≥ 1, `min_n` ≤ `max_n`, at least one speculative token.
    pub fn new(min_n: usize, max_n: usize, num_speculative_tokens: usize) -> Result<NgramProposer, String> {
        if min_n == 0 {
            return Err("`prompt_lookup_min` must be at least 1".into());
        }
        if max_n < min_n {
            return Err(format!("`prompt_lookup_max` ({max_n}) must be at least `prompt_lookup_min` ({min_n})"));
        }
        if num_speculative_tokens == 0 {
            return Err("`num_speculative_tokens` must be at least 1".into());
        }
        Ok(NgramProposer { min_n, max_n, num_speculative_tokens })
    }

    /// The draft after `tokens` (prompt then output): up to `num_speculative_tokens` tokens, possibly none.
    pub fn propose(&self, tokens: &[u32]) -> Vec<u32> {
        let len = tokens.len();
        if len < self.min_n + 1 {
            return Vec::new();
        }
        // Reversed sequence r[i] = tokens[len - 1 - i]: an earlier occurrence of the length-n suffix ending
        // at position e (exclusive) is a match of r's prefix of length n starting at r-index len - e.
        // The failure function of r gives, at each r-index j, the longest prefix of r that ends at j; the
        // suffix must match a prefix of length >= min_n, capped at max_n.
        let rev: Vec<u32> = tokens.iter().rev().copied().collect();
        let mut fail = vec![0usize; len];
        let mut best: Option<(usize, usize)> = None; // (n, end position in `tokens`, exclusive)
        let mut k = 0usize;
        for j in 1..len {
            while k > 0 && (rev[j] != rev[k] || k >= self.max_n) {
                k = fail[k - 1];
            }
            if rev[j] == rev[k] && k < self.max_n {
                k += 1;
            }
            fail[j] = k;
            // A match of length k ends at r-index j: the n-gram tokens[len-k..] occurs ending at
            // tokens-position len - 1 - j + k (exclusive), i.e. it is followed by tokens[len - j + k - 1..].
            if k >= self.min_n {
                let end = len - 1 - j + k;
                // Longer n wins; for equal n the smallest j (the most recent occurrence) was seen first.
                if best.is_none_or(|(n, _)| k > n) {
                    best = Some((k, end));
                }
            }
        }
        match best {
            Some((_, end)) if end < len => {
                let stop = (end + self.num_speculative_tokens).min(len);
                tokens[end..stop].to_vec()
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, by brute force: the longest n in [min, max] whose suffix n-gram occurs earlier,
    /// its most recent earlier occurrence, and up to k tokens after it.
    fn reference(tokens: &[u32], min_n: usize, max_n: usize, k: usize) -> Vec<u32> {
        let len = tokens.len();
        for n in (min_n..=max_n.min(len.saturating_sub(1))).rev() {
            let suffix = &tokens[len - n..];
            // Occurrences ending before the suffix's own end: start positions s with s + n < len + ... (s < len - n).
            for s in (0..len - n).rev() {
                if &tokens[s..s + n] == suffix {
                    let end = s + n;
                    return tokens[end..(end + k).min(len)].to_vec();
                }
            }
        }
        Vec::new()
    }

    #[test]
    fn proposes_what_followed_the_most_recent_longest_match() {
        let p = NgramProposer::new(1, 3, 3).unwrap();
        // "a b c d ... a b c" -> "d e f".
        assert_eq!(p.propose(&[1, 2, 3, 4, 5, 6, 9, 1, 2, 3]), vec![4, 5, 6]);
        // Two earlier "2 3": the most recent one (followed by 8) wins.
        assert_eq!(p.propose(&[2, 3, 7, 2, 3, 8, 2, 3]), vec![8, 2, 3]);
        // No earlier occurrence of the last token: no draft.
        assert!(p.propose(&[1, 2, 3, 4]).is_empty());
        // Fewer tokens left after the match than k.
        assert_eq!(p.propose(&[5, 6, 5]), vec![6, 5]);
    }

    #[test]
    fn agrees_with_brute_force_on_random_sequences() {
        let mut s = 12345u64;
        let mut next = |m: u64| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) % m) as u32
        };
        for case in 0..3000 {
            let len = 1 + (case % 60);
            let alphabet = 2 + (case % 5) as u64;
            let tokens: Vec<u32> = (0..len).map(|_| next(alphabet)).collect();
            let (min_n, max_n, k) = (1 + case % 3, 1 + case % 3 + case % 4, 1 + case % 5);
            let p = NgramProposer::new(min_n, max_n, k).unwrap();
            assert_eq!(p.propose(&tokens), reference(&tokens, min_n, max_n, k), "{tokens:?} n {min_n}..={max_n} k {k}");
        }
    }

    #[test]
    fn bad_settings_are_errors() {
        assert!(NgramProposer::new(0, 3, 2).is_err());
        assert!(NgramProposer::new(3, 2, 2).is_err());
        assert!(NgramProposer::new(1, 2, 0).is_err());
    }
}
