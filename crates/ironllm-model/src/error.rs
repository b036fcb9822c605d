//! The model crate's error type.

use std::path::Path;

/// Errors from loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("invalid weights: {0}")]
    Weights(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Unsupported(String),
}

impl ModelError {
    /// An I/O error with the path it concerns.
    pub fn io(path: &Path, source: std::io::Error) -> ModelError {
        ModelError::Io { path: path.display().to_string(), source }
    }
}
