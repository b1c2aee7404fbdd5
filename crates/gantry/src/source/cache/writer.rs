//! Writing one copy as its object's parts arrive, on a thread of the copy's own.
//!
//! The thread does every file-system operation of the copy: it creates and locks the
//! temporary file, reserves its space, writes the parts the GETs received through the page
//! cache, hashes each segment for the record, writes the record and renames the copy into
//! place. The load's threads only copy each part into the pending memory (`super::pending`)
//! from where it landed and queue it, and, at the end, wait a bounded time for the verdict: a
//! cache whose disk stalls or fills costs the copy and a warning, never the load.
//!
//! **Behind the load.** A part that finds no room in the pending budget is not waited for:
//! the GET goes on, and the copy notes the range as missed. When the load ends,
//! the thread fetches the missed ranges again (GETs conditioned on the same version), writes
//! them, and lands the copy behind the load: the load is told so at once, and the outcome is
//! logged and kept for [`wait_behind`] (the CLI waits for it before it exits). Measured on an
//! H100 machine, four writer threads took 5.1 GB/s into the page cache while the store served
//! 6.8 GB/s: waiting for them cost the first load with a cache 1.33x the plain load's time.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{fs, record, CacheDir, Identity, FINISH_WAIT};

use super::pending::PENDING;
pub use super::pending::PENDING_BYTES_MAX;

/// Most buffers handed to one `pwritev`.
const IOVECS_MAX: usize = 512;

/// Longest the load waits for the parts still queued for a copy's disk, by the rate that disk
/// has taken them so far; longer, and the copy is completed behind the load. Measured on an
/// H100 machine, a 16 GB first load with a cache returned about 0.2 s after its last tensor
/// landed while it waited for the queue; with a disk far slower than the store (100 MB/s
/// against 1 GB/s on the 2-core development machine), 2.7 s.
pub const DRAIN_WAIT: Duration = Duration::from_millis(50);

/// Fewest bytes still queued for a copy's disk that make the load go on without them (with
/// [`DRAIN_WAIT`]): a few small parts left are written before the load returns, so that a
/// small copy lands with its load.
pub const BEHIND_BYTES_MIN: u64 = 32 << 20;

/// Most bytes of one piece queued for a copy's thread (a larger part is queued in pieces).
const PIECE_BYTES_MAX: u64 = 16 << 20;

/// Bytes fetched again per GET when a copy is completed behind its load.
const REFETCH_BYTES: usize = 16 << 20;

/// Fills a buffer with the object's bytes from an offset, blocking (GETs conditioned on the
/// version the load saw): how a copy completes behind its load.
pub type Refetch = Box<dyn Fn(u64, &mut [u8]) -> Result<(), String> + Send>;

/// Copies being completed behind their loads, and the outcomes of those that ended since the
/// last [`wait_behind`].
static BEHIND: parking_lot::Mutex<(usize, Vec<String>)> = parking_lot::Mutex::new((0, Vec::new()));
static BEHIND_DONE: parking_lot::Condvar = parking_lot::Condvar::new();

/// Outcomes kept for [`wait_behind`] at most (the latest; each is also logged).
const BEHIND_NOTES_MAX: usize = 256;

/// Waits at most `timeout` for the copies being completed behind their loads (every load of
/// the process); returns what became of those that ended since the last call, and how many
/// are still running. A process that exits before they end leaves their temporary files for
/// the next load's sweep: nothing half-written is ever used.
pub fn wait_behind(timeout: Duration) -> (Vec<String>, usize) {
    let deadline = Instant::now() + timeout;
    let mut behind = BEHIND.lock();
    while behind.0 > 0 && !BEHIND_DONE.wait_until(&mut behind, deadline).timed_out() {}
    (std::mem::take(&mut behind.1), behind.0)
}

/// Bytes of one part on their way to its copy, contiguous from `offset`: slabs of the
/// pending memory ([`super::pending`]), or a buffer of bytes fetched again behind the load.
#[derive(Debug)]
struct Piece {
    offset: u64,
    chunks: Vec<bytes::Bytes>,
}

/// What the load tells the copy's thread.
#[derive(Debug)]
enum Order {
    Piece(Piece),
    /// Every part was queued: rename the copy into place if it is complete and this says a
    /// HEAD still shows the object unchanged. `behind`: the load did not wait (parts were
    /// still queued for the disk), so the outcome goes to [`wait_behind`], not to the load.
    Finish {
        still_same: Result<bool, String>,
        behind: bool,
    },
}

/// How long the load waits on the copy's thread.
#[derive(Debug, Clone, Copy)]
struct Waits {
    finish: Duration,
    /// Unit tests: the thread holds [`testing::STALL`] while it writes, as a frozen disk
    /// would hold it.
    stall: bool,
    /// Unit tests: every `miss`-th write finds no room (a disk behind the store).
    miss: Option<u64>,
    /// Unit tests: the thread takes this long more per part (a slow disk).
    slow: Duration,
    /// [`DRAIN_WAIT`], longer in unit tests that must see the load wait.
    drain: Duration,
    /// [`BEHIND_BYTES_MIN`], less in unit tests of small copies behind the load.
    behind_bytes: u64,
}

impl Waits {
    /// A load's: what every writer but the unit tests' uses.
    const LOAD: Waits = Waits {
        finish: FINISH_WAIT,
        stall: false,
        miss: None,
        slow: Duration::ZERO,
        drain: DRAIN_WAIT,
        behind_bytes: BEHIND_BYTES_MIN,
    };
}

/// The copy of one object being written as its parts arrive.
#[derive(Debug)]
pub struct Writer {
    /// The name it takes once complete, for messages.
    pub path: PathBuf,
    orders: Option<Sender<Order>>,
    /// What the thread made of the copy (in a mutex only so that the writer is `Sync`).
    verdict: parking_lot::Mutex<Receiver<String>>,
    waits: Waits,
    /// Parts handed to [`Writer::write`] so far.
    parts: AtomicU64,
    /// Bytes queued for the copy's thread.
    queued: AtomicU64,
    /// When the first piece was queued: with nothing taken yet, how long the disk has had.
    first_queued: std::sync::OnceLock<Instant>,
    /// What the load and the copy's thread both see.
    shared: Arc<Shared>,
}

/// The state of one copy that the load's threads and the copy's thread share.
#[derive(Debug, Default)]
struct Shared {
    /// The copy failed (or stalled): it takes no more bytes.
    failed: AtomicBool,
    /// Bytes the thread has taken off the queue (written, or dropped once the copy failed).
    taken: AtomicU64,
    /// Nanoseconds the thread spent writing what it took: with `taken`, its disk's rate so
    /// far.
    busy_ns: AtomicU64,
    /// Set when the copy will be removed whatever happens: the thread skips queued parts.
    abandon: AtomicBool,
    /// Whether the copy is counted in [`BEHIND`] and not yet told ended (so that a panic on
    /// the thread still ends it).
    counted: AtomicBool,
    /// The ranges that found no room.
    missed: parking_lot::Mutex<Vec<Range<u64>>>,
}

impl Shared {
    /// Counts the copy among those completed behind their loads ([`wait_behind`] waits for
    /// it).
    fn begin_behind(&self) {
        BEHIND.lock().0 += 1;
        self.counted.store(true, Ordering::Release);
    }

    /// Ends the copy's count with the outcome `text` gives, once, whichever of its ends comes
    /// first (its thread's outcome, a panic on that thread, a thread already gone); nothing
    /// when it was never counted.
    fn end_behind(&self, text: impl FnOnce() -> String) {
        if self.counted.swap(false, Ordering::AcqRel) {
            behind_ended(text());
        }
    }
}

impl Writer {
    /// Starts the thread that writes the copy of `identity`, `size` bytes, into `cache`; an
    /// error message (for a warning) when no thread can be started. Nothing here touches the
    /// cache's file system. Parts the disk cannot take in time are fetched again with
    /// `refetch` after the load (see the module's note).
    pub fn create(
        cache: Arc<CacheDir>,
        identity: Identity,
        size: u64,
        refetch: Refetch,
    ) -> Result<Self, String> {
        Self::with_waits(cache, identity, size, Waits::LOAD, refetch)
    }

    fn with_waits(
        cache: Arc<CacheDir>,
        identity: Identity,
        size: u64,
        waits: Waits,
        refetch: Refetch,
    ) -> Result<Self, String> {
        let (orders, rx) = std::sync::mpsc::channel();
        let (verdict_tx, verdict) = std::sync::mpsc::channel();
        let path = cache.copy_path(&identity.name());
        let shared = Arc::new(Shared::default());
        let copy = Copy {
            shared: Arc::clone(&shared),
            cache,
            identity,
            size,
            stall: waits.stall,
            slow: waits.slow,
            refetch,
        };
        let trace = crate::trace::current();
        // The pending memory keeps its pages while this copy may still ask for slabs.
        let alive = PENDING.copy_alive();
        std::thread::Builder::new()
            .name("gantry-cache".to_owned())
            .spawn(move || {
                let _alive = alive;
                // Out of the trace before the verdict goes: the load may write its trace
                // as soon as it has the verdict.
                let shared = Arc::clone(&copy.shared);
                let work = std::panic::AssertUnwindSafe(|| {
                    let ran = {
                        let _in = crate::trace::enter(trace.as_ref(), "cache writer");
                        copy.run(&rx)
                    };
                    match ran {
                        Ran::Done(text, false) => {
                            let _ = verdict_tx.send(text);
                        }
                        Ran::Done(text, true) => copy.done_behind(&text, None),
                        Ran::Behind(partial, missed, behind) => {
                            copy.complete_behind(partial, missed, (!behind).then_some(&verdict_tx))
                        }
                    }
                });
                if std::panic::catch_unwind(work).is_err() {
                    // Its temporary file stays for the next load's sweep.
                    shared.end_behind(|| "not cached: the copy's thread panicked".to_owned());
                }
            })
            .map_err(|e| format!("starting the thread that writes {}: {e}", path.display()))?;
        let verdict = parking_lot::Mutex::new(verdict);
        let (parts, queued) = (AtomicU64::new(0), AtomicU64::new(0));
        Ok(Self {
            path,
            orders: Some(orders),
            verdict,
            waits,
            parts,
            queued,
            first_queued: std::sync::OnceLock::new(),
            shared,
        })
    }

    /// Whether the copy still takes bytes (nothing has failed or stalled).
    pub fn wants_bytes(&self) -> bool {
        !self.shared.failed.load(Ordering::Relaxed)
    }

    /// Queues the bytes of one extent or part, `chunks` back to back from `offset`, to be
    /// written by the copy's thread: they are copied into the pending memory
    /// (`super::pending`), so the caller keeps its buffers (the GETs copy each extent from
    /// where it landed, so that the HTTP client's buffers are reused). Never waits: while
    /// [`PENDING_BYTES_MAX`] bytes of all copies are waiting for the disk, the bytes are
    /// noted as missed and fetched again behind the load.
    pub fn write<B: AsRef<[u8]>>(&self, offset: u64, chunks: &[B]) {
        let len: u64 = chunks.iter().map(|c| c.as_ref().len() as u64).sum();
        if len == 0 || !self.wants_bytes() {
            return;
        }
        let parts = self.parts.fetch_add(1, Ordering::Relaxed) + 1;
        let miss = matches!(self.waits.miss, Some(k) if parts % k == 0);
        // In pieces of at most PIECE_BYTES_MAX, so that a part as large as the pending memory
        // (parts may be up to 1 GiB) is queued as far as there is room rather than missed
        // whole.
        let mut at = 0;
        while at < len {
            let n = (len - at).min(PIECE_BYTES_MAX);
            let piece: Vec<&[u8]> = slices(chunks, at, n).collect();
            let room = if miss { None } else { PENDING.copy_in(&piece, n as usize) };
            let Some(slabs) = room else {
                // The disk is behind the store: the GET goes on, the copy fetches these bytes
                // again once the load is over.
                self.shared.missed.lock().push(offset + at..offset + at + n);
                at += n;
                continue;
            };
            if let Some(orders) = &self.orders {
                self.first_queued.get_or_init(Instant::now);
                self.queued.fetch_add(n, Ordering::Relaxed);
                let _ = orders.send(Order::Piece(Piece { offset: offset + at, chunks: slabs }));
            }
            at += n;
        }
    }

    /// Bytes queued that the copy's thread has not yet taken, and those it has.
    fn queue(&self) -> (u64, u64) {
        let taken = self.shared.taken.load(Ordering::Acquire);
        (self.queued.load(Ordering::Relaxed).saturating_sub(taken), taken)
    }

    /// Bytes queued that the copy's thread has not yet taken (unit tests).
    #[cfg(test)]
    pub fn queued_for_disk(&self) -> u64 {
        self.queue().0
    }

    /// Tells the copy's thread to rename the copy into place if it is complete and
    /// `still_same` (a HEAD now shows the same ETag and size), else to remove it. Returns what
    /// happened, for the report: when the parts still queued ([`BEHIND_BYTES_MIN`] or more)
    /// would take the cache's disk (at its rate so far) more than [`DRAIN_WAIT`], at once:
    /// the copy is completed behind the load and its outcome goes to [`wait_behind`]; else
    /// after waiting at most [`FINISH_WAIT`] for the thread.
    pub fn finish(mut self, still_same: Result<bool, String>) -> String {
        // Every GET has queued its part by now: the count is final.
        let (waiting, taken) = self.queue();
        // At the rate its disk took the parts so far; with none taken yet, by how long the
        // disk has had them.
        let busy = Duration::from_nanos(self.shared.busy_ns.load(Ordering::Relaxed));
        let slow = match taken {
            0 => self.first_queued.get().is_some_and(|t| t.elapsed() > self.waits.drain),
            _ => busy.mul_f64(waiting as f64 / taken as f64) > self.waits.drain,
        };
        let behind = waiting > 0
            && waiting >= self.waits.behind_bytes
            && slow
            && still_same == Ok(true)
            && self.wants_bytes();
        if still_same != Ok(true) {
            // The copy will be removed: its thread need not write what is still queued.
            self.shared.abandon.store(true, Ordering::Relaxed);
        }
        if let Some(orders) = self.orders.take() {
            if behind {
                self.shared.begin_behind();
            }
            if orders.send(Order::Finish { still_same, behind }).is_err() {
                // The thread is gone (it cannot be, while the writer holds the queue).
                self.shared.end_behind(|| "not cached: the copy's thread ended".to_owned());
            }
        }
        if behind {
            return format!(
                "being completed behind the load at {}: {waiting} bytes are still queued for the cache's disk",
                self.path.display()
            );
        }
        let verdict = self.verdict.lock().recv_timeout(self.waits.finish);
        match verdict {
            Ok(text) => text,
            Err(_) => {
                let why = format!(
                    "the cache's file system did not finish the copy {} within {} s",
                    self.path.display(),
                    self.waits.finish.as_secs_f64()
                );
                log::warn!("cache: {why}; the load goes on (the copy lands or is removed later)");
                format!("not cached yet: {why}")
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue without `Finish` tells the thread to remove its temporary file.
        drop(self.orders.take());
    }
}

/// The thread's side of one copy.
struct Copy {
    /// Shared with the writer (see [`Writer::finish`]).
    shared: Arc<Shared>,
    cache: Arc<CacheDir>,
    identity: Identity,
    size: u64,
    #[cfg_attr(not(test), allow(dead_code))]
    stall: bool,
    #[cfg_attr(not(test), allow(dead_code))]
    slow: Duration,
    /// How missed ranges are fetched again.
    refetch: Refetch,
}

/// What the copy's thread made of the load's orders.
enum Ran {
    /// The copy's verdict, and whether the load already went on without it (its outcome
    /// then goes to [`wait_behind`]).
    Done(String, bool),
    /// Whole but for ranges to fetch again behind the load (the object unchanged at the end
    /// of the load).
    Behind(Partial, Vec<Range<u64>>, bool),
}

/// The temporary file of a copy, locked, and what has been written of it.
struct Partial {
    file: File,
    /// The same file opened with `O_DIRECT`, where its file system takes that, and the
    /// alignment that asks: whole blocks from the pending memory go to the disk without a
    /// copy into the page cache (see [`Copy::put`]).
    direct: Option<(File, u64)>,
    name: String,
    /// Per segment: bytes written so far, and its digest once whole.
    filled: Vec<u64>,
    digests: Vec<Option<u64>>,
    written: u64,
}

impl Copy {
    /// Writes the copy from `orders` and says what became of it.
    fn run(&self, orders: &Receiver<Order>) -> Ran {
        let mut partial = match self.create() {
            Ok(p) => Some(p),
            Err(e) => {
                self.fail(&e);
                None
            }
        };
        for order in orders {
            match order {
                Order::Piece(piece) => {
                    let bytes = piece.chunks.iter().map(|c| c.len() as u64).sum::<u64>();
                    let began = Instant::now();
                    let abandoned = self.shared.abandon.load(Ordering::Relaxed);
                    if let Some(p) = partial.as_mut().filter(|_| !self.failed() && !abandoned) {
                        #[cfg(test)]
                        let _stalled = self.stall.then(|| testing::STALL.lock());
                        #[cfg(test)]
                        std::thread::sleep(self.slow);
                        let _span = crate::trace::span("cache", "cache write")
                            .args(|a| a.u64("offset", piece.offset).u64("bytes", bytes));
                        if let Err(e) = self.put(p, piece.offset, &piece.chunks) {
                            self.fail(&format!("writing at offset {}: {e}", piece.offset));
                        }
                    }
                    drop(piece); // its slabs go back before the load is told it was taken
                    let busy = began.elapsed().as_nanos() as u64;
                    self.shared.busy_ns.fetch_add(busy, Ordering::Relaxed);
                    self.shared.taken.fetch_add(bytes, Ordering::Release);
                }
                Order::Finish { still_same, behind } => {
                    let Some(p) = partial.take() else {
                        let text = "not cached: the copy could not be written".to_owned();
                        return Ran::Done(text, behind);
                    };
                    let missed = merged(std::mem::take(&mut *self.shared.missed.lock()));
                    if !missed.is_empty() && !self.failed() && still_same == Ok(true) {
                        return Ran::Behind(p, missed, behind);
                    }
                    return Ran::Done(self.land(p, still_same), behind);
                }
            }
        }
        // The load ended without finishing the copy: nothing may trust it.
        if let Some(p) = partial {
            let _ = self.cache.partial.unlink(&p.name);
        }
        Ran::Done("not cached: the load ended first".to_owned(), false)
    }

    /// Fetches the `missed` ranges again, writes them and lands the copy; the outcome goes to
    /// the log and to [`wait_behind`]. With `told`, the load is waiting: it is told at once
    /// that the copy is being completed behind it (without, the load already went on and
    /// counted the copy as behind).
    fn complete_behind(
        &self,
        mut p: Partial,
        missed: Vec<Range<u64>>,
        told: Option<&Sender<String>>,
    ) {
        let bytes: u64 = missed.iter().map(|r| r.end - r.start).sum();
        let path = self.cache.copy_path(&self.identity.name());
        if let Some(told) = told {
            self.shared.begin_behind();
            let _ = told.send(format!(
                "being completed behind the load at {}: {bytes} bytes in {} ranges came faster than the cache's disk took them and are fetched again",
                path.display(),
                missed.len()
            ));
        }
        let start = Instant::now();
        let fetched = self.fetch_again(&mut p, &missed);
        let text = match fetched {
            Ok(()) => self.land(p, Ok(true)),
            Err(e) => {
                let _ = self.cache.partial.unlink(&p.name);
                format!("not cached: fetching {bytes} bytes again behind the load: {e}")
            }
        };
        self.done_behind(&text, Some((bytes, start.elapsed())));
    }

    /// Records the outcome of a copy completed behind its load: `fetched`, the bytes fetched
    /// again and how long that took.
    fn done_behind(&self, text: &str, fetched: Option<(u64, Duration)>) {
        let path = self.cache.copy_path(&self.identity.name());
        let text = match fetched {
            Some((bytes, took)) => format!(
                "{}: {text} ({bytes} bytes fetched again, {:.3} s after the load)",
                path.display(),
                took.as_secs_f64()
            ),
            None => format!("{}: {text} (behind the load)", path.display()),
        };
        self.shared.end_behind(|| text);
    }

    /// Fetches `missed` again ([`REFETCH_BYTES`] per GET) and writes it into `p`.
    fn fetch_again(&self, p: &mut Partial, missed: &[Range<u64>]) -> Result<(), String> {
        // One buffer for every GET: a fresh one each time would fault its pages in again.
        let longest = missed.iter().map(|r| r.end - r.start).max().unwrap_or(0);
        let mut buf = vec![0u8; longest.min(REFETCH_BYTES as u64) as usize];
        for range in missed {
            let mut at = range.start;
            while at < range.end {
                let n = (range.end - at).min(REFETCH_BYTES as u64) as usize;
                (self.refetch)(at, &mut buf[..n])?;
                self.put(p, at, &[&buf[..n]])
                    .map_err(|e| format!("writing at offset {at}: {e}"))?;
                at += n as u64;
            }
        }
        Ok(())
    }

    fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::Relaxed)
    }

    fn fail(&self, why: &str) {
        if !self.shared.failed.swap(true, Ordering::Relaxed) {
            let path = self.cache.copy_path(&self.identity.name());
            log::warn!("cache: {}: {why}; the load goes on without caching it", path.display());
        }
    }

    /// Creates, locks and sizes the temporary file.
    fn create(&self) -> Result<Partial, String> {
        let dir = &self.cache.partial;
        for _ in 0..4 {
            let name = format!("{}.{}.partial", self.identity.name(), fs::random_hex());
            let file = dir
                .create(&name, self.cache.file_mode())
                .map_err(|e| format!("{}: {e}", dir.path_of(&name).display()))?;
            fs::flock(&file, libc::LOCK_EX).map_err(|e| format!("locking {name}: {e}"))?;
            // A sweep may have taken the file for a dead writer's before the lock was ours.
            if !dir.names(&name, &file) {
                continue;
            }
            // Reserve the space first, so that a full disk shows now rather than mid-copy.
            // SAFETY: a valid descriptor; fallocate only changes the file's allocation.
            let r = unsafe {
                libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, self.size as i64)
            };
            if r != 0 && self.size > 0 {
                let e = std::io::Error::last_os_error();
                let _ = dir.unlink(&name);
                return Err(format!("reserving {} bytes: {e}", self.size));
            }
            let segments = record::segments(self.size) as usize;
            let (filled, digests) = (vec![0; segments], vec![None; segments]);
            let direct = reopen_direct(&file);
            return Ok(Partial { file, direct, name, filled, digests, written: 0 });
        }
        Err("its temporary files kept being removed".to_owned())
    }

    /// Writes the bytes of `chunks`, back to back from `offset`, and hashes the segments
    /// they complete. Whole blocks at a block-aligned offset (the parts in the pending
    /// memory's slabs, all but an object's last) go through the `O_DIRECT` descriptor: a
    /// buffered write copies them once more into the page cache, and on a machine whose store
    /// serves 7 GB/s four writers doing so at 4-5 GB/s take memory bandwidth and cores from
    /// the load itself (H100 machine: the first load with a cache 1.21x the store load's
    /// time); written directly they cost one DMA read, at the disk's own rate, and what the
    /// disk cannot take is fetched again behind the load.
    fn put<B: AsRef<[u8]>>(
        &self,
        p: &mut Partial,
        offset: u64,
        chunks: &[B],
    ) -> std::io::Result<()> {
        let direct = match &p.direct {
            Some((direct, align)) if blocks(offset, chunks, *align) => {
                Some(write_chunks(direct, offset, chunks))
            }
            _ => None,
        };
        let len = match direct {
            Some(Ok(len)) => len,
            Some(Err(e)) => {
                // A file system that opened with O_DIRECT but refuses these writes (another
                // alignment), or a short write that left an unaligned rest: the whole piece
                // again, and every later one, through the page cache.
                log::debug!(
                    "cache: O_DIRECT write at offset {offset} failed ({e}): buffered from now on"
                );
                p.direct = None;
                write_chunks(&p.file, offset, chunks)?
            }
            None => write_chunks(&p.file, offset, chunks)?,
        };
        p.written += len;
        let end = offset + len;
        if len == 0 || end > self.size {
            return Err(std::io::Error::other("bytes past the object's end"));
        }
        for k in offset / record::SEGMENT_BYTES..end.div_ceil(record::SEGMENT_BYTES) {
            let range = record::segment_range(k, self.size);
            let (from, to) = (range.start.max(offset), range.end.min(end));
            let k = k as usize;
            p.filled[k] += to - from;
            if p.filled[k] != range.end - range.start {
                continue;
            }
            p.digests[k] = Some(if from == range.start && to == range.end {
                record::digest_of(slices(chunks, range.start - offset, to - from))
            } else {
                // Written by several pieces: read back from the page cache.
                let mut bytes = vec![0; (range.end - range.start) as usize];
                p.file.read_exact_at(&mut bytes, range.start)?;
                record::digest(&bytes)
            });
        }
        Ok(())
    }

    /// Writes the record and renames the copy into place, when it is whole and unchanged.
    fn land(&self, p: Partial, still_same: Result<bool, String>) -> String {
        let remove = |text: String| {
            let _ = self.cache.partial.unlink(&p.name);
            text
        };
        match still_same {
            Ok(true) => {}
            Ok(false) => {
                return remove("not cached: the object changed since the load began".to_owned())
            }
            Err(e) => return remove(format!("not cached: the last HEAD failed: {e}")),
        }
        let digests: Option<Vec<u64>> = p.digests.iter().copied().collect();
        let digests = match digests {
            Some(d) if !self.failed() && p.written == self.size => d,
            _ => {
                let path = self.cache.partial.path_of(&p.name);
                return remove(format!("not cached: the copy at {} is incomplete", path.display()));
            }
        };
        let trailer = record::encode(self.size, self.identity.bytes(), &digests);
        if let Err(e) = p.file.write_all_at(&trailer, self.size) {
            return remove(format!("not cached: writing its record: {e}"));
        }
        let name = self.identity.name();
        let path = self.cache.copy_path(&name);
        match self.cache.partial.rename(&p.name, &self.cache.objects, &name) {
            Ok(()) => format!("written through to the cache at {}", path.display()),
            Err(e) => {
                log::warn!("cache: renaming a copy to {} failed: {e}", path.display());
                remove(format!("not cached: renaming the copy to {} failed: {e}", path.display()))
            }
        }
    }
}

/// One copy completed behind its load ended with `text`: logged, and kept for
/// [`wait_behind`].
fn behind_ended(text: String) {
    log::info!("cache: {text}");
    let mut behind = BEHIND.lock();
    behind.0 -= 1;
    if behind.1.len() >= BEHIND_NOTES_MAX {
        behind.1.remove(0); // a long-lived process nobody asks: the latest are kept
    }
    behind.1.push(text);
    BEHIND_DONE.notify_all();
}

/// Whether `chunks` at `offset` are whole blocks of `align` bytes at aligned addresses and
/// offset, as `O_DIRECT` requires.
fn blocks<B: AsRef<[u8]>>(offset: u64, chunks: &[B], align: u64) -> bool {
    let aligned = |n: u64| n % align == 0;
    aligned(offset)
        && chunks
            .iter()
            .map(AsRef::as_ref)
            .all(|c| aligned(c.as_ptr() as u64) && aligned(c.len() as u64))
}

/// `file` opened again for writing with `O_DIRECT` (through `/proc/self/fd`: the same file,
/// whatever its name does meanwhile), with the alignment its file system asks for (as the
/// local readers probe it); `None` where that cannot be (no `/proc`, a file system that
/// refuses `O_DIRECT`), and the copy is written through the page cache. (Some file systems
/// open with it and still cache, such as tmpfs since Linux 6.6: no harm, no gain.)
fn reopen_direct(file: &File) -> Option<(File, u64)> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(path);
    match opened {
        Ok(direct) => {
            let align = crate::source::probe::dio_alignment(&direct);
            Some((direct, align))
        }
        Err(e) => {
            log::debug!("cache copies are written through the page cache: O_DIRECT: {e}");
            None
        }
    }
}

/// `ranges` sorted, touching or overlapping ones joined.
fn merged(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges.into_iter().filter(|r| r.start < r.end) {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// The bytes `at..at + len` of `chunks` laid end to end, as slices.
fn slices<B: AsRef<[u8]>>(chunks: &[B], at: u64, len: u64) -> impl Iterator<Item = &[u8]> {
    let mut start = 0u64;
    chunks.iter().filter_map(move |c| {
        let c = c.as_ref();
        let (c_start, c_end) = (start, start + c.len() as u64);
        start = c_end;
        let (from, to) = (at.max(c_start), (at + len).min(c_end));
        (from < to).then(|| &c[(from - c_start) as usize..(to - c_start) as usize])
    })
}

/// Writes `chunks` back to back from `offset`, continuing short writes; the bytes written.
fn write_chunks<B: AsRef<[u8]>>(file: &File, offset: u64, chunks: &[B]) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let chunks: Vec<&[u8]> = chunks.iter().map(AsRef::as_ref).collect();
    let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let (mut done, mut first, mut skip) = (0u64, 0usize, 0usize);
    while done < total {
        while chunks[first].len() == skip {
            first += 1;
            skip = 0;
        }
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
pub(super) mod testing {
    //! Hooks for the unit tests: short waits.
    use super::*;

    /// Held by a test to stall the threads of writers made with `stall`.
    pub static STALL: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

    /// A writer whose load-side wait is `wait` (whatever is still queued), stalled by
    /// [`STALL`] when `stall`; it has no store to fetch missed parts from.
    pub fn writer(
        cache: Arc<CacheDir>,
        identity: Identity,
        size: u64,
        wait: Duration,
        stall: bool,
    ) -> Writer {
        // However long the test takes to call `finish`, the load waits (up to `wait`).
        let drain = Duration::from_secs(3600);
        let waits = Waits { finish: wait, stall, drain, ..Waits::LOAD };
        Writer::with_waits(cache, identity, size, waits, no_store()).unwrap()
    }

    /// A writer whose thread takes `slow` more per part (a slow disk); no store.
    pub fn slow(cache: Arc<CacheDir>, identity: Identity, size: u64, slow: Duration) -> Writer {
        let waits = Waits { slow, behind_bytes: 0, ..Waits::LOAD };
        Writer::with_waits(cache, identity, size, waits, no_store()).unwrap()
    }

    /// A refetch for writers of tests that have no store: any call is an error.
    pub fn no_store() -> Refetch {
        Box::new(|at, _: &mut [u8]| Err(format!("no store in this test (offset {at})")))
    }

    /// A writer whose every `miss`-th write finds no room, fetched again by `refetch`.
    pub fn behind(
        cache: Arc<CacheDir>,
        identity: Identity,
        size: u64,
        miss: u64,
        refetch: Refetch,
    ) -> Writer {
        let waits = Waits { miss: Some(miss), ..Waits::LOAD };
        Writer::with_waits(cache, identity, size, waits, refetch).unwrap()
    }
}
