//! Device memory shared between processes (CUDA IPC): what a live source's server exports and
//! what a loader in another process maps, copies from, or aliases.
//!
//! - [`IpcHandle`] is the 64-byte token `cuIpcGetMemHandle` gives for one `cuMemAlloc`
//!   allocation; it travels as 128 hex digits. It names memory, it does not protect it: anyone
//!   who reads the token and runs as a user allowed to open the GPU can map the memory, so it
//!   only ever travels over a socket whose mode already limits who connects.
//! - [`ImportedBuffer`] is such memory mapped into this process (`cuIpcOpenMemHandle` with
//!   peer access enabled lazily, so a mapping on another GPU of the host works). The length
//!   comes from the peer: it is checked against the allocation the driver reports before any
//!   copy, so a server that announces more bytes than it shares cannot make gantry read past
//!   the allocation. Dropping it unmaps (`cuIpcCloseMemHandle`); the memory itself belongs to
//!   the exporter and lives as long as the exporter keeps it, which is what the live source's
//!   leases are for.
//! - The driver refuses to open a handle in the process that exported it: a server's own
//!   loads copy from its model directly, never through IPC.

use std::sync::Arc;

use cudarc::driver::sys;

use super::driver::{cuda_error, CudaDevice, DeviceBuffer};
use crate::error::{Error, Result};

/// The bytes of one `CUipcMemHandle`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IpcHandle(pub [u8; 64]);

impl std::fmt::Debug for IpcHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IpcHandle({}..)", &self.to_hex()[..16])
    }
}

impl IpcHandle {
    /// 128 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`IpcHandle::to_hex`]'s form; `None` for anything else.
    pub fn from_hex(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        if bytes.len() != 128 || !bytes.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let mut out = [0u8; 64];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hex = std::str::from_utf8(pair).ok()?;
            out[i] = u8::from_str_radix(hex, 16).ok()?;
        }
        Some(Self(out))
    }
}

impl DeviceBuffer {
    /// The IPC handle another process opens to map this allocation (empty buffers have none).
    pub fn ipc_handle(&self) -> Result<IpcHandle> {
        if self.is_empty() {
            return Err(Error::Internal("an empty device buffer has no IPC handle".into()));
        }
        let _bound = self.device().bind_scoped()?;
        let mut handle = sys::CUipcMemHandle { reserved: [0; 64] };
        // SAFETY: the out pointer is a local of the handle's type; ptr is a live cuMemAlloc
        // allocation of this context.
        unsafe { sys::cuIpcGetMemHandle(&mut handle, self.ptr()) }
            .result()
            .map_err(cuda_error(format!("cuIpcGetMemHandle({:#x})", self.ptr())))?;
        Ok(IpcHandle(handle.reserved.map(|b| b as u8)))
    }
}

/// Device memory of another process, mapped into this one; unmapped on drop.
#[derive(Debug)]
pub struct ImportedBuffer {
    ptr: u64,
    len: usize,
    device: Arc<CudaDevice>,
}

// SAFETY: a device address and a retained device; every driver call binds its context first.
unsafe impl Send for ImportedBuffer {}
// SAFETY: as above; nothing is mutated after construction.
unsafe impl Sync for ImportedBuffer {}

impl ImportedBuffer {
    /// Device address of the first byte in this process.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Bytes the exporter announced (and the driver confirmed).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: empty allocations are not shared.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device whose context maps it.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }
}

impl Drop for ImportedBuffer {
    fn drop(&mut self) {
        let _bound = self.device.bind_scoped().map_err(|e| log::warn!("unmapping IPC memory: {e}"));
        // SAFETY: ptr came from cuIpcOpenMemHandle in this context and is closed once.
        let rc = unsafe { sys::cuIpcCloseMemHandle(self.ptr) };
        if rc != sys::cudaError_enum::CUDA_SUCCESS {
            log::warn!("cuIpcCloseMemHandle of {} bytes failed: {rc:?}", self.len);
        }
    }
}

impl CudaDevice {
    /// Maps another process's allocation `handle` of `len` bytes into this device's context;
    /// `what` names it in errors. Fails (and unmaps) when the allocation is shorter than `len`.
    pub fn import(
        self: &Arc<Self>,
        handle: &IpcHandle,
        len: usize,
        what: &str,
    ) -> Result<ImportedBuffer> {
        if len == 0 {
            return Err(Error::Internal(format!("{what}: an empty allocation cannot be shared")));
        }
        let _bound = self.bind_scoped()?;
        let mut ptr: sys::CUdeviceptr = 0;
        let raw = sys::CUipcMemHandle { reserved: handle.0.map(|b| b as _) };
        let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        let opening = std::time::Instant::now();
        // SAFETY: the out pointer is a local; the driver validates the handle's bytes.
        unsafe { sys::cuIpcOpenMemHandle_v2(&mut ptr, raw, flags) }.result().map_err(
            cuda_error(format!("cuIpcOpenMemHandle for {what} on cuda:{}", self.ordinal())),
        )?;
        log::debug!("cuIpcOpenMemHandle of {len} bytes for {what}: {:?}", opening.elapsed());
        let imported = ImportedBuffer { ptr, len, device: Arc::clone(self) };
        self.check_range(ptr, len as u64).map_err(|reason| Error::Cuda {
            op: format!("mapping {what}"),
            code: sys::cudaError_enum::CUDA_ERROR_INVALID_VALUE as i32,
            message: format!("the peer announced {len} bytes: {reason}"),
        })?;
        Ok(imported)
    }
}

impl CudaDevice {
    /// Copies `bytes` from (pageable) host memory to device address `dst` in this device's
    /// context, and waits for it: publishing, not the load path (which stages in pinned
    /// memory).
    pub fn copy_from_host(&self, dst: u64, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let _bound = self.bind_scoped()?;
        // SAFETY: `bytes` is readable for its length during the (synchronous) call; the caller
        // checked `dst` against its allocation.
        unsafe { sys::cuMemcpyHtoD_v2(dst, bytes.as_ptr().cast(), bytes.len()) }
            .result()
            .map_err(cuda_error(format!("cuMemcpyHtoD of {} bytes to {dst:#x}", bytes.len())))
    }
}

#[cfg(test)]
mod tests {
    use super::IpcHandle;

    #[test]
    fn handles_travel_as_hex_and_nothing_else_parses() {
        let mut bytes = [0u8; 64];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i * 37 % 256) as u8;
        }
        let handle = IpcHandle(bytes);
        let hex = handle.to_hex();
        assert_eq!(hex.len(), 128);
        assert_eq!(IpcHandle::from_hex(&hex), Some(handle));
        assert_eq!(IpcHandle::from_hex(&hex[..126]), None);
        assert_eq!(IpcHandle::from_hex(&format!("{}zz", &hex[..126])), None);
        assert_eq!(IpcHandle::from_hex(&format!("{}é", &hex[..126])), None);
        assert_eq!(IpcHandle::from_hex(&"+0".repeat(64)), None);
    }
}
