//! Kafka outbound: every enriched event produced to a topic per project and collection.
//!
//! [`OutboundSink`] wraps the process stage's sink. A batch is produced first and the stage
//! waits until Kafka has acknowledged all of it; only then is it stored, with its log position.
//! If Kafka is down, the write fails, the stage keeps its place and retries the batch, and the
//! log (embedded or Kafka) holds the events meanwhile: nothing is lost, and after a crash or a
//! retry a batch may be produced twice (at least once). Consumers de-duplicate on the record key,
//! `keen.id`.
//!
//! The value is the event as stored (JSON, `keen` included). Topics are named by
//! `topic_template` (`{project}`, `{collection}`), made Kafka-safe, and created on first use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;
use tally_core::config::KafkaOutboundConfig;
use tally_core::event::{EnrichedEvent, EventSink, PartitionPositions, SinkError};
use tally_core::ids::ProjectId;

use crate::client::{KafkaClients, KafkaSetupError, ensure_topic, topic_name};

/// The sink that produces to Kafka before handing on to `inner`. See the module documentation.
pub struct OutboundSink {
    inner: Arc<dyn EventSink>,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    template: String,
    /// Topic names by project and collection, once created (nested so that a lookup borrows the
    /// collection name instead of allocating a key per event).
    topics: Mutex<HashMap<ProjectId, HashMap<String, Arc<str>>>>,
    metrics: OutboundMetrics,
}

impl std::fmt::Debug for OutboundSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundSink")
            .field("template", &self.template)
            .field("inner", &self.inner)
            .finish()
    }
}

#[derive(Debug, Clone, Default)]
struct OutboundMetrics {
    produced: Counter,
    failed_batches: Counter,
    too_large: Counter,
    pending: Gauge,
}

/// Just `keen.id`, read from the stored JSON without building the rest.
#[derive(Deserialize)]
struct KeenId<'a> {
    #[serde(borrow)]
    keen: Option<IdOnly<'a>>,
}

#[derive(Deserialize)]
struct IdOnly<'a> {
    #[serde(borrow)]
    id: Option<&'a str>,
}

impl OutboundSink {
    /// A sink producing to Kafka and then writing to `inner`.
    pub fn new(
        clients: &KafkaClients,
        config: &KafkaOutboundConfig,
        inner: Arc<dyn EventSink>,
        registry: &mut Registry,
    ) -> Result<Self, KafkaSetupError> {
        if !config.topic_template.contains("{collection}") {
            return Err(KafkaSetupError::Config(
                "kafka.outbound.topic_template must contain {collection}".into(),
            ));
        }
        let producer: FutureProducer = clients
            .config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000")
            .create()?;
        let metrics = OutboundMetrics::default();
        registry.register(
            "tally_kafka_outbound_events",
            "Enriched events produced to Kafka and acknowledged",
            metrics.produced.clone(),
        );
        registry.register(
            "tally_kafka_outbound_failed_batches",
            "Batches Kafka did not acknowledge (the process stage retries them)",
            metrics.failed_batches.clone(),
        );
        registry.register(
            "tally_kafka_outbound_too_large_events",
            "Events larger than the producer's message.max.bytes: stored, not produced",
            metrics.too_large.clone(),
        );
        registry.register(
            "tally_kafka_outbound_pending_events",
            "Events produced to Kafka and not yet acknowledged; with the process stage's lag, how far outbound is behind",
            metrics.pending.clone(),
        );
        Ok(Self {
            inner,
            producer,
            admin: clients.admin()?,
            template: config.topic_template.clone(),
            topics: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    fn topic(&self, project: ProjectId, collection: &str) -> Result<Arc<str>, SinkError> {
        let known = self
            .topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&project)
            .and_then(|collections| collections.get(collection).cloned());
        if let Some(topic) = known {
            return Ok(topic);
        }
        let name = topic_name(
            &self
                .template
                .replace("{project}", &project.to_string())
                .replace("{collection}", collection),
        );
        futures_executor::block_on(ensure_topic(&self.admin, &name, 1, -1))
            .map_err(|e| SinkError(format!("outbound topic {name}: {e}")))?;
        let topic: Arc<str> = name.into();
        self.topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(project)
            .or_default()
            .insert(collection.to_owned(), topic.clone());
        Ok(topic)
    }

    /// Produces `events` and waits until Kafka has acknowledged every one.
    fn produce(&self, events: &[EnrichedEvent]) -> Result<(), SinkError> {
        let mut deliveries = Vec::with_capacity(events.len());
        let pending = PendingGauge::start(&self.metrics.pending, events.len() as i64);
        for event in events {
            let topic = self.topic(event.project, &event.collection)?;
            let id = serde_json::from_str::<KeenId>(&event.json)
                .ok()
                .and_then(|k| k.keen)
                .and_then(|k| k.id);
            let mut record = FutureRecord::<str, str>::to(&topic).payload(&event.json);
            if let Some(id) = id {
                record = record.key(id);
            }
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // The producer's queue is full: let it drain.
                        record = back;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                        // It can never be produced; retrying would stop the stage for good.
                        self.metrics.too_large.inc();
                        tracing::error!(topic = %topic, bytes = event.json.len(), "Kafka outbound: an event is larger than the producer's message.max.bytes; not produced (it is stored)");
                        break;
                    }
                    Err((e, _)) => return Err(self.failed(e.to_string())),
                }
            }
        }
        let mut failure = None;
        for delivery in deliveries {
            match futures_executor::block_on(delivery) {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => failure = Some(e.to_string()),
                Err(_) => failure = Some("the outbound producer was dropped".into()),
            }
        }
        drop(pending);
        match failure {
            None => {
                self.metrics.produced.inc_by(events.len() as u64);
                Ok(())
            }
            Some(e) => Err(self.failed(e)),
        }
    }

    fn failed(&self, error: String) -> SinkError {
        self.metrics.failed_batches.inc();
        SinkError(format!("Kafka outbound: {error}"))
    }
}

struct PendingGauge<'a>(&'a Gauge, i64);

impl<'a> PendingGauge<'a> {
    fn start(gauge: &'a Gauge, n: i64) -> Self {
        gauge.inc_by(n);
        Self(gauge, n)
    }
}

impl Drop for PendingGauge<'_> {
    fn drop(&mut self) {
        self.0.dec_by(self.1);
    }
}

impl EventSink for OutboundSink {
    fn write(&self, events: &[EnrichedEvent], log_position: u64) -> Result<(), SinkError> {
        self.produce(events)?;
        self.inner.write(events, log_position)
    }

    fn committed_position(&self) -> Result<Option<u64>, SinkError> {
        self.inner.committed_position()
    }

    fn write_partitioned(
        &self,
        events: &[EnrichedEvent],
        positions: &PartitionPositions,
    ) -> Result<(), SinkError> {
        self.produce(events)?;
        self.inner.write_partitioned(events, positions)
    }

    fn written_partitions(&self) -> Result<PartitionPositions, SinkError> {
        self.inner.written_partitions()
    }

    fn durable_partitions(&self) -> Result<PartitionPositions, SinkError> {
        self.inner.durable_partitions()
    }
}
