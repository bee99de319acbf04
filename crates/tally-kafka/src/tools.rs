//! Plain Kafka clients for the benchmark (`tally bench kafka`): a producer that sends JSON
//! values with an optional collection header, and a consumer that reads a topic to its end.
//! They live here so that rdkafka stays linked from this one crate.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::client::{KafkaClients, KafkaSetupError, ensure_topic};

/// A producer for benchmarks.
pub struct BenchProducer(BaseProducer);

impl BenchProducer {
    /// A producer with `acks=all`, batching for throughput.
    pub fn new(brokers: &str) -> Result<Self, KafkaError> {
        Ok(Self(
            ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .set("acks", "all")
                .set("linger.ms", "5")
                .set("queue.buffering.max.messages", "1000000")
                .create()?,
        ))
    }

    /// Sends one value to `topic`, with a `collection` header if given; waits while the
    /// producer's queue is full.
    pub fn send(&self, topic: &str, value: &[u8], collection: Option<&str>) -> Result<(), KafkaError> {
        let mut record = BaseRecord::<(), [u8]>::to(topic).payload(value);
        if let Some(collection) = collection {
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: "collection",
                value: Some(collection.as_bytes()),
            }));
        }
        loop {
            match self.0.send(record) {
                Ok(()) => {
                    self.0.poll(Duration::ZERO);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    self.0.poll(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Waits until everything sent is acknowledged.
    pub fn flush(&self) -> Result<(), KafkaError> {
        self.0.flush(Duration::from_secs(120))
    }
}

/// Creates `topic` with `partitions` partitions unless it exists.
pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) -> Result<(), KafkaSetupError> {
    let clients = KafkaClients::new(&tally_core::config::KafkaConfig {
        brokers: brokers.to_owned(),
        ..Default::default()
    })?;
    ensure_topic(&clients.admin()?, topic, partitions, -1).await
}

/// Reads partition 0 of `topic` from the start until `expect` records have arrived; returns
/// how long that took from the first record.
pub fn read_to_end(brokers: &str, topic: &str, expect: usize) -> Result<Duration, KafkaError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "tally-bench-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let mut seen = 0;
    let mut first = None;
    let mut idle = 0;
    while seen < expect && idle < 100 {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(_)) => {
                first.get_or_insert_with(Instant::now);
                seen += 1;
                idle = 0;
            }
            Some(Err(e)) => return Err(e),
            None => idle += 1,
        }
    }
    Ok(first.map_or(Duration::ZERO, |f| f.elapsed()))
}
