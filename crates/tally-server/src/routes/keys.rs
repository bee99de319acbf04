//! The access keys API (reference §6): `/3.0/projects/{PID}/keys[/{key}[/revoke|/unrevoke]]`,
//! master key only.
//!
//! Definitions are validated by `tally_query::access` and kept, with the key's hash only, in
//! the catalog. The key itself is shown when it is created, and echoed where the request names
//! it; a listing shows each key's `id` (the first 16 hex digits of its hash) instead, which the
//! paths accept too. Every change reaches the catalog's key index before the answer is sent, so
//! a revoked, narrowed or deleted key is refused from the very next request.

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tally_core::error::ErrorCode;
use tally_core::time::format_timestamp_ms;
use tally_query::access::{key_object, parse_key_request};
use tally_store::{AccessKeyInfo, CatalogError};

use crate::app::AppState;
use crate::error::ApiError;
use crate::request::KeenPath;
use crate::routes::queries::{json_ok, master_project};
use crate::routes::saved::json_body;

fn catalog_error(e: CatalogError) -> ApiError {
    match e {
        CatalogError::KeyNotFound | CatalogError::ProjectNotFound => ApiError::not_found(),
        CatalogError::TooManyKeys(_) => ApiError::new(ErrorCode::InvalidParameter, e.to_string()),
        other => ApiError::internal(other),
    }
}

/// The key in the clear, when the path gave it (not when it gave the id).
fn echoed<'a>(key: &'a str, info: &AccessKeyInfo) -> Option<&'a str> {
    (key != info.id).then_some(key)
}

/// Catalog writes rewrite a file and fsync: off the async runtime.
async fn in_catalog<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce(&dyn tally_store::Catalog) -> Result<T, CatalogError> + Send + 'static,
) -> Result<T, ApiError> {
    let catalog = state.catalog.clone();
    tokio::task::spawn_blocking(move || work(catalog.as_ref()))
        .await
        .map_err(ApiError::internal)?
        .map_err(catalog_error)
}

/// `POST /keys`: creates an access key; 201 with the key object, the key in the clear.
pub async fn create(
    State(state): State<AppState>,
    KeenPath(project): KeenPath<String>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let project = master_project(&state, &project, raw_query.as_deref(), &headers)?;
    let request = parse_key_request(&json_body(&state, &headers, body).await?)?;
    let created_at = format_timestamp_ms(state.clock.now_ms());
    let (key, info) = in_catalog(&state, move |catalog| {
        catalog.create_access_key(
            &project,
            request.definition,
            request.is_active.unwrap_or(true),
            &created_at,
        )
    })
    .await?;
    tracing::info!(%project, key_id = %info.id, name = %info.definition.name, "access key created");
    Ok((StatusCode::CREATED, json_ok(&key_object(Some(&key), &info))).into_response())
}

/// `GET /keys`: every access key of the project (by id; the keys themselves are not kept).
pub async fn list(
    State(state): State<AppState>,
    KeenPath(project): KeenPath<String>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let project = master_project(&state, &project, raw_query.as_deref(), &headers)?;
    let keys: Vec<Value> = state
        .catalog
        .access_keys(&project)
        .iter()
        .map(|info| key_object(None, info))
        .collect();
    Ok(json_ok(&Value::Array(keys)))
}

/// `GET /keys/{key}`: one access key, named by the key or its id.
pub async fn get(
    State(state): State<AppState>,
    KeenPath((project, key)): KeenPath<(String, String)>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let project = master_project(&state, &project, raw_query.as_deref(), &headers)?;
    let info = state
        .catalog
        .access_key(&project, &key)
        .ok_or_else(ApiError::not_found)?;
    Ok(json_ok(&key_object(echoed(&key, &info), &info)))
}

/// `POST /keys/{key}`: replaces the key's name, permissions, options and (when given)
/// `is_active`; 200 with the key object.
pub async fn update(
    State(state): State<AppState>,
    KeenPath((project, key)): KeenPath<(String, String)>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let project = master_project(&state, &project, raw_query.as_deref(), &headers)?;
    let request = parse_key_request(&json_body(&state, &headers, body).await?)?;
    let named = key.clone();
    let info = in_catalog(&state, move |catalog| {
        catalog.update_access_key(&project, &named, request.definition, request.is_active)
    })
    .await?;
    tracing::info!(%project, key_id = %info.id, "access key updated");
    Ok(json_ok(&key_object(echoed(&key, &info), &info)))
}

async fn set_active(
    state: AppState,
    project: String,
    key: String,
    raw_query: Option<String>,
    headers: HeaderMap,
    active: bool,
) -> Result<Response, ApiError> {
    let project = master_project(&state, &project, raw_query.as_deref(), &headers)?;
    if state.catalog.access_key(&project, &key).is_none() {
        return Err(ApiError::not_found());
    }
    let named = key.clone();
    in_catalog(&state, move |catalog| {
        catalog.set_key_active(&project, &named, active)
    })
    .await?;
    let info = state
        .catalog
        .access_key(&project, &key)
        .ok_or_else(ApiError::not_found)?;
    tracing::info!(%project, key_id = %info.id, active, "access key revoked or restored");
    Ok(json_ok(&key_object(echoed(&key, &info), &info)))
}

/// `POST /keys/{key}/revoke`: the key stops working at once; 200 with the key object.
pub async fn revoke(
    State(state): State<AppState>,
    KeenPath((project, key)): KeenPath<(String, String)>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    set_active(state, project, key, raw_query, headers, false).await
}

/// `POST /keys/{key}/unrevoke`: the key works again; 200 with the key object.
pub async fn unrevoke(
    State(state): State<AppState>,
    KeenPath((project, key)): KeenPath<(String, String)>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    set_active(state, project, key, raw_query, headers, true).await
}

/// `DELETE /keys/{key}`: 204, or 404 if there is no such access key.
pub async fn delete(
    State(state): State<AppState>,
    KeenPath((project, key)): KeenPath<(String, String)>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let project = master_project(&state, &project, raw_query.as_deref(), &headers)?;
    let existed = in_catalog(&state, move |catalog| catalog.delete_access_key(&project, &key)).await?;
    if !existed {
        return Err(ApiError::not_found());
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
