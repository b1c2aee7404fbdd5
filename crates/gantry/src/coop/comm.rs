//! NCCL, loaded at run time, and the few collectives a cooperative load issues, behind safe
//! types: [`UniqueId`] (created once, passed to every rank), [`Communicator`] (one rank's
//! membership; finalized and destroyed on drop, or aborted when a peer stops answering), and
//! [`Exchange`] (a stream, a status buffer and the waits of one load).
//!
//! Nothing here waits without a limit. Communicators gantry creates are non-blocking
//! (`ncclCommInitRankConfig` with `blocking = 0`, NCCL >= 2.14): joining, a collective's
//! host part (connecting to a peer the first time), `ncclGroupEnd` and finalizing return
//! `ncclInProgress` and go on in NCCL's own thread, and this module polls
//! `ncclCommGetAsyncError` until they are done, for at most the exchange's timeout. The
//! kernels of a collective spin until every rank has joined, so a rank that died leaves the
//! others' kernels spinning forever; every wait polls an event and the asynchronous error and
//! gives up after the timeout too. Giving up aborts the communicator (which stops its threads
//! and kernels) and returns an [`Error::Nccl`] naming the operation and the rank.
//!
//! Where non-blocking creation is unavailable (NCCL before 2.14, or
//! `GANTRY_NCCL_BLOCKING=1`), the communicator is created blocking on a helper thread that is
//! abandoned when the timeout passes, as is said in the log. A caller's own communicator
//! ([`Communicator::from_raw`]) is used in whatever mode it was made: a non-blocking one is
//! polled as above; on a blocking one the host part of a collective and `ncclGroupEnd` can
//! block without limit inside NCCL when a peer never arrives (the kernel waits stay bounded),
//! and only [`Communicator::abort`] from another thread ends them.
//!
//! `ncclCommAbort` frees the communicator, so every NCCL call on it is made under one lock
//! and refused once it was aborted: an abort from another thread waits for the call in flight
//! (a non-blocking call returns at once), or, past [`ABORT_WAIT`], aborts a blocking call
//! from under it, which is what NCCL's abort is for.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nccl_sys::{ncclComm_t, ncclResult_t, ncclUniqueId, Nccl, NcclCode};
use parking_lot::Mutex;

use super::agree::{self, Agreement};
use crate::cuda::stream::{Event, Stream};
use crate::cuda::{CudaDevice, DeviceBuffer};
use crate::error::{Error, Result};

mod poll;
use poll::{async_state, poll_bounded, read_status, status_slots, Look, RealClock, Stop};

/// Bytes each rank has in a status exchange: a failure flag and its error message.
pub const STATUS_BYTES: usize = 512;

/// How long a rank waits for the others by default before it gives up on them.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// How long [`Communicator::abort`] waits for a call in flight on another thread before it
/// aborts the communicator from under it (only a blocking communicator's call lasts that long).
pub const ABORT_WAIT: Duration = Duration::from_secs(1);

/// Set to `1`, gantry creates its communicators blocking, as with NCCL before 2.14.
pub const BLOCKING_VARIABLE: &str = "GANTRY_NCCL_BLOCKING";

/// Loads NCCL (see [`nccl_sys::candidates`] for where it is looked for); `Err` says why not.
pub fn load_nccl() -> Result<Arc<Nccl>, String> {
    Nccl::load().map(Arc::new)
}

fn nccl_error(nccl: &Nccl, op: impl Into<String>, code: NcclCode) -> Error {
    Error::Nccl { op: op.into(), code: code.0, message: nccl.describe(code) }
}

/// What rank 0 creates and every rank of a communicator is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UniqueId(ncclUniqueId);

impl UniqueId {
    /// A new id from NCCL (it opens the socket the ranks meet on).
    pub fn new(nccl: &Nccl) -> Result<Self> {
        let mut id = ncclUniqueId::default();
        // SAFETY: out pointer valid for the call.
        nccl_sys::check(unsafe { (nccl.get_unique_id)(&mut id) })
            .map_err(|c| nccl_error(nccl, "ncclGetUniqueId", c))?;
        Ok(Self(id))
    }

    /// 256 hex digits.
    pub fn to_hex(&self) -> String {
        self.0.to_hex()
    }

    /// Parses [`UniqueId::to_hex`]'s output.
    pub fn from_hex(text: &str) -> Result<Self> {
        ncclUniqueId::from_hex(text)
            .map(Self)
            .map_err(|e| Error::Config(format!("NCCL unique id: {e}")))
    }
}

/// How a communicator's calls return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Created by gantry with `blocking = 0`: calls return at once, `ncclInProgress` or done.
    NonBlocking,
    /// Created by gantry blocking (no `ncclCommInitRankConfig`, or asked for).
    Blocking,
    /// The caller's: either (each call's result says which).
    Callers,
}

/// One rank's membership of an NCCL communicator.
#[derive(Debug)]
pub struct Communicator {
    nccl: Arc<Nccl>,
    comm: ncclComm_t,
    rank: usize,
    world: usize,
    mode: Mode,
    /// Whether gantry created it (and so finalizes and destroys it).
    owned: bool,
    /// How long finalizing may take on drop (the timeout it was created with).
    timeout: Duration,
    aborted: AtomicBool,
    /// Held across every NCCL call on `comm`, so that an abort (which frees it) never lands
    /// in the middle of one.
    calls: Mutex<()>,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; every call
// is made under `calls`.
unsafe impl Send for Communicator {}
// SAFETY: as above: calls through shared references are serialised by `calls`, and an abort
// bypasses it only for a blocking call stuck in NCCL, which ncclCommAbort is meant to end.
unsafe impl Sync for Communicator {}

/// A communicator handle moved to the thread that waits for the other ranks.
struct SendComm(ncclComm_t);
// SAFETY: the handle is only moved, never used, by the waiting thread.
unsafe impl Send for SendComm {}

/// `ncclCommInitRankConfig`'s signature.
type InitRankConfig = unsafe extern "C" fn(
    *mut ncclComm_t,
    i32,
    ncclUniqueId,
    i32,
    *mut nccl_sys::ncclConfig_t,
) -> ncclResult_t;

fn no_such_rank(rank: usize, world: usize) -> Option<Error> {
    (world == 0 || rank >= world || world > i32::MAX as usize)
        .then(|| Error::Config(format!("rank {rank} of {world}: no such rank")))
}

impl Communicator {
    /// Joins communicator `id` as `rank` of `world` on `device`; an error when the other ranks
    /// have not all joined within `timeout` (the communicator is then aborted).
    pub fn init(
        nccl: Arc<Nccl>,
        id: &UniqueId,
        rank: usize,
        world: usize,
        device: &Arc<CudaDevice>,
        timeout: Duration,
    ) -> Result<Self> {
        if let Some(e) = no_such_rank(rank, world) {
            return Err(e);
        }
        let forced = std::env::var(BLOCKING_VARIABLE).is_ok_and(|v| v == "1");
        match nccl.comm_init_rank_config {
            Some(config) if !forced => {
                Self::init_non_blocking(config, nccl, id, (rank, world), device, timeout)
            }
            _ => {
                let why = if forced {
                    format!("{BLOCKING_VARIABLE}=1")
                } else {
                    format!("{} has no ncclCommInitRankConfig (NCCL < 2.14)", nccl.loaded_from)
                };
                log::warn!(
                    "rank {rank} of {world}: a blocking NCCL communicator ({why}): a peer that dies mid-call can leave this rank waiting inside NCCL"
                );
                Self::init_blocking(nccl, id, rank, world, device, timeout)
            }
        }
    }

    fn new(nccl: Arc<Nccl>, comm: ncclComm_t, rank: usize, world: usize, mode: Mode) -> Self {
        Self {
            nccl,
            comm,
            rank,
            world,
            mode,
            owned: mode != Mode::Callers,
            timeout: TIMEOUT,
            aborted: AtomicBool::new(false),
            calls: Mutex::new(()),
        }
    }

    /// `ncclCommInitRankConfig` (`init`) with `blocking = 0`, polled for at most `timeout`.
    fn init_non_blocking(
        init: InitRankConfig,
        nccl: Arc<Nccl>,
        id: &UniqueId,
        (rank, world): (usize, usize),
        device: &Arc<CudaDevice>,
        timeout: Duration,
    ) -> Result<Self> {
        let op = "ncclCommInitRankConfig (joining the communicator)";
        // NCCL takes the device from the calling thread's current context.
        let bound = device.bind_scoped()?;
        let mut config = nccl_sys::ncclConfig_t { blocking: 0, ..Default::default() };
        let mut comm: ncclComm_t = std::ptr::null_mut();
        // SAFETY: out pointer and config valid for the call (NCCL copies the config); the id
        // is 128 bytes passed by value.
        let rc = unsafe { init(&mut comm, world as i32, id.0, rank as i32, &mut config) };
        drop(bound);
        if comm.is_null() {
            let code = nccl_sys::check(rc).err().unwrap_or(NcclCode(nccl_sys::NCCL_SUCCESS));
            return Err(nccl_error(&nccl, format!("{op} as rank {rank} of {world}"), code));
        }
        let mut made = Self::new(nccl, comm, rank, world, Mode::NonBlocking);
        made.timeout = timeout;
        made.settle(op, rc, timeout)?;
        Ok(made)
    }

    /// `ncclCommInitRank` on a helper thread, abandoned with an error after `timeout`.
    fn init_blocking(
        nccl: Arc<Nccl>,
        id: &UniqueId,
        rank: usize,
        world: usize,
        device: &Arc<CudaDevice>,
        timeout: Duration,
    ) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (lib, dev, raw) = (Arc::clone(&nccl), Arc::clone(device), id.0);
        std::thread::Builder::new()
            .name("gantry-nccl-init".into())
            .spawn(move || {
                let made = dev.bind().and_then(|()| {
                    let mut comm: ncclComm_t = std::ptr::null_mut();
                    // SAFETY: out pointer valid; the id is 128 bytes passed by value.
                    let rc =
                        unsafe { (lib.comm_init_rank)(&mut comm, world as i32, raw, rank as i32) };
                    nccl_sys::check(rc)
                        .map(|()| SendComm(comm))
                        .map_err(|c| nccl_error(&lib, "ncclCommInitRank", c))
                });
                let _ = tx.send(made);
            })
            .map_err(|source| Error::Resource {
                what: "spawning the NCCL set-up thread",
                source,
            })?;
        match rx.recv_timeout(timeout) {
            Ok(made) => {
                let SendComm(comm) = made?;
                let mut made = Self::new(nccl, comm, rank, world, Mode::Blocking);
                made.timeout = timeout;
                Ok(made)
            }
            Err(_) => Err(Error::Nccl {
                op: format!("joining the communicator as rank {rank} of {world}"),
                code: 0,
                message: format!(
                    "not every rank joined within {} s (a rank did not start, or failed before it joined)",
                    timeout.as_secs()
                ),
            }),
        }
    }

    /// Wraps the caller's communicator (from the same `libnccl.so.2` as `nccl`), which gantry
    /// uses but does not destroy. Its rank and size are asked of NCCL. It may be blocking or
    /// not (see the module's notes on what a blocking one can do when a peer dies).
    ///
    /// # Safety
    /// `comm` is a live communicator of that library whose device is the load's GPU, done
    /// initializing; the caller issues nothing on it while a load uses it, and keeps it alive
    /// until then.
    pub unsafe fn from_raw(nccl: Arc<Nccl>, comm: *mut c_void) -> Result<Self> {
        if comm.is_null() {
            return Err(Error::Config("the NCCL communicator is NULL".into()));
        }
        let (mut rank, mut world) = (0, 0);
        // SAFETY: a live communicator (the caller's promise); out pointer valid.
        let asked = nccl_sys::check(unsafe { (nccl.comm_user_rank)(comm, &mut rank) });
        // SAFETY: as above.
        let asked =
            asked.and_then(|()| nccl_sys::check(unsafe { (nccl.comm_count)(comm, &mut world) }));
        asked.map_err(|c| nccl_error(&nccl, "asking the communicator its rank and size", c))?;
        Ok(Self::new(nccl, comm, rank.max(0) as usize, world.max(0) as usize, Mode::Callers))
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the communicator.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The NCCL library, with its version, in one line.
    pub fn describe(&self) -> String {
        match self.nccl.version() {
            Ok((a, b, c)) => format!("NCCL {a}.{b}.{c} ({})", self.nccl.loaded_from),
            Err(_) => format!("NCCL ({})", self.nccl.loaded_from),
        }
    }

    /// Whether the communicator was aborted (it can no longer be used).
    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    /// Aborts the communicator: its threads and kernels stop, and it can no longer be used.
    /// A call in flight on another thread is waited for, for at most [`ABORT_WAIT`].
    pub fn abort(&self) {
        let held = self.calls.try_lock_for(ABORT_WAIT);
        if held.is_none() {
            log::warn!(
                "rank {} of {}: an NCCL call still in flight after {} ms is aborted from under it",
                self.rank,
                self.world,
                ABORT_WAIT.as_millis()
            );
        }
        if !self.aborted.swap(true, Ordering::AcqRel) {
            // SAFETY: a live communicator (not aborted before), aborted once; no call of ours
            // is in flight on it, or one is stuck inside NCCL, which the abort releases.
            if let Err(c) = nccl_sys::check(unsafe { (self.nccl.comm_abort)(self.comm) }) {
                log::warn!("ncclCommAbort: {}", self.nccl.describe(c));
            }
        }
    }

    /// Runs `f`, NCCL calls on the handle, under the call lock; refused after an abort.
    fn with_comm<T>(&self, op: &str, f: impl FnOnce(ncclComm_t) -> T) -> Result<T> {
        let _calls = self.calls.lock();
        if self.is_aborted() {
            return Err(Error::Nccl {
                op: self.on_rank(op),
                code: 0,
                message: "the communicator was aborted".into(),
            });
        }
        Ok(f(self.comm))
    }

    /// `op` with this rank, for errors.
    fn on_rank(&self, op: &str) -> String {
        format!("{op} on rank {} of {}", self.rank, self.world)
    }

    /// One look at the communicator's asynchronous state.
    fn look(&self, op: &str) -> Look {
        let state = self.with_comm(op, |comm| {
            let mut state = nccl_sys::NCCL_SUCCESS;
            // SAFETY: a live communicator (not aborted, under the lock); out pointer valid.
            let rc = unsafe { (self.nccl.comm_get_async_error)(comm, &mut state) };
            async_state(rc, state)
        });
        match state {
            Ok(Ok(look)) => look,
            Ok(Err(code)) => Look::Failed(nccl_error(&self.nccl, self.on_rank(op), code)),
            Err(e) => Look::Failed(e),
        }
    }

    /// The communicator's asynchronous error, if it has one.
    fn async_error(&self, op: &str) -> Option<Error> {
        match self.look(op) {
            Look::Failed(e) => Some(e),
            Look::Done | Look::Pending => None,
        }
    }

    /// Completes an operation NCCL answered with `rc`: `ncclInProgress` (a non-blocking
    /// communicator) is polled with `ncclCommGetAsyncError` until it is no longer in progress,
    /// for at most `timeout`. On a failure or a timeout the communicator is aborted and the
    /// error names `op` and this rank.
    fn settle(&self, op: &str, rc: ncclResult_t, timeout: Duration) -> Result<()> {
        let polled = match nccl_sys::check(rc) {
            Ok(()) => return Ok(()),
            Err(c) if c.0 == nccl_sys::NCCL_IN_PROGRESS => {
                poll_bounded(timeout, &mut RealClock(Instant::now()), || self.look(op))
            }
            Err(c) => Err(Stop::Failed(nccl_error(&self.nccl, self.on_rank(op), c))),
        };
        polled.map_err(|stop| self.give_up(op, stop, timeout))
    }

    /// Aborts the communicator after `op` failed or timed out, and says so.
    fn give_up(&self, op: &str, stop: Stop, timeout: Duration) -> Error {
        self.abort();
        match stop {
            Stop::Failed(e) => e,
            Stop::TimedOut => Error::Nccl {
                op: self.on_rank(op),
                code: 0,
                message: format!(
                    "not done within {} s: another rank died, stalled or never took part; the communicator was aborted",
                    timeout.as_secs_f64()
                ),
            },
        }
    }

    /// `ncclCommFinalize`, waited for (a non-blocking communicator created here), then
    /// `ncclCommDestroy`; an abort instead when finalizing fails or takes past the timeout.
    fn close(&self) {
        if let (Mode::NonBlocking, Some(finalize)) = (self.mode, self.nccl.comm_finalize) {
            // SAFETY: a live communicator; its loads have waited for their collectives.
            let finalized = self
                .with_comm("ncclCommFinalize", |comm| unsafe { finalize(comm) })
                .and_then(|rc| self.settle("ncclCommFinalize", rc, self.timeout));
            if let Err(e) = finalized {
                log::warn!("{e}");
                return;
            }
        }
        // SAFETY: created by `init`, destroyed once; the loads that used it have waited for
        // their collectives (a wait that gave up aborted it instead).
        let destroyed =
            self.with_comm("ncclCommDestroy", |comm| unsafe { (self.nccl.comm_destroy)(comm) });
        if let Ok(Err(c)) = destroyed.map(nccl_sys::check) {
            log::warn!("ncclCommDestroy: {}", self.nccl.describe(c));
        }
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        if self.owned && !self.is_aborted() {
            self.close();
        }
    }
}

/// One load's use of a communicator: its stream, its status buffer, and the waits.
#[derive(Debug)]
pub struct Exchange<'a> {
    comm: &'a Communicator,
    device: Arc<CudaDevice>,
    stream: Stream,
    status: DeviceBuffer,
    timeout: Duration,
    /// Whether [`Exchange::connect`] has run.
    connected: bool,
    /// What the ranks must agree on at connect, before any byte is exchanged.
    agreement: Option<Agreement>,
}

// SAFETY: the stream and the status buffer belong to `device`'s primary context, which every
// method binds on the calling thread before it uses them, and `&mut self` (or the drop) keeps
// them to one thread at a time; the communicator is `Sync`.
unsafe impl Send for Exchange<'_> {}

impl<'a> Exchange<'a> {
    /// A stream and a status buffer on `device` for exchanges over `comm`.
    pub fn new(
        comm: &'a Communicator,
        device: &Arc<CudaDevice>,
        timeout: Duration,
    ) -> Result<Self> {
        let status = device.alloc(STATUS_BYTES * comm.world, "the cooperative status buffer")?;
        device.bind()?;
        let stream = Stream::new()?;
        Ok(Self {
            comm,
            device: Arc::clone(device),
            stream,
            status,
            timeout,
            connected: false,
            agreement: None,
        })
    }

    /// Makes [`Exchange::connect`] check that every rank holds the same `agreement`
    /// (checkpoint and plan: `coop::agree`) before the first exchange.
    pub fn agree_on(&mut self, agreement: Agreement) {
        self.agreement = Some(agreement);
    }

    /// Every rank's status of round `round`: this rank's `failure` in, per rank its failure
    /// message (`None`: fine) out. Everything issued before it on the stream (the previous
    /// rounds' broadcasts) has completed when it returns `Ok`.
    pub fn status(&mut self, round: usize, failure: Option<&str>) -> Result<Vec<Option<String>>> {
        self.status_of(&format!("round {round}"), failure)
    }

    /// Connects the ranks for the exchange's collectives, once per exchange: one tiny
    /// broadcast from every rank (as a round's) and a status exchange, whose results do not
    /// matter. NCCL connects peers at their first collective, which costs a tenth of a second
    /// or more per process; every rank calls this first thing (before its first piece is
    /// read), so that it overlaps the reads instead of adding itself to the first round.
    pub fn connect(&mut self) -> Result<()> {
        if self.connected {
            return Ok(());
        }
        let ranges: Vec<(u64, u64, usize)> = (0..self.comm.world)
            .map(|r| (self.status.ptr() + (r * STATUS_BYTES) as u64, STATUS_BYTES as u64, r))
            .collect();
        // SAFETY: each range is a slot of the status buffer, which nothing else uses until
        // the status exchange below (same stream) has waited for the broadcasts.
        unsafe { self.broadcast(&ranges) }?;
        self.status_of("the first exchange (connecting the ranks)", None)?;
        if let Some(agreement) = self.agreement.take() {
            self.check_agreement(&agreement)?;
        }
        self.connected = true;
        Ok(())
    }

    /// Every rank's identity against rank 0's: a fixed-size summary first, and the whole
    /// identities only when the summaries differ (every rank sees the same summaries, so all
    /// take the same step), then the same error on every rank.
    fn check_agreement(&mut self, agreement: &Agreement) -> Result<()> {
        let summary = agreement.identity.summary();
        let summaries = self.gather("the checkpoint's identity", &summary)?;
        if agree::compare_summaries(&summaries, self.comm.world)? {
            return Ok(());
        }
        let all = self.gather("the checkpoint's files", &agreement.identity.to_bytes())?;
        let all: Vec<agree::Identity> =
            all.iter().filter_map(|bytes| agree::Identity::from_bytes(bytes)).collect();
        Err(agree::disagreement(&all, &agreement.paths).unwrap_or_else(|| Error::RanksDiffer {
            rank: 0,
            world: self.comm.world,
            path: None,
            what: "the ranks' summaries differ but their identities agree".to_owned(),
        }))
    }

    /// Every rank's `mine` (of equal length on every rank), in rank order: each rank's bytes
    /// in its own slot, zero elsewhere, summed.
    fn gather(&mut self, what: &str, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let (rank, world) = (self.comm.rank, self.comm.world);
        let len = mine.len().max(1);
        let mut slots = vec![0u8; len * world];
        slots[rank * len..][..mine.len()].copy_from_slice(mine);
        let buffer = self.device.alloc(slots.len(), "the cooperative agreement buffer")?;
        self.all_reduce_bytes(buffer.ptr(), &mut slots, what)?;
        Ok(slots.chunks(len).map(|c| c[..mine.len()].to_vec()).collect())
    }

    /// The status exchange behind [`Exchange::status`], named `what` in errors.
    fn status_of(&mut self, what: &str, failure: Option<&str>) -> Result<Vec<Option<String>>> {
        let mut slots = status_slots(self.comm.world, self.comm.rank, failure);
        self.all_reduce_bytes(self.status.ptr(), &mut slots, &format!("status of {what}"))?;
        Ok(read_status(&slots))
    }

    /// Sums `slots` byte-wise across the ranks through `buffer` (device memory of at least
    /// `slots.len()` bytes that nothing else on the stream uses), in place.
    fn all_reduce_bytes(&mut self, buffer: u64, slots: &mut [u8], what: &str) -> Result<()> {
        self.device.bind()?;
        // Queued on the exchange's stream, so the all-reduce after it reads these bytes (a
        // synchronous copy from pageable memory may return before its DMA lands, and the
        // stream does not wait for the default one).
        // SAFETY: the buffer holds `slots.len()` bytes; nothing on the stream uses it (the
        // previous exchange through it was waited for); `slots` is pageable (staged before
        // the call returns).
        unsafe { self.stream.copy_from_host(buffer, slots) }?;
        let op = format!("ncclAllReduce ({what})");
        let (ptr, stream, len) = (buffer as *mut c_void, self.stream.as_ptr().cast(), slots.len());
        let nccl = &self.comm.nccl;
        let rc = self.comm.with_comm(&op, |comm| {
            // SAFETY: in-place all-reduce over device memory of `len` bytes on this
            // communicator's device; the buffer outlives the wait below.
            unsafe {
                (nccl.all_reduce)(
                    ptr,
                    ptr,
                    len,
                    nccl_sys::NCCL_UINT8,
                    nccl_sys::NCCL_SUM,
                    comm,
                    stream,
                )
            }
        })?;
        self.comm.settle(&op, rc, self.timeout)?;
        self.wait(&format!("the {what}"))?;
        // The all-reduce has completed; the buffer holds `slots.len()` bytes.
        slots.copy_from_slice(&self.device.copy_to_host(buffer, slots.len())?);
        Ok(())
    }

    /// Issues, as one group, an in-place broadcast of each `(address, bytes, root)` range of
    /// device memory: the root's bytes land at the same address on every other rank. It
    /// returns once NCCL has queued them on the stream, without waiting for them.
    ///
    /// # Safety
    /// Each range is device memory of the load's GPU that nothing else writes until the next
    /// [`Exchange::status`] or [`Exchange::finish`] returns `Ok` (or, after an error, until
    /// the communicator was aborted and the stream waited for); on the root its bytes are final.
    pub unsafe fn broadcast(&mut self, ranges: &[(u64, u64, usize)]) -> Result<()> {
        let nccl = &self.comm.nccl;
        let fail = |op: &str, c| nccl_error(nccl, self.comm.on_rank(op), c);
        self.device.bind()?;
        let stream = self.stream.as_ptr().cast();
        let issued = self.comm.with_comm("ncclGroupStart", |comm| {
            // SAFETY: group calls have no preconditions.
            nccl_sys::check(unsafe { (nccl.group_start)() })
                .map_err(|c| fail("ncclGroupStart", c))?;
            let mut first_error = None;
            for &(addr, len, root) in ranges {
                let ptr = addr as *mut c_void;
                // SAFETY: the caller's promise on the range; in place (send == receive buffer).
                let rc = unsafe {
                    (nccl.broadcast)(
                        ptr,
                        ptr,
                        len as usize,
                        nccl_sys::NCCL_UINT8,
                        root as i32,
                        comm,
                        stream,
                    )
                };
                if let Err(c) = nccl_sys::check(rc) {
                    first_error.get_or_insert(fail("ncclBroadcast", c));
                }
            }
            // SAFETY: closes the group opened above.
            let end = unsafe { (nccl.group_end)() };
            Ok((first_error, end))
        });
        let (first_error, end) = issued.and_then(|group| group)?;
        let ended = self.comm.settle("ncclGroupEnd (broadcasts)", end, self.timeout);
        match first_error {
            Some(e) => {
                self.comm.abort();
                Err(e)
            }
            None => ended,
        }
    }

    /// Aborts the communicator (see [`Communicator::abort`]).
    pub fn abort(&self) {
        self.comm.abort();
    }

    /// The communicator.
    pub fn comm(&self) -> &Communicator {
        self.comm
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank
    }

    /// Ranks in the exchange.
    pub fn world(&self) -> usize {
        self.comm.world
    }

    /// Whether the communicator was aborted.
    pub fn is_aborted(&self) -> bool {
        self.comm.is_aborted()
    }

    /// Waits for everything issued so far.
    pub fn finish(&mut self) -> Result<()> {
        self.wait("the last broadcasts")
    }

    /// Waits for the stream's work so far, polling, for at most the timeout; on a timeout or
    /// an error the communicator is aborted first.
    fn wait(&mut self, what: &str) -> Result<()> {
        self.device.bind()?;
        // Destroyed when this returns: complete, or the communicator was aborted.
        let event = Event::record(&self.stream)?;
        let op = format!("waiting for {what}");
        let comm = self.comm;
        let look = || match event.is_done() {
            Ok(true) => Look::Done,
            Ok(false) => comm.async_error(&op).map_or(Look::Pending, Look::Failed),
            Err(e) => Look::Failed(e),
        };
        poll_bounded(self.timeout, &mut RealClock(Instant::now()), look)
            .map_err(|stop| comm.give_up(&op, stop, self.timeout))
    }
}

impl Drop for Exchange<'_> {
    fn drop(&mut self) {
        if !self.comm.is_aborted() {
            // Work still queued (broadcasts issued before an error) must not outlive the
            // buffers it writes, nor be waited for without a limit.
            if let Err(e) = self.wait("the exchange's last work") {
                log::warn!("{e}");
            }
        }
        // The stream is destroyed after this (its drop), with its context bound: its work
        // completed, or the communicator was aborted (its kernels stop); the driver defers
        // the release until the work is done.
        let _ = self.device.bind();
    }
}
