//! Speculative decoding from the context (n-gram / prompt lookup): a generating sequence
//! guesses its next tokens from what followed the last earlier occurrence of its latest
//! tokens, and the step verifies the guesses as extra rows of that sequence. The guess needs
//! no draft model, and a step with a few more rows costs far less than that many steps; the
//! sequence keeps the longest prefix the model agrees with, plus the model's own next token.
//!
//! It pays only while guesses are accepted and rows are cheap, so each sequence keeps an
//! estimate of how often its guesses are accepted, and drafts the number of tokens that
//! maximises the step's expected tokens per cost as the steps are timed (`step_costs`) —
//! none when the batch is busy or the text does not repeat. The estimate is kept by the
//! length of the match a guess came from: in text that copies its input, what follows four
//! matching tokens is nearly always right, and what follows one often not, so one figure
//! for both would draft too little after the long matches and too much after the short.

/// The longest and shortest n-grams looked up: a longer match predicts better; a single
/// token matches almost anywhere (in free text mostly wrongly, which the acceptance
/// estimate then learns).
const LONGEST_NGRAM: usize = 4;
const SHORTEST_NGRAM: usize = 1;
/// The acceptance estimate of a match length no sequence has drafted from yet.
const PRIOR_ACCEPTANCE: f64 = 0.5;
/// How much each verified draft token moves the estimate.
const LEARNING_RATE: f64 = 0.2;
/// How far a sequence's estimate drifts back toward the batch's each step it does not
/// draft: text that stopped repeating is tried again after a while, cheaply.
const RECOVERY_RATE: f64 = 0.02;
/// How much each verified draft token moves the batch's estimate: it follows the last some
/// dozens of judged tokens, a few requests' worth.
const BATCH_LEARNING_RATE: f64 = 0.05;
/// How far the batch's estimate drifts back toward the prior each step nobody drafts: a
/// workload that starts repeating its input is tried again after some hundreds of steps.
const BATCH_RECOVERY_RATE: f64 = 0.002;

/// Tokens guessed from a sequence's context.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Guess {
    /// The length of the match they followed.
    pub ngram: usize,
    pub tokens: Vec<u32>,
}

/// The tokens that followed the most recent earlier occurrence of the longest n-gram that
/// ends `tokens` (n from `LONGEST_NGRAM` down to `SHORTEST_NGRAM`), at most `most` of them.
pub(crate) fn propose(tokens: &[u32], most: usize) -> Option<Guess> {
    if most == 0 {
        return None;
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
            return Some(Guess {
                ngram: n,
                tokens: tokens[next..(next + most).min(tokens.len())].to_vec(),
            });
        }
    }
    None
}

/// An estimate of how often drafted tokens are accepted, by the length of the match they
/// followed.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rates([f64; LONGEST_NGRAM]);

impl Rates {
    fn of(&mut self, ngram: usize) -> &mut f64 {
        &mut self.0[ngram.clamp(SHORTEST_NGRAM, LONGEST_NGRAM) - 1]
    }

    fn get(&self, ngram: usize) -> f64 {
        self.0[ngram.clamp(SHORTEST_NGRAM, LONGEST_NGRAM) - 1]
    }

    /// Moves every length's estimate `rate` of the way toward `target`'s.
    fn drift(&mut self, target: &Rates, rate: f64) {
        for (mine, theirs) in self.0.iter_mut().zip(target.0) {
            *mine += rate * (theirs - *mine);
        }
    }
}

/// A sequence's estimate of how often its drafted tokens are accepted.
#[derive(Debug, Clone)]
pub(crate) struct Acceptance {
    rates: Rates,
}

impl Acceptance {
    /// A sequence that has not drafted yet: as the batch's drafts have lately fared.
    pub fn starting_at(batch: &BatchAcceptance) -> Self {
        Self { rates: batch.rates }
    }

    /// How often its tokens drafted after a match of `ngram` are accepted, as estimated.
    pub fn rate(&self, ngram: usize) -> f64 {
        self.rates.get(ngram)
    }

    /// The tokens a draft of `len` after a match of `ngram` is expected to add:
    /// `r + r² + … + rˡᵉⁿ`.
    pub fn expected(&self, ngram: usize, len: usize) -> f64 {
        let rate = self.rate(ngram);
        (1..=len as i32).map(|k| rate.powi(k)).sum()
    }

    /// Learns from a verified draft after a match of `ngram`: `accepted` of `drafted`
    /// tokens taken.
    pub fn record(&mut self, ngram: usize, drafted: usize, accepted: usize) {
        learn(self.rates.of(ngram), LEARNING_RATE, drafted, accepted);
    }

    /// A step without a draft: the estimates drift back toward the batch's.
    pub fn idle(&mut self, batch: &BatchAcceptance) {
        self.rates.drift(&batch.rates, RECOVERY_RATE);
    }
}

/// How often the batch's drafted tokens have lately been accepted, all its sequences
/// together: where a new sequence's estimate starts and an idle one's drifts back to. Where
/// the text of the requests does not repeat, a new request then does not spend its first
/// steps finding that out again (a prior of even odds made free text at four clients draft
/// ~×0.91 of not drafting); where it does, a new request drafts from its first steps.
#[derive(Debug, Clone)]
pub(crate) struct BatchAcceptance {
    rates: Rates,
}

/// Even odds at every match length.
const PRIOR: Rates = Rates([PRIOR_ACCEPTANCE; LONGEST_NGRAM]);

impl Default for BatchAcceptance {
    fn default() -> Self {
        Self { rates: PRIOR }
    }
}

impl BatchAcceptance {
    /// Learns from a draft after a match of `ngram` that one of its sequences verified.
    pub fn record(&mut self, ngram: usize, drafted: usize, accepted: usize) {
        learn(self.rates.of(ngram), BATCH_LEARNING_RATE, drafted, accepted);
    }

    /// A step in which no sequence drafted: the estimates drift back toward the prior, so a
    /// batch that stopped drafting tries again after a while.
    pub fn idle(&mut self) {
        self.rates.drift(&PRIOR, BATCH_RECOVERY_RATE);
    }
}

/// Moves `rate` by `learning_rate` toward each judged token of a draft of which `accepted`
/// of `drafted` tokens were taken: the first rejection ends a draft, so the tokens after it
/// say nothing.
fn learn(rate: &mut f64, learning_rate: f64, drafted: usize, accepted: usize) {
    let judged = (accepted + 1).min(drafted);
    for k in 0..judged {
        let hit = if k < accepted { 1.0 } else { 0.0 };
        *rate += learning_rate * (hit - *rate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guess(ngram: usize, tokens: &[u32]) -> Option<Guess> {
        Some(Guess {
            ngram,
            tokens: tokens.to_vec(),
        })
    }

    #[test]
    fn a_draft_is_what_followed_the_longest_latest_match() {
        // "… 5 6 7 | 8 9 …" earlier, and the text ends in "5 6 7": propose "8 9 …".
        let tokens = [1, 5, 6, 7, 8, 9, 10, 2, 6, 7, 3, 5, 6, 7];
        assert_eq!(propose(&tokens, 3), guess(3, &[8, 9, 10]));
        // Only "6 7" matches, latest first: what followed at position 8.
        let tokens = [6, 7, 1, 6, 7, 3, 9, 6, 7];
        assert_eq!(propose(&tokens, 2), guess(2, &[3, 9]));
        // The draft stops at the end of the text.
        let tokens = [4, 4, 4, 4];
        assert_eq!(propose(&tokens, 5), guess(3, &[4]));
        // One token in common is the shortest match; none is nothing to draft.
        assert_eq!(propose(&[1, 2, 3, 1], 4), guess(1, &[2, 3, 1]));
        assert_eq!(propose(&[1, 2, 3, 4], 4), None);
        assert_eq!(propose(&[1, 2, 1, 2], 0), None);
    }

    #[test]
    fn the_estimate_learns_from_drafts_and_drifts_back_when_idle() {
        let batch = BatchAcceptance::default();
        let mut acceptance = Acceptance::starting_at(&batch);
        for _ in 0..20 {
            acceptance.record(2, 4, 4);
        }
        assert!(acceptance.rate(2) > 0.95, "{}", acceptance.rate(2));
        // Only the first rejection says anything: 0 of 4 judges one token.
        let before = acceptance.rate(2);
        acceptance.record(2, 4, 0);
        assert!((acceptance.rate(2) - 0.8 * before).abs() < 1e-12);
        for _ in 0..40 {
            acceptance.record(2, 4, 0);
        }
        assert!(acceptance.rate(2) < 0.01, "{}", acceptance.rate(2));
        // Idle steps bring it back toward the batch's, to be tried again.
        for _ in 0..200 {
            acceptance.idle(&batch);
        }
        let rate = acceptance.rate(2);
        assert!(rate > 0.4, "{rate}");
        assert!((acceptance.expected(2, 2) - rate * (1.0 + rate)).abs() < 1e-12);
    }

    #[test]
    fn long_matches_and_short_ones_are_judged_apart() {
        // Copying with renames: after four matching tokens the guess is right, after one
        // it is wrong (the renamed word matched somewhere else).
        let mut acceptance = Acceptance::starting_at(&BatchAcceptance::default());
        for _ in 0..20 {
            acceptance.record(4, 8, 8);
            acceptance.record(1, 4, 0);
        }
        assert!(acceptance.rate(4) > 0.95, "{}", acceptance.rate(4));
        assert!(acceptance.rate(1) < 0.05, "{}", acceptance.rate(1));
        // Lengths past the longest looked up are the longest.
        assert_eq!(
            acceptance.rate(LONGEST_NGRAM + 3),
            acceptance.rate(LONGEST_NGRAM)
        );
    }

    #[test]
    fn new_sequences_start_from_how_the_batchs_drafts_fared() {
        let mut batch = BatchAcceptance::default();
        // Free text: a few requests' drafts mostly rejected.
        for _ in 0..30 {
            batch.record(1, 3, 0);
            batch.record(1, 2, 1);
        }
        let low = Acceptance::starting_at(&batch).rate(1);
        assert!(low < 0.4, "{low}");
        // Other match lengths keep their own estimate.
        assert_eq!(Acceptance::starting_at(&batch).rate(3), PRIOR_ACCEPTANCE);
        // A copying request finds its own rate quickly, and idles back to the batch's.
        let mut copying = Acceptance::starting_at(&batch);
        for _ in 0..10 {
            copying.record(1, 4, 4);
        }
        assert!(copying.rate(1) > 0.8, "{}", copying.rate(1));
        for _ in 0..500 {
            copying.idle(&batch);
        }
        assert!((copying.rate(1) - low).abs() < 0.01, "{}", copying.rate(1));
        // A batch nobody drafts in drifts back to even odds, slowly.
        for _ in 0..100 {
            batch.idle();
        }
        let drifted = Acceptance::starting_at(&batch).rate(1);
        assert!(drifted > low && drifted < PRIOR_ACCEPTANCE, "{drifted}");
        for _ in 0..5000 {
            batch.idle();
        }
        assert!((batch.rates.get(1) - PRIOR_ACCEPTANCE).abs() < 0.01);
    }
}
