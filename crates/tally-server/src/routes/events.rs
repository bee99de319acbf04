//! The HTTP Stream API: single events, batches and the image beacon (reference §1).

use axum::body::Body;
use axum::extract::{RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::json;
use tally_core::error::ErrorCode;
use tally_ingest::decode::{check_content_type, decode_beacon_data};
use tally_ingest::{EventOutcome, RequestMeta};

use crate::app::AppState;
use crate::auth::{Access, Caller, authorize, presented_key};
use crate::error::ApiError;
use crate::request::{ClientInfo, KeenPath, Params, read_body};

/// The 43-byte transparent 1×1 GIF answered to image beacons.
pub const PIXEL_GIF: [u8; 43] = [
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff,
    0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00,
    0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

fn meta(caller: &Caller, client: ClientInfo) -> RequestMeta {
    RequestMeta {
        project: caller.project,
        client_ip: client.ip,
        user_agent: client.user_agent,
        autofill: caller.scope.as_ref().and_then(|s| s.autofill.clone()),
    }
}

fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok())
}

fn check_body_type(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    check_content_type(content_type(headers)).map_err(|e| {
        state.ingestor.count_rejected(e.code);
        ApiError::from(e)
    })
}

fn json_response(status: StatusCode, body: impl Into<Body>) -> Response {
    let mut response = (status, body.into()).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The prologue of the write endpoints with a body: the key authorises writing to the project,
/// the content type can carry JSON, and the body is within the size limit.
async fn authorized_body(
    state: &AppState,
    project: &str,
    params: &Params,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Caller, Bytes), ApiError> {
    let caller = authorize_write(state, project, params, headers)?;
    check_body_type(state, headers)?;
    let body = read_body(headers, body, state.ingestor.limits().max_body_bytes)
        .await
        .inspect_err(|e| state.ingestor.count_rejected(e.code))?;
    Ok((caller, body))
}

/// The caller, whose key may write to the project.
fn authorize_write(
    state: &AppState,
    project: &str,
    params: &Params,
    headers: &HeaderMap,
) -> Result<Caller, ApiError> {
    let key = presented_key(headers, params.get("api_key"));
    authorize(state, project, key, Access::Writes)
}

/// The answers to a single event, with their lengths: fixed, so that they are sent without
/// building a body or a header per request.
const CREATED: (&str, &str) = (r#"{"created":true}"#, "16");
const CREATED_DUPLICATE: (&str, &str) = (r#"{"created":true,"duplicate":true}"#, "33");

fn created_response(outcome: EventOutcome) -> Result<Response, ApiError> {
    let (body, length) = match outcome {
        EventOutcome::Created => CREATED,
        EventOutcome::Duplicate => CREATED_DUPLICATE,
        EventOutcome::Rejected(e) => return Err(e.into()),
    };
    let mut response = json_response(StatusCode::CREATED, Bytes::from_static(body.as_bytes()));
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static(length));
    Ok(response)
}

/// `POST /3.0/projects/{project}/events/{collection}`: one event. (The request is taken whole,
/// and its headers read in place: a `HeaderMap` extractor would copy them.)
pub async fn record_event(
    State(state): State<AppState>,
    KeenPath((project, collection)): KeenPath<(String, String)>,
    params: Params,
    client: ClientInfo,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let (caller, body) = authorized_body(&state, &project, &params, &parts.headers, body).await?;
    let outcome = state
        .ingestor
        .ingest_single(meta(&caller, client), collection, body)
        .await?;
    created_response(outcome)
}

/// `GET /3.0/projects/{project}/events/{collection}?data=BASE64[&redirect=URL]`: the image
/// beacon. Answers a 1×1 GIF, or a 302 to `redirect`. Without `data` (and `redirect`), the
/// collection's schema (reference §5).
pub async fn record_event_by_get(
    State(state): State<AppState>,
    KeenPath((project, collection)): KeenPath<(String, String)>,
    params: Params,
    RawQuery(raw_query): RawQuery,
    client: ClientInfo,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if params.get("data").is_none() && params.get("redirect").is_none() {
        // Without `data` this is a schema read; a write key meant to send an event.
        match crate::routes::queries::describe_collection(state, project, collection, raw_query, headers)
            .await
        {
            Err(e) if e.code == ErrorCode::InsufficientPermissions => return Err(missing_data()),
            other => return other,
        }
    }
    let caller = authorize_write(&state, &project, &params, &headers)?;
    let Some(data) = params.get("data") else {
        return Err(missing_data());
    };
    let redirect = params.get("redirect").map(check_redirect).transpose()?;
    let body = decode_beacon_data(data).inspect_err(|e| state.ingestor.count_rejected(e.code))?;
    let outcome = state
        .ingestor
        .ingest_single(meta(&caller, client), collection, Bytes::from(body))
        .await?;
    if let EventOutcome::Rejected(e) = outcome {
        return Err(e.into());
    }
    let mut response = match redirect {
        Some(location) => {
            let mut response = StatusCode::FOUND.into_response();
            response.headers_mut().insert(header::LOCATION, location);
            response
        }
        None => (
            [(header::CONTENT_TYPE, HeaderValue::from_static("image/gif"))],
            PIXEL_GIF.as_slice(),
        )
            .into_response(),
    };
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

fn missing_data() -> ApiError {
    ApiError::new(
        ErrorCode::MissingRequiredProperty,
        "GET on an event collection records the event in the base64 'data' parameter, which is missing.",
    )
}

/// Only absolute `http` and `https` URLs may be redirected to.
fn check_redirect(url: &str) -> Result<HeaderValue, ApiError> {
    let bad = || {
        ApiError::new(
            ErrorCode::InvalidParameter,
            "'redirect' must be an absolute http or https URL.",
        )
    };
    let lower = url.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"))
        .ok_or_else(bad)?;
    if rest.is_empty() || rest.starts_with('/') || url.chars().any(|c| c.is_control() || c == ' ') {
        return Err(bad());
    }
    HeaderValue::from_str(url).map_err(|_| bad())
}

/// `POST /3.0/projects/{project}/events`: a batch `{"collection": [event, ...], ...}`. Answers
/// 200 with one entry per event, in order, even when some fail.
pub async fn record_batch(
    State(state): State<AppState>,
    KeenPath(project): KeenPath<String>,
    params: Params,
    client: ClientInfo,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let (caller, body) = authorized_body(&state, &project, &params, &parts.headers, body).await?;
    // On the work-stealing runtime (see `AppInner::work`); the answer is written back here.
    let ingestor = state.ingestor.clone();
    let meta = meta(&caller, client);
    let results = state
        .work
        .spawn(async move { ingestor.ingest_batch(meta, body).await })
        .await
        .map_err(ApiError::internal)??;
    // Written directly: a 50,000-event batch answers 50,000 entries.
    let mut answer = Vec::with_capacity(64 + results.iter().map(|(_, o)| o.len() * 20).sum::<usize>());
    answer.push(b'{');
    for (i, (collection, outcomes)) in results.iter().enumerate() {
        if i > 0 {
            answer.push(b',');
        }
        serde_json::to_writer(&mut answer, collection).map_err(ApiError::internal)?;
        answer.extend_from_slice(b":[");
        for (j, outcome) in outcomes.iter().enumerate() {
            if j > 0 {
                answer.push(b',');
            }
            match outcome {
                EventOutcome::Created => answer.extend_from_slice(br#"{"success":true}"#),
                EventOutcome::Duplicate => answer.extend_from_slice(br#"{"success":true,"duplicate":true}"#),
                EventOutcome::Rejected(e) => serde_json::to_writer(
                    &mut answer,
                    &json!({"success": false, "error": {"name": e.code.as_str(), "description": e.message}}),
                )
                .map_err(ApiError::internal)?,
            }
        }
        answer.push(b']');
    }
    answer.push(b'}');
    Ok(json_response(StatusCode::OK, answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_answers_carry_their_own_lengths() {
        for (body, length) in [CREATED, CREATED_DUPLICATE] {
            assert_eq!(body.len().to_string(), length, "{body}");
            assert!(serde_json::from_str::<serde_json::Value>(body).is_ok(), "{body}");
        }
    }

    #[test]
    fn the_pixel_is_a_43_byte_gif() {
        assert_eq!(PIXEL_GIF.len(), 43);
        assert_eq!(&PIXEL_GIF[..6], b"GIF89a");
        assert_eq!(PIXEL_GIF[42], 0x3b);
    }

    #[test]
    fn only_http_and_https_redirects_are_followed() {
        assert!(check_redirect("https://example.com/thanks?x=1").is_ok());
        assert!(check_redirect("HTTP://example.com").is_ok());
        for bad in [
            "javascript:alert(1)",
            "//evil.com",
            "https:///x",
            "ftp://x",
            "https://a b",
            "/local",
        ] {
            assert!(check_redirect(bad).is_err(), "{bad}");
        }
    }
}
