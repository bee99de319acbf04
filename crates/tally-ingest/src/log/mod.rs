//! The embedded event log: append-only segment files with group-commit fsync.
//!
//! Layout under the log directory:
//!
//! ```text
//! segments/00000000000000000000.log   records from position 0
//! segments/00000000000134217800.log   the next segment, named by its first position
//! consumed                            the position the process stage has committed
//! ```
//!
//! A position is a byte offset in the whole log (segment base + offset in the file), so a reader
//! seeks straight to it. Records are framed with a checksum ([`frame`]).
//!
//! **Durability.** One writer thread owns the active segment. [`EmbeddedEventLog::append`]
//! encodes the records on the caller's thread and queues them; the writer takes everything
//! queued, writes it, calls `fdatasync` once, and only then resolves every append in the group.
//! Concurrent requests therefore share one fsync (group commit), and no append is acknowledged
//! before its bytes are on disk. If a write or sync fails, the log stops accepting appends: after
//! a failed fsync the state of the page cache is unknown, and continuing could acknowledge lost
//! data. A restart recovers. After a busy group the writer may wait for more appends to gather
//! before taking the next, when a trial shows that commits them faster ([`linger`]).
//!
//! **Pre-zeroed segments.** Segment files are filled with zeros to their full size before they
//! are written to (a helper thread prepares the next one while the current one fills), so an
//! append overwrites allocated blocks and `fdatasync` writes no file-size change (only, on the
//! development machine's journal-less ext4, the inode's new mtime now and then): measured here,
//! 111 µs instead of 176 µs per sync, and a third less CPU.
//! The end of the data is therefore not the file's length but the first frame that does not
//! validate (zeros never do).
//!
//! **Recovery.** On open, the last segment is scanned up to the first frame that is incomplete or
//! fails its checksum: that can only be a write that was never acknowledged. Everything after it
//! that is not zero is zeroed, so that no stale fragment of that unacknowledged write can ever
//! line up behind records appended later.
//!
//! **Bounds.** Appends are refused with [`LogError::Overloaded`] when the bytes queued but not yet
//! durable exceed `max_pending_bytes`, or when the process stage is more than
//! `max_unconsumed_bytes` behind; the server answers 503 with `Retry-After` instead of growing
//! without limit.

mod direct;
pub mod frame;
mod linger;
mod reader;

use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tally_core::config::LogConfig;
use tally_core::event::AcceptedEvent;
use tally_core::fsutil::{REMOVAL_STEP, open_maybe_direct, remove_file_gradually};
use tally_core::log::{BoxFuture, EventLog, LogError, LogStatus};
use tally_core::senders::Senders;
use tokio::sync::oneshot;

use self::linger::LingerTrial;

use direct::PageWriter;
pub use reader::{LogEntry, LogReader};

/// The most bytes one group commit writes before syncing; bounds the latency of the first
/// append in a large group.
const MAX_GROUP_BYTES: usize = 32 * 1024 * 1024;

/// A group commit at least this long (seconds) is logged at debug level, to line up with
/// clients' slow acknowledgements.
const SLOW_COMMIT_SECONDS: f64 = 0.01;

/// What recovery found when the log was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The end of the valid log.
    pub durable_end: u64,
    /// Bytes cut from a torn tail.
    pub cut_bytes: u64,
}

/// Metrics of the log writer.
#[derive(Debug, Clone)]
struct LogMetrics {
    fsync_seconds: Histogram,
    /// The whole of each group commit as its appenders wait for it: a segment roll if one is
    /// due, the write, the sync. Its tail is the log's share of acknowledgement latency.
    commit_seconds: Histogram,
    /// Time each segment roll took (waiting for the pre-zeroed file, rename, directory sync):
    /// a roll happens inside one group's commit, so it lands whole in that group's latency.
    roll_seconds: Histogram,
    group_records: Histogram,
    bytes_written: Counter,
    /// Times the writer waited for more appends before taking a group ([`linger`]).
    lingers: Counter,
}

impl LogMetrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            fsync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            commit_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            roll_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            group_records: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            bytes_written: Counter::default(),
            lingers: Counter::default(),
        };
        registry.register(
            "tally_log_fsync_seconds",
            "Time of each group-commit fdatasync of the embedded event log",
            metrics.fsync_seconds.clone(),
        );
        registry.register(
            "tally_log_group_commit_seconds",
            "Time of each group commit of the embedded event log (roll if due, write, fdatasync)",
            metrics.commit_seconds.clone(),
        );
        registry.register(
            "tally_log_roll_seconds",
            "Time of each segment roll of the embedded event log",
            metrics.roll_seconds.clone(),
        );
        registry.register(
            "tally_log_group_commit_records",
            "Records made durable by one fsync",
            metrics.group_records.clone(),
        );
        registry.register(
            "tally_log_written_bytes",
            "Bytes written to the embedded event log",
            metrics.bytes_written.clone(),
        );
        registry.register(
            "tally_log_group_commit_lingers",
            "Times the log writer waited for more appends before a group commit (log.group_commit_linger_us)",
            metrics.lingers.clone(),
        );
        metrics
    }
}

/// State shared by the appenders, the writer thread and readers.
#[derive(Debug)]
struct Shared {
    /// End of the durable log: readers may read up to here, and it is what appends resolve with.
    durable_end: Arc<AtomicU64>,
    /// Position of the first byte still on disk.
    first_retained: AtomicU64,
    /// What the process stage has committed.
    consumed: AtomicU64,
    /// Bytes queued for the writer and not yet durable.
    pending_bytes: AtomicU64,
    /// Set when a write or sync failed; every later append is refused.
    failed: AtomicBool,
}

/// A queued append.
struct AppendRequest {
    frames: Vec<u8>,
    records: usize,
    reply: oneshot::Sender<Result<u64, LogError>>,
}

/// The embedded, file-based [`EventLog`].
#[derive(Debug)]
pub struct EmbeddedEventLog {
    dir: PathBuf,
    config: LogConfig,
    shared: Arc<Shared>,
    sender: Mutex<Option<mpsc::Sender<AppendRequest>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    recovery: RecoveryReport,
    /// Whether the active segment was opened with `O_DIRECT` (`log.direct_io`, on a file
    /// system that allows it).
    writes_directly: bool,
    /// When the consumed position was last written to disk.
    consumed_persisted: Mutex<Option<Instant>>,
}

fn segments_dir(dir: &Path) -> PathBuf {
    dir.join("segments")
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    segments_dir(dir).join(format!("{base:020}.log"))
}

/// The first position still on disk in the log at `dir` (older segments may have been removed by
/// retention), for offline readers such as `tally log dump`.
pub fn first_position(dir: &Path) -> io::Result<u64> {
    Ok(list_segments(dir)?.first().copied().unwrap_or(0))
}

/// The bases of the segment files in `dir`, ascending.
fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(segments_dir(dir))? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(base) = name.strip_suffix(".log").and_then(|b| b.parse::<u64>().ok()) {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

pub(crate) use tally_core::fsutil::{sync_dir, write_atomically};

/// Where a segment no reader needs waits to be deleted (no longer `*.log`, so no longer part of
/// the log).
fn retired_path(dir: &Path, base: u64) -> PathBuf {
    segments_dir(dir).join(format!("{base:020}.log.retired"))
}

/// Deletes retired segments, a piece at a time.
fn remove_retired_segments(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(segments_dir(dir))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "retired") {
            remove_file_gradually(&path, REMOVAL_STEP)?;
        }
    }
    Ok(())
}

/// The file a helper thread zero-fills for the next roll.
fn prepared_path(dir: &Path) -> PathBuf {
    segments_dir(dir).join("next.prepared")
}

static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// The page size writes are padded to (see [`Writer::write_group`]).
const PAGE: u64 = direct::PAGE as u64;

/// Creates the next segment file, filled with `bytes` zeros and synced.
///
/// The zeros are written with `O_DIRECT` from one aligned buffer: no copy through the page cache
/// and no dirty pages whose flushing would queue in front of the active segment's group-commit
/// syncs (measured: ack p99 spikes when the preparer went through the cache). Where the file
/// system refuses `O_DIRECT` (tmpfs), ordinary writes are used.
fn prepare_segment(dir: &Path, bytes: u64) -> io::Result<PathBuf> {
    let path = prepared_path(dir);
    let (mut file, aligned) = open_maybe_direct(
        OpenOptions::new().write(true).create(true).truncate(true),
        &path,
        true,
    )?;
    // 1 MiB of zeros, aligned as O_DIRECT requires.
    let zeros = direct::AlignedBuf::zeroed(ZEROS.len());
    let mut written = 0u64;
    // O_DIRECT writes whole aligned blocks; the file is sized exactly afterwards.
    let target = if aligned {
        bytes.div_ceil(PAGE) * PAGE
    } else {
        bytes
    };
    while written < target {
        let n = (target - written).min(zeros.len() as u64) as usize;
        match file.write(&zeros.as_slice()[..n]) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "zero-filling a segment")),
            Ok(k) => written += k as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    file.set_len(bytes)?;
    file.sync_all()?;
    Ok(path)
}

fn spawn_prepare(dir: PathBuf, bytes: u64) -> JoinHandle<io::Result<PathBuf>> {
    std::thread::Builder::new()
        .name("tally-log-prepare".into())
        .spawn(move || prepare_segment(&dir, bytes))
        .expect("spawning the segment preparer")
}

/// Zeroes every non-zero byte of `file` from `from` on; returns how far past `from` the last
/// non-zero byte was (0 when the tail was already clean).
fn zero_after(file: &File, from: u64) -> io::Result<u64> {
    let len = file.metadata()?.len();
    let mut buf = vec![0u8; ZEROS.len()];
    let mut at = from;
    let mut dirty_end = from;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        if let Some(last) = buf[..n].iter().rposition(|b| *b != 0) {
            file.write_all_at(&ZEROS[..n], at)?;
            dirty_end = at + last as u64 + 1;
        }
        at += n as u64;
    }
    if dirty_end > from {
        file.sync_all()?;
    }
    Ok(dirty_end - from)
}

impl EmbeddedEventLog {
    /// Opens (creating if needed) the log in `dir`, recovers it, and starts the writer thread.
    pub fn open(dir: &Path, config: LogConfig, registry: &mut Registry) -> io::Result<Self> {
        Self::open_for(dir, config, registry, None)
    }

    /// [`EmbeddedEventLog::open`], for a server whose HTTP layer counts its `senders`: while most
    /// of them send on their own clock, the writer lets appends gather after a busy group (see
    /// [`linger`]).
    pub fn open_for(
        dir: &Path,
        config: LogConfig,
        registry: &mut Registry,
        senders: Option<Arc<Senders>>,
    ) -> io::Result<Self> {
        fs::create_dir_all(segments_dir(dir))?;
        let _ = fs::remove_file(prepared_path(dir));
        remove_retired_segments(dir)?;
        let mut bases = list_segments(dir)?;
        if bases.is_empty() {
            let prepared = prepare_segment(dir, config.segment_bytes)?;
            fs::rename(prepared, segment_path(dir, 0))?;
            sync_dir(&segments_dir(dir))?;
            bases.push(0);
        }
        let last_base = *bases.last().expect("at least one segment");
        let last_path = segment_path(dir, last_base);
        let scanned = OpenOptions::new().read(true).write(true).open(&last_path)?;
        let valid = frame::scan_valid_len(&scanned)?;
        let cut_bytes = zero_after(&scanned, valid)?;
        drop(scanned);
        if cut_bytes > 0 {
            tracing::warn!(
                segment = %last_path.display(),
                cut_bytes,
                "event log: zeroed a torn tail left by a crash (never acknowledged)"
            );
        }
        let (mut active, direct) = direct::open_segment(&last_path, true, config.direct_io)?;
        let pages = if direct {
            Some(PageWriter::new(&active, valid)?)
        } else {
            active.seek(SeekFrom::Start(valid))?;
            None
        };
        tracing::debug!(
            direct,
            "event log: segments written {}",
            if direct {
                "with O_DIRECT"
            } else {
                "through the page cache"
            }
        );
        let durable_end = last_base + valid;
        let consumed = match fs::read_to_string(dir.join("consumed")) {
            Ok(text) => text.trim().parse::<u64>().map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("bad consumed position: {e}"))
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => bases[0],
            Err(e) => return Err(e),
        }
        .clamp(bases[0], durable_end);

        let shared = Arc::new(Shared {
            durable_end: Arc::new(AtomicU64::new(durable_end)),
            first_retained: AtomicU64::new(bases[0]),
            consumed: AtomicU64::new(consumed),
            pending_bytes: AtomicU64::new(0),
            failed: AtomicBool::new(false),
        });
        let metrics = LogMetrics::register(registry);
        let (sender, receiver) = mpsc::channel();
        let writer = Writer {
            dir: dir.to_path_buf(),
            segment_bytes: config.segment_bytes,
            direct_io: config.direct_io,
            linger: LingerTrial::new(Duration::from_micros(config.group_commit_linger_us)),
            senders,
            active,
            pages,
            active_base: last_base,
            active_len: valid,
            spare: Some(spawn_prepare(dir.to_path_buf(), config.segment_bytes)),
            shared: shared.clone(),
            metrics,
        };
        let handle = std::thread::Builder::new()
            .name("tally-log-writer".into())
            .spawn(move || writer.run(receiver))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            shared,
            sender: Mutex::new(Some(sender)),
            writer: Mutex::new(Some(handle)),
            recovery: RecoveryReport {
                durable_end,
                cut_bytes,
            },
            writes_directly: direct,
            consumed_persisted: Mutex::new(None),
        })
    }

    /// Whether appends go to the disk with `O_DIRECT`: `log.direct_io` asked for it and the
    /// file system allowed it when the log was opened (tmpfs refuses it; the log then writes
    /// through the page cache).
    pub fn writes_directly(&self) -> bool {
        self.writes_directly
    }

    /// What recovery found on open.
    pub fn recovery(&self) -> RecoveryReport {
        self.recovery
    }

    /// A reader starting at `from` that sees only durable records (with `O_DIRECT` when the
    /// log is written that way: the records are not in the page cache).
    pub fn reader(&self, from: u64) -> LogReader {
        LogReader::new(&self.dir, from, Some(self.shared.durable_end.clone())).direct(self.config.direct_io)
    }

    /// Records that the process stage has consumed everything before `position`. The in-memory
    /// position (back-pressure, retention) moves at once; the file is rewritten at most once a
    /// second. That is safe because the store records its own position atomically with its data
    /// and the stage resumes from that; this file only lets retention and the lag metric survive
    /// a restart, where being a second behind costs nothing.
    pub fn commit_consumed(&self, position: u64) -> io::Result<()> {
        let position = position.min(self.shared.durable_end.load(Ordering::Acquire));
        self.shared.consumed.store(position, Ordering::Release);
        let mut last = self.consumed_persisted.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
            write_atomically(&self.dir.join("consumed"), position.to_string().as_bytes())?;
            *last = Some(Instant::now());
        }
        Ok(())
    }

    /// Writes the consumed position to disk now (on shutdown).
    pub fn persist_consumed(&self) -> io::Result<()> {
        let position = self.shared.consumed.load(Ordering::Acquire);
        write_atomically(&self.dir.join("consumed"), position.to_string().as_bytes())
    }

    /// Deletes whole segments that lie entirely before `position`; the active segment is never
    /// deleted. Callers pass the oldest position anything still needs (the consumed position,
    /// and where de-duplication would replay from).
    ///
    /// A segment leaves the log by a rename (`N.log` to `N.log.retired`, synced) and is then
    /// deleted a piece at a time ([`remove_file_gradually`]: a 64 MiB file freed at once would
    /// stall the group commits' syncs on the same disk); retired files a crash left are deleted
    /// at the next open.
    pub fn retain_from(&self, position: u64) -> io::Result<u64> {
        let bases = list_segments(&self.dir)?;
        let mut removed = 0;
        for pair in bases.windows(2) {
            let (base, next_base) = (pair[0], pair[1]);
            if next_base <= position {
                fs::rename(segment_path(&self.dir, base), retired_path(&self.dir, base))?;
                removed += next_base - base;
                self.shared.first_retained.store(next_base, Ordering::Release);
            }
        }
        if removed > 0 {
            sync_dir(&segments_dir(&self.dir))?;
            remove_retired_segments(&self.dir)?;
        }
        Ok(removed)
    }

    /// Stops accepting appends, lets the writer finish what is queued, and waits for it.
    pub fn close(&self) {
        self.sender.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = handle.join();
        }
    }

    fn check_bounds(&self, new_bytes: u64) -> Result<(), LogError> {
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(LogError::Io(
                "the event log failed to write earlier and accepts nothing until restarted".into(),
            ));
        }
        let pending = self.shared.pending_bytes.load(Ordering::Acquire);
        if pending > 0 && pending + new_bytes > self.config.max_pending_bytes {
            return Err(LogError::Overloaded {
                reason: "too many writes waiting for disk",
                retry_after_secs: 1,
            });
        }
        let status = self.status();
        if status.lag_bytes() > self.config.max_unconsumed_bytes {
            return Err(LogError::Overloaded {
                reason: "the process stage is too far behind",
                retry_after_secs: 5,
            });
        }
        Ok(())
    }
}

impl Drop for EmbeddedEventLog {
    fn drop(&mut self) {
        self.close();
    }
}

impl EventLog for EmbeddedEventLog {
    fn append(&self, events: &[AcceptedEvent]) -> BoxFuture<'static, Result<u64, LogError>> {
        let mut frames = Vec::with_capacity(
            events
                .iter()
                .map(|e| 64 + e.collection.len() + e.keen_json.len() + e.body_json.len())
                .sum(),
        );
        for event in events {
            frame::write_frame_with(&mut frames, |out| event.encode_into(out));
        }
        let len = frames.len() as u64;
        if let Err(e) = self.check_bounds(len) {
            return Box::pin(std::future::ready(Err(e)));
        }
        let (reply, answer) = oneshot::channel();
        let request = AppendRequest {
            frames,
            records: events.len(),
            reply,
        };
        self.shared.pending_bytes.fetch_add(len, Ordering::AcqRel);
        let sent = match self.sender.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(sender) => sender.send(request).is_ok(),
            None => false,
        };
        if !sent {
            self.shared.pending_bytes.fetch_sub(len, Ordering::AcqRel);
            return Box::pin(std::future::ready(Err(LogError::Closed)));
        }
        Box::pin(async move { answer.await.unwrap_or(Err(LogError::Closed)) })
    }

    fn status(&self) -> LogStatus {
        let durable_end = self.shared.durable_end.load(Ordering::Acquire);
        LogStatus {
            durable_end,
            consumed: self.shared.consumed.load(Ordering::Acquire),
            retained_bytes: durable_end - self.shared.first_retained.load(Ordering::Acquire),
            pending_bytes: self.shared.pending_bytes.load(Ordering::Acquire),
        }
    }
}

/// Writes every request's frames, then `padding` (zeros), with as few `writev` calls as the
/// kernel allows (one per group in practice) instead of one `write` per request.
fn write_all_vectored(file: &mut File, group: &[AppendRequest], padding: &[u8]) -> io::Result<()> {
    const MAX_IOVECS: usize = 1024;
    let chunks = group.len().div_ceil(MAX_IOVECS);
    for (i, chunk) in group.chunks(MAX_IOVECS).enumerate() {
        let mut slices: Vec<IoSlice<'_>> = chunk.iter().map(|r| IoSlice::new(&r.frames)).collect();
        if i + 1 == chunks && !padding.is_empty() {
            slices.push(IoSlice::new(padding));
        }
        let mut remaining = &mut slices[..];
        while !remaining.is_empty() {
            match file.write_vectored(remaining) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "event log write returned 0",
                    ));
                }
                Ok(n) => IoSlice::advance_slices(&mut remaining, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// The writer thread: the only code that writes segment files.
struct Writer {
    dir: PathBuf,
    segment_bytes: u64,
    /// Whether to open segments with `O_DIRECT` (`log.direct_io`).
    direct_io: bool,
    /// Whether to let appends gather before the next group (`log.group_commit_linger_us`).
    linger: LingerTrial,
    /// The HTTP layer's counts of its clients, when it keeps them: lingering is free for
    /// clients that send on their own clock.
    senders: Option<Arc<Senders>>,
    active: File,
    /// How groups are written when `active` was opened with `O_DIRECT`; `None`: through the
    /// page cache.
    pages: Option<PageWriter>,
    active_base: u64,
    active_len: u64,
    /// The zero-filled file being prepared for the next roll.
    spare: Option<JoinHandle<io::Result<PathBuf>>>,
    shared: Arc<Shared>,
    metrics: LogMetrics,
}

impl Writer {
    fn run(mut self, receiver: mpsc::Receiver<AppendRequest>) {
        let mut group: Vec<AppendRequest> = Vec::new();
        let mut last_group_requests = 0;
        // recv() fails once every sender is gone and the queue is drained: a clean shutdown.
        while let Ok(first) = receiver.recv() {
            let own_clocks = self
                .senders
                .as_ref()
                .is_some_and(|s| s.mostly_waiting_on_their_own_clock());
            if let Some(linger) = self
                .linger
                .before_group(last_group_requests, own_clocks, Instant::now())
            {
                self.metrics.lingers.inc();
                std::thread::sleep(linger);
            }
            let mut group_bytes = first.frames.len();
            group.push(first);
            while group_bytes < MAX_GROUP_BYTES {
                match receiver.try_recv() {
                    Ok(next) => {
                        group_bytes += next.frames.len();
                        group.push(next);
                    }
                    Err(_) => break,
                }
            }
            last_group_requests = group.len();
            self.commit(&mut group, group_bytes as u64);
            self.linger.committed(last_group_requests, Instant::now());
        }
        if let Some(spare) = self.spare.take() {
            let _ = spare.join();
        }
    }

    fn commit(&mut self, group: &mut Vec<AppendRequest>, group_bytes: u64) {
        let start = self.shared.durable_end.load(Ordering::Acquire);
        let outcome = if self.shared.failed.load(Ordering::Acquire) {
            Err(LogError::Io("the event log failed earlier".into()))
        } else {
            self.write_group(group, group_bytes).map_err(|e| {
                tracing::error!(error = %e, "event log write failed; refusing further appends until restart");
                self.shared.failed.store(true, Ordering::Release);
                LogError::Io(e.to_string())
            })
        };
        self.shared.pending_bytes.fetch_sub(group_bytes, Ordering::AcqRel);
        let mut end = start;
        for request in group.drain(..) {
            end += request.frames.len() as u64;
            let _ = request.reply.send(outcome.clone().map(|()| end));
        }
    }

    fn write_group(&mut self, group: &[AppendRequest], group_bytes: u64) -> io::Result<()> {
        let commit_started = Instant::now();
        if self.active_len > 0 && self.active_len + group_bytes > self.segment_bytes {
            self.roll()?;
            self.metrics
                .roll_seconds
                .observe(commit_started.elapsed().as_secs_f64());
        }
        let before = self.active_len;
        // The group is followed by zeros up to the next page boundary (inside the file), and the
        // next group starts where the data ends. The file holds zeros there already, so this
        // changes nothing on disk. With O_DIRECT ([`PageWriter`]) whole pages are the unit of
        // transfer anyway. Through the page cache, it means no write covers part of a page the
        // cache does not hold: the zero-filled segment's pages are not cached, and a partial
        // write into one made the kernel read that block from disk first, inside the writer's
        // critical path (a 5 s sched_switch sample: 1,534 of the writer's 6,714 waits).
        let end = before + group_bytes;
        let padding = ((PAGE - end % PAGE) % PAGE).min(self.segment_bytes.saturating_sub(end)) as usize;
        let written = (|| {
            match &mut self.pages {
                Some(pages) => pages.write(&self.active, before, group.iter().map(|r| &r.frames[..]))?,
                None => {
                    write_all_vectored(&mut self.active, group, &ZEROS[..padding])?;
                    if padding > 0 {
                        self.active.seek(SeekFrom::Start(end))?;
                    }
                }
            }
            let started = Instant::now();
            self.active.sync_data()?;
            self.metrics
                .fsync_seconds
                .observe(started.elapsed().as_secs_f64());
            Ok(())
        })();
        if let Err(e) = written {
            // Take back what may have been written so that nothing unacknowledged sits before
            // what a restart would append.
            let _ = self.active.set_len(before);
            return Err(e);
        }
        let records: usize = group.iter().map(|r| r.records).sum();
        let commit_seconds = commit_started.elapsed().as_secs_f64();
        self.metrics.commit_seconds.observe(commit_seconds);
        if commit_seconds >= SLOW_COMMIT_SECONDS {
            tracing::debug!(
                commit_ms = commit_seconds * 1e3,
                records,
                bytes = group_bytes,
                "event log: slow group commit"
            );
        }
        self.metrics.group_records.observe(records as f64);
        self.metrics.bytes_written.inc_by(group_bytes);
        self.active_len += group_bytes;
        self.shared
            .durable_end
            .store(self.active_base + self.active_len, Ordering::Release);
        Ok(())
    }

    fn roll(&mut self) -> io::Result<()> {
        let base = self.active_base + self.active_len;
        let path = segment_path(&self.dir, base);
        let prepared = self.spare.take().map(|spare| spare.join());
        match prepared {
            Some(Ok(Ok(prepared))) => fs::rename(prepared, &path)?,
            other => {
                // Not fatal: an empty file works, each sync is just slower until the next roll.
                tracing::warn!(
                    ?other,
                    "event log: no pre-zeroed segment ready; rolling onto an empty file"
                );
                File::create_new(&path)?;
            }
        }
        sync_dir(&segments_dir(&self.dir))?;
        let (file, direct) = direct::open_segment(&path, true, self.direct_io)?;
        self.pages = match (direct, self.pages.take()) {
            (false, _) => None,
            (true, Some(mut pages)) => {
                pages.reset(&file, 0)?;
                Some(pages)
            }
            (true, None) => Some(PageWriter::new(&file, 0)?),
        };
        if self.spare.is_none() {
            self.spare = Some(spawn_prepare(self.dir.clone(), self.segment_bytes));
        }
        self.active = file;
        self.active_base = base;
        self.active_len = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
