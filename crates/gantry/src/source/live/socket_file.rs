//! The socket file of a live server: what may be at its path before binding, how it is bound,
//! and how it is removed. The directory it lives in may be writable by other users (`/tmp`,
//! `/run/user`), so every step after the checks goes through directory handles, never through
//! names another user could swap.
//!
//! Binding: a symbolic link or anything but a socket at the path is refused and left alone; a
//! socket some server answers on is refused; a socket nobody answers on (a server that died) is
//! replaced. The new socket is bound inside a private directory (mode 0700) made beside the
//! path, given its mode there, its identity (device and inode) taken there, and renamed into
//! place, so nobody can connect before the mode holds.
//!
//! Removing: checking the identity at the path and then unlinking the path by name would
//! remove whatever another user put there between the two steps. Instead, whatever is at the
//! path is first renamed into a new private directory, where nobody else can change it; its
//! identity is checked there; this server's own socket is unlinked there, and anything else is
//! renamed back without replacing what may have appeared at the path meanwhile
//! (`RENAME_NOREPLACE`). If something did appear, the other file stays in the private
//! directory, which is then left with a warning naming it: a file out of place, never one
//! removed. The path is empty for the moment between the two renames.

use std::ffi::{CStr, CString, OsStr};
use std::fs;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::protocol;

/// The name of the socket inside a private directory.
const INSIDE: &CStr = c"s";
/// The name a stale socket takes in the private directory while it is checked.
const STALE: &CStr = c"stale";

/// A socket this server bound: the directory it was renamed into (held open, so a rename of
/// that directory does not matter), its name there and its identity.
#[derive(Debug)]
pub(super) struct SocketFile {
    parent: OwnedFd,
    /// The parent's path, for messages only.
    parent_path: PathBuf,
    name: CString,
    identity: (u64, u64),
}

/// What [`SocketFile::remove`] did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Removed {
    /// The socket was this server's: unlinked.
    Ours,
    /// Nothing was at the path.
    Gone,
    /// Something else was at the path, or it could not be moved to be checked: left there
    /// (the reason says what).
    Left(String),
}

/// What may be at the socket path: nothing (`None`), or a socket nobody answers on (its
/// device and inode: [`bind`] replaces it only while that very file is there).
pub(super) fn check_path(path: &Path) -> Result<Option<(u64, u64)>, String> {
    let meta = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("stat of the socket path: {e}")),
        Ok(meta) => meta,
    };
    if meta.file_type().is_symlink() {
        return Err("is a symbolic link: refusing to follow or replace it".to_owned());
    }
    if !meta.file_type().is_socket() {
        return Err("is not a socket: refusing to replace it".to_owned());
    }
    let probe = protocol::socket().map_err(|e| format!("socket: {e}"))?;
    protocol::set_timeouts(probe.as_fd(), Some(Duration::from_secs(2)))
        .map_err(|e| format!("setting timeouts: {e}"))?;
    match protocol::connect(probe.as_fd(), path) {
        Ok(()) => {
            Err("another live server answers on this socket: refusing to take it over".into())
        }
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            log::info!("{}: a stale socket (nobody answers): replacing it", path.display());
            Ok(Some((
                std::os::unix::fs::MetadataExt::dev(&meta),
                std::os::unix::fs::MetadataExt::ino(&meta),
            )))
        }
        Err(e) => Err(format!("cannot tell whether a server answers on this socket: {e}")),
    }
}

/// A listening socket bound in a private directory beside `path`, given `mode`, and renamed
/// to `path`, with the [`SocketFile`] that removes it. `stale` is what [`check_path`] found:
/// that socket is moved aside and removed only if it is still the file at the path, and the
/// new socket goes in place only where nothing is (`RENAME_NOREPLACE`): a file someone puts
/// at the path meanwhile is never replaced. Every step after
/// creating the directory goes through handles: the directory is opened with `O_NOFOLLOW` and
/// must be this user's and closed to others, the socket is bound, given its mode, identified
/// and renamed relative to that handle. (With names, a user who may write the parent could
/// rename the private directory away and put one with a symbolic link `s` in its place: a root
/// server would then change the mode of the link's target.)
pub(super) fn bind(
    path: &Path,
    mode: u32,
    stale: Option<(u64, u64)>,
) -> Result<(OwnedFd, SocketFile), String> {
    let parent_path = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let last = path.file_name().ok_or("the socket path has no file name")?;
    let parent = open_dir(None, parent_path.as_os_str())
        .map_err(|e| format!("opening {}: {e}", parent_path.display()))?;
    let private = Private::make(&parent, parent_path)?;
    let name = cstring(last)?;
    let bound = bind_in(&private.dir, &parent, &name, mode, stale);
    private.remove();
    let (listener, identity) = bound?;
    let socket = SocketFile { parent, parent_path: parent_path.to_owned(), name, identity };
    Ok((listener, socket))
}

/// Binds `s` in the private directory `dir`, gives it `mode`, takes its identity and renames
/// it to `name` in `parent`.
fn bind_in(
    dir: &OwnedFd,
    parent: &OwnedFd,
    name: &CStr,
    mode: u32,
    stale: Option<(u64, u64)>,
) -> Result<(OwnedFd, (u64, u64)), String> {
    let fd = protocol::socket().map_err(|e| format!("socket: {e}"))?;
    let inside = PathBuf::from(format!("/proc/self/fd/{}/s", dir.as_raw_fd()));
    protocol::bind_listen(fd.as_fd(), &inside).map_err(|e| format!("bind: {e}"))?;
    let done = (|| {
        // SAFETY: valid descriptor and name; `s` is this process's socket in a directory only
        // this user may write.
        if unsafe { libc::fchmodat(dir.as_raw_fd(), INSIDE.as_ptr(), (mode & 0o777) as _, 0) } != 0
        {
            return Err(format!("chmod: {}", std::io::Error::last_os_error()));
        }
        let identity = identity_at(dir, INSIDE).map_err(|e| format!("fstatat: {e}"))?;
        if let Some(stale) = stale {
            remove_stale(dir, parent, name, stale)?;
        }
        rename_noreplace(dir, INSIDE, parent, name).map_err(|e| match e.raw_os_error() {
            Some(libc::EEXIST) => {
                "something appeared at the socket path while binding: left in place".to_owned()
            }
            _ => format!("moving the socket into place: {e}"),
        })?;
        Ok(identity)
    })();
    if done.is_err() {
        // SAFETY: valid descriptor and name.
        unsafe { libc::unlinkat(dir.as_raw_fd(), INSIDE.as_ptr(), 0) };
    }
    done.map(|identity| (fd, identity))
}

/// Moves what is at `name` in `parent` aside into `dir` and unlinks it there if it is still
/// the stale socket `stale`; anything else goes back (never replacing what appeared since).
fn remove_stale(
    dir: &OwnedFd,
    parent: &OwnedFd,
    name: &CStr,
    stale: (u64, u64),
) -> Result<(), String> {
    // SAFETY: valid descriptors and NUL-terminated names.
    let r = unsafe {
        libc::renameat(parent.as_raw_fd(), name.as_ptr(), dir.as_raw_fd(), STALE.as_ptr())
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(()), // gone meanwhile
            _ => Err(format!("moving the stale socket aside: {e}")),
        };
    }
    if identity_at(dir, STALE).is_ok_and(|id| id == stale) {
        // SAFETY: valid descriptor and name, in a directory only this user may write.
        unsafe { libc::unlinkat(dir.as_raw_fd(), STALE.as_ptr(), 0) };
        return Ok(());
    }
    match rename_noreplace(dir, STALE, parent, name) {
        Ok(()) => Err("the file at the socket path changed while binding: left in place".into()),
        Err(e) => Err(format!(
            "the file at the socket path changed while binding and cannot go back ({e}): it is \
             in the private directory beside it, renamed '{}'",
            STALE.to_string_lossy()
        )),
    }
}

impl SocketFile {
    /// The socket's path, for messages.
    fn display(&self) -> String {
        self.parent_path.join(OsStr::from_bytes(self.name.as_bytes())).display().to_string()
    }

    /// Removes the socket file while it is this server's, and never anything else (see the
    /// module docs).
    pub(super) fn remove(&self) -> Result<Removed, String> {
        let private = Private::make(&self.parent, &self.parent_path)?;
        let removed = private.take(&self.parent, &self.name).and_then(|taken| match taken {
            Taken::Aside => {
                private.settle(&self.parent, &self.name, self.identity, &self.display())
            }
            Taken::Nothing => Ok(Removed::Gone),
            Taken::Immovable(reason) => Ok(Removed::Left(reason)),
        });
        match &removed {
            // The other file could not go back: the directory holds it and stays.
            Err(_) if private.holds_something() => {}
            _ => private.remove(),
        }
        removed
    }
}

/// What [`Private::take`] found at the path.
#[derive(Debug, PartialEq, Eq)]
enum Taken {
    /// Moved into the private directory.
    Aside,
    /// Nothing was there.
    Nothing,
    /// Something this user may not move (another user's file in a sticky directory, a
    /// directory it may not write): where it was.
    Immovable(String),
}

/// A fresh private directory (mode 0700, this user's) in a parent directory, by handle.
struct Private {
    /// The parent's directory handle is the caller's; this is the private directory's.
    dir: OwnedFd,
    parent: libc::c_int,
    name: CString,
    path: PathBuf,
}

impl Private {
    /// Makes one in `parent` (whose path is `parent_path`, for messages).
    fn make(parent: &OwnedFd, parent_path: &Path) -> Result<Self, String> {
        let name = format!(".gantry-serve-{:016x}", random());
        let path = parent_path.join(&name);
        let name = cstring(OsStr::new(&name))?;
        // SAFETY: a valid directory descriptor and NUL-terminated name.
        if unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o700) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(format!("creating {}: {e}", path.display()));
        }
        let opened = open_dir(Some(parent), OsStr::from_bytes(name.as_bytes()))
            .map_err(|e| format!("opening {}: {e}", path.display()))
            .and_then(|dir| {
                check_private(&dir).map_err(|m| format!("{}: {m}", path.display()))?;
                Ok(dir)
            });
        match opened {
            Ok(dir) => Ok(Self { dir, parent: parent.as_raw_fd(), name, path }),
            Err(e) => {
                // SAFETY: valid descriptor and name; removes the directory only if empty.
                unsafe { libc::unlinkat(parent.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) };
                Err(e)
            }
        }
    }

    /// Renames whatever is at `name` in `parent` into this directory.
    fn take(&self, parent: &OwnedFd, name: &CStr) -> Result<Taken, String> {
        // SAFETY: valid descriptors and NUL-terminated names.
        let r = unsafe {
            libc::renameat(parent.as_raw_fd(), name.as_ptr(), self.dir.as_raw_fd(), INSIDE.as_ptr())
        };
        if r == 0 {
            return Ok(Taken::Aside);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(Taken::Nothing),
            Some(libc::EPERM | libc::EACCES) => {
                Ok(Taken::Immovable(format!("it cannot be moved aside to be checked ({e})")))
            }
            _ => Err(format!("moving it aside to check it: {e}")),
        }
    }

    /// What was taken: unlinked when it is the socket `identity`, else put back at `name` in
    /// `parent` unless something else is there now. `path` names the socket in messages.
    fn settle(
        &self,
        parent: &OwnedFd,
        name: &CStr,
        identity: (u64, u64),
        path: &str,
    ) -> Result<Removed, String> {
        let taken = identity_at(&self.dir, INSIDE);
        if taken.as_ref().is_ok_and(|t| *t == identity) {
            // SAFETY: valid descriptor and name, in a directory only this user may write.
            if unsafe { libc::unlinkat(self.dir.as_raw_fd(), INSIDE.as_ptr(), 0) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(format!("unlinking the socket moved aside: {e}"));
            }
            return Ok(Removed::Ours);
        }
        let what = match taken {
            Ok((dev, ino)) => format!("another file (device {dev}, inode {ino})"),
            Err(e) => format!("a file that cannot be identified ({e})"),
        };
        match put_back(&self.dir, parent, name) {
            Ok(()) => Ok(Removed::Left(format!("{what} is at the path now"))),
            Err(e) => Err(format!(
                "{what} was at the path and cannot go back ({e}): it is in {} now, renamed 's'; \
                 move it back to {path} by hand",
                self.path.display()
            )),
        }
    }

    /// Whether anything is left inside.
    fn holds_something(&self) -> bool {
        identity_at(&self.dir, INSIDE).is_ok()
    }

    /// Removes the (empty) directory.
    fn remove(self) {
        // SAFETY: valid descriptor and name; removes the directory only if empty.
        if unsafe { libc::unlinkat(self.parent, self.name.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
            let e = std::io::Error::last_os_error();
            log::warn!("removing {}: {e}", self.path.display());
        }
    }
}

/// Renames `s` in `dir` to `name` in `parent` unless something is there.
fn put_back(dir: &OwnedFd, parent: &OwnedFd, name: &CStr) -> std::io::Result<()> {
    rename_noreplace(dir, INSIDE, parent, name)
}

/// Renames `from` in `dir` to `name` in `parent` unless something is there
/// (`RENAME_NOREPLACE`; where the file system lacks it, a hard link, which never replaces
/// either): `EEXIST` then.
fn rename_noreplace(
    dir: &OwnedFd,
    from: &CStr,
    parent: &OwnedFd,
    name: &CStr,
) -> std::io::Result<()> {
    // SAFETY: valid descriptors and NUL-terminated names; renameat2 only reads them.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            dir.as_raw_fd(),
            from.as_ptr(),
            parent.as_raw_fd(),
            name.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
        return Err(e);
    }
    // SAFETY: as above.
    if unsafe { libc::linkat(dir.as_raw_fd(), from.as_ptr(), parent.as_raw_fd(), name.as_ptr(), 0) }
        != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: valid descriptor and name; the file lives on at `name`.
    unsafe { libc::unlinkat(dir.as_raw_fd(), from.as_ptr(), 0) };
    Ok(())
}

/// Device and inode of `name` in `dir`, not following a link.
fn identity_at(dir: &OwnedFd, name: &CStr) -> std::io::Result<(u64, u64)> {
    // SAFETY: a zeroed stat is a valid out buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, NUL-terminated name and out buffer.
    let r = unsafe {
        libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW)
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.st_dev, st.st_ino))
}

/// A directory opened without following a link at its last component (`at`: relative to that
/// directory, else to the working directory).
fn open_dir(at: Option<&OwnedFd>, name: &OsStr) -> std::io::Result<OwnedFd> {
    let c = cstring(name).map_err(std::io::Error::other)?;
    let base = at.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: a NUL-terminated name; the result is owned at once.
    let raw = unsafe { libc::openat(base, c.as_ptr(), flags) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The private directory must be this user's and closed to everyone else.
fn check_private(dir: &OwnedFd) -> Result<(), String> {
    // SAFETY: a zeroed stat is a valid out buffer; the descriptor is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(dir.as_raw_fd(), &mut st) } != 0 {
        return Err(format!("fstat: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if st.st_uid != me || st.st_mode & 0o077 != 0 {
        return Err(format!(
            "not the private directory this server made (owner {}, mode {:o})",
            st.st_uid,
            st.st_mode & 0o7777
        ));
    }
    Ok(())
}

fn cstring(name: &OsStr) -> Result<CString, String> {
    CString::new(name.as_bytes())
        .map_err(|_| format!("'{}' contains a NUL byte", name.to_string_lossy()))
}

/// 64 bits that differ between processes and calls.
fn random() -> u64 {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&std::process::id().to_le_bytes());
    h.update(&COUNT.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    h.update(&now.map_or(0, |d| d.as_nanos()).to_le_bytes());
    h.digest()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The private directories a test left in `dir`.
    fn leftovers(dir: &Path) -> Vec<String> {
        let names = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name());
        let names = names.map(|n| n.to_string_lossy().into_owned());
        names.filter(|n| n.starts_with(".gantry-serve-")).collect()
    }

    /// What appears at the path between the check and the bind is never replaced: a file
    /// where nothing was, or another file where a stale socket was.
    #[test]
    fn binding_never_replaces_what_appeared_after_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        assert_eq!(check_path(&path), Ok(None));
        fs::write(&path, b"theirs").unwrap();
        let e = bind(&path, 0o600, None).map(|_| ()).unwrap_err();
        assert!(e.contains("appeared"), "{e}");
        assert_eq!(fs::read(&path).unwrap(), b"theirs");
        fs::remove_file(&path).unwrap();
        // A stale socket (bound, its listener gone), then swapped for a file.
        let (listener, _socket) = bind(&path, 0o600, None).unwrap();
        drop(listener);
        let stale = check_path(&path).unwrap();
        assert!(stale.is_some(), "a socket nobody answers on is stale");
        fs::remove_file(&path).unwrap();
        fs::write(&path, b"theirs too").unwrap();
        let e = bind(&path, 0o600, stale).map(|_| ()).unwrap_err();
        assert!(e.contains("changed while binding"), "{e}");
        assert_eq!(fs::read(&path).unwrap(), b"theirs too");
        // The stale socket itself is replaced.
        fs::remove_file(&path).unwrap();
        let (listener, _socket) = bind(&path, 0o600, None).unwrap();
        drop(listener);
        let stale = check_path(&path).unwrap();
        let (_listener, socket) = bind(&path, 0o600, stale).unwrap();
        assert_eq!(socket.remove(), Ok(Removed::Ours));
        assert_eq!(leftovers(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn the_socket_is_removed_only_while_it_is_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let (listener, socket) = bind(&path, 0o600, None).unwrap();
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_socket());
        assert_eq!(socket.remove(), Ok(Removed::Ours));
        assert!(fs::symlink_metadata(&path).is_err());
        assert_eq!(socket.remove(), Ok(Removed::Gone));
        drop(listener);
        // Bound again, then moved away and replaced by another file: that file stays, and so
        // does the socket where it was moved.
        let (_listener, socket) = bind(&path, 0o600, None).unwrap();
        fs::rename(&path, dir.path().join("moved")).unwrap();
        fs::write(&path, b"theirs").unwrap();
        assert!(matches!(socket.remove(), Ok(Removed::Left(_))));
        assert_eq!(fs::read(&path).unwrap(), b"theirs");
        assert!(fs::symlink_metadata(dir.path().join("moved")).unwrap().file_type().is_socket());
        assert_eq!(leftovers(dir.path()), Vec::<String>::new());
    }

    /// Something that appears at the path while the other file is aside keeps its place, and
    /// the other file stays in the private directory (a warning names it): neither is removed.
    #[test]
    fn a_file_that_cannot_go_back_stays_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let (_listener, socket) = bind(&path, 0o600, None).unwrap();
        fs::remove_file(&path).unwrap();
        fs::write(&path, b"first").unwrap();
        let private = Private::make(&socket.parent, dir.path()).unwrap();
        assert_eq!(private.take(&socket.parent, &socket.name), Ok(Taken::Aside));
        fs::write(&path, b"second").unwrap();
        let err = private
            .settle(&socket.parent, &socket.name, socket.identity, &socket.display())
            .unwrap_err();
        assert!(err.contains("cannot go back") && err.contains(".gantry-serve-"), "{err}");
        assert!(private.holds_something());
        assert_eq!(fs::read(&path).unwrap(), b"second");
        let aside = dir.path().join(&leftovers(dir.path())[0]).join("s");
        assert_eq!(fs::read(aside).unwrap(), b"first");
    }
}
