//! Speculative decoding from the context (n-gram / prompt lookup): a generating sequence
//! guesses its next tokens from what followed the last earlier occurrence of its latest
//! tokens, and the step verifies the guesses as extra rows of that sequence. The guess needs
//! no draft model, and a step with a few more rows costs far less than that many steps; the
//! sequence keeps the longest prefix the model agrees with, plus the model's own next token.
//!
//! It pays only while guesses are accepted and rows are cheap, so each sequence keeps an
//! estimate of how often its guesses are accepted and drafts the number of tokens that
//! maximises the step's expected tokens per cost — none when the batch is busy or the text
//! does not repeat.

/// The longest and shortest n-grams looked up: a longer match predicts better; a single
/// token matches almost anywhere (in free text mostly wrongly, which the acceptance
/// estimate then learns).
const LONGEST_NGRAM: usize = 4;
const SHORTEST_NGRAM: usize = 1;
/// The most tokens a sequence drafts in one step.
pub(crate) const MAX_DRAFT: usize = 8;
/// What one more row adds to a decode step's cost, as a share of a one-row step: the row
/// kernel reads the weights once for all rows, and each row adds its dots. Measured on
/// SmolLM2 Q4_1 on the 2-core VM (engine/BENCHMARKS.md): 4 rows take ×1.91 the time of one
/// (108 tok/s alone, 226 at 4 clients), so a row adds 0.30.
const ROW_COST: f64 = 0.30;
/// The acceptance estimate of a sequence that has not drafted yet.
const PRIOR_ACCEPTANCE: f64 = 0.5;
/// How much each verified draft token moves the estimate.
const LEARNING_RATE: f64 = 0.2;
/// How far a sequence's estimate drifts back toward the prior each step it does not draft:
/// text that stopped repeating is tried again after a while, cheaply.
const RECOVERY_RATE: f64 = 0.02;

/// The tokens that followed the most recent earlier occurrence of the longest n-gram that
/// ends `tokens` (n from `LONGEST_NGRAM` down to `SHORTEST_NGRAM`), at most `most` of them.
pub(crate) fn propose(tokens: &[u32], most: usize) -> Vec<u32> {
    if most == 0 {
        return Vec::new();
    }
    for n in (SHORTEST_NGRAM..=LONGEST_NGRAM).rev() {
        if tokens.len() <= n {
            continue;
        }
        let suffix = &tokens[tokens.len() - n..];
        // The latest start before the suffix itself whose n tokens equal it.
        let found = (0..tokens.len() - n)
            .rev()
            .find(|&start| &tokens[start..start + n] == suffix);
        if let Some(start) = found {
            let next = start + n;
            return tokens[next..(next + most).min(tokens.len())].to_vec();
        }
    }
    Vec::new()
}

/// A sequence's estimate of how often its drafted tokens are accepted.
#[derive(Debug, Clone)]
pub(crate) struct Acceptance {
    rate: f64,
}

impl Default for Acceptance {
    fn default() -> Self {
        Self {
            rate: PRIOR_ACCEPTANCE,
        }
    }
}

impl Acceptance {
    /// The number of tokens to draft into a step that already carries `tokens` expected new
    /// tokens at `cost` (in one-row steps, `1 + ROW_COST · (rows - 1)`): the `k` in
    /// `0..=most` that maximises the step's tokens per cost, where `k` drafted tokens are
    /// worth `r + r² + … + rᵏ` expected tokens at acceptance rate `r` and cost `ROW_COST · k`.
    /// A busy step (high `cost`) or a low rate gives 0.
    pub fn draft_len(&self, tokens: f64, cost: f64, most: usize) -> usize {
        let r = self.rate;
        let mut best = (tokens / cost, 0);
        let mut expected = 0.0;
        let mut term = 1.0;
        for k in 1..=most.min(MAX_DRAFT) {
            term *= r;
            expected += term;
            let rate = (tokens + expected) / (cost + ROW_COST * k as f64);
            if rate > best.0 {
                best = (rate, k);
            }
        }
        best.1
    }

    /// The tokens a draft of `len` is expected to add: `r + r² + … + rˡᵉⁿ`.
    pub fn expected(&self, len: usize) -> f64 {
        (1..=len as i32).map(|k| self.rate.powi(k)).sum()
    }

    /// Learns from a verified draft: `accepted` of `drafted` tokens taken (the first
    /// rejection ends a draft, so the tokens after it say nothing).
    pub fn record(&mut self, drafted: usize, accepted: usize) {
        let judged = (accepted + 1).min(drafted);
        for k in 0..judged {
            let hit = if k < accepted { 1.0 } else { 0.0 };
            self.rate += LEARNING_RATE * (hit - self.rate);
        }
    }

    /// A step without a draft: the estimate drifts back toward the prior.
    pub fn idle(&mut self) {
        self.rate += RECOVERY_RATE * (PRIOR_ACCEPTANCE - self.rate);
    }

    /// The step cost of `rows` rows, in one-row steps.
    pub fn step_cost(rows: usize) -> f64 {
        1.0 + ROW_COST * rows.saturating_sub(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_draft_is_what_followed_the_longest_latest_match() {
        // "… 5 6 7 | 8 9 …" earlier, and the text ends in "5 6 7": propose "8 9 …".
        let tokens = [1, 5, 6, 7, 8, 9, 10, 2, 6, 7, 3, 5, 6, 7];
        assert_eq!(propose(&tokens, 3), vec![8, 9, 10]);
        // Only "6 7" matches, latest first: what followed at position 8.
        let tokens = [6, 7, 1, 6, 7, 3, 9, 6, 7];
        assert_eq!(propose(&tokens, 2), vec![3, 9]);
        // The draft stops at the end of the text.
        let tokens = [4, 4, 4, 4];
        assert_eq!(propose(&tokens, 5), vec![4]);
        // One token in common is the shortest match; none is nothing to draft.
        assert_eq!(propose(&[1, 2, 3, 1], 4), vec![2, 3, 1]);
        assert!(propose(&[1, 2, 3, 4], 4).is_empty());
        assert!(propose(&[1, 2, 1, 2], 0).is_empty());
    }

    #[test]
    fn drafts_grow_with_acceptance_and_stop_when_the_batch_is_busy() {
        let mut acceptance = Acceptance::default();
        let alone = Acceptance::step_cost(1);
        let at_first = acceptance.draft_len(1.0, alone, MAX_DRAFT);
        assert!(at_first > 0);
        // Eight sequences decoding already: one row more slows them all, for a coin flip.
        assert_eq!(
            acceptance.draft_len(8.0, Acceptance::step_cost(8), MAX_DRAFT),
            0
        );
        for _ in 0..20 {
            acceptance.record(4, 4);
        }
        let when_accepted = acceptance.draft_len(1.0, alone, MAX_DRAFT);
        assert!(when_accepted > at_first, "{when_accepted} vs {at_first}");
        assert!(acceptance.draft_len(1.0, alone, 2) <= 2);
        for _ in 0..20 {
            acceptance.record(4, 0);
        }
        assert_eq!(acceptance.draft_len(1.0, alone, MAX_DRAFT), 0);
        // Idle steps bring it back to trying.
        for _ in 0..200 {
            acceptance.idle();
        }
        assert!(acceptance.draft_len(1.0, alone, MAX_DRAFT) > 0);
    }
}
