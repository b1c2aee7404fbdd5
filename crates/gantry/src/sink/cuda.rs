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

fn cuda_error(op: impl Into<String>) -> impl FnOnce(DriverError) -> Error {
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

    /// Makes the device's primary context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        // SAFETY: the context is retained for self's lifetime.
        unsafe { result::ctx::set_current(self.context) }.map_err(cuda_error("cuCtxSetCurrent"))
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
        self.bind()?;
        result::mem_get_info().map_err(cuda_error("cuMemGetInfo"))
    }

    /// Allocates `len` bytes of device memory; `what` names the allocation in errors.
    pub fn alloc(self: &Arc<Self>, len: usize, what: &str) -> Result<DeviceBuffer> {
        self.bind()?;
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
        self.bind()?;
        let mut out = vec![0u8; len];
        if len > 0 {
            // SAFETY: the caller names device memory of at least `len` bytes; out is `len` bytes.
            unsafe { result::memcpy_dtoh_sync(&mut out, ptr) }
                .map_err(cuda_error("cuMemcpyDtoH"))?;
        }
        Ok(out)
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
        if let Err(e) = self.device.bind() {
            log::warn!("freeing device memory: {e}");
        }
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
        device.bind()?;
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
        let _ = self.device.bind();
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

/// A GPU of the sink and its copy streams.
struct Gpu {
    device: Arc<CudaDevice>,
    streams: Vec<sys::CUstream>,
    next_stream: usize,
}

/// Copies staged extents to device addresses on one or several GPUs: each staged byte is read
/// once and copied to every destination that wants it.
pub struct CudaSink {
    gpus: Vec<Gpu>,
    /// Per tensor, every place its bytes go (empty when skipped).
    targets: Vec<Vec<Place>>,
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
            .map(|(t, e)| {
                t.map(|addr| Place { destination: 0, addr, len: e.len }).into_iter().collect()
            })
            .collect();
        Self::fan_out(std::slice::from_ref(device), targets)
    }

    /// A sink copying tensor `i` to every place in `targets[i]`, whose destination is a
    /// position in `devices` (the same GPU may appear more than once: each entry gets its own
    /// streams).
    pub fn fan_out(devices: &[Arc<CudaDevice>], targets: Vec<Vec<Place>>) -> Result<Self> {
        assert!(!devices.is_empty(), "a CUDA sink needs a GPU");
        assert!(
            targets.iter().flatten().all(|t| t.destination < devices.len()),
            "target on no GPU"
        );
        let previous_context = result::ctx::get_current().ok().flatten();
        let mut sink = Self {
            gpus: Vec::with_capacity(devices.len()),
            targets,
            bound: usize::MAX,
            chosen: vec![None; devices.len()],
            poller: None,
            previous_context,
        };
        for device in devices {
            device.bind()?;
            let mut gpu = Gpu { device: Arc::clone(device), streams: Vec::new(), next_stream: 0 };
            for _ in 0..STREAMS {
                let s = result::stream::create(result::stream::StreamKind::NonBlocking)
                    .map_err(cuda_error("cuStreamCreate"))?;
                gpu.streams.push(s);
            }
            sink.gpus.push(gpu); // pushed at once: Drop destroys what was created so far
        }
        sink.bind(0)?;
        Ok(sink)
    }

    /// Makes GPU `gpu`'s context current on this thread.
    fn bind(&mut self, gpu: usize) -> Result<()> {
        if self.bound != gpu {
            self.gpus[gpu].device.bind()?;
            self.bound = gpu;
        }
        Ok(())
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
    fn queue_copies(&mut self, steps: &[CopyStep], source: &[u8]) -> Result<()> {
        for s in steps {
            let bytes = &source[s.source_offset as usize..(s.source_offset + s.len) as usize];
            for k in 0..self.targets[s.tensor].len() {
                let t = self.targets[s.tensor][k];
                assert!(s.target_offset + s.len <= t.len);
                self.bind(t.destination)?;
                let stream = match self.chosen[t.destination] {
                    Some(stream) => stream,
                    None => {
                        let gpu = &mut self.gpus[t.destination];
                        let stream = gpu.streams[gpu.next_stream];
                        gpu.next_stream = (gpu.next_stream + 1) % gpu.streams.len();
                        *self.chosen[t.destination].insert(stream)
                    }
                };
                // SAFETY: the destination range is inside the target's device memory
                // (asserted); the source is pinned staging held by the lease until the events
                // recorded after these copies complete.
                unsafe { result::memcpy_htod_async(t.addr + s.target_offset, bytes, stream) }
                    .map_err(cuda_error("cuMemcpyHtoDAsync"))?;
            }
        }
        Ok(())
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
        // The poller first: once copies are queued, the lease may only go back through it.
        self.poller(landed)?;
        if let Err(e) = self.queue_copies(steps, lease.as_slice()) {
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
        for gpu in &self.gpus {
            let _ = gpu.device.bind();
            for &s in &gpu.streams {
                // SAFETY: every copy on it has been waited for (poller joined); destroyed once.
                unsafe { result::stream::synchronize(s) }.ok();
                // SAFETY: as above.
                unsafe { result::stream::destroy(s) }.ok();
            }
        }
        if let Some(ctx) = self.previous_context {
            // SAFETY: restoring the caller's context, which it still holds.
            unsafe { result::ctx::set_current(ctx) }.ok();
        }
    }
}
