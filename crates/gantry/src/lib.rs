//! gantry: stream safetensors checkpoints from storage into GPU or host memory at the disk's
//! limit, with bounded host memory.
//!
//! A [`Loader`] built from a [`Config`] reads a checkpoint (a `.safetensors` file, a directory
//! or a `model.safetensors.index.json`) as it is: it parses the headers
//! ([`gantry_format`]), plans aligned reads of `chunk_bytes` ([`plan`]), chooses a reader per
//! file (io_uring `O_DIRECT` for cold files, threads of buffered `pread` for
//! files in the page cache), and streams the bytes through one staging ring of fixed size
//! into their destinations, telling the caller as each tensor lands.
//!
//! The source follows the data path, top-down: `api` (the [`Loader`] and what it hands back),
//! [`source`] (local files probed, object storage, its cache), [`plan`] (extents, the reader
//! per file, placement; pure), `engine` (files opened, readers, the staging ring, the
//! pipeline, sinks), [`cuda`] (device and host memory, the driver) beneath them, and
//! [`integrity`], [`coop`] (ranks that split the reads) and [`trace`] beside them. [`io`] and
//! [`memory`] keep the paths the bindings use; [`synth`] and [`baseline`] are tools apart.
//!
//! ```no_run
//! use gantry::{Config, Loader};
//!
//! let loader = Loader::new(Config::default().queue_depth(8).chunk_bytes(16 << 20))?;
//! let model = loader.load("model/")?;
//! for t in model.tensors() {
//!     println!("{} {} {:?}: {} bytes", t.entry.name, t.entry.dtype, t.entry.shape, t.bytes.len());
//! }
//! println!("{:.2} GB/s", model.report().gb_per_s());
//! # Ok::<(), gantry::Error>(())
//! ```

#![warn(missing_docs)]

mod api;
pub mod config;
pub mod coop;
pub mod cuda;
pub(crate) mod engine;
pub(crate) mod error;
pub mod integrity;
pub mod plan;
pub mod source;
mod tools;
pub mod trace;

pub use api::device::{DeviceModel, DeviceTensor, ReadyOnDevice};
pub use api::loader::{FileReport, HostModel, HostTensor, LoadReport, Loader, Ready};
pub use api::placed::{Placed, PlacedDeviceModel, PlacedDeviceTensor, PlacedModel, PlacedTensor};
pub use api::update::{
    check_disjoint, DeviceTarget, HostTarget, Targets, UpdateOptions, UpdateReport,
};
pub use config::{Config, ConfigValues, PathChoice, ReplicateVia};
pub use cuda::CudaDevice;
pub use error::{Error, Result};
pub use gantry_format::{
    dtype_named, Checkpoint, Dtype, ErrorKind as FormatErrorKind, FileId, FileInfo, FormatError,
    TensorEntry,
};
pub use plan::schedule::ReaderKind;
pub use plan::{placement, profile};
pub use source::live;
pub use tools::{baseline, synth};

/// The modules of readers and sources under the paths the bindings, tests and benches name:
/// fault injection and cuFile facts (readers of the engine), object storage, its local cache
/// and the file probes ([`source`]).
pub mod io {
    pub use crate::engine::read::{fault, gds};
    pub use crate::source::{cache, object, probe};
}

/// [`cuda`] under the name the bindings use: device memory, page-locked and plain host
/// buffers, the device itself.
pub mod memory {
    pub use crate::cuda::driver as cuda;
    pub use crate::cuda::{
        host, ipc, CudaDevice, DeviceBuffer, HostBuffer, ImportedBuffer, IpcHandle, PinnedHost,
    };
}

/// Opens a checkpoint and validates every header, reading no tensor data: a local
/// `.safetensors` file, directory or index, an object source (`s3://bucket/key`,
/// `s3://bucket/prefix/`, `gs://bucket/...`, `az://container/...`; see [`source::object`]), or a
/// live source (`unix:///path/to/socket`: a lease on its current version; see [`live`]).
///
/// ```no_run
/// let local = gantry::open("model/")?;
/// let remote = gantry::open("s3://weights/llama-3-8b/")?;
/// assert_eq!(local.tensors.len(), remote.tensors.len());
/// # Ok::<(), gantry::Error>(())
/// ```
pub fn open(source: impl AsRef<std::path::Path>) -> Result<Checkpoint> {
    open_with(source, &Config::default())
}

/// Whether `source` names an object in object storage (`s3://`, `gs://`, `az://`, `abfs://`,
/// `https://ACCOUNT.blob.core.windows.net/...`) rather than a local path.
pub fn is_object_source(source: impl AsRef<std::path::Path>) -> bool {
    let source = source.as_ref();
    !source.to_str().is_some_and(live::is_url) && crate::source::object::is_url(source)
}

/// [`open`] with `config`'s object-storage options ([`Config::object_option`]).
pub fn open_with(source: impl AsRef<std::path::Path>, config: &Config) -> Result<Checkpoint> {
    let source = source.as_ref();
    let _span = trace::span("phase", "headers");
    if source.to_str().is_some_and(live::is_url) {
        live::open_checkpoint(source)
    } else if crate::source::object::is_url(source) {
        crate::source::object::open_checkpoint(source, &config.object.options)
    } else {
        Ok(Checkpoint::open(source)?)
    }
}
