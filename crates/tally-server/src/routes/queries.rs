//! The query API (reference §3), schema and deletes (§5).
//!
//! Parameters come from the query string (GET, DELETE) or a JSON body (POST) and are parsed by
//! `tally_query::spec` into a typed query; execution runs on the blocking pool with the
//! configured time and memory limits, so a heavy query never stalls the async runtime.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tally_core::error::ErrorCode;
use tally_core::ids::ProjectId;
use tally_query::cache::Read;
use tally_query::exec::{self, Answer, ExecError, Limits};
use tally_query::plan::Prepared;
use tally_query::spec::{self, Params};
use tally_query::{Filter, TimeRange};
use tally_store::events::Segment;

use crate::app::AppState;
use crate::auth::{Access, Caller, authorize, presented_key};
use crate::error::ApiError;
use crate::request::{KeenPath, read_body};

/// Request parameters from the query string, and from a JSON body on POST (the body wins).
pub(crate) async fn gather_params(
    state: &AppState,
    method: &Method,
    raw_query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Params, ApiError> {
    let query = spec::params_from_query_string(raw_query.unwrap_or(""));
    if *method != Method::POST {
        return Ok(query);
    }
    let bytes = read_body(headers, body, state.ingestor.limits().max_body_bytes).await?;
    let body = spec::params_from_json_body(&bytes)?;
    Ok(spec::merge(query, body))
}

/// The caller, from the key in the headers or the `api_key` parameter, authorized for `access`.
pub(crate) fn authorize_params(
    state: &AppState,
    project: &str,
    params: &Params,
    headers: &HeaderMap,
    access: Access,
) -> Result<Caller, ApiError> {
    let api_key = params.get("api_key").and_then(Value::as_str);
    let key = presented_key(headers, api_key);
    authorize(state, project, key, access)
}

/// Parameters of a GET or DELETE (query string only) and the caller, authorized for `access`.
pub(crate) fn query_string_request(
    state: &AppState,
    project: &str,
    raw_query: Option<&str>,
    headers: &HeaderMap,
    access: Access,
) -> Result<(Caller, Params), ApiError> {
    let params = spec::params_from_query_string(raw_query.unwrap_or(""));
    let caller = authorize_params(state, project, &params, headers, access)?;
    Ok((caller, params))
}

/// The project of a master-key request (query string only), authorized.
pub(crate) fn master_project(
    state: &AppState,
    project: &str,
    raw_query: Option<&str>,
    headers: &HeaderMap,
) -> Result<ProjectId, ApiError> {
    Ok(
        query_string_request(state, project, raw_query, headers, Access::Master)?
            .0
            .project,
    )
}

/// The limits of a query starting now, and its time limit.
pub(crate) fn limits(state: &AppState) -> (Limits, Duration) {
    (
        Limits::starting_now(&state.query),
        Duration::from_millis(state.query.timeout_ms),
    )
}

/// Runs `work` in one of `project`'s query slots ([`crate::limits::QueryGate`]) on the
/// blocking pool; the slot is held until the work ends, even if the request has timed out.
pub(crate) async fn gated<T: Send + 'static>(
    state: &AppState,
    project: ProjectId,
    timeout: Duration,
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let slot = state.query_gate.enter(project).await?;
    blocking(timeout, move || {
        let _slot = slot;
        work()
    })
    .await
}

/// Runs `work` on the blocking pool, answering 504 if it outlives the query time limit.
pub(crate) async fn blocking<T: Send + 'static>(
    timeout: Duration,
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let task = tokio::task::spawn_blocking(work);
    match tokio::time::timeout(timeout + Duration::from_millis(500), task).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(ApiError::internal(join)),
        Err(_) => Err(ExecError::Timeout.into()),
    }
}

/// `GET|POST /3.0/projects/{project}/queries/{analysis}`. With `max_age`, an answer kept in
/// the result cache is served if it is young enough and the data it read has not changed (see
/// `tally_query::cache`); such answers carry an `Age` header.
pub async fn run_query(
    State(state): State<AppState>,
    KeenPath((project, analysis)): KeenPath<(String, String)>,
    method: Method,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let params = gather_params(&state, &method, raw_query.as_deref(), &headers, body).await?;
    let caller = authorize_params(&state, &project, &params, &headers, Access::Queries)?;
    let mut prepared = Prepared::parse(&analysis, &params, state.clock.now_ms())?;
    // Before the cache key: a scoped key's answers are cached apart from everyone else's.
    prepared.restrict(caller.query_filters());
    let max_age = prepared.max_age;
    Ok(match answer(&state, caller.project, prepared, max_age).await? {
        Answered::Cached { body, age_secs } => {
            let mut response = json_text(body.as_str().to_owned());
            if let Ok(age) = HeaderValue::from_str(&age_secs.to_string()) {
                response.headers_mut().insert(header::AGE, age);
            }
            response
        }
        Answered::Json(text) => json_text(text),
        Answered::Csv(text) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/csv; charset=utf-8"),
            )],
            text,
        )
            .into_response(),
    })
}

/// An answer, fresh or from the result cache.
pub(crate) enum Answered {
    /// From the result cache, computed `age_secs` ago.
    Cached {
        /// The JSON answer.
        body: Arc<String>,
        /// Seconds since it was computed.
        age_secs: i64,
    },
    /// Computed now: JSON.
    Json(String),
    /// Computed now: CSV (never cached).
    Csv(String),
}

/// Answers `prepared` over `project`'s events in one of the project's query slots, through the
/// result cache when `max_age` (seconds) is given: a kept answer no older than that whose
/// reads have not changed is served, and a fresh JSON answer is kept.
pub(crate) async fn answer(
    state: &AppState,
    project: ProjectId,
    prepared: Prepared,
    max_age: Option<u64>,
) -> Result<Answered, ApiError> {
    let now_ms = state.clock.now_ms();
    let cache_key = max_age
        .filter(|&age| age > 0 && !prepared.is_csv())
        .map(|age| (format!("{project}\n{}", prepared.cache_key()), age));
    if let Some((key, max_age)) = &cache_key {
        let store = &state.store;
        let unchanged = |read: &Read| {
            !store
                .changes_since(project, &read.collection, read.version)
                .touches(read.range.start_ms, read.range.end_ms)
        };
        let max_age_ms = i64::try_from(max_age.saturating_mul(1000)).unwrap_or(i64::MAX);
        if let Some(hit) = state.answers.results.get(key, max_age_ms, now_ms, unchanged) {
            return Ok(Answered::Cached {
                age_secs: (now_ms - hit.computed_at_ms).max(0) / 1000,
                body: hit.body,
            });
        }
    }
    // Versions are read before the data, so a write racing the query only makes the cached
    // answer expire sooner.
    let reads: Vec<Read> = match cache_key {
        Some(_) => prepared
            .reads()
            .into_iter()
            .map(|(collection, range)| Read {
                version: state.store.data_version(project, &collection),
                collection,
                range,
            })
            .collect(),
        None => Vec::new(),
    };
    let store = state.store.clone();
    let (limits, timeout) = limits(state);
    let answer = gated(state, project, timeout, move || {
        prepared
            .run(|c| store.snapshot(project, c), &limits)
            .map_err(ApiError::from)
    })
    .await?;
    Ok(match answer {
        Answer::Json(body) => {
            let text = body.to_string();
            if let Some((key, _)) = cache_key {
                state
                    .answers
                    .results
                    .put(key, Arc::new(text.clone()), now_ms, reads);
            }
            Answered::Json(text)
        }
        Answer::Csv(text) => Answered::Csv(text),
    })
}

pub(crate) fn json_text(text: String) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        text,
    )
        .into_response()
}

/// A 200 with a JSON body.
pub(crate) fn json_ok(body: &Value) -> Response {
    json_text(body.to_string())
}

/// One collection's schema as the caller sees it: property types and how many events.
struct CollectionSchema {
    name: String,
    properties: BTreeMap<String, &'static str>,
    events: usize,
}

/// The properties of the caller's view of each collection, with their Keen types (a collection
/// with nothing the caller may see has none). For a caller whose key carries filters, only the
/// events passing them count, so not even another tenant's property names show; that is a scan,
/// so it runs in a query slot like a query.
async fn collection_schemas(
    state: &AppState,
    caller: &Caller,
    collections: Vec<String>,
) -> Result<Vec<CollectionSchema>, ApiError> {
    let (store, project, filters) = (
        state.store.clone(),
        caller.project,
        caller.query_filters().to_vec(),
    );
    let schemas = move || {
        Ok(collections
            .into_iter()
            .map(|collection| {
                let snapshot = store.snapshot(project, &collection);
                let (counts, events) = if filters.is_empty() {
                    (
                        tally_store::events::property_tag_counts(snapshot.iter().map(|s| &s.segment)),
                        snapshot.iter().map(|s| s.segment.rows()).sum(),
                    )
                } else {
                    let visible: Vec<Segment> = snapshot
                        .iter()
                        .map(|s| exec::restrict_segment(&s.segment, &filters))
                        .collect();
                    (
                        tally_store::events::property_tag_counts(visible.iter()),
                        visible.iter().map(Segment::rows).sum(),
                    )
                };
                let properties = counts
                    .into_iter()
                    .map(|(path, c)| (path, tally_store::events::column::dominant_type(&c)))
                    .collect();
                CollectionSchema {
                    name: collection,
                    properties,
                    events,
                }
            })
            .collect())
    };
    if caller.is_filtered() {
        let (_, timeout) = limits(state);
        gated(state, project, timeout, schemas).await
    } else {
        schemas()
    }
}

async fn one_schema(
    state: &AppState,
    caller: &Caller,
    collection: String,
) -> Result<BTreeMap<String, &'static str>, ApiError> {
    let mut schemas = collection_schemas(state, caller, vec![collection]).await?;
    Ok(schemas.pop().map(|s| s.properties).unwrap_or_default())
}

fn collection_url(project: ProjectId, collection: &str) -> String {
    let encoded: String = form_urlencoded::byte_serialize(collection.as_bytes()).collect();
    format!("/3.0/projects/{project}/events/{}", encoded.replace('+', "%20"))
}

/// `GET /3.0/projects/{project}/events`: every collection with its properties.
pub async fn list_collections(
    State(state): State<AppState>,
    KeenPath(project): KeenPath<String>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (caller, _) = query_string_request(&state, &project, raw_query.as_deref(), &headers, Access::Schema)?;
    let project = caller.project;
    let schemas = collection_schemas(&state, &caller, state.store.collections(project)).await?;
    let collections: Vec<Value> = schemas
        .into_iter()
        .filter(|s| !s.properties.is_empty())
        .map(|s| {
            json!({
                "name": s.name,
                "properties": s.properties,
                "url": collection_url(project, &s.name),
                "event_count": s.events,
            })
        })
        .collect();
    Ok(json_ok(&Value::Array(collections)))
}

/// `GET /3.0/projects/{project}/events/{collection}` (without `data`): the collection's
/// properties.
pub async fn describe_collection(
    state: AppState,
    project: String,
    collection: String,
    raw_query: Option<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (caller, _) = query_string_request(&state, &project, raw_query.as_deref(), &headers, Access::Schema)?;
    let properties = one_schema(&state, &caller, collection).await?;
    if properties.is_empty() {
        return Err(ApiError::not_found());
    }
    Ok(json_ok(&json!({ "properties": properties })))
}

/// `GET /3.0/projects/{project}/events/{collection}/properties/{property}`.
pub async fn describe_property(
    State(state): State<AppState>,
    KeenPath((project, collection, property)): KeenPath<(String, String, String)>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (caller, _) = query_string_request(&state, &project, raw_query.as_deref(), &headers, Access::Schema)?;
    let properties = one_schema(&state, &caller, collection.clone()).await?;
    let Some(kind) = properties.get(&property) else {
        return Err(ApiError::not_found());
    };
    Ok(json_ok(&json!({
        "property_name": property,
        "url": format!("{}/properties/{}", collection_url(caller.project, &collection), property),
        "type": kind,
    })))
}

/// `DELETE /3.0/projects/{project}/events/{collection}` (master key): with `filters` and/or
/// `timeframe`, the matching events; without, the whole collection. 204.
pub async fn delete_events(
    State(state): State<AppState>,
    KeenPath((project, collection)): KeenPath<(String, String)>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (caller, params) =
        query_string_request(&state, &project, raw_query.as_deref(), &headers, Access::Master)?;
    let project = caller.project;
    let zone = spec::parse_timezone(params.get("timezone"))?;
    let range: Option<TimeRange> = match params.get("timeframe") {
        Some(v) => Some(spec::parse_timeframe(Some(v), zone, state.clock.now_ms())?),
        None => None,
    };
    let filters: Vec<Filter> = match params.get("filters") {
        Some(v) => spec::parse_filters(v)?,
        None => Vec::new(),
    };
    let store = state.store.clone();
    let (_, timeout) = limits(&state);
    let removed = gated(&state, project, timeout * 10, move || {
        store
            .rewrite(project, &collection, |seg: &Segment| {
                let range = range.unwrap_or(TimeRange {
                    start_ms: i64::MIN,
                    end_ms: i64::MAX,
                });
                let doomed = exec::matching_rows(seg, range, &filters);
                if doomed.is_empty() {
                    return None;
                }
                let mut gone = vec![false; seg.rows()];
                for r in doomed {
                    gone[r as usize] = true;
                }
                Some(seg.retain_rows(|r| !gone[r]))
            })
            .map_err(ApiError::internal)
    })
    .await?;
    tracing::info!(%project, removed, "events deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `DELETE /3.0/projects/{project}/events/{collection}/properties/{property}` (master key):
/// removes the property from every event of the collection. 204.
pub async fn delete_property(
    State(state): State<AppState>,
    KeenPath((project, collection, property)): KeenPath<(String, String, String)>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let project = master_project(&state, &project, raw_query.as_deref(), &headers)?;
    if property == "keen" || property.starts_with("keen.") {
        return Err(ApiError::new(
            ErrorCode::InvalidPropertyName,
            "Properties under 'keen' cannot be deleted.",
        ));
    }
    let store = state.store.clone();
    let (_, timeout) = limits(&state);
    gated(&state, project, timeout * 10, move || {
        let nested = format!("{property}.");
        store
            .rewrite(project, &collection, |seg: &Segment| {
                seg.columns()
                    .any(|(path, _)| path == property || path.starts_with(&nested))
                    .then(|| seg.without_property(&property))
            })
            .map_err(ApiError::internal)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /3.0/projects/{project}/sql` with `{"query": "SELECT ..."}` (read key): read-only SQL
/// over the project's collections (see `tally_sql`).
pub async fn run_sql(
    State(state): State<AppState>,
    KeenPath(project): KeenPath<String>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let params = gather_params(&state, &Method::POST, raw_query.as_deref(), &headers, body).await?;
    let caller = authorize_params(&state, &project, &params, &headers, Access::Queries)?;
    let project = caller.project;
    let Some(sql) = params
        .get("query")
        .and_then(Value::as_str)
        .filter(|q| !q.trim().is_empty())
    else {
        return Err(ApiError::new(
            ErrorCode::MissingRequiredProperty,
            "The 'query' parameter (a SQL SELECT statement) is required.",
        ));
    };
    let limits = tally_sql::SqlLimits {
        timeout: Duration::from_millis(state.query.timeout_ms),
        max_memory_bytes: state.query.max_memory_bytes,
        max_rows: state.query.max_extraction_events,
    };
    let scope: Option<tally_sql::RowScope> = caller.is_filtered().then(|| {
        let filters = caller.query_filters().to_vec();
        Arc::new(move |seg: &Segment| exec::restrict_segment(seg, &filters)) as tally_sql::RowScope
    });
    let _slot = state.query_gate.enter(project).await?;
    match tally_sql::run(state.store.clone(), project, scope, sql, &limits).await {
        Ok(body) => Ok(json_ok(&body)),
        Err(tally_sql::SqlError::Timeout) => Err(ExecError::Timeout.into()),
        Err(e) => Err(ApiError::new(
            ErrorCode::InvalidParameter,
            format!("The 'query' could not run: {e}"),
        )),
    }
}
