//! Memory gantry allocated for Python: one buffer per file's data section, host or device,
//! shared by every tensor that points into it and freed when the last of them (and the load
//! writing into it) lets go.

use std::sync::atomic::{AtomicUsize, Ordering};

use gantry::sink::cuda::DeviceBuffer;
use gantry::sink::host::HostBuffer;

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Buffers alive now (for tests: every load's memory is freed once its tensors are gone).
pub fn live_buffers() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// One buffer.
#[derive(Debug)]
pub enum Memory {
    /// Host memory; `base` is where the buffer's bytes start.
    Host {
        /// Owned, unmapped on drop.
        _buffer: HostBuffer,
        /// Its first byte's address.
        base: u64,
    },
    /// Device memory.
    Device(DeviceBuffer),
}

impl Memory {
    /// Host memory of `len` bytes.
    pub fn host(len: usize) -> gantry::Result<Self> {
        let mut buffer = HostBuffer::new(len)?;
        let base = buffer.as_mut_ptr() as u64;
        LIVE.fetch_add(1, Ordering::Relaxed);
        Ok(Memory::Host { _buffer: buffer, base })
    }

    /// Device memory.
    pub fn device(buffer: DeviceBuffer) -> Self {
        LIVE.fetch_add(1, Ordering::Relaxed);
        Memory::Device(buffer)
    }

    /// Address of the first byte (host or device).
    pub fn base(&self) -> u64 {
        match self {
            Memory::Host { base, .. } => *base,
            Memory::Device(d) => d.ptr(),
        }
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}
