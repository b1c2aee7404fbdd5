//! Memory gantry allocated for Python: one buffer per file's data section, host or device,
//! shared by every tensor that points into it and freed when the last of them (and the load
//! writing into it) lets go.

use std::sync::atomic::{AtomicUsize, Ordering};

use gantry::memory::DeviceBuffer;
use gantry::memory::HostBuffer;

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Buffers alive now (for tests: every load's memory is freed once its tensors are gone).
pub fn live_buffers() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// One buffer.
#[derive(Debug)]
pub enum Memory {
    /// Host memory at `base`. The load writing it owns the buffer while it runs and leaves it
    /// here when it ends (whatever its outcome), so it lives as long as this does.
    Host {
        /// The buffer, once the load has let go of it.
        slot: parking_lot::Mutex<Option<HostBuffer>>,
        /// Its first byte's address.
        base: u64,
    },
    /// Device memory.
    Device(DeviceBuffer),
}

impl Memory {
    /// A handle on host buffer `buffer`, which the load keeps until it calls [`Memory::keep`].
    pub fn host(buffer: &mut HostBuffer) -> Self {
        LIVE.fetch_add(1, Ordering::Relaxed);
        Memory::Host { slot: parking_lot::Mutex::new(None), base: buffer.as_mut_ptr() as u64 }
    }

    /// Device memory.
    pub fn device(buffer: DeviceBuffer) -> Self {
        LIVE.fetch_add(1, Ordering::Relaxed);
        Memory::Device(buffer)
    }

    /// Takes ownership of the host buffer this handle points into.
    pub fn keep(&self, buffer: HostBuffer) {
        if let Memory::Host { slot, base } = self {
            debug_assert_eq!(buffer.as_ptr() as u64, *base);
            *slot.lock() = Some(buffer);
        }
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
