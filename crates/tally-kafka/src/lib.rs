//! Tally and Apache Kafka; the one crate that links rdkafka (librdkafka), so that editing
//! anything else does not rebuild it.
//!
//! * [`client`]: client settings (brokers, TLS, SASL, secrets) built once from
//!   [`KafkaConfig`](tally_core::config::KafkaConfig), and topic creation;
//! * [`log`]: [`KafkaEventLog`], Kafka as the event log: ingest nodes append accepted events
//!   with an idempotent, `acks=all` producer and answer only once Kafka has acknowledged them;
//! * [`stage`]: [`KafkaProcessStage`], the process stage of a process node: a consumer group
//!   member that enriches what it reads and stores it together with the offsets it consumed, so a
//!   rebalance or a crash neither loses nor repeats an event in the store;
//! * [`inbound`]: [`Inbound`], the user's topics consumed into a project, validated exactly as
//!   HTTP events are, invalid records sent to a dead-letter topic;
//! * [`outbound`]: [`OutboundSink`], every enriched event produced to a topic per project and
//!   collection before it is stored (at least once).
//!
//! Positions: both consumers seek, on every assignment, to the larger of the offset Tally itself
//! recorded (durably, with the data) and the group's committed offset. Tally's own record is what
//! makes the store exactly once; the group commit lets standard tools see the lag and lets a
//! node without a record start where the group left off.

pub mod client;
pub mod inbound;
pub mod log;
pub mod outbound;
mod seek;
pub mod stage;
pub mod tools;

pub use client::{KafkaClients, KafkaSetupError};
pub use inbound::Inbound;
pub use log::KafkaEventLog;
pub use outbound::OutboundSink;
pub use stage::KafkaProcessStage;
