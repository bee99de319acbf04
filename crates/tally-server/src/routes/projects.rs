//! `POST /3.0/projects` (admin key): create a project and return its keys, once.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tally_core::error::ErrorCode;
use tally_core::time::format_timestamp_ms;
use tally_store::CatalogError;

use crate::app::AppState;
use crate::auth::{authorize_admin, presented_key};
use crate::error::ApiError;
use crate::request::{Params, read_body};

/// Largest body accepted here.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Creates a project from `{"name": "..."}`.
pub async fn create_project(
    State(state): State<AppState>,
    params: Params,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = presented_key(&headers, params.get("api_key"));
    authorize_admin(state.admin_key.as_ref(), key)?;
    let body = read_body(&headers, body, MAX_BODY_BYTES).await?;
    let request: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidParameter,
            format!("Body must be JSON like {{\"name\": \"shop\"}} ({e})."),
        )
    })?;
    let name = match request.get("name") {
        Some(Value::String(name)) => name.clone(),
        Some(_) => {
            return Err(ApiError::new(
                ErrorCode::InvalidParameter,
                "'name' must be a string.",
            ));
        }
        None => {
            return Err(ApiError::new(
                ErrorCode::MissingRequiredProperty,
                "'name' is required.",
            ));
        }
    };
    let catalog = state.catalog.clone();
    let created_at = format_timestamp_ms(state.clock.now_ms());
    let created = tokio::task::spawn_blocking(move || catalog.create_project(&name, &created_at))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| match e {
            CatalogError::InvalidName(m) => ApiError::new(ErrorCode::InvalidParameter, m),
            other => ApiError::internal(other),
        })?;
    tracing::info!(project = %created.id, name = %created.name, "project created");
    Ok((StatusCode::CREATED, Json(created)).into_response())
}
