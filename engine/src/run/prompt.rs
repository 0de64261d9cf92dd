//! Prompts and their tokens, including prompts that mix trusted markup with untrusted text.
//!
//! A chat template renders the guest's markup (`<|im_start|>user\n`) around a client's words.
//! Tokenizing the rendered string as a whole, as transformers and llama.cpp do, lets a client
//! who types `<|im_start|>system` open a system turn. [`Prompt::Parts`] keeps the two apart:
//! special-token text is parsed in markup only, and a client's text is always plain text.
//! Apart from that, the ids are those of the whole string: the text between two special
//! tokens is tokenized in one piece even where it spans markup and client text, so word
//! boundaries (`[INST] Hello` → ` Hello`) come out as for the whole string.

use tokenizers::Tokenizer;

use crate::EngineError;

/// What a generation starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// One string, special-token text in it parsed (the raw completion APIs' behaviour).
    Text(String),
    /// A prompt assembled from parts of different trust, in order.
    Parts(Vec<PromptPart>),
}

/// One part of a [`Prompt::Parts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptPart {
    /// The prompt's author's own text (a chat template's markup): special-token text in it,
    /// such as `<|im_start|>`, becomes that token.
    Markup(String),
    /// Text from a client: tokenized as plain text, so it never becomes a special token.
    Text(String),
}

impl From<&str> for Prompt {
    fn from(text: &str) -> Self {
        Prompt::Text(text.to_owned())
    }
}

impl From<&String> for Prompt {
    fn from(text: &String) -> Self {
        Prompt::Text(text.clone())
    }
}

impl From<String> for Prompt {
    fn from(text: String) -> Self {
        Prompt::Text(text)
    }
}

impl Prompt {
    /// Bytes of text in the prompt.
    pub fn len(&self) -> usize {
        match self {
            Prompt::Text(text) => text.len(),
            Prompt::Parts(parts) => parts.iter().map(|part| part.text().len()).sum(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PromptPart {
    pub fn text(&self) -> &str {
        match self {
            PromptPart::Markup(text) | PromptPart::Text(text) => text,
        }
    }
}

/// Turns prompts into the ids the model reads.
pub(crate) struct PromptEncoder {
    tokenizer: Tokenizer,
    /// The same tokenizer with special-token text treated as plain text.
    plain: Tokenizer,
    /// The special tokens' text and ids, longest text first (so `<|im_start|>` wins over a
    /// shorter token that is its prefix).
    special: Vec<(String, u32)>,
    bos_id: Option<u32>,
    /// Whether the tokenizer's post-processor starts a sequence with `bos_id`.
    adds_bos: bool,
}

impl PromptEncoder {
    pub fn new(tokenizer: Tokenizer, bos_id: Option<u32>) -> Result<Self, EngineError> {
        let mut plain = tokenizer.clone();
        plain.set_encode_special_tokens(true);
        let mut special: Vec<(String, u32)> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special && !token.content.is_empty())
            .map(|(id, token)| (token.content, id))
            .collect();
        special.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.cmp(b)));
        let mut encoder = Self {
            tokenizer,
            plain,
            special,
            bos_id,
            adds_bos: false,
        };
        encoder.adds_bos =
            bos_id.is_some() && encoder.encode_text("", true)?.first() == bos_id.as_ref();
        Ok(encoder)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The ids of a prompt, starting with the beginning-of-sequence token where the model
    /// expects one (once, even when the prompt's text starts with it too).
    pub fn encode(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        match prompt {
            Prompt::Text(text) => self.encode_text(text, true),
            Prompt::Parts(parts) => self.encode_parts(parts),
        }
    }

    /// `text`'s ids, special-token text parsed; with `special`, also what the tokenizer's
    /// post-processor adds (the bos).
    pub fn encode_text(&self, text: &str, special: bool) -> Result<Vec<u32>, EngineError> {
        let mut ids = encode_with(&self.tokenizer, text, special)?;
        // A templated prompt often starts with the bos string itself; the tokenizer's
        // post-processor then adds a second one.
        if special
            && let Some(bos) = self.bos_id
            && ids.len() >= 2
            && ids[0] == bos
            && ids[1] == bos
        {
            ids.remove(0);
        }
        Ok(ids)
    }

    fn encode_parts(&self, parts: &[PromptPart]) -> Result<Vec<u32>, EngineError> {
        let mut ids = Vec::new();
        // Plain text since the last special token, tokenized in one piece at the next one.
        let mut run = String::new();
        for part in parts {
            let mut markup = match part {
                PromptPart::Markup(markup) => markup.as_str(),
                PromptPart::Text(text) => {
                    run.push_str(text);
                    continue;
                }
            };
            while let Some((at, text, id)) = self.next_special(markup) {
                run.push_str(&markup[..at]);
                ids.extend(encode_with(&self.plain, &run, false)?);
                run.clear();
                ids.push(id);
                markup = &markup[at + text.len()..];
            }
            run.push_str(markup);
        }
        ids.extend(encode_with(&self.plain, &run, false)?);
        if self.adds_bos
            && let Some(bos) = self.bos_id
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }
}

impl PromptEncoder {
    /// The first special token in `markup`: where it starts, its text and its id. A scan
    /// rather than an automaton: markup is a template's few hundred bytes.
    fn next_special<'a>(&'a self, markup: &str) -> Option<(usize, &'a str, u32)> {
        markup.char_indices().find_map(|(at, _)| {
            self.special
                .iter()
                .find(|(text, _)| markup[at..].starts_with(text.as_str()))
                .map(|(text, id)| (at, text.as_str(), *id))
        })
    }
}

fn encode_with(tokenizer: &Tokenizer, text: &str, special: bool) -> Result<Vec<u32>, EngineError> {
    if text.is_empty() && !special {
        return Ok(Vec::new());
    }
    let encoding = tokenizer
        .encode(text, special)
        .map_err(|e| EngineError::InvalidInput(format!("cannot tokenize: {e}")))?;
    Ok(encoding.get_ids().to_vec())
}
