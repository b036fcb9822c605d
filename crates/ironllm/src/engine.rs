//! The synchronous engine every entry point drives, in two sides (vLLM V1's API process / engine core
//! process split):
//!
//! - the frontend side: [`InputProcessor`] (tokenize, resolve and validate sampling parameters, fan out
//!   `n` / `best_of` into child [`Request`]s) and [`OutputStage`] (the tokenizer and the
//!   [`OutputProcessor`]: incremental detokenization, stop strings, [`RequestOutput`]s);
//! - the engine-core side: [`Core`] (add child requests, abort, finish by stop string, step to
//!   token-level [`EngineCoreOutput`]s, stats). It holds no tokenizer and never sees text.
//!
//! [`Engine`] composes the three on one thread: the offline [`crate::LLM`] calls [`Engine::step`] in a
//! loop. The server takes the parts apart ([`Engine::into_parts`]) and runs [`Core`] on the engine
//! thread and the frontend side elsewhere.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ironllm_core::engine::EngineCore;
use ironllm_core::executor::ModelExecutor;
use ironllm_core::ngram_proposer::NgramProposer;
use ironllm_core::output_processor::{child_request_id, OutputKind, OutputProcessor, ProcessResult, RequestOutput};
use ironllm_core::outputs::{EngineCoreOutput, FinishReason, StopReason};
use ironllm_core::request::{Request, RequestStatus};
use ironllm_core::scheduler::{SchedulerConfig, SchedulingPolicy};
use ironllm_core::spec_decode::{SpeculativeConfig, SpeculativeMethod};
use ironllm_core::{SamplingParams, SchedulerStats};
use ironllm_model::config::ModelConfig;
use ironllm_model::generation_config::GenerationDefaults;
use ironllm_model::llama::{KvCache, LlamaModel};
use ironllm_model::loader::{self, KvCacheDType, LoadFormat, LoadOptions, PreparedModel};
use ironllm_model::proposer::{DraftModel, Proposer};
use ironllm_model::runner::CpuModelRunner;
use ironllm_model::structured::{StructuredOutputCompiler, DEFAULT_COMPILE_TIMEOUT};
use ironllm_model::tokenizer::Tokenizer;

use crate::default_model::ensure_default_model;
use crate::engine_args::{Device, DEFAULT_CPU_KV_CACHE_BYTES};
use crate::{EngineArgs, LlmError};

/// A prompt as text or as token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

impl From<&str> for Prompt {
    fn from(s: &str) -> Prompt {
        Prompt::Text(s.to_string())
    }
}

impl From<String> for Prompt {
    fn from(s: String) -> Prompt {
        Prompt::Text(s)
    }
}

impl From<Vec<u32>> for Prompt {
    fn from(t: Vec<u32>) -> Prompt {
        Prompt::Tokens(t)
    }
}

/// Who drives the engine; picks vLLM's defaults that differ between offline use and serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Offline,
    Serving,
}

/// Facts about the loaded engine, for start-up summaries and `/v1/models`.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    pub model_path: String,
    pub config: ModelConfig,
    /// `cpu` or the GPU's name.
    pub device: String,
    pub weight_format: &'static str,
    pub weight_bytes: usize,
    pub max_model_len: usize,
    pub num_kv_blocks: usize,
    pub block_size: usize,
    /// What the KV cache holds: `float32`, `float16` or `bfloat16`.
    pub kv_cache_dtype: &'static str,
    pub kv_capacity_tokens: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub load_seconds: f64,
}

impl EngineInfo {
    /// How many requests of `max_model_len` tokens fit the KV cache at once.
    pub fn max_concurrency(&self) -> f64 {
        self.kv_capacity_tokens as f64 / self.max_model_len as f64
    }
}

/// A request after input processing: validated, its parameters resolved, fanned out into the child
/// requests the engine core runs.
#[derive(Debug)]
pub struct ProcessedRequest {
    /// The child requests for the engine core (one unless `n` / `best_of` is above 1).
    pub children: Vec<Request>,
    /// What the output processor needs to know about the request.
    pub registration: Registration,
}

/// What the frontend's output processor keeps about a request (no tokenizer, no text: it can travel
/// through the engine thread).
#[derive(Debug, Clone)]
pub struct Registration {
    pub request_id: String,
    pub prompt_token_ids: Vec<u32>,
    /// The user's parameters, resolved (EOS ids, bad words) and validated.
    pub params: Arc<SamplingParams>,
    pub kind: OutputKind,
    /// The ids of the child requests, in index order.
    pub child_ids: Vec<String>,
}

/// The frontend's input side: tokenization, validation, structured-output compilation, `n` /
/// `best_of` fan-out. Immutable after construction (the grammar compiler is built on first use and
/// caches internally), so it can be shared by every HTTP handler.
pub struct InputProcessor {
    tokenizer: Option<Arc<Tokenizer>>,
    eos_token_ids: Vec<u32>,
    vocab_size: usize,
    max_model_len: usize,
    max_logprobs: usize,
    /// Time limit for compiling one grammar (`--structured-outputs-compile-timeout`).
    structured_compile_timeout: Duration,
    /// Built at the first constrained request: the token trie costs time and memory nobody else needs.
    structured: OnceLock<Result<Arc<StructuredOutputCompiler>, String>>,
}

impl InputProcessor {
    pub fn new(
        tokenizer: Option<Arc<Tokenizer>>,
        eos_token_ids: Vec<u32>,
        vocab_size: usize,
        max_model_len: usize,
        max_logprobs: usize,
    ) -> InputProcessor {
        InputProcessor {
            tokenizer,
            eos_token_ids,
            vocab_size,
            max_model_len,
            max_logprobs,
            structured_compile_timeout: DEFAULT_COMPILE_TIMEOUT,
            structured: OnceLock::new(),
        }
    }

    /// Sets the time limit for compiling one structured-output grammar (default 10 s).
    pub fn set_structured_outputs_compile_timeout(&mut self, timeout: Duration) {
        self.structured_compile_timeout = timeout;
    }

    /// The structured-output compiler for this tokenizer, built on first use.
    pub fn structured_compiler(&self) -> Result<&Arc<StructuredOutputCompiler>, LlmError> {
        self.structured
            .get_or_init(|| {
                let tok = self.tokenizer.as_ref().ok_or("structured output needs a tokenizer")?;
                StructuredOutputCompiler::new(
                    tok,
                    self.vocab_size,
                    &self.eos_token_ids,
                    self.structured_compile_timeout,
                )
                .map(Arc::new)
                .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| LlmError::InvalidRequest(e.clone()))
    }

    /// Compiles a request's structured-output constraint (a cache hit is a lookup) into
    /// `params.compiled_grammar`. Runs on the caller's thread, never on the engine thread; a compile
    /// error or time-out is an invalid request whose message names the field.
    fn compile_structured(&self, params: &mut SamplingParams) -> Result<(), LlmError> {
        let Some(structured) = &params.structured_outputs else {
            return Ok(());
        };
        if params.compiled_grammar.is_none() {
            let compiled =
                self.structured_compiler()?.compile(structured).map_err(|e| LlmError::InvalidRequest(e.to_string()))?;
            params.compiled_grammar = Some(compiled);
        }
        Ok(())
    }

    pub fn tokenizer(&self) -> Option<&Arc<Tokenizer>> {
        self.tokenizer.as_ref()
    }

    /// Tokenizes a prompt (adding special tokens as the tokenizer is configured to).
    pub fn tokenize(&self, prompt: &Prompt, add_special_tokens: bool) -> Result<Vec<u32>, LlmError> {
        match prompt {
            Prompt::Tokens(t) => Ok(t.clone()),
            Prompt::Text(s) => {
                let tok = self.tokenizer.as_ref().ok_or_else(|| {
                    LlmError::InvalidRequest("a text prompt needs a tokenizer; give token ids instead".into())
                })?;
                tok.encode(s, add_special_tokens).map_err(|e| LlmError::InvalidRequest(e.to_string()))
            }
        }
    }

    /// Tokenizes and validates a request and fans it out into child requests.
    pub fn process(
        &self,
        request_id: &str,
        prompt: &Prompt,
        mut params: SamplingParams,
        kind: OutputKind,
        priority: i32,
    ) -> Result<ProcessedRequest, LlmError> {
        let prompt_ids = self.tokenize(prompt, true)?;
        let vocab = self.vocab_size;
        if prompt_ids.is_empty() {
            return Err(LlmError::InvalidRequest("The decoder prompt cannot be empty".into()));
        }
        if let Some(&bad) = prompt_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(LlmError::InvalidRequest(format!("Token id {bad} is out of vocabulary")));
        }
        if prompt_ids.len() >= self.max_model_len {
            return Err(LlmError::InvalidRequest(format!(
                "The decoder prompt (length {}) is longer than the maximum model length of {}. Make sure that `max_model_len` is no smaller than the number of text tokens.",
                prompt_ids.len(),
                self.max_model_len
            )));
        }
        if !params.bad_words.is_empty() {
            let tok = self
                .tokenizer
                .as_ref()
                .ok_or_else(|| LlmError::InvalidRequest("bad_words needs a tokenizer".into()))?;
            let mut seqs: Vec<Vec<u32>> = Vec::new();
            for word in &params.bad_words {
                for prefix in ["", " "] {
                    let ids = tok
                        .encode(&format!("{prefix}{}", word.trim_start()), false)
                        .map_err(|e| LlmError::InvalidRequest(e.to_string()))?;
                    if !ids.is_empty() && !seqs.contains(&ids) {
                        seqs.push(ids);
                    }
                }
            }
            params.bad_words_token_ids = seqs;
        }
        params.eos_token_ids = self.eos_token_ids.clone();
        params.validate(vocab, self.max_logprobs).map_err(|e| LlmError::InvalidRequest(e.to_string()))?;
        self.compile_structured(&mut params)?;
        let num_children = params.num_sequences();
        let child_ids: Vec<String> = if num_children == 1 {
            vec![request_id.to_string()]
        } else {
            (0..num_children).map(|i| child_request_id(request_id, i)).collect()
        };
        let pick_best = params.best_of.is_some_and(|b| b > params.n);
        let children = child_ids
            .iter()
            .enumerate()
            .map(|(i, cid)| {
                let mut child = params.clone();
                child.n = 1;
                child.best_of = None;
                if let Some(seed) = params.seed {
                    child.seed = Some(seed.wrapping_add(i as u64));
                }
                if pick_best && child.logprobs.is_none() {
                    // Ranking by cumulative logprob needs the sampled tokens' logprobs.
                    child.logprobs = Some(0);
                }
                Request::new(cid.clone(), prompt_ids.clone(), Arc::new(child)).with_priority(priority)
            })
            .collect();
        let registration = Registration {
            request_id: request_id.to_string(),
            prompt_token_ids: prompt_ids,
            params: Arc::new(params),
            kind,
            child_ids,
        };
        Ok(ProcessedRequest { children, registration })
    }
}

/// The frontend's output side: the [`OutputProcessor`] and the tokenizer it detokenizes with. Turns
/// the engine core's token-level outputs into [`RequestOutput`]s and reports which sequences hit a
/// stop string (the engine core must then finish them: [`Core::finish_by_stop_string`]).
pub struct OutputStage {
    processor: OutputProcessor,
    tokenizer: Option<Arc<Tokenizer>>,
}

impl OutputStage {
    pub fn new(tokenizer: Option<Arc<Tokenizer>>) -> OutputStage {
        OutputStage { processor: OutputProcessor::new(), tokenizer }
    }

    /// Whether the request is still tracked.
    pub fn has_request(&self, request_id: &str) -> bool {
        self.processor.has_request(request_id)
    }

    /// Number of requests still tracked.
    pub fn num_requests(&self) -> usize {
        self.processor.num_requests()
    }

    /// Starts tracking a request whose children were added to the engine core.
    pub fn register(&mut self, reg: &Registration) {
        let detokenize = self.tokenizer.is_some();
        self.processor.add_request(
            &reg.request_id,
            reg.prompt_token_ids.clone(),
            reg.params.clone(),
            reg.kind,
            &reg.child_ids,
            detokenize,
        );
    }

    /// Applies one step's core outputs: detokenizes, finds stop strings, makes request outputs.
    pub fn process(&mut self, outputs: Vec<EngineCoreOutput>) -> ProcessResult {
        let tok = self.tokenizer.as_ref().map(|t| t.inner());
        self.processor.process(outputs, tok)
    }

    /// Forgets a request, marking its unfinished sequences aborted. Returns its child ids (for the
    /// engine core to abort) and its final output; `None` if the request is not tracked.
    pub fn abort_request(&mut self, request_id: &str) -> Option<(Vec<String>, Option<RequestOutput>)> {
        if !self.processor.has_request(request_id) {
            return None;
        }
        // The ids first: making the final output forgets a finished request.
        let children = self.processor.child_ids(request_id);
        let out = self.processor.abort_request(request_id);
        self.processor.remove_request(request_id);
        Some((children, out))
    }
}

/// The engine-core side: the scheduler and the model runner. Deals in token ids only: it holds no
/// tokenizer, so the thread that drives it can never detokenize.
pub struct Core<E: ModelExecutor = Box<dyn ModelExecutor>> {
    core: EngineCore<E>,
}

impl<E: ModelExecutor> Core<E> {
    pub fn new(config: SchedulerConfig, executor: E) -> Result<Core<E>, LlmError> {
        Ok(Core { core: EngineCore::new(config, executor).map_err(LlmError::Core)? })
    }

    /// Adds a request's children; all or none (on failure the ones added are aborted).
    pub fn add_requests(&mut self, children: Vec<Request>) -> Result<(), LlmError> {
        let mut added: Vec<String> = Vec::new();
        for req in children {
            let id = req.request_id.clone();
            if let Err(e) = self.core.add_request(req) {
                self.core.abort_requests(&added);
                return Err(LlmError::InvalidRequest(e.to_string()));
            }
            added.push(id);
        }
        Ok(())
    }

    /// Aborts child requests and frees their KV blocks at once. Returns how many were unfinished.
    pub fn abort_requests<S: AsRef<str>>(&mut self, ids: impl IntoIterator<Item = S>) -> usize {
        self.core.abort_requests(ids)
    }

    /// Aborts every queued or running request.
    pub fn abort_all(&mut self) -> usize {
        let scheduler = self.core.scheduler();
        let ids: Vec<String> =
            scheduler.running_request_ids().chain(scheduler.waiting_request_ids()).map(str::to_string).collect();
        self.core.abort_requests(ids)
    }

    /// Finishes a child request whose text hit `stop` (found by the frontend); frees its blocks.
    pub fn finish_by_stop_string(&mut self, child_id: &str, stop: String) {
        self.core.finish_requests([child_id], FinishReason::Stop, Some(StopReason::String(stop)));
    }

    /// Runs one step; returns its token-level outputs.
    pub fn step(&mut self) -> Result<Vec<EngineCoreOutput>, LlmError> {
        self.core.step().map_err(LlmError::Core)
    }

    /// Whether any request is waiting or running (or has a final output not yet returned).
    pub fn has_unfinished_requests(&self) -> bool {
        self.core.has_unfinished_requests()
    }

    /// Whether a child request is queued and was never scheduled.
    pub fn is_waiting(&self, child_id: &str) -> bool {
        self.core.scheduler().request(child_id).is_some_and(|r| matches!(r.status, RequestStatus::Waiting))
    }

    /// Scheduler statistics (running, waiting, KV usage, prefix cache counters, preemptions).
    pub fn stats(&self) -> SchedulerStats {
        self.core.stats()
    }

    pub fn engine_core(&self) -> &EngineCore<E> {
        &self.core
    }
}

/// The engine: the frontend side ([`InputProcessor`], [`OutputStage`]) and the engine-core side
/// ([`Core`]), driven on one thread.
pub struct Engine {
    input: InputProcessor,
    output: OutputStage,
    core: Core,
    generation: GenerationDefaults,
    chat_template: Option<String>,
    info: EngineInfo,
}

impl Engine {
    /// Loads the model and sizes the KV cache.
    pub fn new(args: &EngineArgs, usage: Usage) -> Result<Engine, LlmError> {
        // Refused before anything loads (vLLM accepts these names, so the flag parser does too).
        if let KvCacheDType::Fp8(name) = args.kv_cache_dtype {
            return Err(LlmError::InvalidArgs(format!(
                "--kv-cache-dtype {name} is not supported yet: ironllm has no fp8 KV cache; choose from auto, \
                 float16, bfloat16, float32"
            )));
        }
        let model_path = match &args.model {
            Some(p) => p.clone(),
            None => ensure_default_model()?,
        };
        let opts = LoadOptions {
            model: model_path.clone(),
            tokenizer: args.tokenizer.clone(),
            dtype: args.dtype,
            load_format: args.load_format,
            max_model_len: args.max_model_len,
            seed: args.seed,
            generation_config: args.generation_config.clone(),
            skip_tokenizer_init: args.skip_tokenizer_init,
        };
        if args.block_size == 0 || args.block_size > 1024 {
            return Err(LlmError::InvalidArgs(format!("--block-size must be in [1, 1024], got {}", args.block_size)));
        }
        if args.max_num_seqs == Some(0) {
            return Err(LlmError::InvalidArgs("--max-num-seqs must be at least 1".into()));
        }
        // Refused before the model loads; the scheduler checks the same when it is built.
        let async_scheduling = match args.async_scheduling {
            Some(true) if args.speculative_config.is_some() => {
                return Err(LlmError::InvalidArgs(
                    "--async-scheduling does not support speculative decoding yet; drop one of --async-scheduling \
                     and --speculative-config."
                        .into(),
                ));
            }
            Some(on) => on,
            // vLLM's default: on where supported. The CPU runner computes each step inside its submit, so
            // nothing would overlap there.
            None => args.device == Device::Cuda && args.speculative_config.is_none(),
        };
        let gpu = match args.device {
            Device::Cpu => None,
            Device::Cuda => Some(ironllm_cuda::Gpu::open(0).map_err(|e| LlmError::Device(e.to_string()))?),
            Device::Auto if ironllm_cuda::cuda_available() => match ironllm_cuda::Gpu::open(0) {
                Ok(gpu) => Some(gpu),
                Err(e) => {
                    tracing::warn!("a GPU is present but the CUDA backend cannot start ({e}); running on the CPU");
                    None
                }
            },
            Device::Auto => None,
        };
        let (max_num_seqs, max_num_batched_tokens) = batch_defaults(args, usage, gpu.as_deref().is_some_and(large_gpu));
        let built = match gpu {
            Some(gpu) => build_cuda_backend(gpu, args, &opts, max_num_seqs, max_num_batched_tokens)?,
            None => build_cpu_backend(args, &opts)?,
        };
        let Backend {
            runner,
            prepared,
            num_kv_blocks,
            device,
            weight_format,
            weight_bytes,
            kv_cache_dtype,
            kv_bytes,
            load_seconds,
            spec_disable_by_batch_size,
        } = built;
        let config = prepared.config.clone();
        let max_model_len = prepared.max_model_len;
        let speculative = args.speculative_config.clone().map(|mut spec| {
            spec.disable_by_batch_size = Some(spec.resolved_disable_by_batch_size(spec_disable_by_batch_size));
            spec
        });
        if num_kv_blocks * args.block_size < max_model_len.min(args.block_size * 2) {
            return Err(LlmError::InvalidArgs(format!(
                "the KV cache holds only {} blocks of {} tokens; raise --kv-cache-memory-bytes or --gpu-memory-utilization",
                num_kv_blocks, args.block_size
            )));
        }
        // The CUDA runner's workspace was sized with the same budget (see build_cuda_backend).
        let max_num_batched_tokens =
            whole_prompt_budget(args.enable_chunked_prefill, max_num_batched_tokens, max_model_len);
        let sched = SchedulerConfig {
            max_num_seqs,
            max_num_batched_tokens,
            max_model_len,
            block_size: args.block_size,
            num_blocks: num_kv_blocks,
            enable_prefix_caching: args.enable_prefix_caching,
            enable_chunked_prefill: args.enable_chunked_prefill,
            long_prefill_token_threshold: 0,
            policy: if args.scheduling_policy_priority { SchedulingPolicy::Priority } else { SchedulingPolicy::Fcfs },
            speculative: speculative.clone(),
            async_scheduling,
            admission_headroom_tokens: match args.admission_headroom_tokens {
                Some(tokens) => tokens,
                None => admission_headroom_from_env()?,
            },
        };
        let info = EngineInfo {
            model_path: model_path.display().to_string(),
            device,
            weight_format,
            weight_bytes,
            config,
            max_model_len,
            num_kv_blocks,
            block_size: args.block_size,
            kv_cache_dtype,
            kv_capacity_tokens: num_kv_blocks * args.block_size,
            max_num_seqs,
            max_num_batched_tokens,
            load_seconds,
        };
        tracing::info!(
            "model {} ({}, {} layers, weights {} = {:.1} MiB) loaded in {:.2}s",
            info.model_path,
            info.config.architecture.hf_name(),
            info.config.num_hidden_layers,
            info.weight_format,
            info.weight_bytes as f64 / (1 << 20) as f64,
            info.load_seconds
        );
        tracing::info!(
            "device {}: KV cache ({}) {} blocks x {} tokens = {} tokens ({:.1} MiB); maximum concurrency for {} tokens per request: {:.2}x",
            info.device,
            info.kv_cache_dtype,
            num_kv_blocks,
            args.block_size,
            info.kv_capacity_tokens,
            kv_bytes as f64 / (1 << 20) as f64,
            max_model_len,
            info.max_concurrency()
        );
        let loaded = prepared;
        let core = Core::new(sched, runner)?;
        if async_scheduling {
            // The CUDA runner returns from `submit_model` once the step is queued on the GPU; the CPU
            // runner computes the step inside it (outputs are exact either way).
            let how = if args.device == Device::Cuda {
                "planning and output processing overlap the GPU's step"
            } else {
                "the CPU runner computes each step inside its submit, so nothing overlaps"
            };
            tracing::info!("async scheduling on: {how}");
        }
        let mut input = InputProcessor::new(
            loaded.tokenizer.clone(),
            loaded.eos_token_ids.clone(),
            info.config.vocab_size,
            max_model_len,
            args.max_logprobs,
        );
        input.set_structured_outputs_compile_timeout(args.structured_outputs_compile_timeout);
        Ok(Engine {
            input,
            output: OutputStage::new(loaded.tokenizer.clone()),
            core,
            generation: loaded.generation.clone(),
            chat_template: loaded.chat_template.clone(),
            info,
        })
    }

    /// Takes the engine apart into its frontend side and its engine-core side (the server runs the
    /// core on its own thread).
    pub fn into_parts(self) -> (InputProcessor, OutputStage, Core) {
        (self.input, self.output, self.core)
    }

    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> Option<&Arc<Tokenizer>> {
        self.input.tokenizer()
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn generation_defaults(&self) -> &GenerationDefaults {
        &self.generation
    }

    /// vLLM's sampling defaults with the model's generation config applied.
    pub fn default_sampling_params(&self) -> SamplingParams {
        self.generation.default_params()
    }

    /// Tokenizes a prompt (adding special tokens as the tokenizer is configured to).
    pub fn tokenize(&self, prompt: &Prompt, add_special_tokens: bool) -> Result<Vec<u32>, LlmError> {
        self.input.tokenize(prompt, add_special_tokens)
    }

    /// Validates a request and hands it to the engine core. The request's outputs come from
    /// [`step`](Self::step) under `request_id`.
    pub fn add_request(
        &mut self,
        request_id: &str,
        prompt: &Prompt,
        params: SamplingParams,
        kind: OutputKind,
        priority: i32,
    ) -> Result<Vec<u32>, LlmError> {
        if self.output.has_request(request_id) {
            return Err(LlmError::InvalidRequest(format!("request id `{request_id}` is already in use")));
        }
        let ProcessedRequest { children, registration } =
            self.input.process(request_id, prompt, params, kind, priority)?;
        self.core.add_requests(children)?;
        self.output.register(&registration);
        Ok(registration.prompt_token_ids)
    }

    /// Aborts a request (all its sequences) and frees its KV blocks at once.
    pub fn abort_request(&mut self, request_id: &str) -> Option<RequestOutput> {
        let (children, out) = self.output.abort_request(request_id)?;
        self.core.abort_requests(&children);
        out
    }

    /// Runs one engine step and returns the request outputs it produced.
    pub fn step(&mut self) -> Result<Vec<RequestOutput>, LlmError> {
        let outputs = self.core.step()?;
        let result = self.output.process(outputs);
        for (id, stop) in result.stopped {
            self.core.finish_by_stop_string(&id, stop);
        }
        Ok(result.request_outputs)
    }

    /// Whether any request is waiting or running.
    pub fn has_unfinished_requests(&self) -> bool {
        self.core.has_unfinished_requests()
    }

    /// Scheduler statistics (running, waiting, KV usage, prefix cache counters, preemptions).
    pub fn stats(&self) -> ironllm_core::SchedulerStats {
        self.core.stats()
    }
}

/// A model runner with what start-up learned while building it.
struct Backend {
    runner: Box<dyn ModelExecutor>,
    prepared: PreparedModel,
    num_kv_blocks: usize,
    device: String,
    weight_format: &'static str,
    weight_bytes: usize,
    /// The KV cache's element type, by name.
    kv_cache_dtype: &'static str,
    kv_bytes: usize,
    load_seconds: f64,
    /// Running requests from which speculation no longer pays on this backend (the default of
    /// `disable_by_batch_size`).
    spec_disable_by_batch_size: usize,
}

fn build_cpu_backend(args: &EngineArgs, opts: &LoadOptions) -> Result<Backend, LlmError> {
    let prepared = loader::prepare(opts)?;
    let model = Arc::new(loader::cpu_model(&prepared, opts.dtype)?);
    let kv_bytes_wanted = args.kv_cache_memory_bytes.unwrap_or(DEFAULT_CPU_KV_CACHE_BYTES);
    let kv_dtype = args.kv_cache_dtype.cpu_element().ok_or_else(|| {
        LlmError::InvalidArgs(format!("--kv-cache-dtype {} is not supported on the CPU", args.kv_cache_dtype.name()))
    })?;
    let draft = match &args.speculative_config {
        Some(SpeculativeConfig { method: SpeculativeMethod::DraftModel { model: path }, .. }) => {
            Some(load_cpu_draft_model(path, opts, &prepared)?)
        }
        _ => None,
    };
    // The draft model's KV shares the target's blocks (and their element type), so one block costs both.
    let bytes_per_token = KvCache::bytes_per_token(&prepared.config, kv_dtype)
        + draft.as_ref().map_or(0, |d| KvCache::bytes_per_token(&d.config, kv_dtype));
    let bytes_per_block = bytes_per_token * args.block_size;
    let num_kv_blocks = kv_bytes_wanted / bytes_per_block;
    let mut runner = CpuModelRunner::with_kv_dtype(model.clone(), num_kv_blocks, args.block_size, kv_dtype, args.seed);
    if let Some(spec) = &args.speculative_config {
        let k = spec.num_speculative_tokens;
        let proposer = match (&spec.method, draft) {
            (SpeculativeMethod::Ngram { prompt_lookup_min, prompt_lookup_max }, _) => Proposer::Ngram(
                NgramProposer::new(*prompt_lookup_min, *prompt_lookup_max, k).map_err(LlmError::InvalidArgs)?,
            ),
            (SpeculativeMethod::DraftModel { .. }, Some(draft)) => {
                Proposer::DraftModel(Box::new(DraftModel::new(draft, num_kv_blocks, args.block_size, kv_dtype, k)))
            }
            (SpeculativeMethod::DraftModel { .. }, None) => unreachable!("loaded above"),
        };
        tracing::info!("speculative decoding: {} with up to {k} draft tokens per step", spec.method.name());
        runner.set_proposer(proposer);
    }
    Ok(Backend {
        runner: Box::new(runner),
        num_kv_blocks,
        device: "cpu".into(),
        weight_format: model.weight_format(),
        weight_bytes: model.weight_bytes(),
        kv_cache_dtype: kv_dtype.name(),
        kv_bytes: num_kv_blocks * bytes_per_block,
        load_seconds: prepared.started.elapsed().as_secs_f64(),
        spec_disable_by_batch_size: CPU_SPEC_DISABLE_BY_BATCH_SIZE,
        prepared,
    })
}

/// Loads the draft model of `--speculative-config` for the CPU and checks it can draft for the target.
fn load_cpu_draft_model(path: &str, opts: &LoadOptions, target: &PreparedModel) -> Result<Arc<LlamaModel>, LlmError> {
    let prepared = prepare_draft_model(path, opts, target)?;
    let model = loader::cpu_model(&prepared, opts.dtype)?;
    tracing::info!(
        "draft model {path} ({} layers, {:.1} MiB) loaded",
        prepared.config.num_hidden_layers,
        model.weight_bytes() as f64 / (1 << 20) as f64
    );
    Ok(Arc::new(model))
}

/// Resolves the draft model of `--speculative-config` and checks it can draft for the target: a
/// vocabulary no larger than the target's (its tokens must be valid target tokens) and a context at
/// least `--max-model-len`.
fn prepare_draft_model(path: &str, opts: &LoadOptions, target: &PreparedModel) -> Result<PreparedModel, LlmError> {
    let draft_opts = LoadOptions {
        model: PathBuf::from(path),
        tokenizer: None,
        load_format: LoadFormat::Auto,
        max_model_len: Some(target.max_model_len),
        skip_tokenizer_init: true,
        ..opts.clone()
    };
    let prepared = loader::prepare(&draft_opts)
        .map_err(|e| LlmError::InvalidArgs(format!("speculative config `model` ({path}): {e}")))?;
    if prepared.config.vocab_size > target.config.vocab_size {
        return Err(LlmError::InvalidArgs(format!(
            "the draft model's vocabulary ({}) is larger than the target's ({}); it must share the target's tokenizer",
            prepared.config.vocab_size, target.config.vocab_size
        )));
    }
    if prepared.max_model_len < target.max_model_len {
        return Err(LlmError::InvalidArgs(format!(
            "the draft model's context ({}) is shorter than --max-model-len ({}); lower --max-model-len",
            prepared.max_model_len, target.max_model_len
        )));
    }
    Ok(prepared)
}

fn build_cuda_backend(
    gpu: Arc<ironllm_cuda::Gpu>,
    args: &EngineArgs,
    opts: &LoadOptions,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
) -> Result<Backend, LlmError> {
    use ironllm_cuda::runner::{resolve_dtype, resolve_kv_cache_dtype, CudaModelRunner, CudaRunnerConfig, KvCacheSize};
    let cuda_err = |e: ironllm_cuda::CudaError| LlmError::Device(e.to_string());
    let prepared = loader::prepare(opts)?;
    let max_num_batched_tokens =
        whole_prompt_budget(args.enable_chunked_prefill, max_num_batched_tokens, prepared.max_model_len);
    let dtype = resolve_dtype(opts.dtype);
    let kv_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype, dtype).map_err(LlmError::InvalidArgs)?;
    let model = ironllm_cuda::model::CudaLlama::load(
        gpu.clone(),
        prepared.config.clone(),
        &prepared.source,
        dtype,
        prepared.max_model_len,
        args.seed,
    )
    .map_err(cuda_err)?;
    let model = Arc::new(model);
    let draft = match &args.speculative_config {
        Some(SpeculativeConfig {
            method: SpeculativeMethod::DraftModel { model: path },
            num_speculative_tokens,
            ..
        }) => {
            let draft_prepared = prepare_draft_model(path, opts, &prepared)?;
            let draft_model = ironllm_cuda::model::CudaLlama::load(
                gpu.clone(),
                draft_prepared.config.clone(),
                &draft_prepared.source,
                dtype,
                prepared.max_model_len,
                args.seed,
            )
            .map_err(cuda_err)?;
            tracing::info!(
                "draft model {path} ({} layers, {:.1} MiB) loaded on the GPU",
                draft_prepared.config.num_hidden_layers,
                draft_model.weight_bytes() as f64 / (1 << 20) as f64
            );
            Some((Arc::new(draft_model), *num_speculative_tokens))
        }
        _ => None,
    };
    let load_seconds = prepared.started.elapsed().as_secs_f64();
    let cfg = CudaRunnerConfig {
        block_size: args.block_size,
        max_num_batched_tokens,
        max_num_seqs,
        kv_cache: match args.kv_cache_memory_bytes {
            Some(b) => KvCacheSize::Bytes(b),
            None => KvCacheSize::Utilization(args.gpu_memory_utilization),
        },
        seed: args.seed,
        max_model_len: prepared.max_model_len,
        enforce_eager: args.enforce_eager,
        draft,
        num_speculative_tokens: args.speculative_config.as_ref().map_or(0, |s| s.num_speculative_tokens),
    };
    let mut runner = CudaModelRunner::new(model.clone(), &cfg).map_err(cuda_err)?;
    if let Some(spec) = &args.speculative_config {
        let k = spec.num_speculative_tokens;
        if let SpeculativeMethod::Ngram { prompt_lookup_min, prompt_lookup_max } = spec.method {
            let ngram = NgramProposer::new(prompt_lookup_min, prompt_lookup_max, k).map_err(LlmError::InvalidArgs)?;
            runner.set_proposer(Proposer::Ngram(ngram)).map_err(cuda_err)?;
        }
        tracing::info!("speculative decoding: {} with up to {k} draft tokens per step", spec.method.name());
    }
    let m = runner.memory.clone();
    tracing::info!(
        "GPU memory: {:.2} GiB total, weights {:.2} GiB ({}), peak activations {:.2} GiB, KV cache {:.2} GiB; profiled in {:.2}s",
        m.total_bytes as f64 / GIB,
        m.weight_bytes as f64 / GIB,
        dtype.name(),
        m.peak_activation_bytes as f64 / GIB,
        m.kv_cache_bytes as f64 / GIB,
        m.profile_seconds
    );
    if args.enforce_eager {
        tracing::info!("CUDA graphs off (--enforce-eager)");
    } else {
        tracing::info!(
            "captured {} decode CUDA graphs ({} batch sizes {:?}, some with a graph per split-KV share count) in {:.2}s",
            m.graph_count,
            m.graph_batch_sizes.len(),
            m.graph_batch_sizes,
            m.graph_capture_seconds
        );
    }
    Ok(Backend {
        runner: Box::new(runner),
        num_kv_blocks: m.num_blocks,
        device: format!("cuda ({})", gpu.info.name),
        weight_format: dtype.name(),
        weight_bytes: m.weight_bytes,
        kv_cache_dtype: kv_dtype.name(),
        kv_bytes: m.kv_cache_bytes,
        load_seconds,
        spec_disable_by_batch_size: GPU_SPEC_DISABLE_BY_BATCH_SIZE,
        prepared,
    })
}

const GIB: f64 = (1u64 << 30) as f64;

/// Defaults of `disable_by_batch_size`: from this many running requests a forward of k + 1 tokens per
/// request costs clearly more than one of a single token (measured, see BENCHMARKS.md).
const CPU_SPEC_DISABLE_BY_BATCH_SIZE: usize = 8;
const GPU_SPEC_DISABLE_BY_BATCH_SIZE: usize = 32;

/// vLLM's `max_num_seqs` and `max_num_batched_tokens` where the flags leave them out: larger on GPUs of
/// at least 70 GiB other than the A100 (where vLLM measured large budgets to cost throughput), and for
/// offline use than for serving.
fn batch_defaults(args: &EngineArgs, usage: Usage, large: bool) -> (usize, usize) {
    let tokens = args.max_num_batched_tokens.unwrap_or(match (usage, large) {
        (Usage::Offline, true) => 16384,
        (Usage::Serving, true) => 8192,
        (Usage::Offline, false) => 8192,
        (Usage::Serving, false) => 2048,
    });
    // As vLLM: a default sequence cap never exceeds the token budget the flags gave.
    let seqs = args.max_num_seqs.unwrap_or(if large { 1024 } else { 256 }.min(tokens.max(1)));
    (seqs, tokens)
}

/// The token budget a step gets: as vLLM's engine arguments, without chunked prefill it is raised to at
/// least the context length, since a prompt must then fit one step whole.
fn whole_prompt_budget(enable_chunked_prefill: bool, budget: usize, max_model_len: usize) -> usize {
    if enable_chunked_prefill {
        budget
    } else {
        budget.max(max_model_len)
    }
}

/// vLLM's "large GPU" for its batch defaults: at least 70 GiB, and not an A100.
fn large_gpu(gpu: &ironllm_cuda::Gpu) -> bool {
    gpu.info.total_memory >= 70 * (1 << 30) && !gpu.info.name.to_lowercase().contains("a100")
}

/// `IRONLLM_ADMISSION_HEADROOM` (tokens of decode growth kept free per running request when admitting;
/// 0 = vLLM's admission), else the scheduler's default.
fn admission_headroom_from_env() -> Result<usize, LlmError> {
    match std::env::var("IRONLLM_ADMISSION_HEADROOM") {
        Ok(v) => v
            .trim()
            .parse::<usize>()
            .map_err(|_| LlmError::InvalidArgs(format!("IRONLLM_ADMISSION_HEADROOM must be a token count, got {v:?}"))),
        Err(_) => Ok(ironllm_core::scheduler::DEFAULT_ADMISSION_HEADROOM_TOKENS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_defaults_follow_vllm_by_usage_and_card() {
        let none = EngineArgs::default();
        assert_eq!(batch_defaults(&none, Usage::Offline, false), (256, 8192));
        assert_eq!(batch_defaults(&none, Usage::Serving, false), (256, 2048));
        assert_eq!(batch_defaults(&none, Usage::Offline, true), (1024, 16384));
        assert_eq!(batch_defaults(&none, Usage::Serving, true), (1024, 8192));
        // A token budget alone caps the default sequence count; explicit flags stay as given.
        let tokens = EngineArgs { max_num_batched_tokens: Some(512), ..EngineArgs::default() };
        assert_eq!(batch_defaults(&tokens, Usage::Serving, true), (512, 512));
        let both = EngineArgs { max_num_seqs: Some(2048), max_num_batched_tokens: Some(512), ..EngineArgs::default() };
        assert_eq!(batch_defaults(&both, Usage::Offline, true), (2048, 512));
    }

    #[test]
    fn without_chunked_prefill_the_budget_covers_a_whole_context() {
        assert_eq!(whole_prompt_budget(false, 2048, 131_072), 131_072);
        assert_eq!(whole_prompt_budget(false, 8192, 4096), 8192);
        assert_eq!(whole_prompt_budget(true, 2048, 131_072), 2048);
    }
}
