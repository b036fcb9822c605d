//! `ironllm bench latency|throughput`: offline benchmarks shaped like `vllm bench`, over random token
//! prompts (vLLM's "random" dataset), run through the same engine as every other entry point.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};
use ironllm::{Prompt, SamplingParams, LLM};
use serde_json::json;

use crate::args::EngineFlags;

#[path = "bench_serve.rs"]
pub mod serve;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Latency of one batch end to end.
    Latency(LatencyArgs),
    /// Offline throughput over many requests.
    Throughput(ThroughputArgs),
    /// Online serving benchmark against an OpenAI-compatible server, as `vllm bench serve`.
    Serve(Box<serve::ServeBenchArgs>),
}

#[derive(Debug, Args)]
pub struct LatencyArgs {
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub input_len: usize,
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 2)]
    pub num_iters_warmup: usize,
    #[arg(long, default_value_t = 5)]
    pub num_iters: usize,
    /// Write results as JSON here.
    #[arg(long)]
    pub output_json: Option<PathBuf>,
    #[command(flatten)]
    pub engine: EngineFlags,
}

#[derive(Debug, Args)]
pub struct ThroughputArgs {
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    #[arg(long, default_value_t = 64)]
    pub num_prompts: usize,
    /// Lengths vary uniformly in [len * (1 - r), len * (1 + r)].
    #[arg(long, default_value_t = 0.0)]
    pub random_range_ratio: f64,
    /// A shared prefix of this many tokens before each random prompt.
    #[arg(long, default_value_t = 0)]
    pub prefix_len: usize,
    #[arg(long)]
    pub output_json: Option<PathBuf>,
    #[command(flatten)]
    pub engine: EngineFlags,
}

/// SplitMix64: reproducible random prompts without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Random token ids, avoiding the lowest ids (special tokens in most vocabularies).
fn random_tokens(rng: &mut Rng, len: usize, vocab: usize) -> Vec<u32> {
    let lo = 100.min(vocab / 2);
    (0..len).map(|_| (lo + rng.below(vocab - lo)) as u32).collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

fn fixed_params(output_len: usize) -> SamplingParams {
    SamplingParams { ignore_eos: true, temperature: 1.0, top_p: 1.0, ..SamplingParams::greedy(output_len) }
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Latency(a) => latency(a),
        BenchCommand::Throughput(a) => throughput(a),
        BenchCommand::Serve(a) => serve::run(*a),
    }
}

fn latency(a: LatencyArgs) -> anyhow::Result<()> {
    let mut llm = LLM::new(a.engine.to_engine_args(a.model.clone())?)?;
    let vocab = llm.engine().info().config.vocab_size;
    let mut rng = Rng(0);
    let params = fixed_params(a.output_len);
    let mut times = Vec::new();
    for it in 0..a.num_iters_warmup + a.num_iters {
        // Fresh random prompts every iteration so the prefix cache cannot help.
        let prompts: Vec<Prompt> =
            (0..a.batch_size).map(|_| Prompt::Tokens(random_tokens(&mut rng, a.input_len, vocab))).collect();
        let t0 = Instant::now();
        llm.generate(&prompts, &params)?;
        let dt = t0.elapsed().as_secs_f64();
        if it >= a.num_iters_warmup {
            times.push(dt);
            eprintln!("iteration {}/{}: {dt:.3}s", it + 1 - a.num_iters_warmup, a.num_iters);
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(|x, y| x.total_cmp(y));
    let avg = times.iter().sum::<f64>() / times.len().max(1) as f64;
    println!("Avg latency: {avg:.4} seconds");
    for p in [10.0, 25.0, 50.0, 75.0, 90.0, 99.0] {
        println!("{p:.0}% percentile latency: {:.4} seconds", percentile(&sorted, p));
    }
    let out_tok = (a.batch_size * a.output_len) as f64;
    println!("Output tokens/s (batch {}): {:.1}", a.batch_size, out_tok / avg);
    let spec = spec_summary(&llm);
    if let Some(path) = &a.output_json {
        let v = json!({
            "avg_latency": avg,
            "latencies": times,
            "percentiles": {"10": percentile(&sorted, 10.0), "25": percentile(&sorted, 25.0), "50": percentile(&sorted, 50.0),
                            "75": percentile(&sorted, 75.0), "90": percentile(&sorted, 90.0), "99": percentile(&sorted, 99.0)},
            "spec_decoding": spec,
        });
        std::fs::write(path, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

/// Prints and returns speculative decoding's acceptance over the whole run (warm-up included), or
/// `null` when no draft was verified.
fn spec_summary(llm: &LLM) -> serde_json::Value {
    let s = llm.engine().stats().spec_decoding;
    if s.num_drafts == 0 {
        return serde_json::Value::Null;
    }
    let rate = s.num_accepted_tokens as f64 / s.num_draft_tokens.max(1) as f64;
    let mean_len = 1.0 + s.num_accepted_tokens as f64 / s.num_drafts as f64;
    println!(
        "Speculative decoding: {} drafts, {} draft tokens, {} accepted ({:.1}%), mean acceptance length {mean_len:.2}",
        s.num_drafts,
        s.num_draft_tokens,
        s.num_accepted_tokens,
        100.0 * rate
    );
    json!({
        "num_drafts": s.num_drafts, "num_draft_tokens": s.num_draft_tokens,
        "num_accepted_tokens": s.num_accepted_tokens, "acceptance_rate": rate, "mean_acceptance_length": mean_len,
        "num_accepted_tokens_per_pos": s.num_accepted_tokens_per_pos,
    })
}

fn throughput(a: ThroughputArgs) -> anyhow::Result<()> {
    if !(0.0..1.0).contains(&a.random_range_ratio) {
        anyhow::bail!("--random-range-ratio must be in [0, 1)");
    }
    let mut llm = LLM::new(a.engine.to_engine_args(a.model.clone())?)?;
    let vocab = llm.engine().info().config.vocab_size;
    let mut rng = Rng(42);
    let prefix = random_tokens(&mut rng, a.prefix_len, vocab);
    let scaled = |rng: &mut Rng, len: usize| -> usize {
        let lo = ((len as f64) * (1.0 - a.random_range_ratio)).floor() as usize;
        let hi = ((len as f64) * (1.0 + a.random_range_ratio)).ceil() as usize;
        (lo + rng.below(hi - lo + 1)).max(1)
    };
    let mut prompts = Vec::with_capacity(a.num_prompts);
    let mut params = Vec::with_capacity(a.num_prompts);
    let (mut n_in, mut n_out) = (0usize, 0usize);
    for _ in 0..a.num_prompts {
        let mut p = prefix.clone();
        let in_len = scaled(&mut rng, a.input_len);
        p.extend(random_tokens(&mut rng, in_len, vocab));
        let out_len = scaled(&mut rng, a.output_len);
        n_in += p.len();
        n_out += out_len;
        prompts.push(Prompt::Tokens(p));
        params.push(fixed_params(out_len));
    }
    let t0 = Instant::now();
    let outs = llm.generate_each(&prompts, &params)?;
    let dt = t0.elapsed().as_secs_f64();
    let produced: usize = outs.iter().map(|o| o.outputs[0].token_ids.len()).sum();
    debug_assert_eq!(produced, n_out);
    println!(
        "Throughput: {:.2} requests/s, {:.2} total tokens/s, {:.2} output tokens/s",
        a.num_prompts as f64 / dt,
        (n_in + produced) as f64 / dt,
        produced as f64 / dt
    );
    println!("Total num prompt tokens:  {n_in}");
    println!("Total num output tokens:  {produced}");
    println!("Elapsed: {dt:.2}s");
    // Ours, not vLLM's: each preemption recomputes the request, so it explains a slow run.
    let num_preemptions = llm.engine().stats().num_preemptions;
    println!("Preemptions: {num_preemptions}");
    let spec = spec_summary(&llm);
    if let Some(path) = &a.output_json {
        let v = json!({
            "elapsed_time": dt, "num_requests": a.num_prompts, "total_num_tokens": n_in + produced,
            "requests_per_second": a.num_prompts as f64 / dt, "tokens_per_second": (n_in + produced) as f64 / dt,
            "output_tokens_per_second": produced as f64 / dt, "num_preemptions": num_preemptions,
            "spec_decoding": spec,
        });
        std::fs::write(path, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}
