//! The cold-file reader: io_uring, `O_DIRECT`, registered files, and `ReadFixed` into the
//! staging ring's registered buffers.
//!
//! One thread owns the ring (so `SINGLE_ISSUER` holds) and keeps every volume of the load
//! busy: the reads come in one queue per volume (see [`crate::plan::interleave`]), each with its own
//! depth, and the reader tops every queue up in turn, one extent into one leased buffer per
//! read. A volume that answers slowly holds only its own depth of buffers. Completions are reaped in a batch and
//! acted on after the batch, never inside the reap loop. A finished extent's lease travels to
//! the consumer, which drops it when its copies are done; only then can the buffer be filled
//! again. On any error the ring is drained before the function returns, so the kernel never
//! writes into a buffer that has gone back to the pool.

use std::os::fd::AsRawFd;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};

use gantry_format::FileId;

use super::{complete, fault::FaultInjector, read_error, Completion, Message, OpenFile};
use super::{RawTarget, ReaderFiles};
use crate::engine::staging::{Lease, Pool};
use crate::error::{Error, Result};

/// One extent for the direct reader.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    /// Position of the extent in the plan.
    pub extent: usize,
    /// The file, by its position in the checkpoint.
    pub file: FileId,
    /// Absolute, aligned file offset.
    pub offset: u64,
    /// Bytes needed.
    pub len: u64,
    /// Where to read the extent to, when the sink can take it in place; else a staging buffer.
    pub target: Option<RawTarget>,
}

/// Settings of one run of the direct reader.
#[derive(Debug, Clone, Copy)]
pub struct Settings<'a> {
    /// Reads in flight per volume, by volume.
    pub depths: &'a [usize],
    /// Each volume's name (for the load's trace).
    pub names: &'a [String],
    /// Register the arena as fixed buffers (falls back, logged, if the kernel refuses).
    pub register_buffers: bool,
    /// Rewrites results, for tests.
    pub fault: Option<&'a dyn FaultInjector>,
    /// CPUs to run on (the staging memory's NUMA node); empty: any.
    pub cpus: &'a [usize],
}

/// Where a read in flight lands.
enum Buffer {
    Staging(Lease),
    Target(RawTarget),
}

struct Slot {
    job: Job,
    /// The volume whose queue the job came from.
    volume: usize,
    buffer: Buffer,
    /// Bytes of the extent already in the buffer from its first byte.
    valid: u64,
    /// Where the request in flight starts, in bytes from the extent's start.
    start: u64,
    /// When the extent's first request was issued, when the load is traced.
    begin_ns: Option<u64>,
}

/// Reads `jobs`, volume `v`'s in the order `queues[v]` lists them, `settings.depths[v]` at a
/// time, sending each finished extent (or the first error) to `tx`. Returns when every job is
/// sent, on the first error, or when the consumer has gone away.
pub fn run(
    files: &ReaderFiles<'_, OpenFile>,
    jobs: &[Job],
    queues: &[Vec<usize>],
    pool: Option<&Arc<Pool>>,
    settings: Settings<'_>,
    tx: &Sender<Result<Message>>,
) {
    assert_eq!(queues.len(), settings.depths.len(), "one depth per volume");
    crate::engine::topology::pin_current_thread(settings.cpus);
    let mut reader = match Reader::new(files, pool, settings) {
        Ok(r) => r,
        Err(e) => {
            let _ = tx.send(Err(e));
            return;
        }
    };
    if let Err(e) = reader.read_all(jobs, queues, tx) {
        let _ = tx.send(Err(e));
    }
    reader.drain();
}

struct Reader<'a> {
    ring: IoUring,
    /// The files, registered with the ring in this list's order.
    files: &'a ReaderFiles<'a, OpenFile>,
    pool: Option<&'a Arc<Pool>>,
    fixed_buffers: bool,
    fault: Option<&'a dyn FaultInjector>,
    depths: &'a [usize],
    names: &'a [String],
    /// Per (volume, slot), its track in the load's trace.
    tracks: std::collections::HashMap<(usize, usize), Option<u32>>,
    slots: Vec<Option<Slot>>,
    in_flight: usize,
    /// Reads in flight per volume.
    volume_in_flight: Vec<usize>,
}

impl<'a> Reader<'a> {
    fn new(
        files: &'a ReaderFiles<'a, OpenFile>,
        pool: Option<&'a Arc<Pool>>,
        settings: Settings<'a>,
    ) -> Result<Self> {
        let queue_depth: usize = settings.depths.iter().sum::<usize>().max(1);
        let entries = queue_depth.next_power_of_two() as u32;
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(entries)
            .or_else(|_| IoUring::new(entries))
            .map_err(|source| Error::Resource { what: "io_uring setup", source })?;
        let fds: Vec<i32> = files.iter().map(|(_, f)| f.file.as_raw_fd()).collect();
        ring.submitter()
            .register_files(&fds)
            .map_err(|source| Error::Resource { what: "io_uring file registration", source })?;
        let mut fixed_buffers = false;
        if settings.register_buffers && pool.is_some() {
            let iovecs = pool.map_or_else(Vec::new, |p| p.iovecs());
            // SAFETY: the iovecs describe the arena's mapping, which outlives the ring (the
            // pool holds an Arc to it and `pool` outlives `self`).
            match unsafe { ring.submitter().register_buffers(&iovecs) } {
                Ok(()) => fixed_buffers = true,
                Err(e) => log::info!(
                    "io_uring buffer registration failed ({e}); reading into unregistered buffers"
                ),
            }
        }
        let slots = (0..queue_depth).map(|_| None).collect();
        Ok(Self {
            ring,
            files,
            pool,
            fixed_buffers,
            fault: settings.fault,
            depths: settings.depths,
            names: settings.names,
            tracks: std::collections::HashMap::new(),
            slots,
            in_flight: 0,
            volume_in_flight: vec![0; settings.depths.len()],
        })
    }

    fn read_all(
        &mut self,
        jobs: &[Job],
        queues: &[Vec<usize>],
        tx: &Sender<Result<Message>>,
    ) -> Result<()> {
        let mut next = vec![0usize; queues.len()];
        let mut turn = 0usize;
        let mut reaped = Vec::with_capacity(self.slots.len());
        loop {
            self.issue(jobs, queues, &mut next, &mut turn);
            if self.in_flight == 0 {
                // Every job sent, or the pool was closed because the load failed elsewhere.
                return Ok(());
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(source) => return Err(Error::Resource { what: "io_uring submit", source }),
            }
            reaped.clear();
            reaped.extend(self.ring.completion().map(|c| (c.user_data() as usize, c.result())));
            for (i, &(slot, result)) in reaped.iter().enumerate() {
                match self.on_completion(slot, result) {
                    Ok(None) => {}
                    Ok(Some(filled)) => {
                        if tx.send(Ok(filled)).is_err() {
                            // The consumer is gone: the load was abandoned.
                            self.release(&reaped[i + 1..]);
                            return Ok(());
                        }
                    }
                    Err(e) => {
                        self.release(&reaped[i + 1..]);
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Tops every volume's queue up to its depth, one read per volume in turn (starting where
    /// the last call stopped), until no volume can take another read or the ring has no free
    /// buffer. Blocks for a buffer only when nothing is in flight.
    fn issue(&mut self, jobs: &[Job], queues: &[Vec<usize>], next: &mut [usize], turn: &mut usize) {
        let volumes = queues.len();
        let mut idle = 0;
        while idle < volumes {
            let v = *turn % volumes;
            *turn = turn.wrapping_add(1);
            if self.volume_in_flight[v] >= self.depths[v] || next[v] >= queues[v].len() {
                idle += 1;
                continue;
            }
            let job = jobs[queues[v][next[v]]];
            let buffer = match job.target {
                Some(target) => Buffer::Target(target),
                None => {
                    let pool = self.pool.expect("staged jobs need a pool");
                    let lease =
                        if self.in_flight == 0 { pool.acquire() } else { pool.try_acquire() };
                    match lease {
                        Some(lease) => Buffer::Staging(lease),
                        // No buffer free (or the pool was closed): wait for a completion.
                        None => return,
                    }
                }
            };
            let slot = self.slots.iter().position(Option::is_none).expect("a free slot");
            let begin_ns = crate::trace::now();
            self.slots[slot] = Some(Slot { job, volume: v, buffer, valid: 0, start: 0, begin_ns });
            self.push(slot);
            self.in_flight += 1;
            self.volume_in_flight[v] += 1;
            next[v] += 1;
            idle = 0;
        }
    }

    /// Acts on one completion: a finished extent comes back for the consumer; a short read or
    /// an interrupted one is issued again.
    fn on_completion(&mut self, slot: usize, result: i32) -> Result<Option<Message>> {
        let s = self.slots[slot].as_mut().expect("completion for an empty slot");
        let (align, job) = (self.files.get(s.job.file).align, s.job);
        let request_len = job.len.next_multiple_of(align) - s.start;
        let mut result = i64::from(result);
        if let Some(fault) = self.fault {
            result = fault.rewrite(job.file.0, job.offset + s.start, request_len, result);
        }
        let mut completion = complete(result, s.start, job.len);
        if let Completion::Continue { valid } = completion {
            if valid <= s.valid {
                // A direct read resumes at the aligned block below `valid`; getting no further
                // than before means the file ends there.
                completion = Completion::Truncated { at: valid };
            }
        }
        match completion {
            Completion::Done => {
                let s = self.slots[slot].take().expect("slot");
                self.in_flight -= 1;
                self.volume_in_flight[s.volume] -= 1;
                self.traced(slot, &s);
                Ok(Some(match s.buffer {
                    Buffer::Staging(lease) => Message::Staged { extent: job.extent, lease },
                    Buffer::Target(_) => Message::Direct { extent: job.extent },
                }))
            }
            Completion::Continue { valid } => {
                s.valid = valid;
                s.start = valid - valid % align;
                self.push(slot);
                Ok(None)
            }
            Completion::Retry => {
                self.push(slot);
                Ok(None)
            }
            failed => {
                let file = self.files.get(job.file);
                let error = read_error(file, job.offset, s.start, request_len, failed);
                self.failed(slot, error)
            }
        }
    }

    /// Frees `slot`, whose read failed with `error`, and says what follows: of a cache copy,
    /// the extent goes back unread with its buffer (to be fetched from the store) and the
    /// other reads go on; of any other file, `error` is the load's.
    fn failed(&mut self, slot: usize, error: Error) -> Result<Option<Message>> {
        let Some(s) = self.slots[slot].take() else { return Err(error) };
        self.in_flight -= 1;
        self.volume_in_flight[s.volume] -= 1;
        if !self.files.get(s.job.file).cache_copy {
            return Err(error); // the buffer goes back to the pool: nothing reads into it now
        }
        let lease = match s.buffer {
            Buffer::Staging(lease) => Some(lease),
            Buffer::Target(_) => None,
        };
        Ok(Some(Message::Unread { extent: s.job.extent, lease, error }))
    }

    /// Records the read of a finished slot on its (volume, slot) track.
    fn traced(&mut self, slot: usize, s: &Slot) {
        let Some(begin) = s.begin_ns else { return };
        let name = self.names.get(s.volume).map_or("unknown", String::as_str);
        let track = *self
            .tracks
            .entry((s.volume, slot))
            .or_insert_with(|| crate::trace::track(|| format!("volume {name}: read slot {slot}")));
        let file = self.files.get(s.job.file);
        crate::trace::complete(begin, track, "read", "read", || {
            let a = crate::trace::Args::new().str("reader", "direct").str("volume", name);
            a.str("file", file.path.display().to_string())
                .u64("offset", s.job.offset)
                .u64("bytes", s.job.len)
        });
    }

    /// Queues the read of slot `slot` from its `start`.
    fn push(&mut self, slot: usize) {
        let s = self.slots[slot].as_mut().expect("slot");
        let align = self.files.get(s.job.file).align;
        let len = (s.job.len.next_multiple_of(align) - s.start) as u32;
        let (base, capacity, fixed) = match &mut s.buffer {
            Buffer::Staging(lease) => {
                let fixed = self.fixed_buffers.then(|| lease.index() as u16);
                (lease.as_mut_ptr(), lease.capacity(), fixed)
            }
            Buffer::Target(t) => (t.ptr, t.len, None),
        };
        assert!(s.start as usize + len as usize <= capacity);
        // SAFETY: start + len is inside the buffer (asserted above).
        let buf = unsafe { base.add(s.start as usize) };
        let fd = types::Fixed(self.files.position(s.job.file) as u32);
        let offset = s.job.offset + s.start;
        let entry = match fixed {
            Some(index) => opcode::ReadFixed::new(fd, buf, len, index).offset(offset).build(),
            None => opcode::Read::new(fd, buf, len).offset(offset).build(),
        };
        self.submit_entry(entry.user_data(slot as u64));
    }

    fn submit_entry(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: the entry's buffer is a leased staging buffer or a sink's target, held in
            // `self.slots` until its completion is reaped (or the ring drained: `run` does not
            // return before), and its file is registered.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // Submission queue full: hand what is queued to the kernel and try again.
            if let Err(e) = self.ring.submit() {
                log::warn!("io_uring submit while the queue was full: {e}");
            }
        }
    }

    /// Frees the slots of reaped completions that will not be acted on.
    fn release(&mut self, reaped: &[(usize, i32)]) {
        for &(slot, _) in reaped {
            if let Some(s) = self.slots[slot].take() {
                self.in_flight -= 1;
                self.volume_in_flight[s.volume] -= 1;
            }
        }
    }

    /// Waits for every read still in flight, so that no buffer is written after its lease
    /// goes back to the pool.
    fn drain(&mut self) {
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    // Leak the leases rather than let the kernel write into a reused buffer.
                    log::error!(
                        "io_uring wait while draining failed: {e}; leaking {} staging buffers",
                        self.in_flight
                    );
                    for slot in self.slots.iter_mut().filter_map(Option::take) {
                        if let Buffer::Staging(lease) = slot.buffer {
                            lease.leak(); // poisons the arena: the loader maps a new one
                        }
                    }
                    return;
                }
            }
            let done: Vec<usize> = self.ring.completion().map(|c| c.user_data() as usize).collect();
            for slot in done {
                if self.slots[slot].take().is_some() {
                    self.in_flight -= 1;
                }
            }
        }
    }
}
