//! Live sources: weights held by a running process (`gantry serve`, or a framework that
//! publishes its state dict), read over a Unix socket as `unix:///path/to/socket`.
//!
//! Host residency: a server keeps each checkpoint file whole (header and data, the file's own
//! layout) in a memfd, sealed against writing, growing and shrinking, and hands the
//! descriptors to each reader with `SCM_RIGHTS`. A reader then reads shared memory the kernel
//! keeps alive for as long as it holds the descriptors: the bytes cannot change or vanish under
//! it, whatever the server does. The cost is that a version's memory stays until its last
//! reader lets go, so a reader holds a lease only as long as it needs one.
//!
//! The rules:
//! - The socket is a trust boundary. Readers trust a server of their own user or root only;
//!   every message, count, size and name is checked ([`protocol`], [`client`]); a server that
//!   breaks a rule or stops answering is an error naming the source and the stage, within the
//!   lease's timeout, never a panic or a hang. The socket file is private by default (0600).
//! - One connection is one lease on one version. The server frees a version when it is no
//!   longer current and its last lease has ended (`book`).
//! - A process holds at most one lease per source: [`crate::open_with`] on a live source takes
//!   a lease, keeps it in a process-wide registry (replacing, and so releasing, the lease an
//!   earlier open of that source took), and returns a checkpoint whose files are
//!   `unix:///path#NAME` with the version in [`gantry_format::FileInfo::version`]. A load
//!   reads that checkpoint's files from the registry's lease, and only when its version is the
//!   checkpoint's: a checkpoint opened before the source was opened again (and so of a version
//!   no longer held) fails naming both versions. A load never mixes bytes of two versions.
//!   [`release`] lets go of a source's lease explicitly.
//! - Memfds are shared memory: read with buffered reads (`O_DIRECT` does not apply).
//! - Every publication carries a table of per-tensor XXH3-64 digests, computed by the server
//!   where the bytes are; [`verify`] hashes the leased memfds' tensor ranges against it (they
//!   are sealed, so what was checked is what a load reads).

mod book;
pub mod client;
mod device;
pub mod protocol;
mod publish;
pub mod server;
mod socket_file;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use gantry_format::{Checkpoint, FileInfo};
use parking_lot::Mutex;

pub use client::Lease;
pub(crate) use device::{alias as alias_device, fill as fill_device, Aliased};
pub use protocol::DeviceShare;
pub(crate) use publish::hash_all;
pub use publish::TensorBytes;
pub use server::{Server, ServerOptions, TerminationSignals};

use crate::error::{Error, Result};

/// The scheme of a live source.
const SCHEME: &str = "unix://";

/// The leases this process holds, by socket path: one per source.
static LEASES: Mutex<BTreeMap<PathBuf, Arc<Lease>>> = parking_lot::const_mutex(BTreeMap::new());

/// Whether `source` is a live source (`unix:///path`).
pub fn is_url(source: &str) -> bool {
    source.starts_with(SCHEME)
}

/// The socket path of live source `url`; an error unless it is `unix://` and an absolute path.
pub(crate) fn socket_of(url: &str) -> Result<PathBuf> {
    match url.strip_prefix(SCHEME) {
        Some(path) if path.starts_with('/') => Ok(PathBuf::from(path)),
        _ => Err(Error::Config(format!(
            "'{}' is not a live source: unix:///absolute/path/to/socket",
            url.escape_debug()
        ))),
    }
}

/// The source string of the socket at `path`.
pub(crate) fn url_of(path: &Path) -> String {
    format!("{SCHEME}{}", path.display())
}

/// The socket path and file name of a live checkpoint file's path (`unix:///path#NAME`).
fn split_file_path(path: &Path) -> Option<(PathBuf, &str)> {
    let text = path.to_str()?;
    let (url, name) = text.rsplit_once('#')?;
    Some((socket_of(url).ok()?, name))
}

/// Takes a lease on live source `source` (held in the registry, replacing this process's
/// earlier lease on it) and returns its checkpoint.
pub(crate) fn open_checkpoint(source: &Path) -> Result<Checkpoint> {
    let url = source.to_str().unwrap_or_default();
    let lease = Arc::new(Lease::acquire(url)?);
    let checkpoint = lease.checkpoint().clone();
    let socket = socket_of(url)?;
    let old = LEASES.lock().insert(socket, lease);
    drop(old); // closing its connection, outside the lock
    Ok(checkpoint)
}

/// Lets go of this process's lease on live source `url` (a load of a checkpoint opened from
/// it then fails until it is opened again); whether there was one.
pub fn release(url: &str) -> bool {
    let Ok(socket) = socket_of(url) else { return false };
    let old = LEASES.lock().remove(&socket);
    old.is_some()
}

/// The lease of live checkpoint file `info`, checked to hold the checkpoint's version, and the
/// file's name in it.
fn lease_of(info: &FileInfo) -> Result<(Arc<Lease>, String)> {
    let (socket, name) = split_file_path(&info.path).ok_or_else(|| {
        Error::Config(format!("'{}' is not a live source's file", info.path.display()))
    })?;
    let url = url_of(&socket);
    let wanted = info.version.clone().unwrap_or_default();
    let lease = LEASES.lock().get(&socket).cloned();
    let again = "open the source again to load its current version";
    let message = match lease {
        Some(l) if l.version() == wanted => return Ok((l, name.to_owned())),
        Some(l) => format!(
            "version {wanted} is no longer held by this process (the source was opened again \
             and holds version {}): {again}",
            l.version()
        ),
        None => format!("version {wanted} is no longer held by this process (released): {again}"),
    };
    Err(Error::Live { url, message })
}

/// The device residency this process's lease on `checkpoint`'s live source was handed, when
/// the checkpoint is of a live source, its version is the one held, and the server keeps its
/// files on a GPU too.
pub(crate) fn device_lease(checkpoint: &Checkpoint) -> Option<Arc<Lease>> {
    let info = checkpoint.files.first()?;
    info.path.to_str().filter(|p| is_url(p))?;
    let (lease, _) = lease_of(info).ok()?;
    lease.device().is_some().then_some(lease)
}

/// Opens live checkpoint file `info` for a load: a descriptor of its sealed memfd and the
/// reason its reader says (buffered reads of shared memory; a forced path is an error).
pub(crate) fn open_for_load(info: &FileInfo, path: crate::PathChoice) -> Result<(File, String)> {
    let (lease, name) = lease_of(info)?;
    let fail = |message: String| Error::Live { url: lease.url().to_owned(), message };
    if matches!(path, crate::PathChoice::Direct | crate::PathChoice::Gds) {
        return Err(Error::Unavailable {
            what: if path == crate::PathChoice::Direct { "O_DIRECT" } else { "cuFile" },
            reason: format!("{} is a live source in shared memory", lease.url()),
        });
    }
    let file = lease.file(&name).ok_or_else(|| fail(format!("no file '{name}' in the lease")))?;
    let file = file.try_clone().map_err(|e| fail(format!("dup of the memfd: {e}")))?;
    let reason = format!(
        "live (shared memory): version {} of {}, a sealed memfd read with buffered reads \
         (O_DIRECT does not apply to shared memory)",
        lease.version(),
        lease.url()
    );
    Ok((file, reason))
}

/// The publication version of `checkpoint` when it came from a live source.
pub fn version_of(checkpoint: &Checkpoint) -> Option<String> {
    version_of_files(&checkpoint.files)
}

/// [`version_of`] for a load's files.
pub(crate) fn version_of_files(files: &[FileInfo]) -> Option<String> {
    let first = files.first()?;
    split_file_path(&first.path)?;
    first.version.clone()
}

/// The digest the server published for tensor `index` of live `checkpoint`.
pub fn expected_digest(checkpoint: &Checkpoint, index: usize) -> Result<u64> {
    let t = checkpoint
        .tensors
        .get(index)
        .ok_or_else(|| Error::Config(format!("no tensor {index} in the checkpoint")))?;
    let (lease, _) = lease_of(&checkpoint.files[t.file.0])?;
    lease.digest(&t.name).ok_or_else(|| Error::Live {
        url: lease.url().to_owned(),
        message: format!("no digest for tensor '{}'", t.name),
    })
}

/// Checks a digest computed from a tensor's loaded bytes against the published one: an error
/// naming the tensor, the version and both digests when they differ.
pub fn check_digest(checkpoint: &Checkpoint, index: usize, actual: u64) -> Result<()> {
    let expected = expected_digest(checkpoint, index)?;
    if expected == actual {
        return Ok(());
    }
    let t = &checkpoint.tensors[index];
    let info = &checkpoint.files[t.file.0];
    let (socket, _) = split_file_path(&info.path).unwrap_or_default();
    Err(Error::Live {
        url: url_of(&socket),
        message: format!(
            "tensor '{}' of version {}: its bytes hash to {actual:016x}, the server's digest \
             table says {expected:016x}",
            t.name,
            info.version.as_deref().unwrap_or_default()
        ),
    })
}

/// Hashes every tensor of live `checkpoint` in the leased memfds (sealed: what a load reads)
/// and checks each against the server's digest table; the tensors checked.
pub fn verify(checkpoint: &Checkpoint) -> Result<usize> {
    let mut files = Vec::with_capacity(checkpoint.files.len());
    for info in &checkpoint.files {
        let (lease, name) = lease_of(info)?;
        let file = lease.file(&name).and_then(|f| f.try_clone().ok()).ok_or_else(|| {
            Error::Live { url: lease.url().to_owned(), message: format!("no file '{name}'") }
        })?;
        files.push(file);
    }
    let ranges: Vec<(usize, u64, u64)> =
        checkpoint.tensors.iter().map(|t| (t.file.0, t.offset, t.len)).collect();
    let digests = hash_ranges(&files, &ranges);
    for (i, digest) in digests.into_iter().enumerate() {
        let digest = digest.map_err(|source| Error::Io {
            op: "read",
            path: checkpoint.files[ranges[i].0].path.clone(),
            offset: ranges[i].1,
            len: ranges[i].2,
            source,
        })?;
        check_digest(checkpoint, i, digest)?;
    }
    Ok(checkpoint.tensors.len())
}

/// XXH3-64 of each range (file, offset, length) of `files`, read in pieces on all cores.
fn hash_ranges(files: &[File], ranges: &[(usize, u64, u64)]) -> Vec<std::io::Result<u64>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const PIECE_BYTES: usize = 8 << 20;
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get()).min(ranges.len());
    let hash = |&(f, offset, len): &(usize, u64, u64)| -> std::io::Result<u64> {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; PIECE_BYTES.min(len as usize)];
        let mut at = 0u64;
        while at < len {
            let n = PIECE_BYTES.min((len - at) as usize);
            files[f].read_exact_at(&mut buf[..n], offset + at)?;
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        Ok(hasher.digest())
    };
    let done: Vec<Vec<(usize, std::io::Result<u64>)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(range) = ranges.get(i) else { break mine };
                        mine.push((i, hash(range)));
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or_default()).collect()
    });
    let mut out: Vec<Option<std::io::Result<u64>>> = (0..ranges.len()).map(|_| None).collect();
    for (i, digest) in done.into_iter().flatten() {
        out[i] = Some(digest);
    }
    // What a failed thread left is hashed here.
    out.into_iter().zip(ranges).map(|(d, r)| d.unwrap_or_else(|| hash(r))).collect()
}
