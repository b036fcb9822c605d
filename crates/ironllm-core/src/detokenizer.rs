//! Incremental detokenization: turning a growing list of token ids into text one step at a time,
//! without ever emitting half a character.
//!
//! Decoding each new token on its own is wrong in two ways. Byte-level and byte-fallback vocabularies
//! split one character over several tokens (`"中"` can be `<0xE4> <0xB8> <0xAD>`), so a lone token
//! decodes to U+FFFD. And decoders look at neighbours: sentencepiece's decoder drops the space of the
//! first token it sees, so `"▁world"` alone decodes to `"world"`, not `" world"`.
//!
//! The method (vLLM's, after Hugging Face TGI) keeps two positions in the id list. `read_offset` is
//! where the text emitted so far ends; `prefix_offset` is a few tokens earlier. Each step decodes the
//! window `[prefix_offset..read_offset]` (text already emitted, decoded in context) and the window
//! `[prefix_offset..]` (the same context plus everything new). The second is longer by exactly the
//! new text, because both start at the same token and see the same neighbours. The difference is
//! emitted and both positions move forward. If the longer decode ends in U+FFFD, the last character
//! is still incomplete: nothing is emitted and the positions stay, so the next token is decoded
//! together with the bytes before it.
//!
//! Invariant (tested over the tokenizer parity strings, one id at a time and in random chunks):
//! the concatenation of everything [`IncrementalDetokenizer::step`] returns, plus
//! [`IncrementalDetokenizer::flush`] at the end, equals [`decode_ids`] of all the generated ids, and
//! every intermediate text is a prefix of it, so a client never sees a character that later changes.

use std::collections::HashMap;

/// How many prompt tokens are kept as decoding context for the first generated token.
const PROMPT_CONTEXT_TOKENS: usize = 5;
/// Ids before `prefix_offset` are dropped once there are this many, keeping memory per request flat.
const COMPACT_AFTER: usize = 64;

/// Per-sequence detokenization state.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    /// The decoding window: a few prompt ids, then the generated ids not yet compacted away.
    ids: Vec<u32>,
    /// Start of the context window in `ids`.
    prefix_offset: usize,
    /// End of the text already emitted, in `ids`.
    read_offset: usize,
    /// Decode of `ids[prefix_offset..read_offset]`, cached while the offsets do not move.
    prefix_text: Option<String>,
    /// Everything emitted so far.
    output: String,
    skip_special_tokens: bool,
    spaces_between_special_tokens: bool,
    /// Added-token contents, loaded on first use when special tokens are joined without spaces.
    added_tokens: Option<HashMap<u32, String>>,
}

impl IncrementalDetokenizer {
    /// Starts a sequence after `prompt_ids`. The prompt's text is never emitted; its last few ids are
    /// only context, so the first generated token decodes with the spacing it has in the full text.
    pub fn new(prompt_ids: &[u32], skip_special_tokens: bool, spaces_between_special_tokens: bool) -> Self {
        let context = &prompt_ids[prompt_ids.len().saturating_sub(PROMPT_CONTEXT_TOKENS)..];
        IncrementalDetokenizer {
            ids: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
            prefix_text: None,
            output: String::new(),
            skip_special_tokens,
            spaces_between_special_tokens,
            added_tokens: None,
        }
    }

    /// Appends `new_ids` and returns the text they complete. The result never ends inside a
    /// character: bytes of an unfinished UTF-8 sequence are held back until the token that completes
    /// it arrives.
    pub fn step(&mut self, tok: &tokenizers::Tokenizer, new_ids: &[u32]) -> Result<String, tokenizers::Error> {
        let mut emitted = String::new();
        // One id at a time, so any chunking of the same ids gives the same text.
        for &id in new_ids {
            self.ids.push(id);
            if let Some(text) = self.advance(tok, false)? {
                emitted.push_str(&text);
            }
        }
        self.output.push_str(&emitted);
        Ok(emitted)
    }

    /// Emits whatever is still held back (a trailing U+FFFD the sequence really ends with, or the
    /// replacement for bytes that never completed). Call once when the sequence finishes.
    pub fn flush(&mut self, tok: &tokenizers::Tokenizer) -> Result<String, tokenizers::Error> {
        let text = self.advance(tok, true)?.unwrap_or_default();
        self.output.push_str(&text);
        Ok(text)
    }

    /// All text emitted so far.
    pub fn output_text(&self) -> &str {
        &self.output
    }

    /// Decodes the two windows and moves the offsets when there is complete new text.
    fn advance(&mut self, tok: &tokenizers::Tokenizer, force: bool) -> Result<Option<String>, tokenizers::Error> {
        if self.read_offset == self.ids.len() {
            return Ok(None);
        }
        let prefix_text = match self.prefix_text.take() {
            Some(t) => t,
            None => self.decode(tok, self.prefix_offset, self.read_offset)?,
        };
        let full_text = self.decode(tok, self.prefix_offset, self.ids.len())?;
        let prefix_chars = prefix_text.chars().count();
        let complete = force || !full_text.ends_with('\u{FFFD}');
        if full_text.chars().count() <= prefix_chars || !complete {
            // Nothing new yet (a skipped special token, or an unfinished character).
            self.prefix_text = Some(prefix_text);
            return Ok(None);
        }
        // Normally the longer decode starts with the shorter; if a decoder rewrote earlier text,
        // skip as many characters as were already emitted (what vLLM does) rather than panic.
        let new_text = match full_text.strip_prefix(prefix_text.as_str()) {
            Some(rest) => rest.to_string(),
            None => full_text.chars().skip(prefix_chars).collect(),
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        if self.prefix_offset >= COMPACT_AFTER {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
        Ok(Some(new_text))
    }

    fn decode(&mut self, tok: &tokenizers::Tokenizer, start: usize, end: usize) -> Result<String, tokenizers::Error> {
        let ids = &self.ids[start..end];
        if self.skip_special_tokens || self.spaces_between_special_tokens {
            return tok.decode(ids, self.skip_special_tokens);
        }
        let added = self.added_tokens.get_or_insert_with(|| added_token_contents(tok));
        decode_joining_added(tok, ids, added)
    }
}

/// The text [`IncrementalDetokenizer`] produces for `ids` as a whole, with the same flags: the
/// tokenizer's own decode, except that with `spaces_between_special_tokens == false` (and special
/// tokens kept) every added token is written as its raw content and the runs of ordinary tokens
/// between them are decoded separately, so nothing is inserted around special tokens. That is vLLM's
/// rule.
pub fn decode_ids(
    tok: &tokenizers::Tokenizer,
    ids: &[u32],
    skip_special_tokens: bool,
    spaces_between_special_tokens: bool,
) -> Result<String, tokenizers::Error> {
    if skip_special_tokens || spaces_between_special_tokens {
        return tok.decode(ids, skip_special_tokens);
    }
    decode_joining_added(tok, ids, &added_token_contents(tok))
}

fn added_token_contents(tok: &tokenizers::Tokenizer) -> HashMap<u32, String> {
    tok.get_added_tokens_decoder().into_iter().map(|(id, t)| (id, t.content)).collect()
}

fn decode_joining_added(
    tok: &tokenizers::Tokenizer,
    ids: &[u32],
    added: &HashMap<u32, String>,
) -> Result<String, tokenizers::Error> {
    let mut out = String::new();
    let mut run_start = 0;
    for (i, id) in ids.iter().enumerate() {
        if let Some(content) = added.get(id) {
            if run_start < i {
                out.push_str(&tok.decode(&ids[run_start..i], false)?);
            }
            out.push_str(content);
            run_start = i + 1;
        }
    }
    if run_start < ids.len() {
        out.push_str(&tok.decode(&ids[run_start..], false)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use tokenizers::decoders::byte_fallback::ByteFallback;
    use tokenizers::decoders::fuse::Fuse;
    use tokenizers::decoders::sequence::Sequence;
    use tokenizers::decoders::strip::Strip;
    use tokenizers::decoders::DecoderWrapper;
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::normalizers::Replace;
    use tokenizers::AddedToken;

    fn fixture_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer")
    }

    /// SmolLM2's byte-level tokenizer (the corrected fixture transformers saved).
    fn smollm2() -> tokenizers::Tokenizer {
        tokenizers::Tokenizer::from_file(fixture_dir().join("smollm2/tokenizer.json")).expect("fixture tokenizer")
    }

    fn parity_strings() -> Vec<String> {
        let text = std::fs::read_to_string(fixture_dir().join("parity.json")).expect("parity.json");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        v["cases"].as_array().expect("cases").iter().map(|c| c["text"].as_str().expect("text").to_string()).collect()
    }

    /// A Llama-2-style tokenizer: `▁` pieces, byte fallback, special `<s>`/`</s>`.
    fn sentencepiece_like() -> tokenizers::Tokenizer {
        let mut vocab = Vocab::default();
        for (i, t) in ["<unk>", "<s>", "</s>", "▁hello", "▁world", "▁", "!"].iter().enumerate() {
            vocab.insert(t.to_string(), i as u32);
        }
        for b in 0..=255u32 {
            vocab.insert(format!("<0x{b:02X}>"), 7 + b);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, vec![])
            .unk_token("<unk>".into())
            .byte_fallback(true)
            .fuse_unk(true)
            .build()
            .expect("bpe");
        let mut tok = tokenizers::Tokenizer::new(bpe);
        tok.with_decoder(Some(Sequence::new(vec![
            DecoderWrapper::Replace(Replace::new("▁", " ").expect("replace")),
            DecoderWrapper::ByteFallback(ByteFallback::new()),
            DecoderWrapper::Fuse(Fuse::new()),
            DecoderWrapper::Strip(Strip::new(' ', 1, 0)),
        ])));
        tok.add_special_tokens(&[
            AddedToken::from("<unk>", true),
            AddedToken::from("<s>", true),
            AddedToken::from("</s>", true),
        ]);
        tok
    }

    fn byte(b: u32) -> u32 {
        7 + b
    }

    /// A small deterministic generator for chunk sizes (no rand dependency in core).
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self, bound: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % bound as u64) as usize
        }
    }

    /// Feeds `ids` in chunks (`chunk()` picks each size), checking that the text so far is always a
    /// prefix of the full decode and that the total equals it. `Ok(false)` when the prompt and the
    /// continuation share a character, so there is no clean split to compare against.
    fn stream_matches(
        tok: &tokenizers::Tokenizer,
        prompt: &[u32],
        ids: &[u32],
        skip: bool,
        spaces: bool,
        mut chunk: impl FnMut() -> usize,
    ) -> Result<bool, String> {
        let mut all = prompt.to_vec();
        all.extend_from_slice(ids);
        let whole = decode_ids(tok, &all, skip, spaces).map_err(|e| e.to_string())?;
        let prompt_text = decode_ids(tok, prompt, skip, spaces).map_err(|e| e.to_string())?;
        let Some(expected) = whole.strip_prefix(prompt_text.as_str()) else {
            return Ok(false);
        };
        let mut d = IncrementalDetokenizer::new(prompt, skip, spaces);
        let mut concat = String::new();
        let mut i = 0;
        while i < ids.len() {
            let n = chunk().clamp(1, ids.len() - i);
            let piece = d.step(tok, &ids[i..i + n]).map_err(|e| e.to_string())?;
            concat.push_str(&piece);
            if !expected.starts_with(concat.as_str()) {
                return Err(format!("after {} ids the text {concat:?} is not a prefix of {expected:?}", i + n));
            }
            i += n;
        }
        concat.push_str(&d.flush(tok).map_err(|e| e.to_string())?);
        if concat != expected || d.output_text() != expected {
            return Err(format!("streamed {concat:?}, decoded {expected:?}"));
        }
        Ok(true)
    }

    #[test]
    fn byte_level_parity_strings_stream_exactly() {
        let tok = smollm2();
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut failures = Vec::new();
        let (mut compared, mut runs) = (0, 0);
        let strings = parity_strings();
        for text in &strings {
            // Chat-formatted, so special tokens sit among the text.
            let chat = format!("<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n");
            for source in [text.as_str(), chat.as_str()] {
                let ids = tok.encode(source, false).expect("encode").get_ids().to_vec();
                for (skip, spaces) in [(true, true), (false, true), (false, false), (true, false)] {
                    let one = stream_matches(&tok, &[], &ids, skip, spaces, || 1);
                    let random = stream_matches(&tok, &[], &ids, skip, spaces, || 1 + rng.next(7));
                    // A prompt cut at a random point, the rest generated.
                    let cut = if ids.is_empty() { 0 } else { rng.next(ids.len()) };
                    let prompted = stream_matches(&tok, &ids[..cut], &ids[cut..], skip, spaces, || 1);
                    for r in [one, random, prompted] {
                        runs += 1;
                        match r {
                            Ok(true) => compared += 1,
                            Ok(false) => {}
                            Err(e) => failures.push(format!("{source:?} skip={skip} spaces={spaces}: {e}")),
                        }
                    }
                }
            }
        }
        assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures[..failures.len().min(5)].join("\n"));
        // Only prompt cuts inside a character are skipped; nearly every run must be compared.
        assert!(compared * 10 >= runs * 9, "only {compared} of {runs} runs compared");
    }

    #[test]
    fn multibyte_characters_are_held_until_complete() {
        let tok = smollm2();
        // "😀" is four bytes; in SmolLM2's vocabulary it spans several byte-level tokens.
        let ids = tok.encode("a😀b", false).expect("encode").get_ids().to_vec();
        assert!(ids.len() > 3, "{ids:?}");
        let mut d = IncrementalDetokenizer::new(&[], true, true);
        let pieces: Vec<String> = ids.iter().map(|&id| d.step(&tok, &[id]).expect("step")).collect();
        assert_eq!(pieces.concat(), "a😀b");
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        assert!(pieces.contains(&"😀".to_string()), "{pieces:?}");
    }

    #[test]
    fn byte_fallback_tokens_and_sentencepiece_spaces() {
        let tok = sentencepiece_like();
        // "hello 中 world" as ▁hello ▁ <0xE4> <0xB8> <0xAD> ▁world
        let ids = [3, 5, byte(0xE4), byte(0xB8), byte(0xAD), 4];
        let mut d = IncrementalDetokenizer::new(&[], true, true);
        let pieces: Vec<String> = ids.iter().map(|&id| d.step(&tok, &[id]).expect("step")).collect();
        assert_eq!(pieces, ["hello", " ", "", "", "中", " world"]);
        assert_eq!(d.output_text(), tok.decode(&ids, true).expect("decode"));

        // After a prompt, the first token keeps its space.
        let mut d = IncrementalDetokenizer::new(&[1, 3], true, true);
        assert_eq!(d.step(&tok, &[4]).expect("step"), " world");

        // An incomplete sequence at the very end is only given up by flush.
        let mut d = IncrementalDetokenizer::new(&[], true, true);
        assert_eq!(d.step(&tok, &[3, byte(0xE4)]).expect("step"), "hello");
        assert_eq!(d.flush(&tok).expect("flush"), "\u{FFFD}");
        assert_eq!(d.flush(&tok).expect("flush"), "");
    }

    #[test]
    fn special_tokens_skipped_or_joined() {
        let tok = sentencepiece_like();
        let ids = [1, 3, 2, 1, 4];
        let run = |skip, spaces| {
            let mut d = IncrementalDetokenizer::new(&[], skip, spaces);
            for &id in &ids {
                d.step(&tok, &[id]).expect("step");
            }
            d.output_text().to_string()
        };
        assert_eq!(run(true, true), "hello world");
        // The tokenizer's own decode keeps the space its decoder gives "▁hello" after "<s>".
        assert_eq!(run(false, true), tok.decode(&ids, false).expect("decode"));
        assert_eq!(run(false, true), "<s> hello</s><s> world");
        // vLLM's spaces_between_special_tokens=false: special tokens joined to the text as written.
        assert_eq!(run(false, false), "<s>hello</s><s>world");
        assert_eq!(run(false, false), decode_ids(&tok, &ids, false, false).expect("decode"));
        for (skip, spaces) in [(true, true), (false, true), (false, false)] {
            let mut rng = XorShift(7);
            assert!(stream_matches(&tok, &[], &ids, skip, spaces, || 1 + rng.next(3)).expect("stream"));
        }
    }

    #[test]
    fn long_sequences_stay_bounded() {
        let tok = smollm2();
        let text = "The quick brown fox 🦊 jumps over the lazy dog. ".repeat(40);
        let ids = tok.encode(text.as_str(), false).expect("encode").get_ids().to_vec();
        let mut d = IncrementalDetokenizer::new(&[], false, true);
        for &id in &ids {
            d.step(&tok, &[id]).expect("step");
            assert!(d.ids.len() <= COMPACT_AFTER + 16, "window grew to {}", d.ids.len());
        }
        assert_eq!(d.output_text(), text);
    }
}
