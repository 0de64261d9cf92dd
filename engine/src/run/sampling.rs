//! Choosing the next token from the logits: repeat penalty, then greedy (temperature 0) or
//! temperature → top-k → top-p → a draw from a seeded RNG (same seed, same tokens). On a GPU
//! the draw is made from the row's best candidates where they are enough
//! ([`Sampler::sample_best`]), the same draw as from the whole row.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::SamplingParams;
use crate::model::{BestCandidates, TokenChoice};

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
        if self.penalizes() {
            apply_repeat_penalty(logits, history, self.repeat_penalty);
        }
        if self.is_greedy() {
            return argmax(logits);
        }
        // Candidates best first; ties keep the lower id first so the order (and so a seeded
        // draw) does not depend on how they were sorted. Ranked on the raw logits: dividing
        // by a tiny temperature first would overflow them to ±inf, losing their order.
        let candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        self.choose_among(Ranked::new(candidates), None)
            .expect("every candidate is at hand")
    }

    /// Picks a token from the best candidates of a row that a device handed back, as
    /// [`Sampler::sample`] picks from the whole row, or `None` where they are not enough:
    /// top-k wider than they are, or a top-p walk or a draw that goes past them. Then the
    /// RNG is as it was, and `sample` on the row's logits draws what it would have.
    /// The same token as `sample`'s, draw for draw, wherever top-k is on or the candidates
    /// are the whole row; otherwise the softmax's sum is the device's (f32, against the
    /// host's f64: ~1e-6 of it), which moves a draw only when it lands that close to a
    /// boundary between two candidates.
    pub fn sample_best(&mut self, best: &BestCandidates) -> Option<u32> {
        debug_assert!(!self.penalizes(), "a penalized row is read whole");
        if best.candidates.is_empty() {
            return None;
        }
        if self.is_greedy() {
            return Some(best_of(&best.candidates));
        }
        let saved = self.rng.clone();
        let whole_sum = (!best.complete).then_some(best.sum);
        let token = self.choose_among(Ranked::new(best.candidates.clone()), whole_sum);
        if token.is_none() {
            self.rng = saved;
        }
        token
    }

    /// Top-k, then top-p, then a draw, over `ranked`. `whole_sum` is `None` where `ranked`
    /// holds every candidate of the row, else the softmax's sum over them all, which
    /// `ranked`, the best of them, may not be enough for (`None`).
    fn choose_among(&mut self, mut ranked: Ranked, mut whole_sum: Option<f64>) -> Option<u32> {
        if self.top_k > 0 {
            if whole_sum.is_some() && self.top_k > ranked.len() {
                return None;
            }
            ranked.keep_best(self.top_k);
            // The best k are all at hand, and the softmax is theirs.
            whole_sum = None;
        }
        let partial = whole_sum.is_some();
        let weights = Weights::new(&mut ranked, self.temperature, whole_sum);
        // The smallest prefix whose mass reaches top_p (at least one token), else all.
        let keep = if self.top_p > 0.0 && self.top_p < 1.0 {
            let mut mass = 0f64;
            let mut keep = None;
            for i in 0..ranked.len() {
                mass += weights.of(ranked.at(i).1);
                if mass >= self.top_p as f64 {
                    keep = Some(i + 1);
                    break;
                }
            }
            match keep {
                None if partial => return None,
                // Every candidate of the row: their whole mass, as when top-p is off.
                Some(keep) if keep == ranked.len() && !partial => None,
                keep => keep,
            }
        } else {
            None
        };
        self.draw(&mut ranked, &weights, keep, partial)
    }

    /// What a device may hand back of a row for this sampler, where nothing else reads the
    /// row: the most likely token where that is every token (temperature 0), the best
    /// candidates where it draws; the logits themselves for a repeat penalty, which needs
    /// the context's every token.
    pub fn choice(&self) -> TokenChoice {
        if self.penalizes() {
            TokenChoice::FromLogits
        } else if self.is_greedy() {
            TokenChoice::MostLikely
        } else {
            TokenChoice::FromCandidates {
                temperature: self.temperature,
            }
        }
    }

    fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature <= 0.0
    }

    fn penalizes(&self) -> bool {
        self.repeat_penalty != 1.0 && self.repeat_penalty > 0.0
    }

    /// A draw among the first `keep` of `ranked` (all of the row's candidates where `None`)
    /// by their weights (not necessarily summing to 1): a uniform point in their total mass,
    /// walked best first. The walk orders the candidates only as far as it goes, which for
    /// a peaked distribution is a few. `None` where `ranked` is `partial` (the best of the
    /// row's candidates) and the point lies past them.
    fn draw(
        &mut self,
        ranked: &mut Ranked,
        weights: &Weights,
        keep: Option<usize>,
        partial: bool,
    ) -> Option<u32> {
        let total: f64 = match keep {
            // Every candidate: the softmax's whole mass (to f64's ~1e-12).
            None => 1.0,
            Some(keep) => (0..keep).map(|i| weights.of(ranked.at(i).1)).sum(),
        };
        let mut r = self.rng.random::<f32>() as f64 * total;
        let walked = keep.unwrap_or(ranked.len());
        for i in 0..walked {
            let (id, l) = ranked.at(i);
            let p = weights.of(l);
            if r < p {
                return Some(id);
            }
            r -= p;
        }
        // Past the last by rounding; or past the best candidates into the rest of the row.
        (keep.is_some() || !partial).then(|| ranked.at(walked - 1).0)
    }
}

/// Sampling's order of the candidates `(id, logit)`: the larger logit first, the lower id
/// among equal ones.
fn rank(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Candidates in sampling order as far as they have been read: `items[..sorted]` is
/// ordered, and every candidate after it ranks below them all. A draw usually stops within
/// the first few of 49k, so the rest is never sorted.
struct Ranked {
    items: Vec<(u32, f32)>,
    sorted: usize,
}

/// Candidates ordered at a time, at least: a full sort of SmolLM2's 49k costs a sampled
/// token 2-3 ms, more than its share of a batched step; selecting the best few is linear.
const RANK_CHUNK: usize = 64;

impl Ranked {
    fn new(items: Vec<(u32, f32)>) -> Self {
        Self { items, sorted: 0 }
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    /// Only the best `k` stay candidates (top-k).
    fn keep_best(&mut self, k: usize) {
        if k < self.items.len() {
            self.sort_through(k);
            self.items.truncate(k);
        }
    }

    /// The candidate of rank `i`.
    fn at(&mut self, i: usize) -> (u32, f32) {
        if i >= self.sorted {
            // Further than ordered so far: the next chunk, doubling as the walk goes on.
            self.sort_through((i + 1).max(2 * self.sorted).max(RANK_CHUNK));
        }
        self.items[i]
    }

    /// Orders the candidates through rank `len`: the best of the unordered rest selected
    /// (linear), then sorted.
    fn sort_through(&mut self, len: usize) {
        let len = len.min(self.items.len());
        if len <= self.sorted {
            return;
        }
        let rest = &mut self.items[self.sorted..];
        let wanted = len - self.sorted;
        if wanted < rest.len() {
            rest.select_nth_unstable_by(wanted - 1, rank);
        }
        rest[..wanted].sort_unstable_by(rank);
        self.sorted = len;
    }
}

/// The softmax of logit / temperature over the candidates, as a weight per logit. Summed in
/// f64, so no sum depends on the order it was taken in: a draw ranks only part of the
/// candidates, and 49k f32 terms summed one after another round by up to ~1e-3 of the total
/// (enough to move a flat distribution's draws), where f64 keeps ~1e-12.
struct Weights {
    max: f32,
    temperature: f32,
    sum: f64,
}

impl Weights {
    /// Over `ranked`'s candidates, or where they are the best of a row, over the row's, whose
    /// sum is `whole_sum`.
    fn new(ranked: &mut Ranked, temperature: f32, whole_sum: Option<f64>) -> Self {
        let mut weights = Self {
            max: ranked.at(0).1,
            temperature,
            sum: 1.0,
        };
        weights.sum = match whole_sum {
            Some(sum) => sum,
            None => ranked.items.iter().map(|&(_, l)| weights.of(l)).sum(),
        };
        weights
    }

    /// `exp((l - max) / t) / sum`, shifted by the best logit *before* the division: (l - max)
    /// / t is 0 for the best and ≤ 0 for the rest, so a temperature so small that l / t
    /// overflows (1e-30, the smallest positive f32) gives exp(-inf) = 0 for the others and
    /// the draw is greedy, where inf - inf used to make every probability NaN.
    fn of(&self, logit: f32) -> f64 {
        ((logit - self.max) / self.temperature).exp() as f64 / self.sum
    }
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

/// The best of `candidates` `(id, logit)` as [`argmax`] takes it from a row: the largest
/// logit, the lowest id among equal ones; 0 where there are none.
fn best_of(candidates: &[(u32, f32)]) -> u32 {
    candidates
        .iter()
        .min_by(|a, b| rank(a, b))
        .map_or(0, |c| c.0)
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

    /// A draw as the sampler made it before it ranked lazily: every candidate sorted,
    /// truncated to top-k, softmax (summed in f64, as now), top-p, a walk: the oracle for
    /// the lazy ranking.
    fn draw_after_full_sort(params: &SamplingParams, rng: &mut StdRng, logits: &[f32]) -> u32 {
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if params.top_k > 0 {
            candidates.truncate(params.top_k as usize);
        }
        let max = candidates[0].1;
        let mut probs: Vec<f64> = candidates
            .iter()
            .map(|(_, l)| ((l - max) / params.temperature).exp() as f64)
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if params.top_p < 1.0 {
            let mut mass = 0f64;
            let keep = probs
                .iter()
                .position(|p| {
                    mass += p;
                    mass >= params.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = rng.random::<f32>() as f64 * total;
        for (i, p) in probs.iter().enumerate() {
            if r < *p {
                return candidates[i].0;
            }
            r -= p;
        }
        candidates[probs.len() - 1].0
    }

    /// Over a 49k vocabulary, peaked and flat (draws that stop at the first few candidates
    /// and ones that walk thousands deep), with and without top-k and top-p: the lazily
    /// ranked draws are the full sort's, seed for seed.
    #[test]
    fn ranking_as_far_as_the_draw_goes_draws_what_a_full_sort_draws() {
        let mut rng = StdRng::seed_from_u64(9);
        for (temperature, top_k, top_p) in [
            (0.7, 0, 1.0),
            (0.7, 0, 0.95),
            (1.0, 40, 1.0),
            (1.0, 40, 0.9),
            (5.0, 0, 1.0),
            (5.0, 0, 0.99),
            (1.5, 3000, 1.0),
        ] {
            let params = params(temperature, top_k, top_p, 11);
            let mut oracle_rng = StdRng::seed_from_u64(11);
            let mut sampler = Sampler::new(&params);
            for draw in 0..200 {
                // A few large logits over a normal-ish mass: a realistic peak.
                let logits: Vec<f32> = (0..49_152)
                    .map(|i| {
                        let noise = rng.random::<f32>() * 4.0 - 2.0;
                        if i % 9_973 == draw % 7 {
                            noise + 12.0
                        } else {
                            noise
                        }
                    })
                    .collect();
                let want = draw_after_full_sort(&params, &mut oracle_rng, &logits);
                let got = sampler.sample(&mut logits.clone(), &[]);
                assert_eq!(
                    got, want,
                    "t {temperature} k {top_k} p {top_p}, draw {draw}"
                );
            }
        }
    }

    /// The best `k` of `logits` as a device hands them back (unranked: reversed here), with
    /// the softmax's sum at `temperature` over the whole row as the host sums it.
    fn best_candidates(logits: &[f32], k: usize, temperature: f32) -> BestCandidates {
        let mut ranked: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        ranked.sort_by(rank);
        let complete = ranked.len() <= k;
        let max = ranked[0].1;
        let sum = ranked
            .iter()
            .map(|&(_, l)| ((l - max) / temperature).exp() as f64)
            .sum();
        let sum_at_one = ranked.iter().map(|&(_, l)| (l - max).exp() as f64).sum();
        ranked.truncate(k);
        ranked.reverse();
        let row = logits.to_vec();
        BestCandidates::new(ranked, complete, sum, sum_at_one, move || Ok(row))
    }

    /// From a device's best 256 candidates (and the row's logits where a draw walks past
    /// them), the draws are the whole row's, seed for seed: peaked and flat rows, top-k
    /// and top-p on and off, a vocabulary narrower than the candidates; both the
    /// candidates and the fallback are taken.
    #[test]
    fn the_best_candidates_draw_what_the_whole_row_draws() {
        let mut rng = StdRng::seed_from_u64(5);
        let (mut from_best, mut from_row) = (0, 0);
        for (temperature, top_k, top_p, vocab) in [
            (0.7, 0, 1.0, 49_152),
            (0.7, 0, 0.95, 49_152),
            (1.0, 40, 1.0, 49_152),
            (1.0, 40, 0.9, 49_152),
            (5.0, 0, 1.0, 49_152),
            (5.0, 0, 0.99, 49_152),
            (1.5, 3000, 1.0, 49_152),
            (1.0, 0, 0.9, 100),
            (0.0, 0, 1.0, 49_152),
        ] {
            let params = params(temperature, top_k, top_p, 3);
            let mut whole = Sampler::new(&params);
            let mut device = Sampler::new(&params);
            for draw in 0..150 {
                let logits: Vec<f32> = (0..vocab)
                    .map(|i| {
                        let noise = rng.random::<f32>() * 4.0 - 2.0;
                        if i % 997 == draw % 5 {
                            noise + 9.0
                        } else {
                            noise
                        }
                    })
                    .collect();
                let want = whole.sample(&mut logits.clone(), &[]);
                let best = best_candidates(&logits, 256, temperature);
                let got = match device.sample_best(&best) {
                    Some(token) => {
                        from_best += 1;
                        token
                    }
                    None => {
                        from_row += 1;
                        device.sample(&mut best.read_row().unwrap(), &[])
                    }
                };
                assert_eq!(
                    got, want,
                    "t {temperature} k {top_k} p {top_p} vocab {vocab}, draw {draw}"
                );
            }
        }
        assert!(from_best > 600 && from_row > 50, "{from_best} / {from_row}");
    }
}
