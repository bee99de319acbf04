//! The event log boundary: where ingest hands accepted events to the process stage.
//!
//! An [`EventLog`] acknowledges an append only once the events are durable (fsync'd to local disk
//! for the embedded log; acknowledged by `acks=all` for Kafka). Ingest answers the client after
//! that, never before. When the log cannot take more without growing memory or disk past its
//! bounds it refuses at once with [`LogError::Overloaded`], which the server turns into a 503 with
//! `Retry-After`.

use std::future::Future;
use std::pin::Pin;

use crate::event::AcceptedEvent;

/// A boxed, sendable future; keeps [`EventLog`] object-safe without an extra dependency.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why an append did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    /// The log is over a configured bound (pending bytes, or the reader is too far behind); the
    /// client should retry after the given number of seconds.
    #[error("event log is over its bound ({reason}); retry in {retry_after_secs} s")]
    Overloaded {
        /// Which bound.
        reason: &'static str,
        /// A hint for `Retry-After`.
        retry_after_secs: u32,
    },
    /// The log failed to write or sync; nothing in the failed append was acknowledged.
    #[error("event log I/O error: {0}")]
    Io(String),
    /// The log is shut down.
    #[error("event log is closed")]
    Closed,
}

/// A snapshot of the log's counters, for metrics and back-pressure decisions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStatus {
    /// The position after the last durable record.
    pub durable_end: u64,
    /// The position up to which the process stage has consumed and committed.
    pub consumed: u64,
    /// Bytes still kept on disk (not yet removed by retention).
    pub retained_bytes: u64,
    /// Bytes accepted by `append` and not yet durable.
    pub pending_bytes: u64,
}

impl LogStatus {
    /// How far the process stage is behind the durable end, in bytes.
    pub fn lag_bytes(&self) -> u64 {
        self.durable_end.saturating_sub(self.consumed)
    }
}

/// A durable, ordered queue of accepted events.
pub trait EventLog: Send + Sync + std::fmt::Debug {
    /// Appends `events` in order. The returned future resolves with the position after the last
    /// of them once all are durable; an error means none of them was acknowledged. Over a bound
    /// the error comes at once, before anything is queued.
    fn append(&self, events: &[AcceptedEvent]) -> BoxFuture<'static, Result<u64, LogError>>;

    /// The current counters.
    fn status(&self) -> LogStatus;
}
