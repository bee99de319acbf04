//! Dashboards of the web UI: `…/dashboards[/{name}]` (see [`tally_query::dashboard`]).
//!
//! `PUT` and `DELETE` need the master key. Reading needs a key that may read saved query
//! results (the read key, or an access key permitted `saved_queries` or `cached_queries`): an
//! embedded dashboard is opened with a scoped access key. Such a key sees only the tiles whose
//! saved query it may read, and not at all a dashboard with none, so a dashboard never reveals
//! queries (or other customers' dashboards) its viewer cannot open.

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tally_core::error::ErrorCode;
use tally_query::dashboard::{Dashboard, parse_dashboard};
use tally_query::saved::{self, SavedQuery, format_date};
use tally_store::ObjectKind;

use crate::app::AppState;
use crate::auth::{Access, Caller};
use crate::error::ApiError;
use crate::request::KeenPath;
use crate::routes::queries::{json_ok, query_string_request};
use crate::routes::saved::{created_ms, delete_definition, json_body};

/// What `caller` may see of a stored dashboard.
enum Visible {
    /// The dashboard as the API returns it, with only the tiles the caller may read.
    Shown(Value),
    /// An access key that may read none of its tiles: to that key the dashboard does not exist
    /// (its name and title are another customer's business).
    Hidden,
}

fn dashboard_object(
    state: &AppState,
    caller: &Caller,
    name: &str,
    stored: &Value,
) -> Result<Visible, ApiError> {
    let mut dashboard: Dashboard = serde_json::from_value(stored.clone())
        .map_err(|_| ApiError::internal("a stored dashboard is damaged"))?;
    if caller.scope.is_some() {
        dashboard.tiles.retain(|tile| {
            state
                .catalog
                .object(&caller.project, ObjectKind::SavedQuery, &tile.query_name)
                .and_then(|q| SavedQuery::from_stored(&q))
                .is_some_and(|q| caller.check_saved(&tile.query_name, q.refresh_rate > 0).is_ok())
        });
        if dashboard.tiles.is_empty() {
            return Ok(Visible::Hidden);
        }
    }
    let date = |field: &str| stored.get(field).and_then(Value::as_i64).map(format_date);
    Ok(Visible::Shown(json!({
        "dashboard_name": name,
        "title": dashboard.title,
        "tiles": dashboard.tiles,
        "created_date": date("created_ms"),
        "last_modified_date": date("modified_ms"),
        "url": format!("/3.0/projects/{}/dashboards/{name}", caller.project),
    })))
}

fn reader(
    state: &AppState,
    project: &str,
    raw_query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Caller, ApiError> {
    Ok(query_string_request(state, project, raw_query, headers, Access::SavedResults)?.0)
}

/// `GET …/dashboards`: every dashboard, by name.
pub async fn list(
    State(state): State<AppState>,
    KeenPath(project): KeenPath<String>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = reader(&state, &project, raw_query.as_deref(), &headers)?;
    let mut all = Vec::new();
    for (name, stored) in state.catalog.objects(&caller.project, ObjectKind::Dashboard) {
        if let Visible::Shown(object) = dashboard_object(&state, &caller, &name, &stored)? {
            all.push(object);
        }
    }
    Ok(json_ok(&Value::Array(all)))
}

/// `GET …/dashboards/{name}`.
pub async fn get(
    State(state): State<AppState>,
    KeenPath((project, name)): KeenPath<(String, String)>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = reader(&state, &project, raw_query.as_deref(), &headers)?;
    let stored = state
        .catalog
        .object(&caller.project, ObjectKind::Dashboard, &name)
        .ok_or_else(ApiError::not_found)?;
    match dashboard_object(&state, &caller, &name, &stored)? {
        Visible::Shown(object) => Ok(json_ok(&object)),
        Visible::Hidden => Err(ApiError::not_found()),
    }
}

/// `PUT …/dashboards/{name}` (master key): creates (201) or replaces (200). Every tile must name
/// a saved query that exists.
pub async fn put(
    State(state): State<AppState>,
    KeenPath((project, name)): KeenPath<(String, String)>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (caller, _) = query_string_request(&state, &project, raw_query.as_deref(), &headers, Access::Master)?;
    let project = caller.project;
    saved::check_name(&name)?;
    let body = json_body(&state, &headers, body).await?;
    let dashboard = parse_dashboard(&body)?;
    if let Some(missing) = dashboard.tiles.iter().find(|t| {
        state
            .catalog
            .object(&project, ObjectKind::SavedQuery, &t.query_name)
            .is_none()
    }) {
        return Err(ApiError::new(
            ErrorCode::InvalidParameter,
            format!("There is no saved query named '{}'.", missing.query_name),
        ));
    }
    let now = state.clock.now_ms();
    let mut stored = serde_json::to_value(&dashboard).map_err(ApiError::internal)?;
    stored["created_ms"] = json!(created_ms(&state, &project, ObjectKind::Dashboard, &name, now));
    stored["modified_ms"] = json!(now);
    let created = state
        .catalog
        .put_object(&project, ObjectKind::Dashboard, &name, stored.clone())
        .map_err(ApiError::internal)?;
    let Visible::Shown(object) = dashboard_object(&state, &caller, &name, &stored)? else {
        return Err(ApiError::internal("the master key sees every dashboard"));
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, json_ok(&object)).into_response())
}

/// `DELETE …/dashboards/{name}` (master key): 204, or 404.
pub async fn delete(
    State(state): State<AppState>,
    KeenPath((project, name)): KeenPath<(String, String)>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    delete_definition(
        &state,
        &project,
        ObjectKind::Dashboard,
        &name,
        raw_query.as_deref(),
        &headers,
    )
    .await
}
