//! Randomized property tests for the scheduler, KV cache manager and block pool, driven against the
//! fake model (whose next token hashes the whole history, read back through the block tables).
//!
//! Each scenario draws a config (block size, a KV cache from "barely one max-length request" to roomy,
//! token budget, max_num_seqs, chunked prefill on/off, long-prefill threshold, prefix caching on/off,
//! FCFS or priority) and a workload (arrival steps, prompts sharing prefixes, max_tokens, EOS, stop ids,
//! min_tokens, logprobs, priorities, aborts at random times). After every step it checks the plan's
//! caps and the block accounting; at the end, that every request finished exactly once, every block is
//! free, and every request's tokens equal what the fake model produces for it alone in a roomy engine
//! (an aborted request's tokens are a prefix of that): chunking, prefix hits and preemption never change
//! outputs. Seeds are fixed, so a failure names the seed that reproduces it.

use std::collections::HashMap;
use std::sync::Arc;

use ironllm_core::engine::EngineCore;
use ironllm_core::executor::ModelExecutor;
use ironllm_core::outputs::{FinishReason, ModelRunnerOutput};
use ironllm_core::spec_decode::{SpeculativeConfig, SpeculativeMethod};
use ironllm_core::testing::{
    check_plan, check_scheduler_invariants, generate_alone, CollectedOutput, FakeModel, FakeSpeculation, SplitMix64,
};
use ironllm_core::{CoreError, Request, SamplingParams, Scheduler, SchedulerConfig, SchedulingPolicy};

const VOCAB: u32 = 64;

/// One request of a workload.
#[derive(Debug, Clone)]
struct Planned {
    req_id: String,
    arrival_step: usize,
    prompt: Vec<u32>,
    params: Arc<SamplingParams>,
    priority: i32,
    abort_at_step: Option<usize>,
}

/// What a scenario exercised, so the suite can check its randomness reached the interesting paths.
#[derive(Debug, Default)]
struct Coverage {
    steps: usize,
    preemptions: u64,
    prefix_hit_tokens: u64,
    partial_prefill_chunks: usize,
    aborted_while_running: usize,
    finished_by_stop: usize,
    finished_by_length: usize,
    draft_tokens: u64,
    accepted_tokens: u64,
}

impl Coverage {
    fn add(&mut self, other: &Coverage) {
        self.steps += other.steps;
        self.preemptions += other.preemptions;
        self.prefix_hit_tokens += other.prefix_hit_tokens;
        self.partial_prefill_chunks += other.partial_prefill_chunks;
        self.aborted_while_running += other.aborted_while_running;
        self.finished_by_stop += other.finished_by_stop;
        self.finished_by_length += other.finished_by_length;
        self.draft_tokens += other.draft_tokens;
        self.accepted_tokens += other.accepted_tokens;
    }
}

fn random_config(rng: &mut SplitMix64) -> SchedulerConfig {
    let block_size = *rng.pick(&[1, 2, 4, 8, 16]);
    let max_model_len = rng.range(8, 160);
    let min_blocks = max_model_len.div_ceil(block_size);
    // Half the time the cache barely holds one max-length request: preemption is routine.
    let num_blocks = if rng.chance(0.5) { min_blocks + rng.below(3) } else { rng.range(min_blocks, min_blocks * 4) };
    let max_num_seqs = rng.range(1, 12);
    let enable_chunked_prefill = rng.chance(0.7);
    let max_num_batched_tokens = if enable_chunked_prefill {
        rng.range(max_num_seqs, max_num_seqs + 96)
    } else {
        rng.range(max_model_len.max(max_num_seqs), max_model_len + 64)
    };
    let long_prefill_token_threshold = if enable_chunked_prefill && rng.chance(0.3) { rng.range(1, 24) } else { 0 };
    SchedulerConfig {
        max_num_seqs,
        max_num_batched_tokens,
        max_model_len,
        block_size,
        num_blocks,
        enable_prefix_caching: rng.chance(0.8),
        enable_chunked_prefill,
        long_prefill_token_threshold,
        policy: if rng.chance(0.5) { SchedulingPolicy::Fcfs } else { SchedulingPolicy::Priority },
        // A third of the scenarios speculate: n-gram style (no lookahead) or draft-model style (k
        // lookahead slots), turned off from a random batch size.
        speculative: rng.chance(0.35).then(|| {
            let k = rng.range(1, 5);
            let method = if rng.chance(0.5) {
                SpeculativeMethod::Ngram { prompt_lookup_min: 1, prompt_lookup_max: 3 }
            } else {
                SpeculativeMethod::DraftModel { model: "fake".into() }
            };
            SpeculativeConfig { method, num_speculative_tokens: k, disable_by_batch_size: Some(rng.range(2, 16)) }
        }),
        async_scheduling: false,
        // Half the scenarios admit with a decode headroom, so admission may hold back while blocks are free.
        admission_headroom_tokens: if rng.chance(0.5) { 0 } else { rng.range(1, 48) },
    }
}

fn random_tokens(rng: &mut SplitMix64, len: usize) -> Vec<u32> {
    (0..len).map(|_| rng.below(VOCAB as usize) as u32).collect()
}

fn random_params(rng: &mut SplitMix64) -> SamplingParams {
    let max_tokens = if rng.chance(0.15) { None } else { Some(rng.range(1, 40)) };
    let mut params = SamplingParams { max_tokens, ..SamplingParams::greedy(1) };
    if rng.chance(0.5) {
        params.eos_token_ids = vec![rng.below(VOCAB as usize) as u32];
        params.ignore_eos = rng.chance(0.2);
    }
    if rng.chance(0.2) {
        params.min_tokens = rng.range(0, max_tokens.unwrap_or(8));
    }
    if rng.chance(0.2) {
        params.stop_token_ids = vec![rng.below(VOCAB as usize) as u32];
    }
    if rng.chance(0.2) {
        params.logprobs = Some(rng.below(3));
    }
    if rng.chance(0.15) {
        params.prompt_logprobs = Some(rng.below(3));
    }
    params
}

fn random_workload(rng: &mut SplitMix64, config: &SchedulerConfig) -> Vec<Planned> {
    let max_len = config.max_model_len;
    let shared_prefixes: Vec<Vec<u32>> = (0..3).map(|_| random_tokens(rng, max_len)).collect();
    let num_requests = rng.range(1, 40);
    (0..num_requests)
        .map(|i| {
            let len = if rng.chance(0.1) { max_len } else { rng.range(1, max_len) };
            let prompt = if rng.chance(0.6) {
                let prefix = rng.pick(&shared_prefixes);
                let shared = rng.range(0, len);
                let mut prompt = prefix[..shared].to_vec();
                prompt.extend(random_tokens(rng, len - shared));
                prompt
            } else {
                random_tokens(rng, len)
            };
            let arrival_step = rng.below(30);
            Planned {
                req_id: format!("req-{i}"),
                arrival_step,
                prompt,
                params: Arc::new(random_params(rng)),
                priority: rng.below(3) as i32,
                abort_at_step: rng.chance(0.1).then(|| arrival_step + rng.below(40)),
            }
        })
        .collect()
}

/// Runs a workload step by step with every check; returns what it exercised.
fn run_scenario(label: &str, config: SchedulerConfig, workload: &[Planned]) -> Coverage {
    let mut scheduler = Scheduler::new(config.clone()).unwrap_or_else(|e| panic!("{label}: {e}"));
    let mut model = FakeModel::for_config(&config, VOCAB);
    if let Some(spec) = &config.speculative {
        model.speculation = Some(FakeSpeculation {
            k: spec.num_speculative_tokens,
            accuracy: 0.7,
            rng: SplitMix64::new(label.len() as u64),
        });
    }
    let mut collected: HashMap<String, CollectedOutput> = HashMap::new();
    let mut coverage = Coverage::default();
    let last_arrival = workload.iter().map(|p| p.arrival_step).max().unwrap_or(0);
    let mut step = 0;
    while step <= last_arrival || scheduler.has_unfinished_requests() {
        assert!(step < 20_000, "{label}: no progress after {step} steps");
        for planned in workload.iter().filter(|p| p.arrival_step == step) {
            let request = Request::new(&planned.req_id, planned.prompt.clone(), planned.params.clone())
                .with_priority(planned.priority);
            scheduler.add_request(request).unwrap_or_else(|e| panic!("{label}: {e}"));
        }
        for planned in workload.iter().filter(|p| p.abort_at_step == Some(step)) {
            let was_running =
                scheduler.request(&planned.req_id).is_some_and(|r| r.status == ironllm_core::RequestStatus::Running);
            let blocks_before = scheduler.kv_cache_manager().num_free_blocks();
            let held = scheduler.kv_cache_manager().block_table(&planned.req_id).map_or(0, |t| t.len());
            scheduler.abort_requests([&planned.req_id]);
            coverage.aborted_while_running += was_running as usize;
            // Blocks come back at once (shared prefix blocks stay held by their other users).
            assert!(
                scheduler.kv_cache_manager().num_free_blocks() <= blocks_before + held,
                "{label}: abort freed more than it held"
            );
            check_scheduler_invariants(&scheduler).unwrap_or_else(|e| panic!("{label}: {e}"));
        }

        let plan = scheduler.schedule();
        check_plan(&config, &plan).unwrap_or_else(|e| panic!("{label} step {step}: {e}"));
        for (req_id, n) in &plan.num_scheduled_tokens {
            let request = scheduler.request(req_id).expect("scheduled requests are tracked");
            coverage.partial_prefill_chunks += (request.num_computed_tokens + n < request.num_tokens()) as usize;
        }
        let runner_output = if plan.total_num_scheduled_tokens > 0 {
            model.execute_model(&plan).unwrap_or_else(|e| panic!("{label} step {step}: {e}"))
        } else {
            ModelRunnerOutput::default()
        };
        for output in scheduler.update_from_output(&plan, runner_output) {
            let entry = collected.entry(output.req_id.clone()).or_default();
            entry.absorb(output).unwrap_or_else(|e| panic!("{label}: {e}"));
        }
        check_scheduler_invariants(&scheduler).unwrap_or_else(|e| panic!("{label} step {step}: {e}"));
        step += 1;
    }
    coverage.steps = step;
    coverage.preemptions = scheduler.num_preemptions_total();
    coverage.prefix_hit_tokens = scheduler.prefix_cache_hits();
    let spec = scheduler.make_stats().spec_decoding;
    coverage.draft_tokens = spec.num_draft_tokens;
    coverage.accepted_tokens = spec.num_accepted_tokens;

    let kv = scheduler.kv_cache_manager();
    assert_eq!(kv.num_free_blocks(), config.num_blocks, "{label}: blocks leaked");
    assert_eq!(kv.usage(), 0.0, "{label}");
    assert_eq!(scheduler.num_unfinished_requests(), 0, "{label}");
    if !config.enable_prefix_caching {
        assert_eq!(scheduler.prefix_cache_queries(), 0, "{label}");
    }

    for planned in workload {
        let label = format!("{label} {}", planned.req_id);
        let got = collected.get(&planned.req_id).unwrap_or_else(|| panic!("{label}: no output"));
        let reason = got.finish_reason.unwrap_or_else(|| panic!("{label}: never finished"));
        let alone = generate_alone(planned.prompt.clone(), planned.params.clone(), config.max_model_len, VOCAB)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        if reason == FinishReason::Abort {
            assert!(alone.token_ids.starts_with(&got.token_ids), "{label}: aborted output diverged");
            continue;
        }
        assert_eq!(got.token_ids, alone.token_ids, "{label}: output differs from running alone");
        assert_eq!((got.finish_reason, &got.stop_reason), (alone.finish_reason, &alone.stop_reason), "{label}");
        match reason {
            FinishReason::Stop => coverage.finished_by_stop += 1,
            FinishReason::Length => coverage.finished_by_length += 1,
            FinishReason::Abort => {}
        }
        if planned.params.logprobs.is_some() {
            assert_eq!(got.num_logprobs, got.token_ids.len(), "{label}: one logprob entry per token");
        }
        if planned.params.prompt_logprobs.is_some() {
            let chosen: Vec<u32> = got.prompt_logprobs.iter().map(|p| p.chosen.token_id).collect();
            assert_eq!(chosen, &planned.prompt[1..], "{label}: prompt logprobs once per position");
        }
        if !config.enable_prefix_caching {
            assert_eq!(got.num_cached_tokens, 0, "{label}");
        }
        assert!(got.num_cached_tokens < planned.prompt.len().max(1), "{label}: a whole prompt hit");
    }
    coverage
}

#[test]
fn random_workloads_keep_invariants_and_outputs() {
    let mut total = Coverage::default();
    for seed in 0..300u64 {
        let mut rng = SplitMix64::new(seed);
        let config = random_config(&mut rng);
        let workload = random_workload(&mut rng, &config);
        let label = format!("seed {seed} ({config:?})");
        total.add(&run_scenario(&label, config, &workload));
    }
    eprintln!("coverage over 300 seeds: {total:?}");
    // The generator must actually reach the paths under test.
    assert!(total.preemptions > 1000, "{total:?}");
    assert!(total.accepted_tokens > 1000 && total.accepted_tokens < total.draft_tokens, "{total:?}");
    assert!(total.prefix_hit_tokens > 10_000, "{total:?}");
    assert!(total.partial_prefill_chunks > 5000, "{total:?}");
    assert!(total.aborted_while_running > 30, "{total:?}");
    assert!(total.finished_by_stop > 200 && total.finished_by_length > 1000, "{total:?}");
}

#[test]
fn sixty_four_concurrent_requests_under_a_tight_kv_budget_all_complete() {
    let mut rng = SplitMix64::new(64);
    let shared = random_tokens(&mut rng, 48);
    for (policy, enable_prefix_caching) in
        [(SchedulingPolicy::Fcfs, true), (SchedulingPolicy::Fcfs, false), (SchedulingPolicy::Priority, true)]
    {
        // 16 blocks of 16 tokens: room for one 128-token request and change, for 64 requests at once.
        let config = SchedulerConfig {
            max_num_seqs: 64,
            max_num_batched_tokens: 256,
            block_size: 16,
            enable_prefix_caching,
            policy,
            // vLLM's admission, which fills the cache with prompts; the headroom's run is below.
            admission_headroom_tokens: 0,
            ..SchedulerConfig::new(128, 16)
        };
        let workload: Vec<Planned> = (0..64)
            .map(|i| {
                let mut prompt = shared[..rng.range(0, 48)].to_vec();
                let len = rng.range(prompt.len().max(1), 80);
                let tail = random_tokens(&mut rng, len - prompt.len());
                prompt.extend(tail);
                Planned {
                    req_id: format!("r{i}"),
                    arrival_step: 0,
                    prompt,
                    params: Arc::new(SamplingParams { ignore_eos: true, ..SamplingParams::greedy(rng.range(1, 40)) }),
                    priority: rng.below(4) as i32,
                    abort_at_step: None,
                }
            })
            .collect();
        let label = format!("64 concurrent, {policy:?}, prefix caching {enable_prefix_caching}");
        let coverage = run_scenario(&label, config.clone(), &workload);
        assert!(coverage.preemptions > 0, "{label}: the budget was meant to force preemption");
        assert_eq!(coverage.finished_by_length, 64, "{label}");
        // A headroom of every request's whole output (max_tokens < 40) admits only what can finish: the
        // same workload completes without a single preemption.
        let label = format!("{label}, headroom 64");
        let coverage = run_scenario(&label, SchedulerConfig { admission_headroom_tokens: 64, ..config }, &workload);
        assert_eq!(coverage.preemptions, 0, "{label}");
        assert_eq!(coverage.finished_by_length, 64, "{label}");
    }
}

#[test]
fn an_oversized_request_is_rejected_and_the_rest_run() {
    let config = SchedulerConfig { block_size: 4, ..SchedulerConfig::new(32, 8) };
    let mut scheduler = Scheduler::new(config).unwrap();
    let params = Arc::new(SamplingParams::greedy(4));
    let too_long = scheduler.add_request(Request::new("big", vec![1; 33], params.clone()));
    assert!(matches!(too_long, Err(CoreError::TooLong(_))));
    assert!(!scheduler.has_unfinished_requests());
    scheduler.add_request(Request::new("big", vec![1; 32], params)).unwrap();
}

/// What an async-scheduling scenario exercised.
#[derive(Debug, Default)]
struct AsyncCoverage {
    steps: usize,
    preemptions: u64,
    prefix_hit_tokens: u64,
    /// Aborts of a request scheduled in the step in flight.
    aborted_in_flight: usize,
    /// Requests that stopped (EOS, stop token) while their next step was already in flight.
    stopped_in_flight: usize,
}

impl AsyncCoverage {
    fn add(&mut self, other: &AsyncCoverage) {
        self.steps += other.steps;
        self.preemptions += other.preemptions;
        self.prefix_hit_tokens += other.prefix_hit_tokens;
        self.aborted_in_flight += other.aborted_in_flight;
        self.stopped_in_flight += other.stopped_in_flight;
    }
}

/// Runs a workload through an [`EngineCore`] (async scheduling when the config says so; `deferred`
/// makes the fake model hand outputs out only when collected), checking the scheduler after every
/// step. Returns each request's output and what the run exercised.
fn run_engine(
    label: &str,
    config: SchedulerConfig,
    workload: &[Planned],
    deferred: bool,
) -> (HashMap<String, CollectedOutput>, AsyncCoverage) {
    let mut model = FakeModel::for_config(&config, VOCAB);
    model.deferred = deferred;
    let mut engine = EngineCore::new(config.clone(), model).unwrap_or_else(|e| panic!("{label}: {e}"));
    let mut collected: HashMap<String, CollectedOutput> = HashMap::new();
    let mut coverage = AsyncCoverage::default();
    let last_arrival = workload.iter().map(|p| p.arrival_step).max().unwrap_or(0);
    let mut step = 0;
    while step <= last_arrival || engine.has_unfinished_requests() {
        assert!(step < 20_000, "{label}: no progress after {step} steps");
        for planned in workload.iter().filter(|p| p.arrival_step == step) {
            let request = Request::new(&planned.req_id, planned.prompt.clone(), planned.params.clone())
                .with_priority(planned.priority);
            engine.add_request(request).unwrap_or_else(|e| panic!("{label}: {e}"));
        }
        for planned in workload.iter().filter(|p| p.abort_at_step == Some(step)) {
            let in_flight = engine.in_flight_request_ids().any(|id| id == planned.req_id);
            coverage.aborted_in_flight += (engine.abort_requests([&planned.req_id]) == 1 && in_flight) as usize;
            check_scheduler_invariants(engine.scheduler()).unwrap_or_else(|e| panic!("{label}: {e}"));
        }
        let outputs = engine.step().unwrap_or_else(|e| panic!("{label} step {step}: {e}"));
        for output in outputs {
            let in_flight = engine.in_flight_request_ids().any(|id| id == output.req_id);
            match output.finish_reason {
                Some(FinishReason::Stop) if in_flight => coverage.stopped_in_flight += 1,
                Some(FinishReason::Length) => {
                    assert!(!in_flight, "{label}: `{}` was scheduled past its length limit", output.req_id)
                }
                _ => {}
            }
            let entry = collected.entry(output.req_id.clone()).or_default();
            entry.absorb(output).unwrap_or_else(|e| panic!("{label}: {e}"));
        }
        check_scheduler_invariants(engine.scheduler()).unwrap_or_else(|e| panic!("{label} step {step}: {e}"));
        step += 1;
    }
    coverage.steps = step;
    coverage.preemptions = engine.scheduler().num_preemptions_total();
    coverage.prefix_hit_tokens = engine.scheduler().prefix_cache_hits();
    let kv = engine.scheduler().kv_cache_manager();
    assert_eq!(kv.num_free_blocks(), config.num_blocks, "{label}: blocks leaked");
    assert_eq!(engine.stats().kv_cache_usage, 0.0, "{label}");
    assert_eq!(engine.in_flight_request_ids().count(), 0, "{label}");
    assert_eq!(engine.executor().num_in_flight(), 0, "{label}: a step was never collected");
    (collected, coverage)
}

/// Async scheduling gives the same tokens as synchronous scheduling and as running alone, over random
/// configs and workloads (chunked prefill, preemption under tight caches, prefix hits, max_tokens,
/// EOS and stop ids that end a request while its next step is in flight, aborts mid-flight), with every
/// request finished exactly once and no block leaked.
#[test]
fn async_scheduling_matches_sync_over_random_workloads() {
    let mut total = AsyncCoverage::default();
    for seed in 0..200u64 {
        let mut rng = SplitMix64::new(1_000 + seed);
        let config = SchedulerConfig { speculative: None, ..random_config(&mut rng) };
        let workload = random_workload(&mut rng, &config);
        let label = format!("async seed {seed} ({config:?})");
        let (sync_out, _) = run_engine(&label, config.clone(), &workload, false);
        let async_config = SchedulerConfig { async_scheduling: true, ..config.clone() };
        let (async_out, coverage) = run_engine(&label, async_config, &workload, seed % 2 == 0);
        total.add(&coverage);
        for planned in &workload {
            let label = format!("{label} {}", planned.req_id);
            let got = async_out.get(&planned.req_id).unwrap_or_else(|| panic!("{label}: no output"));
            let want = &sync_out[&planned.req_id];
            let reason = got.finish_reason.unwrap_or_else(|| panic!("{label}: never finished"));
            if reason == FinishReason::Abort || want.finish_reason == Some(FinishReason::Abort) {
                // An abort lands a step later or earlier relative to the outputs; the tokens before it
                // are still the request's own.
                let alone = generate_alone(planned.prompt.clone(), planned.params.clone(), config.max_model_len, VOCAB)
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
                assert!(alone.token_ids.starts_with(&got.token_ids), "{label}: aborted output diverged");
                continue;
            }
            assert_eq!(got.token_ids, want.token_ids, "{label}: async output differs from sync");
            assert_eq!((got.finish_reason, &got.stop_reason), (want.finish_reason, &want.stop_reason), "{label}");
            assert_eq!(got.num_logprobs, want.num_logprobs, "{label}");
            assert_eq!(got.prompt_logprobs, want.prompt_logprobs, "{label}: prompt logprobs once per position");
        }
    }
    eprintln!("async coverage over 200 seeds: {total:?}");
    assert!(total.preemptions > 500, "{total:?}");
    assert!(total.prefix_hit_tokens > 5_000, "{total:?}");
    assert!(total.aborted_in_flight > 20, "{total:?}");
    assert!(total.stopped_in_flight > 100, "{total:?}");
}

#[test]
fn async_scheduling_refuses_speculative_decoding() {
    let config = SchedulerConfig {
        async_scheduling: true,
        speculative: Some(SpeculativeConfig::ngram(2, 1, 3)),
        ..SchedulerConfig::new(32, 8)
    };
    let err = Scheduler::new(config).unwrap_err();
    assert!(matches!(err, CoreError::InvalidConfig(ref m) if m.contains("--async-scheduling")), "{err}");
}
