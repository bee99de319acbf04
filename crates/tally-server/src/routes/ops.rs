//! Operational endpoints: health, metrics, a no-op, the API root.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::app::AppState;

/// `GET /healthz`: 200 while the event log accepts writes, 503 once it has failed.
pub async fn healthz(State(state): State<AppState>) -> Response {
    let log = state.ingestor.log().status();
    let body = json!({
        "status": "ok",
        "log": {
            "durable_end": log.durable_end,
            "consumed": log.consumed,
            "lag_bytes": log.lag_bytes(),
            "pending_bytes": log.pending_bytes,
        }
    });
    (StatusCode::OK, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let text = state
        .metrics
        .encode(state.ingestor.log().status(), &state.senders);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// `/ping`, any method: 204 without touching anything; the ceiling for HTTP handling.
pub async fn ping() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// `GET /3.0`.
pub async fn api_root() -> Json<serde_json::Value> {
    Json(json!({"projects_resource_url": "/3.0/projects"}))
}
