//! [`AsyncEngine`]: vLLM's `AsyncLLM` + `EngineCore` split, with threads where vLLM has processes.
//!
//! - The **engine thread** ("engine-core") owns only the engine-core side, a [`CoreBackend`]
//!   ([`ironllm::Core`]: scheduler + model runner). It has no tokenizer and never sees text: each step
//!   it sends the step's token-level [`EngineCoreOutput`]s to the frontend thread and goes on; it
//!   never waits on the frontend.
//! - The **frontend thread** ("ironllm-frontend") owns the [`OutputStage`] (the output processor and
//!   the tokenizer): it detokenizes, finds stop strings (holding back partial ones while streaming),
//!   turns core outputs into [`RequestOutput`] deltas, routes them to each request's channel, and sends
//!   "finish (stop string)" and abort commands back to the engine thread. A dedicated thread rather
//!   than a tokio task, so detokenization never occupies an HTTP worker and no handler ever waits on
//!   it.
//! - **Handlers** run input processing ([`InputProcessor`]: validation, `n` / `best_of` fan-out) in
//!   their own task, then send the child requests to the engine thread, which replies once they are
//!   queued and forwards the request's registration (prompt ids, parameters, the sender of the
//!   request's output channel) to the frontend thread, ahead of any output for it.
//!
//! Both channels are unbounded and FIFO, which gives the ordering the design relies on: a request is
//! registered with the frontend before any of its outputs arrive there, and an abort reaches the
//! frontend after every output produced before it.
//!
//! - A client that goes away drops its [`RequestStream`]: the drop sends an abort to the engine
//!   thread, which aborts the request's sequences (freeing their KV blocks at once) before its next
//!   step; the frontend also notices closed channels (on a failed send, or by checking after each
//!   step) and aborts those requests the same way.
//! - If a step panics, or fails three times in a row, the engine is dead: every live request gets
//!   an error, [`AsyncEngine::is_alive`] turns false (`/health` answers 503) and new requests are
//!   refused.
//!
//! Metrics: the engine thread writes the scheduler gauges after every step; the frontend thread
//! writes the per-request latencies (time to first token, inter-token latency, e2e, queue time) as
//! outputs flow. Queue time is exact: the engine thread reports, with each step, the requests the
//! scheduler took out of the waiting queue for the first time in that step.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use ironllm::engine::{InputProcessor, OutputStage, Prompt, Registration};
use ironllm::{Core, LlmError, OutputKind, RequestOutput, SamplingParams};
use ironllm_core::executor::ModelExecutor;
use ironllm_core::outputs::{EngineCoreOutput, FinishReason};
use ironllm_core::{Request, SchedulerStats};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::{FinishedSequenceStats, Metrics};

/// Consecutive failed steps after which the engine is declared dead.
const MAX_CONSECUTIVE_STEP_FAILURES: usize = 3;

/// What the engine thread drives: the engine-core side only. Token ids in, token ids out; there is
/// no tokenizer and no text anywhere in this interface. Implemented by [`ironllm::Core`].
pub trait CoreBackend: Send + 'static {
    /// Queues a request's child sequences (all or none).
    fn add_requests(&mut self, children: Vec<Request>) -> Result<(), LlmError>;
    /// Aborts child sequences and frees their KV blocks at once.
    fn abort_requests(&mut self, child_ids: &[String]);
    /// Aborts every queued or running sequence.
    fn abort_all(&mut self);
    /// Finishes a child whose text hit a stop string (found by the frontend).
    fn finish_by_stop_string(&mut self, child_id: &str, stop: String);
    fn step(&mut self) -> Result<Vec<EngineCoreOutput>, LlmError>;
    fn has_unfinished_requests(&self) -> bool;
    /// Whether a child is queued and was never scheduled.
    fn is_waiting(&self, child_id: &str) -> bool;
    fn stats(&self) -> SchedulerStats;
}

impl<E: ModelExecutor + 'static> CoreBackend for Core<E> {
    fn add_requests(&mut self, children: Vec<Request>) -> Result<(), LlmError> {
        Core::add_requests(self, children)
    }
    fn abort_requests(&mut self, child_ids: &[String]) {
        Core::abort_requests(self, child_ids);
    }
    fn abort_all(&mut self) {
        Core::abort_all(self);
    }
    fn finish_by_stop_string(&mut self, child_id: &str, stop: String) {
        Core::finish_by_stop_string(self, child_id, stop)
    }
    fn step(&mut self) -> Result<Vec<EngineCoreOutput>, LlmError> {
        Core::step(self)
    }
    fn has_unfinished_requests(&self) -> bool {
        Core::has_unfinished_requests(self)
    }
    fn is_waiting(&self, child_id: &str) -> bool {
        Core::is_waiting(self, child_id)
    }
    fn stats(&self) -> SchedulerStats {
        Core::stats(self)
    }
}

/// A request from a handler: tokenized, its parameters resolved (input processing and validation
/// happen in [`AsyncEngine::add_request`]).
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

/// What the frontend thread needs of a new request. Passes through the engine thread untouched.
#[derive(Debug)]
struct NewRequest {
    registration: Registration,
    outputs: mpsc::UnboundedSender<EngineEvent>,
    arrival: Instant,
}

/// Handlers and the frontend thread -> the engine thread.
enum CoreCommand {
    Add {
        children: Vec<Request>,
        request: Box<NewRequest>,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    /// Abort a request (all its sequences); `log` says whether to log it (`--enable-log-requests`).
    Abort {
        request_id: String,
        log: bool,
    },
    AbortAll,
    /// A child's text hit a stop string: finish it and free its blocks.
    FinishByStopString {
        child_id: String,
        stop: String,
    },
    Shutdown,
}

/// The engine thread -> the frontend thread.
enum FrontendMsg {
    /// A request was queued in the engine core; its outputs follow.
    Added(Box<NewRequest>),
    /// One step's outputs, and the requests first scheduled in that step (started at `step_start`).
    Step { outputs: Vec<EngineCoreOutput>, scheduled: Vec<String>, step_start: Instant },
    /// The engine aborted this request: send its final output (reason `abort`).
    Aborted(String),
    /// The engine aborted every request.
    AbortedAll,
    /// A step failed; every request in the engine was aborted.
    StepFailed(String),
    /// The engine core has nothing left: requests still live here will get no more output.
    Idle,
}

struct Shared {
    alive: AtomicBool,
    accepting: AtomicBool,
    num_live: AtomicUsize,
}

impl Shared {
    fn live_finished(&self) {
        let _ = self.num_live.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| Some(n.saturating_sub(1)));
    }
}

/// Options of the engine loop.
#[derive(Debug, Clone, Default)]
pub struct AsyncEngineOptions {
    /// Log every added and aborted request (vLLM's `--enable-log-requests`).
    pub log_requests: bool,
}

/// The handlers' handle on the engine: input processing here, the engine core on the engine thread,
/// output processing on the frontend thread.
pub struct AsyncEngine {
    /// Shared with the blocking pool, where structured-output grammars compile.
    input: Arc<InputProcessor>,
    commands: mpsc::UnboundedSender<CoreCommand>,
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for AsyncEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncEngine").field("alive", &self.is_alive()).finish_non_exhaustive()
    }
}

impl AsyncEngine {
    /// Starts the engine thread (owning `core`) and the frontend thread (owning `output`).
    pub fn start<C: CoreBackend>(
        input: InputProcessor,
        output: OutputStage,
        core: C,
        metrics: Arc<Metrics>,
        options: AsyncEngineOptions,
    ) -> AsyncEngine {
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (frontend_tx, frontend_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            alive: AtomicBool::new(true),
            accepting: AtomicBool::new(true),
            num_live: AtomicUsize::new(0),
        });

        let mut frontend = FrontendLoop {
            output,
            rx: frontend_rx,
            commands: commands.clone(),
            metrics: metrics.clone(),
            shared: shared.clone(),
            options: options.clone(),
            live: HashMap::new(),
        };
        let frontend_shared = shared.clone();
        let frontend_commands = commands.clone();
        let frontend_thread = std::thread::Builder::new()
            .name("ironllm-frontend".into())
            .spawn(move || {
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| frontend.run()));
                if result.is_err() {
                    tracing::error!("the output processor panicked; the engine is dead");
                    frontend_shared.alive.store(false, Ordering::SeqCst);
                    let _ = frontend_commands.send(CoreCommand::Shutdown);
                }
                // Dropping the loop drops every request's sender: their streams end with an error.
                drop(frontend);
                frontend_shared.num_live.store(0, Ordering::SeqCst);
            })
            .expect("spawning the frontend thread");

        let thread_shared = shared.clone();
        let engine_thread = std::thread::Builder::new()
            .name("engine-core".into())
            .spawn(move || {
                let mut engine = EngineLoop {
                    core,
                    rx: commands_rx,
                    frontend: frontend_tx,
                    metrics,
                    shared: thread_shared.clone(),
                    options,
                    requests: HashMap::new(),
                    child_parent: HashMap::new(),
                    unscheduled: Vec::new(),
                    prev_stats: SchedulerStats::default(),
                    shutdown: false,
                };
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| engine.run()));
                thread_shared.alive.store(false, Ordering::SeqCst);
                match result {
                    Ok(Ok(())) => tracing::info!("engine loop stopped"),
                    Ok(Err(e)) => tracing::error!("engine loop died: {e}"),
                    Err(_) => tracing::error!("engine loop panicked; the engine is dead"),
                }
                // Dropping the loop closes the frontend's channel: it ends every stream still open.
                drop(engine);
            })
            .expect("spawning the engine thread");
        AsyncEngine {
            input: Arc::new(input),
            commands,
            shared,
            threads: Mutex::new(vec![engine_thread, frontend_thread]),
        }
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

    /// Validates a request, fans it out and queues it; its outputs arrive on the returned stream.
    pub async fn add_request(&self, request: EngineRequest) -> Result<RequestStream, EngineError> {
        if !self.is_alive() {
            return Err(EngineError::Dead);
        }
        if !self.shared.accepting.load(Ordering::SeqCst) {
            return Err(EngineError::ShuttingDown);
        }
        let EngineRequest { request_id, prompt_token_ids, params, output_kind, priority, arrival } = request;
        let prompt = Prompt::Tokens(prompt_token_ids);
        let processed = if params.structured_outputs.is_some() {
            // Compiling a grammar can take up to the compile time limit: on the blocking pool, so the
            // async workers keep serving; the request reaches the engine's queue once it has compiled.
            let (input, id) = (self.input.clone(), request_id.clone());
            tokio::task::spawn_blocking(move || input.process(&id, &prompt, params, output_kind, priority))
                .await
                .map_err(|e| EngineError::InvalidRequest(format!("grammar compilation failed: {e}")))?
        } else {
            self.input.process(&request_id, &prompt, params, output_kind, priority)
        }
        .map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (reply_tx, reply_rx) = oneshot::channel();
        let request = Box::new(NewRequest { registration: processed.registration, outputs: tx, arrival });
        self.commands
            .send(CoreCommand::Add { children: processed.children, request, reply: reply_tx })
            .map_err(|_| EngineError::Dead)?;
        // If this future is dropped here, the engine sees the closed reply channel and aborts.
        reply_rx.await.map_err(|_| EngineError::Dead)??;
        Ok(RequestStream { request_id, rx, commands: self.commands.clone(), done: false })
    }

    /// Aborts a request (a no-op when it already finished).
    pub fn abort(&self, request_id: &str) {
        let _ = self.commands.send(CoreCommand::Abort { request_id: request_id.to_string(), log: true });
    }

    /// Aborts every request in flight; each finishes with reason `abort`.
    pub fn abort_all(&self) {
        let _ = self.commands.send(CoreCommand::AbortAll);
    }

    /// Aborts everything, stops the engine and frontend threads and waits for them. Blocks: call from
    /// a blocking context.
    pub fn shutdown(&self) {
        self.stop_accepting();
        let _ = self.commands.send(CoreCommand::Shutdown);
        let handles: Vec<JoinHandle<()>> = self.threads.lock().map(|mut t| t.drain(..).collect()).unwrap_or_default();
        for h in handles {
            let _ = h.join();
        }
    }
}

impl Drop for AsyncEngine {
    fn drop(&mut self) {
        // The frontend thread holds a command sender too: without this the threads would wait on
        // each other forever.
        let _ = self.commands.send(CoreCommand::Shutdown);
    }
}

/// One request's outputs. Dropping it before the request finished aborts the request.
#[derive(Debug)]
pub struct RequestStream {
    request_id: String,
    rx: mpsc::UnboundedReceiver<EngineEvent>,
    commands: mpsc::UnboundedSender<CoreCommand>,
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
            let _ = self.commands.send(CoreCommand::Abort { request_id: self.request_id.clone(), log: true });
        }
    }
}

/// A request as the engine thread tracks it: its children not yet finished in the core.
struct CoreRequest {
    children: Vec<String>,
    unfinished: usize,
}

/// The engine thread: the engine core and nothing that knows text.
struct EngineLoop<C: CoreBackend> {
    core: C,
    rx: mpsc::UnboundedReceiver<CoreCommand>,
    frontend: mpsc::UnboundedSender<FrontendMsg>,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    options: AsyncEngineOptions,
    /// Requests with sequences in the core, by request id.
    requests: HashMap<String, CoreRequest>,
    /// Child id -> request id, for children not finished yet.
    child_parent: HashMap<String, String>,
    /// (request id, child id) of children never scheduled yet, for exact queue times.
    unscheduled: Vec<(String, String)>,
    prev_stats: SchedulerStats,
    shutdown: bool,
}

impl<C: CoreBackend> EngineLoop<C> {
    fn run(&mut self) -> Result<(), String> {
        let mut consecutive_failures = 0;
        loop {
            if !self.core.has_unfinished_requests() {
                // Idle: sleep until someone has something.
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
            if !self.core.has_unfinished_requests() {
                self.publish_stats();
                continue;
            }
            let step_start = Instant::now();
            match self.core.step() {
                Ok(outputs) => {
                    consecutive_failures = 0;
                    // Before forgetting finished requests: one may be scheduled and finish in one step.
                    let scheduled = self.newly_scheduled();
                    self.track_finished(&outputs);
                    let _ = self.frontend.send(FrontendMsg::Step { outputs, scheduled, step_start });
                    if !self.core.has_unfinished_requests() {
                        let _ = self.frontend.send(FrontendMsg::Idle);
                    }
                }
                Err(e) => {
                    consecutive_failures += 1;
                    tracing::error!("engine step failed ({consecutive_failures} in a row): {e}");
                    self.core.abort_all();
                    self.forget_all();
                    let _ = self.frontend.send(FrontendMsg::StepFailed(format!("engine step failed: {e}")));
                    if consecutive_failures >= MAX_CONSECUTIVE_STEP_FAILURES {
                        self.publish_stats();
                        return Err(format!("{consecutive_failures} consecutive step failures, last: {e}"));
                    }
                }
            }
            self.publish_stats();
        }
    }

    fn handle(&mut self, cmd: CoreCommand) {
        match cmd {
            CoreCommand::Add { children, request, reply } => self.add(children, request, reply),
            CoreCommand::Abort { request_id, log } => {
                if let Some(req) = self.requests.remove(&request_id) {
                    if log && self.options.log_requests {
                        tracing::info!("Aborted request {request_id}.");
                    }
                    self.core.abort_requests(&req.children);
                    for c in &req.children {
                        self.child_parent.remove(c);
                    }
                    let _ = self.frontend.send(FrontendMsg::Aborted(request_id));
                }
            }
            CoreCommand::AbortAll => self.abort_all(),
            CoreCommand::FinishByStopString { child_id, stop } => self.core.finish_by_stop_string(&child_id, stop),
            CoreCommand::Shutdown => self.shutdown = true,
        }
    }

    fn add(
        &mut self,
        children: Vec<Request>,
        request: Box<NewRequest>,
        reply: oneshot::Sender<Result<(), EngineError>>,
    ) {
        if self.shutdown {
            let _ = reply.send(Err(EngineError::ShuttingDown));
            return;
        }
        let request_id = request.registration.request_id.clone();
        if self.requests.contains_key(&request_id) {
            let _ =
                reply.send(Err(EngineError::InvalidRequest(format!("request id `{request_id}` is already in use"))));
            return;
        }
        if let Err(e) = self.core.add_requests(children) {
            let _ = reply.send(Err(EngineError::InvalidRequest(e.to_string())));
            return;
        }
        let child_ids = request.registration.child_ids.clone();
        self.shared.num_live.fetch_add(1, Ordering::SeqCst);
        if reply.send(Ok(())).is_err() {
            // The client left while the request was being added.
            self.core.abort_requests(&child_ids);
            self.shared.live_finished();
            return;
        }
        if self.options.log_requests {
            tracing::info!("Added request {request_id}.");
        }
        for c in &child_ids {
            self.child_parent.insert(c.clone(), request_id.clone());
            self.unscheduled.push((request_id.clone(), c.clone()));
        }
        self.requests.insert(request_id, CoreRequest { unfinished: child_ids.len(), children: child_ids });
        let _ = self.frontend.send(FrontendMsg::Added(request));
    }

    fn abort_all(&mut self) {
        self.core.abort_all();
        self.forget_all();
        let _ = self.frontend.send(FrontendMsg::AbortedAll);
    }

    fn forget_all(&mut self) {
        self.requests.clear();
        self.child_parent.clear();
        self.unscheduled.clear();
    }

    /// Forgets requests whose every sequence got its final output.
    fn track_finished(&mut self, outputs: &[EngineCoreOutput]) {
        for out in outputs.iter().filter(|o| o.finish_reason.is_some()) {
            let Some(parent) = self.child_parent.remove(&out.req_id) else { continue };
            if let Some(req) = self.requests.get_mut(&parent) {
                req.unfinished = req.unfinished.saturating_sub(1);
                if req.unfinished == 0 {
                    self.requests.remove(&parent);
                }
            }
        }
    }

    /// The requests the scheduler took out of the waiting queue for the first time in this step.
    fn newly_scheduled(&mut self) -> Vec<String> {
        let mut scheduled: Vec<String> = Vec::new();
        let (core, requests) = (&self.core, &self.requests);
        self.unscheduled.retain(|(parent, child)| {
            if !requests.contains_key(parent) {
                return false;
            }
            if core.is_waiting(child) {
                return true;
            }
            if !scheduled.contains(parent) {
                scheduled.push(parent.clone());
            }
            false
        });
        scheduled
    }

    fn publish_stats(&mut self) {
        let stats = self.core.stats();
        self.metrics.record_scheduler(&stats, &self.prev_stats);
        self.prev_stats = stats;
    }
}

/// Per-sequence bookkeeping for metrics.
#[derive(Debug, Clone, Default)]
struct SeqState {
    num_tokens: usize,
    finished: bool,
}

/// A request the frontend thread is serving.
struct LiveRequest {
    tx: mpsc::UnboundedSender<EngineEvent>,
    arrival: Instant,
    scheduled: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    num_prompt_tokens: usize,
    max_tokens: Option<usize>,
    n: usize,
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

/// The frontend thread: output processing (detokenization, stop strings, deltas), routing to each
/// request's stream, per-request metrics.
struct FrontendLoop {
    output: OutputStage,
    rx: mpsc::UnboundedReceiver<FrontendMsg>,
    commands: mpsc::UnboundedSender<CoreCommand>,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    options: AsyncEngineOptions,
    live: HashMap<String, LiveRequest>,
}

impl FrontendLoop {
    /// Runs until the engine thread stops (its sender is dropped).
    fn run(&mut self) {
        while let Some(msg) = self.rx.blocking_recv() {
            match msg {
                FrontendMsg::Added(request) => self.add(*request),
                FrontendMsg::Step { outputs, scheduled, step_start } => {
                    for id in scheduled {
                        if let Some(l) = self.live.get_mut(&id) {
                            l.scheduled.get_or_insert(step_start);
                        }
                    }
                    let result = self.output.process(outputs);
                    // Free the blocks of sequences that hit a stop string before anything else.
                    for (child_id, stop) in result.stopped {
                        let _ = self.commands.send(CoreCommand::FinishByStopString { child_id, stop });
                    }
                    self.dispatch(result.request_outputs);
                    self.abort_disconnected();
                }
                FrontendMsg::Aborted(id) => self.abort(&id),
                FrontendMsg::AbortedAll => {
                    let ids: Vec<String> = self.live.keys().cloned().collect();
                    for id in ids {
                        self.abort(&id);
                    }
                }
                FrontendMsg::StepFailed(message) => self.fail_all(&message),
                FrontendMsg::Idle => self.fail_orphans(),
            }
        }
        // The engine thread stopped: end every stream still open (dropping its sender).
        self.live.clear();
    }

    fn add(&mut self, request: NewRequest) {
        let NewRequest { registration, outputs, arrival } = request;
        self.output.register(&registration);
        let params = &registration.params;
        let num_seqs = registration.child_ids.len();
        self.live.insert(
            registration.request_id.clone(),
            LiveRequest {
                tx: outputs,
                arrival,
                scheduled: None,
                first_token: None,
                last_token: None,
                num_prompt_tokens: registration.prompt_token_ids.len(),
                max_tokens: params.max_tokens,
                n: params.n,
                cumulative: registration.kind != OutputKind::Delta,
                seqs: vec![SeqState::default(); num_seqs],
            },
        );
    }

    /// Ends a request here (the engine already aborted it, or is told to by the caller): counts its
    /// unfinished sequences as aborted and returns what is left of it. Its final output (reason
    /// `abort`) is made by the output processor.
    fn remove_aborted(&mut self, request_id: &str) -> Option<(LiveRequest, Option<RequestOutput>)> {
        let mut live = self.live.remove(request_id)?;
        let final_output = self.output.abort_request(request_id).and_then(|(_, out)| out);
        let now = Instant::now();
        for i in 0..live.seqs.len() {
            if !live.seqs[i].finished {
                live.seqs[i].finished = true;
                let stats = live.finished_stats(FinishReason::Abort, live.seqs[i].num_tokens, now);
                self.metrics.record_finished(&stats);
            }
        }
        self.record_request_params(&live);
        self.shared.live_finished();
        Some((live, final_output))
    }

    /// A request the engine aborted: send the final output to the client if it is still listening.
    fn abort(&mut self, request_id: &str) {
        if let Some((live, Some(out))) = self.remove_aborted(request_id) {
            let _ = live.tx.send(EngineEvent::Output(out));
        }
    }

    /// A request whose client went away: forget it here and have the engine abort it (freeing its
    /// blocks).
    fn abort_gone(&mut self, request_id: &str) {
        if self.options.log_requests {
            tracing::info!("Aborted request {request_id} (client disconnected).");
        }
        self.remove_aborted(request_id);
        let _ = self.commands.send(CoreCommand::Abort { request_id: request_id.to_string(), log: false });
    }

    /// Aborts requests whose client dropped the output channel.
    fn abort_disconnected(&mut self) {
        let gone: Vec<String> = self.live.iter().filter(|(_, l)| l.tx.is_closed()).map(|(id, _)| id.clone()).collect();
        for id in gone {
            self.abort_gone(&id);
        }
    }

    /// Fails every live request (the engine already aborted them): the client gets an error.
    fn fail_all(&mut self, message: &str) {
        let ids: Vec<String> = self.live.keys().cloned().collect();
        for id in ids {
            if let Some((live, _)) = self.remove_aborted(&id) {
                let _ = live.tx.send(EngineEvent::Failed(message.to_string()));
            }
        }
    }

    /// Requests the engine no longer has but that never got a final output: a safety net so no
    /// client waits forever.
    fn fail_orphans(&mut self) {
        if self.live.is_empty() {
            return;
        }
        tracing::error!("{} request(s) left the engine without a final output", self.live.len());
        let ids: Vec<String> = self.live.keys().cloned().collect();
        self.fail_all("the engine lost track of the request");
        for id in ids {
            let _ = self.commands.send(CoreCommand::Abort { request_id: id, log: false });
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
                    self.shared.live_finished();
                }
            } else if !sent {
                self.abort_gone(&id);
            }
        }
        if iteration_prompt_tokens + iteration_generation_tokens > 0 {
            self.metrics.iteration_tokens.observe((iteration_prompt_tokens + iteration_generation_tokens) as f64);
        }
    }

    fn record_request_params(&self, live: &LiveRequest) {
        self.metrics.request_params_n.observe(live.n as f64);
        if let Some(m) = live.max_tokens {
            self.metrics.request_max_num_generation_tokens.observe(m as f64);
        }
    }
}

/// A scriptable engine core for tests of the engine loop and the handlers: a real scheduler driving a
/// fake model.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use ironllm_core::outputs::{ModelRunnerOutput, SchedulerOutput};
    use ironllm_core::{CoreError, SchedulerConfig};
    use ironllm_model::tokenizer::Tokenizer;
    use std::time::Duration;

    /// Context length of the fake engine.
    pub(crate) const MAX_MODEL_LEN: usize = 4096;

    /// A fake model: every scheduled request samples the next token of `script` (cycled) each step;
    /// a step sleeps `delay` (so long requests stay in flight), and panics when `panic_on_step` is set.
    pub(crate) struct ScriptedModel {
        pub script: Vec<u32>,
        pub delay: Duration,
        pub panic_on_step: bool,
        /// Tokens sampled per request id, shared with the test.
        pub produced: Arc<Mutex<HashMap<String, usize>>>,
    }

    impl Default for ScriptedModel {
        fn default() -> Self {
            ScriptedModel {
                script: vec![7],
                delay: Duration::from_millis(1),
                panic_on_step: false,
                produced: Arc::default(),
            }
        }
    }

    impl ModelExecutor for ScriptedModel {
        fn execute_model(&mut self, plan: &SchedulerOutput) -> Result<ModelRunnerOutput, CoreError> {
            if self.panic_on_step {
                panic!("injected step failure");
            }
            std::thread::sleep(self.delay);
            let mut produced = self.produced.lock().unwrap();
            let mut out = ModelRunnerOutput::default();
            for (id, _) in &plan.num_scheduled_tokens {
                let count = produced.entry(id.clone()).or_default();
                out.req_ids.push(id.clone());
                out.sampled_token_ids.push(vec![self.script[*count % self.script.len()]]);
                out.logprobs.push(None);
                out.prompt_logprobs.push(None);
                *count += 1;
            }
            Ok(out)
        }
    }

    /// Starts an [`AsyncEngine`] on a real scheduler and `model`, detokenizing with `tokenizer`.
    pub(crate) fn start(model: ScriptedModel, tokenizer: Option<Arc<Tokenizer>>, metrics: Arc<Metrics>) -> AsyncEngine {
        let config = SchedulerConfig::new(MAX_MODEL_LEN, 1024);
        let core = Core::new(config, model).expect("scheduler config");
        let input = InputProcessor::new(tokenizer.clone(), Vec::new(), 50_000, MAX_MODEL_LEN, 20);
        AsyncEngine::start(input, OutputStage::new(tokenizer), core, metrics, AsyncEngineOptions::default())
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{start, ScriptedModel};
    use super::*;
    use ironllm_core::outputs::StopReason;
    use ironllm_model::tokenizer::Tokenizer;
    use std::time::Duration;

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

    fn smollm2_tokenizer() -> Arc<Tokenizer> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer/smollm2");
        Arc::new(Tokenizer::from_hf_dir(&dir).expect("the smollm2 tokenizer fixture"))
    }

    /// Waits (up to 2 s) until `done` holds.
    async fn wait_for(mut done: impl FnMut() -> bool) {
        for _ in 0..400 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn outputs_arrive_and_metrics_count_them() {
        let metrics = Arc::new(Metrics::new("m", 2048));
        let engine = start(ScriptedModel::default(), None, metrics.clone());
        rt().block_on(async {
            let mut s = engine.add_request(request("a", 3)).await.unwrap();
            let mut n = 0;
            while let Some(ev) = s.next().await {
                let EngineEvent::Output(o) = ev else { panic!("{ev:?}") };
                n += o.outputs[0].token_ids.len();
            }
            assert_eq!(n, 3);
            // The last output may reach the client a moment before the metrics of its request.
            wait_for(|| engine.num_live_requests() == 0).await;
        });
        assert_eq!(metrics.generation_tokens.get(), 3);
        assert_eq!(metrics.prompt_tokens.get(), 1);
        engine.shutdown();
        assert!(!engine.is_alive());
    }

    #[test]
    fn invalid_request_is_rejected_with_the_validation_message() {
        let engine = start(ScriptedModel::default(), None, Arc::new(Metrics::new("m", 64)));
        let mut req = request("a", 3);
        req.params.temperature = -1.0;
        let err = rt().block_on(engine.add_request(req)).unwrap_err();
        assert!(
            matches!(&err, EngineError::InvalidRequest(m) if m.contains("temperature must be non-negative")),
            "{err:?}"
        );
        // A duplicate id is refused while the first request is live.
        rt().block_on(async {
            let _s = engine.add_request(request("dup", 100_000)).await.unwrap();
            let err = engine.add_request(request("dup", 3)).await.unwrap_err();
            assert_eq!(err, EngineError::InvalidRequest("request id `dup` is already in use".into()));
        });
        engine.shutdown();
    }

    #[test]
    fn dropping_the_stream_aborts_the_request_and_frees_its_blocks() {
        let metrics = Arc::new(Metrics::new("m", 64));
        let model = ScriptedModel::default();
        let produced = model.produced.clone();
        let engine = start(model, None, metrics.clone());
        rt().block_on(async {
            let mut s = engine.add_request(request("long", 1_000_000)).await.unwrap();
            s.next().await.unwrap();
            // The gauges are written right after the step's outputs are sent.
            wait_for(|| metrics.kv_cache_usage_perc.get() > 0.0).await;
            assert!(metrics.kv_cache_usage_perc.get() > 0.0);
            drop(s);
            wait_for(|| engine.num_live_requests() == 0 && metrics.kv_cache_usage_perc.get() == 0.0).await;
        });
        assert_eq!(engine.num_live_requests(), 0);
        assert_eq!(metrics.kv_cache_usage_perc.get(), 0.0);
        assert_eq!(metrics.num_requests_running.get(), 0);
        let steps = produced.lock().unwrap()["long"];
        assert!(steps < fake::MAX_MODEL_LEN - 1, "the request ran to its length limit ({steps} tokens)");
        engine.shutdown();
    }

    #[test]
    fn abort_all_finishes_requests_with_reason_abort() {
        let engine = start(ScriptedModel::default(), None, Arc::new(Metrics::new("m", 64)));
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
        let model = ScriptedModel { panic_on_step: true, ..Default::default() };
        let engine = start(model, None, Arc::new(Metrics::new("m", 64)));
        rt().block_on(async {
            let mut s = engine.add_request(request("a", 3)).await.unwrap();
            let ev = s.next().await.unwrap();
            assert!(matches!(ev, EngineEvent::Failed(_)), "{ev:?}");
            wait_for(|| !engine.is_alive()).await;
            assert!(!engine.is_alive());
            assert_eq!(engine.add_request(request("b", 3)).await.unwrap_err(), EngineError::Dead);
        });
        engine.shutdown();
    }

    #[test]
    fn queue_time_is_measured_to_the_step_that_first_schedules_the_request() {
        let metrics = Arc::new(Metrics::new("m", 64));
        let engine = start(ScriptedModel::default(), None, metrics.clone());
        rt().block_on(async {
            let mut r = request("a", 2);
            // Arrived a second ago: the queue time covers that second, not the request's whole life.
            r.arrival = Instant::now() - Duration::from_secs(1);
            let mut s = engine.add_request(r).await.unwrap();
            while s.next().await.is_some() {}
            wait_for(|| engine.num_live_requests() == 0).await;
        });
        let text = metrics.encode();
        let sum = text
            .lines()
            .find(|l| l.starts_with("vllm:request_queue_time_seconds_sum"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .expect("queue time sum");
        assert!((1.0..1.5).contains(&sum), "queue time {sum}");
        engine.shutdown();
    }

    /// The engine thread runs only a `CoreBackend`, and `ironllm::Core` (the one the server runs) is
    /// built from a scheduler config and a model runner: there is no tokenizer on that side to touch.
    /// At run time: with a tokenizer given, its only holders are the input processor (handlers) and
    /// the output stage (frontend thread); and the text arrives detokenized.
    #[test]
    fn the_engine_thread_holds_no_tokenizer_and_text_is_made_on_the_frontend() {
        let tok = smollm2_tokenizer();
        let script = tok.encode("Hello world", false).unwrap();
        let model = ScriptedModel { script: script.clone(), ..Default::default() };
        let engine = start(model, Some(tok.clone()), Arc::new(Metrics::new("m", 64)));
        // This test, the input processor and the output stage; none on the engine thread.
        assert_eq!(Arc::strong_count(&tok), 3);
        // What crosses from the engine thread is token ids (this destructuring is exhaustive, so a
        // text field added to `EngineCoreOutput` would fail to compile here).
        let EngineCoreOutput {
            req_id: _,
            new_token_ids: _,
            new_logprobs: _,
            new_prompt_logprobs: _,
            finish_reason: _,
            stop_reason: _,
            num_cached_tokens: _,
        } = EngineCoreOutput {
            req_id: String::new(),
            new_token_ids: Vec::new(),
            new_logprobs: None,
            new_prompt_logprobs: None,
            finish_reason: None,
            stop_reason: None,
            num_cached_tokens: 0,
        };
        let text = rt().block_on(async {
            let mut s = engine.add_request(request("a", script.len())).await.unwrap();
            let mut text = String::new();
            while let Some(ev) = s.next().await {
                let EngineEvent::Output(o) = ev else { panic!("{ev:?}") };
                text.push_str(&o.outputs[0].text);
            }
            text
        });
        assert_eq!(text, "Hello world");
        engine.shutdown();
        // Both threads are gone; the parts they owned with them.
        assert_eq!(Arc::strong_count(&tok), 2);
    }

    /// The frontend finds the stop string in the detokenized text, cuts the output there, and sends
    /// "finish" to the engine thread, which finishes the sequence in the scheduler and frees its blocks
    /// long before `max_tokens`.
    #[test]
    fn a_stop_string_found_by_the_frontend_finishes_the_request_in_the_engine() {
        let tok = smollm2_tokenizer();
        let mut script = tok.encode("Hello world. STOP", false).unwrap();
        let filler = tok.encode(" and on", false).unwrap();
        for _ in 0..200 {
            script.extend_from_slice(&filler);
        }
        let model = ScriptedModel { script, ..Default::default() };
        let produced = model.produced.clone();
        let metrics = Arc::new(Metrics::new("m", 64));
        let engine = start(model, Some(tok), metrics.clone());
        rt().block_on(async {
            let mut r = request("s", 400);
            r.params.stop = vec!["STOP".into()];
            let mut s = engine.add_request(r).await.unwrap();
            let mut text = String::new();
            let mut last = None;
            while let Some(ev) = s.next().await {
                let EngineEvent::Output(o) = ev else { panic!("{ev:?}") };
                // A partial "STOP" is never streamed.
                assert!(!o.outputs.iter().any(|c| c.text.contains('S')), "{o:?}");
                text.push_str(&o.outputs[0].text);
                last = Some(o);
            }
            let last = last.unwrap();
            assert_eq!(text, "Hello world. ");
            assert_eq!(last.outputs[0].finish_reason, Some(FinishReason::Stop));
            assert_eq!(last.outputs[0].stop_reason, Some(StopReason::String("STOP".into())));
            wait_for(|| metrics.kv_cache_usage_perc.get() == 0.0 && metrics.num_requests_running.get() == 0).await;
        });
        assert_eq!(metrics.kv_cache_usage_perc.get(), 0.0);
        assert_eq!(metrics.num_requests_running.get(), 0);
        // The engine stopped stepping the request soon after the stop string, not at max_tokens.
        let steps = produced.lock().unwrap()["s"];
        assert!(steps < 100, "the engine ran the request for {steps} tokens");
        engine.shutdown();
    }
}
