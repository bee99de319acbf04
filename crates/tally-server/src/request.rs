//! Request plumbing shared by the handlers: query parameters, the client's address, and reading
//! a body under the size limit, all failing in Keen's error shape rather than axum's defaults.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tally_core::error::ErrorCode;

use crate::app::AppState;
use crate::error::ApiError;

/// Query-string parameters, decoded leniently (`+` as space, bad escapes kept as they are).
/// Empty pairs (`&&`) are ignored; for a repeated name the first value wins.
#[derive(Debug, Clone, Default)]
pub struct Params(pub HashMap<String, String>);

impl Params {
    /// Parses a raw query string.
    pub fn parse(query: Option<&str>) -> Self {
        let mut map = HashMap::new();
        for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            if !name.is_empty() {
                map.entry(name.into_owned()).or_insert_with(|| value.into_owned());
            }
        }
        Self(map)
    }

    /// A parameter's value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(Self::parse(parts.uri.query()))
    }
}

/// The client, as far as `${keen.ip}` and `${keen.user_agent}` are concerned.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    /// From the socket, or from `X-Forwarded-For` when proxies are trusted.
    pub ip: Option<IpAddr>,
    /// The `User-Agent` header.
    pub user_agent: Option<String>,
}

impl FromRequestParts<AppState> for ClientInfo {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let socket_ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip());
        let hops = state.http.trusted_proxy_hops;
        let ip = if hops > 0 {
            forwarded_ip(&parts.headers, hops).or(socket_ip)
        } else {
            socket_ip
        };
        let user_agent = parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok(Self { ip, user_agent })
    }
}

/// The address `hops` places from the right of `X-Forwarded-For` (each trusted proxy appends the
/// address it saw; everything further left could be forged by the client).
fn forwarded_ip(headers: &HeaderMap, hops: usize) -> Option<IpAddr> {
    let chain: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let index = chain.len().checked_sub(hops)?;
    chain[index].parse().ok()
}

/// How much of a body over the limit is read and thrown away before the 413 is answered.
///
/// A client still sending when the server answers early and closes the connection often never
/// sees the answer: closing a socket with unread data resets it, and the reset can reach the
/// client before it reads the 413 (seen once requests were served on threads of their own,
/// truly beside the client). Reading what was sent lets the 413 arrive and the connection be
/// kept; past this much, or [`DRAIN_FOR`], the connection is closed without waiting for the
/// rest. A client that asked to be told before sending (`Expect: 100-continue`) is answered
/// at once, and sends nothing.
const DRAIN_AT_MOST: u64 = 64 << 20;

/// The longest a refused body is read for.
const DRAIN_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads a whole body, refusing (413) one over `limit` bytes.
pub async fn read_body(headers: &HeaderMap, mut body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorCode::RequestTooLarge,
            format!("Request body is larger than the limit of {limit} bytes."),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(declared) = declared.filter(|&n| n > limit as u64) {
        let waits_for_continue = headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !waits_for_continue && declared <= DRAIN_AT_MOST {
            drain(&mut body).await;
        }
        return Err(too_large());
    }
    match Limited::new(&mut body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            drain(&mut body).await;
            Err(too_large())
        }
        Err(e) => Err(ApiError::new(
            ErrorCode::InvalidEvent,
            format!("Could not read the request body: {e}."),
        )),
    }
}

/// Reads and discards the rest of `body`, up to [`DRAIN_AT_MOST`] bytes and [`DRAIN_FOR`].
async fn drain(body: &mut Body) {
    let read_all = async {
        let mut read = 0;
        while read < DRAIN_AT_MOST {
            match body.frame().await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len() as u64),
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_FOR, read_all).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_follow_keens_lenient_rules() {
        let p = Params::parse(Some("a=1&&b=x+y&a=2&=z&c=%ZZ&"));
        assert_eq!(p.get("a"), Some("1"));
        assert_eq!(p.get("b"), Some("x y"));
        assert_eq!(p.get("c"), Some("%ZZ"));
        assert_eq!(p.0.len(), 3);
    }

    #[test]
    fn forwarded_for_takes_the_address_the_trusted_proxy_saw() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "6.6.6.6, 203.0.113.9".parse().unwrap());
        assert_eq!(forwarded_ip(&headers, 1), Some("203.0.113.9".parse().unwrap()));
        assert_eq!(forwarded_ip(&headers, 2), Some("6.6.6.6".parse().unwrap()));
        assert_eq!(forwarded_ip(&headers, 3), None);
    }
}

/// Path parameters, failing in Keen's error shape (axum's own rejection is plain text).
#[derive(Debug, Clone)]
pub struct KeenPath<T>(pub T);

impl<S, T> FromRequestParts<S> for KeenPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| KeenPath(value))
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::InvalidParameter,
                    format!("Bad path: {}.", e.body_text()),
                )
            })
    }
}
