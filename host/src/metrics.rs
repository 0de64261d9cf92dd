//! `GET /metrics`: Prometheus metrics named like vLLM's (`vllm:` becomes `rbee:`, every
//! series labelled `model_name`), so dashboards built for vLLM map onto rbee-host, plus what
//! only rbee-host has: its guest's swaps, failed loads, failures and generation.
//!
//! Events are counted where they happen, once each: a generation's tokens when it ends (in
//! the guest's `inference` import, so streams and guests that call the model twice count
//! what the model did), a request's outcome and latency when its answer is complete (the
//! HTTP layer). What is a state rather than an event (sequences running and waiting, the KV
//! pool's usage, the active guest), and what the scheduler counts itself (prefix-cache
//! lookups and hits, preemptions, speculative drafts), is read at scrape time.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rbee_engine::{BatchStats, FinishReason, MASK_BUCKETS_MICROS, MaskHistogram};

/// vLLM's buckets for time to first token (seconds).
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's buckets for the time between two tokens of one request (seconds).
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's buckets for a request's whole time (seconds).
const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

type Labels = Vec<(&'static str, &'static str)>;

/// What the worker reports besides the events: read on each scrape.
pub trait WorkerState: Send + Sync + 'static {
    /// The scheduler's state and counts, once the model has loaded.
    fn scheduler(&self) -> Option<BatchStats>;
    /// Requests waiting for a place in service, before they reach the scheduler.
    fn queued(&self) -> usize;
    /// The active guest's generation (1, then +1 per swap), and loads that failed.
    fn guests(&self) -> (u64, u64);
}

pub struct Metrics {
    registry: Registry,
    prompt_tokens: Counter,
    generation_tokens: Counter,
    request_success: Family<Labels, Counter>,
    guest_failures: Family<Labels, Counter>,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
    e2e_request_latency: Histogram,
}

impl Metrics {
    pub fn new(model_name: &str, state: Arc<dyn WorkerState>) -> Arc<Self> {
        let mut registry = Registry::with_labels(
            [("model_name".into(), model_name.to_owned().into())].into_iter(),
        );
        let prompt_tokens = Counter::default();
        let generation_tokens = Counter::default();
        let request_success = Family::default();
        let guest_failures = Family::default();
        let time_to_first_token = Histogram::new(TTFT_BUCKETS.iter().copied());
        let inter_token_latency = Histogram::new(ITL_BUCKETS.iter().copied());
        let e2e_request_latency = Histogram::new(E2E_BUCKETS.iter().copied());
        registry.register(
            "rbee:prompt_tokens",
            "Prefill tokens processed.",
            prompt_tokens.clone(),
        );
        registry.register(
            "rbee:generation_tokens",
            "Generation tokens processed.",
            generation_tokens.clone(),
        );
        registry.register(
            "rbee:request_success",
            "Requests answered in full, by finish reason.",
            request_success.clone(),
        );
        registry.register(
            "rbee:guest_failures",
            "Requests the guest failed, by kind (trap, timeout, memory, or the error it returned).",
            guest_failures.clone(),
        );
        registry.register(
            "rbee:time_to_first_token_seconds",
            "Time from a request's arrival to its first token.",
            time_to_first_token.clone(),
        );
        registry.register(
            "rbee:inter_token_latency_seconds",
            "Time between two tokens of one request.",
            inter_token_latency.clone(),
        );
        registry.register(
            "rbee:e2e_request_latency_seconds",
            "Time from a request's arrival to the end of its answer.",
            e2e_request_latency.clone(),
        );
        registry.register_collector(Box::new(StateCollector(state)));
        Arc::new(Self {
            registry,
            prompt_tokens,
            generation_tokens,
            request_success,
            guest_failures,
            time_to_first_token,
            inter_token_latency,
            e2e_request_latency,
        })
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    /// A request arrived: its clock for the token timings.
    pub fn request(self: &Arc<Self>) -> Arc<RequestMetrics> {
        Arc::new(RequestMetrics {
            metrics: self.clone(),
            received: Instant::now(),
            timing: Mutex::default(),
        })
    }

    /// The guest failed a request; `kind` names how.
    pub fn guest_failed(&self, kind: &'static str) {
        self.guest_failures
            .get_or_create(&vec![("kind", kind)])
            .inc();
    }
}

/// One request's share of the metrics: its arrival, its tokens' timing, its finish.
pub struct RequestMetrics {
    metrics: Arc<Metrics>,
    received: Instant,
    timing: Mutex<Timing>,
}

#[derive(Default)]
struct Timing {
    last_token: Option<Instant>,
    finish: Option<FinishReason>,
}

impl RequestMetrics {
    /// A piece of text came out of the model.
    pub fn token(&self) {
        let now = Instant::now();
        let mut timing = self.timing.lock().unwrap_or_else(|e| e.into_inner());
        match timing.last_token.replace(now) {
            None => self
                .metrics
                .time_to_first_token
                .observe(seconds(now - self.received)),
            Some(last) => self
                .metrics
                .inter_token_latency
                .observe(seconds(now - last)),
        }
    }

    /// A generation ended (the request may start another).
    pub fn generation(&self, prompt_tokens: u32, generated_tokens: u32, finish: FinishReason) {
        self.metrics.prompt_tokens.inc_by(prompt_tokens.into());
        self.metrics
            .generation_tokens
            .inc_by(generated_tokens.into());
        self.timing.lock().unwrap_or_else(|e| e.into_inner()).finish = Some(finish);
    }

    /// The guest failed the request; `kind` names how.
    pub fn guest_failed(&self, kind: &'static str) {
        self.metrics.guest_failed(kind);
    }

    /// The answer is complete: counted by the last generation's finish reason, as the
    /// client was told it.
    pub fn answered(&self) {
        let finish = self.timing.lock().unwrap_or_else(|e| e.into_inner()).finish;
        let reason = match finish {
            Some(FinishReason::Eos | FinishReason::Stop) => "stop",
            Some(FinishReason::Length) => "length",
            Some(FinishReason::Cancelled) => "abort",
            // The guest answered without the model.
            None => "stop",
        };
        self.metrics
            .request_success
            .get_or_create(&vec![("finished_reason", reason)])
            .inc();
        self.metrics
            .e2e_request_latency
            .observe(seconds(self.received.elapsed()));
    }
}

fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

/// The metrics that are states, read from the worker on each scrape.
struct StateCollector(Arc<dyn WorkerState>);

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let scheduler = self.0.scheduler().unwrap_or_default();
        let (generation, failed_loads) = self.0.guests();
        let gauges = [
            (
                "rbee:num_requests_running",
                "Sequences in the scheduler's batch (they share each forward pass).",
                scheduler.running as i64,
            ),
            (
                "rbee:num_requests_waiting",
                "Sequences waiting to join the batch (for KV blocks or a place in it, \
                 preempted ones included), and requests queued for a place in service.",
                (scheduler.waiting as usize + self.0.queued()) as i64,
            ),
            (
                "rbee:guest_generation",
                "The active guest's generation: 1 at start, +1 per swap.",
                generation as i64,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let usage =
            ConstGauge::new(scheduler.kv_blocks_held as f64 / scheduler.kv_blocks.max(1) as f64);
        usage.encode(encoder.encode_descriptor(
            "rbee:kv_cache_usage_perc",
            "KV-cache usage: the fraction of the pool's blocks that running sequences hold \
             (1 = full; cached blocks nobody holds count as free).",
            None,
            usage.metric_type(),
        )?)?;
        let counters = [
            (
                "rbee:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache as sequences joined the batch.",
                scheduler.prefix_queried_tokens,
            ),
            (
                "rbee:prefix_cache_hits",
                "Prompt tokens found in the prefix cache (their KV reused, not computed).",
                scheduler.prefix_hit_tokens,
            ),
            (
                "rbee:num_preemptions",
                "Sequences preempted because the KV pool ran out (each resumed later).",
                scheduler.preemptions,
            ),
            (
                "rbee:spec_decode_num_drafts",
                "Drafts of tokens guessed from the context that a step verified.",
                scheduler.drafts,
            ),
            (
                "rbee:spec_decode_num_draft_tokens",
                "Tokens those drafts held.",
                scheduler.draft_tokens,
            ),
            (
                "rbee:spec_decode_num_accepted_tokens",
                "Drafted tokens the model agreed with (kept without a step of their own).",
                scheduler.accepted_tokens,
            ),
            (
                "rbee:num_constrained_requests",
                "Generations held to a shape (a JSON schema, regex, grammar or choice).",
                scheduler.constrained,
            ),
            (
                "rbee:guest_swaps",
                "Guests swapped in while serving.",
                generation.saturating_sub(1),
            ),
            (
                "rbee:guest_load_failures",
                "Guest loads that failed (the previous guest kept serving).",
                failed_loads,
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        let masks = MaskSeconds(scheduler.mask_times);
        masks.encode(encoder.encode_descriptor(
            "rbee:constrained_mask_seconds",
            "Time to compute one token's mask of allowed tokens for a constrained generation \
             (computed beside the forward pass).",
            None,
            masks.metric_type(),
        )?)?;
        Ok(())
    }
}

/// The engine's mask-time histogram, as read at a scrape.
#[derive(Debug)]
struct MaskSeconds(MaskHistogram);

impl EncodeMetric for MaskSeconds {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let bounds = MASK_BUCKETS_MICROS
            .iter()
            .map(|&micros| micros as f64 / 1e6)
            // The encoder writes `+Inf` for `f64::MAX`, as its own histograms end.
            .chain([f64::MAX]);
        let buckets: Vec<(f64, u64)> = bounds.zip(self.0.buckets).collect();
        encoder.encode_histogram::<NoLabelSet>(
            self.0.nanos as f64 / 1e9,
            self.0.count(),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;

    impl WorkerState for Fixed {
        fn scheduler(&self) -> Option<BatchStats> {
            Some(BatchStats {
                running: 2,
                waiting: 0,
                kv_blocks_held: 5,
                kv_blocks: 20,
                prefix_queried_tokens: 100,
                prefix_hit_tokens: 64,
                preemptions: 3,
                drafts: 4,
                draft_tokens: 10,
                accepted_tokens: 7,
                constrained: 2,
                mask_times: MaskHistogram {
                    // Three masks within 10 µs, one within 50 µs, one slower than them all.
                    buckets: [3, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1],
                    nanos: 20_000_000,
                },
                ..BatchStats::default()
            })
        }
        fn queued(&self) -> usize {
            1
        }
        fn guests(&self) -> (u64, u64) {
            (3, 1)
        }
    }

    #[test]
    fn names_labels_and_values() {
        let metrics = Metrics::new("SmolLM2", Arc::new(Fixed));
        let request = metrics.request();
        request.token();
        request.token();
        request.generation(5, 2, FinishReason::Length);
        request.answered();
        metrics.guest_failed("timeout");
        let text = metrics.encode();
        for line in [
            r#"rbee:prompt_tokens_total{model_name="SmolLM2"} 5"#,
            r#"rbee:generation_tokens_total{model_name="SmolLM2"} 2"#,
            r#"rbee:request_success_total{model_name="SmolLM2",finished_reason="length"} 1"#,
            r#"rbee:guest_failures_total{model_name="SmolLM2",kind="timeout"} 1"#,
            r#"rbee:time_to_first_token_seconds_count{model_name="SmolLM2"} 1"#,
            r#"rbee:inter_token_latency_seconds_count{model_name="SmolLM2"} 1"#,
            r#"rbee:e2e_request_latency_seconds_count{model_name="SmolLM2"} 1"#,
            r#"rbee:num_requests_running{model_name="SmolLM2"} 2"#,
            r#"rbee:num_requests_waiting{model_name="SmolLM2"} 1"#,
            r#"rbee:kv_cache_usage_perc{model_name="SmolLM2"} 0.25"#,
            r#"rbee:prefix_cache_queries_total{model_name="SmolLM2"} 100"#,
            r#"rbee:prefix_cache_hits_total{model_name="SmolLM2"} 64"#,
            r#"rbee:num_preemptions_total{model_name="SmolLM2"} 3"#,
            r#"rbee:spec_decode_num_drafts_total{model_name="SmolLM2"} 4"#,
            r#"rbee:spec_decode_num_draft_tokens_total{model_name="SmolLM2"} 10"#,
            r#"rbee:spec_decode_num_accepted_tokens_total{model_name="SmolLM2"} 7"#,
            r#"rbee:guest_generation{model_name="SmolLM2"} 3"#,
            r#"rbee:guest_swaps_total{model_name="SmolLM2"} 2"#,
            r#"rbee:guest_load_failures_total{model_name="SmolLM2"} 1"#,
            r#"rbee:num_constrained_requests_total{model_name="SmolLM2"} 2"#,
            r#"rbee:constrained_mask_seconds_sum{model_name="SmolLM2"} 0.02"#,
            r#"rbee:constrained_mask_seconds_count{model_name="SmolLM2"} 5"#,
            r#"rbee:constrained_mask_seconds_bucket{model_name="SmolLM2",le="0.00001"} 3"#,
            r#"rbee:constrained_mask_seconds_bucket{model_name="SmolLM2",le="0.00005"} 4"#,
            r#"rbee:constrained_mask_seconds_bucket{model_name="SmolLM2",le="+Inf"} 5"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }
}
