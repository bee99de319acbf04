//! Prometheus metrics: the registry every component registers into at start-up, the HTTP
//! request counter, and gauges read from the event log when `/metrics` is scraped.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tally_core::log::LogStatus;
use tally_core::senders::Senders;

use crate::app::AppState;

/// Labels of the request counter. Static strings, so counting a request allocates nothing.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: &'static str,
    method: &'static str,
    status: u16,
}

/// The routes of [`crate::app::router`], so a matched path maps onto a static label.
const ROUTES: &[&str] = &[
    "/healthz",
    "/metrics",
    "/ping",
    "/3.0",
    "/3.0/projects",
    "/3.0/projects/{project}/events",
    "/3.0/projects/{project}/events/{collection}",
];

fn route_label(path: Option<&MatchedPath>) -> &'static str {
    path.and_then(|p| ROUTES.iter().find(|r| **r == p.as_str()).copied())
        .unwrap_or("other")
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::HEAD => "HEAD",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// The server's own metrics, and the finished registry they are encoded from.
#[derive(Debug)]
pub struct ServerMetrics {
    registry: Registry,
    http_requests: Family<HttpLabels, Counter>,
    log_durable_end: Gauge,
    log_retained_bytes: Gauge,
    log_pending_bytes: Gauge,
    log_lag_bytes: Gauge,
    connections_open: Gauge,
    requests_in_flight: Gauge,
    /// `process_cpu_seconds_total`, Prometheus' standard name, read when scraped.
    cpu_seconds: Counter<f64, AtomicU64>,
    /// Held while the counter is brought up to date, so that concurrent scrapes do not both add
    /// the same CPU time.
    cpu_update: std::sync::Mutex<()>,
}

impl ServerMetrics {
    /// Adds the server's metrics to `registry` (which the other components have already
    /// registered into) and takes ownership of it.
    pub fn new(mut registry: Registry) -> Self {
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "tally_http_requests",
            "HTTP requests by route, method and status",
            http_requests.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let gauge = Gauge::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        Self {
            log_durable_end: gauge(
                &mut registry,
                "tally_log_durable_end_bytes",
                "Position of the end of the durable event log",
            ),
            log_retained_bytes: gauge(
                &mut registry,
                "tally_log_size_bytes",
                "Bytes of event log kept on disk",
            ),
            log_pending_bytes: gauge(
                &mut registry,
                "tally_log_pending_bytes",
                "Bytes accepted by the log and not yet fsync'd",
            ),
            log_lag_bytes: gauge(
                &mut registry,
                "tally_log_consumer_lag_bytes",
                "How far the process stage is behind the durable end of the event log",
            ),
            connections_open: gauge(
                &mut registry,
                "tally_http_connections_open",
                "Open HTTP connections",
            ),
            requests_in_flight: gauge(
                &mut registry,
                "tally_http_requests_in_flight",
                "HTTP requests received and not yet answered",
            ),
            cpu_seconds: {
                let counter = Counter::<f64, AtomicU64>::default();
                registry.register(
                    "process_cpu_seconds",
                    "User and system CPU time this process has used",
                    counter.clone(),
                );
                counter
            },
            cpu_update: std::sync::Mutex::new(()),
            registry,
            http_requests,
        }
    }

    /// The text exposition, with the log gauges refreshed from `log` and the connection gauges
    /// from `senders`.
    pub fn encode(&self, log: LogStatus, senders: &Senders) -> String {
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.log_durable_end.set(as_i64(log.durable_end));
        self.log_retained_bytes.set(as_i64(log.retained_bytes));
        self.log_pending_bytes.set(as_i64(log.pending_bytes));
        self.log_lag_bytes.set(as_i64(log.lag_bytes()));
        self.connections_open.set(as_i64(senders.open() as u64));
        self.requests_in_flight.set(as_i64(senders.in_flight() as u64));
        // A counter only goes up: add what was used since the last scrape.
        {
            let _updating = self.cpu_update.lock().unwrap_or_else(|p| p.into_inner());
            let used = tally_core::worker::process_cpu_seconds() - self.cpu_seconds.get();
            if used > 0.0 {
                self.cpu_seconds.inc_by(used);
            }
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// Middleware counting every request by matched route, method and status.
pub async fn count_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = route_label(request.extensions().get::<MatchedPath>());
    let method = method_label(request.method());
    let in_flight = state.senders.request_started();
    let response = next.run(request).await;
    drop(in_flight);
    state
        .metrics
        .http_requests
        .get_or_create(&HttpLabels {
            route,
            method,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

/// Shared handle type.
pub type SharedMetrics = Arc<ServerMetrics>;
