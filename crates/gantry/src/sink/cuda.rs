//! GPU destinations through the CUDA driver API (cudarc, loaded at run time).
//!
//! - [`CudaDevice`] probes for libcuda before the first driver call (cudarc panics when the
//!   library is missing; gantry returns [`Error::Unavailable`] instead), and uses the device's
//!   primary context, the one the CUDA runtime (PyTorch, a C++ server) uses, so device
//!   pointers move freely between gantry and the caller.
//! - [`DeviceBuffer`] owns a `cuMemAlloc` allocation; dropping it frees it, so an error half
//!   way through a load frees everything allocated so far.
//! - [`PinnedHost`] page-locks the staging arena with `cuMemHostRegister` (not
//!   `cuMemHostAlloc`, so io_uring can register the same pages): O_DIRECT reads land in memory
//!   the GPU DMAs from, and each byte crosses the host once.
//! - [`CudaSink`] queues each staged extent's copies on one of a few streams per GPU (one
//!   read can feed several GPUs), records an event per GPU, and hands (events, lease) to a
//!   poller thread. The poller waits for the events, then returns the staging slot to the
//!   pool and tells the consumer the extent landed. So a buffer is
//!   reused only after the GPU has finished reading it, and a tensor is reported ready only
//!   after its copies completed.

use std::ffi::{c_char, CStr};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use cudarc::driver::{result, sys, DriverError};
use gantry_format::Checkpoint;

use super::gpus::{Gpu, Setup};
use super::{RawTarget, Sink};
use crate::error::{Error, Result};
use crate::io::Message;
use crate::placement::Place;
use crate::plan::{CopyStep, Extent};
use crate::staging::{Arena, Lease};

/// Copy streams per load: enough to keep both copy engines busy while events are polled.
pub const STREAMS: usize = 4;

/// Whether the CUDA driver library can be loaded; `Err` says why not. Probed once.
pub fn driver_available() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let candidates = cudarc::get_lib_name_candidates("cuda");
            for name in &candidates {
                // SAFETY: loading the CUDA driver runs its initialisers, which have no
                // preconditions; it stays loaded for cudarc.
                if unsafe { libloading::Library::new(name) }.is_ok() {
                    return Ok(());
                }
            }
            Err(format!("the CUDA driver library was not found (tried {})", candidates.join(", ")))
        })
        .clone()
}

pub(crate) fn cuda_error(op: impl Into<String>) -> impl FnOnce(DriverError) -> Error {
    let op = op.into();
    move |e: DriverError| {
        let message = e
            .error_string()
            .map_or_else(|_| format!("{e:?}"), |s| s.to_string_lossy().into_owned());
        Error::Cuda { op, code: e.0 as i32, message }
    }
}

/// One GPU, through its primary context.
#[derive(Debug)]
pub struct CudaDevice {
    ordinal: u32,
    device: sys::CUdevice,
    context: sys::CUcontext,
    bus_id: String,
    name: String,
}

// SAFETY: CUDA driver handles may be used from any thread once the context is current there,
// which `bind` ensures before every use.
unsafe impl Send for CudaDevice {}
// SAFETY: as above; the handles are never mutated after construction.
unsafe impl Sync for CudaDevice {}

impl CudaDevice {
    /// Opens GPU `ordinal`, or says why not (no driver, no such device).
    pub fn open(ordinal: u32) -> Result<Arc<Self>> {
        driver_available().map_err(|reason| Error::Unavailable { what: "CUDA", reason })?;
        result::init().map_err(cuda_error("cuInit"))?;
        let count = result::device::get_count().map_err(cuda_error("cuDeviceGetCount"))?;
        if ordinal as i64 >= count as i64 {
            return Err(Error::Cuda {
                op: format!("opening cuda:{ordinal}"),
                code: sys::cudaError_enum::CUDA_ERROR_INVALID_DEVICE as i32,
                message: format!("no such device: this machine has {count} CUDA device(s)"),
            });
        }
        let device = result::device::get(ordinal as i32).map_err(cuda_error("cuDeviceGet"))?;
        let name = result::device::get_name(device).unwrap_or_default();
        // SAFETY: device is a valid handle from cuDeviceGet.
        let context = unsafe { result::primary_ctx::retain(device) }
            .map_err(cuda_error("cuDevicePrimaryCtxRetain"))?;
        let mut bus = [0 as c_char; 32];
        // SAFETY: the buffer is 32 bytes as passed; the driver NUL-terminates.
        let rc = unsafe { sys::cuDeviceGetPCIBusId(bus.as_mut_ptr(), bus.len() as i32, device) };
        let bus_id = if rc == sys::cudaError_enum::CUDA_SUCCESS {
            // SAFETY: NUL-terminated by the driver within the buffer.
            unsafe { CStr::from_ptr(bus.as_ptr()) }.to_string_lossy().into_owned()
        } else {
            String::new()
        };
        Ok(Arc::new(Self { ordinal, device, context, bus_id, name }))
    }

    /// Opens GPUs `ordinals` side by side, one thread per distinct GPU; a GPU named twice is
    /// opened once.
    pub fn open_all(ordinals: &[u32]) -> Result<Vec<Arc<Self>>> {
        super::gpus::open_all(ordinals)
    }

    /// The driver's handles: device and primary context.
    pub(crate) fn raw(&self) -> (sys::CUdevice, sys::CUcontext) {
        (self.device, self.context)
    }

    /// Makes the device's primary context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        // SAFETY: the context is retained for self's lifetime.
        unsafe { result::ctx::set_current(self.context) }.map_err(cuda_error("cuCtxSetCurrent"))
    }

    /// Makes the device's primary context current on the calling thread until the guard is
    /// dropped, which makes current again the context that was (or none): a caller's thread
    /// is left bound as gantry found it. Every call on a caller's thread binds through this.
    pub fn bind_scoped(&self) -> Result<ContextGuard> {
        let previous = result::ctx::get_current().map_err(cuda_error("cuCtxGetCurrent"))?;
        self.bind()?;
        Ok(ContextGuard { previous: previous.unwrap_or(std::ptr::null_mut()) })
    }

    /// The ordinal (`N` of `cuda:N`).
    pub fn ordinal(&self) -> u32 {
        self.ordinal
    }

    /// The device's name, as the driver reports it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// PCI bus id (`0000:3B:00.0`), empty when the driver does not say.
    pub fn bus_id(&self) -> &str {
        &self.bus_id
    }

    /// The NUMA node the GPU hangs off, when the machine has several.
    pub fn numa_node(&self) -> Option<u32> {
        crate::topology::pci_numa_node(&self.bus_id)
    }

    /// Free and total device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        let _bound = self.bind_scoped()?;
        result::mem_get_info().map_err(cuda_error("cuMemGetInfo"))
    }

    /// Allocates `len` bytes of device memory; `what` names the allocation in errors.
    pub fn alloc(self: &Arc<Self>, len: usize, what: &str) -> Result<DeviceBuffer> {
        let _bound = self.bind_scoped()?;
        if len == 0 {
            return Ok(DeviceBuffer { ptr: 0, len: 0, device: Arc::clone(self) });
        }
        // SAFETY: plain allocation in the current (primary) context.
        let ptr = unsafe { result::malloc_sync(len) }.map_err(cuda_error(format!(
            "allocating {len} bytes on cuda:{} for {what}",
            self.ordinal
        )))?;
        Ok(DeviceBuffer { ptr, len, device: Arc::clone(self) })
    }

    /// Copies `len` bytes at device address `ptr` to a new host vector (checks and tools).
    pub fn copy_to_host(&self, ptr: u64, len: usize) -> Result<Vec<u8>> {
        let _bound = self.bind_scoped()?;
        let mut out = vec![0u8; len];
        if len > 0 {
            // SAFETY: the caller names device memory of at least `len` bytes; out is `len` bytes.
            unsafe { result::memcpy_dtoh_sync(&mut out, ptr) }
                .map_err(cuda_error("cuMemcpyDtoH"))?;
        }
        Ok(out)
    }

    /// The ordinal of the GPU whose memory device address `ptr` is (checks that a share landed
    /// on the GPU it was meant for).
    pub fn pointer_ordinal(ptr: u64) -> Result<u32> {
        let mut ordinal: i32 = -1;
        // SAFETY: the out pointer is a local of the size the attribute writes (an int); the
        // driver only reads `ptr`.
        let rc = unsafe {
            sys::cuPointerGetAttribute(
                (&mut ordinal as *mut i32).cast(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                ptr,
            )
        };
        rc.result().map_err(cuda_error(format!("cuPointerGetAttribute({ptr:#x})")))?;
        Ok(ordinal.max(0) as u32)
    }

    /// Checks that `[ptr, ptr + len)` lies inside one device allocation.
    pub fn check_range(&self, ptr: u64, len: u64) -> Result<(), String> {
        let (mut base, mut size) = (0u64, 0usize);
        // SAFETY: out pointers are valid; the driver only reads `ptr`.
        let rc = unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) };
        if rc != sys::cudaError_enum::CUDA_SUCCESS {
            return Err(format!("{ptr:#x} is not device memory of this context ({rc:?})"));
        }
        if ptr + len > base + size as u64 {
            return Err(format!("{len} bytes at {ptr:#x} pass the end of its allocation ({size} bytes at {base:#x})"));
        }
        Ok(())
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `open`.
        if let Err(e) = unsafe { result::primary_ctx::release(self.device) } {
            log::warn!("releasing the primary context of cuda:{} failed: {e:?}", self.ordinal);
        }
    }
}

/// The context that was current on a thread before [`CudaDevice::bind_scoped`]; made current
/// again on drop.
#[derive(Debug)]
#[must_use = "dropping the guard at once unbinds the device again"]
pub struct ContextGuard {
    /// NULL when no context was current.
    previous: sys::CUcontext,
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        // SAFETY: the context was current on this thread when the guard was made; a caller
        // that destroys its context while gantry runs on its thread breaks CUDA's own rules.
        if let Err(e) = unsafe { result::ctx::set_current(self.previous) } {
            log::warn!("restoring the caller's CUDA context failed: {e:?}");
        }
    }
}

/// Device memory owned by gantry; freed on drop.
#[derive(Debug)]
pub struct DeviceBuffer {
    ptr: u64,
    len: usize,
    device: Arc<CudaDevice>,
}

impl DeviceBuffer {
    /// Device address of the first byte (0 for an empty buffer).
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device it lives on.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        let _bound =
            self.device.bind_scoped().map_err(|e| log::warn!("freeing device memory: {e}"));
        // SAFETY: ptr came from cuMemAlloc in this context and is freed once.
        if let Err(e) = unsafe { result::free_sync(self.ptr) } {
            log::warn!("cuMemFree of {} bytes failed: {e:?}", self.len);
        }
    }
}

/// The staging arena, page-locked for CUDA DMA; unlocked on drop (before the arena unmaps,
/// since this holds it).
#[derive(Debug)]
pub struct PinnedHost {
    arena: Arc<Arena>,
    device: Arc<CudaDevice>,
}

impl PinnedHost {
    /// Page-locks all of `arena` for every CUDA context (`PORTABLE`).
    pub fn new(arena: Arc<Arena>, device: &Arc<CudaDevice>) -> Result<Self> {
        let _bound = device.bind_scoped()?;
        // SAFETY: the arena's mapping is valid for its length and outlives the registration
        // (self holds the Arc).
        let rc = unsafe {
            sys::cuMemHostRegister_v2(
                arena.base().cast(),
                arena.len(),
                sys::CU_MEMHOSTREGISTER_PORTABLE,
            )
        };
        rc.result()
            .map_err(cuda_error(format!("page-locking {} bytes of staging", arena.len())))?;
        Ok(Self { arena, device: Arc::clone(device) })
    }

    /// The arena.
    pub fn arena(&self) -> &Arc<Arena> {
        &self.arena
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        let _bound = self.device.bind_scoped();
        // SAFETY: the registration made in `new`.
        let rc = unsafe { sys::cuMemHostUnregister(self.arena.base().cast()) };
        if rc != sys::cudaError_enum::CUDA_SUCCESS {
            log::warn!("cuMemHostUnregister of the staging ring failed: {rc:?}");
        }
    }
}

/// Handles sent to the poller thread: one event per GPU the extent was copied to.
struct Pending {
    events: Vec<(usize, sys::CUevent)>,
    lease: Lease,
    extent: usize,
}

// SAFETY: events may be used from any thread with their context current (the poller binds it).
unsafe impl Send for Pending {}

/// Copies staged extents to device addresses on one or several GPUs: each staged byte is read
/// once and copied to every destination that wants it, strided rows with one 2-D copy.
pub struct CudaSink {
    gpus: Vec<Gpu>,
    /// Per tensor, every place its bytes go (empty when skipped); addresses are relative to
    /// `bases[place.destination]`.
    targets: Vec<Vec<Place>>,
    /// Per destination, the address its places are relative to.
    bases: Vec<u64>,
    /// The destinations' set-up, still running on their threads (placed loads).
    setup: Option<Setup>,
    /// Allocations the set-up made, one per destination, until [`CudaSink::take_buffers`].
    buffers: Vec<DeviceBuffer>,
    /// With replication over peer copies: `relay[a][b]` when destination `a` can copy to `b`
    /// without passing through host memory.
    relay: Option<Vec<Vec<bool>>>,
    /// The GPU whose context is current on the consumer thread.
    bound: usize,
    /// Per GPU, the stream this extent's copies use (scratch for `deliver`).
    chosen: Vec<Option<sys::CUstream>>,
    poller: Option<(Sender<Pending>, JoinHandle<()>)>,
    previous_context: Option<sys::CUcontext>,
}

impl std::fmt::Debug for CudaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ordinals: Vec<u32> = self.gpus.iter().map(|g| g.device.ordinal).collect();
        f.debug_struct("CudaSink").field("devices", &ordinals).finish_non_exhaustive()
    }
}

/// A device-to-device copy queued after an extent's host-to-device copies.
#[derive(Debug, Clone, Copy)]
struct Relay {
    from: usize,
    to: usize,
    source: u64,
    dest: u64,
    len: u64,
}

impl CudaSink {
    /// A sink writing tensor `i` to `targets[i]` (device address; `None` skips it). Binds the
    /// device's context on this thread until the sink is dropped.
    pub fn new(
        device: &Arc<CudaDevice>,
        targets: Vec<Option<u64>>,
        checkpoint: &Checkpoint,
    ) -> Result<Self> {
        let targets = targets
            .iter()
            .zip(&checkpoint.tensors)
            .map(|(t, e)| t.map(|addr| Place::whole(0, addr, e.len)).into_iter().collect())
            .collect();
        Self::fan_out(std::slice::from_ref(device), targets)
    }

    /// A sink copying tensor `i` to every place in `targets[i]`, whose destination is a
    /// position in `devices` (the same GPU may appear more than once: each entry gets its own
    /// streams) and whose address is absolute.
    pub fn fan_out(devices: &[Arc<CudaDevice>], targets: Vec<Vec<Place>>) -> Result<Self> {
        let mut sink = Self::empty(devices, targets);
        for device in devices {
            sink.gpus.push(Gpu::new(device)?); // pushed at once: Drop destroys what was made
        }
        sink.bases = vec![0; devices.len()];
        sink.bind(0)?;
        Ok(sink)
    }

    /// A sink for a placed load: destination `d` gets `bytes[d]` of device memory on
    /// `devices[d]`, and tensor `i`'s bytes go to `targets[i]`, addresses relative to their
    /// destination's allocation. Streams and allocations are made one thread per
    /// destination, side by side; the first delivery waits for them, so the loader opens
    /// files and starts reading meanwhile. With `relay`, bytes several GPUs want whole are
    /// copied to one of them from the host and relayed to the others over peer copies.
    pub fn placed(
        devices: &[Arc<CudaDevice>],
        bytes: &[u64],
        targets: Vec<Vec<Place>>,
        relay: bool,
    ) -> Result<Self> {
        let mut sink = Self::empty(devices, targets);
        sink.setup = Some(Setup::start(devices, bytes)?);
        sink.relay = relay.then(Vec::new);
        Ok(sink)
    }

    fn empty(devices: &[Arc<CudaDevice>], targets: Vec<Vec<Place>>) -> Self {
        assert!(!devices.is_empty(), "a CUDA sink needs a GPU");
        assert!(
            targets.iter().flatten().all(|t| t.destination < devices.len()),
            "target on no GPU"
        );
        Self {
            gpus: Vec::with_capacity(devices.len()),
            targets,
            bases: Vec::new(),
            setup: None,
            buffers: Vec::new(),
            relay: None,
            bound: usize::MAX,
            chosen: vec![None; devices.len()],
            poller: None,
            previous_context: result::ctx::get_current().ok().flatten(),
        }
    }

    /// Waits for the destinations' set-up, if it is still running.
    fn ready(&mut self) -> Result<()> {
        let Some(setup) = self.setup.take() else { return Ok(()) };
        for (gpu, buffer) in setup.finish()? {
            self.gpus.push(gpu);
            self.bases.push(buffer.ptr());
            self.buffers.push(buffer);
        }
        if self.relay.is_some() {
            self.relay = Some(super::gpus::enable_peers(&self.gpus));
        }
        self.bound = usize::MAX;
        Ok(())
    }

    /// The destinations' allocations (placed loads), once: waits for their set-up.
    pub fn take_buffers(&mut self) -> Result<Vec<DeviceBuffer>> {
        self.ready()?;
        Ok(std::mem::take(&mut self.buffers))
    }

    /// Makes GPU `gpu`'s context current on this thread.
    fn bind(&mut self, gpu: usize) -> Result<()> {
        if self.bound != gpu {
            self.gpus[gpu].device.bind()?;
            self.bound = gpu;
        }
        Ok(())
    }

    /// Binds GPU `gpu` and returns the stream its copies of this extent use.
    fn stream_for(&mut self, gpu: usize) -> Result<sys::CUstream> {
        self.bind(gpu)?;
        Ok(match self.chosen[gpu] {
            Some(stream) => stream,
            None => *self.chosen[gpu].insert(self.gpus[gpu].take_stream()),
        })
    }

    fn poller(&mut self, landed: &Sender<Result<Message>>) -> Result<&Sender<Pending>> {
        if self.poller.is_none() {
            let (tx, rx) = mpsc::channel::<Pending>();
            let devices: Vec<Arc<CudaDevice>> =
                self.gpus.iter().map(|g| Arc::clone(&g.device)).collect();
            let landed = landed.clone();
            let handle = std::thread::Builder::new()
                .name("gantry-cuda-poll".into())
                .spawn(move || {
                    for p in rx {
                        let mut synced = Ok(());
                        for &(gpu, event) in &p.events {
                            let done = devices[gpu].bind().and_then(|()| {
                                // SAFETY: the event was recorded in this context.
                                unsafe { result::event::synchronize(event) }
                                    .map_err(cuda_error("cuEventSynchronize"))
                            });
                            // SAFETY: the event is not used after this.
                            unsafe { result::event::destroy(event) }.ok();
                            synced = synced.and(done);
                        }
                        drop(p.lease); // the GPUs are done reading it (or failed: nothing reads it now)
                        let message = synced.map(|()| Message::Landed { extent: p.extent });
                        // A failed send means the load was abandoned; keep syncing so every
                        // lease comes back only after its copies are finished.
                        let _ = landed.send(message);
                    }
                })
                .map_err(|source| Error::Resource { what: "spawning the CUDA poller", source })?;
            self.poller = Some((tx, handle));
        }
        Ok(&self.poller.as_ref().expect("just set").0)
    }

    /// Queues the copies of `steps` from `source`; the streams used are left in `chosen`.
    fn queue_copies(&mut self, extent: usize, steps: &[CopyStep], source: &[u8]) -> Result<()> {
        let mut relays = Vec::new();
        for s in steps {
            let bytes = &source[s.source_offset as usize..(s.source_offset + s.len) as usize];
            for k in 0..self.targets[s.tensor].len() {
                let t = self.targets[s.tensor][k];
                let from = self.relay_source(s.tensor, k, extent);
                for piece in t.rows.pieces(s.target_offset, s.len) {
                    assert!(piece.dest + piece.len() <= t.rows.len(), "a piece past its share");
                    let dest = self.bases[t.destination] + t.addr + piece.dest;
                    if let Some(f) = from {
                        let f = self.targets[s.tensor][f];
                        let source = self.bases[f.destination] + f.addr + piece.dest;
                        let (from, to, len) = (f.destination, t.destination, piece.len());
                        relays.push(Relay { from, to, source, dest, len });
                        continue;
                    }
                    let stream = self.stream_for(t.destination)?;
                    // SAFETY: the destination lies inside the target's share (asserted), in
                    // device memory of the bound context; the source is pinned staging held
                    // by the lease until the events recorded after these copies complete.
                    unsafe { super::gpus::copy_piece(bytes, &piece, dest, stream)? };
                }
            }
        }
        self.queue_relays(&relays)
    }

    /// With replication over peer copies, the place of `tensor` that place `k` copies from
    /// (`None`: from the host). Places with the same rows form a group; one of them, in turn
    /// by extent so that every GPU's link takes its part, is copied from the host.
    fn relay_source(&self, tensor: usize, k: usize, extent: usize) -> Option<usize> {
        let relay = self.relay.as_ref()?;
        let places = &self.targets[tensor];
        let group: Vec<usize> =
            (0..places.len()).filter(|&j| places[j].rows == places[k].rows).collect();
        let first = group[extent % group.len()];
        (first != k && relay[places[first].destination][places[k].destination]).then_some(first)
    }

    /// Queues `relays` after the host-to-device copies already queued: each source GPU
    /// records an event, each destination's stream waits for it, then copies.
    fn queue_relays(&mut self, relays: &[Relay]) -> Result<()> {
        if relays.is_empty() {
            return Ok(());
        }
        let mut sources: Vec<(usize, sys::CUevent)> = Vec::new();
        let mut waited: Vec<(usize, usize)> = Vec::new();
        let mut outcome = Ok(());
        for r in relays {
            let queued = self.queue_relay(r, &mut sources, &mut waited);
            if queued.is_err() {
                outcome = queued;
                break;
            }
        }
        for (gpu, event) in sources {
            let _ = self.bind(gpu);
            // SAFETY: destroyed once; the driver keeps it until the waits on it are done.
            unsafe { result::event::destroy(event) }.ok();
        }
        outcome
    }

    fn queue_relay(
        &mut self,
        r: &Relay,
        sources: &mut Vec<(usize, sys::CUevent)>,
        waited: &mut Vec<(usize, usize)>,
    ) -> Result<()> {
        let event = match sources.iter().find(|(g, _)| *g == r.from) {
            Some(&(_, e)) => e,
            None => {
                let stream = self.stream_for(r.from)?;
                let e = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                    .map_err(cuda_error("cuEventCreate"))?;
                sources.push((r.from, e));
                // SAFETY: event and stream belong to the bound context.
                unsafe { result::event::record(e, stream) }.map_err(cuda_error("cuEventRecord"))?;
                e
            }
        };
        let stream = self.stream_for(r.to)?;
        if !waited.contains(&(r.to, r.from)) {
            // SAFETY: a recorded event of a live context; the stream is of the bound one.
            unsafe { sys::cuStreamWaitEvent(stream, event, 0) }
                .result()
                .map_err(cuda_error("cuStreamWaitEvent"))?;
            waited.push((r.to, r.from));
        }
        let (from, to) = (&self.gpus[r.from].device, &self.gpus[r.to].device);
        // SAFETY: both ranges are shares in their destinations' allocations; the source's
        // bytes are complete once the event waited for above has fired.
        unsafe { super::gpus::relay(from, r.source, to, r.dest, r.len, stream) }
    }

    /// Records an event after this extent's copies on every stream in `chosen`; on failure,
    /// waits for the copies instead (the lease must not come back before they finish).
    fn record_events(&mut self) -> Result<Vec<(usize, sys::CUevent)>> {
        let mut events = Vec::new();
        for gpu in 0..self.chosen.len() {
            let Some(stream) = self.chosen[gpu] else { continue };
            let recorded = self.bind(gpu).and_then(|()| {
                let event = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                    .map_err(cuda_error("cuEventCreate"))?;
                // SAFETY: event and stream belong to the bound context.
                match unsafe { result::event::record(event, stream) } {
                    Ok(()) => Ok(event),
                    Err(e) => {
                        // SAFETY: never recorded, destroyed once.
                        unsafe { result::event::destroy(event) }.ok();
                        Err(cuda_error("cuEventRecord")(e))
                    }
                }
            });
            match recorded {
                Ok(event) => {
                    self.chosen[gpu] = None;
                    events.push((gpu, event));
                }
                Err(e) => {
                    self.wait_chosen(); // this stream and those not reached yet
                    self.wait_events(events);
                    return Err(e);
                }
            }
        }
        Ok(events)
    }

    /// Waits for the copies queued on every stream in `chosen`, and clears it.
    fn wait_chosen(&mut self) {
        for gpu in 0..self.chosen.len() {
            if let Some(stream) = self.chosen[gpu].take() {
                let _ = self.bind(gpu);
                // SAFETY: a stream of this GPU's context, waited for only.
                unsafe { result::stream::synchronize(stream) }.ok();
            }
        }
    }

    /// Waits for recorded `events`, then destroys them.
    fn wait_events(&mut self, events: Vec<(usize, sys::CUevent)>) {
        for (gpu, event) in events {
            let _ = self.bind(gpu);
            // SAFETY: recorded in that GPU's context; waited for, then destroyed once.
            unsafe { result::event::synchronize(event) }.ok();
            // SAFETY: as above.
            unsafe { result::event::destroy(event) }.ok();
        }
    }
}

impl Sink for CudaSink {
    fn direct_target(&mut self, _: &Extent, _: &[CopyStep], _: u64) -> Option<RawTarget> {
        None // device memory: every extent goes through pinned staging
    }

    fn device_reads(&self) -> bool {
        self.gpus.len() == 1 && self.targets.iter().all(|t| t.len() <= 1)
    }

    fn device_pointer(&self, tensor: usize) -> Option<u64> {
        match self.targets[tensor].as_slice() {
            [only] if self.device_reads() => Some(only.addr),
            _ => None,
        }
    }

    fn deliver(
        &mut self,
        extent: usize,
        steps: &[CopyStep],
        lease: Lease,
        landed: &Sender<Result<Message>>,
    ) -> Result<bool> {
        if let Err(e) = self.ready() {
            drop(lease); // nothing was queued from it
            return Err(e);
        }
        // The poller first: once copies are queued, the lease may only go back through it.
        self.poller(landed)?;
        if let Err(e) = self.queue_copies(extent, steps, lease.as_slice()) {
            self.wait_chosen(); // the copies already queued must finish before the lease drops
            return Err(e);
        }
        let events = self.record_events()?;
        let pending = Pending { events, lease, extent };
        if let Err(mpsc::SendError(p)) = self.poller(landed)?.send(pending) {
            self.wait_events(p.events); // the poller is gone; wait here instead
        }
        Ok(false)
    }

    /// Stops the poller once it has waited for every extent sent to it (each lease is dropped
    /// only after its copies completed).
    fn settle(&mut self) {
        if let Some((tx, handle)) = self.poller.take() {
            drop(tx);
            if handle.join().is_err() {
                log::error!("the CUDA poller thread panicked");
            }
        }
    }
}

impl Drop for CudaSink {
    fn drop(&mut self) {
        self.settle();
        if let Some(setup) = self.setup.take() {
            drop(setup.finish()); // a load that never delivered: free what the threads made
        }
        self.gpus.clear(); // waits for each stream (the poller is joined), then destroys it
        self.buffers.clear(); // a failed load's allocations, before the caller's context returns
        if let Some(ctx) = self.previous_context {
            // SAFETY: restoring the caller's context, which it still holds.
            unsafe { result::ctx::set_current(ctx) }.ok();
        }
    }
}
