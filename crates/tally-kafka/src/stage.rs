//! The process stage of a process node: a member of the consumer group on the Kafka event log.
//!
//! One thread polls the consumer, decodes and enriches each record (the same
//! [`enrich_record`] the embedded stage uses), and writes a batch to the sink together with, per
//! partition, the offset after its last record ([`EventSink::write_partitioned`]); the store
//! commits data and offsets in one manifest, so they cannot disagree after a crash.
//!
//! On every assignment the consumer seeks each partition to the larger of the store's offset
//! and the group's committed one (see [`crate::seek`]). A batch being gathered when the
//! assignment changes is dropped unwritten: the new assignment's seek starts from what the store
//! holds, so those records are read again, by this node or the partition's new owner, and
//! nothing is stored twice. Every `group_commit_interval_ms` (a second by default), the store's
//! *durable* offsets are committed to the group, which standard tools read as the lag.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use tally_core::config::KafkaLogConfig;
use tally_core::event::{EventSink, PartitionPositions, partition_key};
use tally_core::worker::StoppableThread;
use tally_process::Enrichers;
use tally_process::enrich::EnrichMemo;
use tally_process::stage::{RecordOrigin, StageMetrics, enrich_record};

use crate::client::{KafkaClients, KafkaSetupError};
use crate::seek::SeekContext;

/// Settings of the Kafka process stage.
#[derive(Debug, Clone)]
pub struct KafkaStageConfig {
    /// The log topic and the group.
    pub log: KafkaLogConfig,
    /// Records per batch, at most.
    pub max_batch_records: usize,
    /// This node's lasting identity in the group (`group.instance.id`, Kafka's static
    /// membership): a node restarted or replaced on the same data directory takes its
    /// partitions back at once instead of waiting out the old member's session.
    pub instance_id: Option<String>,
}

/// The running stage.
#[derive(Debug)]
pub struct KafkaProcessStage {
    thread: StoppableThread,
}

impl KafkaProcessStage {
    /// Joins the group and starts the stage thread.
    pub fn start(
        clients: &KafkaClients,
        config: KafkaStageConfig,
        sink: Arc<dyn EventSink>,
        enrichers: Arc<Enrichers>,
        registry: &mut Registry,
    ) -> Result<Self, KafkaSetupError> {
        let metrics = StageMetrics::register(registry);
        let lag = Gauge::default();
        registry.register(
            "tally_kafka_log_lag_events",
            "Records of the Kafka event log's assigned partitions not yet stored by this node",
            lag.clone(),
        );
        let mut settings = clients.config();
        if let Some(id) = &config.instance_id {
            settings.set("group.instance.id", id);
        }
        settings
            .set("group.id", &config.log.group)
            .set("session.timeout.ms", "10000")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "range,roundrobin");
        // A consumer that librdkafka reports fatally failed (a static member fenced after a
        // broker restart, seen in the broker-restart test) never consumes again: the stage makes
        // a new one from the same settings.
        let make_consumer = {
            let (sink, topic) = (sink.clone(), config.log.topic.clone());
            move || -> Result<BaseConsumer<SeekContext>, KafkaSetupError> {
                let sink = sink.clone();
                let own = Box::new(move || {
                    sink.written_partitions().unwrap_or_else(|e| {
                        tracing::error!(error = %e, "cannot read the store's partition offsets");
                        PartitionPositions::new()
                    })
                });
                let consumer: BaseConsumer<SeekContext> =
                    settings.create_with_context(SeekContext::new("process", own, false))?;
                consumer.subscribe(&[topic.as_str()])?;
                Ok(consumer)
            }
        };
        let mut consumer = make_consumer()?;
        let thread = StoppableThread::spawn("tally-kafka-process", move |stop| loop {
            run(
                &consumer,
                &config,
                sink.as_ref(),
                &enrichers,
                &metrics,
                &lag,
                stop,
            );
            if stop.load(Ordering::Acquire) {
                return;
            }
            // `run` returns early only when the consumer failed fatally.
            drop(consumer);
            consumer = loop {
                match make_consumer() {
                    Ok(consumer) => break consumer,
                    Err(e) => {
                        tracing::error!(error = %e, "Kafka process stage: cannot make a new consumer; retrying");
                        if stop.load(Ordering::Acquire) {
                            return;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            };
        })
        .map_err(|e| KafkaSetupError::Config(format!("cannot start the process thread: {e}")))?;
        Ok(Self { thread })
    }

    /// Stops after the batch in hand (leaving the group), and waits.
    pub fn stop(self) {
        self.thread.stop();
    }
}

fn run(
    consumer: &BaseConsumer<SeekContext>,
    config: &KafkaStageConfig,
    sink: &dyn EventSink,
    enrichers: &Enrichers,
    metrics: &StageMetrics,
    lag: &Gauge,
    stop: &AtomicBool,
) {
    let stopped = || stop.load(Ordering::Acquire);
    let mut last_commit = Instant::now();
    let mut committed = PartitionPositions::new();
    let mut memo = EnrichMemo::default();
    while !stopped() {
        let mut events = Vec::new();
        // Next offset by partition of the log topic (the only one subscribed); keyed for the
        // sink once per batch, not per record.
        let mut offsets: BTreeMap<i32, u64> = BTreeMap::new();
        let mut generation = consumer.context().generation();
        // The first poll waits for a record; the rest take only what the client has already
        // fetched, so a batch is whatever is there (up to the cap) and never waits to fill.
        let mut started = false;
        let geo = enrichers.geo().current();
        while events.len() < config.max_batch_records && !stopped() {
            let wait = if started {
                Duration::ZERO
            } else {
                Duration::from_millis(100)
            };
            // A rebalance runs inside poll, which may then return nothing: look after every poll.
            let polled = consumer.poll(wait);
            if consumer.context().generation() != generation {
                // The assignment changed while this batch was gathered: drop it (see the module
                // documentation).
                events.clear();
                offsets.clear();
                generation = consumer.context().generation();
            }
            let Some(polled) = polled else { break };
            let message = match polled {
                Ok(message) => message,
                Err(e) => {
                    if let Some((code, reason)) = consumer.client().fatal_error() {
                        tracing::error!(
                            ?code,
                            reason,
                            "Kafka process stage: the consumer failed fatally; making a new one"
                        );
                        return;
                    }
                    tracing::warn!(error = %e, "Kafka event log: consumer error");
                    break;
                }
            };
            let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
            if let Some(event) = enrich_record(
                message.payload().unwrap_or_default(),
                &format_args!("{topic}/{partition}@{offset}"),
                RecordOrigin::SharedTopic,
                enrichers,
                geo.as_deref(),
                &mut memo,
                metrics,
            ) {
                events.push(event);
            }
            offsets.insert(partition, offset as u64 + 1);
            started = true;
        }
        if !offsets.is_empty() {
            let positions: PartitionPositions = offsets
                .iter()
                .map(|(&partition, &next)| (partition_key(&config.log.topic, partition), next))
                .collect();
            while let Err(e) = sink.write_partitioned(&events, &positions) {
                metrics.sink_errors.inc();
                tracing::error!(error = %e, "Kafka process stage: the store refused a batch; retrying it");
                if stopped() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            metrics.events.inc_by(events.len() as u64);
        }
        if last_commit.elapsed() >= Duration::from_millis(config.log.group_commit_interval_ms) {
            last_commit = Instant::now();
            commit_durable(consumer, sink, &mut committed);
            lag.set(assigned_lag(consumer, sink));
        }
    }
    commit_durable(consumer, sink, &mut committed);
    consumer.unsubscribe();
}

/// Commits the store's durable offsets of the assigned partitions to the group, when they moved.
fn commit_durable(
    consumer: &BaseConsumer<SeekContext>,
    sink: &dyn EventSink,
    committed: &mut PartitionPositions,
) {
    let Ok(durable) = sink.durable_partitions() else {
        return;
    };
    if durable == *committed {
        return;
    }
    let list = consumer.context().commit_list(&durable);
    if list.count() == 0 {
        return;
    }
    match consumer.commit(&list, CommitMode::Async) {
        Ok(()) => *committed = durable,
        Err(e) => {
            tracing::warn!(error = %e, "Kafka process stage: committing offsets to the group failed; will retry")
        }
    }
}

/// Records of the assigned partitions beyond what the store has written.
fn assigned_lag(consumer: &BaseConsumer<SeekContext>, sink: &dyn EventSink) -> i64 {
    let written = sink.written_partitions().unwrap_or_default();
    let mut lag = 0i64;
    for (topic, partition) in consumer.context().assigned() {
        if let Ok((_, high)) = consumer.fetch_watermarks(&topic, partition, Duration::from_millis(500)) {
            let at = written
                .get(&partition_key(&topic, partition))
                .map_or(0, |&o| o as i64);
            lag += (high - at).max(0);
        }
    }
    lag
}
