//! The files the SHA-256 check reads and writes beside the checkpoint: segment-state records
//! and `SHA256SUMS`. Both may sit where someone else can write, so nothing here is read or
//! written the way a plain path would be.
//!
//! Rules. A records directory is opened once, from a starting directory the user named (their
//! cache directory, `GANTRY_SHA256_STATES_DIR`, `$XDG_CACHE_HOME`, `$HOME/.cache`: followed as
//! given, it is their own) and then one component at a time with `openat(O_NOFOLLOW)`, so a
//! link planted below it (`.sha256-states` in a shared cache) is refused, never followed. The
//! directories created are 0700, the records 0600. The directory, and every record read from
//! it, must be owned by the caller or root and writable by neither group nor others; a record
//! must be a regular file (`O_NOFOLLOW | O_NONBLOCK`, then `fstat`) of exactly the size its
//! segment count needs. A record is written under a random name with
//! `O_CREAT | O_EXCL | O_NOFOLLOW` relative to the directory's descriptor and renamed into
//! place with `renameat`, which replaces a link at the record's name instead of writing
//! through it. `SHA256SUMS` is the user's own file (a model directory, a Hugging Face snapshot
//! whose entries are links to blobs), so it is opened through links, but non-blocking, and
//! must be a regular file of at most [`SUMS_BYTES_MAX`](super::SUMS_BYTES_MAX) bytes: a FIFO
//! or a link to `/dev/zero` is an error at once, never a hang or an unbounded read.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Tries at a fresh random temporary name before writing a record gives up.
const TEMP_NAME_TRIES: usize = 8;

/// What a file type is, in words, for errors (`metadata` from `fstat` or `lstat`).
pub(super) fn kind(file_type: std::fs::FileType) -> &'static str {
    match () {
        _ if file_type.is_file() => "a regular file",
        _ if file_type.is_dir() => "a directory",
        _ if file_type.is_symlink() => "a symbolic link",
        _ if file_type.is_fifo() => "a FIFO",
        _ if file_type.is_char_device() => "a character device",
        _ if file_type.is_block_device() => "a block device",
        _ if file_type.is_socket() => "a socket",
        _ => "not a regular file",
    }
}

fn c_name(name: &Path) -> io::Result<CString> {
    CString::new(name.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a name with a NUL byte"))
}

/// `openat(dir, name, flags | O_CLOEXEC, mode)`; `dir` `None` is the working directory.
fn openat(dir: Option<BorrowedFd<'_>>, name: &Path, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let name = c_name(name)?;
    let dir = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: `name` is NUL-terminated and outlives the call; the kernel only reads it.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor the kernel just returned, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `mkdirat(dir, name, 0700)`; an existing entry is fine (it is checked when opened).
fn mkdirat(dir: BorrowedFd<'_>, name: &Path) -> io::Result<()> {
    let name = c_name(name)?;
    // SAFETY: `name` is NUL-terminated and outlives the call; the kernel only reads it.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o700) } == 0 {
        return Ok(());
    }
    match io::Error::last_os_error() {
        e if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        e => Err(e),
    }
}

fn renameat(dir: BorrowedFd<'_>, from: &Path, to: &Path) -> io::Result<()> {
    let (from, to) = (c_name(from)?, c_name(to)?);
    let dir = dir.as_raw_fd();
    // SAFETY: both names are NUL-terminated and outlive the call; the kernel only reads them.
    match unsafe { libc::renameat(dir, from.as_ptr(), dir, to.as_ptr()) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

fn unlinkat(dir: BorrowedFd<'_>, name: &Path) {
    if let Ok(name) = c_name(name) {
        // SAFETY: `name` is NUL-terminated and outlives the call; the kernel only reads it.
        unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) };
    }
}

/// Sixteen random bytes as hex, from the kernel's generator.
fn random_hex() -> io::Result<String> {
    let mut bytes = [0u8; 16];
    // SAFETY: the kernel writes at most `bytes.len()` bytes into `bytes`, which outlives it.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        return Err(io::Error::other("getrandom gave no random bytes"));
    }
    Ok(super::to_hex_bytes(&bytes))
}

/// Why a file or directory we did not create is not trusted: owned by another user than the
/// caller and root, or writable by group or others.
pub(super) fn distrust(meta: &std::fs::Metadata) -> Option<String> {
    // SAFETY: geteuid has no arguments and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        return Some(format!("owned by user {}, not by this user ({me}) or root", meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Some(format!("writable by others (mode {:o})", meta.mode() & 0o7777));
    }
    None
}

/// Opens the records directory: `anchor` (created 0700 with its parents when `create`,
/// followed as given), then each of `below` with `O_NOFOLLOW` (created 0700 when `create`);
/// the last must be trusted ([`distrust`]).
pub(super) fn open_dir(anchor: &Path, below: &[&str], create: bool) -> io::Result<OwnedFd> {
    if create {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(anchor)?;
    }
    let flags = libc::O_RDONLY | libc::O_DIRECTORY;
    let mut dir = openat(None, anchor, flags, 0)?;
    for name in below {
        let name = Path::new(name);
        if create {
            mkdirat(dir.as_fd(), name)?;
        }
        dir = openat(Some(dir.as_fd()), name, flags | libc::O_NOFOLLOW, 0).map_err(|e| match e
            .raw_os_error()
        {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => io::Error::other(format!(
                "{} is not a directory of its own (a link or a file): not followed",
                name.display()
            )),
            _ => e,
        })?;
    }
    let meta = File::from(dir.try_clone()?).metadata()?;
    match distrust(&meta) {
        Some(why) => Err(io::Error::new(io::ErrorKind::PermissionDenied, why)),
        None => Ok(dir),
    }
}

/// Reads `name` in `dir` without following a link, when it is a regular file the caller
/// trusts of exactly `want_bytes`; `Ok(None)` when there is none. The error says what is wrong.
pub(super) fn read_record(
    dir: BorrowedFd<'_>,
    name: &Path,
    want_bytes: u64,
) -> io::Result<Option<Vec<u8>>> {
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
    let fd = match openat(Some(dir), name, flags, 0) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(io::Error::other("a symbolic link: not followed"))
        }
        Err(e) => return Err(e),
    };
    let file = File::from(fd);
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other(format!("{}, not a regular file", kind(meta.file_type()))));
    }
    if let Some(why) = distrust(&meta) {
        return Err(io::Error::other(why));
    }
    read_capped(file, want_bytes).map(Some)
}

/// Reads `file` whole when it holds at most `max_bytes` (never more than `max_bytes + 1` read).
pub(super) fn read_capped(file: File, max_bytes: u64) -> io::Result<Vec<u8>> {
    let len = file.metadata()?.len();
    if len > max_bytes {
        return Err(io::Error::other(format!("{len} bytes, more than the {max_bytes} expected")));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max_bytes + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(io::Error::other(format!("grew past the {max_bytes} bytes expected")));
    }
    Ok(bytes)
}

/// Opens the user's own file `path` (links followed) without blocking; `Ok(None)` when there
/// is none. It must be a regular file of at most `max_bytes`; the error says what it is.
pub(super) fn read_own(path: &Path, max_bytes: u64) -> io::Result<Option<Vec<u8>>> {
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other(format!("{}, not a regular file", kind(meta.file_type()))));
    }
    read_capped(file, max_bytes).map(Some)
}

/// Writes `bytes` as `name` in `dir`: created 0600 under a random temporary name with
/// `O_EXCL | O_NOFOLLOW`, then renamed into place. Returns nothing on success; the temporary
/// file is removed on failure.
pub(super) fn write_private(dir: BorrowedFd<'_>, name: &Path, bytes: &[u8]) -> io::Result<()> {
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
    let mut tries = 0;
    let (temp, fd) = loop {
        let temp = PathBuf::from(format!(".{}.{}.tmp", name.display(), random_hex()?));
        match openat(Some(dir), &temp, flags, 0o600) {
            Ok(fd) => break (temp, fd),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < TEMP_NAME_TRIES => {
                tries += 1;
            }
            Err(e) => return Err(e),
        }
    };
    let written = File::from(fd).write_all(bytes).and_then(|()| renameat(dir, &temp, name));
    if written.is_err() {
        unlinkat(dir, &temp);
    }
    written
}
