//! The embedded event store: enriched events by project and collection, in columnar segments.
//!
//! The process stage hands each batch to [`EventStore::write`] (the [`EventSink`] trait). The
//! batch becomes one small in-memory segment per collection, visible to queries at once. A
//! background thread ([`EventStore::start_maintenance`]) makes them durable: every
//! `flush_interval` it merges each collection's fresh segments into one, writes it to
//! `segments/<id>.seg` (fsync'd), and then replaces `manifest.json` (write, fsync, rename), which
//! lists the durable segments and the **log position** they cover. The manifest is the single
//! commit point: data and position change together, so after a crash the process stage resumes
//! from the manifest's position and re-reads from the event log exactly the events that were only
//! in memory. Segment files the manifest does not name (a crash mid-flush or mid-merge) are
//! deleted at open.
//!
//! The same thread merges small durable segments into bigger time-sorted ones, and deletes
//! ([`EventStore::rewrite`]) go through the same copy-then-commit path, so every change to what is
//! stored is one manifest replacement.
//!
//! The log must not drop records the store has not made durable: the process stage reports
//! [`EventSink::committed_position`] (the manifest's position) to the log as consumed.
//!
//! Caches of answers (the `max_age` result cache, cached datasets) need to know whether the data
//! they were computed from changed, and where in time. Every write and every rewrite of a
//! collection bumps its [`DataVersion`] and records the time range it touched;
//! [`EventStore::changes_since`] answers "what changed since this version". Flushes and merges
//! move data without changing it, so they record nothing.

mod build;
pub mod column;
mod pace;
pub mod segment;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tally_core::event::{EnrichedEvent, EventSink, PartitionPositions, SinkError};
use tally_core::fsutil::{
    AlignedBuf, ChunkedFile, REMOVAL_STEP, remove_file_gradually, sync_dir, write_atomically,
};
use tally_core::ids::ProjectId;

use pace::{PacedWrite, Pacer};

pub use column::{Cell, Column, NumStats, Tag, text_hash};

/// How many rows carry each tag, per property, summed over `segments`: a collection's schema
/// (Keen's type names via [`column::dominant_type`], SQL column types) without a scan.
pub fn property_tag_counts<'a>(
    segments: impl IntoIterator<Item = &'a Segment>,
) -> std::collections::BTreeMap<String, [u64; 8]> {
    let mut counts: std::collections::BTreeMap<String, [u64; 8]> = std::collections::BTreeMap::new();
    for seg in segments {
        for (path, column) in seg.columns() {
            let entry = counts.entry(path.to_owned()).or_default();
            for (total, n) in entry.iter_mut().zip(column.tag_counts()) {
                *total += n;
            }
        }
    }
    counts
}
pub use segment::{Segment, cell_value, number_value};

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// How often fresh in-memory segments are written to disk. Queries see events before this;
    /// it bounds how much the process stage re-reads from the log after a crash.
    pub flush_interval: Duration,
    /// Durable segments smaller than this are merged together, up to about this size.
    pub merge_target_rows: usize,
    /// A collection's small segments of one size tier are merged once there are at least this
    /// many (the tiers are powers of this number: see [`size_tier`]).
    pub merge_min_segments: usize,
    /// Scheduling niceness of the thread that flushes and merges: like the process stage, it
    /// works behind the log and should yield the cores to ingest (a merge at the same priority
    /// as ingest stalled acknowledgements for as long as it ran, up to half a second).
    pub niceness: i32,
    /// Write segment files with `O_DIRECT`, in chunks (see [`ChunkedFile`]), where the file
    /// system allows it.
    pub direct_io: bool,
    /// Where the thread that flushes and merges runs (`None`: anywhere): off the CPUs kept for
    /// ingest while it is busy (`process.reserved_ingest_cpus`; the process stage says when).
    pub cpus: Option<Arc<tally_core::worker::BackgroundCpus>>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_millis(1000),
            merge_target_rows: 1 << 20,
            merge_min_segments: 8,
            niceness: 10,
            direct_io: true,
            cpus: None,
        }
    }
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing files failed.
    #[error("event store I/O at {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A file is damaged.
    #[error("event store file {path} is damaged: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

/// A segment and where it lives.
#[derive(Debug)]
pub struct StoredSegment {
    /// Unique within the store, increasing: the order segments were made in.
    pub id: u64,
    /// Whether the segment is in a file the manifest names (false: in memory only, not yet
    /// flushed).
    pub durable: bool,
    /// The data.
    pub segment: Segment,
}

/// A project's collection.
pub type TableKey = (ProjectId, String);

/// How far a collection's change history reaches back; older versions get
/// [`Changes::Unknown`].
const CHANGE_HISTORY: usize = 4096;

/// A collection's data as of one moment, for caches: read it *before* taking the snapshot a
/// cached answer is computed from, so a change racing the snapshot only makes the cache more
/// cautious.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DataVersion {
    /// Which opening of the store the sequence belongs to: a version from before a restart
    /// cannot be compared with one after.
    pub epoch: u64,
    /// Changes to the collection in this epoch so far.
    pub seq: u64,
}

/// What changed in a collection since a [`DataVersion`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// Nothing.
    None,
    /// Events changed in these inclusive `keen.timestamp` ranges (ms), and nowhere else.
    Ranges(Vec<(i64, i64)>),
    /// The history does not reach back that far (or the store was reopened): assume anything.
    Unknown,
}

impl Changes {
    /// Whether anything changed in `[start_ms, end_ms)`.
    pub fn touches(&self, start_ms: i64, end_ms: i64) -> bool {
        match self {
            Changes::None => false,
            Changes::Ranges(ranges) => ranges.iter().any(|&(lo, hi)| hi >= start_ms && lo < end_ms),
            Changes::Unknown => true,
        }
    }
}

/// One collection's recent changes.
#[derive(Debug, Default)]
struct ChangeHistory {
    seq: u64,
    /// `(seq after the change, min timestamp, max timestamp)`, oldest first.
    recent: std::collections::VecDeque<(u64, i64, i64)>,
}

/// The segments of one collection at one moment; queries work on such a snapshot while writes,
/// flushes and merges go on.
pub type TableSnapshot = Vec<Arc<StoredSegment>>;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    position: Option<u64>,
    /// Positions in a partitioned log (Kafka), `"topic/partition"` → next offset.
    #[serde(default, skip_serializing_if = "PartitionPositions::is_empty")]
    partitions: PartitionPositions,
    next_id: u64,
    segments: Vec<ManifestEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ManifestEntry {
    id: u64,
    project: ProjectId,
    collection: String,
    rows: usize,
}

/// What writes change; one lock, held briefly.
#[derive(Debug, Default)]
struct WriteState {
    /// Fresh (in-memory) segments not yet handed to a flush.
    fresh: Vec<(TableKey, Arc<StoredSegment>)>,
    /// The log position after the last batch written.
    written_position: Option<u64>,
    /// The partition positions after the last batches written.
    written_partitions: PartitionPositions,
}

/// The embedded event store. See the module documentation.
#[derive(Debug)]
pub struct EventStore {
    dir: PathBuf,
    config: StoreConfig,
    tables: RwLock<HashMap<TableKey, TableSnapshot>>,
    writes: Mutex<WriteState>,
    /// Held by flush, merge and rewrite: each replaces the manifest from the one before.
    maintenance: Mutex<Manifest>,
    next_id: AtomicU64,
    /// The manifest's position, readable without the maintenance lock.
    durable_position: Mutex<Option<u64>>,
    /// The manifest's partition positions, readable without the maintenance lock.
    durable_partitions: Mutex<PartitionPositions>,
    /// Per collection, what changed recently (see [`EventStore::changes_since`]).
    changes: Mutex<HashMap<TableKey, ChangeHistory>>,
    /// Distinguishes this opening of the store from earlier ones (see [`DataVersion`]).
    epoch: u64,
    /// The buffer segment files are written through (`O_DIRECT`), kept for reuse: touching
    /// new memory is costly.
    write_buf: Mutex<AlignedBuf>,
}

/// How much of a segment file goes to the disk at once (see [`ChunkedFile`]).
const WRITE_CHUNK_BYTES: usize = 1 << 20;

impl EventStore {
    /// Opens (creating) the store in `dir`, loading every segment the manifest names.
    pub fn open(dir: &Path, config: StoreConfig) -> Result<Self, StoreError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        let seg_dir = dir.join("segments");
        std::fs::create_dir_all(&seg_dir).map_err(io_err(&seg_dir))?;
        let manifest_path = dir.join("manifest.json");
        let manifest: Manifest = match std::fs::read(&manifest_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path: manifest_path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Manifest {
                version: 1,
                ..Manifest::default()
            },
            Err(e) => return Err(io_err(&manifest_path)(e)),
        };
        let mut tables: HashMap<TableKey, TableSnapshot> = HashMap::new();
        let mut named = std::collections::HashSet::new();
        for entry in &manifest.segments {
            let path = segment_path(dir, entry.id);
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            let segment = Segment::decode(&bytes).map_err(|reason| StoreError::Corrupt {
                path: path.clone(),
                reason,
            })?;
            named.insert(entry.id);
            tables
                .entry((entry.project, entry.collection.clone()))
                .or_default()
                .push(Arc::new(StoredSegment {
                    id: entry.id,
                    durable: true,
                    segment,
                }));
        }
        // Files a crash left behind before their manifest was written.
        for file in std::fs::read_dir(&seg_dir).map_err(io_err(&seg_dir))? {
            let file = file.map_err(io_err(&seg_dir))?;
            let name = file.file_name();
            let id = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| u64::from_str_radix(n, 16).ok());
            if id.is_none_or(|id| !named.contains(&id)) {
                tracing::info!(file = %file.path().display(), "event store: removing a segment file no manifest names");
                let _ = std::fs::remove_file(file.path());
            }
        }
        let rows: usize = manifest.segments.iter().map(|e| e.rows).sum();
        tracing::info!(segments = manifest.segments.len(), rows, position = ?manifest.position, "event store opened");
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            tables: RwLock::new(tables),
            // A flush before the stage's first write must keep the manifest's position.
            writes: Mutex::new(WriteState {
                fresh: Vec::new(),
                written_position: manifest.position,
                written_partitions: manifest.partitions.clone(),
            }),
            next_id: AtomicU64::new(manifest.next_id),
            durable_position: Mutex::new(manifest.position),
            durable_partitions: Mutex::new(manifest.partitions.clone()),
            maintenance: Mutex::new(manifest),
            changes: Mutex::new(HashMap::new()),
            epoch: rand::random::<u64>() | 1,
            write_buf: Mutex::new(AlignedBuf::zeroed(WRITE_CHUNK_BYTES)),
        })
    }

    /// The collection's data version now.
    pub fn data_version(&self, project: ProjectId, collection: &str) -> DataVersion {
        let changes = self.changes.lock().expect("changes lock");
        DataVersion {
            epoch: self.epoch,
            seq: changes
                .get(&(project, collection.to_owned()))
                .map_or(0, |h| h.seq),
        }
    }

    /// What changed in the collection since `since`.
    pub fn changes_since(&self, project: ProjectId, collection: &str, since: DataVersion) -> Changes {
        if since.epoch != self.epoch {
            return Changes::Unknown;
        }
        let changes = self.changes.lock().expect("changes lock");
        let Some(history) = changes.get(&(project, collection.to_owned())) else {
            return if since.seq == 0 {
                Changes::None
            } else {
                Changes::Unknown
            };
        };
        if since.seq >= history.seq {
            return if since.seq == history.seq {
                Changes::None
            } else {
                Changes::Unknown
            };
        }
        // Entries with seq in (since.seq, history.seq] must all still be here.
        match history.recent.front() {
            Some(&(first, _, _)) if first <= since.seq + 1 => {}
            _ => return Changes::Unknown,
        }
        Changes::Ranges(
            history
                .recent
                .iter()
                .filter(|(seq, _, _)| *seq > since.seq)
                .map(|&(_, lo, hi)| (lo, hi))
                .collect(),
        )
    }

    /// Records that the collection's events changed within `[lo, hi]` (call after the change
    /// is visible in `tables`).
    fn record_change(&self, key: &TableKey, lo: i64, hi: i64) {
        let mut changes = self.changes.lock().expect("changes lock");
        let history = changes.entry(key.clone()).or_default();
        history.seq += 1;
        let seq = history.seq;
        history.recent.push_back((seq, lo, hi));
        while history.recent.len() > CHANGE_HISTORY {
            history.recent.pop_front();
        }
    }

    /// The segments of a collection now (empty if it has none).
    pub fn snapshot(&self, project: ProjectId, collection: &str) -> TableSnapshot {
        let tables = self.tables.read().expect("tables lock");
        tables
            .get(&(project, collection.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    /// The projects that hold events.
    pub fn projects(&self) -> Vec<ProjectId> {
        let tables = self.tables.read().expect("tables lock");
        let mut ids: Vec<ProjectId> = tables.keys().map(|(p, _)| *p).collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// The collections of a project that hold events, sorted by name.
    pub fn collections(&self, project: ProjectId) -> Vec<String> {
        let tables = self.tables.read().expect("tables lock");
        let mut names: Vec<String> = tables
            .iter()
            .filter(|((p, _), segs)| *p == project && segs.iter().any(|s| s.segment.rows() > 0))
            .map(|((_, c), _)| c.clone())
            .collect();
        names.sort();
        names
    }

    /// Writes fresh segments to disk and commits them with their log position. Returns how many
    /// segments were written.
    pub fn flush(&self) -> Result<usize, StoreError> {
        self.flush_paced(&mut Pacer::unpaced())
    }

    /// [`EventStore::flush`], resting where `pacer` says.
    fn flush_paced(&self, pacer: &mut Pacer<'_>) -> Result<usize, StoreError> {
        let mut manifest = self.maintenance.lock().expect("maintenance lock");
        self.flush_locked(&mut manifest, pacer)
    }

    fn flush_locked(&self, manifest: &mut Manifest, pacer: &mut Pacer<'_>) -> Result<usize, StoreError> {
        let (fresh, position, mut partitions) = {
            let mut writes = self.writes.lock().expect("writes lock");
            (
                std::mem::take(&mut writes.fresh),
                writes.written_position,
                writes.written_partitions.clone(),
            )
        };
        // Positions only move forward.
        let position = position.max(manifest.position);
        for (key, offset) in &manifest.partitions {
            let mine = partitions.entry(key.clone()).or_insert(*offset);
            *mine = (*mine).max(*offset);
        }
        if fresh.is_empty() && position == manifest.position && partitions == manifest.partitions {
            return Ok(0);
        }
        // Until the manifest is committed, the taken segments go back on failure (a full disk,
        // say): the next flush must still write them, or it would commit positions past them.
        let taken = fresh.clone();
        let put_back = |e: StoreError| {
            let mut writes = self.writes.lock().expect("writes lock");
            writes.fresh.splice(0..0, taken.iter().cloned());
            e
        };
        let mut by_table: HashMap<TableKey, Vec<Arc<StoredSegment>>> = HashMap::new();
        for (key, seg) in fresh {
            by_table.entry(key).or_default().push(seg);
        }
        let mut made = Vec::new();
        for (key, parts) in &by_table {
            let segs: Vec<&Segment> = parts.iter().map(|p| &p.segment).collect();
            let merged = if segs.len() == 1 {
                segs[0].clone()
            } else {
                Segment::merge_paced(&segs, pacer)
            };
            if merged.rows() == 0 {
                continue;
            }
            let stored = self.write_segment_file(merged, pacer).map_err(put_back)?;
            made.push((key.clone(), stored));
        }
        let mut next = manifest.clone();
        next.position = position;
        next.partitions = partitions;
        for (key, stored) in &made {
            next.segments.push(ManifestEntry {
                id: stored.id,
                project: key.0,
                collection: key.1.clone(),
                rows: stored.segment.rows(),
            });
        }
        self.commit_manifest(manifest, next).map_err(put_back)?;
        let mut tables = self.tables.write().expect("tables lock");
        for (key, parts) in &by_table {
            let replacement = made.iter().find(|(k, _)| k == key).map(|(_, s)| s.clone());
            let table = tables.entry(key.clone()).or_default();
            let gone: Vec<u64> = parts.iter().map(|p| p.id).collect();
            let at = table.iter().position(|s| gone.contains(&s.id));
            table.retain(|s| !gone.contains(&s.id));
            if let Some(seg) = replacement {
                table.insert(at.unwrap_or(table.len()).min(table.len()), seg);
            }
        }
        Ok(made.len())
    }

    /// Merges each collection's small durable segments into bigger ones. Returns how many
    /// segments were written.
    pub fn merge_small(&self) -> Result<usize, StoreError> {
        self.merge_small_paced(&mut Pacer::unpaced())
    }

    /// [`EventStore::merge_small`], resting where `pacer` says.
    fn merge_small_paced(&self, pacer: &mut Pacer<'_>) -> Result<usize, StoreError> {
        let mut replaced = Vec::new();
        let merged = {
            let mut manifest = self.maintenance.lock().expect("maintenance lock");
            self.merge_small_locked(&mut manifest, &mut replaced, pacer)
        };
        self.remove_segment_files(&replaced);
        merged
    }

    /// [`EventStore::merge_small`] under the maintenance lock; the ids of the segments it
    /// replaced (committed) go to `replaced`, whose files the caller deletes after the lock.
    fn merge_small_locked(
        &self,
        manifest: &mut Manifest,
        replaced: &mut Vec<u64>,
        pacer: &mut Pacer<'_>,
    ) -> Result<usize, StoreError> {
        let tables: Vec<(TableKey, TableSnapshot)> = {
            let tables = self.tables.read().expect("tables lock");
            tables.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let mut written = 0;
        let fan_in = self.config.merge_min_segments.max(2);
        for (key, snapshot) in tables {
            let small = snapshot
                .iter()
                .filter(|s| s.durable && s.segment.rows() < self.config.merge_target_rows / 2);
            // Only segments of one size tier are merged together (see [`size_tier`]), so each
            // row is rewritten about once per tier it climbs, not once per merge until it is big.
            let mut tiers: BTreeMap<u32, Vec<&Arc<StoredSegment>>> = BTreeMap::new();
            for seg in small {
                tiers
                    .entry(size_tier(seg.segment.rows(), fan_in))
                    .or_default()
                    .push(seg);
            }
            // Within a tier, consecutive runs (by id, i.e. by arrival, which keeps time
            // locality) up to the target.
            let mut runs: Vec<Vec<&Arc<StoredSegment>>> = Vec::new();
            for tier in tiers.into_values().filter(|t| t.len() >= fan_in) {
                let mut run: Vec<&Arc<StoredSegment>> = Vec::new();
                let mut rows = 0;
                for seg in tier {
                    if rows + seg.segment.rows() > self.config.merge_target_rows && !run.is_empty() {
                        runs.push(std::mem::take(&mut run));
                        rows = 0;
                    }
                    rows += seg.segment.rows();
                    run.push(seg);
                }
                runs.push(run);
            }
            for run in runs.into_iter().filter(|r| r.len() >= 2) {
                let parts: Vec<&Segment> = run.iter().map(|s| &s.segment).collect();
                let merged = Segment::merge_paced(&parts, pacer);
                let gone: Vec<u64> = run.iter().map(|s| s.id).collect();
                self.replace_locked(manifest, &key, &gone, vec![merged], pacer)?;
                replaced.extend(gone);
                written += 1;
            }
        }
        Ok(written)
    }

    /// Rewrites a collection's stored events: `change` is called on each segment and returns
    /// `None` to keep it or `Some(new)` to replace it (an empty segment removes it). Fresh
    /// events are flushed first, so the change sees everything written so far. One manifest
    /// replacement commits the whole change. Returns the rows removed.
    pub fn rewrite(
        &self,
        project: ProjectId,
        collection: &str,
        change: impl Fn(&Segment) -> Option<Segment>,
    ) -> Result<usize, StoreError> {
        let mut manifest = self.maintenance.lock().expect("maintenance lock");
        self.flush_locked(&mut manifest, &mut Pacer::unpaced())?;
        let key = (project, collection.to_owned());
        let snapshot = self.snapshot(project, collection);
        let mut gone = Vec::new();
        let mut made = Vec::new();
        let mut removed = 0;
        let mut touched = Vec::new();
        for seg in snapshot.iter().filter(|s| s.durable) {
            if let Some(new) = change(&seg.segment) {
                removed += seg.segment.rows() - new.rows().min(seg.segment.rows());
                gone.push(seg.id);
                touched.extend(seg.segment.time_bounds());
                made.push(new);
            }
        }
        if !gone.is_empty() {
            self.replace_locked(&mut manifest, &key, &gone, made, &mut Pacer::unpaced())?;
        }
        drop(manifest);
        self.remove_segment_files(&gone);
        for (lo, hi) in touched {
            self.record_change(&key, lo, hi);
        }
        Ok(removed)
    }

    /// Replaces segments `gone` of `key` by `made` (empty ones dropped) in one manifest commit.
    /// The files of `gone` stay until the caller deletes them ([`Self::remove_segment_files`]),
    /// after it lets go of the maintenance lock.
    fn replace_locked(
        &self,
        manifest: &mut Manifest,
        key: &TableKey,
        gone: &[u64],
        made: Vec<Segment>,
        pacer: &mut Pacer<'_>,
    ) -> Result<(), StoreError> {
        let mut stored = Vec::new();
        for seg in made.into_iter().filter(|s| s.rows() > 0) {
            stored.push(self.write_segment_file(seg, pacer)?);
        }
        let mut next = manifest.clone();
        next.segments.retain(|e| !gone.contains(&e.id));
        for s in &stored {
            next.segments.push(ManifestEntry {
                id: s.id,
                project: key.0,
                collection: key.1.clone(),
                rows: s.segment.rows(),
            });
        }
        self.commit_manifest(manifest, next)?;
        {
            let mut tables = self.tables.write().expect("tables lock");
            let table = tables.entry(key.clone()).or_default();
            let at = table
                .iter()
                .position(|s| gone.contains(&s.id))
                .unwrap_or(table.len());
            table.retain(|s| !gone.contains(&s.id));
            let at = at.min(table.len());
            table.splice(at..at, stored);
            if table.is_empty() {
                tables.remove(key);
            }
        }
        Ok(())
    }

    /// Deletes the files of segments no manifest names any more, bit by bit: a big segment
    /// deleted at once stalls the log's syncs on the same disk. It takes a sync per 16 MiB, so
    /// it runs outside the maintenance lock (flushes and delete requests need that lock). A
    /// crash part-way leaves a shorter file no manifest names, removed at the next open.
    fn remove_segment_files(&self, ids: &[u64]) {
        for id in ids {
            let _ = remove_file_gradually(&segment_path(&self.dir, *id), REMOVAL_STEP);
        }
    }

    fn write_segment_file(
        &self,
        segment: Segment,
        pacer: &mut Pacer<'_>,
    ) -> Result<Arc<StoredSegment>, StoreError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let path = segment_path(&self.dir, id);
        let mut buf = self.write_buf.lock().expect("write buffer lock");
        ChunkedFile::create(&path, &mut buf, self.config.direct_io)
            .and_then(|mut file| {
                segment.encode_to(&mut PacedWrite::new(&mut file, pacer, WRITE_CHUNK_BYTES))?;
                file.finish()
            })
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(Arc::new(StoredSegment {
            id,
            durable: true,
            segment,
        }))
    }

    fn commit_manifest(&self, current: &mut Manifest, mut next: Manifest) -> Result<(), StoreError> {
        next.version = 1;
        next.next_id = self.next_id.load(Ordering::Relaxed);
        let path = self.dir.join("manifest.json");
        let seg_dir = self.dir.join("segments");
        sync_dir(&seg_dir)
            .and_then(|()| write_atomically(&path, &serde_json::to_vec(&next).expect("manifest serialises")))
            .map_err(|source| StoreError::Io { path, source })?;
        *self.durable_position.lock().expect("position lock") = next.position;
        next.partitions
            .clone_into(&mut self.durable_partitions.lock().expect("position lock"));
        *current = next;
        Ok(())
    }

    /// Starts the background thread that flushes and merges; it stops when the handle is
    /// stopped or dropped (after one last flush).
    pub fn start_maintenance(self: &Arc<Self>) -> io::Result<Maintenance> {
        let stop = Arc::new(AtomicBool::new(false));
        let store = self.clone();
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("tally-store".into())
                .spawn(move || {
                    tally_core::worker::lower_priority(store.config.niceness);
                    let mut applied_cpus = None;
                    let tick = Duration::from_millis(20);
                    let mut waited = Duration::ZERO;
                    // Without the process stage's word (no CPUs kept for ingest), ingest is
                    // taken to be busy: resting costs an idle server only a later merge.
                    // A stop cuts the rests short: the last flush should not wait for them.
                    let ingest_busy = || {
                        !stop.load(Ordering::Acquire)
                            && store.config.cpus.as_ref().is_none_or(|c| c.is_ingest_busy())
                    };
                    loop {
                        if let Some(cpus) = &store.config.cpus {
                            cpus.follow(&mut applied_cpus);
                        }
                        let stopping = stop.load(Ordering::Acquire);
                        if stopping || waited >= store.config.flush_interval {
                            // A round rests at most one flush interval, and its rests count as
                            // waiting for the next round (see [`pace`]).
                            let mut pacer = if stopping {
                                Pacer::unpaced()
                            } else {
                                Pacer::new(&ingest_busy, store.config.flush_interval)
                            };
                            maintenance_step("flush", || store.flush_paced(&mut pacer));
                            if stopping {
                                return;
                            }
                            maintenance_step("merge of small segments", || {
                                store.merge_small_paced(&mut pacer)
                            });
                            waited = pacer.rested();
                            if !waited.is_zero() {
                                tracing::debug!(
                                    ms = waited.as_secs_f64() * 1e3,
                                    "event store: flush and merge rested"
                                );
                            }
                        }
                        std::thread::sleep(tick);
                        waited += tick;
                    }
                })?
        };
        Ok(Maintenance {
            stop,
            thread: Some(thread),
        })
    }
}

/// The size tier of a segment of `rows` rows: ⌊log_fan_in(rows)⌋. Segments of one tier differ
/// in size by less than `fan_in` times, and `fan_in` of them merged land at least one tier up.
///
/// Merging every small segment together instead rewrote the biggest of them at each merge
/// until it passed half the target. In 24 s of single events at 19,000–40,000 a second, merges
/// took 0.6–1.4 s per run on the store's thread that way, up to 0.56 s at once, against
/// 0.2–0.5 s in tiers ("Measured" in ARCHITECTURE.md, 2026-12-06, later).
fn size_tier(rows: usize, fan_in: usize) -> u32 {
    let (mut tier, mut left) = (0, rows);
    while left >= fan_in {
        left /= fan_in;
        tier += 1;
    }
    tier
}

/// Runs one step of the maintenance thread: its duration is logged at debug level when it
/// wrote segments (to line up with ingest's latency), a failure at error level (the next tick
/// tries again).
fn maintenance_step(what: &str, step: impl FnOnce() -> Result<usize, StoreError>) {
    let started = std::time::Instant::now();
    match step() {
        Ok(0) => {}
        Ok(segments) => tracing::debug!(
            segments,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "event store: {what} done"
        ),
        Err(e) => tracing::error!(error = %e, "event store: {what} failed; retrying"),
    }
}

/// The store's background thread.
#[derive(Debug)]
pub struct Maintenance {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Maintenance {
    /// Flushes once more and stops.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Maintenance {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join("segments").join(format!("{id:016x}.seg"))
}

impl EventSink for EventStore {
    fn write(&self, events: &[EnrichedEvent], log_position: u64) -> Result<(), SinkError> {
        self.add_events(events, |writes| writes.written_position = Some(log_position));
        Ok(())
    }

    fn committed_position(&self) -> Result<Option<u64>, SinkError> {
        Ok(*self.durable_position.lock().expect("position lock"))
    }

    fn write_partitioned(
        &self,
        events: &[EnrichedEvent],
        positions: &PartitionPositions,
    ) -> Result<(), SinkError> {
        self.add_events(events, |writes| {
            for (key, offset) in positions {
                writes.written_partitions.insert(key.clone(), *offset);
            }
        });
        Ok(())
    }

    fn written_partitions(&self) -> Result<PartitionPositions, SinkError> {
        Ok(self
            .writes
            .lock()
            .expect("writes lock")
            .written_partitions
            .clone())
    }

    fn durable_partitions(&self) -> Result<PartitionPositions, SinkError> {
        Ok(self.durable_partitions.lock().expect("position lock").clone())
    }
}

impl EventStore {
    /// Adds `events` as fresh segments and, under the same lock, records where they came from
    /// (`record`), so a flush commits both together.
    fn add_events(&self, events: &[EnrichedEvent], record: impl FnOnce(&mut WriteState)) {
        let mut groups: HashMap<(ProjectId, &str), Vec<&str>> = HashMap::new();
        for e in events {
            groups
                .entry((e.project, e.collection.as_str()))
                .or_default()
                .push(e.json.as_str());
        }
        // Each collection's events become one piece, built on the calling thread (the process
        // stage's). Building pieces on one thread per core instead gained nothing with both cores
        // free (`tally bench process --without-addons`: 220k-221k events/s against 227k-232k on
        // one thread), and with ingest running it cost ingest its tail: the batch half-rate
        // phase of `tally bench ingest` had 78-136 requests over 10 ms with it and 28-104
        // without, in three alternating runs of each.
        let pieces: Vec<(TableKey, Vec<&str>)> = groups
            .into_iter()
            .map(|((project, collection), texts)| ((project, collection.to_owned()), texts))
            .collect();
        let built: Vec<(Segment, usize)> = pieces
            .iter()
            .map(|(_, texts)| Segment::from_events(texts.iter().copied()))
            .collect();
        let mut made = Vec::with_capacity(pieces.len());
        for ((key, _), (segment, skipped)) in pieces.into_iter().zip(built) {
            if skipped > 0 {
                tracing::error!(
                    skipped,
                    "event store: events that are not JSON objects were not stored"
                );
            }
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            made.push((
                key,
                Arc::new(StoredSegment {
                    id,
                    durable: false,
                    segment,
                }),
            ));
        }
        let mut writes = self.writes.lock().expect("writes lock");
        {
            let mut tables = self.tables.write().expect("tables lock");
            for (key, seg) in &made {
                tables.entry(key.clone()).or_default().push(seg.clone());
            }
        }
        for (key, seg) in &made {
            if let Some((lo, hi)) = seg.segment.time_bounds() {
                self.record_change(key, lo, hi);
            }
        }
        writes.fresh.extend(made);
        record(&mut writes);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event(project: ProjectId, collection: &str, ts: &str, n: i64) -> EnrichedEvent {
        EnrichedEvent {
            project,
            collection: collection.into(),
            json: json!({"keen": {"timestamp": ts, "id": format!("{n:024x}")}, "n": n}).to_string(),
        }
    }

    fn count(store: &EventStore, p: ProjectId, c: &str) -> usize {
        store.snapshot(p, c).iter().map(|s| s.segment.rows()).sum()
    }

    #[test]
    fn writes_are_visible_at_once_and_durable_after_flush() {
        let dir = tempfile::tempdir().unwrap();
        let p = ProjectId::random();
        let store = EventStore::open(dir.path(), StoreConfig::default()).unwrap();
        store
            .write(
                &[
                    event(p, "a", "2026-01-01T00:00:00Z", 1),
                    event(p, "b", "2026-01-01T00:00:00Z", 2),
                ],
                100,
            )
            .unwrap();
        assert_eq!(count(&store, p, "a"), 1);
        assert_eq!(store.committed_position().unwrap(), None);
        store
            .write(&[event(p, "a", "2026-01-02T00:00:00Z", 3)], 200)
            .unwrap();
        assert_eq!(store.flush().unwrap(), 2);
        assert_eq!(store.committed_position().unwrap(), Some(200));
        assert_eq!(store.snapshot(p, "a").len(), 1, "fresh pieces merged into one");
        drop(store);
        let store = EventStore::open(dir.path(), StoreConfig::default()).unwrap();
        assert_eq!(count(&store, p, "a"), 2);
        assert_eq!(count(&store, p, "b"), 1);
        assert_eq!(store.committed_position().unwrap(), Some(200));
        assert_eq!(store.collections(p), vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn partition_offsets_are_committed_with_the_segments_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let p = ProjectId::random();
        let positions = |pairs: &[(&str, u64)]| -> PartitionPositions {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
        };
        let store = EventStore::open(dir.path(), StoreConfig::default()).unwrap();
        store
            .write_partitioned(
                &[event(p, "a", "2026-01-01T00:00:00Z", 1)],
                &positions(&[("log/0", 5)]),
            )
            .unwrap();
        store
            .write_partitioned(
                &[event(p, "a", "2026-01-01T00:00:00Z", 2)],
                &positions(&[("log/1", 9)]),
            )
            .unwrap();
        // Written, not yet durable: the stage carries on from the written offsets, the group is
        // told only the durable ones.
        assert_eq!(
            store.written_partitions().unwrap(),
            positions(&[("log/0", 5), ("log/1", 9)])
        );
        assert!(store.durable_partitions().unwrap().is_empty());
        store.flush().unwrap();
        assert_eq!(
            store.durable_partitions().unwrap(),
            positions(&[("log/0", 5), ("log/1", 9)])
        );
        // Unflushed at a crash: both the event and its offset are gone together.
        store
            .write_partitioned(
                &[event(p, "a", "2026-01-01T00:00:00Z", 3)],
                &positions(&[("log/0", 6)]),
            )
            .unwrap();
        drop(store);
        let store = EventStore::open(dir.path(), StoreConfig::default()).unwrap();
        assert_eq!(count(&store, p, "a"), 2);
        assert_eq!(
            store.written_partitions().unwrap(),
            positions(&[("log/0", 5), ("log/1", 9)])
        );
        assert_eq!(
            store.committed_position().unwrap(),
            None,
            "the embedded log's position is apart"
        );
        // A merge keeps them.
        store.merge_small().unwrap();
        drop(store);
        let store = EventStore::open(dir.path(), StoreConfig::default()).unwrap();
        assert_eq!(
            store.durable_partitions().unwrap(),
            positions(&[("log/0", 5), ("log/1", 9)])
        );
    }

    #[test]
    fn unflushed_events_are_not_durable_and_orphans_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = ProjectId::random();
        let store = EventStore::open(dir.path(), StoreConfig::default()).unwrap();
        store
            .write(&[event(p, "a", "2026-01-01T00:00:00Z", 1)], 10)
            .unwrap();
        store.flush().unwrap();
        store
            .write(&[event(p, "a", "2026-01-01T00:00:00Z", 2)], 20)
            .unwrap();
        std::fs::write(dir.path().join("segments/00000000000000ff.seg"), b"half").unwrap();
        drop(store);
        let store = EventStore::open(dir.path(), StoreConfig::default()).unwrap();
        assert_eq!(count(&store, p, "a"), 1);
        assert_eq!(store.committed_position().unwrap(), Some(10));
        // A flush before anything is written keeps the position (a crash then must not send
        // the process stage back to an older one).
        store.flush().unwrap();
        drop(store);
        let store = EventStore::open(dir.path(), StoreConfig::default()).unwrap();
        assert_eq!(store.committed_position().unwrap(), Some(10));
        assert!(!dir.path().join("segments/00000000000000ff.seg").exists());
    }

    #[test]
    fn changes_are_tracked_by_time_range_and_not_by_flushes_or_merges() {
        let dir = tempfile::tempdir().unwrap();
        let p = ProjectId::random();
        let config = StoreConfig {
            merge_min_segments: 2,
            ..StoreConfig::default()
        };
        let store = EventStore::open(dir.path(), config.clone()).unwrap();
        let v0 = store.data_version(p, "a");
        assert_eq!(store.changes_since(p, "a", v0), Changes::None);
        store
            .write(&[event(p, "a", "2026-01-01T00:00:00Z", 1)], 10)
            .unwrap();
        store
            .write(&[event(p, "a", "2026-01-03T00:00:00Z", 2)], 20)
            .unwrap();
        let jan1 = tally_core::time::parse_timestamp_ms("2026-01-01T00:00:00Z").unwrap();
        let jan3 = tally_core::time::parse_timestamp_ms("2026-01-03T00:00:00Z").unwrap();
        let v2 = store.data_version(p, "a");
        assert_eq!(
            store.changes_since(p, "a", v0),
            Changes::Ranges(vec![(jan1, jan1), (jan3, jan3)])
        );
        assert!(store.changes_since(p, "a", v0).touches(jan3, jan3 + 1));
        assert!(!store.changes_since(p, "a", v0).touches(jan1 + 1, jan3));
        assert_eq!(
            store.changes_since(p, "b", store.data_version(p, "b")),
            Changes::None
        );
        store.flush().unwrap();
        store
            .write(&[event(p, "a", "2026-01-01T00:00:00Z", 3)], 30)
            .unwrap();
        store.flush().unwrap();
        store.merge_small().unwrap();
        assert_eq!(
            store.changes_since(p, "a", v2),
            Changes::Ranges(vec![(jan1, jan1)])
        );
        let v3 = store.data_version(p, "a");
        store
            .rewrite(p, "a", |seg| Some(seg.retain_rows(|_| false)))
            .unwrap();
        assert!(store.changes_since(p, "a", v3).touches(jan1, jan1 + 1));
        drop(store);
        let store = EventStore::open(dir.path(), config).unwrap();
        assert_eq!(store.changes_since(p, "a", v3), Changes::Unknown, "another epoch");
    }

    #[test]
    fn size_tiers_are_powers_of_the_fan_in() {
        let tiers: Vec<u32> = [0, 1, 7, 8, 63, 64, 511, 512]
            .iter()
            .map(|&r| size_tier(r, 8))
            .collect();
        assert_eq!(tiers, [0, 0, 0, 1, 1, 2, 2, 3]);
        assert_eq!(size_tier(20_000, 8), 4);
        assert_eq!(size_tier(160_000, 8), 5);
    }

    #[test]
    fn only_segments_of_one_size_tier_are_merged() {
        let dir = tempfile::tempdir().unwrap();
        let p = ProjectId::random();
        let config = StoreConfig {
            merge_min_segments: 4,
            ..StoreConfig::default()
        };
        let store = EventStore::open(dir.path(), config).unwrap();
        let mut position = 0;
        let mut flush_one = |i: i64| {
            position += 10;
            store
                .write(&[event(p, "a", "2026-01-01T00:00:00Z", i)], position)
                .unwrap();
            store.flush().unwrap();
        };
        let sizes = |store: &EventStore| -> Vec<usize> {
            store.snapshot(p, "a").iter().map(|s| s.segment.rows()).collect()
        };
        for i in 0..4 {
            flush_one(i);
        }
        assert_eq!(store.merge_small().unwrap(), 1);
        assert_eq!(sizes(&store), [4]);
        // Three new one-row segments beside the 4-row one: four small segments, but not four
        // of one tier, so the merged one is not rewritten.
        for i in 4..7 {
            flush_one(i);
        }
        assert_eq!(store.merge_small().unwrap(), 0);
        assert_eq!(sizes(&store), [4, 1, 1, 1]);
        flush_one(7);
        assert_eq!(store.merge_small().unwrap(), 1);
        assert_eq!(sizes(&store), [4, 4]);
        for i in 8..16 {
            flush_one(i);
            store.merge_small().unwrap();
        }
        assert_eq!(sizes(&store), [4, 4, 4, 4]);
        // Four segments of tier 1 (4 to 15 rows) make one of 16, at the next pass.
        assert_eq!(store.merge_small().unwrap(), 1);
        assert_eq!(sizes(&store), [16]);
        assert_eq!(count(&store, p, "a"), 16);
    }

    #[test]
    fn merging_and_rewriting_keep_exact_counts() {
        let dir = tempfile::tempdir().unwrap();
        let p = ProjectId::random();
        let config = StoreConfig {
            merge_min_segments: 3,
            ..StoreConfig::default()
        };
        let store = EventStore::open(dir.path(), config.clone()).unwrap();
        for i in 0..10 {
            store
                .write(&[event(p, "a", "2026-01-01T00:00:00Z", i)], (i as u64 + 1) * 10)
                .unwrap();
            store.flush().unwrap();
        }
        assert_eq!(store.snapshot(p, "a").len(), 10);
        assert_eq!(store.merge_small().unwrap(), 1);
        assert_eq!(store.snapshot(p, "a").len(), 1);
        assert_eq!(count(&store, p, "a"), 10);
        let removed = store
            .rewrite(p, "a", |seg| {
                let col = seg.column("n").unwrap();
                Some(seg.retain_rows(|r| col.nums()[r] >= 5.0))
            })
            .unwrap();
        assert_eq!(removed, 5);
        drop(store);
        let store = EventStore::open(dir.path(), config).unwrap();
        assert_eq!(count(&store, p, "a"), 5);
        assert_eq!(std::fs::read_dir(dir.path().join("segments")).unwrap().count(), 1);
        store.rewrite(p, "a", |_| Some(Segment::default())).unwrap();
        assert!(store.collections(p).is_empty());
    }
}
