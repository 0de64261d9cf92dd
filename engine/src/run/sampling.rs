//! Choosing the next token from the logits: repeat penalty, then greedy (temperature 0) or
//! temperature → top-k → top-p → a draw from a seeded RNG (same seed, same tokens).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::SamplingParams;

pub struct Sampler {
    rng: StdRng,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    repeat_penalty: f32,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Self {
        Self {
            rng: match params.seed {
                Some(seed) => StdRng::seed_from_u64(seed),
                None => StdRng::from_os_rng(),
            },
            temperature: params.temperature,
            top_k: params.top_k as usize,
            top_p: params.top_p,
            repeat_penalty: params.repeat_penalty,
        }
    }

    /// Picks a token. `history` is every token in the context so far (prompt included), for
    /// the repeat penalty.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        match self.choices(logits, history) {
            Choices::Greedy(token) => token,
            Choices::Weighted(candidates, probs) => self.draw(&candidates, &probs),
        }
    }

    /// Whether every token is the most likely one as the logits give it: temperature 0 and
    /// no repeat penalty (then a device may choose it: `BatchItem::greedy`).
    pub fn takes_most_likely(&self) -> bool {
        self.is_greedy() && !self.penalizes()
    }

    fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature <= 0.0
    }

    fn penalizes(&self) -> bool {
        self.repeat_penalty != 1.0 && self.repeat_penalty > 0.0
    }

    /// The distribution a token is drawn from: the best token alone (temperature 0), or
    /// candidates and their weights after temperature, top-k and top-p.
    fn choices(&self, logits: &mut [f32], history: &[u32]) -> Choices {
        if self.penalizes() {
            apply_repeat_penalty(logits, history, self.repeat_penalty);
        }
        if self.is_greedy() {
            return Choices::Greedy(argmax(logits));
        }
        // Candidates sorted by logit, best first; ties keep the lower id first so the order
        // (and so a seeded draw) does not depend on the sort's stability. Sorted on the raw
        // logits: dividing by a tiny temperature first would overflow them to ±inf, losing
        // their order.
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if candidates.is_empty() {
            return Choices::Greedy(argmax(logits));
        }
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.top_k > 0 && self.top_k < candidates.len() {
            candidates.truncate(self.top_k);
        }
        // Softmax of logit / temperature, shifted by the best logit *before* the division:
        // (l - max) / t is 0 for the best and ≤ 0 for the rest, so a temperature so small that
        // l / t overflows (1e-30, the smallest positive f32) gives exp(-inf) = 0 for the others
        // and the draw is greedy, where inf - inf used to make every probability NaN.
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates
            .iter()
            .map(|(_, l)| ((l - max) / self.temperature).exp())
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.top_p > 0.0 && self.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                mass += p;
                if mass >= self.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            candidates.truncate(keep);
        }
        Choices::Weighted(candidates.into_iter().map(|(id, _)| id).collect(), probs)
    }

    /// A draw from `candidates` by their weights `probs` (not necessarily summing to 1).
    fn draw(&mut self, candidates: &[u32], probs: &[f32]) -> u32 {
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, p) in probs.iter().enumerate() {
            if r < *p {
                return candidates[i];
            }
            r -= p;
        }
        candidates[probs.len() - 1]
    }
}

/// What [`Sampler::choices`] found.
enum Choices {
    Greedy(u32),
    /// Candidate ids and their weights.
    Weighted(Vec<u32>, Vec<f32>),
}

/// The CTRL/transformers penalty: a seen token's logit is divided by the penalty when
/// positive, multiplied when negative (so it always becomes less likely).
fn apply_repeat_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    let mut seen = vec![false; logits.len()];
    for &id in history {
        let i = id as usize;
        if i < logits.len() && !seen[i] {
            seen[i] = true;
            let l = &mut logits[i];
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// Index of the largest logit; the lowest index wins a tie (as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: u32, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            max_tokens: 1,
            temperature,
            top_k,
            top_p,
            repeat_penalty: 1.0,
            seed: Some(seed),
            ..SamplingParams::greedy(1)
        }
    }

    #[test]
    fn greedy_picks_the_max() {
        let mut s = Sampler::new(&params(0.0, 0, 1.0, 1));
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut s = Sampler::new(&params(5.0, 1, 1.0, 7));
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.1, 3.0, 2.9, -1.0], &[]), 1);
        }
    }

    #[test]
    fn top_p_cuts_the_tail() {
        // p(0) ≈ 0.9997: top_p 0.5 keeps only token 0.
        let mut s = Sampler::new(&params(1.0, 0, 0.5, 3));
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [10.0, 2.0, 1.0], &[]), 0);
        }
    }

    #[test]
    fn same_seed_same_draws_and_draws_vary() {
        let logits = [1.0, 1.1, 0.9, 1.05, 0.95];
        let draw = |seed| {
            let mut s = Sampler::new(&params(1.0, 0, 1.0, seed));
            (0..32)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
        let mut seen = draw(42);
        seen.sort();
        seen.dedup();
        assert!(
            seen.len() > 2,
            "near-uniform logits should give varied tokens"
        );
    }

    #[test]
    fn repeat_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(&SamplingParams {
            repeat_penalty: 2.0,
            ..params(0.0, 0, 1.0, 0)
        });
        // Token 0 (3.0 → 1.5) loses to token 1 (2.0) once it is in the history.
        assert_eq!(s.sample(&mut [3.0, 2.0, -1.0], &[0]), 1);
        let mut logits = [-1.0, -1.5];
        apply_repeat_penalty(&mut logits, &[0], 2.0);
        assert_eq!(logits, [-2.0, -1.5]);
    }

    #[test]
    fn a_vanishing_temperature_is_greedy() {
        // l / t overflows f32 for all of these: the draw must still be the best token, never
        // a NaN-driven pick of the last candidate.
        for temperature in [1e-30, 1e-38, f32::MIN_POSITIVE, 1e-45] {
            for seed in 0..8 {
                let mut s = Sampler::new(&params(temperature, 0, 1.0, seed));
                assert_eq!(
                    s.sample(&mut [0.1, 3.0, 2.9, -1.0], &[]),
                    1,
                    "temperature {temperature:e}"
                );
                // All negative: l / t is -inf for every token.
                assert_eq!(
                    s.sample(&mut [-7.0, -6.0, -2.5, -3.0], &[]),
                    2,
                    "temperature {temperature:e}"
                );
                let mut nucleus = Sampler::new(&params(temperature, 3, 0.9, seed));
                assert_eq!(nucleus.sample(&mut [1.0, 5.0, 4.0, 2.0], &[]), 1);
            }
        }
    }

    #[test]
    fn ties_at_a_vanishing_temperature_stay_among_the_best() {
        let mut s = Sampler::new(&params(1e-40, 0, 1.0, 5));
        for _ in 0..32 {
            let id = s.sample(&mut [1.0, 4.0, -2.0, 4.0], &[]);
            assert!(id == 1 || id == 3, "picked {id}");
        }
    }
}
