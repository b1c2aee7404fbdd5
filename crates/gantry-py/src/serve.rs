//! Live sources from Python: a [`Server`] that publishes a state dict (or any checkpoint) on a
//! Unix socket, and in-place updates of the caller's own tensors from a source.
//!
//! Host tensors cross through DLPack (`__dlpack__`: the Python layer hands a byte view of each
//! tensor's own memory, so a contiguous CPU tensor is published, or updated, where it lies):
//! each producer keeps its memory alive until we call its deleter, after the bytes were read
//! or written with the GIL released. Writable targets must not share memory (tied weights):
//! two `&mut` over the same bytes are refused, naming both tensors. Device targets are plain
//! addresses, which the engine checks against their allocations before any byte moves.

use parking_lot::Mutex;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use gantry::live::{Server as LiveServer, ServerOptions};
use gantry::{DeviceTarget, Dtype, HostTarget, Targets, UpdateOptions};

use crate::dlpack::Imported;
use crate::{guarded, stream, to_py};

fn dtype(name: &str, tensor: &str) -> PyResult<Dtype> {
    gantry::dtype_named(name).ok_or_else(|| {
        PyValueError::new_err(format!("{tensor}: {name:?} is not a safetensors dtype"))
    })
}

/// A live source being served; see `gantry.serve`.
#[derive(Debug)]
#[pyclass(module = "gantry._gantry")]
pub struct Server {
    inner: Mutex<Option<LiveServer>>,
    url: String,
}

impl Server {
    /// Runs `f` on the server with the GIL released. The lock is taken only once detached: a
    /// thread that waited for it holding the GIL would deadlock with a publishing thread that
    /// holds it and needs the GIL back to return.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&LiveServer) -> gantry::Result<T> + Send,
    ) -> PyResult<T> {
        match py.detach(|| self.inner.lock().as_ref().map(f)) {
            Some(result) => result.map_err(to_py),
            None => Err(PyRuntimeError::new_err(format!("{}: the server is closed", self.url))),
        }
    }
}

#[pymethods]
impl Server {
    /// Binds the socket at `socket` (mode `mode`) and starts serving; nothing is served until
    /// the first publication. `max_connections_per_user`: `None` for the default.
    #[new]
    #[pyo3(signature = (socket, mode = 0o600, device = None, max_connections_per_user = None))]
    fn new(
        py: Python<'_>,
        socket: std::path::PathBuf,
        mode: u32,
        device: Option<u32>,
        max_connections_per_user: Option<usize>,
    ) -> PyResult<Self> {
        guarded(|| {
            if mode & !0o777 != 0 {
                return Err(PyValueError::new_err(format!("socket_mode {mode:#o} is not a mode")));
            }
            let defaults = ServerOptions::default();
            let options = ServerOptions {
                mode,
                device,
                max_connections_per_user: max_connections_per_user
                    .unwrap_or(defaults.max_connections_per_user),
                ..defaults
            };
            let server = py.detach(|| LiveServer::start(&socket, &options)).map_err(to_py)?;
            let url = server.url().to_owned();
            Ok(Self { inner: Mutex::new(Some(server)), url })
        })
    }

    /// `unix:///path`, the source string readers use.
    #[getter]
    fn url(&self) -> String {
        self.url.clone()
    }

    /// The current version's id (`None` before the first publication).
    #[getter]
    fn version(&self, py: Python<'_>) -> PyResult<Option<String>> {
        guarded(|| self.with(py, |s| Ok(s.version())))
    }

    /// Loads the checkpoint at `source` (any source gantry reads) and publishes it.
    #[pyo3(signature = (source, config = None))]
    fn publish(
        &self,
        py: Python<'_>,
        source: std::path::PathBuf,
        config: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<String> {
        guarded(|| {
            let config = stream::parse_config(config)?;
            self.with(py, |s| s.publish(&source, &config))
        })
    }

    /// Publishes `tensors`, `(name, dtype, shape, buffer)` each, as one `model.safetensors`,
    /// read from the buffers where they lie.
    fn publish_tensors(
        &self,
        py: Python<'_>,
        tensors: Vec<(String, String, Vec<u64>, Bound<'_, PyAny>)>,
    ) -> PyResult<String> {
        guarded(|| {
            let mut held = Vec::with_capacity(tensors.len());
            for (name, d, shape, object) in &tensors {
                held.push((
                    name.as_str(),
                    dtype(d, name)?,
                    &shape[..],
                    Imported::host(object, name)?,
                ));
            }
            let list: Vec<_> = held.iter().map(|(n, d, s, b)| (*n, *d, *s, b.bytes())).collect();
            let version = self.with(py, |s| s.publish_tensors(list));
            drop(held); // the producers' deleters, with the GIL
            version
        })
    }

    /// Stops serving and removes the socket file; readers holding a lease keep their bytes.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        guarded(|| {
            // Detached before the lock, as in `with`.
            py.detach(|| {
                let server = self.inner.lock().take();
                if let Some(server) = server {
                    server.close();
                }
            });
            Ok(())
        })
    }
}

/// What an update did, as a dict.
fn report_dict<'py>(py: Python<'py>, r: &gantry::UpdateReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("moved_tensors", r.moved_tensors)?;
    d.set_item("moved_bytes", r.moved_bytes)?;
    d.set_item("skipped_tensors", r.skipped_tensors)?;
    d.set_item("skipped_bytes", r.skipped_bytes)?;
    d.set_item("ignored_tensors", r.ignored_tensors)?;
    d.set_item("version", r.version.clone())?;
    Ok(d)
}

/// Updates host tensors in place: `targets` are `(name, dtype, shape, writable buffer)`.
#[pyfunction]
#[pyo3(signature = (source, targets, changed_only = false, ignore_extra = false, config = None))]
pub fn update_host<'py>(
    py: Python<'py>,
    source: std::path::PathBuf,
    targets: Vec<(String, String, Vec<u64>, Bound<'py, PyAny>)>,
    changed_only: bool,
    ignore_extra: bool,
    config: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyDict>> {
    guarded(|| {
        let loader = gantry::Loader::new(stream::parse_config(config)?).map_err(to_py)?;
        let mut held = Vec::with_capacity(targets.len());
        for (name, d, shape, object) in &targets {
            held.push((name.as_str(), dtype(d, name)?, &shape[..], Imported::host(object, name)?));
        }
        // Before any slice is made: two slices over the same bytes would alias.
        let ranges = held.iter().map(|h| (h.3.addr() as u64, h.3.len() as u64, h.0)).collect();
        gantry::check_disjoint(ranges).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let list = held.iter_mut().map(|(name, dtype, shape, b)| {
            // SAFETY: the targets' ranges were checked disjoint above, so no two of these
            // slices alias; each lives while `held` does, past the update.
            let bytes = unsafe { b.bytes_mut() };
            HostTarget { name, dtype: *dtype, shape, bytes }
        });
        let targets = Targets::Host(list.collect());
        let options = UpdateOptions { changed_only, ignore_extra };
        let report = py.detach(|| loader.update(&source, targets, &options));
        drop(held); // the producers' deleters, with the GIL
        report_dict(py, &report.map_err(to_py)?)
    })
}

/// Updates tensors on GPU `ordinal` in place: `targets` are `(name, dtype, shape, address)`.
#[pyfunction]
#[pyo3(signature = (source, ordinal, targets, changed_only = false, ignore_extra = false, config = None))]
pub fn update_device<'py>(
    py: Python<'py>,
    source: std::path::PathBuf,
    ordinal: u32,
    targets: Vec<(String, String, Vec<u64>, u64)>,
    changed_only: bool,
    ignore_extra: bool,
    config: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyDict>> {
    guarded(|| {
        let loader = gantry::Loader::new(stream::parse_config(config)?).map_err(to_py)?;
        let mut list = Vec::with_capacity(targets.len());
        for (name, d, shape, ptr) in &targets {
            list.push(DeviceTarget { name, dtype: dtype(d, name)?, shape, ptr: *ptr });
        }
        let options = UpdateOptions { changed_only, ignore_extra };
        let report = py
            .detach(|| {
                let device = stream::open_device(ordinal)?;
                loader.update(&source, Targets::Device(device, list), &options)
            })
            .map_err(to_py)?;
        report_dict(py, &report)
    })
}
