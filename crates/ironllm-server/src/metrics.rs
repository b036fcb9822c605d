//! Prometheus metrics with vLLM's names, labels and buckets (`vllm/v1/metrics/loggers.py`), so
//! dashboards built for `vllm serve` work unchanged, and the periodic "Avg prompt throughput" log line.
//!
//! Every series carries the labels `model_name` (the first served model name) and `engine` ("0"), as
//! vLLM's do. The engine thread is the only writer (after each step); `/metrics` only reads.
//! Counters are exposed with Prometheus' `_total` suffix (`vllm:prompt_tokens_total`), as
//! `prometheus_client` in Python exposes them.

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use ironllm_core::outputs::FinishReason;
use ironllm_core::SchedulerStats;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// vLLM's buckets for time to first token.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];
/// vLLM's buckets for inter-token latency.
const ITL_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
/// vLLM's buckets for request latencies (e2e, queue, prefill, decode, inference).
const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
];
const ITERATION_TOKEN_BUCKETS: &[f64] =
    &[1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0];
const N_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0];

/// vLLM's `build_1_2_5_buckets`: 1, 2, 5, 10, 20, 50, ... up to `max_value`.
pub fn build_1_2_5_buckets(max_value: usize) -> Vec<f64> {
    let mut buckets = Vec::new();
    let mut scale: usize = 1;
    loop {
        for m in [1, 2, 5] {
            let v = m * scale;
            if v > max_value {
                return buckets;
            }
            buckets.push(v as f64);
        }
        scale = match scale.checked_mul(10) {
            Some(s) => s,
            None => return buckets,
        };
    }
}

/// What the engine thread knows about a sequence when it finishes.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedSequenceStats {
    pub finish_reason: FinishReason,
    pub e2e_latency: f64,
    pub queued_time: f64,
    pub prefill_time: f64,
    pub decode_time: f64,
    pub inference_time: f64,
    pub num_prompt_tokens: usize,
    pub num_generation_tokens: usize,
    pub max_tokens_param: Option<usize>,
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    pub num_requests_running: Gauge,
    pub num_requests_waiting: Gauge,
    pub kv_cache_usage_perc: Gauge<f64, AtomicU64>,
    pub prefix_cache_queries: Counter,
    pub prefix_cache_hits: Counter,
    pub num_preemptions: Counter,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub request_success: Family<Labels, Counter>,
    pub iteration_tokens: Histogram,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_request_latency: Histogram,
    pub request_queue_time: Histogram,
    pub request_inference_time: Histogram,
    pub request_prefill_time: Histogram,
    pub request_decode_time: Histogram,
    pub request_prompt_tokens: Histogram,
    pub request_generation_tokens: Histogram,
    pub request_max_num_generation_tokens: Histogram,
    pub request_params_n: Histogram,
    pub request_params_max_tokens: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new(model_name: &str, max_model_len: usize) -> Metrics {
        let mut root = Registry::default();
        let reg = root.sub_registry_with_labels(
            [("model_name".into(), model_name.to_string().into()), ("engine".into(), "0".into())].into_iter(),
        );
        let hist = |b: &[f64]| Histogram::new(b.iter().copied());
        let token_buckets = build_1_2_5_buckets(max_model_len);
        let m = Metrics {
            registry: Registry::default(),
            num_requests_running: Gauge::default(),
            num_requests_waiting: Gauge::default(),
            kv_cache_usage_perc: Gauge::default(),
            prefix_cache_queries: Counter::default(),
            prefix_cache_hits: Counter::default(),
            num_preemptions: Counter::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            request_success: Family::default(),
            iteration_tokens: hist(ITERATION_TOKEN_BUCKETS),
            time_to_first_token: hist(TTFT_BUCKETS),
            inter_token_latency: hist(ITL_BUCKETS),
            e2e_request_latency: hist(REQUEST_LATENCY_BUCKETS),
            request_queue_time: hist(REQUEST_LATENCY_BUCKETS),
            request_inference_time: hist(REQUEST_LATENCY_BUCKETS),
            request_prefill_time: hist(REQUEST_LATENCY_BUCKETS),
            request_decode_time: hist(REQUEST_LATENCY_BUCKETS),
            request_prompt_tokens: hist(&token_buckets),
            request_generation_tokens: hist(&token_buckets),
            request_max_num_generation_tokens: hist(&token_buckets),
            request_params_n: hist(N_BUCKETS),
            request_params_max_tokens: hist(&token_buckets),
        };
        reg.register(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            m.num_requests_running.clone(),
        );
        reg.register(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            m.num_requests_waiting.clone(),
        );
        reg.register(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            m.kv_cache_usage_perc.clone(),
        );
        reg.register(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            m.prefix_cache_queries.clone(),
        );
        reg.register(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            m.prefix_cache_hits.clone(),
        );
        reg.register(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            m.num_preemptions.clone(),
        );
        reg.register("vllm:prompt_tokens", "Number of prefill tokens processed.", m.prompt_tokens.clone());
        reg.register("vllm:generation_tokens", "Number of generation tokens processed.", m.generation_tokens.clone());
        reg.register("vllm:request_success", "Count of successfully processed requests.", m.request_success.clone());
        for reason in [FinishReason::Stop, FinishReason::Length, FinishReason::Abort] {
            let _ = m.request_success.get_or_create(&finished_label(reason));
        }
        reg.register(
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed.",
            m.request_prompt_tokens.clone(),
        );
        reg.register(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            m.request_generation_tokens.clone(),
        );
        reg.register(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            m.iteration_tokens.clone(),
        );
        reg.register(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            m.request_max_num_generation_tokens.clone(),
        );
        reg.register("vllm:request_params_n", "Histogram of the n request parameter.", m.request_params_n.clone());
        reg.register(
            "vllm:request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            m.request_params_max_tokens.clone(),
        );
        reg.register(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            m.time_to_first_token.clone(),
        );
        reg.register(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            m.inter_token_latency.clone(),
        );
        reg.register(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            m.e2e_request_latency.clone(),
        );
        reg.register(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            m.request_queue_time.clone(),
        );
        reg.register(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            m.request_inference_time.clone(),
        );
        reg.register(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            m.request_prefill_time.clone(),
        );
        reg.register(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            m.request_decode_time.clone(),
        );
        Metrics { registry: root, ..m }
    }

    /// The Prometheus text exposition (OpenMetrics flavour) of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Publishes a scheduler snapshot: gauges are set, cumulative engine counters advance by the
    /// change since `prev`.
    pub fn record_scheduler(&self, stats: &SchedulerStats, prev: &SchedulerStats) {
        self.num_requests_running.set(stats.num_running as i64);
        self.num_requests_waiting.set(stats.num_waiting as i64);
        self.kv_cache_usage_perc.set(stats.kv_cache_usage);
        self.prefix_cache_queries.inc_by(stats.prefix_cache_queries.saturating_sub(prev.prefix_cache_queries));
        self.prefix_cache_hits.inc_by(stats.prefix_cache_hits.saturating_sub(prev.prefix_cache_hits));
        self.num_preemptions.inc_by(stats.num_preemptions.saturating_sub(prev.num_preemptions));
    }

    /// Counts one finished (or aborted) sequence.
    pub fn record_finished(&self, s: &FinishedSequenceStats) {
        self.request_success.get_or_create(&finished_label(s.finish_reason)).inc();
        self.e2e_request_latency.observe(s.e2e_latency);
        self.request_queue_time.observe(s.queued_time);
        self.request_prefill_time.observe(s.prefill_time);
        self.request_decode_time.observe(s.decode_time);
        self.request_inference_time.observe(s.inference_time);
        self.request_prompt_tokens.observe(s.num_prompt_tokens as f64);
        self.request_generation_tokens.observe(s.num_generation_tokens as f64);
        if let Some(m) = s.max_tokens_param {
            self.request_params_max_tokens.observe(m as f64);
        }
    }
}

fn finished_label(reason: FinishReason) -> Labels {
    vec![("finished_reason".to_string(), reason.as_str().to_string())]
}

/// vLLM's periodic log line ("Avg prompt throughput: ... tokens/s, ..."), logged at info while there
/// is traffic and at debug when idle.
pub struct StatsLogger {
    last_time: Instant,
    last_prompt_tokens: u64,
    last_generation_tokens: u64,
    last_prompt_throughput: f64,
    last_generation_throughput: f64,
}

impl StatsLogger {
    pub fn new(metrics: &Metrics) -> StatsLogger {
        StatsLogger {
            last_time: Instant::now(),
            last_prompt_tokens: metrics.prompt_tokens.get(),
            last_generation_tokens: metrics.generation_tokens.get(),
            last_prompt_throughput: 0.0,
            last_generation_throughput: 0.0,
        }
    }

    pub fn log(&mut self, metrics: &Metrics) {
        let now = Instant::now();
        let dt = now.duration_since(self.last_time).as_secs_f64().max(1e-9);
        let (prompt, generation) = (metrics.prompt_tokens.get(), metrics.generation_tokens.get());
        let prompt_tp = prompt.saturating_sub(self.last_prompt_tokens) as f64 / dt;
        let generation_tp = generation.saturating_sub(self.last_generation_tokens) as f64 / dt;
        let queries = metrics.prefix_cache_queries.get();
        let hit_rate = if queries == 0 { 0.0 } else { metrics.prefix_cache_hits.get() as f64 / queries as f64 };
        let busy = prompt_tp > 0.0
            || generation_tp > 0.0
            || self.last_prompt_throughput > 0.0
            || self.last_generation_throughput > 0.0;
        let line = format!(
            "Engine 000: Avg prompt throughput: {prompt_tp:.1} tokens/s, Avg generation throughput: {generation_tp:.1} tokens/s, Running: {} reqs, Waiting: {} reqs, KV cache usage: {:.1}%, Prefix cache hit rate: {:.1}%",
            metrics.num_requests_running.get(),
            metrics.num_requests_waiting.get(),
            metrics.kv_cache_usage_perc.get() * 100.0,
            hit_rate * 100.0
        );
        if busy {
            tracing::info!("{line}");
        } else {
            tracing::debug!("{line}");
        }
        self.last_time = now;
        self.last_prompt_tokens = prompt;
        self.last_generation_tokens = generation;
        self.last_prompt_throughput = prompt_tp;
        self.last_generation_throughput = generation_tp;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_vllm() {
        assert_eq!(build_1_2_5_buckets(100), vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]);
        assert_eq!(build_1_2_5_buckets(2048).last(), Some(&2000.0));
    }

    #[test]
    fn exposition_uses_vllm_names_and_labels() {
        let m = Metrics::new("my-model", 2048);
        m.prompt_tokens.inc_by(7);
        let text = m.encode();
        for name in [
            "vllm:num_requests_running{",
            "vllm:num_requests_waiting{",
            "vllm:kv_cache_usage_perc{",
            "vllm:prefix_cache_queries_total{",
            "vllm:prefix_cache_hits_total{",
            "vllm:num_preemptions_total{",
            "vllm:generation_tokens_total{",
            "vllm:time_to_first_token_seconds_bucket{",
            "vllm:inter_token_latency_seconds_bucket{",
            "vllm:e2e_request_latency_seconds_bucket{",
            "vllm:request_queue_time_seconds_bucket{",
            "vllm:request_prompt_tokens_bucket{",
            "vllm:request_generation_tokens_bucket{",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        assert!(text.contains("vllm:prompt_tokens_total{model_name=\"my-model\",engine=\"0\"} 7"), "{text}");
        assert!(text.contains("finished_reason=\"abort\""), "{text}");
    }
}
