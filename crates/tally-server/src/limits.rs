//! Fairness: per-key rate limits and per-project query slots.
//!
//! Keen's worst incidents were noisy neighbours: one customer's flood of heavy queries starving
//! everyone else. Two mechanisms keep one tenant from doing that here:
//!
//! * [`RateLimiter`]: every key has a token bucket per [`RateClass`] holding a minute's worth
//!   of requests (`rate_limits.*_per_minute`) and refilling continuously; a request finding its
//!   bucket empty is answered 429 with `Retry-After` (the seconds until a token is back).
//! * [`QueryGate`]: each project may run `query.max_concurrent_per_project` queries at once;
//!   more wait in the project's own short queue (`max_queued_per_project`, for at most
//!   `queue_timeout_ms`) and are refused with 429 past either. One project's flood therefore
//!   occupies at most its own slots, and another project's query starts at once on its own.
//!
//! Each query then runs under its time limit (504) and memory limit (`tally_query::exec`).
//! Both mechanisms read time from the injected [`Clock`] / tokio and keep their state in
//! memory: limits are per node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tally_core::clock::Clock;
use tally_core::config::{QueryConfig, RateLimitConfig};
use tally_core::error::ErrorCode;
use tally_core::ids::{KeyHash, ProjectId};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

/// The buckets a key's requests draw from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateClass {
    /// Requests computing over events.
    Queries,
    /// Master-key administration.
    Admin,
    /// Recording events.
    Writes,
}

impl RateClass {
    fn as_str(self) -> &'static str {
        match self {
            RateClass::Queries => "queries",
            RateClass::Admin => "admin",
            RateClass::Writes => "writes",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: &'static str,
}

/// Counts of refused requests, by reason (`rate_limit_<class>`, `queue_full`, `queue_timeout`).
#[derive(Debug, Clone, Default)]
pub struct FairnessMetrics {
    refused: Family<RefusalLabels, Counter>,
}

impl FairnessMetrics {
    /// Registers the counters.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tally_requests_refused",
            "Requests refused to keep tenants fair: rate limits and full query queues",
            self.refused.clone(),
        );
    }

    fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&RefusalLabels { reason }).inc();
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: i64,
}

/// Per-key token buckets.
#[derive(Debug)]
pub struct RateLimiter {
    config: RateLimitConfig,
    clock: Arc<dyn Clock>,
    buckets: Mutex<HashMap<(KeyHash, RateClass), Bucket>>,
    metrics: FairnessMetrics,
}

/// Past this many buckets, full ones are forgotten (a full bucket is the same as none).
const PRUNE_AT: usize = 100_000;

impl RateLimiter {
    /// Limits by `config`, timed by `clock`.
    pub fn new(config: RateLimitConfig, clock: Arc<dyn Clock>, metrics: FairnessMetrics) -> Self {
        Self {
            config,
            clock,
            buckets: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn per_minute(&self, class: RateClass) -> u32 {
        match class {
            RateClass::Queries => self.config.queries_per_minute,
            RateClass::Admin => self.config.admin_per_minute,
            RateClass::Writes => self.config.writes_per_minute,
        }
    }

    /// Takes one request's token from `key`'s `class` bucket, or refuses with 429.
    pub fn take(&self, key: &KeyHash, class: RateClass) -> Result<(), ApiError> {
        let per_minute = self.per_minute(class);
        if per_minute == 0 {
            return Ok(());
        }
        let capacity = f64::from(per_minute);
        let per_ms = capacity / 60_000.0;
        let now = self.clock.now_ms();
        let mut buckets = self.buckets.lock().expect("rate buckets");
        if buckets.len() > PRUNE_AT {
            // Each bucket judged by its own class's rate.
            buckets.retain(|(_, class), b| {
                let capacity = f64::from(self.per_minute(*class));
                b.tokens + (now - b.at_ms).max(0) as f64 * capacity / 60_000.0 < capacity
            });
        }
        let bucket = buckets.entry((*key, class)).or_insert(Bucket {
            tokens: capacity,
            at_ms: now,
        });
        bucket.tokens = (bucket.tokens + (now - bucket.at_ms).max(0) as f64 * per_ms).min(capacity);
        bucket.at_ms = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait_secs = ((1.0 - bucket.tokens) / per_ms / 1000.0).ceil().max(1.0) as u32;
        drop(buckets);
        self.metrics.refuse(match class {
            RateClass::Queries => "rate_limit_queries",
            RateClass::Admin => "rate_limit_admin",
            RateClass::Writes => "rate_limit_writes",
        });
        Err(ApiError {
            retry_after: Some(wait_secs),
            ..ApiError::new(
                ErrorCode::RateLimited,
                format!(
                    "This key is over its limit of {per_minute} {} requests a minute; retry in {wait_secs} s.",
                    class.as_str()
                ),
            )
        })
    }
}

#[derive(Debug)]
struct ProjectSlots {
    running: Arc<Semaphore>,
    waiting: AtomicUsize,
}

/// Per-project query slots with a short queue.
#[derive(Debug)]
pub struct QueryGate {
    slots_per_project: usize,
    max_queued: usize,
    queue_timeout: Duration,
    projects: Mutex<HashMap<ProjectId, Arc<ProjectSlots>>>,
    metrics: FairnessMetrics,
}

/// A running query's slot; released when dropped.
#[derive(Debug)]
pub struct QuerySlot(#[allow(dead_code)] OwnedSemaphorePermit);

impl QueryGate {
    /// Slots by `config` (0 concurrent: the number of cores).
    pub fn new(config: &QueryConfig, metrics: FairnessMetrics) -> Self {
        let slots = match config.max_concurrent_per_project {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        Self {
            slots_per_project: slots,
            max_queued: config.max_queued_per_project,
            queue_timeout: Duration::from_millis(config.queue_timeout_ms),
            projects: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Waits for one of `project`'s query slots, or refuses with 429 when the project's queue
    /// is full or the wait runs out.
    pub async fn enter(&self, project: ProjectId) -> Result<QuerySlot, ApiError> {
        let slots = self
            .projects
            .lock()
            .expect("query slots")
            .entry(project)
            .or_insert_with(|| {
                Arc::new(ProjectSlots {
                    running: Arc::new(Semaphore::new(self.slots_per_project)),
                    waiting: AtomicUsize::new(0),
                })
            })
            .clone();
        if let Ok(permit) = slots.running.clone().try_acquire_owned() {
            return Ok(QuerySlot(permit));
        }
        // Counted while waiting, and uncounted however the wait ends (a client that hangs up
        // drops this future mid-wait).
        let queued = Queued::join(&slots.waiting);
        if queued.ahead >= self.max_queued {
            drop(queued);
            self.metrics.refuse("queue_full");
            return Err(busy(format!(
                "This project already has {} queries running and {} waiting; retry shortly.",
                self.slots_per_project, self.max_queued
            )));
        }
        let waited = tokio::time::timeout(self.queue_timeout, slots.running.clone().acquire_owned()).await;
        drop(queued);
        match waited {
            Ok(Ok(permit)) => Ok(QuerySlot(permit)),
            Ok(Err(closed)) => Err(ApiError::internal(closed)),
            Err(_) => {
                self.metrics.refuse("queue_timeout");
                Err(busy(format!(
                    "The query waited {} ms for one of this project's {} query slots; retry shortly.",
                    self.queue_timeout.as_millis(),
                    self.slots_per_project
                )))
            }
        }
    }
}

/// One place in a project's queue, given back when dropped.
struct Queued<'a> {
    waiting: &'a AtomicUsize,
    /// How many were waiting before this one.
    ahead: usize,
}

impl<'a> Queued<'a> {
    fn join(waiting: &'a AtomicUsize) -> Self {
        let ahead = waiting.fetch_add(1, Ordering::SeqCst);
        Self { waiting, ahead }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

fn busy(message: String) -> ApiError {
    ApiError {
        retry_after: Some(1),
        ..ApiError::new(ErrorCode::RateLimited, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::clock::ManualClock;

    #[test]
    fn a_bucket_holds_a_minute_of_requests_and_refills() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let limiter = RateLimiter::new(
            RateLimitConfig {
                queries_per_minute: 3,
                admin_per_minute: 0,
                writes_per_minute: 0,
            },
            clock.clone(),
            FairnessMetrics::default(),
        );
        let (a, b) = (KeyHash::of("a"), KeyHash::of("b"));
        for _ in 0..3 {
            limiter.take(&a, RateClass::Queries).unwrap();
        }
        let refused = limiter.take(&a, RateClass::Queries).unwrap_err();
        assert_eq!(refused.code, ErrorCode::RateLimited);
        assert_eq!(refused.retry_after, Some(20), "one token comes back every 20 s");
        limiter.take(&b, RateClass::Queries).unwrap();
        for _ in 0..100 {
            limiter.take(&a, RateClass::Admin).unwrap();
        }
        clock.advance_ms(20_000);
        limiter.take(&a, RateClass::Queries).unwrap();
        assert!(limiter.take(&a, RateClass::Queries).is_err());
    }

    #[tokio::test]
    async fn a_project_gets_its_slots_and_a_short_queue() {
        let config = QueryConfig {
            max_concurrent_per_project: 1,
            max_queued_per_project: 1,
            queue_timeout_ms: 50,
            ..QueryConfig::default()
        };
        let gate = Arc::new(QueryGate::new(&config, FairnessMetrics::default()));
        let (p, q) = (ProjectId::random(), ProjectId::random());
        let running = gate.enter(p).await.unwrap();
        // Another project is not held up.
        drop(gate.enter(q).await.unwrap());
        // One waits in the queue; a second is refused at once.
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.enter(p).await }
        });
        let queued = || gate.projects.lock().unwrap()[&p].waiting.load(Ordering::SeqCst);
        while queued() == 0 {
            tokio::task::yield_now().await;
        }
        let full = gate.enter(p).await.unwrap_err();
        assert!(full.message.contains("waiting"), "{}", full.message);
        drop(running);
        assert!(
            waiter.await.unwrap().is_ok(),
            "the queued query gets the freed slot"
        );
        let _held = gate.enter(p).await.unwrap();
        let timed_out = gate.enter(p).await.unwrap_err();
        assert_eq!(timed_out.retry_after, Some(1));
        // A client that hangs up while queued gives its place back.
        let abandoned = tokio::spawn({
            let gate = gate.clone();
            async move { gate.enter(p).await }
        });
        while queued() == 0 {
            tokio::task::yield_now().await;
        }
        abandoned.abort();
        assert!(abandoned.await.unwrap_err().is_cancelled());
        assert_eq!(queued(), 0);
    }
}
