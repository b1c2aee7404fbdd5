//! SHA-256 of every file a load reads, computed from the bytes as they are read (never a second
//! read), and checked against a digest known from elsewhere.
//!
//! Where a digest is known from: in the Hugging Face cache a snapshot's files are symlinks to
//! `blobs/<sha256>`; a `SHA256SUMS` file beside the shards, read as GNU `sha256sum -c` reads
//! it (`sums`; a regular file of at most [`SUMS_BYTES_MAX`] bytes, opened without blocking:
//! one that is not, or is malformed, fails the load naming it); for objects, their `sha256`
//! metadata. With none of these, the load still computes the digest, logs a warning naming the
//! file and reports that nothing was known to check it against ([`FileCheck::verified`]);
//! with `Config::require_sha256` such a file fails the load before anything is read, for those
//! who need every file checked.
//!
//! SHA-256 is sequential, and extents complete out of order on many threads. So a file to be
//! verified is planned whole (header, unwanted tensors and gaps included: one run from offset 0
//! to its end), and the consumer hands each of its extents, as it arrives, to a few hashing
//! threads, which hand it back (`Message::Hashed`) once hashed; only then does the consumer
//! give it to the sink. A file is hashed in lanes, each lane in offset order: one lane for the
//! whole file the first time, one lane per segment once its segment states are recorded
//! ([`states`]). An extent that crosses segment boundaries feeds several lanes and goes back
//! when the last of them has hashed its part. A staged extent keeps its lease while it waits
//! for the bytes before it in its lanes, so the reorder window is bounded by the staging ring
//! and no bytes are copied. That cannot deadlock because every reader leases buffers for one
//! file's extents in offset order: the first extent of a file not yet wholly hashed always
//! holds a lease or needs none, and every lane it feeds has hashed everything before it, so it
//! is hashed as soon as it arrives. The extent whose part completes a file goes back only with
//! the file's verdict, so a load with a corrupted file never reports success.
//!
//! Lanes go to the threads in turn, files interleaved (a file's consecutive segments, and the
//! segments of files read side by side, on different threads), up to one thread per core and
//! [`HASH_THREADS_MAX`]. One SHA-256 lane runs at one core's rate
//! (1-2 GB/s with the CPU's SHA extensions, which `sha2` detects and uses at run time:
//! [`implementation`] names the code it picked;
//! AWS-LC's assembly runs at the same rate). The first verified load of a file hashes it in
//! one lane, so it cannot end before its largest file is hashed: a load that takes `T` seconds
//! without the check takes at least `max(T, largest file / one core's rate)` with it, far
//! above `T` when the page cache is warm (Llama-3-8B's 5 GB shards take 2.5 s or more to hash,
//! the warm 16 GB load 0.4 s at 45 GB/s). Later loads, from the recorded states, are bound by
//! `max(T, total bytes / (hashing threads x one core's rate))` instead, less what the readers'
//! own share of the cores takes: on 16 cores about 16 GB / 18 GB/s, still above a warm `T`
//! of 0.4 s but 3-4x below the one-lane bound; from a cold disk the check stays hidden.
//! Segment states are kept for local files only (a remote object's check is bound by the
//! network), and only once a file's digest matched the digest known for it.

use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};

mod files;
mod implementation;
pub mod states;
pub(crate) mod sums;
mod worker;

use crate::engine::read::{Message, RawTarget};
use crate::error::{Error, Result};
use crate::plan::Plan;
pub use implementation::{implementation, Implementation};
use worker::{Bytes, FileJob, Held, Mode, Outcome, Part, Progress, Worker};

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// Name of the checksum file looked for beside the shards.
pub const SUMS_FILE_NAME: &str = "SHA256SUMS";

/// Most bytes of a `SHA256SUMS` (some 40 000 lines): a larger one is an error, never read
/// whole.
pub const SUMS_BYTES_MAX: u64 = 4 << 20;

/// Most hashing threads of one load.
pub const HASH_THREADS_MAX: usize = 16;

/// `digest` as 64 lowercase hex digits.
pub fn to_hex(digest: &Digest) -> String {
    to_hex_bytes(digest)
}

/// `bytes` as lowercase hex digits.
fn to_hex_bytes(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// 64 hex digits (either case) as a digest.
pub fn from_hex(text: &str) -> Option<Digest> {
    let text = text.as_bytes();
    if text.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, pair) in text.chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).ok()?;
        digest[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(digest)
}

/// The SHA-256 of `bytes` (a reference for tests and small inputs).
pub fn sha256(bytes: &[u8]) -> Digest {
    Sha256::digest(bytes).into()
}

/// A digest a file is expected to have, and where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    /// The digest.
    pub digest: Digest,
    /// Where it came from, for reports and errors.
    pub source: String,
}

/// The digest known for local file `path`: the name of the Hugging Face cache blob it links
/// to, else its line in a `SHA256SUMS` beside it; `None` when neither names it. A
/// `SHA256SUMS` that is there but is not a regular file, holds more than [`SUMS_BYTES_MAX`]
/// bytes, cannot be read or is malformed (`sums`) is an error naming it: it was put there
/// to be checked against.
pub fn known_local(path: &Path) -> Result<Option<Known>> {
    if let Ok(target) = std::fs::read_link(path) {
        let name = target.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some(digest) = from_hex(name) {
            let source = format!("the Hugging Face blob it links to ({})", target.display());
            return Ok(Some(Known { digest, source }));
        }
    }
    let Some(name) = path.file_name() else { return Ok(None) };
    let list = path.with_file_name(SUMS_FILE_NAME);
    let bad = |message: String| Error::Sha256 { path: list.clone(), message };
    let text = match files::read_own(&list, SUMS_BYTES_MAX) {
        Ok(Some(text)) => text,
        Ok(None) => return Ok(None),
        Err(e) => return Err(bad(format!("cannot be read as a checksum list: {e}"))),
    };
    let listed = sums::parse(&text).map_err(bad)?;
    let source = list.display().to_string();
    Ok(listed.get(name.as_bytes()).map(|digest| Known { digest, source }))
}

/// Files of a load with no digest known: each is a warning naming it, or, when every file must
/// be checked (`require`), the first is an error naming it and what was looked for.
pub(crate) fn unknown_digests(checks: &Checks, require: bool) -> Result<()> {
    for check in checks.iter().flatten().filter(|c| c.known.is_none()) {
        let reason = &check.unknown_reason;
        if require {
            return Err(Error::Sha256 {
                path: check.path.clone(),
                message: format!(
                    "no SHA-256 digest known to check it against ({reason}), and every file \
                     must be checked (require_sha256): list it in a {SUMS_FILE_NAME} beside it \
                     (sha256sum FILES > {SUMS_FILE_NAME}), or load without require_sha256"
                ),
            });
        }
        log::warn!(
            "{}: SHA-256 not verified: no digest known ({reason}); its digest is computed and \
             reported, but nothing checks it",
            gantry_format::escape_path(&check.path)
        );
    }
    Ok(())
}

/// How a file's SHA-256 was computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hashing {
    /// In offset order on one thread; the note says whether its segment states were recorded
    /// for later loads, or why not.
    Sequential {
        /// `sequential, states recorded`, or why none were.
        note: String,
    },
    /// In segments on several threads, each from its recorded starting state, all linked.
    Parallel {
        /// Segments hashed.
        segments: usize,
    },
    /// In segments that did not link up (a stale or damaged record, or bytes not the file's),
    /// then hashed again from the file, sequentially.
    Reread {
        /// Segments hashed in the first pass.
        segments: usize,
    },
}

impl std::fmt::Display for Hashing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hashing::Sequential { note } => f.write_str(note),
            Hashing::Parallel { segments } => {
                write!(f, "{segments} segments in parallel from recorded states")
            }
            Hashing::Reread { segments } => write!(
                f,
                "{segments} segments in parallel did not link up with the recorded states: \
                 hashed again from the file, sequentially"
            ),
        }
    }
}

/// The check of one file of a load.
#[derive(Debug, Clone)]
pub struct FileCheck {
    /// The file, for errors.
    pub path: PathBuf,
    /// Its length: the bytes hashed.
    pub file_len: u64,
    /// The digest it should have, when one is known.
    pub known: Option<Known>,
    /// Why none is known (what was looked for), when none is.
    pub unknown_reason: String,
    /// Whether `path` is a local file that can be read again (segment states are kept and
    /// used for local files only).
    pub local: bool,
    /// The digest computed from the bytes read, once the load has finished.
    pub sha256: Option<Digest>,
    /// How it was computed, once the load has finished.
    pub hashing: Option<Hashing>,
}

impl FileCheck {
    /// Whether the file's SHA-256 was checked against a known digest (and matched: a file
    /// whose digest did not match fails the load). `false`: computed, but nothing was known to
    /// check it against.
    pub fn verified(&self) -> bool {
        self.known.is_some() && self.sha256.is_some()
    }

    /// One line for reports: the digest, what it was checked against, and how it was hashed.
    pub fn explain(&self) -> String {
        let computed = self.sha256.as_ref().map_or("not computed".to_owned(), to_hex);
        let how = self.hashing.as_ref().map(|h| format!("; {h}")).unwrap_or_default();
        match &self.known {
            Some(k) => format!("sha256 {computed}: matches {}{how}", k.source),
            None => format!(
                "sha256 {computed}: not verified, no digest known ({}){how}",
                self.unknown_reason
            ),
        }
    }
}

/// Per checkpoint file, its check (`None`: the file is not verified, nothing of it is read).
pub type Checks = Vec<Option<FileCheck>>;

/// Where segment states are kept, and the segment size.
#[derive(Debug, Clone)]
pub(crate) struct StatesSettings {
    pub dir: Option<Arc<states::Records>>,
    pub segment_bytes: u64,
}

impl StatesSettings {
    /// The states kept under `cache_dir` (see [`states::Records::new`]), in segments of
    /// `segment_bytes`.
    pub(crate) fn new(cache_dir: Option<&std::path::Path>, segment_bytes: u64) -> Self {
        let dir = states::Records::new(cache_dir).map(Arc::new);
        Self { dir, segment_bytes }
    }
}

/// The consumer's side of the hashing threads of one load.
pub(crate) struct Verifier {
    jobs: Vec<Option<Arc<FileJob>>>,
    /// Per verified file, its rank among them: lane `k` of the file of rank `r` goes to thread
    /// `(k x verified files + r) mod threads`, so that a file's consecutive segments, and the
    /// segments of files read side by side at the same offsets, go to different threads.
    rank: Vec<usize>,
    verified: usize,
    inputs: Vec<Sender<Part>>,
    handles: Vec<JoinHandle<()>>,
    /// Per extent, the destination a reader wrote it to, if any.
    targets: Vec<Option<RawTarget>>,
    outcomes: Arc<Mutex<Vec<Option<Outcome>>>>,
}

impl Verifier {
    /// Starts the hashing threads for the files `checks` verifies; each hashed extent (or the
    /// mismatch error) goes back on `tx`. `targets` gives each extent's direct destination.
    pub(crate) fn start(
        plan: &Plan,
        checks: &Checks,
        targets: Vec<Option<RawTarget>>,
        cpus: &[usize],
        settings: &StatesSettings,
        tx: &Sender<Result<Message>>,
    ) -> Result<Self> {
        assert_eq!(targets.len(), plan.extents.len());
        let jobs: Vec<Option<Arc<FileJob>>> = checks
            .iter()
            .enumerate()
            .map(|(f, c)| c.as_ref().map(|c| Arc::new(file_job(plan, f, c, settings))))
            .collect();
        let mut rank = vec![0; jobs.len()];
        let mut lanes = Vec::new();
        let verified = jobs.iter().flatten().count();
        for (r, (f, job)) in
            jobs.iter().enumerate().filter_map(|(f, j)| Some((f, j.as_ref()?))).enumerate()
        {
            rank[f] = r;
            lanes.extend((0..job.lanes()).map(|lane| (f, lane)));
        }
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        let workers = lanes.len().min(cores).clamp(1, HASH_THREADS_MAX);
        let worker_of = |f: usize, lane: usize| (lane * verified + rank[f]) % workers;
        let outcomes = Arc::new(Mutex::new(vec![None; checks.len()]));
        let mut verifier = Verifier {
            jobs,
            rank: rank.clone(),
            verified,
            inputs: Vec::new(),
            handles: Vec::new(),
            targets,
            outcomes,
        };
        for w in 0..workers {
            let mine: Vec<(usize, usize)> =
                lanes.iter().filter(|&&(f, lane)| worker_of(f, lane) == w).copied().collect();
            let (input, rx) = mpsc::channel();
            let worker = Worker::new(
                verifier.jobs.clone(),
                &mine,
                tx.clone(),
                Arc::clone(&verifier.outcomes),
            );
            let (cpus, trace) = (cpus.to_vec(), crate::trace::current());
            let handle = std::thread::Builder::new()
                .name("gantry-sha256".to_owned())
                .spawn(move || {
                    let _in = crate::trace::enter(trace.as_ref(), &format!("sha256 lane {w}"));
                    crate::engine::topology::pin_current_thread(&cpus);
                    worker.run(rx)
                })
                .map_err(|source| Error::Resource { what: "starting a hashing thread", source })?;
            verifier.inputs.push(input);
            verifier.handles.push(handle);
        }
        Ok(verifier)
    }

    /// The consumer's hook: takes a read extent of a verified file to be hashed first (`None`),
    /// turns a hashed one back into the message it was, passes anything else on.
    pub(crate) fn admit(&self, plan: &Plan, message: Message) -> Result<Option<Message>> {
        let (extent, bytes) = match message {
            Message::Hashed { extent, lease: Some(lease) } => {
                return Ok(Some(Message::Staged { extent, lease }))
            }
            Message::Hashed { extent, lease: None } => return Ok(Some(Message::Direct { extent })),
            Message::Staged { extent, lease } => (extent, Bytes::Staged(lease)),
            Message::Direct { extent } => match self.targets[extent] {
                Some(target) => (extent, Bytes::Direct(target)),
                None => return Ok(Some(Message::Direct { extent })),
            },
            other @ (Message::Landed { .. } | Message::Unread { .. }) => return Ok(Some(other)),
        };
        let e = &plan.extents[extent];
        let file = e.file.0;
        let Some(job) = &self.jobs[file] else {
            return Ok(Some(match bytes {
                Bytes::Staged(lease) => Message::Staged { extent, lease },
                Bytes::Direct(_) => Message::Direct { extent },
            }));
        };
        // The last part takes the consumer's handle, so that the thread that drops the last
        // handle (and only it) gives the extent back.
        let mut held = Some(Arc::new(Held { extent, offset: e.offset, len: e.len, bytes }));
        let lanes = job.lanes_of(e.offset, e.len);
        let last_lane = *lanes.end();
        for lane in lanes {
            let (start, end) = job.lane_range(lane);
            let offset = e.offset.max(start);
            let len = (e.offset + e.len).min(end) - offset;
            let held = match lane == last_lane {
                true => held.take().expect("one last part"),
                false => Arc::clone(held.as_ref().expect("before the last part")),
            };
            let part = Part { file, lane, offset, len, held };
            let worker = (lane * self.verified + self.rank[file]) % self.inputs.len();
            self.inputs[worker].send(part).map_err(|_| Error::Resource {
                what: "hashing an extent",
                source: std::io::Error::other("a hashing thread ended early"),
            })?;
        }
        Ok(None)
    }

    /// Stops the hashing threads and returns each file's digest and how it was computed
    /// (`None` where not computed).
    pub(crate) fn finish(mut self) -> Vec<Option<(Digest, Hashing)>> {
        self.stop();
        std::mem::take(&mut *self.outcomes.lock())
    }

    fn stop(&mut self) {
        self.inputs.clear(); // the threads end when their input closes, dropping held parts
        for handle in self.handles.drain(..) {
            if handle.join().is_err() {
                log::error!("a hashing thread panicked");
            }
        }
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        self.stop();
    }
}

/// File `f`'s job: hashed in parallel from its record when one fits, else sequentially.
fn file_job(plan: &Plan, f: usize, check: &FileCheck, settings: &StatesSettings) -> FileJob {
    let mut next = 0;
    let extents: Vec<(u64, u64)> = plan
        .extents
        .iter()
        .filter(|e| e.file.0 == f)
        .map(|e| {
            assert_eq!(e.offset, next, "a verified file must be planned whole");
            assert!(e.len > 0, "extents are not empty");
            next += e.len;
            (e.offset, e.len)
        })
        .collect();
    assert_eq!(next, check.file_len);
    let segment_bytes = settings.segment_bytes;
    let dir = settings.dir.clone();
    let segments = states::segment_count(check.file_len, segment_bytes);
    let record = match (&check.known, &dir) {
        (Some(known), Some(dir)) if check.local && segments > 1 => {
            dir.load(&known.digest, check.file_len, segment_bytes)
        }
        _ => None,
    };
    let mode = match record {
        Some(record) => Mode::Parallel { record, dir },
        None => Mode::Sequential { dir },
    };
    let mut job = FileJob {
        path: check.path.clone(),
        file_bytes: check.file_len,
        known: check.known.clone(),
        segment_bytes,
        rereadable: check.local,
        mode,
        progress: Mutex::new(Progress {
            parts_left: 0,
            outcomes: Vec::new(),
            recorded: Vec::new(),
        }),
    };
    let parts = extents.iter().map(|&(offset, len)| job.lanes_of(offset, len).count()).sum();
    let lanes = job.lanes();
    *job.progress.get_mut() =
        Progress { parts_left: parts, outcomes: vec![None; lanes], recorded: Vec::new() };
    job
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let d = sha256(b"abc");
        let hex = to_hex(&d);
        assert_eq!(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(from_hex(&hex), Some(d));
        assert_eq!(from_hex(&hex.to_uppercase()), Some(d));
        assert_eq!(from_hex(&hex[1..]), None);
        assert_eq!(from_hex(&format!("{}g", &hex[1..])), None);
    }
}
