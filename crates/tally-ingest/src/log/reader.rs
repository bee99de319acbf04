//! Sequential reading of the embedded log.
//!
//! A reader inside the server is bounded by the log's durable end, so it never sees a record that
//! a crash could still take back. An offline reader (`tally log dump`) has no bound and stops at
//! the end of the valid records instead.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::frame::{FRAME_HEADER_BYTES, MAX_RECORD_BYTES, read_frame};
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
    open: Option<(u64, File)>,
    /// Reused between reads: a fresh multi-MiB buffer per batch costs page faults.
    buf: Vec<u8>,
}

impl LogReader {
    /// A reader of the log in `dir` starting at `from`, reading at most up to `limit` when given.
    pub fn new(dir: &Path, from: u64, limit: Option<Arc<AtomicU64>>) -> Self {
        Self {
            dir: dir.to_path_buf(),
            position: from,
            limit,
            open: None,
            buf: Vec::new(),
        }
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
            let file = &self.open.as_ref().expect("just opened").1;
            let file_len = file.metadata()?.len();
            let mut end = base + file_len;
            if let Some(limit) = limit {
                end = end.min(limit);
            }
            if self.position >= end {
                break;
            }
            let want = ((end - self.position) as usize).min(max_bytes - read_bytes + MAX_RECORD_BYTES / 16);
            let mut buf = std::mem::take(&mut self.buf);
            buf.resize(want.max(FRAME_HEADER_BYTES), 0);
            let file = &self.open.as_ref().expect("just opened").1;
            let got = read_at_most(file, &mut buf, self.position - base)?;
            buf.truncate(got);
            let mut at = 0;
            while let Some((payload, len)) = read_frame(&buf[at..]) {
                entries.push(LogEntry {
                    position: self.position + at as u64,
                    next: self.position + (at + len) as u64,
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
                let Some(len) = frame_len_at(file, self.position - base)? else {
                    break;
                };
                let mut frame = vec![0u8; len];
                if read_at_most(file, &mut frame, self.position - base)? < len {
                    break;
                }
                let Some((payload, len)) = read_frame(&frame) else {
                    if limit.is_some() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("event log record at {} fails its checksum", self.position),
                        ));
                    }
                    break;
                };
                entries.push(LogEntry {
                    position: self.position,
                    next: self.position + len as u64,
                    payload: payload.to_vec(),
                });
                at = len;
                read_bytes += len;
            }
            self.position += at as u64;
            self.buf = buf;
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
            let file = File::open(segment_path(&self.dir, base))?;
            self.open = Some((base, file));
        }
        Ok(Some(base))
    }
}

fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn frame_len_at(file: &File, offset: u64) -> io::Result<Option<usize>> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    if read_at_most(file, &mut header, offset)? < FRAME_HEADER_BYTES {
        return Ok(None);
    }
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    Ok((len > 0 && len <= MAX_RECORD_BYTES).then_some(len + FRAME_HEADER_BYTES))
}
