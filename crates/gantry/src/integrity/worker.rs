//! The hashing threads: each owns some lanes (a sequentially hashed file, or one segment of a
//! file hashed in parallel), hashes each lane's bytes in offset order as they arrive, and
//! gives an extent back once every lane it feeds has hashed its part. The part that completes
//! a file decides its check, so its extent goes back with the verdict.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use parking_lot::Mutex;

use super::states::{self, Chain, Record, Records, State, IV};
use super::{to_hex, Digest, Hashing, Known};
use crate::engine::read::{Message, RawTarget};
use crate::engine::staging::Lease;
use crate::error::{Error, Result};

/// Where the bytes of an extent waiting to be hashed are.
pub(super) enum Bytes {
    Staged(Lease),
    Direct(RawTarget),
}

/// An extent read, shared by the parts of it that lanes hash.
pub(super) struct Held {
    pub extent: usize,
    pub offset: u64,
    pub len: u64,
    pub bytes: Bytes,
}

impl Held {
    fn slice(&self, offset: u64, len: u64) -> &[u8] {
        assert!(offset >= self.offset && offset + len <= self.offset + self.len);
        let at = (offset - self.offset) as usize;
        match &self.bytes {
            Bytes::Staged(lease) => &lease.as_slice()[at..at + len as usize],
            // SAFETY: the reader reported this extent written; nothing writes its destination
            // again during the load, which outlives the hashing threads (the consumer joins
            // them before the load returns).
            Bytes::Direct(t) => unsafe { std::slice::from_raw_parts(t.ptr.add(at), len as usize) },
        }
    }
}

/// The bytes `offset..offset + len` of an extent, for lane `lane` of file `file`.
pub(super) struct Part {
    pub file: usize,
    pub lane: usize,
    pub offset: u64,
    pub len: u64,
    pub held: Arc<Held>,
}

/// How a file is hashed.
pub(super) enum Mode {
    /// One lane in offset order, recording the states at segment boundaries (kept in `dir`
    /// once the digest matched, when there is a directory and more than one segment).
    Sequential { dir: Option<Arc<Records>> },
    /// One lane per segment, each from the record's states.
    Parallel { record: Record, dir: Option<Arc<Records>> },
}

/// One verified file, shared by the threads that hash its lanes.
pub(super) struct FileJob {
    pub path: PathBuf,
    pub file_bytes: u64,
    pub known: Option<Known>,
    pub segment_bytes: u64,
    /// Whether the file can be read again from `path` when its segments do not chain.
    pub rereadable: bool,
    pub mode: Mode,
    pub progress: Mutex<Progress>,
}

/// What the lanes of one file have done.
pub(super) struct Progress {
    /// Parts not yet hashed.
    pub parts_left: usize,
    /// Per lane, what it gave once done ([`states::segment_outcome`]).
    pub outcomes: Vec<Option<Digest>>,
    /// The states a sequential lane recorded.
    pub recorded: Vec<State>,
}

impl FileJob {
    pub(super) fn lanes(&self) -> usize {
        match &self.mode {
            Mode::Sequential { .. } => 1,
            Mode::Parallel { record, .. } => record.starts.len() + 1,
        }
    }

    /// The lanes the bytes `offset..offset + len` go to.
    pub(super) fn lanes_of(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<usize> {
        match &self.mode {
            Mode::Sequential { .. } => 0..=0,
            Mode::Parallel { .. } => {
                let s = self.segment_bytes;
                (offset / s) as usize..=((offset + len.max(1) - 1) / s) as usize
            }
        }
    }

    /// Lane `lane`'s bytes.
    pub(super) fn lane_range(&self, lane: usize) -> (u64, u64) {
        match &self.mode {
            Mode::Sequential { .. } => (0, self.file_bytes),
            Mode::Parallel { .. } => {
                let start = lane as u64 * self.segment_bytes;
                (start, (start + self.segment_bytes).min(self.file_bytes))
            }
        }
    }
}

/// What a file's check gave: its digest and how it was hashed.
pub(super) type Outcome = (Digest, Hashing);

/// One lane's hashing state on its thread.
struct Lane {
    next: u64,
    end: u64,
    chain: Chain,
    /// Parts that arrived before the ones in front of them, by offset.
    waiting: BTreeMap<u64, Part>,
    /// A sequential lane's states at segment boundaries.
    recorded: Option<Vec<State>>,
}

pub(super) struct Worker {
    jobs: Vec<Option<Arc<FileJob>>>,
    lanes: HashMap<(usize, usize), Lane>,
    out: Out,
}

/// Where a thread's results go: messages to the consumer, outcomes for the report.
struct Out {
    tx: Sender<Result<Message>>,
    outcomes: Arc<Mutex<Vec<Option<Outcome>>>>,
}

impl Worker {
    /// A thread for lanes `mine` (file, lane) of `jobs`.
    pub(super) fn new(
        jobs: Vec<Option<Arc<FileJob>>>,
        mine: &[(usize, usize)],
        tx: Sender<Result<Message>>,
        outcomes: Arc<Mutex<Vec<Option<Outcome>>>>,
    ) -> Self {
        let lanes = mine
            .iter()
            .map(|&(file, lane)| {
                let job = jobs[file].as_ref().expect("a verified file");
                let (next, end) = job.lane_range(lane);
                let (start, recorded) = match &job.mode {
                    Mode::Sequential { .. } => (IV, Some(Vec::new())),
                    Mode::Parallel { record, .. } => {
                        (if lane == 0 { IV } else { record.starts[lane - 1] }, None)
                    }
                };
                let chain = Chain::new(start);
                ((file, lane), Lane { next, end, chain, waiting: BTreeMap::new(), recorded })
            })
            .collect();
        Self { jobs, lanes, out: Out { tx, outcomes } }
    }

    pub(super) fn run(mut self, rx: Receiver<Part>) {
        for part in rx {
            let key = (part.file, part.lane);
            let lane = self.lanes.get_mut(&key).expect("a part for a lane of this thread");
            lane.waiting.insert(part.offset, part);
            while let Some(part) = lane.pop_next() {
                let job = Arc::clone(self.jobs[key.0].as_ref().expect("a verified file"));
                lane.hash(&job, part.held.slice(part.offset, part.len));
                let done = lane.next == lane.end;
                let outcome = done.then(|| {
                    let last = lane.end == job.file_bytes;
                    states::segment_outcome(lane.chain.clone(), last, job.file_bytes)
                });
                let recorded = if done { lane.recorded.take() } else { None };
                let Some((held, finished)) = complete(&job, part, outcome, recorded) else {
                    continue;
                };
                let message = match finished {
                    false => Ok(released(held)),
                    true => self.out.verdict(&job, key.0).map(|()| released(held)),
                };
                if self.out.tx.send(message).is_err() {
                    return; // the load failed: the consumer is gone
                }
                if finished {
                    self.out.keep_states(&job, key.0);
                }
            }
        }
    }
}

impl Out {
    /// Decides file `file`'s check once every lane has given its outcome.
    fn verdict(&self, job: &FileJob, file: usize) -> Result<()> {
        let progress = job.progress.lock();
        let outcomes: Vec<Digest> =
            progress.outcomes.iter().map(|o| o.expect("every lane done")).collect();
        let (digest, hashing) = match &job.mode {
            Mode::Sequential { .. } => {
                let note = "sequential".to_owned();
                (outcomes[0], Hashing::Sequential { note })
            }
            Mode::Parallel { record, .. } => {
                let chained =
                    record.starts.iter().zip(&outcomes).all(|(s, o)| states::state_bytes(s) == *o);
                let segments = outcomes.len();
                if chained && outcomes[segments - 1] == record.digest {
                    (record.digest, Hashing::Parallel { segments })
                } else {
                    drop(progress);
                    return self.recheck(job, file, &outcomes);
                }
            }
        };
        self.outcomes.lock()[file] = Some((digest, hashing));
        match job.known.as_ref().filter(|k| k.digest != digest) {
            Some(known) => Err(mismatch(job, known, to_hex(&digest))),
            None => Ok(()),
        }
    }

    /// The segments of `job` did not chain: hashes the file again from storage and decides by
    /// that (see [`states::reread`]).
    fn recheck(&self, job: &FileJob, file: usize, outcomes: &[Digest]) -> Result<()> {
        let Mode::Parallel { record, dir } = &job.mode else { unreachable!("parallel only") };
        let known = job.known.as_ref().expect("parallel files have a known digest");
        let used: Vec<State> = [IV].into_iter().chain(record.starts.iter().copied()).collect();
        log::info!(
            "{}: SHA-256 segments did not chain; hashing the file again",
            job.path.display()
        );
        let reread = states::reread(&job.path, job.file_bytes, job.segment_bytes, &used, outcomes)
            .map_err(|source| Error::Io {
                op: "read again for its SHA-256 (its segments did not chain)",
                path: job.path.clone(),
                offset: 0,
                len: job.file_bytes,
                source,
            })?;
        let segments = outcomes.len();
        self.outcomes.lock()[file] = Some((reread.digest, Hashing::Reread { segments }));
        if reread.digest != known.digest {
            return Err(mismatch(job, known, to_hex(&reread.digest)));
        }
        if let Some(&k) = reread.differ.first() {
            let (start, end) = job.lane_range(k);
            let actual = format!(
                "something else (bytes {start}..{end} as read differ from the file read again)"
            );
            return Err(mismatch(job, known, actual));
        }
        let fresh = Record { starts: reread.starts, ..record.clone() };
        store_logged(dir.as_deref(), &fresh, job);
        Ok(())
    }

    /// After a sequential file's digest matched its known digest: its record, for next time.
    fn keep_states(&self, job: &FileJob, file: usize) {
        let Mode::Sequential { dir } = &job.mode else { return };
        let starts = std::mem::take(&mut job.progress.lock().recorded);
        let mut outcomes = self.outcomes.lock();
        let Some((digest, Hashing::Sequential { note })) = outcomes[file].as_mut() else {
            return;
        };
        let matched = job.known.as_ref().is_some_and(|k| k.digest == *digest);
        let why_not = match dir {
            _ if !matched => return,
            _ if starts.is_empty() => "one segment: nothing to record",
            _ if !job.rereadable => "not a local file: no states recorded",
            None => "no directory for segment states (set GANTRY_SHA256_STATES_DIR or HOME)",
            Some(dir) => {
                let record = Record {
                    segment_bytes: job.segment_bytes,
                    file_bytes: job.file_bytes,
                    digest: *digest,
                    starts,
                };
                match store_logged(Some(dir), &record, job) {
                    true => "states recorded",
                    false => "the states could not be recorded",
                }
            }
        };
        *note = format!("sequential, {why_not}");
    }
}

impl Lane {
    fn pop_next(&mut self) -> Option<Part> {
        let entry = self.waiting.first_entry()?;
        (*entry.key() == self.next).then(|| entry.remove())
    }

    fn hash(&mut self, job: &FileJob, mut bytes: &[u8]) {
        let len = bytes.len() as u64;
        let _span = crate::trace::span("hash", "sha256").args(|a| a.u64("bytes", len));
        let Some(recorded) = self.recorded.as_mut() else {
            self.chain.update(bytes);
            self.next += bytes.len() as u64;
            return;
        };
        let s = job.segment_bytes;
        while !bytes.is_empty() {
            let take = bytes.len().min((s - self.next % s) as usize);
            self.chain.update(&bytes[..take]);
            bytes = &bytes[take..];
            self.next += take as u64;
            if self.next % s == 0 && self.next < job.file_bytes {
                recorded.push(self.chain.state().expect("segments are whole blocks"));
            }
        }
    }
}

/// Counts `part` hashed (with its lane's outcome when the lane is done). Returns its extent
/// when this was the extent's last part, with whether it was the file's last part.
fn complete(
    job: &FileJob,
    part: Part,
    outcome: Option<Digest>,
    recorded: Option<Vec<State>>,
) -> Option<(Held, bool)> {
    let mut progress = job.progress.lock();
    if let Some(outcome) = outcome {
        progress.outcomes[part.lane] = Some(outcome);
    }
    if let Some(recorded) = recorded {
        progress.recorded = recorded;
    }
    progress.parts_left -= 1;
    // Under the file's lock, so that the last part of the file is also the last of its extent.
    let held = Arc::into_inner(part.held)?;
    Some((held, progress.parts_left == 0))
}

fn released(held: Held) -> Message {
    let lease = match held.bytes {
        Bytes::Staged(lease) => Some(lease),
        Bytes::Direct(_) => None,
    };
    Message::Hashed { extent: held.extent, lease }
}

fn mismatch(job: &FileJob, known: &Known, actual: String) -> Error {
    Error::Integrity {
        path: job.path.clone(),
        expected: to_hex(&known.digest),
        actual,
        expected_from: known.source.clone(),
    }
}

/// Writes `record`; a failure costs a warning. Returns whether it was written.
fn store_logged(dir: Option<&Records>, record: &Record, job: &FileJob) -> bool {
    let Some(dir) = dir else { return false };
    match dir.store(record) {
        Ok(path) => {
            log::debug!(
                "{}: SHA-256 segment states kept in {}",
                job.path.display(),
                path.display()
            );
            true
        }
        Err(e) => {
            log::warn!(
                "{}: its SHA-256 segment states could not be kept in {}: {e}",
                job.path.display(),
                dir.path().display()
            );
            false
        }
    }
}
