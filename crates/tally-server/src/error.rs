//! The one place where errors become HTTP responses.
//!
//! Every handler returns `Result<_, ApiError>`. An [`ApiError`] carries Keen's error code and a
//! message for the client; [`status_of`] decides the HTTP status from the code, and the body is
//! always Keen's `{"message": "...", "error_code": "..."}`. Internal failures are logged with
//! their details and answered with a generic message.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tally_core::error::{ErrorCode, EventError};
use tally_core::log::LogError;
use tally_ingest::IngestError;

/// An error answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// Keen's error code.
    pub code: ErrorCode,
    /// What to tell the client.
    pub message: String,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u32>,
}

impl ApiError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// An internal failure: `detail` is logged, the client sees a generic message.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(
            ErrorCode::InternalServer,
            "Tally hit an internal error; it has been logged.",
        )
    }

    /// 404 for an unknown resource.
    pub fn not_found() -> Self {
        Self::new(ErrorCode::ResourceNotFound, "Resource not found")
    }
}

/// The HTTP status for each error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidApiKey | ErrorCode::AdminOnlyEndpoint | ErrorCode::InsufficientPermissions => {
            StatusCode::UNAUTHORIZED
        }
        ErrorCode::ResourceNotFound => StatusCode::NOT_FOUND,
        ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::UnsupportedContentType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::ServiceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::QueryTimeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::InternalServer => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::InvalidEvent
        | ErrorCode::InvalidCollectionName
        | ErrorCode::InvalidPropertyName
        | ErrorCode::InvalidPropertyValue
        | ErrorCode::NamespaceType
        | ErrorCode::InvalidKeenNamespaceProperty
        | ErrorCode::InvalidBatch
        | ErrorCode::MissingRequiredProperty
        | ErrorCode::InvalidParameter
        | ErrorCode::TimeframeDefinition
        | ErrorCode::IntervalDefinition
        | ErrorCode::FilterDefinition
        | ErrorCode::InvalidAnalysisType => StatusCode::BAD_REQUEST,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status_of(self.code);
        let body = Json(json!({"message": self.message, "error_code": self.code.as_str()}));
        let mut response = (status, body).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<EventError> for ApiError {
    fn from(e: EventError) -> Self {
        Self::new(e.code, e.message)
    }
}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Overloaded {
                reason,
                retry_after_secs,
            } => {
                tracing::warn!(reason, "ingest refused: event log over its bound");
                Self {
                    retry_after: Some(retry_after_secs),
                    ..Self::new(
                        ErrorCode::ServiceUnavailable,
                        format!("Tally cannot accept more events right now ({reason}); retry later."),
                    )
                }
            }
            LogError::Closed => Self {
                retry_after: Some(1),
                ..Self::new(
                    ErrorCode::ServiceUnavailable,
                    "Tally is shutting down; retry later.",
                )
            },
            LogError::Io(detail) => Self::internal(format!("event log: {detail}")),
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Request(e) => e.into(),
            IngestError::Log(e) => e.into(),
        }
    }
}

impl From<tally_query::SpecError> for ApiError {
    fn from(e: tally_query::SpecError) -> Self {
        ApiError::new(e.code, e.message)
    }
}

impl From<tally_query::exec::ExecError> for ApiError {
    fn from(e: tally_query::exec::ExecError) -> Self {
        use tally_query::exec::ExecError;
        match e {
            ExecError::Timeout => ApiError::new(
                tally_core::error::ErrorCode::QueryTimeout,
                "The query did not finish within the time limit; narrow the timeframe or add filters.",
            ),
            ExecError::TooBig(message) => {
                ApiError::new(tally_core::error::ErrorCode::InvalidParameter, message)
            }
            ExecError::Spec(e) => e.into(),
        }
    }
}
