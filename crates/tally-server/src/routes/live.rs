//! `GET /3.0/projects/{project}/events/{collection}/stream`: the collection's events as they are
//! stored, as server-sent events (the web UI's live view; `curl -N` works too).
//!
//! Needs a key that may run queries (read, master, or an access key permitted `queries`); the
//! key's `queries.filters` and the request's own `filters` parameter (Keen's filter syntax) are
//! applied to every event. A key may hold at most [`MAX_STREAMS_PER_KEY`] streams open (429
//! past that). The stream opens with an `open` event, then sends each event as a
//! default (`message`) event whose data is the event's JSON, and a `missed` event
//! (`{"events": n}` or `{"batches": n}`) whenever the live tail left events out for this
//! subscriber (see [`crate::live`]). Keep-alive comments every 15 s keep proxies from closing an
//! idle stream. Shutdown ends every stream.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde_json::json;
use tally_core::error::ErrorCode;
use tally_core::names::check_collection_name;
use tally_query::Filter;
use tally_query::exec::rows_passing;
use tally_query::spec;

use crate::app::AppState;
use crate::auth::Access;
use crate::error::ApiError;
use crate::live::{MAX_STREAMS_PER_KEY, Received, SubscribeError, Subscription};
use crate::request::KeenPath;
use crate::routes::queries::query_string_request;

/// The most filters the `filters` parameter may hold.
const MAX_STREAM_FILTERS: usize = 64;

/// `GET …/events/{collection}/stream`.
pub async fn stream_events(
    State(state): State<AppState>,
    KeenPath((project, collection)): KeenPath<(String, String)>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (caller, params) =
        query_string_request(&state, &project, raw_query.as_deref(), &headers, Access::Queries)?;
    check_collection_name(&collection).map_err(|m| ApiError::new(ErrorCode::InvalidCollectionName, m))?;
    let mut filters = caller.query_filters().to_vec();
    if let Some(value) = params.get("filters") {
        let own = spec::parse_filters(value)?;
        if own.len() > MAX_STREAM_FILTERS {
            return Err(ApiError::new(
                ErrorCode::InvalidParameter,
                format!("At most {MAX_STREAM_FILTERS} filters may be given."),
            ));
        }
        filters.extend(own);
    }
    let subscription = state
        .live
        .subscribe(caller.project, &collection, caller.key)
        .map_err(|e| match e {
            SubscribeError::Closed => {
                ApiError::new(ErrorCode::ServiceUnavailable, "The server is shutting down.")
            }
            SubscribeError::TooMany => ApiError::new(
                ErrorCode::RateLimited,
                format!("This key already has {MAX_STREAMS_PER_KEY} live streams open; close one first."),
            ),
        })?;
    let tail = Tail {
        subscription,
        filters,
        pending: VecDeque::from([Event::default().event("open").data("{}")]),
    };
    let events = stream::unfold(tail, |mut tail| async move {
        let event = tail.next_event().await?;
        Some((Ok::<_, Infallible>(event), tail))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// One client's stream.
struct Tail {
    subscription: Subscription,
    filters: Vec<Filter>,
    /// Events of the last batch not sent yet.
    pending: VecDeque<Event>,
}

impl Tail {
    /// The next server-sent event; `None` ends the stream.
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            match self.subscription.next().await {
                Received::Closed => return None,
                Received::Missed(batches) => {
                    self.pending.push_back(
                        Event::default()
                            .event("missed")
                            .data(json!({ "batches": batches }).to_string()),
                    );
                }
                Received::Batch(batch) => {
                    if batch.left_out > 0 {
                        self.pending.push_back(
                            Event::default()
                                .event("missed")
                                .data(json!({ "events": batch.left_out }).to_string()),
                        );
                    }
                    for row in rows_passing(&batch.events, &self.filters) {
                        let event = batch.events.event_json(row as usize);
                        self.pending.push_back(Event::default().data(event.to_string()));
                    }
                }
            }
        }
    }
}
