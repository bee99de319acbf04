//! `keen.uniqueness_token` de-duplication.
//!
//! The first event carrying a token is stored; a later event with the same token in the same
//! project and collection within the window (31 days by default) is answered as a success marked
//! `duplicate` and not stored again, so client retries are safe.
//!
//! The table maps a 128-bit digest of (project, collection, token) to the time the token was first
//! seen. It is kept in memory, and it is as durable as the log itself: the token travels in every
//! log record, so after a restart the table is the last snapshot plus a replay of the log from the
//! position that snapshot covers ([`recover`]). Snapshots are taken periodically and on shutdown;
//! log retention never deletes what a replay would still need.
//!
//! A token is *reserved* before its event is appended and *confirmed* once the append is durable
//! (or *released* if the append fails), so two concurrent requests with the same token cannot
//! both be stored. A snapshot leaves out reserved-but-unconfirmed tokens and makes the replay start
//! early enough to see their records if they become durable.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use tally_core::ProjectId;
use tally_core::event::LoggedEvent;

use crate::log::{EmbeddedEventLog, LogReader, write_atomically};

/// The digest a token is remembered by.
pub type TokenKey = [u8; 16];

/// The key of `token` in `collection` of `project`.
pub fn token_key(project: &ProjectId, collection: &str, token: &str) -> TokenKey {
    let mut hasher = Sha256::new();
    hasher.update(project.as_bytes());
    hasher.update((collection.len() as u32).to_le_bytes());
    hasher.update(collection.as_bytes());
    hasher.update(token.as_bytes());
    let digest = hasher.finalize();
    digest[..16].try_into().expect("16 bytes")
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    first_seen_ms: i64,
    /// While reserved and not yet durable: the log's durable end when the reservation was made
    /// (the record, if it lands, lands at or after it).
    pending_from: Option<u64>,
}

const SHARDS: usize = 16;

/// The de-duplication table.
#[derive(Debug)]
pub struct Dedupe {
    shards: Vec<Mutex<HashMap<TokenKey, Entry>>>,
    window_ms: i64,
}

/// A point-in-time copy of the confirmed tokens, and the log position a replay must start from
/// to complete it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DedupeSnapshot {
    /// Replay the log from here after loading this snapshot.
    pub replay_from: u64,
    /// (token key, first seen in Unix ms).
    pub entries: Vec<(TokenKey, i64)>,
}

const SNAPSHOT_MAGIC: &[u8; 8] = b"TALLYDD1";

impl DedupeSnapshot {
    /// The file form: magic, replay position, count, entries, then a crc32c of all before it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(28 + self.entries.len() * 24);
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.extend_from_slice(&self.replay_from.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for (key, ms) in &self.entries {
            out.extend_from_slice(key);
            out.extend_from_slice(&ms.to_le_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses [`DedupeSnapshot::encode`]'s output; `None` if it is damaged.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < 28 || &bytes[..8] != SNAPSHOT_MAGIC {
            return None;
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) {
            return None;
        }
        let replay_from = u64::from_le_bytes(body[8..16].try_into().ok()?);
        let count = u64::from_le_bytes(body[16..24].try_into().ok()?) as usize;
        let rest = &body[24..];
        if rest.len() != count.checked_mul(24)? {
            return None;
        }
        let entries = rest
            .chunks_exact(24)
            .map(|c| {
                let key: TokenKey = c[..16].try_into().expect("16 bytes");
                (key, i64::from_le_bytes(c[16..].try_into().expect("8 bytes")))
            })
            .collect();
        Some(Self { replay_from, entries })
    }
}

impl Dedupe {
    /// An empty table remembering tokens for `window_days`.
    pub fn new(window_days: u32) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            window_ms: i64::from(window_days) * 86_400_000,
        }
    }

    fn shard(&self, key: &TokenKey) -> std::sync::MutexGuard<'_, HashMap<TokenKey, Entry>> {
        self.shards[key[0] as usize % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self, entry: &Entry, now_ms: i64) -> bool {
        entry.pending_from.is_some() || now_ms - entry.first_seen_ms < self.window_ms
    }

    /// Reserves `key` for an event about to be appended. `false` means it is a duplicate.
    pub fn reserve(&self, key: TokenKey, now_ms: i64, durable_end: u64) -> bool {
        let mut shard = self.shard(&key);
        if shard.get(&key).is_some_and(|e| self.live(e, now_ms)) {
            return false;
        }
        shard.insert(
            key,
            Entry {
                first_seen_ms: now_ms,
                pending_from: Some(durable_end),
            },
        );
        true
    }

    /// The events of these reservations are durable.
    pub fn confirm(&self, keys: &[TokenKey]) {
        for key in keys {
            if let Some(entry) = self.shard(key).get_mut(key) {
                entry.pending_from = None;
            }
        }
    }

    /// The events of these reservations were not stored; forget them.
    pub fn release(&self, keys: &[TokenKey]) {
        for key in keys {
            let mut shard = self.shard(key);
            if shard.get(key).is_some_and(|e| e.pending_from.is_some()) {
                shard.remove(key);
            }
        }
    }

    /// Remembers a token seen durably at `first_seen_ms` (from a snapshot or a replay).
    pub fn remember(&self, key: TokenKey, first_seen_ms: i64, now_ms: i64) {
        if now_ms - first_seen_ms >= self.window_ms {
            return;
        }
        let mut shard = self.shard(&key);
        let entry = shard.entry(key).or_insert(Entry {
            first_seen_ms,
            pending_from: None,
        });
        entry.first_seen_ms = entry.first_seen_ms.min(first_seen_ms);
    }

    /// How many tokens are remembered.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Whether no token is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops expired tokens and copies the confirmed ones. `durable_end` must be read from the
    /// log before this is called.
    pub fn snapshot(&self, durable_end: u64, now_ms: i64) -> DedupeSnapshot {
        let mut replay_from = durable_end;
        let mut entries = Vec::new();
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.retain(|_, e| self.live(e, now_ms));
            for (key, entry) in shard.iter() {
                match entry.pending_from {
                    Some(from) => replay_from = replay_from.min(from),
                    None => entries.push((*key, entry.first_seen_ms)),
                }
            }
        }
        DedupeSnapshot { replay_from, entries }
    }
}

/// Writes a snapshot file atomically.
pub fn save_snapshot(path: &Path, snapshot: &DedupeSnapshot) -> io::Result<()> {
    write_atomically(path, &snapshot.encode())
}

/// What [`recover`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupeRecovery {
    /// Tokens loaded from the snapshot.
    pub from_snapshot: usize,
    /// Log records replayed.
    pub replayed_records: u64,
}

/// Rebuilds `dedupe` from the snapshot at `snapshot_path` (if any) and the log after it.
pub fn recover(
    dedupe: &Dedupe,
    snapshot_path: &Path,
    log: &EmbeddedEventLog,
    now_ms: i64,
) -> io::Result<DedupeRecovery> {
    let snapshot = match std::fs::read(snapshot_path) {
        Ok(bytes) => DedupeSnapshot::decode(&bytes).unwrap_or_else(|| {
            tracing::warn!(
                path = %snapshot_path.display(),
                "de-duplication snapshot is damaged; rebuilding from the retained log only"
            );
            DedupeSnapshot::default()
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => DedupeSnapshot::default(),
        Err(e) => return Err(e),
    };
    for (key, ms) in &snapshot.entries {
        dedupe.remember(*key, *ms, now_ms);
    }
    let mut reader: LogReader = log.reader(snapshot.replay_from);
    let mut replayed_records = 0;
    loop {
        let batch = reader.read_batch(8 << 20)?;
        if batch.is_empty() {
            break;
        }
        for entry in batch {
            replayed_records += 1;
            let Ok(event) = LoggedEvent::decode(&entry.payload) else {
                continue;
            };
            if let Some(token) = event.uniqueness_token {
                dedupe.remember(
                    token_key(&event.project, event.collection, token),
                    event.created_at_ms,
                    now_ms,
                );
            }
        }
    }
    Ok(DedupeRecovery {
        from_snapshot: snapshot.entries.len(),
        replayed_records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    #[test]
    fn tokens_are_unique_per_collection_within_the_window() {
        let dedupe = Dedupe::new(31);
        let p = ProjectId::from_bytes([1; 12]);
        let a = token_key(&p, "a", "t");
        assert!(dedupe.reserve(a, 0, 0));
        assert!(
            !dedupe.reserve(a, 1, 0),
            "pending reservations block a second one"
        );
        dedupe.confirm(&[a]);
        assert!(!dedupe.reserve(a, 30 * DAY, 0));
        assert!(dedupe.reserve(token_key(&p, "b", "t"), 0, 0), "other collection");
        assert!(dedupe.reserve(a, 31 * DAY, 0), "expired after 31 days");
    }

    #[test]
    fn released_reservations_are_forgotten() {
        let dedupe = Dedupe::new(31);
        let key = token_key(&ProjectId::from_bytes([1; 12]), "a", "t");
        assert!(dedupe.reserve(key, 0, 0));
        dedupe.release(&[key]);
        assert!(dedupe.reserve(key, 0, 0));
    }

    #[test]
    fn snapshots_leave_out_pending_tokens_and_replay_from_before_them() {
        let dedupe = Dedupe::new(31);
        let p = ProjectId::from_bytes([1; 12]);
        let (done, pending, old) = (
            token_key(&p, "c", "1"),
            token_key(&p, "c", "2"),
            token_key(&p, "c", "3"),
        );
        dedupe.reserve(old, 0, 10);
        dedupe.confirm(&[old]);
        dedupe.reserve(done, 40 * DAY, 50);
        dedupe.confirm(&[done]);
        dedupe.reserve(pending, 40 * DAY, 70);
        let snapshot = dedupe.snapshot(100, 40 * DAY);
        assert_eq!(snapshot.replay_from, 70);
        assert_eq!(
            snapshot.entries,
            vec![(done, 40 * DAY)],
            "old token expired, pending left out"
        );
        assert_eq!(DedupeSnapshot::decode(&snapshot.encode()), Some(snapshot.clone()));
        let mut damaged = snapshot.encode();
        damaged[10] ^= 1;
        assert_eq!(DedupeSnapshot::decode(&damaged), None);
    }
}
