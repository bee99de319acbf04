//! The live tail: enriched events as the process stage stores them, for
//! `GET …/events/{collection}/stream` (server-sent events, used by the web UI's live view).
//!
//! [`LiveSink`] wraps the event store as the stage's sink: after each successful write it hands
//! the batch to [`LiveTail`], which passes each watched collection's events to its subscribers
//! over a bounded broadcast channel. Nothing is built while nobody watches (one atomic load per
//! batch), and a watched collection costs at most [`MAX_EVENTS_PER_BATCH`] events per batch: a
//! person cannot read more, and the stage must not slow down for a browser tab. What is left out
//! is counted, and each subscriber is told how many events it missed.
//!
//! A batch travels as a small columnar [`Segment`], so every subscriber filters it with the
//! query engine's own filter code ([`tally_query::exec::rows_passing`]): an access key's
//! `queries.filters` mean exactly what they mean for its queries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tally_core::event::{EnrichedEvent, EventSink, PartitionPositions, SinkError};
use tally_core::ids::{KeyHash, ProjectId};
use tally_store::events::Segment;
use tokio::sync::broadcast;

/// The most events of one collection one batch passes to the live tail.
pub const MAX_EVENTS_PER_BATCH: usize = 500;

/// The most streams one key may hold open: each costs filter work on every batch.
pub const MAX_STREAMS_PER_KEY: usize = 8;

/// Batches a slow subscriber may fall behind before it starts missing them.
const CHANNEL_BATCHES: usize = 64;

/// The events of one collection from one stage batch.
#[derive(Debug)]
pub struct LiveBatch {
    /// The events passed on (the latest of the batch).
    pub events: Segment,
    /// Events of the batch left out to stay within [`MAX_EVENTS_PER_BATCH`].
    pub left_out: usize,
}

type Channel = broadcast::Sender<Arc<LiveBatch>>;

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// The server is shutting down.
    #[error("the server is shutting down")]
    Closed,
    /// The key already holds [`MAX_STREAMS_PER_KEY`] streams.
    #[error("this key already has {MAX_STREAMS_PER_KEY} live streams open")]
    TooMany,
}

/// Everything behind the one lock: checked and changed together, so a subscription cannot slip
/// in after [`LiveTail::close`].
#[derive(Debug, Default)]
struct Channels {
    closed: bool,
    /// Channels by project, then collection (looked up by `&str`, without allocating).
    by_project: HashMap<ProjectId, HashMap<String, Channel>>,
    /// Open streams per key.
    per_key: HashMap<KeyHash, usize>,
}

/// Subscribers per collection.
#[derive(Debug, Default)]
pub struct LiveTail {
    channels: Mutex<Channels>,
    /// Open subscriptions: when zero, [`LiveTail::publish`] returns at once.
    watchers: AtomicUsize,
}

impl LiveTail {
    /// A live tail with no subscribers.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Subscribes `key` to a collection's events.
    pub fn subscribe(
        self: &Arc<Self>,
        project: ProjectId,
        collection: &str,
        key: KeyHash,
    ) -> Result<Subscription, SubscribeError> {
        let mut channels = self.channels.lock().expect("live tail lock");
        if channels.closed {
            return Err(SubscribeError::Closed);
        }
        let open = channels.per_key.entry(key).or_default();
        if *open >= MAX_STREAMS_PER_KEY {
            return Err(SubscribeError::TooMany);
        }
        *open += 1;
        let receiver = channels
            .by_project
            .entry(project)
            .or_default()
            .entry(collection.to_owned())
            .or_insert_with(|| broadcast::channel(CHANNEL_BATCHES).0)
            .subscribe();
        self.watchers.fetch_add(1, Ordering::AcqRel);
        Ok(Subscription {
            receiver: Some(receiver),
            tail: self.clone(),
            project,
            collection: collection.to_owned(),
            key,
        })
    }

    /// Ends every stream and refuses new ones (shutdown: open streams would otherwise hold the
    /// graceful shutdown until its grace period ends).
    pub fn close(&self) {
        let mut channels = self.channels.lock().expect("live tail lock");
        channels.closed = true;
        channels.by_project.clear();
    }

    /// Open subscriptions.
    pub fn watchers(&self) -> usize {
        self.watchers.load(Ordering::Acquire)
    }

    /// Passes the watched collections' events of a stored batch to their subscribers.
    pub fn publish(&self, events: &[EnrichedEvent]) {
        if self.watchers() == 0 {
            return;
        }
        let mut watched: HashMap<(ProjectId, &str), (Channel, Vec<&str>)> = HashMap::new();
        {
            let channels = self.channels.lock().expect("live tail lock");
            for event in events {
                let key = (event.project, event.collection.as_str());
                if let Some((_, texts)) = watched.get_mut(&key) {
                    texts.push(&event.json);
                } else if let Some(channel) = channels
                    .by_project
                    .get(&event.project)
                    .and_then(|c| c.get(event.collection.as_str()))
                {
                    watched.insert(key, (channel.clone(), vec![&event.json]));
                }
            }
        }
        for (channel, texts) in watched.into_values() {
            let left_out = texts.len().saturating_sub(MAX_EVENTS_PER_BATCH);
            let (segment, _) = Segment::from_events(texts[left_out..].iter().copied());
            // An error only means the last subscriber left meanwhile.
            let _ = channel.send(Arc::new(LiveBatch {
                events: segment,
                left_out,
            }));
        }
    }

    fn unsubscribe(&self, project: ProjectId, collection: &str, key: KeyHash) {
        self.watchers.fetch_sub(1, Ordering::AcqRel);
        let mut channels = self.channels.lock().expect("live tail lock");
        if let Some(open) = channels.per_key.get_mut(&key) {
            *open -= 1;
            if *open == 0 {
                channels.per_key.remove(&key);
            }
        }
        if let Some(collections) = channels.by_project.get_mut(&project) {
            if collections
                .get(collection)
                .is_some_and(|c| c.receiver_count() == 0)
            {
                collections.remove(collection);
            }
            if collections.is_empty() {
                channels.by_project.remove(&project);
            }
        }
    }
}

/// One open subscription; unsubscribes when dropped (the client went away).
#[derive(Debug)]
pub struct Subscription {
    receiver: Option<broadcast::Receiver<Arc<LiveBatch>>>,
    tail: Arc<LiveTail>,
    project: ProjectId,
    collection: String,
    key: KeyHash,
}

/// What a subscription receives next.
#[derive(Debug)]
pub enum Received {
    /// A batch of events.
    Batch(Arc<LiveBatch>),
    /// The subscriber fell this many batches behind and they were dropped.
    Missed(u64),
    /// The server is shutting down.
    Closed,
}

impl Subscription {
    /// Waits for the next batch.
    pub async fn next(&mut self) -> Received {
        let Some(receiver) = self.receiver.as_mut() else {
            return Received::Closed;
        };
        match receiver.recv().await {
            Ok(batch) => Received::Batch(batch),
            Err(broadcast::error::RecvError::Lagged(n)) => Received::Missed(n),
            Err(broadcast::error::RecvError::Closed) => Received::Closed,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // The receiver goes first, so the channel's count no longer includes it.
        drop(self.receiver.take());
        self.tail.unsubscribe(self.project, &self.collection, self.key);
    }
}

/// The stage's sink: the event store, then the live tail.
#[derive(Debug)]
pub struct LiveSink {
    /// Where events are stored.
    pub store: Arc<dyn EventSink>,
    /// Who watches them arrive.
    pub tail: Arc<LiveTail>,
}

impl EventSink for LiveSink {
    fn write(&self, events: &[EnrichedEvent], log_position: u64) -> Result<(), SinkError> {
        self.store.write(events, log_position)?;
        self.tail.publish(events);
        Ok(())
    }

    fn committed_position(&self) -> Result<Option<u64>, SinkError> {
        self.store.committed_position()
    }

    fn write_partitioned(
        &self,
        events: &[EnrichedEvent],
        positions: &PartitionPositions,
    ) -> Result<(), SinkError> {
        self.store.write_partitioned(events, positions)?;
        self.tail.publish(events);
        Ok(())
    }

    fn written_partitions(&self) -> Result<PartitionPositions, SinkError> {
        self.store.written_partitions()
    }

    fn durable_partitions(&self) -> Result<PartitionPositions, SinkError> {
        self.store.durable_partitions()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(project: ProjectId, collection: &str, n: usize) -> EnrichedEvent {
        EnrichedEvent {
            project,
            collection: collection.to_owned(),
            json: format!(r#"{{"n":{n},"keen":{{"timestamp":"2026-01-01T00:00:00.000Z"}}}}"#),
        }
    }

    #[tokio::test]
    async fn subscribers_get_their_collection_and_are_told_what_was_left_out() {
        let tail = LiveTail::new();
        let p = ProjectId::random();
        let mut sub = tail.subscribe(p, "clicks", KeyHash::of("k")).unwrap();
        assert_eq!(tail.watchers(), 1);
        let mut batch: Vec<_> = (0..MAX_EVENTS_PER_BATCH + 7)
            .map(|n| event(p, "clicks", n))
            .collect();
        batch.push(event(p, "views", 0));
        batch.push(event(ProjectId::random(), "clicks", 0));
        tail.publish(&batch);
        let Received::Batch(got) = sub.next().await else {
            panic!("expected a batch")
        };
        assert_eq!(got.events.rows(), MAX_EVENTS_PER_BATCH);
        assert_eq!(got.left_out, 7);
        drop(sub);
        assert_eq!(tail.watchers(), 0);
        let channels = tail.channels.lock().unwrap();
        assert!(
            channels.by_project.is_empty(),
            "the last subscriber removes the channel"
        );
        assert!(channels.per_key.is_empty());
    }

    #[test]
    fn a_key_may_hold_a_bounded_number_of_streams() {
        let tail = LiveTail::new();
        let p = ProjectId::random();
        let (a, b) = (KeyHash::of("a"), KeyHash::of("b"));
        let held: Vec<_> = (0..MAX_STREAMS_PER_KEY)
            .map(|i| tail.subscribe(p, &format!("c{i}"), a).unwrap())
            .collect();
        assert_eq!(tail.subscribe(p, "c0", a).unwrap_err(), SubscribeError::TooMany);
        assert!(tail.subscribe(p, "c0", b).is_ok(), "another key is not affected");
        drop(held);
        assert!(tail.subscribe(p, "c0", a).is_ok(), "closing streams frees places");
    }

    #[tokio::test]
    async fn a_slow_subscriber_is_told_it_missed_batches_and_close_ends_streams() {
        let tail = LiveTail::new();
        let p = ProjectId::random();
        let mut sub = tail.subscribe(p, "c", KeyHash::of("k")).unwrap();
        for n in 0..CHANNEL_BATCHES + 3 {
            tail.publish(&[event(p, "c", n)]);
        }
        assert!(matches!(sub.next().await, Received::Missed(3)));
        assert!(matches!(sub.next().await, Received::Batch(_)));
        tail.close();
        // What was sent before the close is still delivered; then the stream ends.
        let mut rest = 0;
        loop {
            match sub.next().await {
                Received::Batch(_) => rest += 1,
                Received::Closed => break,
                Received::Missed(_) => panic!("no more misses"),
            }
        }
        assert_eq!(rest, CHANNEL_BATCHES - 1);
        assert_eq!(
            tail.subscribe(p, "c", KeyHash::of("k")).unwrap_err(),
            SubscribeError::Closed
        );
    }
}
