//! Cached datasets (reference §4.2): `/3.0/projects/{PID}/datasets[/{name}[/results]]`.
//!
//! Definitions are validated by `tally_query::dataset` and kept in the catalog; buckets and
//! results come from [`crate::answers::CachedAnswers`]. `PUT` and `DELETE` need the master key;
//! reading definitions (`read`), listing them (`list`) and results (`retrieve`) also open to the
//! read key and to access keys with the `datasets` permission, within their `datasets` option.

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tally_core::error::ErrorCode;
use tally_core::ids::ProjectId;
use tally_query::access::DatasetOp;
use tally_query::dataset::{self, Dataset};
use tally_query::plan::{Plan, Prepared};
use tally_query::saved::{check_name, format_date};
use tally_store::ObjectKind;

use crate::app::AppState;
use crate::auth::Access;
use crate::error::ApiError;
use crate::limits::RateClass;
use crate::request::KeenPath;
use crate::routes::queries::{
    Answered, answer, gated, json_ok, json_text, limits, master_project, query_string_request,
};
use crate::routes::saved::{delete_definition, forget, json_body};

/// The most definitions one list page holds.
const MAX_PAGE: usize = 100;

fn definition(state: &AppState, project: ProjectId, name: &str, dataset: &Dataset) -> Value {
    let (run, newest) = state.answers.dataset_status(project, name);
    let last = run.last_success_ms;
    let now = state.clock.now_ms();
    let zone = dataset.spec(now).map(|s| s.zone).ok();
    let mut echo = dataset.to_json();
    let fields = json!({
        "project_id": project.to_string(),
        "organization_id": null,
        "dataset_name": name,
        "last_scheduled_date": last.map(format_date),
        "latest_subtimeframe_available": newest.zip(zone).map(|(ms, zone)| zone.format_ms(ms)),
        "milliseconds_behind": last.map(|ms| (now - ms).max(0)),
        "run_information": run.to_json(now, None),
    });
    if let (Value::Object(echo), Value::Object(fields)) = (&mut echo, fields) {
        echo.extend(fields);
    }
    echo
}

fn lookup(state: &AppState, project: ProjectId, name: &str) -> Result<Dataset, ApiError> {
    let stored = state
        .catalog
        .object(&project, ObjectKind::Dataset, name)
        .ok_or_else(ApiError::not_found)?;
    Dataset::from_stored(&stored).ok_or_else(|| ApiError::internal("a stored dataset is damaged"))
}

/// `PUT /datasets/{name}` (master key): creates (201) or replaces (200) the definition; the
/// first computation starts at once in the background.
pub async fn put(
    State(state): State<AppState>,
    KeenPath((project, name)): KeenPath<(String, String)>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let project = master_project(&state, &project, raw_query.as_deref(), &headers)?;
    check_name(&name)?;
    let body = json_body(&state, &headers, body).await?;
    let dataset = dataset::parse_dataset(&body, state.clock.now_ms())?;
    // Stored first, then the old answers dropped: a refresh of the old definition still in
    // flight finds it replaced and keeps nothing.
    let created = state
        .catalog
        .put_object(&project, ObjectKind::Dataset, &name, dataset.to_json())
        .map_err(ApiError::internal)?;
    forget(&state, project, ObjectKind::Dataset, &name).await?;
    {
        let (answers, dataset, name) = (state.answers.clone(), dataset.clone(), name.clone());
        tokio::task::spawn_blocking(move || answers.refresh_dataset(project, &name, &dataset));
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, json_ok(&definition(&state, project, &name, &dataset))).into_response())
}

/// `GET /datasets/{name}` (read or master key): the definition.
pub async fn get(
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
        Access::Datasets(DatasetOp::Read),
    )?;
    caller.check_dataset(DatasetOp::Read, &name)?;
    let project = caller.project;
    let dataset = lookup(&state, project, &name)?;
    Ok(json_ok(&definition(&state, project, &name, &dataset)))
}

/// `GET /datasets?limit=&after_name=` (read or master key): definitions by name, a page at a
/// time, with the next page's URL.
pub async fn list(
    State(state): State<AppState>,
    KeenPath(project): KeenPath<String>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (caller, params) = query_string_request(
        &state,
        &project,
        raw_query.as_deref(),
        &headers,
        Access::Datasets(DatasetOp::List),
    )?;
    let project = caller.project;
    let limit = match params.get("limit") {
        None => 10,
        Some(v) => match v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())) {
            Some(n) if (1..=MAX_PAGE as u64).contains(&n) => n as usize,
            _ => {
                return Err(ApiError::new(
                    ErrorCode::InvalidParameter,
                    format!("The 'limit' parameter must be a whole number from 1 to {MAX_PAGE}."),
                ));
            }
        },
    };
    let after = params.get("after_name").map(|v| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    });
    let all = state.catalog.objects(&project, ObjectKind::Dataset);
    let mut page: Vec<Value> = Vec::new();
    let mut more = false;
    let listed = all
        .iter()
        .filter(|(n, _)| after.as_ref().is_none_or(|a| n > a) && caller.sees_dataset(n));
    for (name, stored) in listed {
        if page.len() == limit {
            more = true;
            break;
        }
        if let Some(dataset) = Dataset::from_stored(stored) {
            page.push(definition(&state, project, name, &dataset));
        }
    }
    let next_page_url = if more {
        let last = page
            .last()
            .and_then(|d| d["dataset_name"].as_str())
            .unwrap_or_default();
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost");
        json!(format!(
            "http://{host}/3.0/projects/{project}/datasets?limit={limit}&after_name={last}"
        ))
    } else {
        Value::Null
    };
    Ok(json_ok(
        &json!({"datasets": page, "next_page_url": next_page_url}),
    ))
}

/// `DELETE /datasets/{name}` (master key): 204.
pub async fn delete(
    State(state): State<AppState>,
    KeenPath((project, name)): KeenPath<(String, String)>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    delete_definition(
        &state,
        &project,
        ObjectKind::Dataset,
        &name,
        raw_query.as_deref(),
        &headers,
    )
    .await
}

/// `GET /datasets/{name}/results?index_by=…&timeframe=…` (read or master key, or an access key
/// that may `retrieve` this dataset). An access key limited to some `index_by` values gets only
/// those; an access key with filters gets the equivalent ad-hoc query with its filters AND-ed in
/// (kept in the result cache until its data changes), never the shared buckets.
pub async fn results(
    State(state): State<AppState>,
    KeenPath((project, name)): KeenPath<(String, String)>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (caller, params) = query_string_request(
        &state,
        &project,
        raw_query.as_deref(),
        &headers,
        Access::Datasets(DatasetOp::Retrieve),
    )?;
    caller.check_dataset(DatasetOp::Retrieve, &name)?;
    let project = caller.project;
    let dataset = lookup(&state, project, &name)?;
    let Some(index) = params.get("index_by") else {
        return Err(ApiError::new(
            ErrorCode::MissingRequiredProperty,
            format!(
                "The 'index_by' parameter is required: a value of {:?}.",
                dataset.index_by
            ),
        ));
    };
    let mut candidates = dataset.index_candidates(index)?;
    if let Some(scope) = &caller.scope {
        candidates = scope
            .datasets
            .allowed_candidates(&name, &dataset.index_by, candidates);
        if candidates.is_empty() {
            return Err(ApiError::new(
                ErrorCode::InsufficientPermissions,
                format!("This key may not retrieve that 'index_by' value of the dataset '{name}'."),
            ));
        }
    }
    let timeframe = params.get("timeframe").cloned();
    if caller.is_filtered() {
        state.rate_limiter.take(&caller.key, RateClass::Queries)?;
        let now = state.clock.now_ms();
        let spec = dataset.results_query(&candidates, timeframe.as_ref(), caller.query_filters(), now)?;
        let prepared = Prepared {
            plan: Plan::Single(Box::new(spec)),
            max_age: None,
        };
        // Kept until the events it read change: the change tracking makes any age correct.
        return Ok(
            match answer(&state, project, prepared, Some(UNTIL_CHANGED_SECS)).await? {
                Answered::Cached { body, .. } => json_text(body.as_str().to_owned()),
                Answered::Json(text) => json_text(text),
                Answered::Csv(_) => return Err(ApiError::internal("a dataset query answered CSV")),
            },
        );
    }
    // Usually a lookup of kept buckets; a bucket never computed is computed first, so it takes
    // a slot.
    let answers = state.answers.clone();
    let (_, timeout) = limits(&state);
    let body = gated(&state, project, timeout, move || {
        answers.dataset_results(project, &name, &dataset, &candidates, timeframe.as_ref())
    })
    .await?;
    Ok(json_ok(&body))
}

/// How long a scoped dataset answer may be kept: a day, or until the events it read change.
const UNTIL_CHANGED_SECS: u64 = 86_400;
