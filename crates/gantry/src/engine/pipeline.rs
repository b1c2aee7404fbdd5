//! One load's moving parts: readers on their own threads, the consumer on the caller's.
//!
//! Readers send each finished extent over one channel. The consumer (the thread that called
//! `load`) hands staged extents to the sink, counts down each tensor's outstanding copy steps
//! as extents land, and calls the ready callback when a tensor's count reaches zero. So
//! callbacks run on the caller's thread, never inside a reap loop, and the staging ring is the
//! only memory in flight. On the first error every reader is told to stop (the pool is closed
//! and the cancel flag set); the error is returned only after every thread has finished and
//! every in-flight read has completed. Extents read from a cache copy go to the copy's
//! check first ([`crate::source::cache::check`]) (and so do failed reads of a copy, which are
//! not the load's error: the check fetches those extents from the store), then, when the load verifies SHA-256, to the
//! hashing threads, and only then to the sink.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use gantry_format::FileId;

use crate::config::Settings;
use crate::cuda::CudaDevice;
use crate::engine::read::{buffered, gds, uring, Message, OpenFile, ReaderFiles};
use crate::engine::sink::{RawTarget, Sink};
use crate::engine::staging::Pool;
use crate::error::{Error, Result};
use crate::integrity::{self, Verifier};
use crate::plan::interleave::{interleave, Read};
use crate::plan::schedule::Choice;
use crate::plan::Plan;
use crate::source::{cache, object};

/// The files of one load: every file it reads, in checkpoint order, and the volumes under
/// those read with `O_DIRECT`. Each reader's own list is built from it where the reader is
/// spawned ([`ReaderFiles`]), and every job names its file by its checkpoint position.
#[derive(Debug, Default)]
pub struct Files {
    /// The opened files, in checkpoint order.
    pub opened: Vec<OpenedFile>,
    /// Files in the checkpoint (opened or not).
    pub checkpoint_files: usize,
    /// The volumes under the direct files, each read with its own queue.
    pub volumes: Vec<Volume>,
    /// What the object reader's GETs measure, and how many it keeps in flight.
    pub net: Arc<object::tune::Net>,
}

/// One file a load reads: how, why, and which bytes it stands for.
#[derive(Debug)]
pub struct OpenedFile {
    /// Its position in the checkpoint.
    pub id: FileId,
    /// The reader that reads it, with what that reader needs.
    pub reader: Reader,
    /// The schedule's choice of reader, and why.
    pub choice: Choice,
    /// The probed facts the choice was made from, in one line.
    pub facts: String,
    /// Whose bytes these are: a local file's own, or an object's.
    pub identity: Identity,
}

/// A file's reader, holding what that reader needs.
#[derive(Debug)]
pub enum Reader {
    /// io_uring with `O_DIRECT`: the file opened so, and its volume (a position in
    /// [`Files::volumes`]).
    Direct {
        /// The `O_DIRECT` file.
        file: OpenFile,
        /// Its volume.
        volume: usize,
    },
    /// `pread` on several threads.
    Buffered(OpenFile),
    /// cuFile, straight to the GPU.
    Gds(OpenFile),
    /// Ranged GETs from object storage (written through to the cache when it has a writer).
    Object(object::ObjectFile),
}

/// Whose bytes a file holds.
#[derive(Debug)]
pub enum Identity {
    /// A local file's own, identified by the header that was read from it.
    Local,
    /// An object's, as the load opened it, read from the store or from `copy`.
    Object {
        /// The object (without its cache writer).
        object: Box<object::ObjectFile>,
        /// The cache copy the file is read from: each extent read from it is checked against
        /// its record before anything else sees it ([`cache::check`]).
        copy: Option<Arc<cache::check::Checked>>,
    },
}

impl Files {
    /// The opened file `id`, or `None` when nothing is read from it.
    pub fn get(&self, id: FileId) -> Option<&OpenedFile> {
        let i = self.opened.binary_search_by_key(&id, |f| f.id).ok()?;
        Some(&self.opened[i])
    }

    /// Per checkpoint file, the cache copy it is read from, if any.
    pub fn copies(&self) -> Vec<Option<Arc<cache::check::Checked>>> {
        let mut copies = vec![None; self.checkpoint_files];
        for f in &self.opened {
            if let Identity::Object { copy: Some(copy), .. } = &f.identity {
                copies[f.id.0] = Some(Arc::clone(copy));
            }
        }
        copies
    }

    /// The files of the direct reader, with each one's volume.
    fn direct(&self) -> impl Iterator<Item = (FileId, &OpenFile, usize)> {
        self.opened.iter().filter_map(|f| match &f.reader {
            Reader::Direct { file, volume } => Some((f.id, file, *volume)),
            _ => None,
        })
    }

    /// The files of the reader `select` picks out.
    fn of<'a, T>(&'a self, select: impl Fn(&'a Reader) -> Option<&'a T>) -> ReaderFiles<'a, T> {
        ReaderFiles::new(self.opened.iter().filter_map(|f| Some((f.id, select(&f.reader)?))))
    }
}

/// A volume under the direct files of a load, and how it is read.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume {
    /// The whole disk's name (`nvme0n1`, `vda`, `loop3`), or its device number.
    pub name: String,
    /// Bytes per read.
    pub chunk_bytes: usize,
    /// Reads in flight.
    pub queue_depth: usize,
    /// What the `auto` profile measured and picked, in one line; `None` for settings given
    /// explicitly.
    pub choice: Option<String>,
}

/// The jobs of one load, split by reader.
#[derive(Debug, Default)]
pub struct Jobs {
    direct: Vec<uring::Job>,
    staged: Vec<uring::Job>,
    into: Vec<(uring::Job, RawTarget)>,
    /// Per extent of a cuFile file, its reads (one per copy step, straight to the tensor).
    gds: Vec<Vec<gds::GdsRead>>,
    object: Vec<uring::Job>,
}

impl Jobs {
    /// Sorts every extent of `plan` to its reader, asking the sink where it can take an
    /// extent in place.
    pub fn new(plan: &Plan, files: &Files, sink: &mut dyn Sink) -> Self {
        let mut jobs = Jobs::default();
        for (i, e) in plan.extents.iter().enumerate() {
            let opened = files.get(e.file).expect("extent of a file that is not open");
            let steps = &plan.steps[e.steps.clone()];
            let file = e.file;
            let job = uring::Job { extent: i, file, offset: e.offset, len: e.len, target: None };
            if let Reader::Object(_) = opened.reader {
                // Host destinations take whole extents in place: no staging copy.
                let target = sink.direct_target(e, steps, 1);
                jobs.object.push(uring::Job { target, ..job });
            } else if let Reader::Gds(_) = opened.reader {
                let reads: Vec<gds::GdsRead> = steps
                    .iter()
                    .enumerate()
                    .map(|(k, s)| gds::GdsRead {
                        extent: i,
                        file,
                        file_offset: e.offset + s.source_offset,
                        len: s.len,
                        device_base: sink
                            .device_pointer(s.tensor)
                            .expect("cuFile loads go to a GPU"),
                        device_offset: s.target_offset,
                        last_of_extent: k + 1 == steps.len(),
                    })
                    .collect();
                jobs.gds.push(reads);
            } else if let Reader::Direct { file, .. } = &opened.reader {
                let align = file.align;
                let target = sink.direct_target(e, steps, align);
                if let Some(t) = target {
                    assert!(
                        t.len as u64 == e.len.next_multiple_of(align) && t.ptr as u64 % align == 0
                    );
                }
                jobs.direct.push(uring::Job { target, ..job });
            } else if let Some(target) = sink.direct_target(e, steps, 1) {
                assert_eq!(target.len as u64, e.len);
                jobs.into.push((job, target));
            } else {
                jobs.staged.push(job);
            }
        }
        jobs.interleave_buffered(files);
        jobs
    }

    /// Orders the buffered reader's and the object reader's jobs so that every file is in
    /// flight: files advance together, each front to back (their volumes are not measured:
    /// one queue). For objects this also keeps every cache copy's writer busy at once, rather
    /// than one file's after another's (a copy is written by one thread).
    fn interleave_buffered(&mut self, files: &Files) {
        fn one_queue(files: usize, jobs: &[uring::Job]) -> Vec<usize> {
            let volume_of = vec![0; files];
            let reads: Vec<Read> =
                jobs.iter().map(|j| Read { file: j.file.0, len: j.len }).collect();
            interleave(&reads, &volume_of, 1).swap_remove(0)
        }
        let count = files.checkpoint_files;
        let order = one_queue(count, &self.staged);
        self.staged = order.iter().map(|&i| self.staged[i]).collect();
        let into: Vec<uring::Job> = self.into.iter().map(|(j, _)| *j).collect();
        let order = one_queue(count, &into);
        self.into = order.iter().map(|&i| self.into[i]).collect();
        let order = one_queue(count, &self.object);
        self.object = order.iter().map(|&i| self.object[i]).collect();
    }

    /// The direct reader's jobs as one queue per volume of `files`, files interleaved within
    /// each (positions in the direct jobs).
    fn direct_queues(&self, files: &Files) -> Vec<Vec<usize>> {
        let reads: Vec<Read> =
            self.direct.iter().map(|j| Read { file: j.file.0, len: j.len }).collect();
        let mut volume_of = vec![0; files.checkpoint_files];
        for (id, _, volume) in files.direct() {
            volume_of[id.0] = volume;
        }
        interleave(&reads, &volume_of, files.volumes.len())
    }

    /// Extents of the direct reader that pass through the staging ring.
    pub fn staged_direct_count(&self) -> usize {
        self.direct.iter().filter(|j| j.target.is_none()).count()
    }

    /// Extents that pass through the staging ring.
    pub fn staged_count(&self) -> usize {
        self.direct.iter().filter(|j| j.target.is_none()).count()
            + self.staged.len()
            + self.object.iter().filter(|j| j.target.is_none()).count()
    }

    /// Per extent of `plan`, the destination a reader writes it to, if any.
    pub fn targets(&self, plan: &Plan) -> Vec<Option<RawTarget>> {
        let mut targets = vec![None; plan.extents.len()];
        for job in self.direct.iter().chain(&self.object) {
            targets[job.extent] = job.target;
        }
        for (job, target) in &self.into {
            targets[job.extent] = Some(*target);
        }
        targets
    }

    /// Whether any extent from object storage passes through the staging ring.
    pub fn has_staged_objects(&self) -> bool {
        self.object.iter().any(|j| j.target.is_none())
    }
}

/// The staging ring of one load: its pool (absent when nothing is staged), and whether the
/// direct reader should register it with io_uring.
#[derive(Debug, Clone)]
pub struct Staging {
    /// Free list over the loader's arena.
    pub pool: Option<Arc<Pool>>,
    /// Register the arena as io_uring fixed buffers.
    pub register_buffers: bool,
    /// CPUs the reader threads run on (the staging memory's NUMA node); empty: any.
    pub cpus: Vec<usize>,
    /// The GPU of a device load (cuFile reads need its context).
    pub device: Option<Arc<CudaDevice>>,
}

/// Runs a load to completion. `on_landed(t)` is called once for every tensor whose copy steps
/// have all landed. With `checks`, the files they name (planned whole) are hashed on the way
/// ([`crate::integrity`]) and their digests filled in.
#[allow(clippy::too_many_arguments)]
pub fn run(
    plan: &Plan,
    files: &Files,
    jobs: Jobs,
    staging: Staging,
    config: &Settings,
    sink: &mut dyn Sink,
    checks: Option<&mut integrity::Checks>,
    on_landed: &mut dyn FnMut(usize),
) -> Result<()> {
    let Staging { pool, register_buffers, cpus, device } = staging;
    let cpus = cpus.as_slice();
    assert!(jobs.staged_count() == 0 || pool.is_some(), "staged extents need a pool");
    let (tx, rx) = mpsc::channel::<Result<Message>>();
    let cancel = AtomicBool::new(false);
    let fault = config.fault.as_deref();
    let mut remaining: Vec<u32> = plan.steps_per_tensor.clone();
    let mut outstanding = plan.extents.len();
    let mut failure: Option<Error> = None;
    let copies = files.copies();
    let checker = cache::check::Checker::start(plan, &copies, jobs.targets(plan), cpus, &tx)?;
    let verifier = match &checks {
        Some(c) => {
            let states = integrity::StatesSettings::new(
                config.cache_dir.as_deref(),
                config.sha256_segment_bytes,
            );
            Some(Verifier::start(plan, c, jobs.targets(plan), cpus, &states, &tx)?)
        }
        None => None,
    };
    let buffered_files = files.of(|r| match r {
        Reader::Buffered(file) => Some(file),
        _ => None,
    });
    let trace = crate::trace::current();
    let trace = trace.as_ref();
    std::thread::scope(|scope| {
        if !jobs.direct.is_empty() {
            let (tx, pool) = (tx.clone(), pool.clone());
            let queues = jobs.direct_queues(files);
            let depths: Vec<usize> = files.volumes.iter().map(|v| v.queue_depth).collect();
            let names: Vec<String> = files.volumes.iter().map(|v| v.name.clone()).collect();
            let direct = &jobs.direct;
            scope.spawn(move || {
                let _in = crate::trace::enter(trace, "direct reader (io_uring)");
                let settings = uring::Settings {
                    depths: &depths,
                    names: &names,
                    register_buffers,
                    fault,
                    cpus,
                };
                let files = ReaderFiles::new(files.direct().map(|(id, file, _)| (id, file)));
                uring::run(&files, direct, &queues, pool.as_ref(), settings, &tx)
            });
        }
        let shared = buffered::Shared { files: &buffered_files, fault, cancel: &cancel, cpus };
        if !jobs.staged.is_empty() {
            let (tx, pool, staged) = (tx.clone(), pool.clone().expect("pool"), &jobs.staged);
            scope.spawn(move || {
                let _in = crate::trace::enter(trace, "buffered reader");
                buffered::run_staged(shared, staged, &pool, config.threads, &tx)
            });
        }
        if !jobs.gds.is_empty() {
            let (tx, reads, cancel) = (tx.clone(), &jobs.gds, &cancel);
            let device = device.clone().expect("cuFile loads go to a GPU");
            let threads = config.queue_depth;
            scope.spawn(move || {
                let _in = crate::trace::enter(trace, "cuFile reader");
                let files = files.of(|r| match r {
                    Reader::Gds(file) => Some(file),
                    _ => None,
                });
                gds::run(&files, reads, &device, threads, cancel, fault, &tx)
            });
        }
        if !jobs.object.is_empty() {
            let (tx, pool, jobs, cancel) = (tx.clone(), pool.clone(), &jobs.object, &cancel);
            let net = &files.net;
            let fault = config.fault.clone();
            scope.spawn(move || {
                let _in = crate::trace::enter(trace, "object reader");
                let files = files.of(|r| match r {
                    Reader::Object(object) => Some(object),
                    _ => None,
                });
                object::run(&files, jobs, pool.as_ref(), net, cancel, fault, &tx)
            });
        }
        if !jobs.into.is_empty() {
            let tx = tx.clone();
            let into: Vec<_> = jobs
                .into
                .iter()
                .map(|&(job, target)| {
                    // SAFETY: targets of different extents never overlap (Sink::direct_target),
                    // each goes to one thread, and the destination outlives this scope.
                    (job, unsafe { std::slice::from_raw_parts_mut(target.ptr, target.len) })
                })
                .collect();
            scope.spawn(move || {
                let _in = crate::trace::enter(trace, "buffered reader");
                buffered::run_into(shared, into, config.threads, &tx)
            });
        }

        // Owned here, so that dropping it on failure stops the readers at their next send.
        let rx = rx;
        let cancelled = || config.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed));
        while outstanding > 0 {
            if cancelled() {
                failure = Some(Error::Cancelled);
                break;
            }
            let message = match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => {
                    failure = Some(e);
                    break;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    unreachable!("the consumer holds a sender")
                }
            };
            // Extents read from cache copies are checked first, and come back checked.
            let message = match &checker {
                None => message,
                Some(c) => match c.admit(plan, message) {
                    Ok(Some(m)) => m,
                    Ok(None) => continue,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                },
            };
            // Extents of verified files go to be hashed first, and come back as `Hashed`.
            let message = match &verifier {
                None => message,
                Some(v) => match v.admit(plan, message) {
                    Ok(Some(m)) => m,
                    Ok(None) => continue,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                },
            };
            let extent = match message {
                Message::Staged { extent, lease } => {
                    let steps = &plan.steps[plan.extents[extent].steps.clone()];
                    match sink.deliver(extent, steps, lease, &tx) {
                        Ok(true) => extent,
                        Ok(false) => continue,
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
                Message::Direct { extent } | Message::Landed { extent } => extent,
                // A failed read that no copy's check took: the load's error, as of any file.
                Message::Unread { error, .. } => {
                    failure = Some(error);
                    break;
                }
                Message::Hashed { .. } => unreachable!("the verifier turns hashed extents back"),
            };
            outstanding -= 1;
            for step in &plan.steps[plan.extents[extent].steps.clone()] {
                remaining[step.tensor] -= 1;
                if remaining[step.tensor] == 0 {
                    on_landed(step.tensor);
                }
            }
        }
        if failure.is_some() {
            drop(rx);
            cancel.store(true, Ordering::Relaxed);
            if let Some(pool) = &pool {
                pool.close();
            }
        }
    });
    if let Some(e) = failure {
        drop(checker); // its threads end and drop the leases they held
        drop(verifier); // its threads end and drop the leases they held
        sink.settle(); // copies still in flight read staging: wait before the lock goes
        return Err(e);
    }
    if let (Some(verifier), Some(checks)) = (verifier, checks) {
        for (check, outcome) in checks.iter_mut().zip(verifier.finish()) {
            if let (Some(check), Some((digest, hashing))) = (check, outcome) {
                check.sha256 = Some(digest);
                check.hashing = Some(hashing);
            }
        }
    }
    Ok(())
}
