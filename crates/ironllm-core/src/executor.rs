//! The seam between the engine core and the model side: one call per step that runs the forward pass for
//! the planned batch and samples the next token of every sequence that finished its scheduled tokens.
//!
//! With async scheduling the engine uses the two-phase form instead: [`ModelExecutor::submit_model`]
//! launches a step and may return before it is done, [`ModelExecutor::collect_model`] waits for the
//! oldest launched step. The defaults run the step inside `submit_model` (no overlap, always correct),
//! so executors that know nothing of async scheduling keep working.

use crate::outputs::{ModelRunnerOutput, SchedulerOutput};
use crate::CoreError;

/// What [`ModelExecutor::submit_model`] did with a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Submitted {
    /// The step ran to completion; here is its output.
    Done(ModelRunnerOutput),
    /// The step is launched; [`ModelExecutor::collect_model`] returns its output.
    InFlight,
}

/// Runs planned steps. Implemented by the model runner (CPU or CUDA) and by fake models in tests.
///
/// The executor keeps per-request state across steps (token ids, block table, sampling state): a request
/// appears once in `scheduled_new_reqs` (also when it resumes after preemption, with all its tokens so
/// far), then in `scheduled_cached_reqs` while it keeps running, and its state is dropped when its id is
/// listed in `finished_req_ids` or `preempted_req_ids`.
pub trait ModelExecutor: Send {
    /// Executes one step. Must return one entry in `req_ids` per scheduled request, in any order.
    fn execute_model(&mut self, plan: &SchedulerOutput) -> Result<ModelRunnerOutput, CoreError>;

    /// Launches one step (async scheduling). A plan may schedule, for a request whose previous step is
    /// still in flight, the token that step samples (`SchedulerOutput::async_sampling_req_ids` of the
    /// previous plan names such requests): the executor feeds it from the previous step's result, which
    /// it holds even though the scheduler has not seen it yet. Returns [`Submitted::Done`] when the step
    /// already ran, [`Submitted::InFlight`] when its output must be fetched with
    /// [`ModelExecutor::collect_model`]; steps are collected in launch order.
    fn submit_model(&mut self, plan: &SchedulerOutput) -> Result<Submitted, CoreError> {
        self.execute_model(plan).map(Submitted::Done)
    }

    /// Waits for the oldest in-flight step and returns its output. Only called after a
    /// [`ModelExecutor::submit_model`] that returned [`Submitted::InFlight`].
    fn collect_model(&mut self) -> Result<ModelRunnerOutput, CoreError> {
        Err(CoreError::Execution("collect_model called with no step in flight".to_string()))
    }

    /// Whether this executor applies structured-output grammars (token bitmasks) when it samples. The
    /// engine refuses constrained requests on one that does not, rather than ignore the constraint.
    fn supports_structured_output(&self) -> bool {
        false
    }
}

/// A boxed executor is an executor, so the engine can pick its backend (CPU or GPU) at run time.
impl<E: ModelExecutor + ?Sized> ModelExecutor for Box<E> {
    fn execute_model(&mut self, plan: &SchedulerOutput) -> Result<ModelRunnerOutput, CoreError> {
        (**self).execute_model(plan)
    }

    fn submit_model(&mut self, plan: &SchedulerOutput) -> Result<Submitted, CoreError> {
        (**self).submit_model(plan)
    }

    fn collect_model(&mut self) -> Result<ModelRunnerOutput, CoreError> {
        (**self).collect_model()
    }

    fn supports_structured_output(&self) -> bool {
        (**self).supports_structured_output()
    }
}
