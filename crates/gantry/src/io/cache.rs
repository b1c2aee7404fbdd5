//! A local write-through cache of objects (`Config::cache_dir`): a load from object storage
//! also writes each object it reads whole into the cache directory as its parts arrive (no
//! second GET), and a later load of the same object reads the local copy with the local
//! readers (io_uring `O_DIRECT` when cold) after a HEAD shows the object unchanged.
//!
//! An object's copy is `DIR/<bucket>/<key>@<ETag>` (the bucket as
//! [`super::object::client::Client::cache_name`] spells it: `gs/<bucket>` for Google Cloud
//! Storage, `az/<account>/<container>` for Azure): the ETag in the name is what makes a copy
//! trustworthy, so a rewritten object (new ETag) never matches an old copy, and there is no
//! separate metadata to keep consistent. A copy is written under a temporary name
//! (`...@<ETag>.partial-<pid>-<n>`) and renamed into place only once every byte of the object
//! arrived (each part was a GET conditioned on that ETag) and a last HEAD still shows that
//! ETag and size; so a load that is interrupted, fails or is cancelled leaves only a
//! temporary file, which no load trusts. Several processes loading the same object at once
//! each write their own temporary file; the renames are atomic and the bytes the same, so
//! whichever lands last wins and readers never see a partial copy. A cache that cannot be
//! written (unwritable directory, full disk) costs a warning, never the load. The copy is not
//! synced to disk before the rename: a kill leaves nothing to trust, but a power loss may
//! leave a named copy whose pages never reached the disk (`verify_sha256` catches that).
//!
//! The disk is kept off the load's path: each copy has a thread of its own that writes the
//! body chunks the GETs received (the same buffers, not copies of them) while the bytes go on
//! to their destinations, through the page cache, so the kernel writes the disk behind the
//! load. What waits for the disk is bounded ([`PENDING_BYTES_MAX`]); at the end of the load
//! only what is still queued is waited for, then one HEAD and a rename, never an fsync.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Where the copy of `bucket`/`key` at `etag` lives under `dir`; `None` when the key or ETag
/// cannot name a file safely (empty, `.` or `..` components).
pub fn copy_path(dir: &Path, bucket: &str, key: &str, etag: Option<&str>) -> Option<PathBuf> {
    let etag = etag?.trim_matches('"');
    let etag: String = etag
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    let safe = |part: &str| !part.is_empty() && part != "." && part != "..";
    if etag.is_empty() || !bucket.split('/').all(safe) || !key.split('/').all(safe) {
        return None;
    }
    let mut path = dir.join(bucket).join(key);
    let name = path.file_name()?.to_str()?.to_owned();
    path.set_file_name(format!("{name}@{etag}"));
    Some(path)
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// A complete copy of the object as the HEAD shows it.
    Hit(PathBuf),
    /// No usable copy, and why.
    Miss(String),
}

/// Looks for the copy of an object that a HEAD showed at `etag` and `size` bytes.
pub fn lookup(dir: &Path, bucket: &str, key: &str, etag: Option<&str>, size: u64) -> Lookup {
    let Some(path) = copy_path(dir, bucket, key, etag) else {
        return Lookup::Miss("the object has no ETag or a key that names no file".to_owned());
    };
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() && m.len() == size => Lookup::Hit(path),
        Ok(m) => Lookup::Miss(format!(
            "{} is {} bytes, the object {size}: not trusted",
            path.display(),
            m.len()
        )),
        Err(_) => Lookup::Miss(format!("no copy of ETag {} yet", etag.unwrap_or_default())),
    }
}

/// Bytes of parts received but not yet written to their copies, across every copy of the
/// process: what the cache may hold in memory while the disk catches up. A part waits for room
/// (its GET's slot stays taken, never a staging buffer) only when the disk falls behind the
/// store for longer than this takes to absorb. The count is of the bytes sent; the body chunks
/// holding them may keep somewhat more memory alive.
pub const PENDING_BYTES_MAX: usize = 256 << 20;

/// Bytes per permit of the pending budget.
const PERMIT_BYTES: usize = 64 << 10;

/// The pending budget, in permits of [`PERMIT_BYTES`].
static PENDING: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(PENDING_BYTES_MAX / PERMIT_BYTES);

/// Most buffers handed to one `pwritev`.
const IOVECS_MAX: usize = 512;

/// Bytes of one part on their way to its copy: the body chunks as they came (no copy of them
/// is made), contiguous from `offset`.
#[derive(Debug)]
struct Piece {
    offset: u64,
    chunks: Vec<bytes::Bytes>,
    _budget: tokio::sync::SemaphorePermit<'static>,
}

/// The copy of one object being written as its parts arrive.
///
/// The disk writes run on a thread of the copy's own, fed the body chunks of each part: the
/// part's bytes go on to their destination at once, and neither the runtime's workers nor a
/// staging buffer ever waits on the disk. The writes go through the page cache, so the disk
/// itself is written behind the load by the kernel's writeback.
#[derive(Debug)]
pub struct Writer {
    partial: PathBuf,
    /// The name it takes once complete.
    pub path: PathBuf,
    size: u64,
    queue: Option<std::sync::mpsc::Sender<Piece>>,
    /// The writing thread; it returns the bytes it wrote.
    thread: Option<std::thread::JoinHandle<u64>>,
    failed: Arc<AtomicBool>,
}

impl Writer {
    /// A temporary file for the copy of `bucket`/`key` at `etag`, `size` bytes, and the thread
    /// that writes it; an error message (for a warning) when the cache cannot take it.
    pub fn create(
        dir: &Path,
        bucket: &str,
        key: &str,
        etag: Option<&str>,
        size: u64,
    ) -> Result<Self, String> {
        static SEQUENCE: AtomicU64 = AtomicU64::new(0);
        let path = copy_path(dir, bucket, key, etag)
            .ok_or("the object has no ETag or a key that names no file")?;
        let parent = path.parent().expect("under the cache directory");
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let mut partial = path.clone().into_os_string();
        partial.push(format!(".partial-{}-{n}", std::process::id()));
        let partial = PathBuf::from(partial);
        let file = File::create_new(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
        // Reserve the space first, so that a full disk shows now rather than mid-load.
        // SAFETY: a valid descriptor; fallocate only changes the file's allocation.
        if unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, size as i64) }
            != 0
        {
            let e = std::io::Error::last_os_error();
            let _ = std::fs::remove_file(&partial);
            return Err(format!("{}: reserving {size} bytes: {e}", partial.display()));
        }
        Self::start(file, partial, path, size)
    }

    /// Starts the thread that writes `file` (named `partial` until renamed to `path`).
    fn start(file: File, partial: PathBuf, path: PathBuf, size: u64) -> Result<Self, String> {
        let (queue, pieces) = std::sync::mpsc::channel();
        let failed = Arc::new(AtomicBool::new(false));
        let (flag, name) = (Arc::clone(&failed), partial.clone());
        let thread = std::thread::Builder::new()
            .name("gantry-cache".to_owned())
            .spawn(move || drain(&file, &name, &pieces, &flag));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(format!("starting the thread that writes {}: {e}", partial.display()));
            }
        };
        Ok(Self { partial, path, size, queue: Some(queue), thread: Some(thread), failed })
    }

    /// Whether the copy still takes bytes (no write of it has failed).
    pub fn wants_bytes(&self) -> bool {
        !self.failed.load(Ordering::Relaxed)
    }

    /// Queues the bytes of one part, the body `chunks` as they came, contiguous from `offset`,
    /// to be written by the copy's thread; waits (without blocking the runtime) only while
    /// [`PENDING_BYTES_MAX`] bytes of all copies are waiting for the disk. A failure is logged
    /// once by the thread and stops the copy.
    pub async fn write(&self, offset: u64, chunks: Vec<bytes::Bytes>) {
        let len: usize = chunks.iter().map(|c| c.len()).sum();
        if len == 0 || !self.wants_bytes() {
            return;
        }
        let permits = len.div_ceil(PERMIT_BYTES).min(PENDING_BYTES_MAX / PERMIT_BYTES);
        let Ok(budget) = PENDING.acquire_many(permits as u32).await else { return };
        if let Some(queue) = &self.queue {
            let _ = queue.send(Piece { offset, chunks, _budget: budget });
        }
    }

    /// Waits for the queued writes and renames the copy into place if it is complete (every
    /// byte written) and `still_same` (a HEAD now shows the same ETag and size); otherwise
    /// removes it. Returns what happened, for the report.
    pub fn finish(mut self, still_same: Result<bool, String>) -> String {
        drop(self.queue.take());
        let written = self.thread.take().map_or(0, |t| t.join().unwrap_or(0));
        if self.failed.load(Ordering::Relaxed) || written != self.size {
            return format!("not cached: the copy at {} is incomplete", self.partial.display());
        }
        match still_same {
            Ok(true) => match std::fs::rename(&self.partial, &self.path) {
                Ok(()) => format!("written through to the cache at {}", self.path.display()),
                Err(e) => {
                    log::warn!("cache: renaming {} failed: {e}", self.partial.display());
                    format!("not cached: renaming the copy failed: {e}")
                }
            },
            Ok(false) => "not cached: the object changed since the load began".to_owned(),
            Err(e) => format!("not cached: the last HEAD failed: {e}"),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // The thread ends once its queue closes (writing on to an unlinked file meanwhile is
        // harmless). After a rename the temporary name is gone; before it, nothing may trust
        // the file.
        drop(self.queue.take());
        let _ = std::fs::remove_file(&self.partial);
    }
}

/// The writing thread of one copy: writes each piece at its offset until the queue closes;
/// after a failed write it drops what comes (releasing its budget). Returns the bytes written.
fn drain(
    file: &File,
    partial: &Path,
    pieces: &std::sync::mpsc::Receiver<Piece>,
    failed: &AtomicBool,
) -> u64 {
    let mut written = 0;
    for piece in pieces {
        if failed.load(Ordering::Relaxed) {
            continue;
        }
        match write_chunks(file, piece.offset, &piece.chunks) {
            Ok(n) => written += n,
            Err(e) => {
                failed.store(true, Ordering::Relaxed);
                log::warn!(
                    "cache: writing {} at offset {} failed ({e}); the load goes on without caching it",
                    partial.display(),
                    piece.offset
                );
            }
        }
    }
    written
}

/// Writes `chunks` back to back from `offset`, continuing short writes; the bytes written.
fn write_chunks(file: &File, offset: u64, chunks: &[bytes::Bytes]) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let (mut done, mut first, mut skip) = (0u64, 0usize, 0usize);
    while done < total {
        let iovecs: Vec<libc::iovec> = chunks[first..]
            .iter()
            .take(IOVECS_MAX)
            .enumerate()
            .map(|(i, c)| {
                let c = if i == 0 { &c[skip..] } else { &c[..] };
                libc::iovec { iov_base: c.as_ptr() as *mut libc::c_void, iov_len: c.len() }
            })
            .collect();
        let at = (offset + done) as libc::off_t;
        // SAFETY: every iovec points into a chunk borrowed for this call, which the kernel
        // only reads; the descriptor is valid while `file` is.
        let n = unsafe { libc::pwritev(file.as_raw_fd(), iovecs.as_ptr(), iovecs.len() as _, at) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "pwritev wrote 0 bytes",
            ));
        }
        done += n as u64;
        let mut n = n as usize;
        while n > 0 {
            let left = chunks[first].len() - skip;
            if n < left {
                skip += n;
                n = 0;
            } else {
                n -= left;
                first += 1;
                skip = 0;
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_paths() {
        let dir = Path::new("/c");
        let cases = [
            ("b", "m/x.safetensors", Some("\"abc-1\""), Some("/c/b/m/x.safetensors@abc-1")),
            ("b", "x.safetensors", Some("a/b\"c"), Some("/c/b/x.safetensors@a_b_c")),
            ("b", "x.safetensors", None, None),
            ("b", "x.safetensors", Some("\"\""), None),
            ("b", "../x.safetensors", Some("e"), None),
            ("b", "m//x.safetensors", Some("e"), None),
            ("..", "x.safetensors", Some("e"), None),
            ("gs/b", "x.safetensors", Some("e"), Some("/c/gs/b/x.safetensors@e")),
            ("az/a/c", "m/x", Some("\"0x8D\""), Some("/c/az/a/c/m/x@0x8D")),
            ("gs/..", "x.safetensors", Some("e"), None),
            ("gs//b", "x.safetensors", Some("e"), None),
        ];
        for (bucket, key, etag, want) in cases {
            assert_eq!(
                copy_path(dir, bucket, key, etag),
                want.map(PathBuf::from),
                "{key} {etag:?}"
            );
        }
    }

    /// Queues `bytes` at `offset` as chunks of `chunk` bytes, as a GET would.
    fn put(w: &Writer, bytes: &[u8], offset: u64, chunk: usize) {
        let chunks = bytes.chunks(chunk).map(bytes::Bytes::copy_from_slice).collect();
        crate::io::object::client::runtime().unwrap().block_on(w.write(offset, chunks));
    }

    #[test]
    fn pieces_land_at_their_offsets_whatever_their_chunks() {
        // More chunks than one pwritev takes, of odd and empty lengths, pieces out of order.
        let dir = tempfile::tempdir().unwrap();
        let object: Vec<u8> =
            (0..3 * IOVECS_MAX as u32 + 77).map(|i| (i * 7 % 251) as u8).collect();
        let size = object.len() as u64;
        let w = Writer::create(dir.path(), "b", "x", Some("e"), size).unwrap();
        let cut = 1000;
        put(&w, &object[cut..], cut as u64, 3);
        let mut chunks: Vec<bytes::Bytes> =
            object[..cut].chunks(1).map(bytes::Bytes::copy_from_slice).collect();
        chunks.insert(5, bytes::Bytes::new());
        crate::io::object::client::runtime().unwrap().block_on(w.write(0, chunks));
        assert!(w.finish(Ok(true)).contains("written through"));
        let Lookup::Hit(path) = lookup(dir.path(), "b", "x", Some("e"), size) else { panic!() };
        assert_eq!(std::fs::read(path).unwrap(), object);
    }

    #[test]
    fn a_failed_write_stops_the_copy_not_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        // /dev/full fails every write with ENOSPC: a copy written there, as a full disk would.
        let full = File::options().write(true).open("/dev/full").unwrap();
        let path = copy_path(dir.path(), "b", "x", Some("e")).unwrap();
        let w = Writer::start(full, dir.path().join("partial"), path, 8).unwrap();
        put(&w, &[1; 8], 0, 4);
        let text = w.finish(Ok(true));
        assert!(text.contains("incomplete"), "{text}");
        assert!(matches!(lookup(dir.path(), "b", "x", Some("e"), 8), Lookup::Miss(_)));
    }

    #[test]
    fn only_a_complete_copy_is_renamed() {
        let dir = tempfile::tempdir().unwrap();
        let (etag, size) = (Some("e1"), 10);
        let w = Writer::create(dir.path(), "b", "m/x", etag, size).unwrap();
        put(&w, &[1; 6], 0, 4);
        let text = w.finish(Ok(true));
        assert!(text.contains("incomplete"), "{text}");
        assert!(matches!(lookup(dir.path(), "b", "m/x", etag, size), Lookup::Miss(_)));
        assert_eq!(std::fs::read_dir(dir.path().join("b/m")).unwrap().count(), 0);

        let w = Writer::create(dir.path(), "b", "m/x", etag, size).unwrap();
        put(&w, &[2; 4], 6, 3);
        put(&w, &[1; 6], 0, 6);
        assert!(w.finish(Ok(false)).contains("changed"));
        assert!(matches!(lookup(dir.path(), "b", "m/x", etag, size), Lookup::Miss(_)));

        let w = Writer::create(dir.path(), "b", "m/x", etag, size).unwrap();
        put(&w, &[2; 4], 6, 3);
        put(&w, &[1; 6], 0, 6);
        assert!(w.finish(Ok(true)).contains("written through"));
        let Lookup::Hit(path) = lookup(dir.path(), "b", "m/x", etag, size) else { panic!() };
        assert_eq!(std::fs::read(path).unwrap(), [1, 1, 1, 1, 1, 1, 2, 2, 2, 2]);
        assert!(matches!(lookup(dir.path(), "b", "m/x", Some("e2"), size), Lookup::Miss(_)));
        assert!(matches!(lookup(dir.path(), "b", "m/x", etag, 11), Lookup::Miss(_)));
    }
}
