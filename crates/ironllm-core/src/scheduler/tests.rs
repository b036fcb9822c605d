//! Scenario tests for the scheduler, each driving it against the fake model and checking the block
//! accounting and the plan's caps after every step.

use std::collections::HashMap;
use std::sync::Arc;

use super::*;
use crate::executor::ModelExecutor;
use crate::testing::{
    check_plan, check_scheduler_invariants, fake_next_token, generate_alone, CollectedOutput, FakeModel,
};
use crate::SamplingParams;

const VOCAB: u32 = 101;

/// A scheduler, the fake model it plans for, and everything reported so far.
struct Harness {
    scheduler: Scheduler,
    model: FakeModel,
    outputs: HashMap<String, CollectedOutput>,
}

impl Harness {
    fn new(config: SchedulerConfig) -> Harness {
        let model = FakeModel::for_config(&config, VOCAB);
        Harness { scheduler: Scheduler::new(config).unwrap(), model, outputs: HashMap::new() }
    }

    fn add(&mut self, req_id: &str, prompt: Vec<u32>, params: SamplingParams) {
        self.add_request(Request::new(req_id, prompt, Arc::new(params)));
    }

    fn add_request(&mut self, request: Request) {
        self.scheduler.add_request(request).unwrap();
    }

    /// One checked step; returns its plan.
    fn step(&mut self) -> SchedulerOutput {
        let plan = self.scheduler.schedule();
        check_plan(self.scheduler.config(), &plan).unwrap();
        let runner_output = if plan.total_num_scheduled_tokens > 0 {
            self.model.execute_model(&plan).unwrap()
        } else {
            ModelRunnerOutput::default()
        };
        for output in self.scheduler.update_from_output(&plan, runner_output) {
            self.outputs.entry(output.req_id.clone()).or_default().absorb(output).unwrap();
        }
        check_scheduler_invariants(&self.scheduler).unwrap();
        plan
    }

    /// Steps until nothing is left; returns every plan.
    fn run(&mut self) -> Vec<SchedulerOutput> {
        let mut plans = Vec::new();
        while self.scheduler.has_unfinished_requests() {
            assert!(plans.len() < 10_000, "the scheduler made no progress");
            plans.push(self.step());
        }
        assert_eq!(self.scheduler.kv_cache_manager().num_free_blocks(), self.scheduler.config().num_blocks);
        plans
    }

    /// Checks a finished request's tokens against the same request run alone.
    fn assert_matches_alone(&self, req_id: &str, prompt: Vec<u32>, params: SamplingParams) {
        let max_model_len = self.scheduler.config().max_model_len;
        let alone = generate_alone(prompt, Arc::new(params), max_model_len, VOCAB).unwrap();
        let got = &self.outputs[req_id];
        assert_eq!(got.token_ids, alone.token_ids, "`{req_id}` differs from running alone");
        assert_eq!(got.finish_reason, alone.finish_reason);
    }
}

/// vLLM's admission (no headroom): most scenarios here check vLLM's behaviour, preemption included.
fn config(max_model_len: usize, block_size: usize, num_blocks: usize) -> SchedulerConfig {
    SchedulerConfig { block_size, admission_headroom_tokens: 0, ..SchedulerConfig::new(max_model_len, num_blocks) }
}

/// `len` tokens that differ per `seed`.
fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| (seed * 31 + i * 7) % VOCAB).collect()
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams { ignore_eos: true, ..SamplingParams::greedy(max_tokens) }
}

fn scheduled_ids(plan: &SchedulerOutput) -> Vec<&str> {
    plan.num_scheduled_tokens.iter().map(|(id, _)| id.as_str()).collect()
}

#[test]
fn config_validation_names_the_bounds() {
    let err = |c: SchedulerConfig| c.validate().unwrap_err().to_string();
    assert!(err(config(64, 16, 3)).contains("larger than the maximum number of tokens"));
    let no_chunking = SchedulerConfig {
        enable_chunked_prefill: false,
        max_num_batched_tokens: 32,
        max_num_seqs: 8,
        ..config(64, 16, 8)
    };
    assert!(err(no_chunking).contains("max_num_batched_tokens (32) is smaller than max_model_len (64)"));
    let small_budget = SchedulerConfig { max_num_batched_tokens: 4, max_num_seqs: 8, ..config(64, 16, 8) };
    assert!(err(small_budget).contains("greater than or equal to max_num_seqs (8)"));
    assert!(err(config(64, 0, 8)).contains("block_size must be at least 1"));
    config(64, 16, 4).validate().unwrap();
}

#[test]
fn add_request_rejects_bad_requests_with_clear_errors() {
    let mut scheduler = Scheduler::new(config(16, 4, 8)).unwrap();
    let params = Arc::new(greedy(4));
    let too_long = scheduler.add_request(Request::new("a", prompt(0, 17), params.clone()));
    assert!(matches!(&too_long, Err(CoreError::TooLong(msg)) if msg.contains("maximum model length of 16")));
    let empty = scheduler.add_request(Request::new("a", vec![], params.clone()));
    assert!(matches!(empty, Err(CoreError::InvalidParams(_))));
    scheduler.add_request(Request::new("a", prompt(0, 4), params.clone())).unwrap();
    let duplicate = scheduler.add_request(Request::new("a", prompt(0, 4), params));
    assert!(matches!(duplicate, Err(CoreError::DuplicateRequest(id)) if id == "a"));
}

#[test]
fn max_tokens_is_resolved_against_the_context() {
    let mut h = Harness::new(config(16, 4, 8));
    let unbounded = SamplingParams { max_tokens: None, ..greedy(1) };
    h.add("fills-context", prompt(1, 10), unbounded.clone());
    h.add("full-prompt", prompt(2, 16), unbounded);
    h.add("asks-too-much", prompt(3, 12), greedy(100));
    assert_eq!(h.scheduler.request("fills-context").unwrap().max_tokens, 6);
    h.run();
    assert_eq!(h.outputs["fills-context"].token_ids.len(), 6);
    assert_eq!(h.outputs["full-prompt"].token_ids.len(), 1, "a prompt of max_model_len still samples once");
    assert_eq!(h.outputs["asks-too-much"].token_ids.len(), 4);
    for out in h.outputs.values() {
        assert_eq!(out.finish_reason, Some(FinishReason::Length));
    }
}

#[test]
fn token_budget_holds_and_decodes_go_before_prefills() {
    let config = SchedulerConfig { max_num_batched_tokens: 16, max_num_seqs: 8, ..config(64, 4, 64) };
    let mut h = Harness::new(config);
    let mut next_id = 0;
    for step in 0..40 {
        if step % 3 == 0 && next_id < 8 {
            h.add(&format!("r{next_id}"), prompt(next_id, 11 + next_id as usize), greedy(12));
            next_id += 1;
        }
        let decoding: Vec<String> = h
            .scheduler
            .running_request_ids()
            .filter(|id| h.scheduler.request(id).unwrap().num_tokens_to_compute() == 1)
            .map(str::to_owned)
            .collect();
        let plan = h.step();
        assert!(plan.total_num_scheduled_tokens <= 16);
        // Every decode is planned, for one token, ahead of any prefill.
        let planned = scheduled_ids(&plan);
        assert_eq!(&planned[..decoding.len()], decoding.iter().map(String::as_str).collect::<Vec<_>>());
        for (_, n) in &plan.num_scheduled_tokens[..decoding.len()] {
            assert_eq!(*n, 1);
        }
    }
    h.run();
    for i in 0..8 {
        h.assert_matches_alone(&format!("r{i}"), prompt(i, 11 + i as usize), greedy(12));
    }
}

#[test]
fn max_num_seqs_caps_running_requests() {
    let mut h = Harness::new(SchedulerConfig { max_num_seqs: 2, ..config(64, 4, 64) });
    for i in 0..5 {
        h.add(&format!("r{i}"), prompt(i, 5), greedy(6));
    }
    let plan = h.step();
    assert_eq!(scheduled_ids(&plan), ["r0", "r1"]);
    assert_eq!((h.scheduler.num_running(), h.scheduler.num_waiting()), (2, 3));
    h.run();
    for i in 0..5 {
        h.assert_matches_alone(&format!("r{i}"), prompt(i, 5), greedy(6));
    }
}

#[test]
fn chunked_prefill_splits_a_long_prompt_and_keeps_outputs() {
    let mut h = Harness::new(SchedulerConfig { max_num_batched_tokens: 8, max_num_seqs: 2, ..config(64, 4, 64) });
    let params = SamplingParams { prompt_logprobs: Some(2), ..greedy(5) };
    h.add("long", prompt(7, 21), params.clone());
    let chunks: Vec<usize> = (0..3).map(|_| h.step().num_scheduled_tokens[0].1).collect();
    assert_eq!(chunks, [8, 8, 5]);
    assert!(h.outputs["long"].token_ids.len() == 1, "a token is sampled only after the last chunk");
    h.run();
    h.assert_matches_alone("long", prompt(7, 21), params);
    // Prompt logprobs arrive chunk by chunk, one per prompt position after the first.
    let chosen: Vec<u32> = h.outputs["long"].prompt_logprobs.iter().map(|p| p.chosen.token_id).collect();
    assert_eq!(chosen, &prompt(7, 21)[1..]);
}

#[test]
fn long_prefill_threshold_caps_each_chunk() {
    let config = SchedulerConfig { long_prefill_token_threshold: 5, ..config(64, 4, 64) };
    let mut h = Harness::new(config);
    h.add("a", prompt(1, 12), greedy(3));
    h.add("b", prompt(2, 3), greedy(3));
    let plan = h.step();
    assert_eq!(plan.num_scheduled_tokens, [("a".to_string(), 5), ("b".to_string(), 3)]);
    assert_eq!(h.step().num_scheduled_tokens[0], ("a".to_string(), 5));
    h.run();
    h.assert_matches_alone("a", prompt(1, 12), greedy(3));
}

#[test]
fn without_chunked_prefill_a_prompt_waits_for_room() {
    let config = SchedulerConfig {
        enable_chunked_prefill: false,
        max_num_batched_tokens: 32,
        max_num_seqs: 4,
        ..config(32, 4, 64)
    };
    let mut h = Harness::new(config);
    h.add("a", prompt(1, 20), greedy(4));
    h.add("b", prompt(2, 20), greedy(4));
    let plan = h.step();
    assert_eq!(plan.num_scheduled_tokens, [("a".to_string(), 20)]);
    let plan = h.step();
    assert_eq!(plan.num_scheduled_tokens, [("a".to_string(), 1), ("b".to_string(), 20)]);
    h.run();
    h.assert_matches_alone("b", prompt(2, 20), greedy(4));
}

#[test]
fn fcfs_preempts_the_newest_and_resumes_it_first() {
    // 8 blocks of 2 tokens: two requests growing to 14 tokens each cannot both fit; `later` waits for a
    // running slot.
    let mut h = Harness::new(SchedulerConfig { max_num_seqs: 2, ..config(16, 2, 8) });
    h.add("old", prompt(1, 4), greedy(10));
    h.add("new", prompt(2, 4), greedy(10));
    h.add("later", prompt(3, 2), greedy(2));
    let plans = h.run();
    let first = plans.iter().position(|p| !p.preempted_req_ids.is_empty()).expect("a preemption");
    assert_eq!(plans[first].preempted_req_ids, ["new"]);
    assert!(scheduled_ids(&plans[first]).contains(&"old"));
    assert!(plans[first].scheduled_new_reqs.is_empty(), "no admissions in a step that preempted");
    // `new` comes back before `later`, as a new request carrying its outputs so far.
    let resumed = plans[first + 1..].iter().flat_map(|p| &p.scheduled_new_reqs).next().expect("a resumption");
    assert_eq!(resumed.req_id, "new");
    assert!(!resumed.output_token_ids.is_empty());
    assert!(h.scheduler.num_preemptions_total() >= 1);
    h.assert_matches_alone("old", prompt(1, 4), greedy(10));
    h.assert_matches_alone("new", prompt(2, 4), greedy(10));
    h.assert_matches_alone("later", prompt(3, 2), greedy(2));
}

#[test]
fn admission_headroom_waits_instead_of_preempting() {
    // 8 blocks of 2 tokens. `old` grows to 14 tokens (7 blocks), `new` to 10 (5 blocks): together they
    // outgrow the cache, so vLLM's admission takes `new` at once and preempts later. With room kept for
    // 16 tokens of growth, `new` (which alone would fit the 6 free blocks) waits until `old` is done.
    let scenario = |headroom: usize| {
        let mut h =
            Harness::new(SchedulerConfig { max_num_seqs: 2, admission_headroom_tokens: headroom, ..config(16, 2, 8) });
        h.add("old", prompt(1, 4), greedy(10));
        h.add("new", prompt(2, 4), greedy(6));
        let plans = h.run();
        h.assert_matches_alone("old", prompt(1, 4), greedy(10));
        h.assert_matches_alone("new", prompt(2, 4), greedy(6));
        let admitted = plans.iter().position(|p| p.scheduled_new_reqs.iter().any(|r| r.req_id == "new"));
        // A finished request is reported to the runner with the next plan.
        let old_done = plans.iter().position(|p| p.finished_req_ids.iter().any(|id| id == "old"));
        (h.scheduler.num_preemptions_total(), admitted.expect("new runs"), old_done)
    };
    let (preemptions, admitted, _) = scenario(0);
    assert!(preemptions > 0 && admitted == 0, "vLLM's admission: at once, then preempted");
    let (preemptions, admitted, old_done) = scenario(16);
    assert_eq!(preemptions, 0);
    assert_eq!(Some(admitted), old_done, "`new` is admitted in the plan that reports `old` finished");
}

#[test]
fn admission_headroom_counts_prefix_hits_taken_from_the_free_queue() {
    // `a` leaves its 3 full prompt blocks cached in the free queue. While `r` runs (2 blocks held, 4 more
    // kept for its growth), `b` finds those 3 blocks for its prompt and needs 2 more: 6 blocks are free,
    // but 3 of them are the hits it takes out of the free queue, so it must wait.
    let mut h = Harness::new(SchedulerConfig { admission_headroom_tokens: 16, ..config(16, 2, 8) });
    let shared = prompt(9, 6);
    h.add("a", shared.clone(), greedy(1));
    h.step();
    assert!(h.outputs["a"].finish_reason.is_some());
    h.add("r", prompt(3, 2), greedy(10));
    h.step();
    let mut b_prompt = shared.clone();
    b_prompt.extend([1, 2]);
    h.add("b", b_prompt.clone(), greedy(1));
    let plan = h.step();
    assert_eq!(h.scheduler.kv_cache_manager().num_free_blocks(), 6, "`r` holds 2 blocks after its decode");
    assert!(plan.scheduled_new_reqs.is_empty(), "`b` was admitted on blocks it takes from the free queue");
    h.run();
    assert_eq!(h.scheduler.num_preemptions_total(), 0);
    h.assert_matches_alone("b", b_prompt, greedy(1));
}

#[test]
fn admission_headroom_under_priority_keeps_room_only_for_higher_priority() {
    // As in the first headroom scenario, but `new` outranks `old`: `old`'s room is not kept from it, so it
    // is admitted at once (and `old` may be preempted, as under vLLM's admission).
    let mut h = Harness::new(SchedulerConfig {
        max_num_seqs: 2,
        admission_headroom_tokens: 16,
        policy: SchedulingPolicy::Priority,
        ..config(16, 2, 8)
    });
    h.add_request(Request::new("old", prompt(1, 4), Arc::new(greedy(10))).with_priority(5));
    h.step();
    h.add_request(Request::new("new", prompt(2, 4), Arc::new(greedy(4))).with_priority(0));
    let plan = h.step();
    assert_eq!(plan.scheduled_new_reqs.iter().map(|r| r.req_id.as_str()).collect::<Vec<_>>(), ["new"]);
    h.run();
    h.assert_matches_alone("old", prompt(1, 4), greedy(10));
    h.assert_matches_alone("new", prompt(2, 4), greedy(4));
}

#[test]
fn admission_headroom_is_capped_by_max_tokens() {
    // 16 blocks of 2 tokens; each request reaches 7 tokens (4 blocks) whatever the headroom, so all four
    // fit at once (16 blocks) and are admitted in the first step.
    let mut h = Harness::new(SchedulerConfig { max_num_seqs: 8, admission_headroom_tokens: 1000, ..config(32, 2, 16) });
    for i in 0..4 {
        h.add(&format!("r{i}"), prompt(i, 4), greedy(3));
    }
    assert_eq!(h.step().scheduled_new_reqs.len(), 4);
    // Their decodes take a block each; the 4 blocks left are the four's last growth, so a 2-token prompt
    // waits although it would fit.
    h.add("late", prompt(4, 2), greedy(2));
    let plan = h.step();
    assert_eq!(h.scheduler.kv_cache_manager().num_free_blocks(), 4);
    assert!(plan.scheduled_new_reqs.is_empty());
    h.run();
    assert_eq!(h.scheduler.num_preemptions_total(), 0);
    h.assert_matches_alone("late", prompt(4, 2), greedy(2));
}

#[test]
fn preempted_request_waits_at_the_front() {
    let mut h = Harness::new(SchedulerConfig { max_num_seqs: 2, ..config(16, 2, 8) });
    h.add("old", prompt(1, 4), greedy(10));
    h.add("new", prompt(2, 4), greedy(10));
    h.add("later", prompt(3, 2), greedy(2));
    while h.scheduler.num_preemptions_total() == 0 {
        h.step();
    }
    assert_eq!(h.scheduler.request("new").unwrap().status, RequestStatus::Preempted);
    assert_eq!(h.scheduler.waiting_request_ids().collect::<Vec<_>>(), ["new", "later"]);
    assert!(h.scheduler.kv_cache_manager().block_table("new").is_none());
}

#[test]
fn priority_policy_admits_by_priority_and_preempts_the_lowest() {
    let mut h =
        Harness::new(SchedulerConfig { max_num_seqs: 1, policy: SchedulingPolicy::Priority, ..config(32, 4, 16) });
    for (id, priority) in [("x", 3), ("y", 1), ("z", 2)] {
        h.add_request(Request::new(id, prompt(priority as u32, 4), Arc::new(greedy(2))).with_priority(priority));
    }
    let order: Vec<String> =
        h.run().iter().flat_map(|p| p.scheduled_new_reqs.iter().map(|r| r.req_id.clone())).collect();
    assert_eq!(order, ["y", "z", "x"]);

    // Now preemption: "low" arrives first but has the largest priority value, so it goes, not the newest.
    let mut h = Harness::new(SchedulerConfig { policy: SchedulingPolicy::Priority, ..config(16, 2, 9) });
    h.add_request(Request::new("low", prompt(1, 4), Arc::new(greedy(10))).with_priority(5));
    h.step();
    h.add_request(Request::new("high", prompt(2, 4), Arc::new(greedy(10))).with_priority(0));
    h.add_request(Request::new("mid", prompt(3, 4), Arc::new(greedy(10))).with_priority(1));
    let plans = h.run();
    let first = plans.iter().find(|p| !p.preempted_req_ids.is_empty()).expect("a preemption");
    assert_eq!(first.preempted_req_ids, ["low"]);
    for (id, seed) in [("low", 1), ("high", 2), ("mid", 3)] {
        h.assert_matches_alone(id, prompt(seed, 4), greedy(10));
    }
}

#[test]
fn abort_frees_blocks_at_once_and_reports_next_step() {
    let mut h = Harness::new(config(64, 4, 32));
    h.add("running", prompt(1, 10), greedy(20));
    h.add("other", prompt(2, 6), greedy(20));
    h.step();
    h.add("waiting", prompt(3, 6), greedy(20));
    let held = h.scheduler.kv_cache_manager().block_table("running").unwrap().len();
    let free_before = h.scheduler.kv_cache_manager().num_free_blocks();
    assert_eq!(h.scheduler.abort_requests(["running", "waiting", "unknown"]), 2);
    assert_eq!(h.scheduler.kv_cache_manager().num_free_blocks(), free_before + held);
    check_scheduler_invariants(&h.scheduler).unwrap();
    assert_eq!(h.scheduler.abort_requests(["running"]), 0, "aborting twice is harmless");
    let plan = h.step();
    assert!(plan.finished_req_ids.contains(&"running".to_string()));
    assert!(!scheduled_ids(&plan).contains(&"running"));
    assert_eq!(h.outputs["running"].finish_reason, Some(FinishReason::Abort));
    assert_eq!(h.outputs["waiting"].finish_reason, Some(FinishReason::Abort));
    assert_eq!(h.model.num_sequences(), 1, "the runner dropped the aborted request");
    h.run();
    h.assert_matches_alone("other", prompt(2, 6), greedy(20));
}

#[test]
fn prefix_cache_hits_whole_blocks_and_keeps_outputs() {
    let mut h = Harness::new(config(128, 4, 64));
    let shared = prompt(5, 40);
    h.add("first", shared.clone(), greedy(4));
    h.run();
    let mut diverging = shared[..32].to_vec();
    diverging.extend([1, 2, 3, 4, 5]);
    h.add("diverging", diverging.clone(), greedy(4));
    h.add("same", shared.clone(), greedy(4));
    h.run();
    assert_eq!(h.outputs["first"].num_cached_tokens, 0);
    assert_eq!(h.outputs["diverging"].num_cached_tokens, 32);
    // The identical prompt backs off its last block so the step still has logits.
    assert_eq!(h.outputs["same"].num_cached_tokens, 36);
    assert_eq!(h.scheduler.prefix_cache_hits(), 32 + 36);
    assert_eq!(h.scheduler.prefix_cache_queries(), 40 + 37 + 40);
    h.assert_matches_alone("diverging", diverging, greedy(4));
    h.assert_matches_alone("same", shared, greedy(4));
    assert!(h.scheduler.reset_prefix_cache());
    assert_eq!(h.scheduler.kv_cache_manager().block_pool().num_cached_blocks(), 0);
}

#[test]
fn stop_conditions_follow_vllm() {
    let p = prompt(9, 6);
    let mut reference = p.clone();
    for _ in 0..30 {
        reference.push(fake_next_token(&reference, VOCAB));
    }
    let generated = &reference[6..];
    let k = 3;
    let stop_token = generated[k];
    let first = generated.iter().position(|&t| t == stop_token).unwrap();
    let later = generated[first + 1..].iter().position(|&t| t == stop_token).map(|i| i + first + 1);

    let mut h = Harness::new(config(64, 4, 64));
    let eos = |extra: SamplingParams| SamplingParams { eos_token_ids: vec![stop_token], ..extra };
    h.add("eos", p.clone(), eos(SamplingParams::greedy(30)));
    h.add("ignore-eos", p.clone(), eos(SamplingParams { ignore_eos: true, ..SamplingParams::greedy(30) }));
    h.add("min-tokens", p.clone(), eos(SamplingParams { min_tokens: first + 2, ..SamplingParams::greedy(30) }));
    h.add("stop-id", p.clone(), SamplingParams { stop_token_ids: vec![stop_token], ..greedy(30) });
    h.run();
    assert_eq!(h.outputs["eos"].token_ids, &generated[..=first]);
    assert_eq!(h.outputs["eos"].stop_reason, Some(StopReason::Eos));
    assert_eq!(h.outputs["ignore-eos"].token_ids.len(), 30);
    assert_eq!(h.outputs["ignore-eos"].finish_reason, Some(FinishReason::Length));
    let min_tokens_len = later.map_or(30, |i| i + 1);
    assert_eq!(h.outputs["min-tokens"].token_ids.len(), min_tokens_len);
    assert_eq!(h.outputs["stop-id"].token_ids, &generated[..=first]);
    assert_eq!(h.outputs["stop-id"].stop_reason, Some(StopReason::TokenId(stop_token)));
    assert_eq!(h.outputs["stop-id"].finish_reason, Some(FinishReason::Stop));
}

#[test]
fn logprobs_and_prompt_logprobs_survive_preemption_once() {
    let mut h = Harness::new(SchedulerConfig { max_num_batched_tokens: 6, max_num_seqs: 4, ..config(16, 2, 8) });
    let params = SamplingParams { logprobs: Some(1), prompt_logprobs: Some(1), ..greedy(10) };
    h.add("a", prompt(1, 5), params.clone());
    h.add("b", prompt(2, 5), params.clone());
    h.run();
    assert!(h.scheduler.num_preemptions_total() >= 1);
    for (id, seed) in [("a", 1), ("b", 2)] {
        let out = &h.outputs[id];
        assert_eq!(out.num_logprobs, out.token_ids.len());
        let chosen: Vec<u32> = out.prompt_logprobs.iter().map(|p| p.chosen.token_id).collect();
        assert_eq!(chosen, &prompt(seed, 5)[1..]);
        h.assert_matches_alone(id, prompt(seed, 5), params.clone());
    }
}

#[test]
fn finish_requests_reports_the_stop_string() {
    let mut h = Harness::new(config(64, 4, 32));
    h.add("a", prompt(1, 5), greedy(20));
    h.step();
    let stop = Some(StopReason::String("\n\n".to_string()));
    assert_eq!(h.scheduler.finish_requests(["a"], FinishReason::Stop, stop.clone()), 1);
    assert_eq!(h.scheduler.kv_cache_usage(), 0.0);
    h.run();
    assert_eq!(h.outputs["a"].finish_reason, Some(FinishReason::Stop));
    assert_eq!(h.outputs["a"].stop_reason, stop);
    assert_eq!(h.outputs["a"].token_ids.len(), 1);
}

#[test]
fn a_request_the_runner_skipped_is_aborted_not_stuck() {
    let mut scheduler = Scheduler::new(config(64, 4, 32)).unwrap();
    scheduler.add_request(Request::new("a", prompt(1, 5), Arc::new(greedy(4)))).unwrap();
    let plan = scheduler.schedule();
    let outputs = scheduler.update_from_output(&plan, ModelRunnerOutput::default());
    assert_eq!(outputs[0].finish_reason, Some(FinishReason::Abort));
    assert!(!scheduler.has_unfinished_requests());
    assert_eq!(scheduler.kv_cache_usage(), 0.0);
}

#[test]
fn stats_snapshot_reflects_state() {
    let mut h = Harness::new(SchedulerConfig { max_num_seqs: 1, ..config(64, 4, 16) });
    h.add("a", prompt(1, 8), greedy(3));
    h.add("b", prompt(2, 8), greedy(3));
    h.step();
    let stats = h.scheduler.make_stats();
    assert_eq!((stats.num_running, stats.num_waiting), (1, 1));
    assert_eq!(stats.kv_cache_usage, 2.0 / 16.0);
    assert_eq!(stats.prefix_cache_queries, 8);
}

#[test]
fn async_plans_schedule_the_next_decode_before_the_output_is_back() {
    let mut scheduler = Scheduler::new(SchedulerConfig { async_scheduling: true, ..config(64, 4, 16) }).unwrap();
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(2) };
    scheduler.add_request(Request::new("a", (0..6).collect(), Arc::new(params))).unwrap();
    let mut model = FakeModel::new(16, 4, VOCAB);
    let plan0 = scheduler.schedule();
    assert_eq!(plan0.async_sampling_req_ids, vec!["a".to_string()]);
    let out0 = model.execute_model(&plan0).unwrap();
    // Planned before step 0's token is known: its input is that token, a placeholder the runner fills.
    let plan1 = scheduler.schedule();
    assert_eq!(plan1.num_scheduled_tokens, vec![("a".to_string(), 1)]);
    assert_eq!(plan1.scheduled_cached_reqs[0].num_computed_tokens, 6);
    assert_eq!(plan1.async_sampling_req_ids, vec!["a".to_string()]);
    let request = scheduler.request("a").unwrap();
    assert_eq!((request.num_output_placeholders(), request.num_computed_tokens), (2, 7));
    let out1 = model.execute_model(&plan1).unwrap();
    // The two steps in flight reach max_tokens = 2: nothing more is planned for it.
    assert_eq!(scheduler.schedule().total_num_scheduled_tokens, 0);
    let first = scheduler.update_from_output(&plan0, out0);
    assert_eq!((first[0].new_token_ids.len(), first[0].finish_reason), (1, None));
    let second = scheduler.update_from_output(&plan1, out1);
    assert_eq!(second[0].finish_reason, Some(FinishReason::Length));
    let mut tokens: Vec<u32> = (0..6).collect();
    for output in first.iter().chain(&second) {
        assert_eq!(output.new_token_ids, vec![fake_next_token(&tokens, VOCAB)]);
        tokens.extend_from_slice(&output.new_token_ids);
    }
    assert_eq!(scheduler.kv_cache_usage(), 0.0);
    assert!(!scheduler.has_unfinished_requests());
}
