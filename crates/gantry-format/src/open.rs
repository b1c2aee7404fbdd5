//! Opening the files a checkpoint names: regular files only, remembered by identity, and kept
//! inside the checkpoint's directory.
//!
//! A FIFO, a character device or a socket given as a checkpoint file would make `open(2)` or
//! `read(2)` wait forever, so every path is opened with `O_NONBLOCK` and checked with `fstat`
//! on the opened descriptor before a byte is read (the flag changes nothing for regular files).
//!
//! A file is remembered by device, inode, length and modification time when its header is
//! read ([`FileIdentity`]); whoever opens it again for its data compares the descriptor's
//! `fstat` with that, so a file replaced or rewritten in between is an error instead of a
//! mix of two files.
//!
//! Containment rule for the shards an index names: the directories along a shard's relative
//! path, resolved, must stay inside the index's directory (resolved), so `sub/x.safetensors`
//! with `sub` a symlink to `/etc` is refused. The shard file itself may be a symlink to a
//! regular file anywhere: the Hugging Face cache stores every snapshot file as a symlink into
//! `../../blobs/`, and a checkpoint directory built from symlinks is common. Errors never
//! print what a file holds.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{ErrorKind, FormatError};

/// What identifies one version of a file: where it lives, and its length and modification
/// time when its header was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    /// Device number (`st_dev`).
    pub dev: u64,
    /// Inode number (`st_ino`).
    pub ino: u64,
    /// Length in bytes.
    pub len: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Status change time (`st_ctime`), nanoseconds since the epoch: changes with every
    /// write, rename into place or change of owner or mode, and cannot be set back by a user
    /// (`utimensat` sets only the modification and access times). Not compared by
    /// [`FileIdentity::check`] (a `chmod` between two opens is no new version of the bytes);
    /// cooperating ranks compare it.
    pub ctime_ns: i128,
}

impl FileIdentity {
    /// The identity of the file `meta` describes.
    pub fn of(meta: &Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }

    /// Checks that `meta` (from `fstat` on a descriptor opened for `path`) describes the same
    /// version of the file; otherwise an error that says what changed.
    pub fn check(&self, path: &Path, meta: &Metadata) -> Result<(), FormatError> {
        let now = Self::of(meta);
        let what = if (now.dev, now.ino) != (self.dev, self.ino) {
            "it was replaced by another file"
        } else if now.len != self.len {
            "its length changed"
        } else if now.mtime_ns != self.mtime_ns {
            "it was modified"
        } else {
            return Ok(());
        };
        Err(FormatError::new(path, ErrorKind::Changed { what }))
    }
}

/// What kind of file `meta` describes, for errors about files that are not regular.
pub(crate) fn file_kind(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "an unknown kind of file"
    }
}

/// Opens `path` for reading if it is a regular file (symlinks followed), never blocking on a
/// FIFO or a device; returns the file and its `fstat`.
pub fn open_regular(path: &Path) -> Result<(File, Metadata), FormatError> {
    let io_err = |op, source| FormatError::new(path, ErrorKind::Io { op, source });
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| io_err("open", e))?;
    let meta = file.metadata().map_err(|e| io_err("stat", e))?;
    if !meta.is_file() {
        return Err(FormatError::new(path, ErrorKind::NotRegularFile { kind: file_kind(&meta) }));
    }
    Ok((file, meta))
}

/// `stat(2)` of `path` (symlinks followed), requiring a regular file.
pub(crate) fn stat_regular(path: &Path) -> Result<Metadata, FormatError> {
    let meta = fs::metadata(path)
        .map_err(|source| FormatError::new(path, ErrorKind::Io { op: "stat", source }))?;
    if !meta.is_file() {
        return Err(FormatError::new(path, ErrorKind::NotRegularFile { kind: file_kind(&meta) }));
    }
    Ok(meta)
}

/// A shard path made plain: `.` components dropped, so that `a.safetensors` and
/// `./a.safetensors` name one shard. `None` when the path is empty or leaves its directory
/// lexically (absolute, or `..`).
pub(crate) fn normalize_shard(shard: &str) -> Option<String> {
    let mut parts = Vec::new();
    for c in Path::new(shard).components() {
        match c {
            Component::Normal(part) => parts.push(part.to_str()?),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Checks that the directories along `shard` (relative to `base`), resolved, stay inside
/// `base` resolved; the shard's last component may be a symlink (see the module's rule).
/// Returns the error for a shard that escapes, or for a directory that cannot be resolved.
pub(crate) fn check_contained(
    index_path: &Path,
    base: &Path,
    shard: &str,
) -> Result<(), FormatError> {
    let Some(parent) = Path::new(shard).parent().filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(());
    };
    let resolve = |p: &Path| -> Result<PathBuf, FormatError> {
        let p = if p.as_os_str().is_empty() { Path::new(".") } else { p };
        p.canonicalize().map_err(|source| {
            let op = "resolve the shard's directory";
            FormatError::new(p, ErrorKind::Io { op, source })
        })
    };
    let root = resolve(base)?;
    let dir = resolve(&base.join(parent))?;
    if dir.starts_with(&root) {
        return Ok(());
    }
    let kind = ErrorKind::ShardOutsideDirectory { shard: shard.to_owned(), resolved: Some(dir) };
    Err(FormatError::new(index_path, kind))
}

/// The error for a shard that cannot be used: missing (named with a tensor that the index
/// maps to it), or present but unreadable or not a regular file (said as it is).
pub(crate) fn shard_error(path: &Path, source: io::Error, missing: FormatError) -> FormatError {
    if source.kind() == io::ErrorKind::NotFound {
        missing
    } else {
        FormatError::new(path, ErrorKind::Io { op: "stat", source })
    }
}
