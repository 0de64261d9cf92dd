//! What a decode step costs by the number of rows it carries, measured as the scheduler
//! runs. Drafted tokens (speculative guesses, and the tokens a constraint forces) ride as
//! extra rows of a step, and they pay only while a row is cheap next to a step: on a CPU
//! the weights are read once for all rows, but each row adds its arithmetic and its
//! attention, and how much depends on the machine, the model and the context length. So the
//! scheduler times its own steps instead of assuming a figure.
//!
//! Only steps of decode rows alone are timed (a prompt chunk's rows cost more than a decode
//! row's). A step of several rows is kept as a multiple of the one-row step's time as it
//! stood when it ran: the first steps of a worker are slower (caches, pages, the allocator
//! warming up), and a count timed then in seconds would look dear against the one-row time
//! once that has fallen; as it was then priced out, it was never timed again (a 2-row step
//! timed among the first three kept SmolLM2's drafts off for a whole serving benchmark). A
//! row count not timed yet is estimated from the nearest lower one that was, at a prior
//! slope per row that is optimistic for a CPU: a draft then tries it, and its steps measure
//! it. Each time moves its count's estimate, the first from the prior: a step is slowed by
//! whatever else the machine runs and never sped up, so a time under the estimate moves it
//! a long way and one over it a short way. One slow step (another process took the core)
//! then cannot price a count out for good, which would stop it being tried and timed again;
//! a count that is truly dear takes a few steps to learn, and stays learnt while it is not
//! tried.

use std::time::Duration;

/// The most rows a step of a timed shape carries: beyond it, every count costs as the
/// largest timed one plus the prior slope.
const MOST_ROWS: usize = 64;
/// What one more row adds to a step, as a share of a one-row step, before it is timed: the
/// optimistic end of what a CPU shows (SmolLM2 Q4_1 on the 2-core VM: ×1.2–×1.3 for a second
/// row, ×2.5 for eight at 400 positions; a GPU is flatter still).
const PRIOR_ROW_COST: f64 = 0.25;
/// How far a step timed under its row count's estimate moves the estimate, and one timed
/// over it.
const FALLING_RATE: f64 = 0.5;
const RISING_RATE: f64 = 0.1;

/// Decode step times by row count: a one-row step's in seconds, the others' as multiples
/// of it (a moving average each).
#[derive(Debug, Clone)]
pub(crate) struct StepCosts {
    one_row: Option<f64>,
    /// `multiples[rows - 1]`, for 2 rows and more.
    multiples: [Option<f64>; MOST_ROWS],
}

impl Default for StepCosts {
    fn default() -> Self {
        Self {
            one_row: None,
            multiples: [None; MOST_ROWS],
        }
    }
}

impl StepCosts {
    /// A decode step of `rows` rows took `elapsed`. A step of several rows before any of one
    /// has nothing to be a multiple of, and is not kept.
    pub fn record(&mut self, rows: usize, elapsed: Duration) {
        if rows == 0 || rows > MOST_ROWS {
            return;
        }
        let seconds = elapsed.as_secs_f64();
        if rows == 1 {
            self.one_row = Some(moved(self.one_row.unwrap_or(seconds), seconds));
            return;
        }
        let Some(one_row) = self.one_row else {
            return;
        };
        let estimate = self.multiples[rows - 1].unwrap_or_else(|| self.cost(rows));
        self.multiples[rows - 1] = Some(moved(estimate, seconds / one_row));
    }

    /// The cost of a step of `rows` rows in one-row steps: timed where it was, else the
    /// nearest lower timed count's plus `PRIOR_ROW_COST` per row more (one row costing 1).
    pub fn cost(&self, rows: usize) -> f64 {
        let rows = rows.max(1);
        let (below, multiple) = (2..=rows.min(MOST_ROWS))
            .rev()
            .find_map(|r| self.multiples[r - 1].map(|m| (r, m)))
            .unwrap_or((1, 1.0));
        multiple + PRIOR_ROW_COST * (rows - below) as f64
    }

    /// The number of tokens to draft into a step that carries `rows` rows already, worth
    /// `tokens` expected tokens: the `k` in `0..=most` that maximises the step's tokens per
    /// cost, where the `i`-th drafted token is taken with probability `rate^i` (a guess is
    /// taken only if every one before it was: `rate + rate² + … + rateᵏ` expected tokens).
    /// A busy step or a low rate gives 0; a certain draft (`rate` 1) stops where a row costs
    /// more than the tokens per cost the step has.
    pub fn draft_len(&self, tokens: f64, rows: usize, rate: f64, most: usize) -> usize {
        let mut best = (tokens / self.cost(rows), 0);
        let (mut expected, mut term) = (0.0, 1.0);
        for k in 1..=most {
            term *= rate;
            expected += term;
            let per_cost = (tokens + expected) / self.cost(rows + k);
            if per_cost > best.0 {
                best = (per_cost, k);
            }
        }
        best.1
    }
}

/// `estimate` moved toward `measured`: far where it fell (nothing speeds a step up), a
/// little where it rose (another process may have taken the core).
fn moved(estimate: f64, measured: f64) -> f64 {
    let rate = if measured < estimate {
        FALLING_RATE
    } else {
        RISING_RATE
    };
    estimate + rate * (measured - estimate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: f64) -> Duration {
        Duration::from_secs_f64(ms / 1000.0)
    }

    #[test]
    fn untimed_counts_cost_the_prior_slope_from_the_nearest_timed_one() {
        let mut costs = StepCosts::default();
        assert_eq!(costs.cost(1), 1.0);
        assert_eq!(costs.cost(3), 1.0 + 2.0 * PRIOR_ROW_COST);
        costs.record(1, ms(10.0));
        assert_eq!(costs.cost(1), 1.0);
        assert_eq!(costs.cost(4), 1.0 + 3.0 * PRIOR_ROW_COST);
        // Four rows timed under the prior: the estimate falls halfway to the time...
        costs.record(4, ms(5.0));
        let four = 1.0 + 3.0 * PRIOR_ROW_COST;
        let four = four + FALLING_RATE * (0.5 - four);
        assert!((costs.cost(4) - four).abs() < 1e-9, "{}", costs.cost(4));
        // ... and counts past it build on it.
        assert!((costs.cost(6) - (four + 2.0 * PRIOR_ROW_COST)).abs() < 1e-9);
        assert_eq!(costs.cost(2), 1.0 + PRIOR_ROW_COST);
        // A time over the estimate moves it a tenth of the way.
        costs.record(4, ms(30.0));
        let four = four + RISING_RATE * (3.0 - four);
        assert!((costs.cost(4) - four).abs() < 1e-9, "{}", costs.cost(4));
        // Past the table: the largest timed count plus the slope.
        assert!(costs.cost(MOST_ROWS + 10) > costs.cost(MOST_ROWS));
    }

    #[test]
    fn one_slow_step_does_not_stop_the_drafts() {
        let mut costs = StepCosts::default();
        costs.record(1, ms(10.0));
        assert!(costs.draft_len(1.0, 1, 0.6, 8) > 0);
        // Another process took the core during the first two-row step.
        costs.record(2, ms(40.0));
        assert!(costs.draft_len(1.0, 1, 0.6, 8) > 0);
        // Two rows really cost two steps: a few more times and drafting stops.
        for _ in 0..10 {
            costs.record(2, ms(20.0));
        }
        assert_eq!(costs.draft_len(1.0, 1, 0.6, 1), 0);
    }

    /// The worker's first steps are slow: a two-row step timed among them is a multiple of
    /// the one-row step of the same moment, and stays cheap as both speed up (timed in
    /// seconds, it was ×1.9 of the later one-row step, and drafts stopped for good).
    #[test]
    fn a_warming_up_worker_does_not_price_drafts_out() {
        let mut costs = StepCosts::default();
        costs.record(1, ms(11.0));
        costs.record(1, ms(10.7));
        costs.record(2, ms(13.1));
        for _ in 0..50 {
            costs.record(1, ms(7.0));
        }
        assert!(costs.cost(2) < 1.3, "{}", costs.cost(2));
        assert!(costs.draft_len(1.0, 1, 0.5, 8) > 0);
    }

    /// Times every count from 1 to `most` rows by `time(rows)` until the estimates settle.
    fn settle(costs: &mut StepCosts, most: usize, time: impl Fn(usize) -> f64) {
        for _ in 0..100 {
            for rows in 1..=most {
                costs.record(rows, ms(time(rows)));
            }
        }
    }

    #[test]
    fn drafts_follow_what_rows_are_measured_to_cost() {
        let mut costs = StepCosts::default();
        // Untimed, a draft is tried, longer the likelier it is taken.
        let unsure = costs.draft_len(1.0, 1, 0.5, 8);
        let likely = costs.draft_len(1.0, 1, 0.9, 8);
        assert!(unsure > 0 && likely > unsure, "{unsure} vs {likely}");
        // Each row as dear as a step: no draft at good odds.
        settle(&mut costs, 9, |rows| 10.0 * rows as f64);
        assert_eq!(costs.draft_len(1.0, 1, 0.9, 8), 0);
        // Rows turning nearly free (say, the context got shorter): longer drafts as the
        // times come in, long ones at modest odds once they are in.
        let mut lengths = Vec::new();
        for _ in 0..30 {
            for rows in 2..=9 {
                costs.record(rows, ms(10.0 + 0.1 * rows as f64));
            }
            lengths.push(costs.draft_len(1.0, 1, 0.6, 8));
        }
        assert!(lengths.is_sorted(), "{lengths:?}");
        assert!(lengths[29] >= 4, "{lengths:?}");
        // A certain draft goes on while rows cost less than the step's tokens per cost.
        let mut costs = StepCosts::default();
        settle(&mut costs, 12, |rows| match rows {
            1 => 5.0,
            ..=4 => 10.0,
            _ => 10.0 + 5.0 * (rows - 4) as f64,
        });
        assert_eq!(costs.draft_len(4.0, 4, 1.0, 8), 0);
        assert!(costs.draft_len(1.0, 1, 1.0, 8) > 0);
    }
}
