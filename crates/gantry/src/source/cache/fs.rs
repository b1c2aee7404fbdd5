//! File operations relative to a directory handle, never through a joined path: every name
//! is one component the cache made itself (hex digits and a suffix, no `/`), opened with
//! `O_NOFOLLOW`, so a symbolic link planted anywhere below the cache directory is refused
//! rather than followed (`ELOOP`), and nothing is created outside the directory the handle
//! names. One-component names make `openat2(RESOLVE_BENEATH)` unnecessary: there is no path
//! to walk, only the last component, which `O_NOFOLLOW` guards on every kernel.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// An open directory, and its path for messages.
#[derive(Debug)]
pub(super) struct Dir {
    fd: OwnedFd,
    /// The directory's path, for messages only (never opened again).
    pub path: PathBuf,
}

/// `name` as a C string; an error for a name with `/` or NUL (the cache never makes one).
fn c_name(name: &str) -> io::Result<CString> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad name '{name}'")));
    }
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
}

/// The result of a libc call returning -1 on failure.
fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `fstat` of an open descriptor: what it is, not what a path names now.
pub(super) fn fstat(fd: &impl AsRawFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a pointer to a `stat` the kernel fills.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// `flock(op)` on `file`, retried on `EINTR`; `Ok(false)` when `LOCK_NB` found it held.
pub(super) fn flock(file: &File, op: libc::c_int) -> io::Result<bool> {
    loop {
        // SAFETY: a valid descriptor; flock takes no pointer.
        match check(unsafe { libc::flock(file.as_raw_fd(), op) }) {
            Ok(_) => return Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// Whether the caller belongs to group `gid`: its effective group or one of its
/// supplementary groups.
pub(super) fn in_group(gid: u32) -> bool {
    // SAFETY: getegid has no preconditions.
    if unsafe { libc::getegid() } == gid {
        return true;
    }
    // SAFETY: with a size of 0, getgroups writes nothing and returns the count.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    let Ok(len) = usize::try_from(n) else { return false };
    let mut groups = vec![0 as libc::gid_t; len];
    // SAFETY: `groups` holds `n` entries, which getgroups fills at most.
    let m = unsafe { libc::getgroups(n, groups.as_mut_ptr()) };
    usize::try_from(m).is_ok_and(|m| groups[..m.min(len)].contains(&gid))
}

/// Sets `fd`'s permission bits to exactly `mode` (the umask applies only at creation).
pub(super) fn fchmod(fd: &impl AsRawFd, mode: u32) -> io::Result<()> {
    // SAFETY: a valid descriptor; fchmod takes no pointer.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) }).map(|_| ())
}

/// The flag that opens `c_path` as checked: `O_NOFOLLOW` when it is no link (so a link put
/// there after this look cannot be followed), none when it is a link owned by the caller or
/// root; an error for a link of another user.
fn link_owner_trusted(c_path: &std::ffi::CStr, path: &Path) -> io::Result<libc::c_int> {
    // SAFETY: all-zero is a valid `stat`; lstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a `stat` to fill.
    check(unsafe { libc::lstat(c_path.as_ptr(), &mut st) })?;
    if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
        return Ok(libc::O_NOFOLLOW);
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if st.st_uid == uid || st.st_uid == 0 {
        return Ok(0);
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{} is a symbolic link owned by uid {}, not by uid {uid} or root: not followed",
            path.display(),
            st.st_uid
        ),
    ))
}

/// Whether `name` is one a writer of the cache gives its temporary file
/// (`<64 hex digits>.<32 hex digits>.partial`): the sweep removes nothing else.
pub(super) fn is_temporary_name(name: &str) -> bool {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    match name.strip_suffix(".partial").and_then(|s| s.split_once('.')) {
        Some((identity, random)) => hex(identity, 64) && hex(random, 32),
        None => false,
    }
}

/// Sixteen random bytes as hex, for names nobody can guess ahead.
pub(super) fn random_hex() -> String {
    let mut bytes = [0u8; 16];
    // SAFETY: the kernel writes at most `bytes.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // No getrandom (very old kernels): time and address, unique enough with O_EXCL.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let seed = nanos ^ (&bytes as *const _ as usize as u128) ^ u128::from(std::process::id());
        bytes = seed.to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Dir {
    /// The cache's own directory at `path`, created with `mode` when missing. Links in the
    /// path's ancestors are the configuring user's; a link at the path itself is followed
    /// only when it belongs to the caller or root: one that another user planted where the
    /// cache was to be (a world-writable directory, `fs.protected_symlinks=0`) would make the
    /// cache, and its sweep of `partial/`, work in a directory of that user's choosing.
    pub(super) fn open_root(path: &Path, mode: u32) -> io::Result<Dir> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the path"))?;
        // SAFETY: a NUL-terminated path; mkdir takes no other pointer.
        let made = match check(unsafe { libc::mkdir(c_path.as_ptr(), mode as libc::mode_t) }) {
            Ok(_) => true,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => false,
            Err(e) => return Err(e),
        };
        let mut flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
        flags |= link_owner_trusted(&c_path, path)?;
        // SAFETY: a NUL-terminated path; the descriptor returned is owned below.
        let fd = check(unsafe { libc::open(c_path.as_ptr(), flags) })?;
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let dir = Dir { fd: unsafe { OwnedFd::from_raw_fd(fd) }, path: path.to_path_buf() };
        if made {
            fchmod(&dir.fd, mode)?;
        }
        Ok(dir)
    }

    /// The directory `name` inside this one, never through a link, created with `mode` when
    /// missing; whether it was created.
    pub(super) fn subdir(&self, name: &str, mode: u32) -> io::Result<(Dir, bool)> {
        let c = c_name(name)?;
        // SAFETY: a valid directory descriptor and a NUL-terminated one-component name.
        let made = match check(unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), mode) }) {
            Ok(_) => true,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => false,
            Err(e) => return Err(e),
        };
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: as above; the descriptor returned is owned below.
        let fd = check(unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags) })?;
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let dir = Dir { fd: unsafe { OwnedFd::from_raw_fd(fd) }, path: self.path.join(name) };
        if made {
            fchmod(&dir.fd, mode)?;
        }
        Ok((dir, made))
    }

    /// The path of `name` in this directory, for messages.
    pub(super) fn path_of(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Opens `name` to read: never through a link (`ELOOP`), never blocking on a FIFO or a
    /// device (`O_NONBLOCK`, cleared once open: the caller checks the type with `fstat`).
    pub(super) fn open_read(&self, name: &str) -> io::Result<File> {
        let c = c_name(name)?;
        let flags =
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
        // SAFETY: a valid directory descriptor and a NUL-terminated one-component name.
        let fd = check(unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags) })?;
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        // SAFETY: a valid descriptor; F_SETFL takes no pointer.
        check(unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_RDONLY) })?;
        Ok(file)
    }

    /// Creates `name` (it must not exist; never through a link) to write, with `mode`.
    pub(super) fn create(&self, name: &str, mode: u32) -> io::Result<File> {
        let c = c_name(name)?;
        let flags =
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: a valid directory descriptor and a NUL-terminated one-component name.
        let fd = check(unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags, mode) })?;
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        fchmod(&file, mode)?;
        Ok(file)
    }

    /// What `name` is now, not following a link.
    pub(super) fn stat_at(&self, name: &str) -> io::Result<libc::stat> {
        let c = c_name(name)?;
        // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let flag = libc::AT_SYMLINK_NOFOLLOW;
        // SAFETY: a valid directory descriptor, a NUL-terminated name, a `stat` to fill.
        check(unsafe { libc::fstatat(self.fd.as_raw_fd(), c.as_ptr(), &mut st, flag) })?;
        Ok(st)
    }

    /// Whether `name` is still the file `file` has open.
    pub(super) fn names(&self, name: &str, file: &File) -> bool {
        match (self.stat_at(name), fstat(file)) {
            (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
            _ => false,
        }
    }

    /// Removes `name` (a file or a link, never what a link points to).
    pub(super) fn unlink(&self, name: &str) -> io::Result<()> {
        let c = c_name(name)?;
        // SAFETY: a valid directory descriptor and a NUL-terminated one-component name.
        check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) }).map(|_| ())
    }

    /// Renames `name` here to `to_name` in `to`, replacing what is there (atomically).
    pub(super) fn rename(&self, name: &str, to: &Dir, to_name: &str) -> io::Result<()> {
        let (a, b) = (c_name(name)?, c_name(to_name)?);
        let (from_fd, to_fd) = (self.fd.as_raw_fd(), to.fd.as_raw_fd());
        // SAFETY: valid directory descriptors and NUL-terminated one-component names.
        check(unsafe { libc::renameat(from_fd, a.as_ptr(), to_fd, b.as_ptr()) }).map(|_| ())
    }

    /// The names in this directory (not `.` or `..`); names that are not UTF-8 are left out
    /// (the cache makes none).
    pub(super) fn entries(&self) -> io::Result<Vec<String>> {
        // SAFETY: a valid descriptor; dup takes no pointer.
        let fd = check(unsafe { libc::dup(self.fd.as_raw_fd()) })?;
        // SAFETY: `fd` is ours; fdopendir takes it over (closedir closes it).
        let dir = unsafe { libc::fdopendir(fd) };
        if dir.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: fdopendir failed, so `fd` is still ours to close.
            unsafe { libc::close(fd) };
            return Err(e);
        }
        // SAFETY: a fresh stream: rewind so a dup'd offset from an earlier listing is reset.
        unsafe { libc::rewinddir(dir) };
        let mut names = Vec::new();
        loop {
            // SAFETY: `dir` is a valid stream until closedir below.
            let entry = unsafe { libc::readdir(dir) };
            if entry.is_null() {
                break;
            }
            // SAFETY: readdir returned an entry whose d_name is NUL-terminated, valid until
            // the next readdir on this stream; it is copied out at once.
            let name = unsafe { std::ffi::CStr::from_ptr((*entry).d_name.as_ptr()) };
            if let Ok(name) = name.to_str() {
                if name != "." && name != ".." {
                    names.push(name.to_owned());
                }
            }
        }
        // SAFETY: `dir` is valid and closed once.
        unsafe { libc::closedir(dir) };
        Ok(names)
    }

    /// What the directory itself is.
    pub(super) fn stat(&self) -> io::Result<libc::stat> {
        fstat(&self.fd)
    }
}
