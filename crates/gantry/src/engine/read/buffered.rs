//! The page-cache reader: several threads of `pread`.
//!
//! When a file is already in the page cache, reading it is a memory copy, and one thread
//! cannot copy fast enough to keep up with the memory system: several threads can. The
//! threads take extents in order from a shared cursor, so the file is still read roughly
//! front to back (which keeps kernel readahead useful for files that are only partly cached).
//!
//! Two modes: into leased staging buffers (the consumer copies out, as for the direct
//! reader), or straight into the extents' destinations when the sink can take them whole,
//! which saves the second copy.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use parking_lot::Mutex;

use super::uring::Job;
use super::ReaderFiles;
use super::{complete, fault::FaultInjector, read_error, Completion, Message, OpenFile};
use crate::engine::staging::{Lease, Pool};
use crate::error::{Error, Result};

/// What every buffered thread shares.
#[derive(Debug, Clone, Copy)]
pub struct Shared<'a> {
    /// The files, by `Job::file`.
    pub files: &'a ReaderFiles<'a, OpenFile>,
    /// Rewrites results, for tests.
    pub fault: Option<&'a dyn FaultInjector>,
    /// Set when the load failed: threads stop taking work.
    pub cancel: &'a AtomicBool,
    /// CPUs to run on (the staging memory's NUMA node); empty: any.
    pub cpus: &'a [usize],
}

/// Reads `jobs` into leased staging buffers on `threads` threads.
pub fn run_staged(
    shared: Shared<'_>,
    jobs: &[Job],
    pool: &Arc<Pool>,
    threads: usize,
    tx: &Sender<Result<Message>>,
) {
    let next = AtomicUsize::new(0);
    let trace = crate::trace::current();
    std::thread::scope(|scope| {
        for n in 0..threads.min(jobs.len()) {
            let (tx, trace) = (tx.clone(), trace.clone());
            let next = &next;
            scope.spawn(move || {
                let _in = crate::trace::enter(trace.as_ref(), &format!("buffered reader {n}"));
                crate::engine::topology::pin_current_thread(shared.cpus);
                loop {
                    // The lease before the job: jobs then hold leases in job order, so the
                    // earliest extent not yet done always holds one (the integrity check
                    // waits for a file's extents in order while holding later ones).
                    let Some(mut lease) = pool.acquire() else {
                        return;
                    };
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= jobs.len() || shared.cancel.load(Ordering::Relaxed) {
                        return;
                    }
                    let job = jobs[i];
                    let buf = &mut lease.as_mut_slice()[..job.len as usize];
                    let message = match read_full(shared, job, buf) {
                        Ok(()) => Ok(Message::Staged { extent: job.extent, lease }),
                        Err(e) => unread(shared, job, Some(lease), e),
                    };
                    let failed = message.is_err();
                    if tx.send(message).is_err() || failed {
                        return;
                    }
                }
            });
        }
    });
}

/// Reads each job straight into its destination slice on `threads` threads.
pub fn run_into(
    shared: Shared<'_>,
    jobs: Vec<(Job, &mut [u8])>,
    threads: usize,
    tx: &Sender<Result<Message>>,
) {
    let threads = threads.min(jobs.len());
    let queue = Mutex::new(jobs.into_iter());
    let trace = crate::trace::current();
    std::thread::scope(|scope| {
        for n in 0..threads {
            let (tx, trace) = (tx.clone(), trace.clone());
            let queue = &queue;
            scope.spawn(move || {
                let _in = crate::trace::enter(trace.as_ref(), &format!("buffered reader {n}"));
                crate::engine::topology::pin_current_thread(shared.cpus);
                loop {
                    if shared.cancel.load(Ordering::Relaxed) {
                        return;
                    }
                    let Some((job, target)) = queue.lock().next() else { return };
                    let message = match read_full(shared, job, target) {
                        Ok(()) => Ok(Message::Direct { extent: job.extent }),
                        Err(e) => unread(shared, job, None, e),
                    };
                    let failed = message.is_err();
                    if tx.send(message).is_err() || failed {
                        return;
                    }
                }
            });
        }
    });
}

/// What a failed read of `job` (`error`) goes on as: of a cache copy, the extent unread with
/// its buffer (the load goes on); of any other file, the load's error (the thread ends).
fn unread(shared: Shared<'_>, job: Job, lease: Option<Lease>, error: Error) -> Result<Message> {
    if shared.files.get(job.file).cache_copy {
        Ok(Message::Unread { extent: job.extent, lease, error })
    } else {
        Err(error)
    }
}

/// Fills `buf` (the job's `len` bytes) with `pread`, continuing short reads and retrying
/// interrupted ones.
fn read_full(shared: Shared<'_>, job: Job, buf: &mut [u8]) -> Result<()> {
    let file = shared.files.get(job.file);
    let _span = crate::trace::span("read", "read").args(|a| {
        let a = a.str("reader", "buffered").str("volume", "buffered");
        a.str("file", file.path.display().to_string())
            .u64("offset", job.offset)
            .u64("bytes", job.len)
    });
    let mut valid = 0u64;
    while valid < job.len {
        let offset = job.offset + valid;
        let want = &mut buf[valid as usize..];
        let mut result = match file.file.read_at(want, offset) {
            Ok(n) => n as i64,
            Err(e) => -i64::from(e.raw_os_error().unwrap_or(libc::EIO)),
        };
        if let Some(fault) = shared.fault {
            result = fault.rewrite(job.file.0, offset, want.len() as u64, result);
        }
        match complete(result, valid, job.len) {
            Completion::Done => return Ok(()),
            Completion::Continue { valid: v } => valid = v,
            Completion::Retry => {}
            failed => return Err(read_error(file, job.offset, valid, job.len - valid, failed)),
        }
    }
    Ok(())
}
