//! Small file-system helpers: durable metadata files, writing data files past the page cache
//! (`O_DIRECT`) from page-aligned buffers, and deleting big files without stalling other syncs.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Fsyncs a directory, so that a file created, renamed or removed in it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// How much of a file [`remove_file_gradually`] frees at a time.
pub const REMOVAL_STEP: u64 = 16 << 20;

/// Deletes a file `step` bytes at a time: the file is cut shorter and synced, again and again,
/// then unlinked, so that the file system frees (and discards) its blocks in small pieces.
///
/// On a file system mounted with `discard` (this project's test machines: ext4 on a virtual
/// disk), freeing a big file at once sends one large discard to the device at the next journal
/// commit, and every sync on that device, the event log's group commits among them, waits behind
/// it. Measured there, with a loop of 4 KiB write-and-fdatasync beside it: deleting a 2 GB file at
/// once made 9 of ~25,000 syncs take over 10 ms (the worst 41 ms); cutting it in 32 MiB or 8 MiB
/// steps, none did (worst 8.4 and 5.4 ms), and the deletion took ~0.5 s.
///
/// Use it only for files nothing needs any more: a crash part-way leaves a shorter file under the
/// same name. A file that is already gone is not an error.
pub fn remove_file_gradually(path: &Path, step: u64) -> io::Result<()> {
    let file = match OpenOptions::new().write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut len = file.metadata()?.len();
    while len > step {
        len -= step;
        file.set_len(len)?;
        file.sync_data()?;
    }
    drop(file);
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Replaces `path` with `contents` atomically: a temporary file beside it, fsync, rename, and an
/// fsync of the folder. A crash leaves either the old or the new contents, never a mix. The
/// temporary name is unique per call, so two writers of one path cannot take each other's file
/// (the last rename wins).
pub fn write_atomically(path: &Path, contents: &[u8]) -> io::Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.{n}.tmp", std::process::id()));
    let tmp = path.with_file_name(name);
    {
        let mut file = File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )
}

/// The alignment and transfer unit of direct I/O: the page size, which is also the physical
/// block size of the disks this runs on (and a multiple of every logical block size).
pub const PAGE: usize = 4096;

/// A heap buffer aligned to [`PAGE`], zeroed when allocated and reused after that.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes rounded up to a whole page (at least one page).
    pub fn zeroed(len: usize) -> Self {
        let len = len.max(1).div_ceil(PAGE) * PAGE;
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { ptr, len }
    }

    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len, PAGE).expect("a valid layout")
    }

    /// The buffer's length (a whole number of pages).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never: a buffer holds at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes the buffer at least `len` bytes long; the contents are not kept when it grows.
    pub fn reserve(&mut self, len: usize) {
        if len > self.len {
            *self = Self::zeroed(len.max(self.len * 2));
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to `len` initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, to write into.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to `len` initialised bytes owned exclusively by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).finish()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

/// A new file written a chunk at a time through a page-aligned buffer, for files too big to
/// assemble in memory first (segment files: the encoded bytes of a big segment were a fresh
/// allocation of tens of megabytes per write, and touching new memory is costly).
///
/// With `direct` (and a file system that allows it), the bytes go to the disk with `O_DIRECT`,
/// `buf.len()` at a time: no page cache pages are filled (which costs more CPU than the write
/// itself on the machines Tally was measured on), and the disk's queue never holds more than
/// one such chunk of this file, so a concurrent small sync (the event log's group commit) waits
/// behind one chunk instead of behind the whole file's write-back. The last chunk is padded to
/// a page and the file then cut to its length. Nothing is durable until [`ChunkedFile::finish`].
pub struct ChunkedFile<'a> {
    file: File,
    buf: &'a mut AlignedBuf,
    /// Bytes of `buf` filled and not yet written.
    filled: usize,
    /// Where in the file `buf` goes.
    offset: u64,
    direct: bool,
}

impl<'a> ChunkedFile<'a> {
    /// Creates (or truncates) `path`; `buf`'s length is the chunk size, a multiple of [`PAGE`].
    pub fn create(path: &Path, buf: &'a mut AlignedBuf, direct: bool) -> io::Result<Self> {
        debug_assert!(
            !buf.is_empty() && buf.len().is_multiple_of(PAGE),
            "chunks are whole pages"
        );
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true);
        let (file, direct) = open_maybe_direct(&options, path, direct)?;
        Ok(Self {
            file,
            buf,
            filled: 0,
            offset: 0,
            direct,
        })
    }

    /// Writes out the filled part of the buffer (padded to a page when direct).
    fn write_chunk(&mut self) -> io::Result<()> {
        let len = if self.direct {
            self.filled.div_ceil(PAGE) * PAGE
        } else {
            self.filled
        };
        let out = self.buf.as_mut_slice();
        out[self.filled..len].fill(0);
        self.file.write_all_at(&out[..len], self.offset)?;
        self.offset += self.filled as u64;
        self.filled = 0;
        Ok(())
    }

    /// Writes what is left, cuts any padding off and syncs data and size. Returns whether the
    /// file was written with `O_DIRECT`.
    pub fn finish(mut self) -> io::Result<bool> {
        if self.filled > 0 {
            self.write_chunk()?;
        }
        if self.direct && !self.offset.is_multiple_of(PAGE as u64) {
            self.file.set_len(self.offset)?;
        }
        self.file.sync_data().map(|()| self.direct)
    }
}

impl Write for ChunkedFile<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        // A full buffer goes out before more is taken in, so an error takes none of `bytes`.
        if self.filled == self.buf.len() {
            self.write_chunk()?;
        }
        let n = bytes.len().min(self.buf.len() - self.filled);
        self.buf.as_mut_slice()[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
        self.filled += n;
        Ok(n)
    }

    /// Bytes reach the file a chunk at a time; [`ChunkedFile::finish`] writes the rest.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Opens `path` with `options`, adding `O_DIRECT` when `direct` is asked for and the file system
/// allows it (tmpfs and some others refuse the flag with `EINVAL`; then the file is opened
/// without it). Returns the file and whether it was opened with `O_DIRECT`.
pub fn open_maybe_direct(options: &OpenOptions, path: &Path, direct: bool) -> io::Result<(File, bool)> {
    if direct {
        match options.clone().custom_flags(libc::O_DIRECT).open(path) {
            Ok(file) => return Ok((file, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    Ok((options.open(path)?, false))
}

/// Whether `path` is on tmpfs, the file system here that refuses `O_DIRECT` (tests use it to
/// tell a refused flag from a silently unused one).
pub fn is_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs reads the NUL-terminated path and writes into the zeroed struct.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut stat) == 0 && stat.f_type == libc::TMPFS_MAGIC
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_written_past_the_page_cache_hold_exactly_their_contents() {
        let dir = std::env::temp_dir().join(format!("tally-fsutil-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut buf = AlignedBuf::zeroed(2 * PAGE);
        for (i, len) in [0, 1, PAGE - 1, PAGE, PAGE + 1, 2 * PAGE, 5 * PAGE + 7]
            .into_iter()
            .enumerate()
        {
            let contents: Vec<u8> = (0..len).map(|k| (k * 7 + i) as u8).collect();
            for direct in [true, false] {
                let path = dir.join(format!("f{i}-{direct}"));
                let mut file = ChunkedFile::create(&path, &mut buf, direct).unwrap();
                file.write_all(&contents).unwrap();
                let written_directly = file.finish().unwrap();
                assert!(
                    !direct || written_directly || is_tmpfs(&dir),
                    "O_DIRECT refused outside tmpfs"
                );
                assert!(direct || !written_directly);
                assert_eq!(
                    fs::read(&path).unwrap(),
                    contents,
                    "{len} bytes, direct: {direct}"
                );
                // The same bytes written in pieces of every size around the chunk's.
                for piece in [1, 3, PAGE - 1, 2 * PAGE, 3 * PAGE + 1] {
                    let mut file = ChunkedFile::create(&path, &mut buf, direct).unwrap();
                    for part in contents.chunks(piece) {
                        file.write_all(part).unwrap();
                    }
                    assert_eq!(file.finish().unwrap(), written_directly);
                    assert_eq!(
                        fs::read(&path).unwrap(),
                        contents,
                        "{len} bytes in pieces of {piece}, direct: {direct}"
                    );
                }
            }
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn gradual_removal_deletes_files_of_every_size_and_tolerates_missing_ones() {
        let dir = std::env::temp_dir().join(format!("tally-fsutil-rm-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for len in [0u64, 1, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 5] {
            let path = dir.join(format!("f{len}"));
            fs::write(&path, vec![7u8; len as usize]).unwrap();
            remove_file_gradually(&path, 4096).unwrap();
            assert!(!path.exists(), "{len} bytes");
        }
        remove_file_gradually(&dir.join("never-there"), 4096).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
