//! The ingest pipeline: validate, stamp, de-duplicate, append durably, answer.
//!
//! [`Ingestor`] is shared by every front door (the HTTP Stream API now, Kafka inbound later). A
//! request's events are validated and stamped on the request's task (or on the blocking pool for
//! big bodies, so a 10 MB batch does not stall the runtime), their uniqueness tokens reserved,
//! and then all of them are appended to the log in one call, so one batch costs one share of one
//! fsync. The answer is produced only after the append is durable.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::{Map, Value};
use tally_core::clock::Clock;
use tally_core::config::IngestConfig;
use tally_core::error::{ErrorCode, EventError};
use tally_core::event::AcceptedEvent;
use tally_core::ids::{EventIdGenerator, ProjectId};
use tally_core::log::{EventLog, LogError};
use tally_core::names::check_collection_name;
use tally_core::time::{format_timestamp_ms, write_timestamp_ms};

use crate::decode::{body_text, invalid_batch, parse_batch};
use crate::dedupe::{Dedupe, TokenKey, token_key};
use crate::validate::{
    IP_PLACEHOLDER, Refused, USER_AGENT_PLACEHOLDER, ValidEvent, check_event_text, json_error, json_syntax,
    validate_event_text,
};

/// Bodies at least this big are validated on the blocking pool.
const BLOCKING_BODY_BYTES: usize = 256 * 1024;

/// Who sent a request, as far as ingest cares.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    /// The project written to (already authenticated).
    pub project: ProjectId,
    /// The client's address, for `${keen.ip}`.
    pub client_ip: Option<IpAddr>,
    /// The request's `User-Agent`, for `${keen.user_agent}`.
    pub user_agent: Option<String>,
    /// Properties the writing key fills into every event (an access key's `writes.autofill`):
    /// deep-merged, the key's values winning.
    pub autofill: Option<Arc<Map<String, Value>>>,
}

/// What happened to one event.
#[derive(Debug, Clone, PartialEq)]
pub enum EventOutcome {
    /// Stored.
    Created,
    /// Its uniqueness token was seen before; not stored again, reported as a success.
    Duplicate,
    /// Refused; nothing stored.
    Rejected(EventError),
}

/// Why a whole request was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IngestError {
    /// The request itself is bad (body, batch shape, limits, or the single event in it).
    #[error(transparent)]
    Request(#[from] EventError),
    /// The log could not take the events; none of them was stored.
    #[error(transparent)]
    Log(#[from] LogError),
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone)]
struct IngestMetrics {
    accepted: Counter,
    duplicates: Counter,
    rejected: Family<ReasonLabels, Counter>,
}

impl IngestMetrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            accepted: Counter::default(),
            duplicates: Counter::default(),
            rejected: Family::default(),
        };
        registry.register(
            "tally_events_accepted",
            "Events durably accepted into the event log",
            metrics.accepted.clone(),
        );
        registry.register(
            "tally_events_duplicate",
            "Events not stored again because their keen.uniqueness_token was seen before",
            metrics.duplicates.clone(),
        );
        registry.register(
            "tally_events_rejected",
            "Events (or whole ingest requests) refused, by Keen error code",
            metrics.rejected.clone(),
        );
        metrics
    }
}

/// A batch ready to commit: each collection with its number of events, and the events' slots
/// in order.
type PreparedBatch = (Vec<(String, usize)>, Vec<Slot>);

/// The receive time of a request, formatted once for all its events.
struct Stamp {
    now_ms: i64,
    created_at: String,
}

impl Stamp {
    fn new(now_ms: i64) -> Self {
        Self {
            now_ms,
            created_at: format_timestamp_ms(now_ms),
        }
    }
}

/// One event on its way through a request.
enum Slot {
    Ready(AcceptedEvent, Option<TokenKey>),
    Duplicate,
    Rejected(EventError),
}

/// The ingest pipeline.
#[derive(Debug)]
pub struct Ingestor {
    log: Arc<dyn EventLog>,
    dedupe: Arc<Dedupe>,
    clock: Arc<dyn Clock>,
    ids: EventIdGenerator,
    limits: IngestConfig,
    metrics: IngestMetrics,
}

impl std::fmt::Debug for IngestMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IngestMetrics")
    }
}

impl Ingestor {
    /// A pipeline appending to `log`, de-duplicating with `dedupe`.
    pub fn new(
        log: Arc<dyn EventLog>,
        dedupe: Arc<Dedupe>,
        clock: Arc<dyn Clock>,
        limits: IngestConfig,
        registry: &mut Registry,
    ) -> Self {
        Self {
            log,
            dedupe,
            clock,
            ids: EventIdGenerator::new(),
            limits,
            metrics: IngestMetrics::register(registry),
        }
    }

    /// The limits this pipeline enforces.
    pub fn limits(&self) -> &IngestConfig {
        &self.limits
    }

    /// The log events are appended to.
    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.log
    }

    /// The de-duplication table.
    pub fn dedupe(&self) -> &Arc<Dedupe> {
        &self.dedupe
    }

    /// Counts a request refused before it reached the pipeline (for example a bad content type).
    pub fn count_rejected(&self, code: ErrorCode) {
        self.metrics
            .rejected
            .get_or_create(&ReasonLabels {
                reason: code.as_str(),
            })
            .inc();
    }

    /// Ingests one event into `collection`. A bad event refuses the request.
    pub async fn ingest_single(
        self: &Arc<Self>,
        meta: RequestMeta,
        collection: String,
        body: Bytes,
    ) -> Result<EventOutcome, IngestError> {
        // A single event is at most 900 kB (larger bodies are refused before parsing), so it is
        // validated on the request's task.
        let now_ms = self.clock.now_ms();
        let prepared = check_collection_name(&collection)
            .map_err(|m| EventError::new(ErrorCode::InvalidCollectionName, m))
            .and_then(|()| body_text(&body, ErrorCode::InvalidEvent))
            .and_then(|text| {
                self.prepare(&meta, &collection, &body, text, &Stamp::new(now_ms))
                    .map_err(|refused| refused.error)
            });
        let slots = match prepared {
            Ok(event) => vec![self.reserve(event, now_ms)],
            Err(e) => {
                self.count_rejected(e.code);
                return Err(IngestError::Request(e));
            }
        };
        let mut outcomes = self.commit(slots).await?;
        Ok(outcomes.pop().expect("one outcome"))
    }

    /// Ingests a batch `{"collection": [event, ...]}`. Bad events are reported in their place and
    /// the good ones stored; a body that is not a batch refuses the request.
    pub async fn ingest_batch(
        self: &Arc<Self>,
        meta: RequestMeta,
        body: Bytes,
    ) -> Result<Vec<(String, Vec<EventOutcome>)>, IngestError> {
        let big = body.len() >= BLOCKING_BODY_BYTES;
        let prepare = {
            let this = self.clone();
            move || -> Result<PreparedBatch, EventError> {
                let now_ms = this.clock.now_ms();
                let batch = parse_batch(&body)?;
                let total: usize = batch.values().map(Vec::len).sum();
                if total > this.limits.max_batch_events {
                    return Err(EventError::new(
                        ErrorCode::RequestTooLarge,
                        format!(
                            "A batch may hold at most {} events; this one has {total}.",
                            this.limits.max_batch_events
                        ),
                    ));
                }
                let stamp = Stamp::new(now_ms);
                let mut shape = Vec::with_capacity(batch.len());
                let mut prepared = Vec::with_capacity(total);
                for (collection, events) in &batch {
                    shape.push((collection.clone(), events.len()));
                    let name_error = check_collection_name(collection)
                        .err()
                        .map(|m| EventError::new(ErrorCode::InvalidCollectionName, m));
                    for (i, raw) in events.iter().enumerate() {
                        let outcome = match &name_error {
                            Some(e) => match json_syntax(raw) {
                                Ok(()) => Err(Refused {
                                    error: e.clone(),
                                    malformed: false,
                                }),
                                Err(syntax) => Err(Refused {
                                    error: json_error(&syntax),
                                    malformed: true,
                                }),
                            },
                            None => this.prepare(&meta, collection, &body, raw, &stamp),
                        };
                        match outcome {
                            // The split does not parse events, so text that is not JSON is
                            // found here: the body is not a batch, and nothing in it is kept.
                            Err(Refused {
                                malformed: true,
                                error,
                            }) => {
                                return Err(invalid_batch(&format!(
                                    "event {i} of '{collection}': {}",
                                    error.message
                                )));
                            }
                            other => prepared.push(other.map_err(|refused| refused.error)),
                        }
                    }
                }
                // Tokens are reserved only once the whole body is known to be a batch, so a
                // refused body never holds one.
                let slots = prepared
                    .into_iter()
                    .map(|event| match event {
                        Ok(event) => this.reserve(event, now_ms),
                        Err(e) => Slot::Rejected(e),
                    })
                    .collect::<Vec<_>>();
                Ok((shape, slots))
            }
        };
        let prepared = if big {
            tokio::task::spawn_blocking(prepare)
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        } else {
            prepare()
        };
        let (shape, slots) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => {
                self.count_rejected(e.code);
                return Err(IngestError::Request(e));
            }
        };
        let mut outcomes = self.commit(slots).await?.into_iter();
        Ok(shape
            .into_iter()
            .map(|(collection, n)| (collection, outcomes.by_ref().take(n).collect()))
            .collect())
    }

    /// Validates, substitutes placeholders and stamps one event. `raw` lies inside `body`, so
    /// the stored event shares the request's buffer instead of copying it.
    fn prepare(
        &self,
        meta: &RequestMeta,
        collection: &str,
        body: &Bytes,
        raw: &str,
        stamp: &Stamp,
    ) -> Result<AcceptedEvent, Refused> {
        let valid = check_event_text(raw, &self.limits)?;
        let rule = |error| Refused {
            error,
            malformed: false,
        };
        let (valid, body) = if valid.has_placeholders || meta.autofill.is_some() {
            let mut value: Value = serde_json::from_str(raw).map_err(|e| rule(json_error(&e)))?;
            if let (Some(fill), Value::Object(event)) = (&meta.autofill, &mut value) {
                deep_merge(event, fill);
            }
            substitute_placeholders(&mut value, meta);
            let substituted = serde_json::to_string(&value).map_err(|e| rule(json_error(&e)))?;
            (
                validate_event_text(&substituted, &self.limits).map_err(rule)?,
                Bytes::from(substituted),
            )
        } else {
            (valid, body.slice_ref(raw.as_bytes()))
        };
        Ok(AcceptedEvent {
            project: meta.project,
            collection: collection.to_string(),
            keen_json: self.keen_json(&valid, stamp),
            uniqueness_token: valid.uniqueness_token,
            created_at_ms: stamp.now_ms,
            body_json: body,
        })
    }

    /// The stamped `keen` object: `timestamp`, `created_at`, `id`, then what the client set
    /// (`location`, `addons`, `uniqueness_token`), written straight into one buffer.
    fn keen_json(&self, valid: &ValidEvent, stamp: &Stamp) -> String {
        let mut keen = String::with_capacity(96);
        keen.push_str("{\"timestamp\":\"");
        match valid.timestamp_ms {
            Some(ms) => write_timestamp_ms(&mut keen, ms),
            None => keen.push_str(&stamp.created_at),
        }
        keen.push_str("\",\"created_at\":\"");
        keen.push_str(&stamp.created_at);
        keen.push_str("\",\"id\":\"");
        keen.push_str(std::str::from_utf8(&self.ids.next_id_ascii(stamp.now_ms)).expect("hex"));
        keen.push('"');
        for (key, value) in valid.keen.iter().flatten() {
            if !matches!(key.as_str(), "timestamp" | "created_at" | "id") {
                keen.push(',');
                keen.push_str(&serde_json::to_string(key).expect("a string serialises"));
                keen.push(':');
                keen.push_str(&value.to_string());
            }
        }
        keen.push('}');
        keen
    }

    fn reserve(&self, event: AcceptedEvent, now_ms: i64) -> Slot {
        let Some(token) = &event.uniqueness_token else {
            return Slot::Ready(event, None);
        };
        let key = token_key(&event.project, &event.collection, token);
        if self.dedupe.reserve(key, now_ms, self.log.status().durable_end) {
            Slot::Ready(event, Some(key))
        } else {
            Slot::Duplicate
        }
    }

    /// Appends the ready events in one go and turns the slots into outcomes.
    async fn commit(&self, slots: Vec<Slot>) -> Result<Vec<EventOutcome>, LogError> {
        let mut events = Vec::new();
        let mut keys = Vec::new();
        let mut outcomes = Vec::with_capacity(slots.len());
        for slot in slots {
            outcomes.push(match slot {
                Slot::Ready(event, key) => {
                    events.push(event);
                    keys.extend(key);
                    EventOutcome::Created
                }
                Slot::Duplicate => EventOutcome::Duplicate,
                Slot::Rejected(e) => EventOutcome::Rejected(e),
            });
        }
        if !events.is_empty() {
            if let Err(e) = self.log.append(&events).await {
                self.dedupe.release(&keys);
                return Err(e);
            }
            self.dedupe.confirm(&keys);
        }
        for outcome in &outcomes {
            match outcome {
                EventOutcome::Created => {
                    self.metrics.accepted.inc();
                }
                EventOutcome::Duplicate => {
                    self.metrics.duplicates.inc();
                }
                EventOutcome::Rejected(e) => self.count_rejected(e.code),
            }
        }
        Ok(outcomes)
    }
}

/// Replaces string values that are exactly `${keen.ip}` or `${keen.user_agent}`, at any depth.
/// Merges `fill` into `event`: objects present in both merge property by property, anything
/// else in `fill` replaces what the event had.
pub fn deep_merge(event: &mut Map<String, Value>, fill: &Map<String, Value>) {
    for (name, value) in fill {
        match (event.get_mut(name), value) {
            (Some(Value::Object(inner)), Value::Object(fill_inner)) => deep_merge(inner, fill_inner),
            _ => {
                event.insert(name.clone(), value.clone());
            }
        }
    }
}

fn substitute_placeholders(value: &mut Value, meta: &RequestMeta) {
    match value {
        Value::String(s) if s == IP_PLACEHOLDER => {
            *value = meta
                .client_ip
                .map_or(Value::Null, |ip| Value::String(ip.to_string()));
        }
        Value::String(s) if s == USER_AGENT_PLACEHOLDER => {
            *value = meta.user_agent.clone().map_or(Value::Null, Value::String);
        }
        Value::Array(items) => items.iter_mut().for_each(|v| substitute_placeholders(v, meta)),
        Value::Object(map) => map.values_mut().for_each(|v| substitute_placeholders(v, meta)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn autofill_merges_deeply_and_the_keys_values_win() {
        let mut event = json!({"customer": {"id": "forged", "plan": "pro"}, "page": "/a", "tags": [1]})
            .as_object()
            .unwrap()
            .clone();
        let fill = json!({"customer": {"id": "c1", "name": "Ada"}, "tags": {"x": 1}, "source": "key"});
        deep_merge(&mut event, fill.as_object().unwrap());
        assert_eq!(
            Value::Object(event),
            json!({"customer": {"id": "c1", "plan": "pro", "name": "Ada"}, "page": "/a", "tags": {"x": 1}, "source": "key"})
        );
    }
}
