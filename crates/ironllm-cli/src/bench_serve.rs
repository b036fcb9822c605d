//! `ironllm bench serve`: an online serving benchmark shaped like `vllm bench serve`, a streaming client
//! against any OpenAI-compatible `/v1/completions` endpoint (ironllm's, vLLM's, llama.cpp's server).
//!
//! Definitions follow vLLM's `vllm/benchmarks/serve.py`:
//! - TTFT: from sending the request to the first streamed chunk that carries a choice.
//! - ITL: the gaps between consecutive choice chunks of one request (one entry per gap).
//! - E2EL: from sending the request to its last choice chunk.
//!   One departure from vLLM's client: a trailing choice chunk with empty text and a finish reason (as
//!   llama.cpp's server sends after the last token, with the usage) is not taken as a token arrival, so
//!   it adds no near-zero gap to the ITLs; vLLM's client counts it.
//! - TPOT: `(E2EL - TTFT) / (output_tokens - 1)`, only over requests with more than one output token.
//! - output tokens: the `usage.completion_tokens` of the final chunk (`stream_options.include_usage`) when
//!   the server sends it (also when it comes in the same chunk as a choice), else the number of token
//!   chunks.
//! - throughputs divide by the benchmark's wall time (first dispatch to last completion).
//!
//! Datasets (`--dataset-name`): `random`, `prefix_repetition` and `custom`. Prompts are text, since not
//! every server accepts token-id prompts. The synthetic ones are made of common English words; when the
//! server has a `/tokenize` endpoint (ironllm's, vLLM's `{"prompt"}` form or llama.cpp's `{"content"}`
//! form) the word pool is first narrowed to words that are exactly one token after a space, and every
//! prompt is then fitted by tokenizing it and adding or dropping words until it has the requested number
//! of tokens (at most 10 rounds, as vLLM's decode/re-encode loop). Without `/tokenize` (or with
//! `--skip-tokenizer-init`) one word is taken as one token, which is close for common words in English
//! BPE vocabularies but not exact.
//!
//! `custom` is vLLM's: `--dataset-path FILE.jsonl` with one `{"prompt": ...}` per line (optionally
//! `"output_tokens"`, used when `--custom-output-len` is -1), shuffled with `--seed` unless
//! `--disable-shuffle`, the first `--num-prompts` taken (repeated at random when the file has fewer).
//! As vLLM, each prompt is wrapped in the model's chat template as one user message unless
//! `--custom-skip-chat-template`; vLLM does that with a local tokenizer, this client has none and asks the
//! server instead (`/tokenize` with `messages`, then `/detokenize`; llama.cpp's `/apply-template`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Args;
use futures_util::StreamExt;
use serde_json::{json, Map, Value};

#[derive(Debug, Args)]
pub struct ServeBenchArgs {
    /// Backend / endpoint type (OpenAI-compatible completions only).
    #[arg(long, default_value = "openai", value_parser = ["openai", "vllm"])]
    pub backend: String,
    /// Label (prefix) of the result file name; default: the backend.
    #[arg(long)]
    pub label: Option<String>,
    /// Server base URL, e.g. http://127.0.0.1:8000 (overrides --host/--port).
    #[arg(long)]
    pub base_url: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    #[arg(long, default_value = "/v1/completions")]
    pub endpoint: String,
    /// Model name sent in requests; default: the first model of the server's /v1/models.
    #[arg(long)]
    pub model: Option<String>,
    /// Model name to put in requests, if different from --model.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// HTTP headers for every request (KEY=VALUE). OPENAI_API_KEY, if set, is sent as a bearer token.
    #[arg(long, num_args = 0..)]
    pub header: Vec<String>,

    /// random, prefix_repetition or custom.
    #[arg(long, default_value = "random", value_parser = ["random", "prefix_repetition", "custom"])]
    pub dataset_name: String,
    /// The custom dataset's JSONL file.
    #[arg(long)]
    pub dataset_path: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    pub num_prompts: usize,
    /// General input length (maps to --random-input-len).
    #[arg(long)]
    pub input_len: Option<usize>,
    /// General output length (maps to --random-output-len, --prefix-repetition-output-len and
    /// --custom-output-len).
    #[arg(long)]
    pub output_len: Option<usize>,
    #[arg(long, default_value_t = 1024)]
    pub random_input_len: usize,
    #[arg(long, default_value_t = 128)]
    pub random_output_len: usize,
    /// Lengths are drawn uniformly from [len * (1 - r), len * (1 + r)]; r in [0, 1).
    #[arg(long, default_value_t = 0.0)]
    pub random_range_ratio: f64,
    /// Tokens of one fixed prefix shared by every random prompt.
    #[arg(long, default_value_t = 0)]
    pub random_prefix_len: usize,
    #[arg(long, default_value_t = 256)]
    pub prefix_repetition_prefix_len: usize,
    #[arg(long, default_value_t = 256)]
    pub prefix_repetition_suffix_len: usize,
    #[arg(long, default_value_t = 10)]
    pub prefix_repetition_num_prefixes: usize,
    #[arg(long, default_value_t = 128)]
    pub prefix_repetition_output_len: usize,
    /// Output tokens (`max_tokens`) of every custom-dataset request; -1: each line's `output_tokens`.
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    pub custom_output_len: i64,
    /// Send the custom prompts as they are, without the chat template.
    #[arg(long)]
    pub custom_skip_chat_template: bool,
    /// Keep prefix_repetition prompts grouped by prefix, and custom prompts in file order.
    #[arg(long)]
    pub disable_shuffle: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Do not query the server's /tokenize: take one word as one token.
    #[arg(long)]
    pub skip_tokenizer_init: bool,

    /// Requests per second (inf: all at time 0); otherwise Poisson / gamma arrivals.
    #[arg(long, default_value_t = f64::INFINITY)]
    pub request_rate: f64,
    /// Gamma shape of the inter-arrival times: 1 is Poisson, < 1 burstier, > 1 more uniform.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// At most this many requests in flight.
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Send `ignore_eos: true` (forced on for the random dataset, as vLLM does).
    #[arg(long)]
    pub ignore_eos: bool,
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long)]
    pub top_k: Option<i64>,
    #[arg(long)]
    pub min_p: Option<f64>,
    /// Extra JSON fields for every request body, e.g. '{"cache_prompt": false}'.
    #[arg(long)]
    pub extra_body: Option<String>,
    /// Fraction of requests that carry `--structured-output-body` (spread evenly over the run), as
    /// vLLM's structured-output benchmark's `--structured-output-ratio`.
    #[arg(long, default_value_t = 0.0)]
    pub structured_output_ratio: f64,
    /// JSON fields the structured requests add (default: a `response_format` JSON schema of a person
    /// record).
    #[arg(long)]
    pub structured_output_body: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub num_warmups: usize,
    /// Poll the endpoint with the first prompt until it answers, up to this many seconds (0: skip).
    #[arg(long, default_value_t = 0)]
    pub ready_check_timeout_sec: u64,

    /// Metrics to report percentiles for: ttft, tpot, itl, e2el, client_queue_time.
    #[arg(long, default_value = "ttft,tpot,itl,e2el")]
    pub percentile_metrics: String,
    /// Percentiles to report, e.g. "50,90,99".
    #[arg(long, default_value = "99")]
    pub metric_percentiles: String,
    #[arg(long)]
    pub disable_tqdm: bool,
    #[arg(long)]
    pub save_result: bool,
    /// Keep per-request lists (ttfts, itls, latencies, ...) in the saved JSON.
    #[arg(long)]
    pub save_detailed: bool,
    #[arg(long)]
    pub result_dir: Option<PathBuf>,
    #[arg(long)]
    pub result_filename: Option<String>,
    /// KEY=VALUE pairs stored in the result JSON.
    #[arg(long, num_args = 0..)]
    pub metadata: Vec<String>,
}

pub fn run(a: ServeBenchArgs) -> anyhow::Result<()> {
    // One thread: the client must take as little CPU as it can from the server it measures.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run_async(a))
}

// ---------------------------------------------------------------------------------------------
// Random numbers: reproducible and dependency-free.

/// SplitMix64 with the few distributions the benchmark needs.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [lo, hi].
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Gamma(shape, scale) by Marsaglia and Tsang; shape < 1 through the boost U^(1/shape).
    pub fn gamma(&mut self, shape: f64, scale: f64) -> f64 {
        if shape < 1.0 {
            let u = 1.0 - self.uniform();
            return self.gamma(shape + 1.0, scale) * u.powf(1.0 / shape);
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = 1.0 + c * x;
            if v <= 0.0 {
                continue;
            }
            let v = v * v * v;
            let u = 1.0 - self.uniform();
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v * scale;
            }
        }
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// Send times (seconds after the start) of `n` requests, as vLLM's `get_request`: all at 0 for an
/// infinite rate; otherwise gamma-distributed gaps with shape `burstiness` and mean `1 / rate` (Poisson
/// for burstiness 1, constant gaps for infinite burstiness), cumulated and then rescaled so that the
/// last request goes out at exactly `n / rate`.
pub fn arrival_times(n: usize, rate: f64, burstiness: f64, rng: &mut Rng) -> Vec<f64> {
    let mut t = Vec::with_capacity(n);
    let mut acc = 0.0;
    for _ in 0..n {
        let gap = if rate.is_infinite() {
            0.0
        } else if burstiness.is_infinite() {
            1.0 / rate
        } else {
            rng.gamma(burstiness, 1.0 / (rate * burstiness))
        };
        acc += gap;
        t.push(acc);
    }
    if let Some(&last) = t.last() {
        if last > 0.0 {
            let k = n as f64 / rate / last;
            t.iter_mut().for_each(|x| *x *= k);
        }
    }
    t
}

// ---------------------------------------------------------------------------------------------
// Metric math.

/// numpy's default (linear) percentile of an ascending slice; 0 for an empty one.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Population standard deviation (numpy's `std`).
pub fn std_dev(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64).sqrt()
}

/// Mean, median, std and the selected percentiles, in milliseconds, of values in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub mean: f64,
    pub median: f64,
    pub std: f64,
    pub percentiles: Vec<(f64, f64)>,
}

pub fn stats_ms(values: &[f64], ps: &[f64]) -> Stats {
    let mut s: Vec<f64> = values.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    Stats {
        mean: mean(values) * 1000.0,
        median: percentile(&s, 50.0) * 1000.0,
        std: std_dev(values) * 1000.0,
        percentiles: ps.iter().map(|&p| (p, percentile(&s, p) * 1000.0)).collect(),
    }
}

/// Time per output token after the first; None for one output token or fewer (vLLM leaves those out).
pub fn tpot(e2el: f64, ttft: f64, output_tokens: usize) -> Option<f64> {
    (output_tokens > 1).then(|| (e2el - ttft) / (output_tokens - 1) as f64)
}

/// Inter-token latencies from the arrival times of a request's choice chunks (seconds since it was sent):
/// the first is the TTFT, the rest are gaps.
pub fn ttft_and_itl(chunk_times: &[f64]) -> Option<(f64, Vec<f64>)> {
    let (&first, _) = chunk_times.split_first()?;
    Some((first, chunk_times.windows(2).map(|w| w[1] - w[0]).collect()))
}

/// Largest number of requests in flight at once, over half-open [start, end) intervals.
pub fn peak_concurrency(intervals: &[(f64, f64)]) -> usize {
    let mut ev: Vec<(f64, i32)> = intervals.iter().flat_map(|&(s, e)| [(s, 1), (e, -1)]).collect();
    ev.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut cur, mut peak) = (0i64, 0i64);
    for (_, d) in ev {
        cur += d as i64;
        peak = peak.max(cur);
    }
    peak as usize
}

/// Most output chunks that arrived within one one-second bucket (vLLM's "peak output token throughput",
/// which counts one token per chunk).
pub fn peak_tokens_per_s(outputs: &[RequestOutput]) -> f64 {
    let ok: Vec<&RequestOutput> = outputs.iter().filter(|o| o.success).collect();
    let Some(t0) = ok.iter().map(|o| o.start_time).reduce(f64::min) else { return 0.0 };
    let t1 = ok.iter().map(|o| o.start_time + o.latency).fold(t0, f64::max);
    let n = (t1 - t0).ceil() as usize + 1;
    let mut buckets = vec![0usize; n];
    for o in ok {
        let mut t = o.start_time + o.ttft;
        let mut add = |t: f64| {
            let b = (t - t0).max(0.0) as usize;
            if b < n {
                buckets[b] += 1;
            }
        };
        add(t);
        for g in &o.itl {
            t += g;
            add(t);
        }
    }
    buckets.into_iter().max().unwrap_or(0) as f64
}

// ---------------------------------------------------------------------------------------------
// Server-sent events.

/// Splits a byte stream into SSE `data:` payloads, across arbitrary chunk boundaries.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some((end, sep)) = find_event_end(&self.buf) {
            let event: Vec<u8> = self.buf.drain(..end + sep).take(end).collect();
            let text = String::from_utf8_lossy(&event);
            let mut data = String::new();
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
                }
            }
            if !data.is_empty() {
                out.push(data);
            }
        }
        out
    }

    /// Whatever is left when the stream ends (a last event without its blank line).
    pub fn finish(&mut self) -> Vec<String> {
        if self.buf.iter().all(u8::is_ascii_whitespace) {
            return Vec::new();
        }
        self.buf.extend_from_slice(b"\n\n");
        self.push(&[])
    }
}

fn find_event_end(b: &[u8]) -> Option<(usize, usize)> {
    (0..b.len()).find_map(|i| {
        if b[i..].starts_with(b"\r\n\r\n") {
            Some((i, 4))
        } else if b[i..].starts_with(b"\n\n") {
            Some((i, 2))
        } else {
            None
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Requests.

#[derive(Debug, Clone)]
pub struct SampleRequest {
    pub prompt: String,
    pub prompt_len: usize,
    pub expected_output_len: usize,
    /// Whether the request carries the structured-output fields.
    pub structured: bool,
}

#[derive(Debug, Clone, Default)]
pub struct RequestOutput {
    pub generated_text: String,
    pub success: bool,
    /// E2EL, seconds.
    pub latency: f64,
    /// From `usage.completion_tokens`, else counted chunks.
    pub output_tokens: usize,
    pub ttft: f64,
    pub itl: Vec<f64>,
    pub prompt_len: usize,
    pub error: String,
    /// Seconds after the benchmark started.
    pub start_time: f64,
    pub client_queue_time: f64,
    /// Times the request was sent again because its connection closed before any response.
    pub resent: usize,
}

struct Client {
    http: reqwest::Client,
    /// Without connection reuse, for resending a request whose pooled connection was closed under it.
    fresh: reqwest::Client,
    api_url: String,
    base_url: String,
    headers: reqwest::header::HeaderMap,
    model: String,
    extra: Map<String, Value>,
    /// Added to the requests marked structured.
    structured_extra: Map<String, Value>,
    ignore_eos: bool,
}

impl Client {
    async fn send(&self, req: &SampleRequest, t0: Instant) -> RequestOutput {
        let mut body = json!({
            "model": self.model,
            "prompt": req.prompt,
            "max_tokens": req.expected_output_len,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if self.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        for (k, v) in &self.extra {
            body[k] = v.clone();
        }
        if req.structured {
            for (k, v) in &self.structured_extra {
                body[k] = v.clone();
            }
        }
        let mut out = RequestOutput { prompt_len: req.prompt_len, ..Default::default() };
        let mut st = Instant::now();
        let mut sent = self.http.post(&self.api_url).headers(self.headers.clone()).json(&body).send().await;
        for _ in 0..2 {
            if !matches!(&sent, Err(e) if !e.is_timeout()) {
                break;
            }
            // No response at all: most likely a pooled keep-alive connection that the server had just closed
            // (llama.cpp's server does this now and then). The request never reached the engine, so it is
            // sent again on a new connection, timed from the new send.
            st = Instant::now();
            out.resent += 1;
            sent = self.fresh.post(&self.api_url).headers(self.headers.clone()).json(&body).send().await;
        }
        out.start_time = (st - t0).as_secs_f64();
        let result = match sent {
            Ok(resp) => self.stream(resp, st, &mut out).await,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = result {
            out.success = false;
            out.error = format!("{e:#}");
        }
        out
    }

    async fn stream(&self, resp: reqwest::Response, st: Instant, out: &mut RequestOutput) -> anyhow::Result<()> {
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            bail!("HTTP {status}: {}", text.chars().take(500).collect::<String>());
        }
        let mut parser = SseParser::default();
        let mut stream = resp.bytes_stream();
        let mut times: Vec<f64> = Vec::new();
        let mut counted = 0usize;
        let mut usage_tokens: Option<usize> = None;
        let mut handle = |payload: String, now: f64, out: &mut RequestOutput| -> anyhow::Result<()> {
            if payload.trim() == "[DONE]" {
                return Ok(());
            }
            let v: Value = serde_json::from_str(&payload).with_context(|| format!("bad SSE payload: {payload}"))?;
            if let Some(err) = v.get("error") {
                bail!("server error in stream: {err}");
            }
            if let Some(choice) = v.get("choices").and_then(Value::as_array).and_then(|c| c.first()) {
                let text = choice.get("text").and_then(Value::as_str).unwrap_or("");
                let finished = choice.get("finish_reason").is_some_and(|f| !f.is_null());
                // A trailing chunk with no text that only closes the stream (llama.cpp sends one, with the
                // usage) carries no token: it is neither a token arrival nor counted.
                if !text.is_empty() || !finished || times.is_empty() {
                    times.push(now);
                    counted += 1;
                }
                out.generated_text.push_str(text);
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                if let Some(c) = u.get("completion_tokens").and_then(Value::as_u64) {
                    usage_tokens = Some(c as usize);
                }
                if let Some(p) = u.get("prompt_tokens").and_then(Value::as_u64) {
                    out.prompt_len = p as usize;
                }
            }
            Ok(())
        };
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            let now = st.elapsed().as_secs_f64();
            for payload in parser.push(&chunk) {
                handle(payload, now, out)?;
            }
        }
        let now = st.elapsed().as_secs_f64();
        for payload in parser.finish() {
            handle(payload, now, out)?;
        }
        let Some((ttft, itl)) = ttft_and_itl(&times) else {
            bail!("Never received a valid chunk to calculate TTFT. This response will be marked as failed!");
        };
        out.ttft = ttft;
        out.itl = itl;
        out.latency = *times.last().unwrap_or(&ttft);
        out.output_tokens = usage_tokens.unwrap_or(counted);
        out.success = true;
        Ok(())
    }

    async fn first_model(&self) -> anyhow::Result<String> {
        let url = format!("{}/v1/models", self.base_url);
        let v: Value =
            self.http.get(&url).headers(self.headers.clone()).send().await?.error_for_status()?.json().await?;
        v["data"][0]["id"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no models found at {url}; make sure the server is running and has a model"))
    }
}

// ---------------------------------------------------------------------------------------------
// Prompts.

/// Common English words; most are one token after a space in English BPE vocabularies.
const WORDS: &str = "the of and to in is was for on that with as by at from his he it an are were which be this \
has had have not but also its or their first one after new they who two her she been other when there all \
during into time more school world year only over many most later some would years between up about city \
people out him three made such where used state both then national since than american through being back \
well may war part known these under each while can high life film while game united team early age long \
because name south north east west work family group even before season series best great small large old \
very much good just own last home way same day night water house music book story power place world land \
love light life hand head side line point end area form case fact game level order party room sound word \
able black blue green red white young human local public real right social strong true whole open close \
find give make take come know look think want play move live hold turn start show hear run read keep help \
talk walk call ask tell feel leave bring begin seem write sit stand lose pay meet include set learn change \
lead watch follow stop create speak allow add spend grow offer remember love consider appear buy wait serve \
die send expect build stay fall cut reach kill remain suggest raise pass sell require report decide pull";

fn word_pool() -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    WORDS.split_whitespace().filter(|w| seen.insert(*w)).map(str::to_string).collect()
}

/// How the server's `/tokenize` wants its body.
#[derive(Debug, Clone, Copy, PartialEq)]
enum TokenizeStyle {
    /// vLLM and ironllm: `{"model", "prompt", "add_special_tokens": false}` -> `{"tokens"}`.
    Vllm,
    /// llama.cpp: `{"content", "add_special": false}` -> `{"tokens"}`.
    LlamaCpp,
}

struct Tokenizer<'a> {
    client: &'a Client,
    style: TokenizeStyle,
    calls: usize,
}

impl<'a> Tokenizer<'a> {
    async fn probe(client: &'a Client) -> Option<Tokenizer<'a>> {
        for style in [TokenizeStyle::Vllm, TokenizeStyle::LlamaCpp] {
            let mut t = Tokenizer { client, style, calls: 0 };
            if matches!(t.count("hello world").await, Ok(n) if n > 0) {
                return Some(t);
            }
        }
        None
    }

    async fn count(&mut self, text: &str) -> anyhow::Result<usize> {
        self.calls += 1;
        let body = match self.style {
            TokenizeStyle::Vllm => json!({"model": self.client.model, "prompt": text, "add_special_tokens": false}),
            TokenizeStyle::LlamaCpp => json!({"content": text, "add_special": false}),
        };
        let url = format!("{}/tokenize", self.client.base_url);
        let resp = self.client.http.post(&url).headers(self.client.headers.clone()).json(&body).send().await?;
        let v: Value = resp.error_for_status()?.json().await?;
        v.get("tokens").and_then(Value::as_array).map(Vec::len).context("no `tokens` in /tokenize response")
    }

    /// `content` as one user message in the server's chat template, with the generation prompt, and its
    /// number of tokens.
    async fn apply_chat_template(&mut self, content: &str) -> anyhow::Result<(String, usize)> {
        let c = self.client;
        let messages = json!([{"role": "user", "content": content}]);
        let post = |path: &str, body: Value| {
            let url = format!("{}{path}", c.base_url);
            async move {
                let resp = c.http.post(&url).headers(c.headers.clone()).json(&body).send().await?;
                anyhow::Ok(resp.error_for_status()?.json::<Value>().await?)
            }
        };
        let prompt = match self.style {
            TokenizeStyle::Vllm => {
                let v =
                    post("/tokenize", json!({"model": c.model, "messages": messages, "add_generation_prompt": true}))
                        .await?;
                let tokens = v.get("tokens").cloned().context("no `tokens` in /tokenize response")?;
                let v = post("/detokenize", json!({"model": c.model, "tokens": tokens})).await?;
                v.get("prompt").and_then(Value::as_str).context("no `prompt` in /detokenize response")?.to_string()
            }
            TokenizeStyle::LlamaCpp => {
                let v = post("/apply-template", json!({"messages": messages})).await?;
                v.get("prompt").and_then(Value::as_str).context("no `prompt` in /apply-template response")?.to_string()
            }
        };
        let n = self.count(&prompt).await?;
        Ok((prompt, n))
    }
}

fn join_words(prefix: &str, words: &[&str]) -> String {
    let body = words.join(" ");
    match (prefix.is_empty(), body.is_empty()) {
        (true, _) => body,
        (false, true) => prefix.to_string(),
        (false, false) => format!("{prefix} {body}"),
    }
}

struct PromptMaker<'a> {
    pool: Vec<String>,
    tok: Option<Tokenizer<'a>>,
    mismatch: i64,
}

impl PromptMaker<'_> {
    /// Text of `prefix` (of `prefix_tokens` tokens) followed by words, fitted to `target` tokens in all.
    async fn fit(&mut self, rng: &mut Rng, prefix: &str, prefix_tokens: usize, target: usize) -> (String, usize) {
        let pool: Vec<&str> = self.pool.iter().map(String::as_str).collect();
        let mut words: Vec<&str> =
            (0..target.saturating_sub(prefix_tokens)).map(|_| pool[rng.below(pool.len())]).collect();
        let Some(tok) = self.tok.as_mut() else {
            return (join_words(prefix, &words), prefix_tokens + words.len());
        };
        let mut n = 0;
        for round in 0..=10 {
            let text = join_words(prefix, &words);
            n = match tok.count(&text).await {
                Ok(n) => n,
                Err(_) => return (text, prefix_tokens + words.len()),
            };
            if n == target || round == 10 {
                break;
            }
            if n > target {
                let k = (n - target).min(words.len());
                words.truncate(words.len() - k);
                if k == 0 {
                    break;
                }
            } else {
                words.extend((0..target - n).map(|_| pool[rng.below(pool.len())]));
            }
        }
        self.mismatch += n as i64 - target as i64;
        (join_words(prefix, &words), n)
    }
}

async fn make_prompt_maker<'a>(client: &'a Client, skip_tokenizer: bool) -> PromptMaker<'a> {
    let mut pool = word_pool();
    let mut tok = if skip_tokenizer { None } else { Tokenizer::probe(client).await };
    match tok.as_mut() {
        Some(t) => {
            let mut single = Vec::new();
            for w in &pool {
                if let Ok(1) = t.count(&format!(" {w}")).await {
                    single.push(w.clone());
                }
            }
            eprintln!(
                "Prompts: fitted with the server's /tokenize ({:?} style); {} of {} words are one token",
                t.style,
                single.len(),
                pool.len()
            );
            if single.len() >= 32 {
                pool = single;
            }
        }
        None => eprintln!("Prompts: no /tokenize on the server; one word is taken as one token (approximate)"),
    }
    PromptMaker { pool, tok, mismatch: 0 }
}

fn sample_lens(rng: &mut Rng, len: usize, ratio: f64, min: usize) -> usize {
    let lo = ((len as f64) * (1.0 - ratio)).floor() as usize;
    let hi = ((len as f64) * (1.0 + ratio)).ceil() as usize;
    rng.range(lo.max(min), hi.max(min))
}

async fn random_dataset(a: &ServeBenchArgs, pm: &mut PromptMaker<'_>, rng: &mut Rng) -> Vec<SampleRequest> {
    let (prefix, prefix_len) =
        if a.random_prefix_len > 0 { pm.fit(rng, "", 0, a.random_prefix_len).await } else { (String::new(), 0) };
    let mut reqs = Vec::with_capacity(a.num_prompts);
    for _ in 0..a.num_prompts {
        let in_len = sample_lens(rng, a.random_input_len, a.random_range_ratio, 0);
        let out_len = sample_lens(rng, a.random_output_len, a.random_range_ratio, 1);
        let (prompt, n) = pm.fit(rng, &prefix, prefix_len, prefix_len + in_len.max(1)).await;
        reqs.push(SampleRequest { prompt, prompt_len: n, expected_output_len: out_len, structured: false });
    }
    reqs
}

async fn prefix_repetition_dataset(
    a: &ServeBenchArgs,
    pm: &mut PromptMaker<'_>,
    rng: &mut Rng,
) -> anyhow::Result<Vec<SampleRequest>> {
    let per_prefix = a.num_prompts / a.prefix_repetition_num_prefixes.max(1);
    if per_prefix == 0 {
        bail!(
            "num_requests ({}) must be greater than or equal to num_prefixes ({})",
            a.num_prompts,
            a.prefix_repetition_num_prefixes
        );
    }
    let (p, s) = (a.prefix_repetition_prefix_len, a.prefix_repetition_suffix_len);
    let mut reqs = Vec::new();
    for _ in 0..a.prefix_repetition_num_prefixes {
        let (prefix, plen) = pm.fit(rng, "", 0, p).await;
        for _ in 0..per_prefix {
            let (prompt, n) = pm.fit(rng, &prefix, plen, plen + s).await;
            reqs.push(SampleRequest {
                prompt,
                prompt_len: n,
                expected_output_len: a.prefix_repetition_output_len,
                structured: false,
            });
        }
    }
    if !a.disable_shuffle {
        rng.shuffle(&mut reqs);
    }
    Ok(reqs)
}

/// One line of a custom dataset file.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomEntry {
    pub prompt: String,
    /// Requested output tokens of this prompt (used with `--custom-output-len -1`).
    pub output_tokens: Option<usize>,
}

/// Reads vLLM's custom-dataset JSONL: one object per line with a string `prompt` and an optional
/// non-negative integer `output_tokens`; blank lines are skipped, other keys ignored.
pub fn parse_custom_jsonl(text: &str) -> anyhow::Result<Vec<CustomEntry>> {
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_no = i + 1;
        let v: Value = serde_json::from_str(line).with_context(|| format!("line {line_no}: not JSON"))?;
        let prompt = match v.get("prompt") {
            Some(Value::String(p)) => p.clone(),
            Some(other) => bail!("line {line_no}: `prompt` must be a string, got {other}"),
            None => bail!("line {line_no}: JSONL file must contain a 'prompt' column."),
        };
        let output_tokens =
            match v.get("output_tokens") {
                None | Some(Value::Null) => None,
                Some(n) => Some(n.as_u64().with_context(|| {
                    format!("line {line_no}: `output_tokens` must be a non-negative integer, got {n}")
                })? as usize),
            };
        entries.push(CustomEntry { prompt, output_tokens });
    }
    if entries.is_empty() {
        bail!("the custom dataset has no prompts");
    }
    Ok(entries)
}

/// vLLM's sampling of a custom dataset: shuffled unless `shuffle` is off, the first `n` entries, then
/// entries picked at random until there are `n` when the file has fewer.
pub fn select_custom(mut entries: Vec<CustomEntry>, n: usize, shuffle: bool, rng: &mut Rng) -> Vec<CustomEntry> {
    if shuffle {
        rng.shuffle(&mut entries);
    }
    entries.truncate(n);
    let available = entries.len();
    if available < n {
        eprintln!("Oversampled requests to reach {n} total samples ({available} in the file).");
        for _ in available..n {
            entries.push(entries[rng.below(available)].clone());
        }
    }
    entries
}

/// `max_tokens` of a custom prompt: `--custom-output-len`, or, when it is -1, the line's `output_tokens`.
fn custom_output_len(flag: i64, entry: &CustomEntry) -> anyhow::Result<usize> {
    match flag {
        n if n > 0 => Ok(n as usize),
        -1 => entry
            .output_tokens
            .filter(|&n| n > 0)
            .context("--custom-output-len -1 takes each prompt's `output_tokens`, but a prompt has none (or 0)"),
        n => bail!("--custom-output-len must be positive, or -1 for each prompt's `output_tokens`; got {n}"),
    }
}

async fn custom_dataset(
    a: &ServeBenchArgs,
    tok: Option<&mut Tokenizer<'_>>,
    rng: &mut Rng,
) -> anyhow::Result<Vec<SampleRequest>> {
    let path = a.dataset_path.as_ref().context("--dataset-name custom needs --dataset-path FILE.jsonl")?;
    if path.extension().and_then(|e| e.to_str()) != Some("jsonl") {
        bail!("Only JSONL format is supported for CustomDataset (got {}).", path.display());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let entries = parse_custom_jsonl(&text).with_context(|| format!("in {}", path.display()))?;
    let entries = select_custom(entries, a.num_prompts, !a.disable_shuffle, rng);
    let mut tok = tok;
    if !a.custom_skip_chat_template && tok.is_none() {
        bail!(
            "the custom dataset's chat template is applied through the server's /tokenize and /detokenize (or \
             /apply-template), which this server does not answer; pass --custom-skip-chat-template to send the \
             prompts as they are"
        );
    }
    let mut reqs = Vec::with_capacity(entries.len());
    for e in &entries {
        let out_len = custom_output_len(a.custom_output_len, e)?;
        let (prompt, prompt_len) = match tok.as_deref_mut() {
            Some(t) if !a.custom_skip_chat_template => {
                t.apply_chat_template(&e.prompt).await.context("applying the chat template through the server")?
            }
            Some(t) => {
                let n = t.count(&e.prompt).await?;
                (e.prompt.clone(), n)
            }
            None => (e.prompt.clone(), e.prompt.split_whitespace().count()),
        };
        reqs.push(SampleRequest { prompt, prompt_len, expected_output_len: out_len, structured: false });
    }
    Ok(reqs)
}

// ---------------------------------------------------------------------------------------------
// The run.

fn parse_kv(items: &[String], what: &str) -> anyhow::Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .with_context(|| format!("invalid {what} `{s}`: use KEY=VALUE"))
        })
        .collect()
}

fn p_word(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("{}", p as i64)
    } else {
        format!("{p}")
    }
}

/// Python's `str(float)` for the request rate in file names: "inf", "1.0", "2.5".
fn rate_str(r: f64) -> String {
    if r.is_infinite() {
        "inf".into()
    } else if r.fract() == 0.0 {
        format!("{r:.1}")
    } else {
        format!("{r}")
    }
}

/// `YYYYmmdd-HHMMSS` in UTC.
fn now_stamp() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

struct Progress {
    done: Arc<AtomicUsize>,
    total: usize,
    enabled: bool,
}

impl Progress {
    fn spawn(self: &Arc<Self>, t0: Instant) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            if !me.enabled {
                return;
            }
            let tty = std::io::stderr().is_terminal();
            let mut last_decile = None;
            loop {
                let d = me.done.load(Ordering::Relaxed);
                let el = t0.elapsed().as_secs_f64();
                let decile = d * 10 / me.total.max(1);
                if tty {
                    eprint!("\r{:>5}/{} requests done [{el:>7.1}s]", d, me.total);
                } else if last_decile != Some(decile) {
                    eprintln!("{d}/{} requests done [{el:.1}s]", me.total);
                    last_decile = Some(decile);
                }
                if d >= me.total {
                    if tty {
                        eprintln!();
                    }
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    }
}

async fn run_async(mut a: ServeBenchArgs) -> anyhow::Result<()> {
    if let Some(l) = a.input_len {
        a.random_input_len = l;
    }
    if let Some(l) = a.output_len {
        a.random_output_len = l;
        a.prefix_repetition_output_len = l;
        a.custom_output_len = l as i64;
    }
    if !(0.0..1.0).contains(&a.random_range_ratio) {
        bail!("--random-range-ratio must be in [0, 1)");
    }
    if a.request_rate.is_nan() || a.request_rate <= 0.0 {
        bail!("--request-rate must be positive (inf for all at once)");
    }
    if a.burstiness.is_nan() || a.burstiness <= 0.0 {
        bail!("A positive burstiness factor is expected, but given {}.", a.burstiness);
    }
    if a.max_concurrency == Some(0) {
        bail!("--max-concurrency must be greater than 0");
    }
    if a.num_prompts == 0 {
        bail!("--num-prompts must be at least 1");
    }
    let percentiles: Vec<f64> = a
        .metric_percentiles
        .split(',')
        .map(|p| p.trim().parse::<f64>().with_context(|| format!("bad percentile `{p}`")))
        .collect::<anyhow::Result<_>>()?;
    let selected: Vec<String> = a.percentile_metrics.split(',').map(|s| s.trim().to_string()).collect();

    let base_url = a.base_url.clone().unwrap_or_else(|| {
        if a.host.contains(':') {
            format!("http://[{}]:{}", a.host, a.port)
        } else {
            format!("http://{}:{}", a.host, a.port)
        }
    });
    let base_url = base_url.trim_end_matches('/').to_string();
    let api_url = format!("{base_url}{}", a.endpoint);
    if !api_url.ends_with("completions") || api_url.ends_with("chat/completions") {
        bail!("OpenAI Completions API URL must end with 'completions' (got {api_url}); chat is not supported");
    }

    let mut headers = reqwest::header::HeaderMap::new();
    if let Ok(key) = std::env::var("OPENAI_API_KEY") {
        if !key.is_empty() {
            headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {key}").parse()?);
        }
    }
    for (k, v) in parse_kv(&a.header, "header")? {
        headers.insert(reqwest::header::HeaderName::from_bytes(k.as_bytes())?, v.parse()?);
    }
    let mut extra = Map::new();
    for (k, v) in [("temperature", a.temperature), ("top_p", a.top_p), ("min_p", a.min_p)] {
        if let Some(v) = v {
            extra.insert(k.into(), json!(v));
        }
    }
    if let Some(k) = a.top_k {
        extra.insert("top_k".into(), json!(k));
    }
    if let Some(s) = &a.extra_body {
        match serde_json::from_str::<Value>(s).context("--extra-body is not JSON")? {
            Value::Object(m) => extra.extend(m),
            _ => bail!("--extra-body must be a JSON object"),
        }
    }
    if !(0.0..=1.0).contains(&a.structured_output_ratio) {
        bail!("--structured-output-ratio must be in [0, 1]");
    }
    let structured_extra = match &a.structured_output_body {
        Some(s) => match serde_json::from_str::<Value>(s).context("--structured-output-body is not JSON")? {
            Value::Object(m) => m,
            _ => bail!("--structured-output-body must be a JSON object"),
        },
        None => match default_structured_body() {
            Value::Object(m) => m,
            _ => unreachable!("a JSON object literal"),
        },
    };
    if a.temperature.is_none() {
        eprintln!(
            "WARNING: no --temperature given: the server's default sampling applies (pass --temperature 0 for greedy)."
        );
    }
    if a.dataset_name == "random" && !a.ignore_eos {
        // As vLLM: random prompts run to their requested length.
        a.ignore_eos = true;
    }

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(a.max_concurrency.unwrap_or(1024))
        // Shorter than common server keep-alive timeouts (llama.cpp's is 5 s), so that a request is never
        // sent on a connection the server is closing.
        .pool_idle_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(6 * 3600))
        .tcp_nodelay(true)
        .build()?;
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(6 * 3600))
        .tcp_nodelay(true)
        .build()?;
    let mut client = Client {
        http,
        fresh,
        api_url: api_url.clone(),
        base_url: base_url.clone(),
        headers,
        model: String::new(),
        extra,
        structured_extra,
        ignore_eos: a.ignore_eos,
    };
    let model_id = match &a.model {
        Some(m) => m.clone(),
        None => {
            eprintln!("Model not specified, fetching first model from server...");
            let m = client.first_model().await?;
            eprintln!("First model name: {m}");
            m
        }
    };
    client.model = a.served_model_name.clone().unwrap_or_else(|| model_id.clone());

    // Dataset.
    let t_ds = Instant::now();
    let mut rng = Rng::new(a.seed);
    let (mut requests, tokenizer_id, mismatch, calls) = if a.dataset_name == "custom" {
        // No word pool to narrow: the prompts are given.
        let mut tok = if a.skip_tokenizer_init { None } else { Tokenizer::probe(&client).await };
        let reqs = custom_dataset(&a, tok.as_mut(), &mut rng).await?;
        let tid = tok.as_ref().map(|t| format!("{base_url}/tokenize ({:?})", t.style));
        (reqs, tid, 0, tok.as_ref().map_or(0, |t| t.calls))
    } else {
        let mut pm = make_prompt_maker(&client, a.skip_tokenizer_init).await;
        let reqs = match a.dataset_name.as_str() {
            "random" => random_dataset(&a, &mut pm, &mut rng).await,
            _ => prefix_repetition_dataset(&a, &mut pm, &mut rng).await?,
        };
        let tid = pm.tok.as_ref().map(|t| format!("{base_url}/tokenize ({:?})", t.style));
        let calls = pm.tok.as_ref().map_or(0, |t| t.calls);
        (reqs, tid, pm.mismatch, calls)
    };
    eprintln!(
        "Dataset: {} {} prompts, {} input tokens in all, made in {:.1}s ({calls} /tokenize calls)",
        requests.len(),
        a.dataset_name,
        requests.iter().map(|r| r.prompt_len).sum::<usize>(),
        t_ds.elapsed().as_secs_f64()
    );
    // Structured requests spread evenly: request i is one when i * ratio crosses an integer.
    let ratio = a.structured_output_ratio;
    for (i, r) in requests.iter_mut().enumerate() {
        r.structured = ((i + 1) as f64 * ratio).floor() > (i as f64 * ratio).floor();
    }
    if ratio > 0.0 {
        eprintln!(
            "Structured output: {} of {} requests",
            requests.iter().filter(|r| r.structured).count(),
            requests.len()
        );
    }
    if mismatch != 0 {
        eprintln!(
            "WARNING: across all prompts there were {} {} tokens than requested after fitting.",
            mismatch.abs(),
            if mismatch > 0 { "more" } else { "fewer" }
        );
    }
    let client = Arc::new(client);

    // Readiness and warm-up.
    let test = requests[0].clone();
    if a.ready_check_timeout_sec > 0 {
        eprintln!("Starting initial single prompt test run...");
        let deadline = Instant::now() + Duration::from_secs(a.ready_check_timeout_sec);
        loop {
            let o = client.send(&test, Instant::now()).await;
            if o.success {
                eprintln!("Initial test run completed.");
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "Initial test run failed - Please make sure benchmark arguments are correctly specified. Error: {}",
                    o.error
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    if a.num_warmups > 0 {
        eprintln!("Warming up with {} requests...", a.num_warmups);
        let sem = Arc::new(tokio::sync::Semaphore::new(a.max_concurrency.unwrap_or(a.num_warmups)));
        let mut tasks = Vec::new();
        for _ in 0..a.num_warmups {
            let (client, test, sem) = (client.clone(), test.clone(), sem.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = sem.acquire_owned().await;
                client.send(&test, Instant::now()).await
            }));
        }
        for t in tasks {
            t.await?;
        }
        eprintln!("Warmup run completed.");
    }

    eprintln!("Starting main benchmark run...");
    let distribution = if a.burstiness == 1.0 { "Poisson process" } else { "Gamma distribution" };
    eprintln!("Traffic request rate: {}", rate_str(a.request_rate));
    eprintln!("Burstiness factor: {:?} ({distribution})", a.burstiness);
    eprintln!("Maximum request concurrency: {}", a.max_concurrency.map_or("None".into(), |c| c.to_string()));

    let mut arrival_rng = Rng::new(a.seed.wrapping_add(1));
    let arrivals = arrival_times(requests.len(), a.request_rate, a.burstiness, &mut arrival_rng);
    let sem = a.max_concurrency.map(|c| Arc::new(tokio::sync::Semaphore::new(c)));
    let done = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(Progress { done: done.clone(), total: requests.len(), enabled: !a.disable_tqdm });
    let t0 = Instant::now();
    let progress_task = progress.spawn(t0);
    let mut tasks = Vec::with_capacity(requests.len());
    for (req, at) in requests.iter().cloned().zip(arrivals) {
        let wait = Duration::from_secs_f64(at).saturating_sub(t0.elapsed());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let (client, sem, done) = (client.clone(), sem.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let arrived = t0.elapsed().as_secs_f64();
            let _permit = match &sem {
                Some(s) => Some(s.clone().acquire_owned().await),
                None => None,
            };
            let mut o = client.send(&req, t0).await;
            o.client_queue_time = o.start_time - arrived;
            done.fetch_add(1, Ordering::Relaxed);
            o
        }));
    }
    let mut outputs = Vec::with_capacity(tasks.len());
    for t in tasks {
        outputs.push(t.await?);
    }
    let duration = t0.elapsed().as_secs_f64();
    progress_task.await?;

    let result = report(&a, &outputs, duration, &selected, &percentiles);

    // Result JSON.
    let stamp = now_stamp();
    let mut rj = Map::new();
    rj.insert("date".into(), json!(stamp));
    rj.insert("endpoint_type".into(), json!(a.backend));
    rj.insert("backend".into(), json!(a.backend));
    rj.insert("label".into(), json!(a.label));
    rj.insert("model_id".into(), json!(model_id));
    rj.insert("tokenizer_id".into(), json!(tokenizer_id));
    rj.insert("num_prompts".into(), json!(a.num_prompts));
    for (k, v) in parse_kv(&a.metadata, "metadata")? {
        rj.insert(k, json!(v));
    }
    rj.insert("request_rate".into(), if a.request_rate.is_infinite() { json!("inf") } else { json!(a.request_rate) });
    rj.insert("burstiness".into(), json!(a.burstiness));
    rj.insert("max_concurrency".into(), json!(a.max_concurrency));
    rj.insert("dataset_name".into(), json!(a.dataset_name));
    rj.extend(result);
    if !a.save_detailed {
        for f in ["input_lens", "output_lens", "start_times", "ttfts", "itls", "generated_texts", "errors"] {
            rj.remove(f);
        }
    }
    if a.save_result || a.result_filename.is_some() {
        let label = a.label.clone().unwrap_or_else(|| a.backend.clone());
        let base_model = model_id.rsplit('/').next().unwrap_or(&model_id).to_string();
        let conc = a.max_concurrency.map(|c| format!("-concurrency{c}")).unwrap_or_default();
        let name = a
            .result_filename
            .clone()
            .unwrap_or_else(|| format!("{label}-{}qps{conc}-{base_model}-{stamp}.json", rate_str(a.request_rate)));
        let path = match &a.result_dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                d.join(name)
            }
            None => PathBuf::from(name),
        };
        std::fs::write(&path, serde_json::to_string(&Value::Object(rj))?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("Results saved to {}", path.display());
    }
    Ok(())
}

/// Computes vLLM's metrics, prints its summary table, and returns the result fields.
fn report(
    a: &ServeBenchArgs,
    outputs: &[RequestOutput],
    dur: f64,
    selected: &[String],
    ps: &[f64],
) -> Map<String, Value> {
    let mut actual_output_lens = Vec::with_capacity(outputs.len());
    let (mut total_input, mut completed) = (0usize, 0usize);
    let (mut ttfts, mut tpots, mut itls, mut e2els) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for o in outputs {
        if o.success {
            let n = o.output_tokens;
            actual_output_lens.push(n);
            total_input += o.prompt_len;
            if let Some(t) = tpot(o.latency, o.ttft, n) {
                tpots.push(t);
            }
            itls.extend_from_slice(&o.itl);
            ttfts.push(o.ttft);
            e2els.push(o.latency);
            completed += 1;
        } else {
            actual_output_lens.push(0);
        }
    }
    let failed: Vec<&RequestOutput> = outputs.iter().filter(|o| !o.success).collect();
    if !failed.is_empty() {
        println!("Failed requests during benchmark run detected (capping to 10):");
        for (i, o) in failed.iter().take(10).enumerate() {
            println!("Error {i}: {}", o.error);
        }
    }
    let resent: usize = outputs.iter().map(|o| o.resent).sum();
    if resent > 0 {
        eprintln!("Note: {resent} request(s) were sent again after their connection closed before any response.");
    }
    if completed == 0 {
        eprintln!("WARNING: All requests failed. This is likely due to a misconfiguration on the benchmark arguments.");
    }
    let total_output: usize = actual_output_lens.iter().sum();
    let intervals: Vec<(f64, f64)> =
        outputs.iter().filter(|o| o.success).map(|o| (o.start_time, o.start_time + o.latency)).collect();
    let max_conc = peak_concurrency(&intervals);
    let peak_tps = peak_tokens_per_s(outputs);

    let mut r = Map::new();
    r.insert("duration".into(), json!(dur));
    r.insert("completed".into(), json!(completed));
    r.insert("failed".into(), json!(failed.len()));
    r.insert("total_input_tokens".into(), json!(total_input));
    r.insert("total_output_tokens".into(), json!(total_output));
    r.insert("request_throughput".into(), json!(completed as f64 / dur));
    r.insert("request_goodput".into(), Value::Null);
    r.insert("output_throughput".into(), json!(total_output as f64 / dur));
    r.insert("total_token_throughput".into(), json!((total_input + total_output) as f64 / dur));
    r.insert("input_lens".into(), json!(outputs.iter().map(|o| o.prompt_len).collect::<Vec<_>>()));
    r.insert("output_lens".into(), json!(actual_output_lens));
    r.insert("ttfts".into(), json!(outputs.iter().map(|o| o.ttft).collect::<Vec<_>>()));
    r.insert("itls".into(), json!(outputs.iter().map(|o| o.itl.clone()).collect::<Vec<_>>()));
    r.insert("latencies".into(), json!(outputs.iter().map(|o| o.latency).collect::<Vec<_>>()));
    r.insert("start_times".into(), json!(outputs.iter().map(|o| o.start_time).collect::<Vec<_>>()));
    r.insert("queue_times".into(), json!(outputs.iter().map(|o| o.client_queue_time).collect::<Vec<_>>()));
    r.insert("generated_texts".into(), json!(outputs.iter().map(|o| o.generated_text.clone()).collect::<Vec<_>>()));
    r.insert("errors".into(), json!(outputs.iter().map(|o| o.error.clone()).collect::<Vec<_>>()));
    r.insert("max_output_tokens_per_s".into(), json!(peak_tps));
    r.insert("max_concurrent_requests".into(), json!(max_conc));
    r.insert("rtfx".into(), json!(0.0));

    println!("{:=^50}", " Serving Benchmark Result ");
    println!("{:<40} {:<10}", "Successful requests:", completed);
    println!("{:<40} {:<10}", "Failed requests:", failed.len());
    if let Some(c) = a.max_concurrency {
        println!("{:<40} {:<10}", "Maximum request concurrency:", c);
    }
    if a.request_rate.is_finite() {
        println!("{:<40} {:<10.2}", "Request rate configured (RPS):", a.request_rate);
    }
    println!("{:<40} {:<10.2}", "Benchmark duration (s):", dur);
    println!("{:<40} {:<10}", "Total input tokens:", total_input);
    println!("{:<40} {:<10}", "Total generated tokens:", total_output);
    println!("{:<40} {:<10.2}", "Request throughput (req/s):", completed as f64 / dur);
    println!("{:<40} {:<10.2}", "Output token throughput (tok/s):", total_output as f64 / dur);
    println!("{:<40} {:<10.2}", "Peak output token throughput (tok/s):", peak_tps);
    println!("{:<40} {:<10.2}", "Peak concurrent requests:", max_conc as f64);
    println!("{:<40} {:<10.2}", "Total token throughput (tok/s):", (total_input + total_output) as f64 / dur);

    let queue: Vec<f64> = outputs.iter().filter(|o| o.success).map(|o| o.client_queue_time).collect();
    let metrics: [(&str, &str, &str, &[f64]); 5] = [
        ("ttft", "TTFT", "Time to First Token", &ttfts),
        ("tpot", "TPOT", "Time per Output Token (excl. 1st token)", &tpots),
        ("itl", "ITL", "Inter-token Latency", &itls),
        ("e2el", "E2EL", "End-to-end Latency", &e2els),
        ("client_queue_time", "Client Queue Time", "Client-side Queueing", &queue),
    ];
    for (attr, name, header, values) in metrics {
        if !selected.iter().any(|s| s == attr) {
            continue;
        }
        if attr == "client_queue_time" && a.max_concurrency.is_none() {
            continue;
        }
        let s = stats_ms(values, ps);
        println!("{header:-^50}");
        println!("{:<40} {:<10.2}", format!("Mean {name} (ms):"), s.mean);
        println!("{:<40} {:<10.2}", format!("Median {name} (ms):"), s.median);
        r.insert(format!("mean_{attr}_ms"), json!(s.mean));
        r.insert(format!("median_{attr}_ms"), json!(s.median));
        r.insert(format!("std_{attr}_ms"), json!(s.std));
        for (p, v) in s.percentiles {
            let w = p_word(p);
            println!("{:<40} {:<10.2}", format!("P{w} {name} (ms):"), v);
            r.insert(format!("p{w}_{attr}_ms"), json!(v));
        }
    }
    println!("{}", "=".repeat(50));
    r
}

/// The default structured-output fields: an OpenAI `response_format` JSON schema of a person record whose
/// biography must be long (`minLength` 600), so the grammar stays active for a whole 128-token output:
/// a schema that completes early would end in EOS-only steps whose empty text skips streaming and
/// detokenization work, and flatter the constrained side.
fn default_structured_body() -> Value {
    json!({"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 8, "maxLength": 32},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "biography": {"type": "string", "minLength": 600},
        },
        "required": ["name", "age", "biography"],
        "additionalProperties": false,
    }}}})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn percentiles_match_numpy_linear() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert!(close(percentile(&v, 99.0), 3.97, 1e-12));
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 4.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
        // np.percentile(range(1, 101), 99) == 99.01
        let h: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!(close(percentile(&h, 99.0), 99.01, 1e-9));
    }

    #[test]
    fn stats_in_ms_with_population_std() {
        let s = stats_ms(&[0.003, 0.001, 0.002], &[50.0, 99.0]);
        assert!(close(s.mean, 2.0, 1e-9));
        assert!(close(s.median, 2.0, 1e-9));
        assert!(close(s.std, (2.0f64 / 3.0).sqrt(), 1e-9)); // np.std([1,2,3])
        assert!(close(s.percentiles[1].1, 2.98, 1e-9));
        let e = stats_ms(&[], &[99.0]);
        assert_eq!((e.mean, e.median, e.std, e.percentiles[0].1), (0.0, 0.0, 0.0, 0.0));
    }

    #[test]
    fn tpot_excludes_the_first_token() {
        // 10 tokens: first at 100 ms, last at 1000 ms -> 9 gaps of 100 ms.
        assert!(close(tpot(1.0, 0.1, 10).unwrap(), 0.1, 1e-12));
        assert_eq!(tpot(0.5, 0.5, 1), None);
        assert_eq!(tpot(0.5, 0.5, 0), None);
    }

    #[test]
    fn itl_is_the_gaps_between_chunks() {
        let (ttft, itl) = ttft_and_itl(&[0.25, 0.30, 0.40, 0.45]).unwrap();
        assert_eq!(ttft, 0.25);
        let want = [0.05, 0.10, 0.05];
        assert_eq!(itl.len(), 3);
        assert!(itl.iter().zip(want).all(|(a, b)| close(*a, b, 1e-12)));
        assert!(ttft_and_itl(&[]).is_none());
        // TPOT equals the mean ITL when every chunk is one token.
        let e2el = 0.45;
        assert!(close(tpot(e2el, ttft, 4).unwrap(), mean(&itl), 1e-12));
    }

    #[test]
    fn poisson_arrivals_have_mean_gap_one_over_rate() {
        let mut rng = Rng::new(7);
        let (rate, n) = (4.0, 200_000);
        let gaps: Vec<f64> = (0..n).map(|_| rng.gamma(1.0, 1.0 / rate)).collect();
        let m = mean(&gaps);
        assert!(close(m, 0.25, 0.005), "mean gap {m}");
        // Exponential: the standard deviation equals the mean.
        assert!(close(std_dev(&gaps), 0.25, 0.01));
    }

    #[test]
    fn gamma_arrivals_keep_the_mean_and_scale_the_variance() {
        for b in [0.5, 2.0, 4.0] {
            let mut rng = Rng::new(11);
            let rate = 2.0;
            let gaps: Vec<f64> = (0..200_000).map(|_| rng.gamma(b, 1.0 / (rate * b))).collect();
            let (m, v) = (mean(&gaps), std_dev(&gaps).powi(2));
            assert!(close(m, 0.5, 0.01), "burstiness {b}: mean {m}");
            // Var = shape * scale^2 = 1 / (rate^2 * burstiness).
            let want = 1.0 / (rate * rate * b);
            assert!((v - want).abs() / want < 0.05, "burstiness {b}: var {v} want {want}");
        }
    }

    #[test]
    fn arrival_schedule_is_normalized_like_vllm() {
        let mut rng = Rng::new(3);
        let t = arrival_times(100, 10.0, 1.0, &mut rng);
        assert_eq!(t.len(), 100);
        assert!(close(*t.last().unwrap(), 10.0, 1e-9));
        assert!(t.windows(2).all(|w| w[1] >= w[0]));
        assert!(arrival_times(5, f64::INFINITY, 1.0, &mut rng).iter().all(|&x| x == 0.0));
        let c = arrival_times(4, 2.0, f64::INFINITY, &mut rng);
        assert!(c.iter().zip([0.5, 1.0, 1.5, 2.0]).all(|(a, b)| close(*a, b, 1e-12)));
    }

    #[test]
    fn sse_parser_handles_split_chunks_and_crlf() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: {\"a\":").is_empty());
        assert_eq!(p.push(b"1}\n\ndata: [DONE]\n"), vec!["{\"a\":1}"]);
        assert_eq!(p.push(b"\n: ping\n\ndata:{\"b\":2}\r\n\r\n"), vec!["[DONE]", "{\"b\":2}"]);
        assert!(p.push(b"data: {\"c\":3}").is_empty());
        assert_eq!(p.finish(), vec!["{\"c\":3}"]);
        assert!(p.finish().is_empty());
    }

    #[test]
    fn peak_concurrency_uses_half_open_intervals() {
        assert_eq!(peak_concurrency(&[(0.0, 1.0), (1.0, 2.0)]), 1);
        assert_eq!(peak_concurrency(&[(0.0, 2.0), (1.0, 3.0), (1.5, 1.6)]), 3);
        assert_eq!(peak_concurrency(&[]), 0);
    }

    #[test]
    fn peak_tokens_counts_chunks_per_second() {
        let o = |start: f64, ttft: f64, itl: Vec<f64>| RequestOutput {
            success: true,
            start_time: start,
            ttft,
            latency: ttft + itl.iter().sum::<f64>(),
            itl,
            ..Default::default()
        };
        let outs = vec![o(0.0, 0.1, vec![0.1; 5]), o(0.0, 0.2, vec![0.1; 3]), o(1.5, 0.1, vec![0.1; 2])];
        // First second: 6 chunks of the first request (0.1..0.6) + 4 of the second (0.2..0.5).
        assert_eq!(peak_tokens_per_s(&outs), 10.0);
    }

    #[test]
    fn lengths_follow_the_range_ratio() {
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            let l = sample_lens(&mut rng, 100, 0.25, 1);
            assert!((75..=125).contains(&l));
        }
        assert_eq!(sample_lens(&mut rng, 128, 0.0, 1), 128);
        assert_eq!(sample_lens(&mut rng, 0, 0.0, 1), 1);
    }

    #[test]
    fn prompts_without_a_tokenizer_take_one_word_per_token() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut pm = PromptMaker { pool: word_pool(), tok: None, mismatch: 0 };
        let mut rng = Rng::new(0);
        let (prefix, n) = rt.block_on(pm.fit(&mut rng, "", 0, 16));
        assert_eq!((prefix.split(' ').count(), n), (16, 16));
        let (full, n) = rt.block_on(pm.fit(&mut rng, &prefix, 16, 40));
        assert!(full.starts_with(&format!("{prefix} ")));
        assert_eq!((full.split(' ').count(), n), (40, 40));
    }

    #[test]
    fn custom_jsonl_takes_prompts_and_optional_output_tokens() {
        let text =
            "{\"prompt\": \"What is the capital of India?\"}\n\n{\"prompt\": \"Hi\", \"output_tokens\": 7, \"x\": 1}\n";
        let e = parse_custom_jsonl(text).unwrap();
        assert_eq!(
            e,
            vec![
                CustomEntry { prompt: "What is the capital of India?".into(), output_tokens: None },
                CustomEntry { prompt: "Hi".into(), output_tokens: Some(7) },
            ]
        );
        // The flag wins; -1 takes the line's count and needs one.
        assert_eq!(custom_output_len(256, &e[0]).unwrap(), 256);
        assert_eq!(custom_output_len(-1, &e[1]).unwrap(), 7);
        assert!(custom_output_len(-1, &e[0]).unwrap_err().to_string().contains("output_tokens"));
        assert!(custom_output_len(0, &e[1]).is_err());
        // Errors name the line.
        let err = parse_custom_jsonl("{\"prompt\": \"a\"}\n{\"text\": \"b\"}\n").unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("'prompt'"), "{err}");
        let err = parse_custom_jsonl("{\"prompt\": \"a\", \"output_tokens\": -3}").unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("output_tokens"), "{err}");
        assert!(parse_custom_jsonl("\n").is_err());
    }

    #[test]
    fn custom_selection_keeps_order_without_shuffle_and_oversamples() {
        let entries: Vec<CustomEntry> =
            (0..5).map(|i| CustomEntry { prompt: format!("p{i}"), output_tokens: None }).collect();
        let names = |v: &[CustomEntry]| v.iter().map(|e| e.prompt.clone()).collect::<Vec<_>>();
        let mut rng = Rng::new(0);
        assert_eq!(names(&select_custom(entries.clone(), 3, false, &mut rng)), ["p0", "p1", "p2"]);
        // Shuffled: a permutation, the same for the same seed.
        let a = select_custom(entries.clone(), 5, true, &mut Rng::new(4));
        let b = select_custom(entries.clone(), 5, true, &mut Rng::new(4));
        assert_eq!(a, b);
        let mut sorted = names(&a);
        sorted.sort();
        assert_eq!(sorted, names(&entries));
        // More prompts than lines: the file first, then repeats of its lines.
        let c = select_custom(entries.clone(), 8, false, &mut rng);
        assert_eq!(c.len(), 8);
        assert_eq!(names(&c[..5]), names(&entries));
        assert!(c[5..].iter().all(|e| entries.contains(e)));
    }

    #[test]
    fn date_stamp_shape() {
        let s = now_stamp();
        assert_eq!(s.len(), 15);
        assert_eq!(&s[8..9], "-");
        assert!(s.starts_with("20"));
        assert_eq!(rate_str(f64::INFINITY), "inf");
        assert_eq!(rate_str(4.0), "4.0");
        assert_eq!(rate_str(2.5), "2.5");
        assert_eq!(p_word(99.0), "99");
        assert_eq!(p_word(99.9), "99.9");
    }
}
