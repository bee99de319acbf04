//! Kafka as the event log: what an ingest node appends accepted events to.
//!
//! The producer is idempotent with `acks=all`, so librdkafka's own retries never duplicate or
//! reorder a record, and an append resolves only when every record of it is acknowledged by
//! all in-sync replicas. Only then does ingest answer the client. While Kafka is unreachable,
//! appends wait up to `append_timeout_ms` (the producer keeps retrying) and then fail, which the
//! client sees as a 503; past `max_in_flight_events` unacknowledged events, appends are refused at
//! once with a 503 and `Retry-After`, so memory stays bounded.
//!
//! Records carry the same binary encoding as the embedded log's
//! ([`AcceptedEvent::encode_into`]), without a key: the sticky partitioner spreads them over the
//! partitions, which the process nodes share.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tally_core::config::KafkaLogConfig;
use tally_core::event::AcceptedEvent;
use tally_core::log::{BoxFuture, EventLog, LogError, LogStatus};

use crate::client::{KafkaClients, KafkaSetupError, ensure_topic};

/// The ingest side of Kafka as the event log. See the module documentation.
pub struct KafkaEventLog {
    producer: FutureProducer,
    topic: String,
    max_in_flight: usize,
    /// Events handed to the producer and not yet acknowledged (or failed).
    in_flight: Arc<AtomicUsize>,
    /// Events acknowledged so far; the "position" appends report.
    acknowledged: Arc<AtomicU64>,
    metrics: LogMetrics,
}

impl std::fmt::Debug for KafkaEventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaEventLog")
            .field("topic", &self.topic)
            .finish()
    }
}

#[derive(Debug, Clone, Default)]
struct LogMetrics {
    appended: Counter,
    failed: Counter,
    in_flight: Gauge,
}

impl KafkaEventLog {
    /// Creates the topic if it does not exist and starts the producer.
    pub async fn start(
        clients: &KafkaClients,
        config: &KafkaLogConfig,
        registry: &mut Registry,
    ) -> Result<Self, KafkaSetupError> {
        ensure_topic(
            &clients.admin()?,
            &config.topic,
            config.partitions,
            config.replication_factor,
        )
        .await?;
        let producer: FutureProducer = clients
            .config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                config.append_timeout_ms.max(1_000).to_string(),
            )
            .set("linger.ms", "2")
            .set(
                "queue.buffering.max.messages",
                (config.max_in_flight_events.max(1) * 2)
                    .min(2_147_483_647)
                    .to_string(),
            )
            .set("queue.buffering.max.kbytes", "2097151")
            .create()?;
        let metrics = LogMetrics::default();
        registry.register(
            "tally_kafka_log_appended_events",
            "Events appended to the Kafka event log and acknowledged",
            metrics.appended.clone(),
        );
        registry.register(
            "tally_kafka_log_failed_events",
            "Events whose append to the Kafka event log failed (the client got a 503)",
            metrics.failed.clone(),
        );
        registry.register(
            "tally_kafka_log_in_flight_events",
            "Events produced to the Kafka event log and not yet acknowledged",
            metrics.in_flight.clone(),
        );
        tracing::info!(topic = %config.topic, "Kafka event log ready");
        Ok(Self {
            producer,
            topic: config.topic.clone(),
            max_in_flight: config.max_in_flight_events.max(1),
            in_flight: Arc::new(AtomicUsize::new(0)),
            acknowledged: Arc::new(AtomicU64::new(0)),
            metrics,
        })
    }

    /// Waits up to `timeout` for everything produced to be acknowledged (at shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "Kafka event log: not every append was acknowledged at shutdown");
        }
    }
}

/// Gives back in-flight slots when an append finishes, however it finishes.
struct InFlight {
    count: Arc<AtomicUsize>,
    gauge: Gauge,
    n: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.count.fetch_sub(self.n, Ordering::AcqRel);
        self.gauge.dec_by(self.n as i64);
    }
}

impl EventLog for KafkaEventLog {
    fn append(&self, events: &[AcceptedEvent]) -> BoxFuture<'static, Result<u64, LogError>> {
        let n = events.len();
        let before = self.in_flight.fetch_add(n, Ordering::AcqRel);
        let slots = InFlight {
            count: self.in_flight.clone(),
            gauge: self.metrics.in_flight.clone(),
            n,
        };
        self.metrics.in_flight.inc_by(n as i64);
        if before + n > self.max_in_flight && before > 0 {
            return Box::pin(async {
                Err(LogError::Overloaded {
                    reason: "kafka_in_flight",
                    retry_after_secs: 1,
                })
            });
        }
        let mut deliveries = Vec::with_capacity(n);
        let mut record = Vec::new();
        for event in events {
            record.clear();
            event.encode_into(&mut record);
            let sent = self
                .producer
                .send_result(FutureRecord::<(), [u8]>::to(&self.topic).payload(&record));
            match sent {
                Ok(delivery) => deliveries.push(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    return Box::pin(async {
                        Err(LogError::Overloaded {
                            reason: "kafka_queue_full",
                            retry_after_secs: 1,
                        })
                    });
                }
                Err((e, _)) => {
                    let message = e.to_string();
                    return Box::pin(async move { Err(LogError::Io(message)) });
                }
            }
        }
        let (acknowledged, metrics) = (self.acknowledged.clone(), self.metrics.clone());
        Box::pin(async move {
            let _slots = slots;
            let mut failure = None;
            for delivery in deliveries {
                match delivery.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => failure = Some(e.to_string()),
                    Err(_canceled) => failure = Some("the producer was dropped".into()),
                }
            }
            match failure {
                None => {
                    metrics.appended.inc_by(n as u64);
                    Ok(acknowledged.fetch_add(n as u64, Ordering::AcqRel) + n as u64)
                }
                Some(e) => {
                    metrics.failed.inc_by(n as u64);
                    tracing::warn!(error = %e, events = n, "Kafka event log: append failed");
                    Err(LogError::Io(e))
                }
            }
        })
    }

    fn status(&self) -> LogStatus {
        LogStatus {
            durable_end: self.acknowledged.load(Ordering::Acquire),
            consumed: 0,
            retained_bytes: 0,
            pending_bytes: 0,
        }
    }
}
