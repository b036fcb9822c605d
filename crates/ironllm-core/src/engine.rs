//! The engine core: one [`Scheduler`] and one [`ModelExecutor`], driven one step at a time. A step is
//! three moves, as in nano-vllm's `LLMEngine.step` and vLLM V1's `EngineCore.step`: plan
//! (`schedule`), run (`execute_model`), apply (`update_from_output`).
//!
//! Invariant: every request added gets exactly one output with `finish_reason` set, whether it ends by
//! itself, is aborted, or is caught in a failed step; no request is silently lost. Every entry point
//! (server, CLI, offline batch) drives this same loop from its own thread.

use crate::executor::ModelExecutor;
use crate::outputs::{EngineCoreOutput, FinishReason, StopReason};
use crate::request::Request;
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerStats};
use crate::CoreError;

/// A scheduler and the model it plans for.
#[derive(Debug)]
pub struct EngineCore<E: ModelExecutor> {
    scheduler: Scheduler,
    executor: E,
}

impl<E: ModelExecutor> EngineCore<E> {
    pub fn new(config: SchedulerConfig, executor: E) -> Result<EngineCore<E>, CoreError> {
        Ok(EngineCore { scheduler: Scheduler::new(config)?, executor })
    }

    /// Queues a request; see [`Scheduler::add_request`] for what is rejected. A structured-output
    /// request is refused when the executor cannot apply grammars or its grammar was not compiled.
    pub fn add_request(&mut self, request: Request) -> Result<(), CoreError> {
        if let Some(structured) = &request.sampling_params.structured_outputs {
            if !self.executor.supports_structured_output() {
                return Err(CoreError::InvalidParams(format!(
                    "`{}`: structured output is not supported on this device's backend yet (use --device cpu)",
                    structured.field_name()
                )));
            }
            if request.sampling_params.compiled_grammar.is_none() {
                return Err(CoreError::InvalidParams(format!(
                    "`{}`: the constraint was not compiled by the frontend",
                    structured.field_name()
                )));
            }
        }
        self.scheduler.add_request(request)
    }

    /// Aborts requests; their final outputs come with the next step. Returns how many were unfinished.
    pub fn abort_requests<S: AsRef<str>>(&mut self, request_ids: impl IntoIterator<Item = S>) -> usize {
        self.scheduler.abort_requests(request_ids)
    }

    /// Finishes requests the frontend decided are done (a stop string matched).
    pub fn finish_requests<S: AsRef<str>>(
        &mut self,
        request_ids: impl IntoIterator<Item = S>,
        reason: FinishReason,
        stop_reason: Option<StopReason>,
    ) -> usize {
        self.scheduler.finish_requests(request_ids, reason, stop_reason)
    }

    /// Runs one step and returns what it produced. A plan with nothing to compute does not reach the
    /// executor. If the executor fails, the requests of that plan are aborted (their final outputs come
    /// with the next step) and the error is returned; the engine stays usable.
    pub fn step(&mut self) -> Result<Vec<EngineCoreOutput>, CoreError> {
        let plan = self.scheduler.schedule();
        if plan.total_num_scheduled_tokens == 0 {
            return Ok(self.scheduler.take_pending_outputs());
        }
        match self.executor.execute_model(&plan) {
            Ok(runner_output) => Ok(self.scheduler.update_from_output(&plan, runner_output)),
            Err(err) => {
                self.scheduler.abort_requests(plan.num_scheduled_tokens.iter().map(|(id, _)| id));
                Err(err)
            }
        }
    }

    /// Whether a request is queued or running, or its final output has not been returned yet: keep
    /// stepping while this holds.
    pub fn has_unfinished_requests(&self) -> bool {
        self.scheduler.has_unfinished_requests()
    }

    /// A snapshot for metrics.
    pub fn stats(&self) -> SchedulerStats {
        self.scheduler.make_stats()
    }

    /// Forgets the prefix cache; refused (`false`) while any request holds blocks.
    pub fn reset_prefix_cache(&mut self) -> bool {
        self.scheduler.reset_prefix_cache()
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    pub fn executor(&self) -> &E {
        &self.executor
    }

    pub fn executor_mut(&mut self) -> &mut E {
        &mut self.executor
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use super::*;
    use crate::testing::{generate_alone, CollectedOutput, FakeModel};
    use crate::SamplingParams;

    const VOCAB: u32 = 97;

    fn engine(num_blocks: usize) -> EngineCore<FakeModel> {
        let config = SchedulerConfig { block_size: 4, ..SchedulerConfig::new(64, num_blocks) };
        let model = FakeModel::for_config(&config, VOCAB);
        EngineCore::new(config, model).unwrap()
    }

    fn greedy(max_tokens: usize) -> Arc<SamplingParams> {
        Arc::new(SamplingParams { ignore_eos: true, ..SamplingParams::greedy(max_tokens) })
    }

    fn drain(engine: &mut EngineCore<FakeModel>) -> HashMap<String, CollectedOutput> {
        let mut collected: HashMap<String, CollectedOutput> = HashMap::new();
        let mut steps = 0;
        while engine.has_unfinished_requests() {
            steps += 1;
            assert!(steps < 10_000, "engine did not finish");
            for output in engine.step().unwrap() {
                collected.entry(output.req_id.clone()).or_default().absorb(output).unwrap();
            }
        }
        collected
    }

    #[test]
    fn runs_requests_to_completion_with_the_same_outputs_as_alone() {
        let mut engine = engine(64);
        for i in 0..5u32 {
            let prompt: Vec<u32> = (0..10 + i).collect();
            engine.add_request(Request::new(format!("r{i}"), prompt, greedy(8))).unwrap();
        }
        let collected = drain(&mut engine);
        for i in 0..5u32 {
            let alone = generate_alone((0..10 + i).collect(), greedy(8), 64, VOCAB).unwrap();
            let got = &collected[&format!("r{i}")];
            assert_eq!((&got.token_ids, got.finish_reason), (&alone.token_ids, alone.finish_reason));
        }
        assert_eq!(engine.stats().kv_cache_usage, 0.0);
        assert_eq!(engine.executor().num_sequences(), 5, "the runner learns of the last finishes later");
    }

    #[test]
    fn an_abort_only_step_does_not_reach_the_executor() {
        let mut engine = engine(64);
        engine.add_request(Request::new("a", vec![1, 2, 3], greedy(4))).unwrap();
        assert_eq!(engine.abort_requests(["a"]), 1);
        let outputs = engine.step().unwrap();
        assert_eq!(outputs.len(), 1);
        assert_eq!(outputs[0].finish_reason, Some(FinishReason::Abort));
        assert_eq!(engine.executor().num_steps, 0);
        assert!(!engine.has_unfinished_requests());
    }

    #[test]
    fn a_failed_step_aborts_its_requests_and_the_engine_goes_on() {
        let mut engine = engine(64);
        engine.executor_mut().fail_at_step = Some(1);
        engine.add_request(Request::new("a", vec![1, 2, 3], greedy(4))).unwrap();
        engine.step().unwrap();
        assert!(matches!(engine.step(), Err(CoreError::Execution(_))));
        assert_eq!(engine.stats().kv_cache_usage, 0.0, "the aborted request's blocks are freed");
        engine.add_request(Request::new("b", vec![4, 5, 6], greedy(2))).unwrap();
        let collected = drain(&mut engine);
        assert_eq!(collected["a"].finish_reason, Some(FinishReason::Abort));
        assert_eq!(collected["b"].finish_reason, Some(FinishReason::Length));
        assert_eq!(collected["b"].token_ids.len(), 2);
    }

    #[test]
    fn stop_strings_finish_through_the_engine() {
        let mut engine = engine(64);
        engine.add_request(Request::new("a", vec![1, 2, 3], greedy(40))).unwrap();
        engine.step().unwrap();
        let stop = Some(StopReason::String("###".to_string()));
        assert_eq!(engine.finish_requests(["a"], FinishReason::Stop, stop.clone()), 1);
        let outputs = engine.step().unwrap();
        assert_eq!(outputs[0].finish_reason, Some(FinishReason::Stop));
        assert_eq!(outputs[0].stop_reason, stop);
        assert!(!engine.has_unfinished_requests());
    }
}
