//! Segment I/O that bypasses the page cache (`O_DIRECT`), from buffers that are reused.
//!
//! **Why.** Every byte of the log is written once, read once by the process stage, and then
//! deleted: the page cache only adds work. Putting data into a page cache page the kernel has
//! to find first is the costly part of a buffered write, and the log's writes always need new
//! pages (segments are zero-filled with `O_DIRECT`, so none of their pages is cached). Measured
//! on the 2-core development VM, 512 MB: buffered writes into new pages ran at 346 MB/s (the
//! writing thread busy throughout), and buffered reads of uncached data took 0.36–1.0 s of CPU,
//! where the same writes and reads with `O_DIRECT` from and into reused buffers took 0.03 s of
//! CPU each. In the ingest benchmark the log writer had spent most of its time copying into
//! new page cache pages.
//!
//! **How.** `O_DIRECT` transfers whole, aligned pages from aligned memory. [`PageWriter`] copies
//! each group's frames into one reused page-aligned buffer behind the segment's last partial
//! page (whose bytes it keeps from the previous group), pads with zeros to the page boundary,
//! and writes those pages where they belong. The bytes on disk are exactly those of a buffered
//! write followed by zeros to the page boundary (which the zero-filled segment held already),
//! so the format, recovery and readers are unchanged. Rewriting the partial page rewrites the
//! bytes of acknowledged records with the same bytes, so a crash tearing that page cannot change
//! them. [`SegmentFile`] reads the same way, into an aligned buffer its reader keeps.
//!
//! Where the file system refuses `O_DIRECT` (tmpfs), or `log.direct_io` is off, files are opened
//! normally and the page cache is used.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tally_core::fsutil::open_maybe_direct;
pub(crate) use tally_core::fsutil::{AlignedBuf, PAGE};

/// Bytes [`PageWriter`] copies before writing them out: a group larger than this is written
/// in several transfers.
const WRITE_CHUNK: usize = 4 << 20;

/// Opens `path` for reading (and writing, if `write`), with `O_DIRECT` when `direct` is asked
/// for and the file system allows it. Returns the file and whether it is direct.
pub(crate) fn open_segment(path: &Path, write: bool, direct: bool) -> io::Result<(File, bool)> {
    open_maybe_direct(OpenOptions::new().read(true).write(write), path, direct)
}

/// Writes groups of frames into a segment opened with `O_DIRECT`, whole pages at a time.
pub(crate) struct PageWriter {
    buf: AlignedBuf,
    /// How many bytes at the start of `buf` are the data of the page the segment's data ends
    /// in (already on disk): the data end modulo [`PAGE`].
    tail: usize,
}

impl PageWriter {
    /// A writer for a segment whose data ends at `end`; `file` is read for the bytes of the
    /// partial page `end` lies in.
    pub(crate) fn new(file: &File, end: u64) -> io::Result<Self> {
        let mut writer = Self {
            buf: AlignedBuf::zeroed(WRITE_CHUNK),
            tail: 0,
        };
        writer.reset(file, end)?;
        Ok(writer)
    }

    /// Starts over on `file`, whose data ends at `end` (a new segment: 0).
    pub(crate) fn reset(&mut self, file: &File, end: u64) -> io::Result<()> {
        let tail = (end % PAGE as u64) as usize;
        if tail > 0 {
            let mut page = AlignedBuf::zeroed(PAGE);
            let got = read_into(file, page.as_mut_slice(), end - tail as u64, true)?;
            if got < tail {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the event log's last page is shorter than its data",
                ));
            }
            self.buf.as_mut_slice()[..tail].copy_from_slice(&page.as_slice()[..tail]);
        }
        self.tail = tail;
        Ok(())
    }

    /// Writes `parts`, one after another, at `end` (where the segment's data ends), followed
    /// by zeros to the next page boundary. The caller syncs.
    pub(crate) fn write<'p>(
        &mut self,
        file: &File,
        end: u64,
        parts: impl IntoIterator<Item = &'p [u8]>,
    ) -> io::Result<()> {
        debug_assert_eq!(
            self.tail as u64,
            end % PAGE as u64,
            "the kept page matches the data end"
        );
        let capacity = self.buf.len();
        let mut offset = end - self.tail as u64;
        let mut filled = self.tail;
        for mut data in parts {
            while !data.is_empty() {
                let n = data.len().min(capacity - filled);
                self.buf.as_mut_slice()[filled..filled + n].copy_from_slice(&data[..n]);
                filled += n;
                data = &data[n..];
                if filled == capacity {
                    file.write_all_at(self.buf.as_slice(), offset)?;
                    offset += capacity as u64;
                    filled = 0;
                }
            }
        }
        let padded = filled.div_ceil(PAGE) * PAGE;
        if padded > 0 {
            let buf = self.buf.as_mut_slice();
            buf[filled..padded].fill(0);
            file.write_all_at(&buf[..padded], offset)?;
        }
        // Keep the data of the last, partial page for the next group.
        let tail = filled % PAGE;
        let last_page = filled - tail;
        self.buf.as_mut_slice().copy_within(last_page..filled, 0);
        self.tail = tail;
        Ok(())
    }
}

/// A segment file opened for reading, directly or through the page cache.
pub(crate) struct SegmentFile {
    file: File,
    direct: bool,
}

impl std::fmt::Debug for SegmentFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentFile")
            .field("direct", &self.direct)
            .finish_non_exhaustive()
    }
}

impl SegmentFile {
    /// Opens `path` for reading, with `O_DIRECT` when `direct` and the file system allows it.
    pub(crate) fn open(path: &Path, direct: bool) -> io::Result<Self> {
        let (file, direct) = open_segment(path, false, direct)?;
        Ok(Self { file, direct })
    }

    /// The file's length.
    pub(crate) fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Reads up to `len` bytes at `offset` (fewer at the end of the file) into `buf`, which
    /// grows if it must (one buffer serves a reader for its life: new memory is costly to
    /// touch). The bytes are `buf.as_slice()[range]`.
    pub(crate) fn read(&self, buf: &mut AlignedBuf, offset: u64, len: usize) -> io::Result<Range<usize>> {
        let skip = if self.direct {
            (offset % PAGE as u64) as usize
        } else {
            0
        };
        let whole = if self.direct {
            (skip + len).div_ceil(PAGE) * PAGE
        } else {
            len
        };
        buf.reserve(whole);
        let got = read_into(
            &self.file,
            &mut buf.as_mut_slice()[..whole],
            offset - skip as u64,
            self.direct,
        )?;
        Ok(skip.min(got)..got.min(skip + len))
    }
}

/// Reads into `buf` at `offset` until it is full or the file ends. Direct reads stop at the
/// first short read: the file ended, and a further read from an unaligned offset would be
/// refused.
fn read_into(file: &File, buf: &mut [u8], offset: u64, direct: bool) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                if direct && got % PAGE != 0 {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the page writer leaves on disk is the data, contiguous across groups of every
    /// size remainder and across chunk boundaries, then zeros; and reads at any offset give it
    /// back.
    #[test]
    fn groups_land_contiguously_and_reads_give_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segment");
        std::fs::write(&path, vec![0u8; 3 * WRITE_CHUNK]).unwrap();
        let (file, direct) = open_segment(&path, true, true).unwrap();
        assert!(
            direct || tally_core::fsutil::is_tmpfs(dir.path()),
            "O_DIRECT refused outside tmpfs"
        );
        let mut writer = PageWriter::new(&file, 0).unwrap();
        let mut expected = Vec::new();
        let mut end = 0u64;
        // Sizes around the page and chunk boundaries, in several parts per group.
        for (i, size) in [
            1,
            4095,
            4096,
            4097,
            10,
            WRITE_CHUNK - 3,
            8191,
            2,
            WRITE_CHUNK + 5,
            7,
        ]
        .into_iter()
        .enumerate()
        {
            let data: Vec<u8> = (0..size).map(|k| (k * 31 + i * 7 + 1) as u8 | 1).collect();
            let (a, b) = data.split_at(size / 3);
            writer.write(&file, end, [a, b]).unwrap();
            expected.extend_from_slice(&data);
            end += size as u64;
        }
        drop(file);
        let written = std::fs::read(&path).unwrap();
        assert_eq!(&written[..expected.len()], &expected[..], "direct: {direct}");
        assert!(written[expected.len()..].iter().all(|b| *b == 0));

        // Picking up where a writer stopped: the partial page is read back from the file.
        let (file, _) = open_segment(&path, true, true).unwrap();
        let mut writer = PageWriter::new(&file, end).unwrap();
        writer.write(&file, end, [&b"more"[..]]).unwrap();
        expected.extend_from_slice(b"more");
        drop(file);
        let written = std::fs::read(&path).unwrap();
        assert_eq!(&written[..expected.len()], &expected[..]);

        let reader = SegmentFile::open(&path, true).unwrap();
        let mut buf = AlignedBuf::zeroed(PAGE);
        for (offset, len) in [(0, 10), (4095, 2), (4096, 4096), (12_345, 70_000), (end - 3, 100)] {
            let range = reader.read(&mut buf, offset, len).unwrap();
            let from = offset as usize;
            let to = (from + len).min(written.len());
            assert_eq!(&buf.as_slice()[range], &written[from..to], "{offset} {len}");
        }
        let past_the_end = reader.read(&mut buf, written.len() as u64 + 10, 5).unwrap();
        assert!(past_the_end.is_empty());
    }
}
