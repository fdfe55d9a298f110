//! CLIP's BPE tokenizer: `instant-clip-tokenizer` (OpenAI's bundled
//! vocabulary) plus the text cleaning OpenAI applies before BPE, which that
//! crate leaves out: HTML entities unescaped twice, then whitespace folded.

use instant_clip_tokenizer::{Token, Tokenizer};

/// Start-of-text token id.
pub const SOT: u32 = 49406;
/// End-of-text token id.
pub const EOT: u32 = 49407;

pub struct ClipTokenizer {
    inner: Tokenizer,
}

impl Default for ClipTokenizer {
    fn default() -> Self {
        Self::new()
    }
}

/// OpenAI's `basic_clean` + `whitespace_clean` (without ftfy's mojibake
/// repair): `html.unescape` twice, strip, fold runs of whitespace.
pub fn clean_text(text: &str) -> String {
    let once = htmlize::unescape(text);
    let twice = htmlize::unescape(once.as_ref());
    let uncurled: String = twice
        .chars()
        .map(|c| match c {
            // ftfy's `uncurl_quotes`, on by default in OpenAI's cleaning.
            '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}' => '\'',
            '\u{201C}' | '\u{201D}' | '\u{201E}' | '\u{201F}' => '"',
            c => c,
        })
        .collect();
    uncurled.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Characters of cleaned text kept for BPE. CLIP keeps 77 tokens, and no
/// vocabulary entry is longer than 32 characters, so the first 77 tokens
/// always lie in the first 77 x 32 < 4096 characters.
const MAX_TEXT_CHARS: usize = 4096;
/// Characters kept of one word. BPE costs the square of a word's length
/// (a 10⁶-character word took 16 s, 2·10⁷ hours); no real word is this long.
const MAX_WORD_CHARS: usize = 256;

/// `text` cut to what can reach the 77 tokens: at most [`MAX_TEXT_CHARS`],
/// each word at most [`MAX_WORD_CHARS`].
fn bounded(text: &str) -> std::borrow::Cow<'_, str> {
    let long_word = text.split(' ').any(|w| w.len() > MAX_WORD_CHARS);
    if text.len() <= MAX_TEXT_CHARS && !long_word {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::new();
    for word in text.split(' ') {
        if out.len() >= MAX_TEXT_CHARS {
            break;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().take(MAX_WORD_CHARS));
    }
    std::borrow::Cow::Owned(out)
}

impl ClipTokenizer {
    pub fn new() -> Self {
        Self {
            inner: Tokenizer::new(),
        }
    }

    /// BPE ids of `text` without SOT/EOT.
    pub fn encode_words(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        self.inner.encode(&bounded(&clean_text(text)), &mut out);
        out.into_iter().map(|t| u32::from(t.to_u16())).collect()
    }

    /// `[SOT, ids.., EOT]`, truncated so EOT fits in `context_length`, then
    /// zero-padded to `context_length` (OpenAI's `tokenize(truncate=True)`).
    pub fn encode(&self, text: &str, context_length: usize) -> Vec<u32> {
        let mut ids = vec![SOT];
        ids.extend(self.encode_words(text));
        ids.truncate(context_length.saturating_sub(1).max(1));
        ids.push(EOT);
        ids.resize(context_length.max(ids.len()), 0);
        ids
    }

    /// The text of a sequence of ids (without SOT/EOT), words rejoined.
    pub fn decode(&self, ids: &[u32]) -> String {
        let tokens: Vec<Token> = ids
            .iter()
            .filter_map(|&id| {
                u16::try_from(id)
                    .ok()
                    .and_then(|i| Token::from_u16(i, &self.inner))
            })
            .collect();
        self.inner.decode(tokens).trim().to_string()
    }

    /// The text of one vocabulary entry, with the end-of-word marker removed.
    pub fn decode_token(&self, id: u32) -> String {
        let Some(token) = u16::try_from(id)
            .ok()
            .and_then(|i| Token::from_u16(i, &self.inner))
        else {
            return format!("<{id}>");
        };
        self.inner.decode([token]).trim_end().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_words_and_texts_are_cut_before_bpe() {
        let tok = ClipTokenizer::new();
        // Without the bound this took hours; now it is linear.
        let word = "a".repeat(20_000_000);
        let ids = tok.encode(&word, 77);
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[0], SOT);
        assert!(ids.contains(&EOT));
        // Long but ordinary texts keep their first 77 tokens exactly.
        let text = "a photo of a happy face ".repeat(2000);
        let cut = tok.encode(&text, 77);
        let head = tok.encode(&"a photo of a happy face ".repeat(40), 77);
        assert_eq!(cut, head);
    }

    #[test]
    fn hi_there() {
        let t = ClipTokenizer::new();
        assert_eq!(t.encode("Hi there", 6), vec![SOT, 1883, 997, EOT, 0, 0]);
    }

    #[test]
    fn truncation_keeps_eot() {
        let t = ClipTokenizer::new();
        let ids = t.encode("a b c d e f g h", 5);
        assert_eq!(ids.len(), 5);
        assert_eq!(ids[4], EOT);
    }

    #[test]
    fn html_entities_are_unescaped_twice() {
        assert_eq!(clean_text("fish &amp;amp; chips"), "fish & chips");
        assert_eq!(clean_text("  a \n\t b  "), "a b");
    }

    #[test]
    fn decode_strips_word_end() {
        let t = ClipTokenizer::new();
        assert_eq!(t.decode_token(1883), "hi");
    }
}
