//! Errors: [`ApiError`] is what a client sees — vLLM's OpenAI-style JSON body
//! (`{"error": {"message", "type", "param", "code"}}`) with vLLM's status codes — and
//! [`ServerError`] is what starting or running the server can fail with.
//!
//! Every failure a request can meet is turned into an `ApiError` at the edge, so no handler ever
//! answers with axum's default plain-text rejections (422/415) or panics on bad input.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An error answered to a client.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    /// vLLM's error type: `BadRequestError`, `NotFoundError`, `InternalServerError`, ...
    pub kind: &'static str,
    pub message: String,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, kind, message: message.into(), param: None }
    }

    /// HTTP 400 for an invalid request.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "BadRequestError", message)
    }

    /// HTTP 400 naming the field at fault. As vLLM's `VLLMValidationError` does, the message ends
    /// with `(parameter=..., value=...)` when a value is given.
    pub fn invalid_param(message: impl Into<String>, param: &str, value: Option<String>) -> ApiError {
        let mut message = message.into();
        match value {
            Some(v) => message.push_str(&format!(" (parameter={param}, value={v})")),
            None => message.push_str(&format!(" (parameter={param})")),
        }
        ApiError { param: Some(param.to_string()), ..ApiError::bad_request(message) }
    }

    /// Names the request field at fault without changing the message.
    pub fn with_param(mut self, param: &str) -> ApiError {
        self.param = Some(param.to_string());
        self
    }

    /// HTTP 404 for a model this server does not serve (vLLM's wording).
    pub fn model_not_found(model: &str) -> ApiError {
        ApiError {
            param: Some("model".into()),
            ..ApiError::new(StatusCode::NOT_FOUND, "NotFoundError", format!("The model `{model}` does not exist."))
        }
    }

    /// HTTP 401 when an API key is configured and the request does not carry it.
    pub fn unauthorized() -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "AuthenticationError", "Unauthorized")
    }

    /// HTTP 413 for a body over the configured limit.
    pub fn payload_too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            format!("The request body is larger than the server's limit of {limit} bytes."),
        )
    }

    pub fn not_found_route() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "NotFoundError", "Not Found")
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "Method Not Allowed")
    }

    /// HTTP 500: a bug or an engine failure, never the client's fault.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError", message)
    }

    /// HTTP 503: the engine is dead or the server is shutting down.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailableError", message)
    }

    /// The body, with vLLM's `ErrorResponse` fields in vLLM's order.
    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorInfo {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.status.as_u16(),
            },
        }
    }

    /// The body as a JSON value.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.body()).unwrap_or_default()
    }
}

/// vLLM's `ErrorResponse`.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorInfo<'a>,
}

/// vLLM's `ErrorInfo`.
#[derive(Debug, Serialize)]
pub struct ErrorInfo<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: u16,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.kind, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Errors of starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("binding {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("the chat template does not compile: {0}")]
    ChatTemplate(String),
    #[error("--chat-template: {0}")]
    ChatTemplateArg(String),
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("serving HTTP: {0}")]
    Serve(std::io::Error),
    #[error("invalid server configuration: {0}")]
    Config(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_has_vllm_shape() {
        let e = ApiError::invalid_param("bad", "max_tokens", Some("5".into()));
        let v = e.to_json();
        assert_eq!(v["error"]["message"], "bad (parameter=max_tokens, value=5)");
        assert_eq!(v["error"]["type"], "BadRequestError");
        assert_eq!(v["error"]["param"], "max_tokens");
        assert_eq!(v["error"]["code"], 400);
        assert_eq!(
            serde_json::to_string(&e.body()).unwrap(),
            r#"{"error":{"message":"bad (parameter=max_tokens, value=5)","type":"BadRequestError","param":"max_tokens","code":400}}"#
        );
        let nf = ApiError::model_not_found("x").to_json();
        assert_eq!(nf["error"]["message"], "The model `x` does not exist.");
        assert_eq!(nf["error"]["code"], 404);
    }
}
