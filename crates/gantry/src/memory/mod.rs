//! Memory and devices: host buffers, device buffers, page-locked staging and the CUDA
//! device/context. Below `io` (readers) and `sink` (destinations), so that readers know
//! nothing of destinations and both share one definition of each.

pub(crate) mod copy;
pub mod cuda;
pub mod host;
pub mod ipc;

pub use cuda::{CudaDevice, DeviceBuffer, PinnedHost};
pub use host::HostBuffer;
pub use ipc::{ImportedBuffer, IpcHandle};
