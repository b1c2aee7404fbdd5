//! Readers: each fills staging buffers (or destinations) with the extents of its files and
//! reports them to the pipeline. The probes that decide which one a file gets, and the
//! object store and cache the object reader fetches through, are sources (`source/`).
//!
//! - `uring`: io_uring with `O_DIRECT` into registered staging buffers. The cold-file path:
//!   no page-cache copy, few large requests, a fixed queue depth.
//! - `buffered`: several threads of `pread`. For files already in the page cache (direct I/O
//!   would throw that memory bandwidth away), for file systems without `O_DIRECT` (tmpfs),
//!   and as the fallback where io_uring is unavailable.
//!
//! - `gds`: GPUDirect Storage, `cuFileRead` straight into device memory.
//! - `object` (in `source/`): ranged GETs from object storage; `cache`: its local
//!   write-through copies.
//!
//! All four report each finished extent to the consumer as a [`Message`], and all four pass
//! every read result through the fault injector ([`fault`]) and then through [`complete`],
//! the one place where a result becomes "done", "continue", "retry" or an error, so that short
//! reads, `EINTR`, `EAGAIN`, end of file and `EIO` behave the same whoever read the bytes: a
//! `pread` or an io_uring completion, a `cuFileRead` (whose own status codes, which have no
//! errno, are errors of their own), or a body chunk of a ranged GET (a chunk is one result;
//! a short one leaves the rest of the chunk for the next).

pub(crate) mod buffered;
pub mod fault;
pub mod gds;
pub(crate) mod uring;

use std::fs::File;
use std::path::PathBuf;

use gantry_format::FileId;

use crate::engine::staging::Lease;
use crate::error::Error;

/// A checkpoint file opened for one reader.
#[derive(Debug)]
pub struct OpenFile {
    /// Its path, for errors.
    pub path: PathBuf,
    /// The open file (`O_DIRECT` for the direct reader).
    pub file: File,
    /// Its length when the header was read.
    pub file_len: u64,
    /// Alignment of offsets, lengths and buffers (1 for buffered files).
    pub align: u64,
    /// A cache copy: a read of it that fails goes to the consumer as [`Message::Unread`],
    /// with the extent's buffer, for the copy's check to fetch those bytes from the store
    /// ([`cache::check`]); a failed read of any other file is the load's error.
    pub cache_copy: bool,
}

/// The files one reader reads, found by their position in the checkpoint (the `file` of
/// its jobs), each with its position in the reader's own list (a registered file's index).
/// Built where the reader is spawned, from the load's opened files.
#[derive(Debug)]
pub struct ReaderFiles<'a, T> {
    /// Per checkpoint file: its position in `list`, if this reader reads it.
    by_id: Vec<Option<usize>>,
    list: Vec<(FileId, &'a T)>,
}

impl<'a, T> ReaderFiles<'a, T> {
    /// The files of `list`, in its order.
    pub fn new(list: impl IntoIterator<Item = (FileId, &'a T)>) -> Self {
        let list: Vec<(FileId, &'a T)> = list.into_iter().collect();
        let count = list.iter().map(|(id, _)| id.0 + 1).max().unwrap_or(0);
        let mut by_id = vec![None; count];
        for (position, (id, _)) in list.iter().enumerate() {
            by_id[id.0] = Some(position);
        }
        Self { by_id, list }
    }

    /// The file `id`'s position in this reader's list. A job of a file not given to this
    /// reader is a programming error.
    pub fn position(&self, id: FileId) -> usize {
        match self.by_id.get(id.0).copied().flatten() {
            Some(position) => position,
            None => panic!("a job of file {} that this reader was not given", id.0),
        }
    }

    /// The file `id`.
    pub fn get(&self, id: FileId) -> &'a T {
        self.list[self.position(id)].1
    }

    /// The files in the reader's order.
    pub fn iter(&self) -> impl Iterator<Item = (FileId, &'a T)> + '_ {
        self.list.iter().copied()
    }

    /// How many files.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether the reader has no file.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// A raw destination a reader writes one whole extent into, instead of a staging buffer.
#[derive(Debug, Clone, Copy)]
pub struct RawTarget {
    /// First byte; aligned as the file's reader requires.
    pub ptr: *mut u8,
    /// Bytes: the extent's length rounded up to the file's alignment.
    pub len: usize,
}

// SAFETY: a target is handed to exactly one reader thread, which is the only writer of those
// bytes until it reports the extent done.
unsafe impl Send for RawTarget {}
// SAFETY: sharing a target shares an address, not access: only the reader that owns its job
// writes through it.
unsafe impl Sync for RawTarget {}

/// What readers and sinks tell the consumer.
#[derive(Debug)]
pub enum Message {
    /// The extent's bytes are at the start of the staging buffer.
    Staged {
        /// Position in the plan.
        extent: usize,
        /// The buffer, with the extent's bytes from its first byte.
        lease: Lease,
    },
    /// The reader wrote the bytes straight to their destination.
    Direct {
        /// Position in the plan.
        extent: usize,
    },
    /// An asynchronous sink finished the copies of a staged extent.
    Landed {
        /// Position in the plan.
        extent: usize,
    },
    /// A read of a cache copy failed (`error`): the extent's buffer comes back unfilled, for
    /// the copy's check to drop the copy and fetch the extent from the store. A staged
    /// extent's `lease`, `None` for one read to its destination. Of any other file, or where
    /// no check takes it, the load fails with `error`.
    Unread {
        /// Position in the plan.
        extent: usize,
        /// The staging buffer of a staged extent.
        lease: Option<Lease>,
        /// Why the read failed.
        error: Error,
    },
    /// The integrity check hashed a `Staged` (with its lease) or `Direct` (without) extent;
    /// it goes on to the sink as that message.
    Hashed {
        /// Position in the plan.
        extent: usize,
        /// The staging buffer of a staged extent.
        lease: Option<Lease>,
    },
}

/// What a read result means for the request it completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Every needed byte is in.
    Done,
    /// Some bytes are in; issue the rest.
    Continue {
        /// Bytes in from the extent's start.
        valid: u64,
    },
    /// Interrupted or would block: issue the same request again.
    Retry,
    /// End of file before the needed bytes: the file shrank.
    Truncated {
        /// Bytes from the extent's start where the file ended.
        at: u64,
    },
    /// The read failed.
    Failed {
        /// The errno.
        errno: i32,
    },
}

/// Interprets `result` (bytes or negated errno) of a request that started `start` bytes into
/// an extent of `needed` bytes, `valid` of which were already in before it.
pub fn complete(result: i64, start: u64, needed: u64) -> Completion {
    match result {
        r if r < 0 => match (-r) as i32 {
            libc::EINTR | libc::EAGAIN => Completion::Retry,
            errno => Completion::Failed { errno },
        },
        0 => Completion::Truncated { at: start },
        r if start + r as u64 >= needed => Completion::Done,
        r => Completion::Continue { valid: start + r as u64 },
    }
}

/// The error for a completion that failed: of a request of `len` bytes starting `start` bytes
/// into the extent at file offset `extent_offset`.
pub fn read_error(
    file: &OpenFile,
    extent_offset: u64,
    start: u64,
    len: u64,
    completion: Completion,
) -> Error {
    let at = Failed { op: "read", path: &file.path, file_len: file.file_len };
    at.error(extent_offset, start, len, completion)
}

/// A read that failed: the operation (`read`, `cuFileRead`, `get`) and the file, whose length
/// when its header was read is `file_len`.
#[derive(Debug, Clone, Copy)]
pub struct Failed<'a> {
    /// The operation, as the error names it.
    pub op: &'static str,
    /// The file or object.
    pub path: &'a std::path::Path,
    /// Its length when the header was read.
    pub file_len: u64,
}

impl Failed<'_> {
    /// The error for `completion` of a request of `len` bytes starting `start` bytes into the
    /// extent at file offset `extent_offset`.
    pub fn error(&self, extent_offset: u64, start: u64, len: u64, completion: Completion) -> Error {
        match completion {
            Completion::Truncated { at } => Error::Truncated {
                path: self.path.to_path_buf(),
                offset: extent_offset + at,
                expected_len: self.file_len,
            },
            Completion::Failed { errno } => Error::Io {
                op: self.op,
                path: self.path.to_path_buf(),
                offset: extent_offset + start,
                len,
                source: std::io::Error::from_raw_os_error(errno),
            },
            other => unreachable!("{other:?} is not an error"),
        }
    }
}

/// Opens a checkpoint file for its data: never blocking on a FIFO or a device put where the
/// file was (`O_NONBLOCK` until `fstat` says it is a regular file), and only if it is the very
/// file whose header was read (device, inode, length, modification time). The returned file
/// is blocking again, as the readers expect.
pub fn open_for_data(info: &gantry_format::FileInfo) -> Result<File, Error> {
    let (file, meta) = gantry_format::open_regular(&info.path)?;
    if meta.len() < info.file_len {
        // Shorter than its header says: said as truncation, with where the file now ends.
        let (path, offset, expected_len) = (info.path.clone(), meta.len(), info.file_len);
        return Err(Error::Truncated { path, offset, expected_len });
    }
    info.check_unchanged(&file)?;
    let io_err =
        |source| Error::Io { op: "fcntl", path: info.path.clone(), offset: 0, len: 0, source };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // SAFETY: `fd` is open for as long as `file` lives; F_GETFL and F_SETFL take no pointer.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io_err(std::io::Error::last_os_error()));
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io_err(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// The path that opens `file` itself again (its `/proc/self/fd` link), so that a second open
/// (with `O_DIRECT`, say) cannot land on another file put at `path` meanwhile; `path` where
/// `/proc` is not mounted.
pub fn reopen_path(file: &File, path: &std::path::Path) -> PathBuf {
    let link = PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(file)));
    if link.exists() {
        link
    } else {
        path.to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions() {
        let cases = [
            (4096, 0, 4096, Completion::Done),
            (8192, 0, 5000, Completion::Done), // aligned request past the needed bytes
            (100, 0, 4096, Completion::Continue { valid: 100 }),
            (100, 4000, 4096, Completion::Done),
            (0, 300, 4096, Completion::Truncated { at: 300 }),
            (-(libc::EINTR as i64), 0, 10, Completion::Retry),
            (-(libc::EAGAIN as i64), 0, 10, Completion::Retry),
            (-(libc::EIO as i64), 0, 10, Completion::Failed { errno: libc::EIO }),
        ];
        for (result, start, needed, want) in cases {
            assert_eq!(complete(result, start, needed), want, "{result} {start} {needed}");
        }
    }
}
