//! [`AsyncEngine`]: the synchronous [`ironllm::Engine`] on its own thread, driven over channels, so
//! HTTP work never stalls the model and the model never waits on HTTP (vLLM's `AsyncLLM` +
//! `EngineCore` split, with a thread where vLLM has a process).
//!
//! - The frontend sends [`Command`]s on one unbounded channel: add a request (with the sender of
//!   that request's own output channel), abort one, abort all, shut down.
//! - The engine thread blocks on the command channel while it has nothing to do; otherwise it drains
//!   the commands between steps, runs one step, and sends each request's [`RequestOutput`] on the
//!   request's channel.
//! - A client that goes away drops its [`RequestStream`]: the drop sends an abort, and the engine
//!   thread also notices the closed channel before the next step (or when a send fails), so the
//!   request is aborted and its KV blocks are freed at once either way.
//! - If a step panics, or fails three times in a row, the engine is dead: every live request gets
//!   an error, [`AsyncEngine::is_alive`] turns false (`/health` answers 503) and new requests are
//!   refused.
//!
//! Detokenization and stop strings run inside `Engine::step` (the output processor), i.e. on this
//! thread; design.md places them on the frontend side, which is a later split.
//!
//! The engine thread is also the only writer of the metrics: scheduler gauges after every step and
//! per-request latencies (time to first token, inter-token latency, e2e, queue time) as outputs
//! flow. The engine does not report when a request is first scheduled, so queue time is inferred
//! from the waiting count after each step (exact under FCFS without preemption).

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use ironllm::engine::Prompt;
use ironllm::{Engine, LlmError, OutputKind, RequestOutput, SamplingParams};
use ironllm_core::outputs::FinishReason;
use ironllm_core::SchedulerStats;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::{FinishedSequenceStats, Metrics};

/// Consecutive failed steps after which the engine is declared dead.
const MAX_CONSECUTIVE_STEP_FAILURES: usize = 3;

/// What the engine thread needs from an engine; implemented by [`ironllm::Engine`] (and by fakes in
/// tests).
pub trait EngineBackend: Send + 'static {
    fn add_request(
        &mut self,
        request_id: &str,
        prompt: &Prompt,
        params: SamplingParams,
        kind: OutputKind,
        priority: i32,
    ) -> Result<Vec<u32>, LlmError>;
    fn abort_request(&mut self, request_id: &str) -> Option<RequestOutput>;
    fn step(&mut self) -> Result<Vec<RequestOutput>, LlmError>;
    fn has_unfinished_requests(&self) -> bool;
    fn stats(&self) -> SchedulerStats;
}

impl EngineBackend for Engine {
    fn add_request(
        &mut self,
        request_id: &str,
        prompt: &Prompt,
        params: SamplingParams,
        kind: OutputKind,
        priority: i32,
    ) -> Result<Vec<u32>, LlmError> {
        Engine::add_request(self, request_id, prompt, params, kind, priority)
    }
    fn abort_request(&mut self, request_id: &str) -> Option<RequestOutput> {
        Engine::abort_request(self, request_id)
    }
    fn step(&mut self) -> Result<Vec<RequestOutput>, LlmError> {
        Engine::step(self)
    }
    fn has_unfinished_requests(&self) -> bool {
        Engine::has_unfinished_requests(self)
    }
    fn stats(&self) -> SchedulerStats {
        Engine::stats(self)
    }
}

/// A request ready for the engine: tokenized, its parameters resolved and validated.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub request_id: String,
    pub prompt_token_ids: Vec<u32>,
    pub params: SamplingParams,
    pub output_kind: OutputKind,
    pub priority: i32,
    /// When the frontend received the request (start of e2e latency and queue time).
    pub arrival: Instant,
}

/// What a request's channel carries.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    Output(RequestOutput),
    /// The request cannot go on (the engine failed); no more events follow.
    Failed(String),
}

/// Why a request could not be added or finished.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// The engine rejected the request's parameters (HTTP 400).
    #[error("{0}")]
    InvalidRequest(String),
    /// The engine thread has stopped (HTTP 503).
    #[error("EngineCore encountered an issue. See stack trace (above) for the root cause.")]
    Dead,
    /// The server is shutting down and takes no new requests (HTTP 503).
    #[error("The server is shutting down and does not accept new requests.")]
    ShuttingDown,
}

enum Command {
    Add {
        request: Box<EngineRequest>,
        outputs: mpsc::UnboundedSender<EngineEvent>,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Abort(String),
    AbortAll,
    Shutdown,
}

struct Shared {
    alive: AtomicBool,
    accepting: AtomicBool,
    num_live: AtomicUsize,
}

/// Options of the engine loop.
#[derive(Debug, Clone, Default)]
pub struct AsyncEngineOptions {
    /// Log every added and aborted request (vLLM's `--enable-log-requests`).
    pub log_requests: bool,
}

/// The frontend's handle on the engine thread.
pub struct AsyncEngine {
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for AsyncEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncEngine").field("alive", &self.is_alive()).finish_non_exhaustive()
    }
}

impl AsyncEngine {
    /// Moves `engine` onto a new thread and starts its loop.
    pub fn start<E: EngineBackend>(engine: E, metrics: Arc<Metrics>, options: AsyncEngineOptions) -> AsyncEngine {
        let (commands, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            alive: AtomicBool::new(true),
            accepting: AtomicBool::new(true),
            num_live: AtomicUsize::new(0),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("engine-core".into())
            .spawn(move || {
                let mut core = EngineLoop::new(engine, rx, metrics, thread_shared.clone(), options);
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| core.run()));
                thread_shared.alive.store(false, Ordering::SeqCst);
                match result {
                    Ok(Ok(())) => tracing::info!("engine loop stopped"),
                    Ok(Err(e)) => tracing::error!("engine loop died: {e}"),
                    Err(_) => tracing::error!("engine loop panicked; the engine is dead"),
                }
                // Dropping the loop drops every request's sender: their streams end with an error.
                thread_shared.num_live.store(0, Ordering::SeqCst);
            })
            .expect("spawning the engine thread");
        AsyncEngine { commands, shared, thread: Mutex::new(Some(thread)) }
    }

    /// Whether the engine thread is running.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }

    /// Requests added and not yet finished.
    pub fn num_live_requests(&self) -> usize {
        self.shared.num_live.load(Ordering::SeqCst)
    }

    /// Refuses new requests from now on (graceful shutdown); requests in flight go on.
    pub fn stop_accepting(&self) {
        self.shared.accepting.store(false, Ordering::SeqCst);
    }

    /// Adds a request; its outputs arrive on the returned stream.
    pub async fn add_request(&self, request: EngineRequest) -> Result<RequestStream, EngineError> {
        if !self.is_alive() {
            return Err(EngineError::Dead);
        }
        if !self.shared.accepting.load(Ordering::SeqCst) {
            return Err(EngineError::ShuttingDown);
        }
        let request_id = request.request_id.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let (reply_tx, reply_rx) = oneshot::channel();
        self.commands
            .send(Command::Add { request: Box::new(request), outputs: tx, reply: reply_tx })
            .map_err(|_| EngineError::Dead)?;
        // If this future is dropped here, the engine sees the closed reply channel and aborts.
        reply_rx.await.map_err(|_| EngineError::Dead)??;
        Ok(RequestStream { request_id, rx, commands: self.commands.clone(), done: false })
    }

    /// Aborts a request (a no-op when it already finished).
    pub fn abort(&self, request_id: &str) {
        let _ = self.commands.send(Command::Abort(request_id.to_string()));
    }

    /// Aborts every request in flight; each finishes with reason `abort`.
    pub fn abort_all(&self) {
        let _ = self.commands.send(Command::AbortAll);
    }

    /// Aborts everything, stops the engine thread and waits for it. Blocks: call from a blocking
    /// context.
    pub fn shutdown(&self) {
        self.stop_accepting();
        let _ = self.commands.send(Command::Shutdown);
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// One request's outputs. Dropping it before the request finished aborts the request.
#[derive(Debug)]
pub struct RequestStream {
    request_id: String,
    rx: mpsc::UnboundedReceiver<EngineEvent>,
    commands: mpsc::UnboundedSender<Command>,
    done: bool,
}

impl RequestStream {
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The next event; `None` once the request finished.
    pub async fn next(&mut self) -> Option<EngineEvent> {
        if self.done {
            return None;
        }
        let event = match self.rx.recv().await {
            Some(e) => e,
            None => EngineEvent::Failed("the engine stopped before the request finished".into()),
        };
        match &event {
            EngineEvent::Output(o) if !o.finished => {}
            _ => self.done = true,
        }
        Some(event)
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.commands.send(Command::Abort(self.request_id.clone()));
        }
    }
}

/// Per-sequence bookkeeping for metrics.
#[derive(Debug, Clone, Default)]
struct SeqState {
    num_tokens: usize,
    finished: bool,
}

/// A request the engine thread is serving.
struct LiveRequest {
    tx: mpsc::UnboundedSender<EngineEvent>,
    arrival: Instant,
    scheduled: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    num_prompt_tokens: usize,
    max_tokens: Option<usize>,
    n: usize,
    num_seqs: usize,
    cumulative: bool,
    seqs: Vec<SeqState>,
}

impl LiveRequest {
    fn finished_stats(
        &self,
        reason: FinishReason,
        num_generation_tokens: usize,
        now: Instant,
    ) -> FinishedSequenceStats {
        let secs = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
            (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
            _ => 0.0,
        };
        let scheduled = self.scheduled.or(self.first_token);
        FinishedSequenceStats {
            finish_reason: reason,
            e2e_latency: now.saturating_duration_since(self.arrival).as_secs_f64(),
            queued_time: secs(Some(self.arrival), scheduled.or(Some(now))),
            prefill_time: secs(scheduled, self.first_token),
            decode_time: secs(self.first_token, self.last_token),
            inference_time: secs(scheduled, self.last_token),
            num_prompt_tokens: self.num_prompt_tokens,
            num_generation_tokens,
            max_tokens_param: self.max_tokens,
        }
    }
}

struct EngineLoop<E: EngineBackend> {
    engine: E,
    rx: mpsc::UnboundedReceiver<Command>,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    options: AsyncEngineOptions,
    live: HashMap<String, LiveRequest>,
    /// Requests not yet seen scheduled, oldest first.
    unscheduled: VecDeque<String>,
    prev_stats: SchedulerStats,
    shutdown: bool,
}

impl<E: EngineBackend> EngineLoop<E> {
    fn new(
        engine: E,
        rx: mpsc::UnboundedReceiver<Command>,
        metrics: Arc<Metrics>,
        shared: Arc<Shared>,
        options: AsyncEngineOptions,
    ) -> Self {
        EngineLoop {
            engine,
            rx,
            metrics,
            shared,
            options,
            live: HashMap::new(),
            unscheduled: VecDeque::new(),
            prev_stats: SchedulerStats::default(),
            shutdown: false,
        }
    }

    fn run(&mut self) -> Result<(), String> {
        let mut consecutive_failures = 0;
        loop {
            if !self.engine.has_unfinished_requests() && self.live.is_empty() {
                // Idle: sleep until the frontend has something.
                match self.rx.blocking_recv() {
                    Some(cmd) => self.handle(cmd),
                    None => return Ok(()),
                }
            }
            while let Ok(cmd) = self.rx.try_recv() {
                self.handle(cmd);
            }
            if self.shutdown {
                self.abort_all();
                self.publish_stats();
                return Ok(());
            }
            self.abort_disconnected();
            if !self.engine.has_unfinished_requests() {
                self.fail_orphans();
                self.publish_stats();
                continue;
            }
            let step_start = Instant::now();
            match self.engine.step() {
                Ok(outputs) => {
                    consecutive_failures = 0;
                    let stats = self.engine.stats();
                    self.mark_scheduled(stats.num_waiting, step_start);
                    self.dispatch(outputs);
                    if !self.engine.has_unfinished_requests() {
                        self.fail_orphans();
                    }
                }
                Err(e) => {
                    consecutive_failures += 1;
                    tracing::error!("engine step failed ({consecutive_failures} in a row): {e}");
                    self.fail_all(&format!("engine step failed: {e}"));
                    if consecutive_failures >= MAX_CONSECUTIVE_STEP_FAILURES {
                        self.publish_stats();
                        return Err(format!("{consecutive_failures} consecutive step failures, last: {e}"));
                    }
                }
            }
            self.publish_stats();
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Add { request, outputs, reply } => self.add(*request, outputs, reply),
            Command::Abort(id) => {
                if self.live.contains_key(&id) {
                    if self.options.log_requests {
                        tracing::info!("Aborted request {id}.");
                    }
                    self.abort(&id);
                }
            }
            Command::AbortAll => self.abort_all(),
            Command::Shutdown => self.shutdown = true,
        }
    }

    fn add(
        &mut self,
        request: EngineRequest,
        outputs: mpsc::UnboundedSender<EngineEvent>,
        reply: oneshot::Sender<Result<(), EngineError>>,
    ) {
        if self.shutdown {
            let _ = reply.send(Err(EngineError::ShuttingDown));
            return;
        }
        let EngineRequest { request_id, prompt_token_ids, params, output_kind, priority, arrival } = request;
        if self.live.contains_key(&request_id) {
            let _ =
                reply.send(Err(EngineError::InvalidRequest(format!("request id `{request_id}` is already in use"))));
            return;
        }
        let num_prompt_tokens = prompt_token_ids.len();
        let (n, num_seqs, max_tokens) = (params.n, params.num_sequences(), params.max_tokens);
        let prompt = Prompt::Tokens(prompt_token_ids);
        match self.engine.add_request(&request_id, &prompt, params, output_kind, priority) {
            Ok(_) => {}
            Err(e) => {
                let _ = reply.send(Err(EngineError::InvalidRequest(e.to_string())));
                return;
            }
        }
        if reply.send(Ok(())).is_err() {
            // The client left while the request was being added.
            self.engine.abort_request(&request_id);
            return;
        }
        if self.options.log_requests {
            tracing::info!("Added request {request_id}.");
        }
        self.live.insert(
            request_id.clone(),
            LiveRequest {
                tx: outputs,
                arrival,
                scheduled: None,
                first_token: None,
                last_token: None,
                num_prompt_tokens,
                max_tokens,
                n,
                num_seqs,
                cumulative: output_kind != OutputKind::Delta,
                seqs: vec![SeqState::default(); num_seqs],
            },
        );
        self.unscheduled.push_back(request_id);
        self.shared.num_live.store(self.live.len(), Ordering::SeqCst);
    }

    /// Aborts one request, frees its blocks, counts its unfinished sequences as aborted and sends
    /// the final output (finish reason `abort`) to the client if it is still listening.
    fn abort(&mut self, request_id: &str) {
        let Some(mut live) = self.live.remove(request_id) else { return };
        let final_output = self.engine.abort_request(request_id);
        let now = Instant::now();
        for i in 0..live.seqs.len() {
            if !live.seqs[i].finished {
                live.seqs[i].finished = true;
                let stats = live.finished_stats(FinishReason::Abort, live.seqs[i].num_tokens, now);
                self.metrics.record_finished(&stats);
            }
        }
        self.record_request_params(&live);
        if let Some(out) = final_output {
            let _ = live.tx.send(EngineEvent::Output(out));
        }
        self.shared.num_live.store(self.live.len(), Ordering::SeqCst);
    }

    fn abort_all(&mut self) {
        let ids: Vec<String> = self.live.keys().cloned().collect();
        for id in ids {
            self.abort(&id);
        }
    }

    /// Aborts requests whose client dropped the output channel.
    fn abort_disconnected(&mut self) {
        let gone: Vec<String> = self.live.iter().filter(|(_, l)| l.tx.is_closed()).map(|(id, _)| id.clone()).collect();
        for id in gone {
            if self.options.log_requests {
                tracing::info!("Aborted request {id} (client disconnected).");
            }
            self.abort(&id);
        }
    }

    /// Fails every live request (a step failed): the client gets an error, the blocks are freed.
    fn fail_all(&mut self, message: &str) {
        let ids: Vec<String> = self.live.keys().cloned().collect();
        for id in ids {
            if let Some(live) = self.live.get(&id) {
                let _ = live.tx.send(EngineEvent::Failed(message.to_string()));
            }
            self.abort(&id);
        }
    }

    /// Requests the engine no longer has but that never got a final output: a safety net so no
    /// client waits forever.
    fn fail_orphans(&mut self) {
        if self.live.is_empty() {
            return;
        }
        tracing::error!("{} request(s) left the engine without a final output", self.live.len());
        self.fail_all("the engine lost track of the request");
    }

    /// Requests no longer waiting are marked scheduled at `step_start`. The engine reports only the
    /// number of waiting sequences, so the newest requests are taken to be the waiting ones.
    fn mark_scheduled(&mut self, num_waiting: usize, step_start: Instant) {
        self.unscheduled.retain(|id| self.live.contains_key(id));
        let mut still_waiting = 0;
        let mut keep_from = self.unscheduled.len();
        for (i, id) in self.unscheduled.iter().enumerate().rev() {
            let seqs = self.live.get(id).map_or(0, |l| l.num_seqs);
            if still_waiting + seqs > num_waiting {
                break;
            }
            still_waiting += seqs;
            keep_from = i;
        }
        for id in self.unscheduled.drain(..keep_from) {
            if let Some(l) = self.live.get_mut(&id) {
                l.scheduled.get_or_insert(step_start);
            }
        }
    }

    fn dispatch(&mut self, outputs: Vec<RequestOutput>) {
        let now = Instant::now();
        let (mut iteration_prompt_tokens, mut iteration_generation_tokens) = (0usize, 0usize);
        for out in outputs {
            let Some(live) = self.live.get_mut(&out.request_id) else { continue };
            let mut new_tokens_this_step = 0;
            for o in &out.outputs {
                if o.index >= live.seqs.len() {
                    live.seqs.resize(o.index + 1, SeqState::default());
                }
                let seq = &mut live.seqs[o.index];
                let new_tokens =
                    if live.cumulative { o.token_ids.len().saturating_sub(seq.num_tokens) } else { o.token_ids.len() };
                if new_tokens > 0 && seq.num_tokens == 0 {
                    iteration_prompt_tokens += live.num_prompt_tokens;
                    self.metrics.prompt_tokens.inc_by(live.num_prompt_tokens as u64);
                }
                seq.num_tokens += new_tokens;
                new_tokens_this_step += new_tokens;
            }
            if new_tokens_this_step > 0 {
                iteration_generation_tokens += new_tokens_this_step;
                self.metrics.generation_tokens.inc_by(new_tokens_this_step as u64);
                match live.last_token {
                    None => {
                        live.first_token = Some(now);
                        let ttft = now.saturating_duration_since(live.arrival).as_secs_f64();
                        self.metrics.time_to_first_token.observe(ttft);
                    }
                    Some(prev) => {
                        self.metrics.inter_token_latency.observe(now.saturating_duration_since(prev).as_secs_f64())
                    }
                }
                live.last_token = Some(now);
            }
            for o in &out.outputs {
                if let Some(reason) = o.finish_reason {
                    if !live.seqs[o.index].finished {
                        live.seqs[o.index].finished = true;
                        let stats = live.finished_stats(reason, live.seqs[o.index].num_tokens, now);
                        self.metrics.record_finished(&stats);
                    }
                }
            }
            let finished = out.finished;
            if finished {
                // Sequences dropped from the output (best_of losers) finished too.
                let reason = out.outputs.first().and_then(|o| o.finish_reason).unwrap_or(FinishReason::Stop);
                for i in 0..live.seqs.len() {
                    if !live.seqs[i].finished {
                        live.seqs[i].finished = true;
                        let stats = live.finished_stats(reason, live.seqs[i].num_tokens, now);
                        self.metrics.record_finished(&stats);
                    }
                }
            }
            let id = out.request_id.clone();
            let sent = live.tx.send(EngineEvent::Output(out)).is_ok();
            if finished {
                if let Some(live) = self.live.remove(&id) {
                    self.record_request_params(&live);
                }
            } else if !sent {
                if self.options.log_requests {
                    tracing::info!("Aborted request {id} (client disconnected).");
                }
                self.abort(&id);
            }
        }
        if iteration_prompt_tokens + iteration_generation_tokens > 0 {
            self.metrics.iteration_tokens.observe((iteration_prompt_tokens + iteration_generation_tokens) as f64);
        }
        self.shared.num_live.store(self.live.len(), Ordering::SeqCst);
    }

    fn record_request_params(&self, live: &LiveRequest) {
        self.metrics.request_params_n.observe(live.n as f64);
        if let Some(m) = live.max_tokens {
            self.metrics.request_max_num_generation_tokens.observe(m as f64);
        }
    }

    fn publish_stats(&mut self) {
        let stats = self.engine.stats();
        self.metrics.record_scheduler(&stats, &self.prev_stats);
        self.prev_stats = stats;
    }
}

/// A scriptable engine for tests of the engine loop and the handlers.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use ironllm::CompletionOutput;

    /// A fake engine: each request produces one token per step until `max_tokens`; a step panics
    /// when `panic_on_step` is set.
    #[derive(Default)]
    pub(crate) struct FakeEngine {
        pub requests: Vec<(String, usize, usize)>,
        pub panic_on_step: bool,
        pub aborted: Arc<Mutex<Vec<String>>>,
    }

    impl EngineBackend for FakeEngine {
        fn add_request(
            &mut self,
            request_id: &str,
            _prompt: &Prompt,
            params: SamplingParams,
            _kind: OutputKind,
            _priority: i32,
        ) -> Result<Vec<u32>, LlmError> {
            if params.temperature < 0.0 {
                return Err(LlmError::InvalidRequest("temperature must be non-negative".into()));
            }
            self.requests.push((request_id.to_string(), 0, params.max_tokens.unwrap_or(4)));
            Ok(vec![1])
        }
        fn abort_request(&mut self, request_id: &str) -> Option<RequestOutput> {
            self.aborted.lock().unwrap().push(request_id.to_string());
            let found = self.requests.iter().any(|r| r.0 == request_id);
            self.requests.retain(|r| r.0 != request_id);
            found.then(|| output(request_id, Some(FinishReason::Abort)))
        }
        fn step(&mut self) -> Result<Vec<RequestOutput>, LlmError> {
            if self.panic_on_step {
                panic!("injected step failure");
            }
            let mut outs = Vec::new();
            for r in &mut self.requests {
                r.1 += 1;
                let done = r.1 >= r.2;
                outs.push(output(&r.0, done.then_some(FinishReason::Length)));
            }
            self.requests.retain(|r| r.1 < r.2);
            Ok(outs)
        }
        fn has_unfinished_requests(&self) -> bool {
            !self.requests.is_empty()
        }
        fn stats(&self) -> SchedulerStats {
            SchedulerStats { num_running: self.requests.len(), ..Default::default() }
        }
    }

    pub(crate) fn output(id: &str, finish: Option<FinishReason>) -> RequestOutput {
        RequestOutput {
            request_id: id.to_string(),
            prompt_token_ids: vec![1],
            prompt_logprobs: None,
            outputs: vec![CompletionOutput {
                index: 0,
                text: "x".into(),
                token_ids: vec![7],
                cumulative_logprob: None,
                logprobs: None,
                finish_reason: finish,
                stop_reason: None,
            }],
            finished: finish.is_some(),
            num_cached_tokens: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeEngine;
    use super::*;

    fn request(id: &str, max_tokens: usize) -> EngineRequest {
        EngineRequest {
            request_id: id.into(),
            prompt_token_ids: vec![1],
            params: SamplingParams::greedy(max_tokens),
            output_kind: OutputKind::Delta,
            priority: 0,
            arrival: Instant::now(),
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn outputs_arrive_and_metrics_count_them() {
        let metrics = Arc::new(Metrics::new("m", 2048));
        let engine = AsyncEngine::start(FakeEngine::default(), metrics.clone(), Default::default());
        rt().block_on(async {
            let mut s = engine.add_request(request("a", 3)).await.unwrap();
            let mut n = 0;
            while let Some(ev) = s.next().await {
                let EngineEvent::Output(o) = ev else { panic!("{ev:?}") };
                n += o.outputs[0].token_ids.len();
            }
            assert_eq!(n, 3);
        });
        assert_eq!(metrics.generation_tokens.get(), 3);
        assert_eq!(metrics.prompt_tokens.get(), 1);
        engine.shutdown();
        assert!(!engine.is_alive());
    }

    #[test]
    fn invalid_request_is_rejected_with_the_engine_message() {
        let engine = AsyncEngine::start(FakeEngine::default(), Arc::new(Metrics::new("m", 64)), Default::default());
        let mut req = request("a", 3);
        req.params.temperature = -1.0;
        let err = rt().block_on(engine.add_request(req)).unwrap_err();
        assert_eq!(err, EngineError::InvalidRequest("temperature must be non-negative".into()));
        engine.shutdown();
    }

    #[test]
    fn dropping_the_stream_aborts_the_request() {
        let fake = FakeEngine::default();
        let aborted = fake.aborted.clone();
        let engine = AsyncEngine::start(fake, Arc::new(Metrics::new("m", 64)), Default::default());
        rt().block_on(async {
            let mut s = engine.add_request(request("long", 1_000_000)).await.unwrap();
            s.next().await.unwrap();
            drop(s);
            for _ in 0..200 {
                if engine.num_live_requests() == 0 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        });
        assert_eq!(engine.num_live_requests(), 0);
        assert_eq!(aborted.lock().unwrap().as_slice(), ["long".to_string()]);
        engine.shutdown();
    }

    #[test]
    fn abort_all_finishes_requests_with_reason_abort() {
        let engine = AsyncEngine::start(FakeEngine::default(), Arc::new(Metrics::new("m", 64)), Default::default());
        rt().block_on(async {
            let mut s = engine.add_request(request("long", 1_000_000)).await.unwrap();
            s.next().await.unwrap();
            engine.abort_all();
            let mut last = None;
            while let Some(ev) = s.next().await {
                last = Some(ev);
            }
            let Some(EngineEvent::Output(o)) = last else { panic!("{last:?}") };
            assert!(o.finished);
            assert_eq!(o.outputs[0].finish_reason, Some(FinishReason::Abort));
        });
        engine.shutdown();
    }

    #[test]
    fn a_panicking_step_kills_the_engine_and_fails_requests() {
        let fake = FakeEngine { panic_on_step: true, ..Default::default() };
        let engine = AsyncEngine::start(fake, Arc::new(Metrics::new("m", 64)), Default::default());
        rt().block_on(async {
            let mut s = engine.add_request(request("a", 3)).await.unwrap();
            let ev = s.next().await.unwrap();
            assert!(matches!(ev, EngineEvent::Failed(_)), "{ev:?}");
            for _ in 0..200 {
                if !engine.is_alive() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            assert!(!engine.is_alive());
            assert_eq!(engine.add_request(request("b", 3)).await.unwrap_err(), EngineError::Dead);
        });
        engine.shutdown();
    }
}
