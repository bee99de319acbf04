//! Sequential reading of the embedded log.
//!
//! A reader inside the server is bounded by the log's durable end, so it never sees a record that
//! a crash could still take back. An offline reader (`tally log dump`) has no bound and stops at
//! the end of the valid records instead.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::direct::{AlignedBuf, PAGE, SegmentFile};
use super::frame::{FRAME_HEADER_BYTES, MAX_RECORD_BYTES, frame_len, read_frame};
use super::{list_segments, segment_path};

/// One record read from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Where the record starts.
    pub position: u64,
    /// Where the next record starts: commit this once the record is handled.
    pub next: u64,
    /// The record payload.
    pub payload: Vec<u8>,
}

/// Reads records in order from a starting position.
#[derive(Debug)]
pub struct LogReader {
    dir: PathBuf,
    position: u64,
    limit: Option<Arc<AtomicU64>>,
    /// Open segments with `O_DIRECT` (where allowed).
    direct: bool,
    /// The segment being read, and its base.
    open: Option<(u64, SegmentFile)>,
    /// Where reads land, reused from read to read and segment to segment (a fresh multi-MiB
    /// buffer per batch costs page faults).
    buf: AlignedBuf,
}

impl LogReader {
    /// A reader of the log in `dir` starting at `from`, reading at most up to `limit` when given.
    pub fn new(dir: &Path, from: u64, limit: Option<Arc<AtomicU64>>) -> Self {
        Self {
            dir: dir.to_path_buf(),
            position: from,
            limit,
            direct: false,
            open: None,
            buf: AlignedBuf::zeroed(PAGE),
        }
    }

    /// The same reader, reading segments with `O_DIRECT` (past the page cache) when `direct` and
    /// the file system allows it: for records written that way, which the cache does not hold.
    pub fn direct(mut self, direct: bool) -> Self {
        self.direct = direct;
        self
    }

    /// A reader with no bound, for a log no server is writing (or for looking at one that is:
    /// it stops at the first incomplete record).
    pub fn offline(dir: &Path, from: u64) -> Self {
        Self::new(dir, from, None)
    }

    /// The position of the next record to read.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Reads up to about `max_bytes` of records (at least one record if any is available). An
    /// empty result means the reader is at the end for now.
    pub fn read_batch(&mut self, max_bytes: usize) -> io::Result<Vec<LogEntry>> {
        let mut entries = Vec::new();
        let mut read_bytes = 0;
        let limit = self.limit.as_ref().map(|l| l.load(Ordering::Acquire));
        while read_bytes < max_bytes {
            if limit.is_some_and(|limit| self.position >= limit) {
                break;
            }
            let Some(base) = self.open_segment_for_position()? else {
                break;
            };
            let position = self.position;
            let file = &self.open.as_ref().expect("just opened").1;
            let mut end = base + file.len()?;
            if let Some(limit) = limit {
                end = end.min(limit);
            }
            if position >= end {
                break;
            }
            let want = ((end - position) as usize).min(max_bytes - read_bytes + MAX_RECORD_BYTES / 16);
            let range = file.read(&mut self.buf, position - base, want.max(FRAME_HEADER_BYTES))?;
            let buf = &self.buf.as_slice()[range];
            let mut at = 0;
            while let Some((payload, len)) = read_frame(&buf[at..]) {
                entries.push(LogEntry {
                    position: position + at as u64,
                    next: position + (at + len) as u64,
                    payload: payload.to_vec(),
                });
                at += len;
                read_bytes += len;
                if read_bytes >= max_bytes {
                    break;
                }
            }
            if at == 0 {
                // The frame did not fit in the read: read exactly it, if it is whole.
                // A frame reaching past the durable end is not durable yet (the durable end is
                // always a frame boundary, so this is only a guard).
                let Some(len) = frame_len(buf).filter(|len| position + *len as u64 <= end) else {
                    break;
                };
                let range = file.read(&mut self.buf, position - base, len)?;
                let Some((payload, len)) = read_frame(&self.buf.as_slice()[range]) else {
                    if limit.is_some() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("event log record at {position} fails its checksum"),
                        ));
                    }
                    break;
                };
                entries.push(LogEntry {
                    position,
                    next: position + len as u64,
                    payload: payload.to_vec(),
                });
                at = len;
                read_bytes += len;
            }
            self.position += at as u64;
        }
        Ok(entries)
    }

    /// The open segment holding `self.position`: the one with the greatest base at or before it.
    fn open_segment_for_position(&mut self) -> io::Result<Option<u64>> {
        let bases = list_segments(&self.dir)?;
        let Some(base) = bases.iter().rev().find(|b| **b <= self.position).copied() else {
            return Ok(None);
        };
        if self.open.as_ref().map(|(b, _)| *b) != Some(base) {
            let file = SegmentFile::open(&segment_path(&self.dir, base), self.direct)?;
            self.open = Some((base, file));
        }
        Ok(Some(base))
    }
}
