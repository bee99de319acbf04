//! The web UI: a few static files compiled into the binary (`crates/tally-server/ui/`), served
//! at `/` and `/ui/…`. No build step and no Node.js: the files are plain HTML, CSS and
//! JavaScript modules. The UI talks to the same `/3.0` API as any client, with the key its user
//! signs in with (kept in the browser's session storage only).
//!
//! Every page is sent with a Content-Security-Policy that allows only these files' own scripts
//! and styles: even if event data ever reached the page as HTML, no script in it would run (the
//! UI itself only ever writes event data as text).

use axum::extract::Path;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// The UI's files: path under `/ui/`, content type, contents.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../ui/app.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_str!("../../ui/api.js"),
    ),
    (
        "charts.js",
        "text/javascript; charset=utf-8",
        include_str!("../../ui/charts.js"),
    ),
    (
        "dom.js",
        "text/javascript; charset=utf-8",
        include_str!("../../ui/dom.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("../../ui/app.css"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_str!("../../ui/favicon.svg"),
    ),
];

const INDEX: &str = include_str!("../../ui/index.html");

/// No inline scripts or styles, no other origins; API calls go to this server. Framing is
/// allowed anywhere: embedding a chart in a customer's page is the point of embed links.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'";

fn page(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // The files change only with the binary; revalidating is cheap on loopback and avoids a
    // stale UI after an upgrade.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /`: the UI's page.
pub async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX)
}

/// `GET /ui/{file}`.
pub async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    ASSETS
        .iter()
        .find(|(name, _, _)| *name == file)
        .map(|(_, content_type, body)| page(content_type, body))
        .ok_or_else(ApiError::not_found)
}
