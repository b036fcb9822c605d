//! The `ironllm` binary: flags in, validated configs out, then one of the subcommands.

mod args;
mod bench;
mod generate;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ironllm", version, about = "A Rust LLM inference and serving engine, drop-in for vLLM")]
struct Cli {
    /// Log level (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "info", env = "IRONLLM_LOG_LEVEL")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate offline for a batch of prompts (JSONL in, JSONL out).
    Generate(generate::GenerateArgs),
    /// Serve the OpenAI-compatible API (a drop-in for `vllm serve`).
    Serve(serve::ServeArgs),
    /// Benchmarks (latency, throughput), as `vllm bench`.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    let result = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Bench(c) => bench::run(c),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
