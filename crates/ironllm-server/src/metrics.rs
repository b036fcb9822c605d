//! Prometheus metrics with vLLM's names, labels and buckets (`vllm/v1/metrics/loggers.py`), so
//! dashboards built for `vllm serve` work unchanged, and the periodic "Avg prompt throughput" log line
//! (plus vLLM's "SpecDecoding metrics" line in intervals that verified draft tokens).
//!
//! Every series carries the labels `model_name` (the first served model name) and `engine` ("0"), as
//! vLLM's do. The engine thread is the only writer (after each step); `/metrics` only reads.
//! Counters are exposed with Prometheus' `_total` suffix (`vllm:prompt_tokens_total`), as
//! `prometheus_client` in Python exposes them.
//!
//! The `vllm:spec_decode_*` counters (`vllm/v1/spec_decode/metrics.py`) are registered always and stay
//! at zero without `--speculative-config`; vLLM registers them only with speculation on, but
//! [`Metrics::new`] is not told the engine's config. The per-position series appear once a draft of
//! that length has been verified, where vLLM creates positions 0..k up front.

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use ironllm_core::outputs::FinishReason;
use ironllm_core::spec_decode::SpecDecodingStats;
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
    pub spec_decode_num_drafts: Counter,
    pub spec_decode_num_draft_tokens: Counter,
    pub spec_decode_num_accepted_tokens: Counter,
    /// Labelled `position` = "0", "1", ...: verification rounds whose draft token there was accepted.
    pub spec_decode_num_accepted_tokens_per_pos: Family<Labels, Counter>,
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
            spec_decode_num_drafts: Counter::default(),
            spec_decode_num_draft_tokens: Counter::default(),
            spec_decode_num_accepted_tokens: Counter::default(),
            spec_decode_num_accepted_tokens_per_pos: Family::default(),
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
            "Number of requests in model execution batches",
            m.num_requests_running.clone(),
        );
        reg.register(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed",
            m.num_requests_waiting.clone(),
        );
        reg.register(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage",
            m.kv_cache_usage_perc.clone(),
        );
        reg.register(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens",
            m.prefix_cache_queries.clone(),
        );
        reg.register(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens",
            m.prefix_cache_hits.clone(),
        );
        reg.register(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine",
            m.num_preemptions.clone(),
        );
        reg.register("vllm:spec_decode_num_drafts", "Number of spec decoding drafts", m.spec_decode_num_drafts.clone());
        reg.register(
            "vllm:spec_decode_num_draft_tokens",
            "Number of draft tokens",
            m.spec_decode_num_draft_tokens.clone(),
        );
        reg.register(
            "vllm:spec_decode_num_accepted_tokens",
            "Number of accepted tokens",
            m.spec_decode_num_accepted_tokens.clone(),
        );
        reg.register(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Accepted tokens per draft position",
            m.spec_decode_num_accepted_tokens_per_pos.clone(),
        );
        reg.register("vllm:prompt_tokens", "Number of prefill tokens processed.", m.prompt_tokens.clone());
        reg.register("vllm:generation_tokens", "Number of generation tokens processed.", m.generation_tokens.clone());
        reg.register("vllm:request_success", "Count of successfully processed requests.", m.request_success.clone());
        for reason in [FinishReason::Stop, FinishReason::Length, FinishReason::Abort] {
            let _ = m.request_success.get_or_create(&finished_label(reason));
        }
        reg.register(
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed",
            m.request_prompt_tokens.clone(),
        );
        reg.register(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed",
            m.request_generation_tokens.clone(),
        );
        reg.register(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step",
            m.iteration_tokens.clone(),
        );
        reg.register(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens",
            m.request_max_num_generation_tokens.clone(),
        );
        reg.register("vllm:request_params_n", "Histogram of the n request parameter.", m.request_params_n.clone());
        reg.register(
            "vllm:request_params_max_tokens",
            "Histogram of the max_tokens request parameter",
            m.request_params_max_tokens.clone(),
        );
        reg.register(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds",
            m.time_to_first_token.clone(),
        );
        reg.register(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds",
            m.inter_token_latency.clone(),
        );
        reg.register(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds",
            m.e2e_request_latency.clone(),
        );
        reg.register(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request",
            m.request_queue_time.clone(),
        );
        reg.register(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request",
            m.request_inference_time.clone(),
        );
        reg.register(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request",
            m.request_prefill_time.clone(),
        );
        reg.register(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request",
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
        let spec = spec_decoding_delta(&stats.spec_decoding, &prev.spec_decoding);
        self.spec_decode_num_drafts.inc_by(spec.num_drafts);
        self.spec_decode_num_draft_tokens.inc_by(spec.num_draft_tokens);
        self.spec_decode_num_accepted_tokens.inc_by(spec.num_accepted_tokens);
        for (pos, &accepted) in spec.num_accepted_tokens_per_pos.iter().enumerate() {
            // Positions are created in order, with zeros included, so that
            // `spec_decoding_totals` can read them back as a contiguous run.
            self.spec_decode_num_accepted_tokens_per_pos.get_or_create(&position_label(pos)).inc_by(accepted);
        }
    }

    /// The `vllm:spec_decode_*` counters read back as one cumulative snapshot (for the log line).
    pub fn spec_decoding_totals(&self) -> SpecDecodingStats {
        let mut num_accepted_tokens_per_pos = Vec::new();
        while let Some(counter) =
            self.spec_decode_num_accepted_tokens_per_pos.get(&position_label(num_accepted_tokens_per_pos.len()))
        {
            num_accepted_tokens_per_pos.push(counter.get());
        }
        SpecDecodingStats {
            num_drafts: self.spec_decode_num_drafts.get(),
            num_draft_tokens: self.spec_decode_num_draft_tokens.get(),
            num_accepted_tokens: self.spec_decode_num_accepted_tokens.get(),
            num_accepted_tokens_per_pos,
        }
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

fn position_label(pos: usize) -> Labels {
    vec![("position".to_string(), pos.to_string())]
}

/// What changed between two cumulative snapshots. Saturating, so a counter that went backwards (it
/// never should) adds nothing rather than wrapping; a position `prev` lacks counts from zero.
pub fn spec_decoding_delta(now: &SpecDecodingStats, prev: &SpecDecodingStats) -> SpecDecodingStats {
    SpecDecodingStats {
        num_drafts: now.num_drafts.saturating_sub(prev.num_drafts),
        num_draft_tokens: now.num_draft_tokens.saturating_sub(prev.num_draft_tokens),
        num_accepted_tokens: now.num_accepted_tokens.saturating_sub(prev.num_accepted_tokens),
        num_accepted_tokens_per_pos: now
            .num_accepted_tokens_per_pos
            .iter()
            .enumerate()
            .map(|(pos, &n)| n.saturating_sub(prev.num_accepted_tokens_per_pos.get(pos).copied().unwrap_or(0)))
            .collect(),
    }
}

/// vLLM's "SpecDecoding metrics" line for one interval's counts (`SpecDecodingLogging.log`), or `None`
/// when nothing was verified in it. Mean acceptance length counts the bonus token, as vLLM's does:
/// 1 + accepted / drafts. A position's rate is over all rounds of the interval.
pub fn spec_decoding_log_line(interval: &SpecDecodingStats, elapsed_secs: f64) -> Option<String> {
    if interval.num_drafts == 0 {
        return None;
    }
    let drafts = interval.num_drafts as f64;
    let (accepted, drafted) = (interval.num_accepted_tokens, interval.num_draft_tokens);
    let (accepted_tp, drafted_tp) =
        if elapsed_secs > 0.0 { (accepted as f64 / elapsed_secs, drafted as f64 / elapsed_secs) } else { (0.0, 0.0) };
    let acceptance_pct = if drafted > 0 { accepted as f64 / drafted as f64 * 100.0 } else { f64::NAN };
    let mean_acceptance_length = 1.0 + accepted as f64 / drafts;
    let per_pos: Vec<String> =
        interval.num_accepted_tokens_per_pos.iter().map(|&n| format!("{:.3}", n as f64 / drafts)).collect();
    Some(format!(
        "SpecDecoding metrics: Mean acceptance length: {mean_acceptance_length:.2}, Accepted throughput: {accepted_tp:.2} tokens/s, Drafted throughput: {drafted_tp:.2} tokens/s, Accepted: {accepted} tokens, Drafted: {drafted} tokens, Per-position acceptance rate: {}, Avg Draft acceptance rate: {acceptance_pct:.1}%",
        per_pos.join(", ")
    ))
}

/// vLLM's periodic log line ("Avg prompt throughput: ... tokens/s, ..."), logged at info while there
/// is traffic and at debug when idle, followed by the "SpecDecoding metrics" line when the interval
/// verified drafts.
pub struct StatsLogger {
    last_time: Instant,
    last_prompt_tokens: u64,
    last_generation_tokens: u64,
    /// Cumulative spec decoding counters at the last log, so each line covers one interval.
    last_spec_decoding: SpecDecodingStats,
    last_prompt_throughput: f64,
    last_generation_throughput: f64,
}

impl StatsLogger {
    pub fn new(metrics: &Metrics) -> StatsLogger {
        StatsLogger {
            last_time: Instant::now(),
            last_prompt_tokens: metrics.prompt_tokens.get(),
            last_generation_tokens: metrics.generation_tokens.get(),
            last_spec_decoding: metrics.spec_decoding_totals(),
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
        let spec = metrics.spec_decoding_totals();
        if let Some(spec_line) = spec_decoding_log_line(&spec_decoding_delta(&spec, &self.last_spec_decoding), dt) {
            tracing::info!("{spec_line}");
        }
        self.last_spec_decoding = spec;
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

    fn spec(drafts: u64, draft_tokens: u64, accepted: u64, per_pos: &[u64]) -> SpecDecodingStats {
        SpecDecodingStats {
            num_drafts: drafts,
            num_draft_tokens: draft_tokens,
            num_accepted_tokens: accepted,
            num_accepted_tokens_per_pos: per_pos.to_vec(),
        }
    }

    fn stats_with(spec_decoding: SpecDecodingStats) -> SchedulerStats {
        SchedulerStats { spec_decoding, ..SchedulerStats::default() }
    }

    #[test]
    fn spec_decode_counters_are_registered_at_zero_without_speculation() {
        let m = Metrics::new("my-model", 2048);
        m.record_scheduler(&SchedulerStats::default(), &SchedulerStats::default());
        let text = m.encode();
        for name in [
            "vllm:spec_decode_num_drafts_total{model_name=\"my-model\",engine=\"0\"} 0",
            "vllm:spec_decode_num_draft_tokens_total{model_name=\"my-model\",engine=\"0\"} 0",
            "vllm:spec_decode_num_accepted_tokens_total{model_name=\"my-model\",engine=\"0\"} 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        // No position has been verified, so the per-position family has no series yet.
        assert!(!text.contains("vllm:spec_decode_num_accepted_tokens_per_pos_total{"), "{text}");
        assert_eq!(m.spec_decoding_totals(), SpecDecodingStats::default());
    }

    #[test]
    fn spec_decode_counters_advance_by_the_change_since_the_previous_snapshot() {
        let m = Metrics::new("my-model", 2048);
        let s1 = stats_with(spec(2, 5, 3, &[2, 1]));
        let s2 = stats_with(spec(5, 14, 8, &[4, 3, 1]));
        m.record_scheduler(&s1, &SchedulerStats::default());
        m.record_scheduler(&s2, &s1);
        // The totals equal the latest cumulative snapshot, not the sum of snapshots.
        assert_eq!(m.spec_decoding_totals(), s2.spec_decoding);
        let text = m.encode();
        assert!(text.contains("vllm:spec_decode_num_drafts_total{model_name=\"my-model\",engine=\"0\"} 5"), "{text}");
        assert!(
            text.contains("vllm:spec_decode_num_draft_tokens_total{model_name=\"my-model\",engine=\"0\"} 14"),
            "{text}"
        );
        assert!(
            text.contains("vllm:spec_decode_num_accepted_tokens_total{model_name=\"my-model\",engine=\"0\"} 8"),
            "{text}"
        );
        let per_pos: Vec<&str> =
            text.lines().filter(|l| l.starts_with("vllm:spec_decode_num_accepted_tokens_per_pos_total{")).collect();
        assert_eq!(per_pos.len(), 3, "{text}");
        for (pos, count) in [(0, 4), (1, 3), (2, 1)] {
            let line = per_pos
                .iter()
                .find(|l| l.contains(&format!("position=\"{pos}\"")))
                .unwrap_or_else(|| panic!("position {pos} missing from\n{text}"));
            assert!(line.contains("model_name=\"my-model\"") && line.contains("engine=\"0\""), "{line}");
            assert!(line.ends_with(&format!(" {count}")), "{line}");
        }
    }

    #[test]
    fn spec_decoding_delta_subtracts_per_field_and_position() {
        let delta = spec_decoding_delta(&spec(5, 14, 8, &[4, 3, 1]), &spec(2, 5, 3, &[2, 1]));
        assert_eq!(delta, spec(3, 9, 5, &[2, 2, 1]));
        // A counter that went backwards adds nothing.
        assert_eq!(spec_decoding_delta(&spec(1, 1, 1, &[1]), &spec(2, 2, 2, &[2])), spec(0, 0, 0, &[0]));
    }

    #[test]
    fn spec_decoding_log_line_follows_vllm() {
        // 4 rounds of 3 drafts over 2 s: 6 of 12 accepted, positions accepted 3, 2 and 1 times.
        let line = spec_decoding_log_line(&spec(4, 12, 6, &[3, 2, 1]), 2.0).expect("drafts were verified");
        assert_eq!(
            line,
            "SpecDecoding metrics: Mean acceptance length: 2.50, Accepted throughput: 3.00 tokens/s, \
             Drafted throughput: 6.00 tokens/s, Accepted: 6 tokens, Drafted: 12 tokens, \
             Per-position acceptance rate: 0.750, 0.500, 0.250, Avg Draft acceptance rate: 50.0%"
        );
        // The brief's example numbers: 124 of 201 accepted in 10 s.
        let line = spec_decoding_log_line(&spec(100, 201, 124, &[81, 60, 41]), 10.0).expect("drafts");
        assert!(line.contains("Mean acceptance length: 2.24,"), "{line}");
        assert!(line.contains("Accepted throughput: 12.40 tokens/s, Drafted throughput: 20.10 tokens/s"), "{line}");
        assert!(line.contains("Per-position acceptance rate: 0.810, 0.600, 0.410,"), "{line}");
        assert!(line.ends_with("Avg Draft acceptance rate: 61.7%"), "{line}");
    }

    #[test]
    fn spec_decoding_log_line_is_silent_without_drafts() {
        assert_eq!(spec_decoding_log_line(&SpecDecodingStats::default(), 5.0), None);
        // A zero-length interval still logs the counts, with zero throughput rather than infinity.
        let line = spec_decoding_log_line(&spec(1, 2, 1, &[1, 0]), 0.0).expect("one round");
        assert!(line.contains("Accepted throughput: 0.00 tokens/s"), "{line}");
        assert!(line.contains("Mean acceptance length: 2.00"), "{line}");
    }
}
