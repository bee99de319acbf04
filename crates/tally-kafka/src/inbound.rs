//! Kafka inbound: the user's topics consumed into one project.
//!
//! Topics named `<topic_prefix><collection>` are consumed (a regex subscription, so topics
//! created later are picked up), plus the listed `topics`, whose records name their collection
//! in a header (`collection` by default; the header also overrides a prefixed topic's name).
//! Record values are events in JSON and go through the very pipeline HTTP events do
//! ([`Ingestor::ingest_batch`]): the same validation, stamping, de-duplication and durable log
//! append.
//!
//! A record that cannot become an event (not JSON, invalid by Keen's rules, no collection) is
//! produced to the dead-letter topic with its key, value and headers, plus `tally.error` (the
//! reason), `tally.error_code` and `tally.source` (`topic/partition@offset`), and counted by
//! error code. Nothing is dropped silently.
//!
//! Offsets move only after a batch is durable: its events in Tally's log and its rejects
//! acknowledged by the dead-letter topic. Then Tally records the next offsets in its own file
//! (`inbound-offsets.json`, written atomically) and commits them to the group. On assignment the
//! consumer seeks to the larger of the two (see [`crate::seek`]), so a broker restart or a failed
//! group commit does not re-read what Tally already holds; only a crash between the log append
//! and the offsets file can deliver a batch twice (at least once).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::value::RawValue;
use tally_core::config::KafkaInboundConfig;
use tally_core::error::{ErrorCode, EventError};
use tally_core::event::{PartitionPositions, partition_key};
use tally_core::fsutil::write_atomically;
use tally_core::ids::ProjectId;
use tally_core::worker::StoppableThread;
use tally_ingest::validate::json_error;
use tally_ingest::{EventOutcome, IngestError, Ingestor, RequestMeta};

use crate::client::{KafkaClients, KafkaSetupError, ensure_topic};
use crate::seek::SeekContext;

/// One consumed record, copied out of the consumer.
#[derive(Debug)]
struct Record {
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
    /// A header name was not UTF-8 (the client library cannot read such headers).
    unreadable_headers: bool,
}

impl Record {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    error_code: &'static str,
}

#[derive(Debug, Clone, Default)]
struct InboundMetrics {
    stored: Counter,
    duplicates: Counter,
    dead_lettered: Family<CodeLabels, Counter>,
}

/// Running inbound consumption.
#[derive(Debug)]
pub struct Inbound {
    thread: StoppableThread,
}

/// Tally's own record of the inbound offsets.
#[derive(Debug)]
struct OffsetsFile {
    path: PathBuf,
    positions: Mutex<PartitionPositions>,
}

impl OffsetsFile {
    fn open(path: &Path) -> Result<Self, KafkaSetupError> {
        let positions = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| KafkaSetupError::Config(format!("{} is damaged: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => PartitionPositions::new(),
            Err(source) => {
                return Err(KafkaSetupError::File {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            positions: Mutex::new(positions),
        })
    }

    fn get(&self) -> PartitionPositions {
        self.positions.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn advance(&self, next: &PartitionPositions) -> std::io::Result<PartitionPositions> {
        let mut positions = self.positions.lock().unwrap_or_else(|p| p.into_inner());
        let mut updated = positions.clone();
        updated.extend(next.iter().map(|(k, v)| (k.clone(), *v)));
        write_atomically(
            &self.path,
            &serde_json::to_vec(&updated).expect("offsets serialise"),
        )?;
        *positions = updated.clone();
        Ok(updated)
    }
}

/// A regex matching topic names that start with `prefix`, for librdkafka's `^` subscriptions.
fn prefix_pattern(prefix: &str) -> String {
    let mut pattern = String::from("^");
    // Kafka topic names hold [a-zA-Z0-9._-]; of these only `.` means something to librdkafka's
    // regex engine, which refuses escapes it does not know (`\_`).
    for c in prefix.chars() {
        if c == '.' {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push_str(".+");
    pattern
}

/// The collection of a record: its header, or its topic's name after the prefix.
fn collection_of<'a>(record: &'a Record, config: &KafkaInboundConfig) -> Result<&'a str, EventError> {
    if record.unreadable_headers {
        return Err(EventError::new(
            ErrorCode::InvalidEvent,
            "The record has a header whose name is not UTF-8.",
        ));
    }
    if let Some(name) = record.header(&config.collection_header) {
        return std::str::from_utf8(name).map_err(|_| {
            EventError::new(
                ErrorCode::InvalidCollectionName,
                format!("The record's {:?} header is not UTF-8.", config.collection_header),
            )
        });
    }
    match record.topic.strip_prefix(&config.topic_prefix) {
        Some(name) if !config.topic_prefix.is_empty() && !name.is_empty() => Ok(name),
        _ => Err(EventError::new(
            ErrorCode::InvalidCollectionName,
            format!(
                "The record names no collection: topic {:?} has no {:?} prefix and the record no {:?} header.",
                record.topic, config.topic_prefix, config.collection_header
            ),
        )),
    }
}

impl Inbound {
    /// Starts consuming into `project`. `offsets_path` is Tally's own offsets file.
    pub async fn start(
        clients: &KafkaClients,
        config: KafkaInboundConfig,
        project: ProjectId,
        ingestor: Arc<Ingestor>,
        offsets_path: &Path,
        registry: &mut Registry,
    ) -> Result<Self, KafkaSetupError> {
        if config.topic_prefix.is_empty() && config.topics.is_empty() {
            return Err(KafkaSetupError::Config(
                "kafka.inbound needs a topic_prefix or topics to consume".into(),
            ));
        }
        if !config.topic_prefix.is_empty() && config.dead_letter_topic.starts_with(&config.topic_prefix)
            || config.topics.contains(&config.dead_letter_topic)
        {
            return Err(KafkaSetupError::Config(format!(
                "kafka.inbound.dead_letter_topic {:?} would be consumed as an inbound topic",
                config.dead_letter_topic
            )));
        }
        // A batch is one ingest call: it must stay within the batch limit HTTP has too.
        let mut config = config;
        config.max_batch_records = config
            .max_batch_records
            .clamp(1, ingestor.limits().max_batch_events.max(1));
        ensure_topic(&clients.admin()?, &config.dead_letter_topic, 1, -1).await?;
        let offsets = Arc::new(OffsetsFile::open(offsets_path)?);
        let own = {
            let offsets = offsets.clone();
            Box::new(move || offsets.get())
        };
        let consumer: BaseConsumer<SeekContext> = clients
            .config()
            .set("group.id", &config.group)
            .set("session.timeout.ms", "10000")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("topic.metadata.refresh.interval.ms", "5000")
            .set("partition.assignment.strategy", "range,roundrobin")
            .create_with_context(SeekContext::new("inbound", own, true))?;
        let mut subscription: Vec<String> = config.topics.clone();
        if !config.topic_prefix.is_empty() {
            subscription.push(prefix_pattern(&config.topic_prefix));
        }
        let names: Vec<&str> = subscription.iter().map(String::as_str).collect();
        consumer.subscribe(&names)?;
        let dead_letters: FutureProducer = clients
            .config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // A failed delivery is retried by the worker (which also notices shutdown), not
            // waited out for librdkafka's default five minutes.
            .set("message.timeout.ms", "30000")
            .create()?;
        let metrics = InboundMetrics::default();
        registry.register(
            "tally_kafka_inbound_stored",
            "Kafka inbound records stored as events",
            metrics.stored.clone(),
        );
        registry.register(
            "tally_kafka_inbound_duplicates",
            "Kafka inbound records whose uniqueness token was seen before (not stored again)",
            metrics.duplicates.clone(),
        );
        registry.register(
            "tally_kafka_inbound_dead_lettered",
            "Kafka inbound records sent to the dead-letter topic, by error code",
            metrics.dead_lettered.clone(),
        );
        tracing::info!(topics = ?subscription, %project, "Kafka inbound consuming");
        let worker = Worker {
            consumer,
            dead_letters,
            config,
            meta: RequestMeta {
                project,
                client_ip: None,
                user_agent: None,
                autofill: None,
            },
            ingestor,
            offsets,
            metrics,
            runtime: tokio::runtime::Handle::current(),
        };
        let thread = StoppableThread::spawn("tally-kafka-inbound", move |stop| worker.run(stop))
            .map_err(|e| KafkaSetupError::Config(format!("cannot start the inbound thread: {e}")))?;
        Ok(Self { thread })
    }

    /// Stops after the batch in hand, and waits.
    pub fn stop(self) {
        self.thread.stop();
    }
}

struct Worker {
    consumer: BaseConsumer<SeekContext>,
    dead_letters: FutureProducer,
    config: KafkaInboundConfig,
    meta: RequestMeta,
    ingestor: Arc<Ingestor>,
    offsets: Arc<OffsetsFile>,
    metrics: InboundMetrics,
    runtime: tokio::runtime::Handle,
}

impl Worker {
    fn run(self, stop: &AtomicBool) {
        let stopped = || stop.load(Ordering::Acquire);
        while !stopped() {
            let records = self.gather(stop);
            if records.is_empty() {
                continue;
            }
            let mut last = std::collections::BTreeMap::new();
            for r in &records {
                last.insert((r.topic.as_str(), r.partition), r.offset as u64 + 1);
            }
            let next: PartitionPositions = last
                .into_iter()
                .map(|((topic, partition), offset)| (partition_key(topic, partition), offset))
                .collect();
            // Each step is retried until it succeeds: moving on would lose the batch.
            let rejects = loop {
                match self.ingest(&records) {
                    Ok(rejects) => break rejects,
                    Err(e) => {
                        tracing::warn!(error = %e, "Kafka inbound: the log refused a batch; retrying it");
                        if stopped() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
            };
            while let Err(e) = self.dead_letter(&records, &rejects) {
                tracing::warn!(error = %e, "Kafka inbound: the dead-letter topic refused records; retrying");
                if stopped() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            let positions = loop {
                match self.offsets.advance(&next) {
                    Ok(positions) => break positions,
                    Err(e) => {
                        tracing::error!(error = %e, "Kafka inbound: cannot record offsets; retrying");
                        if stopped() {
                            // The batch is in the log; unrecorded, it is read again (at least once).
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
            };
            let list = self.consumer.context().commit_list(&positions);
            if list.count() > 0
                && let Err(e) = self.consumer.commit(&list, CommitMode::Async)
            {
                tracing::warn!(error = %e, "Kafka inbound: committing offsets to the group failed; Tally's own record holds them");
            }
        }
        self.consumer.unsubscribe();
    }

    /// Up to `max_batch_records` records: the first waited for, then those already fetched.
    /// Records gathered before a rebalance are dropped (the new assignment re-reads them).
    fn gather(&self, stop: &AtomicBool) -> Vec<Record> {
        let mut records = Vec::new();
        let mut generation = self.consumer.context().generation();
        // The first poll waits for a record; the rest take only what the client has already
        // fetched, so a batch is whatever is there (up to the cap) and never waits to fill.
        let mut started = false;
        while records.len() < self.config.max_batch_records.max(1) && !stop.load(Ordering::Acquire) {
            let wait = if started {
                Duration::ZERO
            } else {
                Duration::from_millis(100)
            };
            // A rebalance runs inside poll, which may then return nothing: look after every poll.
            let polled = self.consumer.poll(wait);
            if self.consumer.context().generation() != generation {
                records.clear();
                generation = self.consumer.context().generation();
            }
            let Some(polled) = polled else { break };
            match polled {
                Ok(m) => records.push({
                    // rdkafka panics on a header name that is not UTF-8; such a record is
                    // dead-lettered rather than taking the thread down.
                    let headers = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        m.headers()
                            .map(|h| {
                                h.iter()
                                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                                    .collect::<Vec<_>>()
                            })
                            .unwrap_or_default()
                    }));
                    Record {
                        unreadable_headers: headers.is_err(),
                        headers: headers.unwrap_or_default(),
                        topic: m.topic().to_owned(),
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        value: m.payload().map(<[u8]>::to_vec),
                    }
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "Kafka inbound: consumer error");
                    break;
                }
            }
            started = true;
        }
        records
    }

    /// Validates and logs the batch; returns the rejected records (index, reason).
    fn ingest(&self, records: &[Record]) -> Result<Vec<(usize, EventError)>, IngestError> {
        let mut rejects = Vec::new();
        // Collections in first-seen order, each with its records' indexes.
        let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, record) in records.iter().enumerate() {
            let checked = collection_of(record, &self.config).and_then(|collection| {
                let value = record.value.as_deref().filter(|v| !v.is_empty()).ok_or_else(|| {
                    EventError::new(
                        ErrorCode::InvalidEvent,
                        "The record has no value; an event is a JSON object.",
                    )
                })?;
                serde_json::from_slice::<&RawValue>(value).map_err(|e| json_error(&e))?;
                Ok(collection)
            });
            match checked {
                Ok(collection) => {
                    let at = *index.entry(collection).or_insert_with(|| {
                        groups.push((collection, Vec::new()));
                        groups.len() - 1
                    });
                    groups[at].1.push(i);
                }
                Err(e) => rejects.push((i, e)),
            }
        }
        if groups.is_empty() {
            return Ok(rejects);
        }
        let mut body = Vec::new();
        body.push(b'{');
        for (g, (collection, members)) in groups.iter().enumerate() {
            if g > 0 {
                body.push(b',');
            }
            serde_json::to_writer(&mut body, collection).expect("a string serialises");
            body.extend_from_slice(b":[");
            for (n, &i) in members.iter().enumerate() {
                if n > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(records[i].value.as_deref().unwrap_or_default());
            }
            body.push(b']');
        }
        body.push(b'}');
        let answer = self
            .runtime
            .block_on(self.ingestor.ingest_batch(self.meta.clone(), Bytes::from(body)));
        let outcomes = match answer {
            Ok(outcomes) => outcomes,
            Err(IngestError::Request(e)) => {
                // The batch as a whole was refused (a limit): every record gets that reason.
                for (_, members) in &groups {
                    rejects.extend(members.iter().map(|&i| (i, e.clone())));
                }
                return Ok(rejects);
            }
            Err(e) => return Err(e),
        };
        for ((_, members), (_, results)) in groups.iter().zip(outcomes) {
            for (&i, outcome) in members.iter().zip(results) {
                match outcome {
                    EventOutcome::Created => {
                        self.metrics.stored.inc();
                    }
                    EventOutcome::Duplicate => {
                        self.metrics.duplicates.inc();
                    }
                    EventOutcome::Rejected(e) => rejects.push((i, e)),
                }
            }
        }
        Ok(rejects)
    }

    /// Produces the rejected records to the dead-letter topic and waits for the acknowledgements.
    fn dead_letter(&self, records: &[Record], rejects: &[(usize, EventError)]) -> Result<(), String> {
        let mut deliveries = Vec::with_capacity(rejects.len());
        for (i, error) in rejects {
            let record = &records[*i];
            let source = format!("{}/{}@{}", record.topic, record.partition, record.offset);
            let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 3);
            for (name, value) in &record.headers {
                headers = headers.insert(Header {
                    key: name,
                    value: value.as_deref(),
                });
            }
            headers = headers
                .insert(Header {
                    key: "tally.error",
                    value: Some(error.message.as_bytes()),
                })
                .insert(Header {
                    key: "tally.error_code",
                    value: Some(error.code.as_str().as_bytes()),
                })
                .insert(Header {
                    key: "tally.source",
                    value: Some(source.as_bytes()),
                });
            let mut out = FutureRecord::<[u8], [u8]>::to(&self.config.dead_letter_topic).headers(headers);
            if let Some(key) = &record.key {
                out = out.key(key);
            }
            if let Some(value) = &record.value {
                out = out.payload(value);
            }
            match self.dead_letters.send_result(out) {
                Ok(delivery) => deliveries.push(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), mut back)) => {
                    // With Tally's headers the record no longer fits: send it without its value,
                    // saying so, so that the reason and the source are still recorded.
                    back.payload = None;
                    back.headers = Some(back.headers.take().unwrap_or_else(OwnedHeaders::new).insert(
                        Header {
                            key: "tally.value_dropped",
                            value: Some(b"too large for the dead-letter topic"),
                        },
                    ));
                    match self.dead_letters.send_result(back) {
                        Ok(delivery) => deliveries.push(delivery),
                        Err((e, _)) => return Err(e.to_string()),
                    }
                }
                Err((e, _)) => return Err(e.to_string()),
            }
        }
        for delivery in deliveries {
            match futures_executor::block_on(delivery) {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(e.to_string()),
                Err(_) => return Err("the dead-letter producer was dropped".into()),
            }
        }
        for (_, error) in rejects {
            tracing::debug!(code = error.code.as_str(), "Kafka inbound: record dead-lettered");
            self.metrics
                .dead_lettered
                .get_or_create(&CodeLabels {
                    error_code: error.code.as_str(),
                })
                .inc();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_become_anchored_patterns() {
        assert_eq!(prefix_pattern("tally.in."), "^tally\\.in\\..+");
        assert_eq!(prefix_pattern("ev-"), "^ev-.+");
        assert_eq!(prefix_pattern("my_app."), "^my_app\\..+");
    }

    fn record(topic: &str, headers: Vec<(&str, &[u8])>) -> Record {
        Record {
            topic: topic.into(),
            partition: 0,
            offset: 0,
            key: None,
            value: None,
            unreadable_headers: false,
            headers: headers
                .into_iter()
                .map(|(k, v)| (k.to_owned(), Some(v.to_vec())))
                .collect(),
        }
    }

    #[test]
    fn collections_come_from_the_header_or_the_topic() {
        let config = KafkaInboundConfig::default();
        assert_eq!(
            collection_of(&record("tally.in.clicks", vec![]), &config).unwrap(),
            "clicks"
        );
        assert_eq!(
            collection_of(
                &record("tally.in.clicks", vec![("collection", b"views")]),
                &config
            )
            .unwrap(),
            "views"
        );
        assert_eq!(
            collection_of(&record("mixed", vec![("collection", b"a")]), &config).unwrap(),
            "a"
        );
        let e = collection_of(&record("mixed", vec![]), &config).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidCollectionName);
        let e = collection_of(&record("mixed", vec![("collection", b"\xff")]), &config).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidCollectionName);
        assert!(collection_of(&record("tally.in.", vec![]), &config).is_err());
    }
}
