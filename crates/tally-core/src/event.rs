//! An accepted event and its binary log record.
//!
//! Ingest validates the event body as the client sent it without building a JSON tree, and stamps
//! the server's fields into a separate, small `keen` object. The log stores both side by side; the
//! event as Keen defines it (the body with its `keen` object replaced by the stamped one) is put
//! together only when it is read ([`LoggedEvent::to_json`]). This keeps the acknowledgement path
//! to one validating pass over the bytes and one copy.
//!
//! Record layout (version 1), all integers little-endian:
//!
//! ```text
//! u8        version (1)
//! [u8; 12]  project id
//! u16, ..   collection name (length, UTF-8 bytes)
//! u8, ..    uniqueness token (length, UTF-8 bytes; 0 = none)
//! i64       keen.created_at, Unix milliseconds
//! u32, ..   the stamped keen object as JSON (length, bytes)
//! ..        the event body as JSON (to the end of the record)
//! ```

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::ids::ProjectId;

/// The record format version this code writes.
pub const RECORD_VERSION: u8 = 1;

/// An event that passed validation and was stamped, ready to be logged.
#[derive(Debug, Clone, PartialEq)]
pub struct AcceptedEvent {
    /// The project the event belongs to.
    pub project: ProjectId,
    /// Its collection.
    pub collection: String,
    /// `keen.uniqueness_token`, kept outside the JSON so de-duplication can rebuild its table from
    /// the log without parsing events.
    pub uniqueness_token: Option<String>,
    /// `keen.created_at` in Unix milliseconds, also kept outside the JSON for the same reason.
    pub created_at_ms: i64,
    /// The stamped `keen` object (`timestamp`, `created_at`, `id`, and the client's `location`,
    /// `addons`, `uniqueness_token`), serialised.
    pub keen_json: String,
    /// The event as the client sent it (after placeholder substitution), serialised. Its own
    /// `keen` member, if any, is superseded by `keen_json`.
    pub body_json: Bytes,
}

impl AcceptedEvent {
    /// Appends the record encoding of this event to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let token = self.uniqueness_token.as_deref().unwrap_or("");
        out.reserve(
            1 + 12
                + 2
                + self.collection.len()
                + 1
                + token.len()
                + 8
                + 4
                + self.keen_json.len()
                + self.body_json.len(),
        );
        out.push(RECORD_VERSION);
        out.extend_from_slice(self.project.as_bytes());
        out.extend_from_slice(&(self.collection.len() as u16).to_le_bytes());
        out.extend_from_slice(self.collection.as_bytes());
        out.push(token.len() as u8);
        out.extend_from_slice(token.as_bytes());
        out.extend_from_slice(&self.created_at_ms.to_le_bytes());
        out.extend_from_slice(&(self.keen_json.len() as u32).to_le_bytes());
        out.extend_from_slice(self.keen_json.as_bytes());
        out.extend_from_slice(&self.body_json);
    }

    /// The record encoding of this event.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }
}

/// A record that cannot be decoded (an unknown version or a truncated field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed event record: {0}")]
pub struct RecordError(pub &'static str);

/// A decoded log record, borrowing from the record bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoggedEvent<'a> {
    /// The project.
    pub project: ProjectId,
    /// The collection.
    pub collection: &'a str,
    /// `keen.uniqueness_token`, if the event had one.
    pub uniqueness_token: Option<&'a str>,
    /// `keen.created_at`, Unix milliseconds.
    pub created_at_ms: i64,
    /// The stamped keen object, JSON.
    pub keen_json: &'a str,
    /// The body as sent, JSON.
    pub body_json: &'a [u8],
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], RecordError> {
        if self.0.len() < n {
            return Err(RecordError(what));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn str(&mut self, n: usize, what: &'static str) -> Result<&'a str, RecordError> {
        std::str::from_utf8(self.take(n, what)?).map_err(|_| RecordError(what))
    }
}

impl<'a> LoggedEvent<'a> {
    /// Decodes a record written by [`AcceptedEvent::encode_into`].
    pub fn decode(record: &'a [u8]) -> Result<Self, RecordError> {
        let mut c = Cursor(record);
        if c.take(1, "version")?[0] != RECORD_VERSION {
            return Err(RecordError("unknown record version"));
        }
        let project = ProjectId::from_bytes(c.take(12, "project id")?.try_into().expect("12 bytes"));
        let len = u16::from_le_bytes(c.take(2, "collection length")?.try_into().expect("2 bytes"));
        let collection = c.str(len as usize, "collection")?;
        let len = c.take(1, "token length")?[0];
        let token = c.str(len as usize, "uniqueness token")?;
        let created_at_ms = i64::from_le_bytes(c.take(8, "created_at")?.try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(c.take(4, "keen length")?.try_into().expect("4 bytes"));
        let keen_json = c.str(len as usize, "keen object")?;
        Ok(Self {
            project,
            collection,
            uniqueness_token: (!token.is_empty()).then_some(token),
            created_at_ms,
            keen_json,
            body_json: c.0,
        })
    }

    /// The event as stored: the body with its `keen` object replaced by the stamped one. The
    /// body's own `keen` (which carries the add-on specs, often most of its bytes) is skipped
    /// while parsing rather than parsed and thrown away.
    pub fn to_json(&self) -> Result<Value, serde_json::Error> {
        let keen: Value = serde_json::from_str(self.keen_json)?;
        let mut event =
            serde_json::Deserializer::from_slice(self.body_json).deserialize_map(BodyWithoutKeen)?;
        event.insert("keen".to_string(), keen);
        Ok(Value::Object(event))
    }
}

/// Deserialises an event body into a map, skipping its top-level `keen` member.
struct BodyWithoutKeen;

impl<'de> serde::de::Visitor<'de> for BodyWithoutKeen {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an event object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "keen" {
                access.next_value::<serde::de::IgnoredAny>()?;
            } else {
                map.insert(key.into_owned(), access.next_value()?);
            }
        }
        Ok(map)
    }
}

use serde::Deserializer as _;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn records_round_trip_and_merge_the_stamped_keen_object() {
        let event = AcceptedEvent {
            project: ProjectId::random(),
            collection: "User posts.new".into(),
            uniqueness_token: Some("tok-1".into()),
            created_at_ms: 1_700_000_000_123,
            keen_json: r#"{"timestamp":"2023-11-14T22:13:20.123Z","id":"abc"}"#.into(),
            body_json: Bytes::from_static(br#"{"price":5,"keen":{"timestamp":"2023-11-14T22:13:20.123"}}"#),
        };
        let bytes = event.encode();
        let logged = LoggedEvent::decode(&bytes).unwrap();
        assert_eq!(logged.project, event.project);
        assert_eq!(logged.collection, "User posts.new");
        assert_eq!(logged.uniqueness_token, Some("tok-1"));
        assert_eq!(logged.created_at_ms, 1_700_000_000_123);
        assert_eq!(
            logged.to_json().unwrap(),
            json!({"keen": {"timestamp": "2023-11-14T22:13:20.123Z", "id": "abc"}, "price": 5})
        );
        for cut in 0..bytes.len() - event.body_json.len() {
            assert!(LoggedEvent::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}

/// An event after the process stage: enriched, `keen.addons` removed, ready to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct EnrichedEvent {
    /// The project.
    pub project: ProjectId,
    /// The collection.
    pub collection: String,
    /// The event as it will be stored and queried, `keen` included, as JSON text: the stage
    /// writes it without building a tree of the whole event, and stores and outbound streams
    /// read it in one pass.
    pub json: String,
}

impl EnrichedEvent {
    /// The event parsed into a JSON value (for tests and tools; the hot path keeps the text).
    pub fn to_value(&self) -> Value {
        serde_json::from_str(&self.json).unwrap_or(Value::Null)
    }
}

/// A store failure seen by the process stage; it retries the same batch.
#[derive(Debug, thiserror::Error)]
#[error("event sink: {0}")]
pub struct SinkError(pub String);

/// Where the process stage hands enriched events: the event store (and, before it exists, a
/// JSON-lines file). Exactly-once delivery rests on [`EventSink::write`] recording the log
/// position in the same atomic step as the events, and on the stage resuming from
/// [`EventSink::committed_position`].
pub trait EventSink: Send + Sync + std::fmt::Debug {
    /// Stores `events` durably together with `log_position`, the position after the last of them.
    fn write(&self, events: &[EnrichedEvent], log_position: u64) -> Result<(), SinkError>;

    /// The log position stored with the last successful write, if any.
    fn committed_position(&self) -> Result<Option<u64>, SinkError>;

    /// Stores `events` read from a partitioned log (Kafka) durably together with, for each
    /// partition they came from, the offset after the last of them (`"topic/partition"` →
    /// next offset). The positions of other partitions stay as they were.
    fn write_partitioned(
        &self,
        events: &[EnrichedEvent],
        positions: &PartitionPositions,
    ) -> Result<(), SinkError> {
        let _ = (events, positions);
        Err(SinkError("this sink cannot record partition positions".into()))
    }

    /// The partition positions of everything written so far, durable or not: where a reader of
    /// the partitioned log that owns this sink carries on.
    fn written_partitions(&self) -> Result<PartitionPositions, SinkError> {
        self.durable_partitions()
    }

    /// The partition positions as durable as the events stored with them: what a crash keeps,
    /// and so what may be committed back to Kafka.
    fn durable_partitions(&self) -> Result<PartitionPositions, SinkError> {
        Ok(PartitionPositions::new())
    }
}

/// Positions in a partitioned log: `"topic/partition"` → the next offset to read.
pub type PartitionPositions = std::collections::BTreeMap<String, u64>;

/// The key of a partition in [`PartitionPositions`].
pub fn partition_key(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}
