//! NCCL, loaded at run time, and the few collectives a cooperative load issues, behind safe
//! types: [`UniqueId`] (created once, passed to every rank), [`Communicator`] (one rank's
//! membership; destroyed on drop, or aborted when a peer stops answering), and [`Exchange`]
//! (a stream, a status buffer and the waits of one load).
//!
//! Nothing here waits without a limit. A collective's kernel spins until every rank has
//! joined, so a rank that died leaves the others' kernels spinning forever; every wait polls
//! an event and `ncclCommGetAsyncError` and gives up after the exchange's timeout, aborting
//! the communicator (which stops the spinning kernels) before it returns the error. Creating
//! a communicator blocks until every rank has called it, so it runs on a helper thread that
//! is abandoned, with an error, when the timeout passes.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{result, sys, DriverError};
use nccl_sys::{ncclComm_t, ncclUniqueId, Nccl, NcclCode};

use crate::error::{Error, Result};
use crate::memory::{CudaDevice, DeviceBuffer};

/// Bytes each rank has in a status exchange: a failure flag and its error message.
pub const STATUS_BYTES: usize = 512;

/// How long a rank waits for the others by default before it gives up on them.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// Loads NCCL (see [`nccl_sys::candidates`] for where it is looked for); `Err` says why not.
pub fn load_nccl() -> Result<Arc<Nccl>, String> {
    Nccl::load().map(Arc::new)
}

fn nccl_error(nccl: &Nccl, op: impl Into<String>, code: NcclCode) -> Error {
    Error::Nccl { op: op.into(), code: code.0, message: nccl.describe(code) }
}

fn cuda_error(op: &str) -> impl FnOnce(DriverError) -> Error + '_ {
    move |e: DriverError| {
        let message = e
            .error_string()
            .map_or_else(|_| format!("{e:?}"), |s| s.to_string_lossy().into_owned());
        Error::Cuda { op: op.to_owned(), code: e.0 as i32, message }
    }
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

/// One rank's membership of an NCCL communicator.
#[derive(Debug)]
pub struct Communicator {
    nccl: Arc<Nccl>,
    comm: ncclComm_t,
    rank: usize,
    world: usize,
    /// Whether gantry created it (and so destroys it).
    owned: bool,
    aborted: AtomicBool,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; gantry issues
// its calls from the thread running the load.
unsafe impl Send for Communicator {}
// SAFETY: as above; the only call made through a shared reference from several threads is
// ncclCommAbort, which NCCL allows concurrently with other calls.
unsafe impl Sync for Communicator {}

/// A communicator handle moved to the thread that waits for the other ranks.
struct SendComm(ncclComm_t);
// SAFETY: the handle is only moved, never used, by the waiting thread.
unsafe impl Send for SendComm {}

impl Communicator {
    /// Joins communicator `id` as `rank` of `world` on `device`; an error when the other ranks
    /// have not all joined within `timeout` (the set-up thread is then left behind).
    pub fn init(
        nccl: Arc<Nccl>,
        id: &UniqueId,
        rank: usize,
        world: usize,
        device: &Arc<CudaDevice>,
        timeout: Duration,
    ) -> Result<Self> {
        if world == 0 || rank >= world || world > i32::MAX as usize {
            return Err(Error::Config(format!("rank {rank} of {world}: no such rank")));
        }
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
                Ok(Self { nccl, comm, rank, world, owned: true, aborted: AtomicBool::new(false) })
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
    /// uses but does not destroy. Its rank and size are asked of NCCL.
    ///
    /// # Safety
    /// `comm` is a live communicator of that library whose device is the load's GPU; the
    /// caller issues nothing on it while a load uses it, and keeps it alive until then.
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
        Ok(Self {
            nccl,
            comm,
            rank: rank as usize,
            world: world as usize,
            owned: false,
            aborted: AtomicBool::new(false),
        })
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

    /// Aborts the communicator: its kernels stop spinning, and it can no longer be used.
    pub fn abort(&self) {
        if !self.aborted.swap(true, Ordering::AcqRel) {
            // SAFETY: a live communicator, aborted once.
            if let Err(c) = nccl_sys::check(unsafe { (self.nccl.comm_abort)(self.comm) }) {
                log::warn!("ncclCommAbort: {}", self.nccl.describe(c));
            }
        }
    }

    /// The communicator's asynchronous error, if it has one.
    fn async_error(&self) -> Option<Error> {
        let mut state = 0;
        // SAFETY: a live communicator; out pointer valid.
        let rc = unsafe { (self.nccl.comm_get_async_error)(self.comm, &mut state) };
        let code = nccl_sys::check(rc).err().or_else(|| nccl_sys::check(state).err())?;
        (code.0 != nccl_sys::NCCL_IN_PROGRESS)
            .then(|| nccl_error(&self.nccl, "the communicator (asynchronous error)", code))
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        if self.owned && !self.is_aborted() {
            // SAFETY: created by `init`, destroyed once; the loads that used it have waited
            // for their collectives.
            if let Err(c) = nccl_sys::check(unsafe { (self.nccl.comm_destroy)(self.comm) }) {
                log::warn!("ncclCommDestroy: {}", self.nccl.describe(c));
            }
        }
    }
}

/// One load's use of a communicator: its stream, its status buffer, and the waits.
#[derive(Debug)]
pub struct Exchange<'a> {
    comm: &'a Communicator,
    device: Arc<CudaDevice>,
    stream: sys::CUstream,
    status: DeviceBuffer,
    timeout: Duration,
}

// SAFETY: an exchange is driven by one thread at a time (moved to the thread that runs the
// rounds); its stream and status buffer belong to its device's primary context, which each
// method binds on the calling thread first, and the communicator may be used from any thread.
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
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(cuda_error("cuStreamCreate"))?;
        Ok(Self { comm, device: Arc::clone(device), stream, status, timeout })
    }

    /// Every rank's status of round `round`: this rank's `failure` in, per rank its failure
    /// message (`None`: fine) out. Everything issued before it on the stream (the previous
    /// rounds' broadcasts) has completed when it returns `Ok`.
    pub fn status(&mut self, round: usize, failure: Option<&str>) -> Result<Vec<Option<String>>> {
        let world = self.comm.world;
        let mut slots = vec![0u8; STATUS_BYTES * world];
        if let Some(message) = failure {
            let slot = &mut slots[self.comm.rank * STATUS_BYTES..][..STATUS_BYTES];
            slot[0] = 1;
            let mut end = message.len().min(STATUS_BYTES - 1);
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            slot[1..1 + end].copy_from_slice(&message.as_bytes()[..end]);
        }
        self.device.bind()?;
        // SAFETY: the status buffer holds `slots.len()` bytes; nothing on the stream uses it
        // (the previous status exchange was waited for).
        unsafe { result::memcpy_htod_sync(self.status.ptr(), &slots) }
            .map_err(cuda_error("cuMemcpyHtoD (status)"))?;
        let ptr = self.status.ptr() as *mut c_void;
        // SAFETY: in-place all-reduce over device memory of `slots.len()` bytes on this
        // communicator's device; the buffer outlives the wait below.
        let rc = unsafe {
            (self.comm.nccl.all_reduce)(
                ptr,
                ptr,
                slots.len(),
                nccl_sys::NCCL_UINT8,
                nccl_sys::NCCL_SUM,
                self.comm.comm,
                self.stream.cast(),
            )
        };
        nccl_sys::check(rc).map_err(|c| {
            nccl_error(&self.comm.nccl, format!("ncclAllReduce (status of round {round})"), c)
        })?;
        self.wait(&format!("the status of round {round}"))?;
        // SAFETY: the all-reduce has completed; `slots` is as long as the buffer.
        unsafe { result::memcpy_dtoh_sync(&mut slots, self.status.ptr()) }
            .map_err(cuda_error("cuMemcpyDtoH (status)"))?;
        Ok(slots
            .chunks(STATUS_BYTES)
            .map(|slot| {
                (slot[0] != 0).then(|| {
                    let text = &slot[1..];
                    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
                    String::from_utf8_lossy(&text[..end]).into_owned()
                })
            })
            .collect())
    }

    /// Issues, as one group, an in-place broadcast of each `(address, bytes, root)` range of
    /// device memory: the root's bytes land at the same address on every other rank.
    ///
    /// # Safety
    /// Each range is device memory of the load's GPU that nothing else writes until the next
    /// [`Exchange::status`] or [`Exchange::finish`] returns `Ok` (or, after an error, until
    /// the communicator was aborted and the stream waited for); on the root its bytes are final.
    pub unsafe fn broadcast(&mut self, ranges: &[(u64, u64, usize)]) -> Result<()> {
        let nccl = &self.comm.nccl;
        let fail = |op: &str, c| nccl_error(nccl, op, c);
        self.device.bind()?;
        // SAFETY: group calls have no preconditions.
        nccl_sys::check(unsafe { (nccl.group_start)() }).map_err(|c| fail("ncclGroupStart", c))?;
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
                    self.comm.comm,
                    self.stream.cast(),
                )
            };
            if let Err(c) = nccl_sys::check(rc) {
                first_error.get_or_insert(fail("ncclBroadcast", c));
            }
        }
        // SAFETY: closes the group opened above.
        let end = nccl_sys::check(unsafe { (nccl.group_end)() });
        match (first_error, end) {
            (Some(e), _) => Err(e),
            (None, Err(c)) => Err(fail("ncclGroupEnd", c)),
            (None, Ok(())) => Ok(()),
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
    /// an asynchronous NCCL error the communicator is aborted first.
    fn wait(&mut self, what: &str) -> Result<()> {
        self.device.bind()?;
        let event = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(cuda_error("cuEventCreate"))?;
        let waited = self.poll(event, what);
        // SAFETY: created above; no longer waited on (complete, or the comm was aborted).
        unsafe { result::event::destroy(event) }.ok();
        waited
    }

    fn poll(&mut self, event: sys::CUevent, what: &str) -> Result<()> {
        // SAFETY: event and stream belong to the bound context.
        unsafe { result::event::record(event, self.stream) }
            .map_err(cuda_error("cuEventRecord"))?;
        let start = Instant::now();
        let mut pause = Duration::from_micros(20);
        loop {
            // SAFETY: a recorded event of this context.
            match unsafe { result::event::query(event) } {
                Ok(()) => return Ok(()),
                Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_NOT_READY => {}
                Err(e) => return Err(cuda_error("cuEventQuery")(e)),
            }
            if let Some(e) = self.comm.async_error() {
                self.comm.abort();
                return Err(e);
            }
            if start.elapsed() > self.timeout {
                self.comm.abort();
                return Err(Error::Nccl {
                    op: format!("waiting for {what}"),
                    code: 0,
                    message: format!(
                        "rank {} of {}: the other ranks did not answer within {} s (a rank died or stalled); the communicator was aborted",
                        self.comm.rank,
                        self.comm.world,
                        self.timeout.as_secs()
                    ),
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }
}

impl Drop for Exchange<'_> {
    fn drop(&mut self) {
        let _ = self.device.bind();
        if !self.comm.is_aborted() {
            // SAFETY: the stream of this context; its collectives complete or were aborted.
            unsafe { result::stream::synchronize(self.stream) }.ok();
        }
        // SAFETY: destroyed once; the driver defers the release until its work is done.
        unsafe { result::stream::destroy(self.stream) }.ok();
    }
}
