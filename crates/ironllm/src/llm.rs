//! The offline library API, shaped like vLLM's `LLM` class: load once, then `generate` batches of
//! prompts; all prompts of a call run together under continuous batching.

use ironllm_core::output_processor::{OutputKind, RequestOutput};
use ironllm_core::SamplingParams;

use crate::engine::{Engine, Prompt, Usage};
use crate::{EngineArgs, LlmError};

/// An offline engine.
pub struct LLM {
    engine: Engine,
    next_id: u64,
}

impl LLM {
    /// Loads the model named in `args` (the default model when none is named).
    pub fn new(args: EngineArgs) -> Result<LLM, LlmError> {
        Ok(LLM { engine: Engine::new(&args, Usage::Offline)?, next_id: 0 })
    }

    /// The underlying engine (tokenizer, info, stats).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The underlying engine, for driving requests step by step.
    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// vLLM's defaults with the model's generation config applied.
    pub fn default_sampling_params(&self) -> SamplingParams {
        self.engine.default_sampling_params()
    }

    /// Generates for every prompt with the same parameters; outputs come back in prompt order.
    pub fn generate(&mut self, prompts: &[Prompt], params: &SamplingParams) -> Result<Vec<RequestOutput>, LlmError> {
        let per = vec![params.clone(); prompts.len()];
        self.generate_each(prompts, &per)
    }

    /// Generates with per-prompt parameters.
    pub fn generate_each(
        &mut self,
        prompts: &[Prompt],
        params: &[SamplingParams],
    ) -> Result<Vec<RequestOutput>, LlmError> {
        self.generate_with_priority(prompts, params, &vec![0; prompts.len()])
    }

    /// Generates with per-prompt parameters and scheduling priorities (lower runs sooner; effective
    /// with `--scheduling-policy priority`).
    pub fn generate_with_priority(
        &mut self,
        prompts: &[Prompt],
        params: &[SamplingParams],
        priorities: &[i32],
    ) -> Result<Vec<RequestOutput>, LlmError> {
        if prompts.len() != params.len() || prompts.len() != priorities.len() {
            return Err(LlmError::InvalidArgs("one SamplingParams per prompt is needed".into()));
        }
        let mut ids: Vec<String> = Vec::with_capacity(prompts.len());
        for ((prompt, p), &priority) in prompts.iter().zip(params).zip(priorities) {
            let id = self.next_id.to_string();
            self.next_id += 1;
            if let Err(e) = self.engine.add_request(&id, prompt, p.clone(), OutputKind::FinalOnly, priority) {
                for added in &ids {
                    self.engine.abort_request(added);
                }
                return Err(e);
            }
            ids.push(id);
        }
        let mut done: std::collections::HashMap<String, RequestOutput> = std::collections::HashMap::new();
        while self.engine.has_unfinished_requests() {
            for out in self.engine.step()? {
                if out.finished {
                    done.insert(out.request_id.clone(), out);
                }
            }
        }
        ids.iter()
            .map(|id| done.remove(id).ok_or_else(|| LlmError::Internal(format!("request {id} produced no output"))))
            .collect()
    }
}
