//! The core crate's error type.

/// Errors raised by the engine core.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A sampling parameter or request field is out of range; the message names the field and bound.
    #[error("{0}")]
    InvalidParams(String),
    /// The request cannot fit the model's context or the KV cache.
    #[error("{0}")]
    TooLong(String),
    /// A request id is already in use.
    #[error("request id `{0}` is already in use")]
    DuplicateRequest(String),
    /// Engine limits that contradict each other; the message names the fields and bounds.
    #[error("{0}")]
    InvalidConfig(String),
    /// The model side failed to execute a step.
    #[error("model execution failed: {0}")]
    Execution(String),
}
