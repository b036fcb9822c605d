//! The seam between the engine core and the model side: one call per step that runs the forward pass for
//! the planned batch and samples the next token of every sequence that finished its scheduled tokens.

use crate::outputs::{ModelRunnerOutput, SchedulerOutput};
use crate::CoreError;

/// Runs planned steps. Implemented by the model runner (CPU or CUDA) and by fake models in tests.
///
/// The executor keeps per-request state across steps (token ids, block table, sampling state): a request
/// appears once in `scheduled_new_reqs` (also when it resumes after preemption, with all its tokens so
/// far), then in `scheduled_cached_reqs` while it keeps running, and its state is dropped when its id is
/// listed in `finished_req_ids` or `preempted_req_ids`.
pub trait ModelExecutor: Send {
    /// Executes one step. Must return one entry in `req_ids` per scheduled request, in any order.
    fn execute_model(&mut self, plan: &SchedulerOutput) -> Result<ModelRunnerOutput, CoreError>;

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

    fn supports_structured_output(&self) -> bool {
        (**self).supports_structured_output()
    }
}
