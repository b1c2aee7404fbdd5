//! Memory and devices: host buffers, device buffers, page-locked staging and the CUDA
//! device/context (`driver`), and the 2-D copies of strided slices (`copy`). Below the
//! engine's readers and sinks, so that readers know nothing of destinations and both share
//! one definition of each. The place that calls the CUDA driver: the sinks, `coop` and a
//! baseline still call it too, listed in `tests/layout.rs` to move here.

pub(crate) mod copy;
pub mod driver;
pub mod host;
pub mod ipc;

pub use driver::{CudaDevice, DeviceBuffer, PinnedHost};
pub use host::HostBuffer;
pub use ipc::{ImportedBuffer, IpcHandle};
