//! Keen's error codes.
//!
//! Keen's clients branch on the `error_code` string of an error body
//! (`{"message": "...", "error_code": "..."}`), and the batch API puts the same names into each
//! failed entry. The codes are a closed set, so they are an enum; the HTTP status of each lives in
//! the server's single error-to-HTTP mapping, not here.

use std::fmt;

/// Every `error_code` Tally answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Unknown, missing or revoked API key (401).
    InvalidApiKey,
    /// A project key used on an endpoint that needs the master or admin key (401).
    AdminOnlyEndpoint,
    /// A valid key that lacks the permission the endpoint needs (401).
    InsufficientPermissions,
    /// Unknown project, collection or other resource (404).
    ResourceNotFound,
    /// An event that is not a JSON object, not valid JSON, too big or too deep.
    InvalidEvent,
    /// A collection name that breaks Keen's rules.
    InvalidCollectionName,
    /// A property name that breaks Keen's rules.
    InvalidPropertyName,
    /// A property value that breaks Keen's rules (string too long, number out of range, bad
    /// `keen.timestamp`, bad add-on spec, ...).
    InvalidPropertyValue,
    /// `keen` is present but not an object.
    NamespaceType,
    /// A key under `keen` that clients may not set.
    InvalidKeenNamespaceProperty,
    /// A batch body that is not an object of arrays.
    InvalidBatch,
    /// A request body over the size or event-count limit (413).
    RequestTooLarge,
    /// A request body whose content type cannot hold JSON (415).
    UnsupportedContentType,
    /// A required parameter is missing.
    MissingRequiredProperty,
    /// A parameter has a value that is not allowed.
    InvalidParameter,
    /// A bad `timeframe`.
    TimeframeDefinition,
    /// A bad `interval`.
    IntervalDefinition,
    /// A bad filter.
    FilterDefinition,
    /// An unknown analysis type.
    InvalidAnalysisType,
    /// Over a rate limit (429).
    RateLimited,
    /// Ingest cannot take more right now (503, with `Retry-After`).
    ServiceUnavailable,
    /// A query ran past its time limit (504).
    QueryTimeout,
    /// Anything else (500); details are logged, never sent.
    InternalServer,
    /// The path exists but not with this method (405).
    MethodNotAllowed,
}

impl ErrorCode {
    /// The wire name of the code, as Keen spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidApiKey => "InvalidApiKeyError",
            ErrorCode::AdminOnlyEndpoint => "AdminOnlyEndpointError",
            ErrorCode::InsufficientPermissions => "InsufficientPermissionsError",
            ErrorCode::ResourceNotFound => "ResourceNotFoundError",
            ErrorCode::InvalidEvent => "InvalidEventError",
            ErrorCode::InvalidCollectionName => "InvalidCollectionNameError",
            ErrorCode::InvalidPropertyName => "InvalidPropertyNameError",
            ErrorCode::InvalidPropertyValue => "InvalidPropertyValueError",
            ErrorCode::NamespaceType => "NamespaceTypeError",
            ErrorCode::InvalidKeenNamespaceProperty => "InvalidKeenNamespaceProperty",
            ErrorCode::InvalidBatch => "InvalidBatchError",
            ErrorCode::RequestTooLarge => "RequestTooLargeError",
            ErrorCode::UnsupportedContentType => "UnsupportedContentTypeError",
            ErrorCode::MissingRequiredProperty => "MissingRequiredPropertyError",
            ErrorCode::InvalidParameter => "InvalidParameterError",
            ErrorCode::TimeframeDefinition => "TimeframeDefinitionError",
            ErrorCode::IntervalDefinition => "IntervalDefinitionError",
            ErrorCode::FilterDefinition => "FilterDefinitionError",
            ErrorCode::InvalidAnalysisType => "InvalidAnalysisTypeError",
            ErrorCode::RateLimited => "TooManyRequestsError",
            ErrorCode::ServiceUnavailable => "ServiceUnavailableError",
            ErrorCode::QueryTimeout => "QueryTimeoutError",
            ErrorCode::InternalServer => "InternalServerError",
            ErrorCode::MethodNotAllowed => "MethodNotAllowedError",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why one event was refused: a Keen error code and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct EventError {
    /// The error code clients branch on.
    pub code: ErrorCode,
    /// A sentence for a person, naming what was wrong.
    pub message: String,
}

impl EventError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}
