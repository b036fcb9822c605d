//! The engine core: one [`Scheduler`] and one [`ModelExecutor`], driven one step at a time. A step is
//! three moves, as in nano-vllm's `LLMEngine.step` and vLLM V1's `EngineCore.step`: plan
//! (`schedule`), run (`execute_model`), apply (`update_from_output`).
//!
//! Invariant: every request added gets exactly one output with `finish_reason` set, whether it ends by
//! itself, is aborted, or is caught in a failed step; no request is silently lost. Every entry point
//! (server, CLI, offline batch) drives this same loop from its own thread.
//!
//! With async scheduling (vLLM's `--async-scheduling`, its `step_with_batch_queue` with a queue of two)
//! a step is: plan N+1, launch it, then wait for step N and apply it, so planning and the output
//! processing of step N run while the device computes. At most one step is left in flight between
//! calls. When either phase of the executor fails, the requests of every step in flight are aborted
//! (the still-running step is waited for and its output dropped), so the invariant holds there too.

use std::collections::VecDeque;

use crate::executor::{ModelExecutor, Submitted};
use crate::outputs::{EngineCoreOutput, FinishReason, ModelRunnerOutput, SchedulerOutput, StopReason};
use crate::request::Request;
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerStats};
use crate::CoreError;

/// A launched step whose output the scheduler has not applied yet (async scheduling).
#[derive(Debug)]
struct InFlightStep {
    plan: SchedulerOutput,
    /// `Some` when the executor ran the step inside `submit_model`.
    output: Option<ModelRunnerOutput>,
}

/// A scheduler and the model it plans for.
#[derive(Debug)]
pub struct EngineCore<E: ModelExecutor> {
    scheduler: Scheduler,
    executor: E,
    /// Async scheduling: launched steps, oldest first (at most one between calls to `step`).
    in_flight: VecDeque<InFlightStep>,
}

impl<E: ModelExecutor> EngineCore<E> {
    pub fn new(config: SchedulerConfig, executor: E) -> Result<EngineCore<E>, CoreError> {
        Ok(EngineCore { scheduler: Scheduler::new(config)?, executor, in_flight: VecDeque::new() })
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
        if self.scheduler.config().async_scheduling {
            return self.step_async();
        }
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

    /// One async-scheduling step: plans and launches the next step, then waits for the one before it
    /// and applies its output. The first call after idling only launches; a call with nothing new to
    /// plan only drains. Returns the applied step's outputs (or just pending final outputs).
    fn step_async(&mut self) -> Result<Vec<EngineCoreOutput>, CoreError> {
        let plan = self.scheduler.schedule();
        let launched = plan.total_num_scheduled_tokens > 0;
        if launched {
            match self.executor.submit_model(&plan) {
                Ok(Submitted::Done(output)) => self.in_flight.push_back(InFlightStep { plan, output: Some(output) }),
                Ok(Submitted::InFlight) => self.in_flight.push_back(InFlightStep { plan, output: None }),
                Err(err) => {
                    self.abort_in_flight(Some(&plan));
                    return Err(err);
                }
            }
        }
        // Leave the step just launched running; apply the one before it (or the last one, when
        // nothing new was launched).
        if self.in_flight.len() <= usize::from(launched) {
            return Ok(self.scheduler.take_pending_outputs());
        }
        let Some(oldest) = self.in_flight.pop_front() else {
            return Ok(self.scheduler.take_pending_outputs());
        };
        let output = match oldest.output {
            Some(output) => Ok(output),
            None => self.executor.collect_model(),
        };
        match output {
            Ok(output) => Ok(self.scheduler.update_from_output(&oldest.plan, output)),
            Err(err) => {
                self.abort_in_flight(Some(&oldest.plan));
                Err(err)
            }
        }
    }

    /// After a failed submit or collect: waits for every step still in flight (dropping its output,
    /// errors included, since the failure is already being reported) and aborts the requests of those
    /// steps and of `failed`. Their final outputs come with the next step.
    fn abort_in_flight(&mut self, failed: Option<&SchedulerOutput>) {
        let mut req_ids: Vec<String> = Vec::new();
        if let Some(plan) = failed {
            req_ids.extend(plan.num_scheduled_tokens.iter().map(|(id, _)| id.clone()));
        }
        while let Some(step) = self.in_flight.pop_front() {
            if step.output.is_none() {
                if let Err(err) = self.executor.collect_model() {
                    tracing::debug!("dropping the output of a step in flight after a failure: {err}");
                }
            }
            req_ids.extend(step.plan.num_scheduled_tokens.into_iter().map(|(id, _)| id));
        }
        self.scheduler.abort_requests(req_ids);
    }

    /// Whether a request is queued or running, its final output has not been returned yet, or a step
    /// is still in flight (async scheduling): keep stepping while this holds.
    pub fn has_unfinished_requests(&self) -> bool {
        self.scheduler.has_unfinished_requests() || !self.in_flight.is_empty()
    }

    /// Requests scheduled in steps launched but not applied yet (async scheduling; empty otherwise).
    pub fn in_flight_request_ids(&self) -> impl Iterator<Item = &str> {
        self.in_flight.iter().flat_map(|step| step.plan.num_scheduled_tokens.iter().map(|(id, _)| id.as_str()))
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

    fn async_engine(num_blocks: usize, deferred: bool) -> EngineCore<FakeModel> {
        let config = SchedulerConfig { block_size: 4, async_scheduling: true, ..SchedulerConfig::new(64, num_blocks) };
        let mut model = FakeModel::for_config(&config, VOCAB);
        model.deferred = deferred;
        EngineCore::new(config, model).unwrap()
    }

    #[test]
    fn async_steps_overlap_and_match_sync_outputs() {
        for deferred in [false, true] {
            let mut engine = async_engine(64, deferred);
            for i in 0..5u32 {
                engine.add_request(Request::new(format!("r{i}"), (0..10 + i).collect(), greedy(8))).unwrap();
            }
            // The first step only launches: nothing can come back yet.
            assert!(engine.step().unwrap().is_empty());
            assert_eq!(engine.in_flight_request_ids().count(), 5);
            let collected = drain(&mut engine);
            for i in 0..5u32 {
                let alone = generate_alone((0..10 + i).collect(), greedy(8), 64, VOCAB).unwrap();
                let got = &collected[&format!("r{i}")];
                assert_eq!((&got.token_ids, got.finish_reason), (&alone.token_ids, alone.finish_reason));
            }
            assert_eq!(engine.stats().kv_cache_usage, 0.0);
            // One prefill step and 7 decode steps: max_tokens is foreseen, so no step is wasted.
            assert_eq!(engine.executor().num_steps, 8);
            assert_eq!(engine.executor().num_in_flight(), 0);
        }
    }

    #[test]
    fn a_stop_token_with_the_next_step_in_flight_discards_that_step() {
        let prompt: Vec<u32> = (0..6).collect();
        let first = generate_alone(prompt.clone(), greedy(1), 64, VOCAB).unwrap().token_ids[0];
        let params = Arc::new(SamplingParams { stop_token_ids: vec![first], ..SamplingParams::greedy(10) });
        let mut engine = async_engine(64, true);
        engine.add_request(Request::new("a", prompt.clone(), params)).unwrap();
        assert!(engine.step().unwrap().is_empty());
        // Step 1 is planned with the unknown first token before step 0's stop comes back.
        let outputs = engine.step().unwrap();
        assert_eq!(outputs.len(), 1);
        assert_eq!(outputs[0].new_token_ids, vec![first]);
        assert_eq!(outputs[0].finish_reason, Some(FinishReason::Stop));
        assert_eq!(engine.in_flight_request_ids().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(engine.stats().kv_cache_usage, 0.0, "blocks are freed when the request finishes");
        // The same id comes back while the discarded step is still in flight: the stale output must
        // not land on the new request.
        engine.add_request(Request::new("a", prompt.clone(), greedy(3))).unwrap();
        let collected = drain(&mut engine);
        let alone = generate_alone(prompt, greedy(3), 64, VOCAB).unwrap();
        assert_eq!(collected["a"].token_ids, alone.token_ids);
        assert_eq!(engine.stats().kv_cache_usage, 0.0);
    }

    #[test]
    fn an_async_abort_mid_flight_gives_one_final_output() {
        let mut engine = async_engine(64, true);
        engine.add_request(Request::new("a", vec![1, 2, 3], greedy(20))).unwrap();
        engine.step().unwrap();
        engine.step().unwrap();
        assert_eq!(engine.abort_requests(["a"]), 1);
        assert_eq!(engine.stats().kv_cache_usage, 0.0);
        let collected = drain(&mut engine);
        assert_eq!(collected["a"].finish_reason, Some(FinishReason::Abort));
        assert_eq!(engine.executor().num_in_flight(), 0);
    }

    #[test]
    fn an_async_failure_in_either_phase_aborts_every_step_in_flight() {
        for fail_in_collect in [false, true] {
            let mut engine = async_engine(64, true);
            if fail_in_collect {
                engine.executor_mut().fail_at_collect = Some(1);
            } else {
                engine.executor_mut().fail_at_step = Some(2);
            }
            engine.add_request(Request::new("a", vec![1, 2, 3], greedy(8))).unwrap();
            engine.step().unwrap();
            engine.add_request(Request::new("b", vec![4, 5, 6, 7], greedy(8))).unwrap();
            engine.step().unwrap();
            assert!(matches!(engine.step(), Err(CoreError::Execution(_))));
            assert_eq!(engine.in_flight_request_ids().count(), 0);
            assert_eq!(engine.executor().num_in_flight(), 0, "the other step in flight was waited for");
            assert_eq!(engine.stats().kv_cache_usage, 0.0, "the aborted requests' blocks are freed");
            engine.add_request(Request::new("c", vec![4, 5, 6], greedy(2))).unwrap();
            let collected = drain(&mut engine);
            assert_eq!(collected["a"].finish_reason, Some(FinishReason::Abort));
            assert_eq!(collected["b"].finish_reason, Some(FinishReason::Abort));
            assert_eq!(collected["c"].finish_reason, Some(FinishReason::Length));
            assert_eq!(collected["c"].token_ids.len(), 2);
        }
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
