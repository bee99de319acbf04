//! The application: shared state and the router.
//!
//! [`router`] builds the whole HTTP surface from an [`AppState`], so tests can drive it with
//! `tower::ServiceExt::oneshot` without a socket, and [`crate::server`] serves the same router on
//! a listener.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{Method, header};
use axum::middleware;
use axum::routing::{any, get, post};
use tally_core::clock::Clock;
use tally_core::config::{HttpConfig, QueryConfig, Role};
use tally_core::error::ErrorCode;
use tally_core::ids::KeyHash;
use tally_ingest::Ingestor;
use tally_store::Catalog;
use tally_store::events::EventStore;
use tower_http::cors::{AllowHeaders, Any, CorsLayer};

use crate::answers::CachedAnswers;
use crate::error::ApiError;
use crate::limits::{QueryGate, RateLimiter};
use crate::live::LiveTail;
use crate::metrics::{ServerMetrics, count_requests};
use crate::routes;

/// Everything a handler may need. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState(Arc<AppInner>);

/// The parts of [`AppState`].
#[derive(Debug)]
pub struct AppInner {
    /// Projects and keys.
    pub catalog: Arc<dyn Catalog>,
    /// The ingest pipeline.
    pub ingestor: Arc<Ingestor>,
    /// Per-key request rate limits.
    pub rate_limiter: RateLimiter,
    /// Per-project query slots.
    pub query_gate: QueryGate,
    /// Metrics, encoded by `/metrics`.
    pub metrics: Arc<ServerMetrics>,
    /// The hash of the server-wide admin key, if one is configured.
    pub admin_key: Option<KeyHash>,
    /// HTTP settings (trusted proxies).
    pub http: HttpConfig,
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// Enriched events, for queries and schema.
    pub store: Arc<EventStore>,
    /// Query limits.
    pub query: QueryConfig,
    /// Cached answers: the `max_age` cache, cached queries and datasets.
    pub answers: Arc<CachedAnswers>,
    /// Subscribers to collections' events as they are stored.
    pub live: Arc<LiveTail>,
    /// What this node does; requests for the rest are answered with a 404 naming the roles.
    pub roles: Vec<Role>,
    /// Open connections and requests in flight, which the event log's writer reads to decide
    /// whether to let appends gather (`tally_core::senders`).
    pub senders: Arc<tally_core::senders::Senders>,
    /// The work-stealing runtime the server was started on. Batches are ingested there: on
    /// shards (`http.shards`) a batch's work would otherwise hold every other connection of its
    /// shard whenever the kernel keeps that one thread waiting.
    pub work: tokio::runtime::Handle,
}

impl AppState {
    /// Wraps the parts.
    pub fn new(inner: AppInner) -> Self {
        Self(Arc::new(inner))
    }
}

impl Deref for AppState {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

/// The whole HTTP API.
pub fn router(state: AppState) -> Router {
    // Keen's browser clients send Authorization, Content-Type and keen-sdk from any origin;
    // mirroring the requested headers covers Authorization, which a `*` would not.
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers([header::RETRY_AFTER])
        .max_age(Duration::from_secs(86_400));

    Router::new()
        .route("/", get(routes::ui::index))
        .route("/ui/{file}", get(routes::ui::asset))
        .route("/healthz", get(routes::ops::healthz))
        .route("/metrics", get(routes::ops::metrics))
        .route("/ping", any(routes::ops::ping))
        .route("/3.0", get(routes::ops::api_root))
        .route("/3.0/projects", post(routes::projects::create_project))
        .route(
            "/3.0/projects/{project}/events",
            post(routes::events::record_batch).get(routes::queries::list_collections),
        )
        .route(
            "/3.0/projects/{project}/events/{collection}",
            post(routes::events::record_event)
                .get(routes::events::record_event_by_get)
                .delete(routes::queries::delete_events),
        )
        .route(
            "/3.0/projects/{project}/events/{collection}/stream",
            get(routes::live::stream_events),
        )
        .route(
            "/3.0/projects/{project}/events/{collection}/properties/{property}",
            get(routes::queries::describe_property).delete(routes::queries::delete_property),
        )
        .route("/3.0/projects/{project}/sql", post(routes::queries::run_sql))
        .route(
            "/3.0/projects/{project}/keys",
            get(routes::keys::list).post(routes::keys::create),
        )
        .route(
            "/3.0/projects/{project}/keys/{key}",
            get(routes::keys::get)
                .post(routes::keys::update)
                .delete(routes::keys::delete),
        )
        .route(
            "/3.0/projects/{project}/keys/{key}/revoke",
            post(routes::keys::revoke),
        )
        .route(
            "/3.0/projects/{project}/keys/{key}/unrevoke",
            post(routes::keys::unrevoke),
        )
        .route("/3.0/projects/{project}/queries/saved", get(routes::saved::list))
        .route(
            "/3.0/projects/{project}/queries/saved/{name}",
            get(routes::saved::get)
                .put(routes::saved::put)
                .delete(routes::saved::delete),
        )
        .route(
            "/3.0/projects/{project}/queries/saved/{name}/result",
            get(routes::saved::result),
        )
        .route(
            "/3.0/projects/{project}/dashboards",
            get(routes::dashboards::list),
        )
        .route(
            "/3.0/projects/{project}/dashboards/{name}",
            get(routes::dashboards::get)
                .put(routes::dashboards::put)
                .delete(routes::dashboards::delete),
        )
        .route("/3.0/projects/{project}/datasets", get(routes::datasets::list))
        .route(
            "/3.0/projects/{project}/datasets/{name}",
            get(routes::datasets::get)
                .put(routes::datasets::put)
                .delete(routes::datasets::delete),
        )
        .route(
            "/3.0/projects/{project}/datasets/{name}/results",
            get(routes::datasets::results),
        )
        .route(
            "/3.0/projects/{project}/queries/{analysis}",
            get(routes::queries::run_query).post(routes::queries::run_query),
        )
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                ErrorCode::MethodNotAllowed,
                "This endpoint does not support that method.",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), serve_roles))
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .layer(cors)
        .with_state(state)
}

/// The role a request needs: events sent in need `ingest`; operations endpoints, project
/// creation and CORS preflights need none; everything else (queries, keys, saved queries,
/// dashboards, the UI) needs `query`.
pub fn role_needed(method: &Method, uri: &axum::http::Uri) -> Option<Role> {
    let path = uri.path();
    if method == Method::OPTIONS
        || matches!(path, "/healthz" | "/metrics" | "/ping" | "/3.0" | "/3.0/projects")
    {
        return None;
    }
    if let Some(rest) = path.strip_prefix("/3.0/projects/") {
        // `{project}/events` or `{project}/events/{collection}`, counted without collecting.
        let mut parts = rest.split('/');
        let events = parts.nth(1) == Some("events");
        let collection = parts.next().is_some();
        if events && parts.next().is_none() {
            if method == Method::POST {
                return Some(Role::Ingest);
            }
            let pixel = uri
                .query()
                .is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "data"));
            if method == Method::GET && collection && pixel {
                return Some(Role::Ingest);
            }
        }
    }
    Some(Role::Query)
}

/// Answers requests this node's roles do not cover with a 404 in Keen's shape.
async fn serve_roles(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    match role_needed(request.method(), request.uri()) {
        Some(role) if !state.roles.contains(&role) => {
            let what = match role {
                Role::Ingest => "accept events",
                Role::Process => "process events",
                Role::Query => "answer queries",
            };
            let roles: Vec<&str> = state.roles.iter().map(|r| r.as_str()).collect();
            axum::response::IntoResponse::into_response(ApiError::new(
                ErrorCode::ResourceNotFound,
                format!(
                    "This Tally node does not {what} (its roles: {}).",
                    roles.join(", ")
                ),
            ))
        }
        _ => next.run(request).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_need_the_role_that_serves_them() {
        let need = |m: Method, u: &str| role_needed(&m, &u.parse().unwrap());
        let p = "/3.0/projects/0123456789abcdef01234567";
        assert_eq!(need(Method::POST, &format!("{p}/events")), Some(Role::Ingest));
        assert_eq!(
            need(Method::POST, &format!("{p}/events/clicks")),
            Some(Role::Ingest)
        );
        assert_eq!(
            need(Method::GET, &format!("{p}/events/clicks?api_key=k&data=e30")),
            Some(Role::Ingest)
        );
        assert_eq!(
            need(Method::GET, &format!("{p}/events/clicks")),
            Some(Role::Query)
        );
        assert_eq!(need(Method::GET, &format!("{p}/events")), Some(Role::Query));
        assert_eq!(
            need(Method::GET, &format!("{p}/events?data=e30")),
            Some(Role::Query),
            "a pixel names its collection"
        );
        assert_eq!(
            need(Method::POST, &format!("{p}/events/clicks/properties/x")),
            Some(Role::Query)
        );
        assert_eq!(
            need(Method::GET, &format!("{p}/events/clicks/stream")),
            Some(Role::Query)
        );
        assert_eq!(
            need(Method::DELETE, &format!("{p}/events/clicks")),
            Some(Role::Query)
        );
        assert_eq!(
            need(Method::POST, &format!("{p}/queries/count")),
            Some(Role::Query)
        );
        assert_eq!(need(Method::GET, "/"), Some(Role::Query));
        assert_eq!(need(Method::GET, "/healthz"), None);
        assert_eq!(need(Method::POST, "/3.0/projects"), None);
        assert_eq!(need(Method::OPTIONS, &format!("{p}/queries/count")), None);
    }
}
