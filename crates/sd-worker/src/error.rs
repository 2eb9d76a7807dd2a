//! The JSON error every route answers with: a status, a machine-readable code, the offending
//! request field and a message that says what to do.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// An HTTP error answered as `{"error": {"code", "message", "field", "param", "type"}}`
/// (`param` and `type` are the OpenAI names of the same information).
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code (`invalid_request`, `queue_full`, …).
    pub code: &'static str,
    /// The request field at fault, as named in the request (`steps`, `loras[0].path`, `body`).
    pub field: Option<String>,
    /// What went wrong and what would work.
    pub message: String,
    /// Seconds to wait before retrying (429 and 503 answers).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// A 400 for a bad value in `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", Some(field.into()), message)
    }

    /// An error with every part given.
    pub fn new(status: StatusCode, code: &'static str, field: Option<String>, message: impl Into<String>) -> Self {
        Self { status, code, field, message: message.into(), retry_after: None }
    }

    /// A 404 for an unknown or expired job.
    pub fn job_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "job_not_found",
            Some("id".into()),
            format!("no job {id:?}: it never existed or its result expired; submit it again"),
        )
    }

    /// Adds a `Retry-After` header.
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// The JSON body of this error.
    pub fn body(&self) -> serde_json::Value {
        let kind = if self.status.is_server_error() { "server_error" } else { "invalid_request_error" };
        json!({"error": {
            "code": self.code,
            "message": self.message,
            "field": self.field,
            "param": self.field,
            "type": kind,
        }})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{} ({}): {}", self.code, field, self.message),
            None => write!(f, "{}: {}", self.code, self.message),
        }
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// A failed job's error as streamed and stored: `{code, message, field?}`.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct JobError {
    /// `cancelled`, `invalid_request`, `generation_failed`, `internal_error`, `shutdown`.
    pub code: &'static str,
    /// What happened.
    pub message: String,
    /// The request field at fault, when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Every code a job error may carry.
pub const JOB_ERROR_CODES: [&str; 8] =
    ["cancelled", "invalid_request", "invalid_lora", "invalid_controlnet", "generation_failed", "internal_error", "shutdown", "worker_lost"];

impl JobError {
    /// An error with no field.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), field: None }
    }

    /// An error read back from elsewhere (queue mode's Redis): an unknown code reads as
    /// `generation_failed`.
    pub fn from_parts(code: &str, message: impl Into<String>, field: Option<String>) -> Self {
        let code = JOB_ERROR_CODES.iter().copied().find(|c| *c == code).unwrap_or("generation_failed");
        Self { code, message: message.into(), field }
    }
}

/// Maps a body-reading failure (too large, aborted) to a JSON error naming `body`.
pub fn body_rejection(status: StatusCode, text: String, limit: usize) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            status,
            "body_too_large",
            Some("body".into()),
            format!("the request body exceeds the {limit}-byte limit; send smaller images or raise --max-body-bytes"),
        )
    } else {
        ApiError::new(status, "bad_body", Some("body".into()), format!("cannot read the request body: {text}"))
    }
}
