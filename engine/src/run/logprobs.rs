//! Log-probabilities of generated tokens: the chosen token's and the most likely ones, from
//! the logits the token was chosen from.

use super::constraint::Vocabulary;
use crate::{EngineError, TokenLogprob, TokenText};

/// `logits`' log-softmax at `chosen`, and its `top` most likely tokens (best first; the
/// lower id first among equals). Masked tokens (`-inf`) have no probability and are never
/// among the top.
pub(crate) fn token_logprob(
    logits: &[f32],
    chosen: u32,
    top: usize,
    vocabulary: &Vocabulary,
) -> Result<TokenLogprob, EngineError> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| f64::from(l - max).exp())
        .sum();
    let log_total = max + sum.ln() as f32;
    let top = most_likely(logits, top)
        .into_iter()
        .map(|token| (token, logits[token as usize]));
    assemble(
        (chosen, logits[chosen as usize]),
        top,
        log_total,
        vocabulary,
    )
}

/// The same from a row's best candidates `(id, logit)` (unranked) and its log-softmax's
/// normalizer `log_total`, as a device hands them back: `None` where `chosen` is not among
/// them or they are fewer than `top` while the row has more (then the row is read).
pub(crate) fn candidates_logprob(
    candidates: &[(u32, f32)],
    complete: bool,
    log_total: f32,
    chosen: u32,
    top: usize,
    vocabulary: &Vocabulary,
) -> Option<Result<TokenLogprob, EngineError>> {
    let &(_, chosen_logit) = candidates.iter().find(|&&(id, _)| id == chosen)?;
    if candidates.len() < top && !complete {
        return None;
    }
    let mut ranked = candidates.to_vec();
    ranked.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(top);
    Some(assemble(
        (chosen, chosen_logit),
        ranked,
        log_total,
        vocabulary,
    ))
}

/// A token's log-probability record: `chosen` and `top` as `(id, logit)`, each less the
/// log-softmax's normalizer (at most 0, whatever rounding gave).
fn assemble(
    chosen: (u32, f32),
    top: impl IntoIterator<Item = (u32, f32)>,
    log_total: f32,
    vocabulary: &Vocabulary,
) -> Result<TokenLogprob, EngineError> {
    let logprob = |logit: f32| (logit - log_total).min(0.0);
    let text = |token: u32| -> Result<TokenText, EngineError> {
        Ok(TokenText {
            id: token,
            bytes: vocabulary.token_bytes(token)?,
        })
    };
    Ok(TokenLogprob {
        token: text(chosen.0)?,
        logprob: logprob(chosen.1),
        top: top
            .into_iter()
            .map(|(token, logit)| Ok((text(token)?, logprob(logit))))
            .collect::<Result<_, EngineError>>()?,
    })
}

/// The ids of the `n` largest finite logits, largest first (lower id first among equals):
/// one pass that keeps a short sorted list, for `n` up to a few dozen.
fn most_likely(logits: &[f32], n: usize) -> Vec<u32> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return Vec::new();
    }
    for (token, &logit) in logits.iter().enumerate() {
        if !logit.is_finite() || (best.len() == n && logit <= best[n - 1].1) {
            continue;
        }
        let at = best.partition_point(|&(_, l)| l >= logit);
        best.insert(at, (token as u32, logit));
        best.truncate(n);
    }
    best.into_iter().map(|(token, _)| token).collect()
}

#[cfg(test)]
mod tests {
    use super::most_likely;

    #[test]
    fn the_most_likely_are_sorted_and_skip_masked_tokens() {
        let logits = [0.5, f32::NEG_INFINITY, 2.0, 0.5, 3.0, -1.0];
        assert_eq!(most_likely(&logits, 3), [4, 2, 0]);
        assert_eq!(most_likely(&logits, 4), [4, 2, 0, 3]);
        assert_eq!(most_likely(&logits, 10), [4, 2, 0, 3, 5]);
        assert!(most_likely(&logits, 0).is_empty());
    }
}
