//! Checking a cache copy as it is read: every extent read from a copy goes, before anything
//! else sees it, to a few checking threads, which hash each [`record::SEGMENT_BYTES`] segment
//! it holds with xxh3 and compare it with the digest the copy's writer recorded. A segment
//! that reaches past the extent (the last one of a run of wanted tensors, or one cut by a
//! reader whose requests are not a multiple of the segment) is completed with a small read of
//! the copy. xxh3 runs at tens of GB/s per core, so a few threads keep up with any disk: the
//! check costs latency per extent, not throughput.
//!
//! A read of a copy that fails (an I/O error, or the copy's end reached early because someone
//! truncated it after the load opened it) is a failed check of that extent: the readers hand
//! the extent back unread with its buffer (`Message::Unread`; only for files read from a copy:
//! a failed read of any other file is the load's error), and it takes the path below.
//!
//! When a segment does not match (or the copy cannot be read to complete it), the copy is
//! dropped at once (warning naming its path) and that extent's bytes are fetched from the
//! store into the same buffer (a ranged GET conditioned on the ETag the load saw) before the
//! extent goes on: the bytes handed to the sink and to the SHA-256 check are the object's.
//! Later extents of the same file are still read from the open copy and checked one by one,
//! each falling back the same way; the load ends with every byte either checked or fetched,
//! and the report says which. A fetch that fails (the object changed since the load opened
//! it, the store is gone) fails the load with the store's error.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use std::os::unix::fs::FileExt;

use parking_lot::Mutex;

use super::{record, CacheDir, Copy};
use crate::engine::read::{Message, RawTarget};
use crate::engine::staging::Lease;
use crate::error::{Error, Result};
use crate::plan::{FilePlan, Plan};
use crate::source::object::ObjectFile;
use gantry_format::FileInfo;

/// Most checking threads of one load.
pub const CHECK_THREADS_MAX: usize = 8;

/// A copy being read by a load, with what is needed to drop it and replace its bytes.
#[derive(Debug)]
pub struct Checked {
    /// The copy.
    pub copy: Copy,
    /// The object it is a copy of, as the load opened it.
    pub object: ObjectFile,
    cache: Arc<CacheDir>,
    /// What the first failed check found, once one has.
    failure: Mutex<Option<String>>,
}

impl Checked {
    /// `copy` of `object`, found in `cache`.
    pub fn new(copy: Copy, object: ObjectFile, cache: Arc<CacheDir>) -> Self {
        Self { copy, object, cache, failure: Mutex::new(None) }
    }

    /// What the check found, for the report: `None` when every extent read matched.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().clone()
    }

    /// Drops the copy after a check failed; what this load made of it, for the report.
    pub fn drop_after(&self, why: &str) {
        let mut failure = self.failure.lock();
        if failure.is_none() {
            let name = &self.copy.name;
            let what = self.cache.drop_copy(name, Some(&self.copy.file), why);
            *failure = Some(what);
        }
    }

    /// Why the segments of `bytes` (the copy's bytes from `offset`) do not match the record,
    /// if they do not.
    fn mismatch(&self, offset: u64, bytes: &[u8]) -> Option<String> {
        let (size, end) = (self.copy.size, offset + bytes.len() as u64);
        let s = record::SEGMENT_BYTES;
        for k in offset / s..end.div_ceil(s) {
            let range = record::segment_range(k, size);
            let (from, to) = (range.start.max(offset), range.end.min(end));
            let inside = &bytes[(from - offset) as usize..(to - offset) as usize];
            let digest = if from == range.start && to == range.end {
                record::digest(inside)
            } else {
                let mut head = vec![0; (from - range.start) as usize];
                let mut tail = vec![0; (range.end - to) as usize];
                let read = self.copy.file.read_exact_at(&mut head, range.start);
                let read = read.and_then(|()| self.copy.file.read_exact_at(&mut tail, to));
                if let Err(e) = read {
                    return Some(format!("could not be read at offset {}: {e}", range.start));
                }
                record::digest_of([&head[..], inside, &tail[..]])
            };
            if self.copy.digests.get(k as usize) != Some(&digest) {
                return Some(format!(
                    "holds bytes {}..{} that do not match its record (xxh3)",
                    range.start, range.end
                ));
            }
        }
        None
    }

    /// Checks the copy's bytes in `bytes` (from `offset`); where they do not match, drops
    /// the copy and puts the object's own bytes there instead.
    fn check(&self, offset: u64, bytes: &mut [u8]) -> Result<()> {
        let Some(why) = self.mismatch(offset, bytes) else { return Ok(()) };
        self.drop_after(&why);
        self.object.read_into(offset, bytes)
    }

    /// Drops the copy after a read of it at `offset` failed (`error`), and puts the object's
    /// own bytes in `bytes` instead.
    fn replace(&self, offset: u64, bytes: &mut [u8], error: &Error) -> Result<()> {
        self.drop_after(&unread_why(error));
        self.object.read_into(offset, bytes)
    }
}

/// Why a copy is dropped after a read of it failed with `error`, for its warning and report.
fn unread_why(error: &Error) -> String {
    match error {
        Error::Truncated { offset, .. } => format!(
            "could not be read at offset {offset}: it ends there (truncated after the load \
             opened it)"
        ),
        Error::Io { offset, len, source, .. } => {
            format!("could not be read ({len} bytes at offset {offset}: {source})")
        }
        other => format!("could not be read ({other})"),
    }
}

/// Where the bytes of an extent to check are.
#[derive(Debug)]
enum Bytes {
    Staged(Lease),
    Direct(RawTarget),
}

/// An extent to check.
#[derive(Debug)]
struct Job {
    extent: usize,
    file: usize,
    offset: u64,
    len: u64,
    bytes: Bytes,
    /// Why the extent's read failed, when it did: then its bytes come from the store.
    unread: Option<Error>,
}

/// The consumer's side of the checking threads of one load.
#[derive(Debug)]
pub struct Checker {
    copies: Arc<Vec<Option<Arc<Checked>>>>,
    /// Per extent, whether it was checked (and comes back to the consumer a second time).
    checked: Arc<Vec<AtomicBool>>,
    targets: Vec<Option<RawTarget>>,
    inputs: Vec<Sender<Job>>,
    handles: Vec<JoinHandle<()>>,
}

impl Checker {
    /// Starts checking threads for the files read from copies (`copies`, per checkpoint file),
    /// `None` when there are none. Each checked extent (or the error of a failed fallback)
    /// goes back on `tx`. `targets` gives each extent's direct destination.
    pub fn start(
        plan: &Plan,
        copies: &[Option<Arc<Checked>>],
        targets: Vec<Option<RawTarget>>,
        cpus: &[usize],
        tx: &Sender<Result<Message>>,
    ) -> Result<Option<Self>> {
        let extents = plan
            .extents
            .iter()
            .filter(|e| copies.get(e.file.0).is_some_and(Option::is_some))
            .count();
        if extents == 0 {
            return Ok(None);
        }
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        let threads = (cores / 4).clamp(2, CHECK_THREADS_MAX).min(extents);
        let mut checker = Checker {
            copies: Arc::new(copies.to_vec()),
            checked: Arc::new((0..plan.extents.len()).map(|_| AtomicBool::new(false)).collect()),
            targets,
            inputs: Vec::new(),
            handles: Vec::new(),
        };
        for _ in 0..threads {
            let (input, rx) = mpsc::channel::<Job>();
            let (copies, checked, tx) =
                (Arc::clone(&checker.copies), Arc::clone(&checker.checked), tx.clone());
            let cpus = cpus.to_vec();
            let handle = std::thread::Builder::new()
                .name("gantry-cache-check".to_owned())
                .spawn(move || {
                    crate::engine::topology::pin_current_thread(&cpus);
                    for job in rx {
                        let message = run(&copies, &checked, job);
                        if tx.send(message).is_err() {
                            return; // the load failed: the consumer is gone
                        }
                    }
                })
                .map_err(|source| Error::Resource {
                    what: "starting a cache-checking thread",
                    source,
                })?;
            checker.inputs.push(input);
            checker.handles.push(handle);
        }
        Ok(Some(checker))
    }

    /// The consumer's hook: takes an extent read from a copy to be checked first (`None`),
    /// and one whose read from a copy failed to be fetched from the store; passes on a
    /// checked one and anything else.
    pub fn admit(&self, plan: &Plan, message: Message) -> Result<Option<Message>> {
        let direct = |extent: usize| {
            let none = RawTarget { ptr: std::ptr::null_mut(), len: 0 };
            Bytes::Direct(self.targets[extent].unwrap_or(none))
        };
        let (extent, bytes, unread) = match message {
            Message::Staged { extent, lease } => (extent, Bytes::Staged(lease), None),
            Message::Direct { extent } => (extent, direct(extent), None),
            Message::Unread { extent, lease, error } => {
                let bytes = lease.map_or_else(|| direct(extent), Bytes::Staged);
                (extent, bytes, Some(error))
            }
            other => return Ok(Some(other)),
        };
        let e = &plan.extents[extent];
        let file = e.file.0;
        if self.copies[file].is_none() || self.checked[extent].load(Ordering::Acquire) {
            return match unread {
                Some(error) => Err(error), // not a copy's: the load's error
                None => Ok(Some(back(extent, bytes))),
            };
        }
        let job = Job { extent, file, offset: e.offset, len: e.len, bytes, unread };
        let thread = extent % self.inputs.len();
        self.inputs[thread].send(job).map_err(|_| Error::Resource {
            what: "checking a cache copy",
            source: std::io::Error::other("a checking thread ended early"),
        })?;
        Ok(None)
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.inputs.clear(); // the threads end when their input closes, dropping held leases
        for handle in self.handles.drain(..) {
            if handle.join().is_err() {
                log::error!("a cache-checking thread panicked");
            }
        }
    }
}

/// The message an extent goes on as.
fn back(extent: usize, bytes: Bytes) -> Message {
    match bytes {
        Bytes::Staged(lease) => Message::Staged { extent, lease },
        Bytes::Direct(_) => Message::Direct { extent },
    }
}

/// Checks one extent on a checking thread; the message it goes on as.
fn run(copies: &[Option<Arc<Checked>>], checked: &[AtomicBool], mut job: Job) -> Result<Message> {
    let Some(copy) = copies[job.file].as_ref() else {
        return Ok(back(job.extent, job.bytes));
    };
    let unread = job.unread.take();
    let len = job.len as usize;
    let bytes: &mut [u8] = match &mut job.bytes {
        Bytes::Staged(lease) => &mut lease.as_mut_slice()[..len],
        Bytes::Direct(t) if !t.ptr.is_null() && t.len >= len => {
            // SAFETY: the reader reported this extent written to its destination, which only
            // this thread touches until the extent goes back to the consumer, and which
            // outlives the load (the consumer joins these threads before it returns).
            unsafe { std::slice::from_raw_parts_mut(t.ptr, len) }
        }
        Bytes::Direct(_) => {
            return Err(Error::Io {
                op: "check the cache copy",
                path: copy.copy.path.clone(),
                offset: job.offset,
                len: job.len,
                source: std::io::Error::other("the extent was read where the check cannot see it"),
            })
        }
    };
    match &unread {
        Some(error) => copy.replace(job.offset, bytes, error)?,
        None => copy.check(job.offset, bytes)?,
    }
    checked[job.extent].store(true, Ordering::Release);
    Ok(back(job.extent, job.bytes))
}

/// `plan` for a file read from a copy: extents start on segment boundaries and hold whole
/// segments (alignment raised to the segment, request size a multiple of it), so that only
/// the end of a run of wanted tensors needs a small read of the copy to complete its segment.
/// Unchanged where the request size is below one segment (then more segments are completed
/// from the copy, and the check stays whole).
pub fn segment_plan(plan: FilePlan) -> FilePlan {
    let s = record::SEGMENT_BYTES;
    if plan.align > s || plan.chunk_bytes < s {
        return plan;
    }
    FilePlan { align: s, chunk_bytes: plan.chunk_bytes - plan.chunk_bytes % s, ..plan }
}

/// `e` as the load reports it. A SHA-256 mismatch of a file read from a cache copy whose
/// segments all matched their record means the copy's writer recorded bytes that are not the
/// object's digest, or the object is not: either way the copy is dropped (the next load reads
/// the store) and the error says the bytes came from it, rather than blaming the object alone.
pub fn blame_copy(e: Error, files: &[FileInfo], copies: &[Option<Arc<Checked>>]) -> Error {
    let Error::Integrity { path, expected, actual, expected_from } = e else { return e };
    let f = files.iter().position(|file| file.path == path);
    let actual = match f.and_then(|f| copies.get(f)?.as_ref()) {
        Some(copy) => {
            copy.drop_after("does not hash to the object's SHA-256");
            format!(
                "{actual} as read from the cache copy {} (dropped: the next load reads the \
                 object from the store)",
                copy.copy.path.display()
            )
        }
        None => actual,
    };
    Error::Integrity { path, expected, actual, expected_from }
}
