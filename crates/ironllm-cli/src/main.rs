//! The `ironllm` binary: flags in, validated configs out, then one of the subcommands.

mod args;
mod bench;
mod generate;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ironllm", version, about = "A Rust LLM inference and serving engine, drop-in for vLLM")]
struct Cli {
    /// Log level (error, warn, info, debug, trace, or tracing directives such as `info,ironllm_cuda=debug`).
    /// Default: vLLM's `VLLM_LOGGING_LEVEL` (DEBUG, INFO, WARNING, ERROR, CRITICAL) where set, else info.
    #[arg(long, global = true, env = "IRONLLM_LOG_LEVEL")]
    log_level: Option<String>,
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

/// The log filter: `--log-level` (or `IRONLLM_LOG_LEVEL`), else vLLM's `VLLM_LOGGING_LEVEL` mapped to its
/// tracing level, else info. A value neither understands is an error, not a silent info.
fn log_filter(flag: Option<&str>, vllm_level: Option<&str>) -> Result<tracing_subscriber::EnvFilter, String> {
    let directives = match (flag, vllm_level) {
        (Some(flag), _) => flag.to_string(),
        (None, Some(level)) => match level.trim().to_ascii_uppercase().as_str() {
            "DEBUG" => "debug".into(),
            "INFO" => "info".into(),
            "WARNING" | "WARN" => "warn".into(),
            "ERROR" | "CRITICAL" => "error".into(),
            other => {
                return Err(format!("VLLM_LOGGING_LEVEL={other}: expected DEBUG, INFO, WARNING, ERROR or CRITICAL"))
            }
        },
        (None, None) => "info".into(),
    };
    // EnvFilter takes a bare word as a target name; only a level or target=level directives are meant here.
    let valid = !directives.trim().is_empty()
        && directives.split(',').all(|d| {
            let level = d.rsplit_once('=').map_or(d, |(_, l)| l).trim().to_ascii_lowercase();
            ["error", "warn", "info", "debug", "trace", "off"].contains(&level.as_str())
        });
    let filter = valid.then(|| tracing_subscriber::EnvFilter::try_new(&directives).ok()).flatten();
    filter.ok_or_else(|| {
        format!("--log-level {directives}: expected error, warn, info, debug, trace or directives like info,ironllm_cuda=debug")
    })
}

fn main() {
    let cli = Cli::parse();
    let vllm_level = std::env::var("VLLM_LOGGING_LEVEL").ok();
    let filter = match log_filter(cli.log_level.as_deref(), vllm_level.as_deref()) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
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

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn log_levels_come_from_the_flag_then_vllms_variable_and_bad_ones_are_errors() {
        let show = |flag, vllm| log_filter(flag, vllm).map(|f| f.to_string());
        assert_eq!(show(None, None).as_deref(), Ok("info"));
        assert_eq!(show(Some("warn"), Some("DEBUG")).as_deref(), Ok("warn"));
        assert_eq!(show(None, Some("WARNING")).as_deref(), Ok("warn"));
        assert_eq!(show(None, Some("critical")).as_deref(), Ok("error"));
        assert_eq!(show(None, Some("debug")).as_deref(), Ok("debug"));
        assert!(show(Some("info,ironllm_cuda=debug"), None).is_ok());
        assert!(show(Some("verbose"), None).unwrap_err().contains("--log-level verbose"));
        assert!(show(Some(""), None).is_err());
        assert!(show(Some("ironllm_cuda=loud"), None).is_err());
        assert!(show(None, Some("LOUD")).unwrap_err().contains("VLLM_LOGGING_LEVEL"));
    }
}
