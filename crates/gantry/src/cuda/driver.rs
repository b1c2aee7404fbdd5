//! The GPU through the CUDA driver API (cudarc, loaded at run time): the device and its
//! primary context, device memory, and page-locked host memory. Readers (cuFile), sinks and
//! the bindings share these types; none of them knows about the others.
//!
//! - [`CudaDevice`] probes for libcuda before the first driver call (cudarc panics when the
//!   library is missing; gantry returns [`Error::Unavailable`] instead), and uses the device's
//!   primary context, the one the CUDA runtime (PyTorch, a C++ server) uses, so device
//!   pointers move freely between gantry and the caller. [`ContextGuard`] makes the caller's
//!   context current again after each of gantry's calls.
//! - [`DeviceBuffer`] owns a `cuMemAlloc` allocation; dropping it frees it, so an error half
//!   way through a load frees everything allocated so far.
//! - [`PinnedHost`] page-locks the staging arena with `cuMemHostRegister` (not
//!   `cuMemHostAlloc`, so io_uring can register the same pages): O_DIRECT reads land in memory
//!   the GPU DMAs from, and each byte crosses the host once.

use std::ffi::{c_char, CStr};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{result, sys, DriverError};

use crate::engine::staging::Arena;
use crate::error::{Error, Result};

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

    /// GPUs on this machine (`cuDeviceGetCount`), or why they cannot be counted (no driver).
    pub fn count() -> Result<usize> {
        driver_available().map_err(|reason| Error::Unavailable { what: "CUDA", reason })?;
        result::init().map_err(cuda_error("cuInit"))?;
        let count = result::device::get_count().map_err(cuda_error("cuDeviceGetCount"))?;
        Ok(usize::try_from(count).unwrap_or(0))
    }

    /// Opens GPUs `ordinals` side by side, one thread per distinct GPU; a GPU named twice is
    /// opened once.
    pub fn open_all(ordinals: &[u32]) -> Result<Vec<Arc<Self>>> {
        open_all(ordinals)
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

    /// Enables access from this device's context to `to`'s memory (peer copies that do not
    /// pass through host memory); whether it is on. Leaves this device's context current.
    pub(crate) fn enable_peer_access(&self, to: &CudaDevice) -> bool {
        let mut can = 0;
        // SAFETY: valid device handles, an out pointer to a local.
        let rc = unsafe { sys::cuDeviceCanAccessPeer(&mut can, self.device, to.device) };
        if rc != sys::cudaError_enum::CUDA_SUCCESS || can == 0 || self.bind().is_err() {
            log::debug!("no peer access cuda:{} -> cuda:{}", self.ordinal, to.ordinal);
            return false;
        }
        // SAFETY: `to.context` is a retained primary context; this device's is current.
        let rc = unsafe { sys::cuCtxEnablePeerAccess(to.context, 0) };
        let on = matches!(
            rc,
            sys::cudaError_enum::CUDA_SUCCESS
                | sys::cudaError_enum::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED
        );
        if !on {
            log::debug!(
                "enabling peer access cuda:{} -> cuda:{}: {rc:?}",
                self.ordinal,
                to.ordinal
            );
        }
        on
    }

    /// Waits for every piece of work queued in the device's context (copies from pageable
    /// memory included, which may return before their DMA lands).
    pub(crate) fn synchronize(&self) -> Result<()> {
        let _bound = self.bind_scoped()?;
        // SAFETY: no preconditions beyond a current context.
        unsafe { sys::cuCtxSynchronize() }.result().map_err(cuda_error("cuCtxSynchronize"))
    }

    /// Sets `len` bytes at device address `ptr` (device memory of this context) to zero, on
    /// the default stream: [`CudaDevice::synchronize`] waits for it.
    pub(crate) fn zero(&self, ptr: u64, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let _bound = self.bind_scoped()?;
        // SAFETY: the caller names device memory of this context, `len` bytes long.
        unsafe { sys::cuMemsetD8_v2(ptr, 0, len) }
            .result()
            .map_err(cuda_error(format!("cuMemsetD8 of {len} bytes at {ptr:#x}")))
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
        crate::engine::topology::pci_numa_node(&self.bus_id)
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

impl ContextGuard {
    /// A guard that makes the context current on this thread now current again when dropped;
    /// `None` when none is (or the driver cannot say): nothing to restore.
    pub(crate) fn keep_current() -> Option<Self> {
        match result::ctx::get_current() {
            Ok(Some(previous)) => Some(Self { previous }),
            _ => None,
        }
    }
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

/// Opens GPUs `ordinals` side by side, one thread per distinct ordinal (creating a primary
/// context takes a few hundred milliseconds per GPU); the same ordinal named twice is opened
/// once and shared.
fn open_all(ordinals: &[u32]) -> Result<Vec<Arc<CudaDevice>>> {
    let mut distinct: Vec<u32> = ordinals.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let opened: Vec<Result<Arc<CudaDevice>>> = std::thread::scope(|scope| {
        let handles: Vec<_> =
            distinct.iter().map(|&n| scope.spawn(move || CudaDevice::open(n))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| Err(Error::Internal("opening a GPU panicked".into())))
            })
            .collect()
    });
    let opened = opened.into_iter().collect::<Result<Vec<_>>>()?;
    Ok(ordinals
        .iter()
        .map(|n| Arc::clone(&opened[distinct.binary_search(n).expect("opened")]))
        .collect())
}
