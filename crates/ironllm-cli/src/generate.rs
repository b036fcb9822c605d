//! `ironllm generate`: offline batch generation. Prompts come from `--prompt` flags or a JSONL file
//! (`{"prompt": "..."}`, `{"prompt_token_ids": [...]}` or `{"messages": [...]}`, each line optionally
//! with its own sampling fields using vLLM's names); results are written as JSONL, one line per prompt,
//! in input order.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use ironllm::{Prompt, SamplingParams, LLM};
use ironllm_core::structured::{StructuredConstraint, StructuredOutputsParams};
use serde_json::{json, Value};

use crate::args::EngineFlags;

/// Flags of `ironllm generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model: a Hugging Face directory or a .gguf file (default: SmolLM2-135M-Instruct).
    pub model: Option<PathBuf>,
    /// A prompt (repeatable).
    #[arg(long = "prompt", short = 'p')]
    pub prompts: Vec<String>,
    /// A JSONL file of prompts.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Where to write JSONL results (default: standard output).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Wrap each text prompt as a user message and apply the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub top_k: Option<i32>,
    #[arg(long)]
    pub min_p: Option<f32>,
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    /// Per-request seed.
    #[arg(long = "sampling-seed")]
    pub sampling_seed: Option<u64>,
    #[arg(long)]
    pub logprobs: Option<usize>,
    #[arg(long)]
    pub ignore_eos: bool,
    /// A stop string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print only the generated text of each prompt instead of JSONL.
    #[arg(long)]
    pub text: bool,
    #[command(flatten)]
    pub engine: EngineFlags,
}

/// Applies vLLM-named sampling fields of a JSON object onto `p`.
pub fn apply_json_params(p: &mut SamplingParams, v: &Value) -> anyhow::Result<()> {
    let Some(obj) = v.as_object() else { return Ok(()) };
    let mut merged = serde_json::to_value(&*p)?;
    let known = [
        "n",
        "best_of",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "max_tokens",
        "min_tokens",
        "logprobs",
        "prompt_logprobs",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "include_stop_str_in_output",
        "logit_bias",
        "allowed_token_ids",
        "bad_words",
    ];
    for (k, val) in obj {
        if known.contains(&k.as_str()) {
            merged[k] = val.clone();
        }
    }
    *p = serde_json::from_value(merged).context("invalid sampling fields")?;
    if let Some(structured) = structured_outputs_of(obj)? {
        p.structured_outputs = Some(structured);
    }
    Ok(())
}

/// vLLM's `structured_outputs` object (`json`, `regex`, `choice`, `grammar`, `json_object`, with
/// `disable_any_whitespace` / `disable_additional_properties`) or a legacy `guided_*` field of one line.
fn structured_outputs_of(obj: &serde_json::Map<String, Value>) -> anyhow::Result<Option<StructuredOutputsParams>> {
    let constraint_of = |key: &str, v: &Value| -> anyhow::Result<Option<StructuredConstraint>> {
        Ok(match key {
            "json" => Some(StructuredConstraint::Json(match v {
                Value::String(text) => serde_json::from_str(text).context("`json` is not valid JSON")?,
                other => other.clone(),
            })),
            "regex" => Some(StructuredConstraint::Regex(v.as_str().context("`regex` must be a string")?.to_string())),
            "choice" => Some(StructuredConstraint::Choice(
                serde_json::from_value(v.clone()).context("`choice` must be a list of strings")?,
            )),
            "grammar" => {
                Some(StructuredConstraint::Grammar(v.as_str().context("`grammar` must be a string")?.to_string()))
            }
            "json_object" if v.as_bool() == Some(true) => Some(StructuredConstraint::JsonObject),
            _ => None,
        })
    };
    if let Some(so) = obj.get("structured_outputs").and_then(Value::as_object) {
        let mut found = None;
        for (k, v) in so {
            if let Some(c) = constraint_of(k, v)? {
                anyhow::ensure!(found.is_none(), "`structured_outputs` holds more than one constraint");
                found = Some((k.clone(), c));
            }
        }
        let Some((key, constraint)) = found else { anyhow::bail!("`structured_outputs` holds no constraint") };
        let mut params = StructuredOutputsParams::new(constraint);
        params.disable_any_whitespace = so.get("disable_any_whitespace").and_then(Value::as_bool).unwrap_or(false);
        params.disable_additional_properties =
            so.get("disable_additional_properties").and_then(Value::as_bool).unwrap_or(false);
        params.field = format!("structured_outputs.{key}");
        return Ok(Some(params));
    }
    for key in ["json", "regex", "choice", "grammar"] {
        if let Some(v) = obj.get(&format!("guided_{key}")) {
            let constraint = constraint_of(key, v)?.context("unreachable: a known key")?;
            let mut params = StructuredOutputsParams::new(constraint);
            params.field = format!("guided_{key}");
            return Ok(Some(params));
        }
    }
    Ok(None)
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let engine_args = args.engine.to_engine_args(args.model.clone())?;
    let mut llm = LLM::new(engine_args)?;
    let mut base = llm.default_sampling_params();
    base.max_tokens = Some(args.max_tokens);
    base.n = args.n;
    base.seed = args.sampling_seed;
    base.logprobs = args.logprobs;
    base.ignore_eos = args.ignore_eos;
    base.stop = args.stop.clone();
    if let Some(t) = args.temperature {
        base.temperature = t;
    }
    if let Some(t) = args.top_p {
        base.top_p = t;
    }
    if let Some(k) = args.top_k {
        base.top_k = k;
    }
    if let Some(m) = args.min_p {
        base.min_p = m;
    }
    if let Some(r) = args.repetition_penalty {
        base.repetition_penalty = r;
    }

    let mut inputs: Vec<Value> = args.prompts.iter().map(|p| json!({ "prompt": p })).collect();
    if let Some(path) = &args.input {
        let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let v: Value =
                serde_json::from_str(&line).with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
            inputs.push(v);
        }
    }
    if inputs.is_empty() {
        bail!("no prompts: give --prompt TEXT or --input FILE.jsonl");
    }
    let template = llm.engine().chat_template().map(str::to_string);
    let tokenizer = llm.engine().tokenizer().cloned();
    let mut prompts = Vec::with_capacity(inputs.len());
    let mut params = Vec::with_capacity(inputs.len());
    let mut priorities = Vec::with_capacity(inputs.len());
    for (i, v) in inputs.iter().enumerate() {
        priorities.push(v.get("priority").and_then(Value::as_i64).unwrap_or(0) as i32);
        let mut p = base.clone();
        apply_json_params(&mut p, v).with_context(|| format!("prompt {}", i + 1))?;
        let messages = match (v.get("messages"), v.get("prompt")) {
            (Some(m), _) => Some(m.clone()),
            (None, Some(Value::String(s))) if args.chat => Some(json!([{ "role": "user", "content": s }])),
            _ => None,
        };
        let prompt = if let Some(messages) = messages {
            let source = template.as_deref().context("the model has no chat template")?;
            let tok = tokenizer.as_ref().context("chat needs a tokenizer")?;
            let ct = ironllm_model::chat_template::ChatTemplate::new(
                source,
                tok.bos_token().map(str::to_string),
                tok.eos_token().map(str::to_string),
            )?;
            Prompt::Text(ct.render(&messages, true, &serde_json::Map::new())?)
        } else if let Some(Value::String(s)) = v.get("prompt") {
            Prompt::Text(s.clone())
        } else if let Some(ids) = v.get("prompt_token_ids") {
            Prompt::Tokens(
                serde_json::from_value(ids.clone()).context("`prompt_token_ids` must be a list of token ids")?,
            )
        } else {
            bail!("prompt {}: needs `prompt`, `prompt_token_ids` or `messages`", i + 1);
        };
        prompts.push(prompt);
        params.push(p);
    }
    let started = std::time::Instant::now();
    let outputs = llm.generate_with_priority(&prompts, &params, &priorities)?;
    let elapsed = started.elapsed().as_secs_f64();
    let mut sink: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?),
        None => Box::new(std::io::stdout().lock()),
    };
    let (mut n_in, mut n_out) = (0usize, 0usize);
    for (input, out) in inputs.iter().zip(&outputs) {
        n_in += out.prompt_token_ids.len();
        n_out += out.outputs.iter().map(|o| o.token_ids.len()).sum::<usize>();
        if args.text {
            for o in &out.outputs {
                writeln!(sink, "{}", o.text)?;
            }
            continue;
        }
        let outs: Vec<Value> = out
            .outputs
            .iter()
            .map(|o| {
                json!({
                    "index": o.index,
                    "text": o.text,
                    "token_ids": o.token_ids,
                    "finish_reason": o.finish_reason.map(|r| r.as_str()),
                    "stop_reason": match &o.stop_reason {
                        Some(ironllm_core::outputs::StopReason::TokenId(t)) => json!(t),
                        Some(ironllm_core::outputs::StopReason::String(s)) => json!(s),
                        _ => Value::Null,
                    },
                    "cumulative_logprob": o.cumulative_logprob,
                    "logprobs": o.logprobs.as_ref().map(|lps| lps.iter().map(|lp| json!({
                        "token_id": lp.chosen.token_id, "logprob": lp.chosen.logprob, "rank": lp.chosen.rank,
                        "top": lp.top.iter().map(|t| json!([t.token_id, t.logprob])).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>()),
                })
            })
            .collect();
        let line = json!({
            "prompt": input.get("prompt").cloned().unwrap_or(Value::Null),
            "prompt_token_ids": out.prompt_token_ids,
            "num_cached_tokens": out.num_cached_tokens,
            "outputs": outs,
        });
        writeln!(sink, "{line}")?;
    }
    sink.flush()?;
    tracing::info!(
        "generated {} prompts in {:.2}s: {} prompt tokens, {} output tokens ({:.1} output tok/s)",
        outputs.len(),
        elapsed,
        n_in,
        n_out,
        n_out as f64 / elapsed.max(1e-9)
    );
    Ok(())
}
