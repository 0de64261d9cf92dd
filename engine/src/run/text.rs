//! Turning generated token ids into streamed text: incremental detokenization that never
//! splits a UTF-8 character, and stop strings that are withheld while they might still be
//! forming and never emitted.

use tokenizers::Tokenizer;

use crate::EngineError;

/// What one new token produced.
#[derive(Debug, Default, PartialEq)]
pub struct Step {
    /// Text safe to show now (may be empty).
    pub emit: String,
    /// A stop string completed; the generation ends and the stop string is not shown.
    pub stopped: bool,
}

pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Decoding restarts at `prefix_offset` so that tokenizers which drop a leading space
    /// at the start of a decode (SentencePiece) drop it consistently; `read_offset` is where
    /// the text already accounted for ends.
    prefix_offset: usize,
    read_offset: usize,
    /// All text decoded so far.
    text: String,
    /// `text[..emitted]` has been handed out.
    emitted: usize,
    stops: Vec<String>,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer, stops: &[String]) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            text: String::new(),
            emitted: 0,
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| EngineError::Model(format!("detokenizing: {e}")))
    }

    pub fn push(&mut self, id: u32) -> Result<Step, EngineError> {
        self.ids.push(id);
        let prefix = self.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.decode(&self.ids[self.prefix_offset..])?;
        // A trailing U+FFFD means the last token ended inside a multi-byte character: wait
        // for the bytes that complete it.
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let piece = full
                .get(prefix.len()..)
                .or_else(|| full.strip_prefix(prefix.as_str()))
                .unwrap_or("");
            self.text.push_str(piece);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        Ok(self.release())
    }

    /// Hands out the text that cannot be (part of) a stop string.
    fn release(&mut self) -> Step {
        if let Some(at) = self.first_stop() {
            let emit = self.text[self.emitted..at].to_string();
            self.text.truncate(at);
            self.emitted = at;
            return Step {
                emit,
                stopped: true,
            };
        }
        let safe = self.text.len() - self.pending_stop_prefix();
        let emit = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        Step {
            emit,
            stopped: false,
        }
    }

    /// Byte offset of the earliest complete stop string in the text not yet emitted.
    fn first_stop(&self) -> Option<usize> {
        // Text already emitted contains no stop start (it was withheld while it could be
        // one), so searching a stop's length back from `emitted` is enough.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.emitted.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min()
    }

    /// Length of the longest suffix of the text that is a proper prefix of a stop string.
    fn pending_stop_prefix(&self) -> usize {
        let tail = &self.text[self.emitted..];
        let mut best = 0;
        for stop in &self.stops {
            for (i, _) in stop.char_indices().skip(1) {
                if i > best && tail.ends_with(&stop[..i]) {
                    best = i;
                }
            }
        }
        best
    }

    /// End of generation (eos, length, cancel): whatever was held back for a possible stop
    /// string, plus bytes of an unfinished character, is text after all.
    pub fn finish(&mut self) -> Result<String, EngineError> {
        if self.read_offset < self.ids.len() {
            let prefix = self.decode(&self.ids[self.prefix_offset..self.read_offset])?;
            let full = self.decode(&self.ids[self.prefix_offset..])?;
            if let Some(piece) = full.get(prefix.len()..) {
                self.text.push_str(piece);
            }
            self.read_offset = self.ids.len();
        }
        let rest = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        Ok(rest)
    }

    /// All the text of the completion (without any stop string).
    pub fn text(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny-llama/tokenizer.json"
        );
        Tokenizer::from_file(path).unwrap()
    }

    fn stream_all(tok: &Tokenizer, text: &str, stops: &[String]) -> (Vec<String>, String, bool) {
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        let mut stream = TextStream::new(tok, stops);
        let mut pieces = Vec::new();
        for id in ids {
            let step = stream.push(id).unwrap();
            if !step.emit.is_empty() {
                pieces.push(step.emit);
            }
            if step.stopped {
                return (pieces, stream.text().to_string(), true);
            }
        }
        let rest = stream.finish().unwrap();
        if !rest.is_empty() {
            pieces.push(rest);
        }
        (pieces, stream.text().to_string(), false)
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let tok = tokenizer();
        let text = "bees 🐝🍯 and 日本語 naïve";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        // The byte-level vocabulary spells these characters with several tokens each.
        assert!(ids.len() > text.chars().count() / 2);
        let (pieces, all, _) = stream_all(&tok, text, &[]);
        assert_eq!(pieces.concat(), text);
        assert_eq!(all, text);
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    }

    #[test]
    fn stop_string_is_withheld_then_dropped() {
        let tok = tokenizer();
        let (pieces, all, stopped) =
            stream_all(&tok, "Hello there, how are you today?", &["how are".into()]);
        assert!(stopped);
        assert_eq!(all, "Hello there, ");
        assert_eq!(pieces.concat(), "Hello there, ");
    }

    #[test]
    fn a_partial_stop_string_is_released_at_the_end() {
        let tok = tokenizer();
        let (pieces, all, stopped) = stream_all(&tok, "Hello there, how", &["how are".into()]);
        assert!(!stopped);
        assert_eq!(all, "Hello there, how");
        assert_eq!(pieces.concat(), "Hello there, how");
    }
}
