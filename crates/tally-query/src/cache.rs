//! The result cache behind `max_age` on ad-hoc queries.
//!
//! An answer is kept under the query's normalised key ([`crate::plan::Prepared::cache_key`])
//! with, for every collection and time range it read, the store's [`DataVersion`] taken
//! *before* the data was read. A later request with `max_age` gets the kept answer only if it is
//! no older than `max_age` and the caller confirms, for every read, that nothing changed in that
//! range since that version. So a cached answer is never older than asked and never outlives a
//! change to the data it covers; a write to another collection or to another time range (the
//! usual case: new events arrive "now", and a `previous_7_days` answer is untouched by them)
//! leaves it valid.
//!
//! Memory is bounded by `max_bytes` of answer text; the oldest entries go first.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tally_store::events::DataVersion;

use crate::timeframe::TimeRange;

/// One collection and time range an answer was computed from, with the data's version then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// The collection.
    pub collection: String,
    /// The time range read.
    pub range: TimeRange,
    /// The collection's version before it was read.
    pub version: DataVersion,
}

#[derive(Debug)]
struct Entry {
    body: Arc<String>,
    computed_at_ms: i64,
    reads: Vec<Read>,
    /// Which insertion this is, to skip stale places in `order`.
    generation: u64,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    order: VecDeque<(String, u64)>,
    bytes: usize,
    generation: u64,
}

/// Answers kept for `max_age`. See the module documentation.
#[derive(Debug)]
pub struct ResultCache {
    inner: Mutex<Inner>,
    max_bytes: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// A kept answer.
#[derive(Debug, Clone)]
pub struct Hit {
    /// The JSON text.
    pub body: Arc<String>,
    /// When it was computed (ms since the epoch).
    pub computed_at_ms: i64,
}

impl ResultCache {
    /// A cache holding at most `max_bytes` of answers (0 disables it).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            max_bytes,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The answer kept under `key` if it was computed at most `max_age_ms` before `now_ms` and
    /// `unchanged` holds for every read.
    pub fn get(
        &self,
        key: &str,
        max_age_ms: i64,
        now_ms: i64,
        unchanged: impl Fn(&Read) -> bool,
    ) -> Option<Hit> {
        let hit = {
            let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            inner.entries.get(key).and_then(|e| {
                let fresh = now_ms.saturating_sub(e.computed_at_ms) <= max_age_ms;
                (fresh && e.reads.iter().all(&unchanged)).then(|| Hit {
                    body: e.body.clone(),
                    computed_at_ms: e.computed_at_ms,
                })
            })
        };
        let counter = if hit.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        hit
    }

    /// Keeps `body` under `key`.
    pub fn put(&self, key: String, body: Arc<String>, computed_at_ms: i64, reads: Vec<Read>) {
        let size = body.len() + key.len();
        if size > self.max_bytes {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.generation += 1;
        let generation = inner.generation;
        if let Some(old) = inner.entries.insert(
            key.clone(),
            Entry {
                body,
                computed_at_ms,
                reads,
                generation,
            },
        ) {
            inner.bytes -= old.body.len() + key.len();
        }
        inner.bytes += size;
        inner.order.push_back((key, generation));
        while inner.bytes > self.max_bytes {
            let Some((oldest, generation)) = inner.order.pop_front() else {
                break;
            };
            if inner
                .entries
                .get(&oldest)
                .is_some_and(|e| e.generation == generation)
                && let Some(gone) = inner.entries.remove(&oldest)
            {
                inner.bytes -= gone.body.len() + oldest.len();
            }
        }
        // Superseded places in `order` are dropped once they outnumber live entries.
        if inner.order.len() > 2 * inner.entries.len() + 64 {
            let Inner { entries, order, .. } = &mut *inner;
            order.retain(|(k, g)| entries.get(k).is_some_and(|e| e.generation == *g));
        }
    }

    /// `(hits, misses)` so far.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(seq: u64) -> Read {
        Read {
            collection: "c".into(),
            range: TimeRange {
                start_ms: 0,
                end_ms: 10,
            },
            version: DataVersion { epoch: 1, seq },
        }
    }

    #[test]
    fn answers_expire_by_age_and_by_change_and_memory_is_bounded() {
        let cache = ResultCache::new(100);
        cache.put(
            "k".into(),
            Arc::new("{\"result\":1}".into()),
            1_000,
            vec![read(5)],
        );
        assert!(cache.get("k", 500, 1_400, |_| true).is_some());
        assert!(
            cache.get("k", 500, 1_600, |_| true).is_none(),
            "older than max_age"
        );
        assert!(
            cache.get("k", 500, 1_400, |r| r.version.seq > 5).is_none(),
            "data changed"
        );
        assert!(cache.get("other", 500, 1_400, |_| true).is_none());
        assert_eq!(cache.stats(), (1, 3));
        for i in 0..20 {
            cache.put(format!("k{i}"), Arc::new("x".repeat(20)), 1_000, vec![]);
        }
        let inner = cache.inner.lock().unwrap();
        assert!(inner.bytes <= 100 && inner.entries.len() <= 5, "{}", inner.bytes);
        assert!(inner.entries.contains_key("k19"), "the newest stays");
    }
}
