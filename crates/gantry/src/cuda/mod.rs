//! Memory and devices: host buffers, device buffers, page-locked staging and the CUDA
//! device/context (`driver`), streams and events (`stream`), the 2-D copies of strided slices
//! (`copy`) and shared device memory (`ipc`). Below the engine's readers and sinks, so that
//! readers know nothing of destinations and both share one definition of each. The one place
//! that calls the CUDA driver (`tests/layout.rs` holds the rest of the crate to it).

pub(crate) mod copy;
pub mod driver;
pub mod host;
pub mod ipc;
pub(crate) mod stream;

pub use driver::{CudaDevice, DeviceBuffer, PinnedHost};
pub use host::HostBuffer;
pub use ipc::{ImportedBuffer, IpcHandle};
