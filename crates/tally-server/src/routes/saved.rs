//! Saved and cached queries (reference §4.1): `…/queries/saved[/{name}[/result]]`.
//!
//! Definitions are validated by `tally_query::saved` and kept in the catalog; results of cached
//! queries come from [`crate::answers::CachedAnswers`]. Everything but `/result` needs the master
//! key; `/result` also opens to the read key and to access keys permitted `saved_queries` or
//! `cached_queries` (within their allowed and blocked names, with their filters applied).

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tally_core::error::ErrorCode;
use tally_core::ids::ProjectId;
use tally_query::saved::{self, SavedQuery, format_date};
use tally_store::ObjectKind;

use crate::answers::saved_result;
use crate::app::AppState;
use crate::auth::Access;
use crate::error::ApiError;
use crate::limits::RateClass;
use crate::request::{KeenPath, read_body};
use crate::routes::queries::{
    Answered, answer, gated, json_ok, limits, master_project, query_string_request,
};

/// A JSON request body, refused in Keen's shape when it is not JSON.
pub(crate) async fn json_body(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Value, ApiError> {
    let bytes = read_body(headers, body, state.ingestor.limits().max_body_bytes).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidParameter,
            format!("The request body must be a JSON object: {e}."),
        )
    })
}

/// When the named definition was first stored: kept across replacements, `now` for a new one.
pub(crate) fn created_ms(
    state: &AppState,
    project: &ProjectId,
    kind: ObjectKind,
    name: &str,
    now: i64,
) -> i64 {
    state
        .catalog
        .object(project, kind, name)
        .and_then(|old| old.get("created_ms").and_then(Value::as_i64))
        .unwrap_or(now)
}

/// Forgets a definition's cached answers; off the async runtime, since it waits for a refresh
/// in flight.
pub(crate) async fn forget(
    state: &AppState,
    project: ProjectId,
    kind: ObjectKind,
    name: &str,
) -> Result<(), ApiError> {
    let (answers, name) = (state.answers.clone(), name.to_owned());
    tokio::task::spawn_blocking(move || answers.forget(project, kind, &name))
        .await
        .map_err(ApiError::internal)
}

/// `DELETE` of a saved query or dataset (master key): 204, or 404 if there is none.
pub(crate) async fn delete_definition(
    state: &AppState,
    project: &str,
    kind: ObjectKind,
    name: &str,
    raw_query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let project = master_project(state, project, raw_query, headers)?;
    let existed = state
        .catalog
        .delete_object(&project, kind, name)
        .map_err(ApiError::internal)?;
    if !existed {
        return Err(ApiError::not_found());
    }
    forget(state, project, kind, name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn saved_object(
    state: &AppState,
    project: ProjectId,
    name: &str,
    stored: &Value,
    saved: &SavedQuery,
) -> Value {
    let date = |field: &str| stored.get(field).and_then(Value::as_i64).map(format_date);
    let url = format!("/3.0/projects/{project}/queries/saved/{name}");
    json!({
        "query_name": name,
        "refresh_rate": saved.refresh_rate,
        "created_date": date("created_ms"),
        "last_modified_date": date("modified_ms"),
        "user_last_modified_date": date("modified_ms"),
        "urls": {
            "cached_query_url": url,
            "cached_query_results_url": format!("{url}/result"),
        },
        "query": saved.echoed_query(),
        "metadata": saved.metadata,
        "run_information": state.answers.run_information(project, name, saved),
    })
}

fn lookup(state: &AppState, project: ProjectId, name: &str) -> Result<(Value, SavedQuery), ApiError> {
    let stored = state
        .catalog
        .object(&project, ObjectKind::SavedQuery, name)
        .ok_or_else(ApiError::not_found)?;
    let saved = SavedQuery::from_stored(&stored)
        .ok_or_else(|| ApiError::internal("a stored saved query is damaged"))?;
    Ok((stored, saved))
}

/// `GET …/queries/saved`: every saved query of the project.
pub async fn list(
    State(state): State<AppState>,
    KeenPath(project): KeenPath<String>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let project = master_project(&state, &project, raw_query.as_deref(), &headers)?;
    let all: Vec<Value> = state
        .catalog
        .objects(&project, ObjectKind::SavedQuery)
        .into_iter()
        .filter_map(|(name, stored)| {
            let saved = SavedQuery::from_stored(&stored)?;
            Some(saved_object(&state, project, &name, &stored, &saved))
        })
        .collect();
    Ok(json_ok(&Value::Array(all)))
}

/// `GET …/queries/saved/{name}`.
pub async fn get(
    State(state): State<AppState>,
    KeenPath((project, name)): KeenPath<(String, String)>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let project = master_project(&state, &project, raw_query.as_deref(), &headers)?;
    let (stored, saved) = lookup(&state, project, &name)?;
    Ok(json_ok(&saved_object(&state, project, &name, &stored, &saved)))
}

/// `PUT …/queries/saved/{name}`: creates (201) or replaces (200). A replaced cached query's old
/// result is dropped; a cached query is computed at once in the background.
pub async fn put(
    State(state): State<AppState>,
    KeenPath((project, name)): KeenPath<(String, String)>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let project = master_project(&state, &project, raw_query.as_deref(), &headers)?;
    saved::check_name(&name)?;
    let body = json_body(&state, &headers, body).await?;
    let now = state.clock.now_ms();
    let saved = saved::parse_saved_query(&body, now, state.answers.bounds)?;
    let stored = saved.to_stored(
        created_ms(&state, &project, ObjectKind::SavedQuery, &name, now),
        now,
    );
    // Stored first, then the old answers dropped: a refresh of the old definition still in
    // flight finds it replaced and keeps nothing.
    let created = state
        .catalog
        .put_object(&project, ObjectKind::SavedQuery, &name, stored.clone())
        .map_err(ApiError::internal)?;
    forget(&state, project, ObjectKind::SavedQuery, &name).await?;
    if saved.refresh_rate > 0 {
        let (answers, saved, name) = (state.answers.clone(), saved.clone(), name.clone());
        tokio::task::spawn_blocking(move || answers.refresh_saved(project, &name, &saved));
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        json_ok(&saved_object(&state, project, &name, &stored, &saved)),
    )
        .into_response())
}

/// `DELETE …/queries/saved/{name}`: 204.
pub async fn delete(
    State(state): State<AppState>,
    KeenPath((project, name)): KeenPath<(String, String)>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    delete_definition(
        &state,
        &project,
        ObjectKind::SavedQuery,
        &name,
        raw_query.as_deref(),
        &headers,
    )
    .await
}

/// `GET …/queries/saved/{name}/result` (read or master key, or an access key with
/// `saved_queries` / `cached_queries`): the object with its `result`, computed now for a plain
/// saved query, from the cache for a cached one. For an access key with filters the result is
/// the query's with those filters AND-ed in, computed for that key (and kept in the result
/// cache for the query's `refresh_rate`), never the shared cached answer.
pub async fn result(
    State(state): State<AppState>,
    KeenPath((project, name)): KeenPath<(String, String)>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (caller, _) = query_string_request(
        &state,
        &project,
        raw_query.as_deref(),
        &headers,
        Access::SavedResults,
    )?;
    let project = caller.project;
    caller.check_saved_name(&name)?;
    let (stored, saved) = lookup(&state, project, &name)?;
    let cached = saved.refresh_rate > 0;
    caller.check_saved(&name, cached)?;
    let mut object = saved_object(&state, project, &name, &stored, &saved);
    let filters = caller.saved_filters();
    let now = state.clock.now_ms();
    let (result, run_information) = if !filters.is_empty() {
        state.rate_limiter.take(&caller.key, RateClass::Queries)?;
        let mut prepared = saved.prepare(now)?;
        prepared.restrict(&filters);
        let max_age = cached.then_some(saved.refresh_rate);
        let body = match answer(&state, project, prepared, max_age).await? {
            Answered::Cached { body, .. } => serde_json::from_str(&body).map_err(ApiError::internal)?,
            Answered::Json(text) => serde_json::from_str(&text).map_err(ApiError::internal)?,
            Answered::Csv(_) => return Err(ApiError::internal("a saved query answered CSV")),
        };
        (saved_result(&saved, body), object["run_information"].take())
    } else if !cached {
        state.rate_limiter.take(&caller.key, RateClass::Queries)?;
        let (_, timeout) = limits(&state);
        let answers = state.answers.clone();
        let saved = saved.clone();
        let result = gated(&state, project, timeout, move || {
            answers.run_saved(project, &saved, now)
        })
        .await?;
        (result, Value::Null)
    } else {
        // Usually a lookup; the first read after a start may compute, so it takes a slot.
        let (_, timeout) = limits(&state);
        let (answers, saved, name) = (state.answers.clone(), saved.clone(), name.clone());
        gated(&state, project, timeout, move || {
            answers.cached_result(project, &name, &saved)
        })
        .await?
    };
    object["result"] = result;
    object["run_information"] = run_information;
    Ok(json_ok(&object))
}
