//! `gantry._gantry`, the extension behind the `gantry` Python package: a load runs on a thread
//! of its own (the GIL released), tensors come out as they land, and each is handed over
//! without a copy through DLPack. The Python layer (`python/gantry`) turns them into torch
//! tensors when torch is installed.

mod dlpack;
mod memory;
mod placed;
mod serve;
mod stream;

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(_gantry, GantryError, PyException, "Base class of gantry's errors.");
create_exception!(
    _gantry,
    FormatError,
    GantryError,
    "A checkpoint's header or index is malformed or inconsistent."
);
create_exception!(_gantry, IoError, GantryError, "Reading a file failed, or it was truncated.");
create_exception!(_gantry, CudaError, GantryError, "A CUDA or cuFile call failed.");
create_exception!(
    _gantry,
    UnavailableError,
    GantryError,
    "A path or library that was asked for is not available here."
);
create_exception!(_gantry, ConfigError, GantryError, "An option or destination is invalid.");
create_exception!(
    _gantry,
    PlacementError,
    ConfigError,
    "A tensor cannot be placed as the shard rule or placement asks (the message names it)."
);
create_exception!(
    _gantry,
    RankError,
    GantryError,
    "Another rank of a cooperative load failed, or the ranks opened different checkpoints."
);
create_exception!(_gantry, CancelledError, GantryError, "The load was cancelled.");
create_exception!(
    _gantry,
    LiveError,
    GantryError,
    "A live source (unix:///path) failed: no server, a broken protocol, a version no longer held."
);
create_exception!(
    _gantry,
    InternalError,
    GantryError,
    "A bug in gantry (a Rust panic), caught at the boundary: the message says where."
);

/// Runs the body of a function Python calls, turning a panic into [`InternalError`] with its
/// message: no `PanicException` (which `except Exception` does not catch) ever reaches Python.
pub(crate) fn guarded<T>(body: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            Err(InternalError::new_err(format!("internal error in gantry: {message}")))
        }
    }
}

/// The Python exception for a gantry error, carrying its message (and `errno` where known).
pub(crate) fn to_py(e: gantry::Error) -> PyErr {
    use gantry::Error as E;
    let message = e.to_string();
    match e {
        E::Format(f) if matches!(f.kind(), gantry::FormatErrorKind::Io { .. }) => {
            IoError::new_err(message)
        }
        E::Format(_) => FormatError::new_err(message),
        E::Io { .. } | E::Truncated { .. } | E::Integrity { .. } | E::Sha256 { .. } => {
            IoError::new_err(message)
        }
        E::Cuda { .. } | E::CuFile { .. } => CudaError::new_err(message),
        E::Unavailable { .. } => UnavailableError::new_err(message),
        E::Config(_) | E::Destination { .. } => ConfigError::new_err(message),
        E::Placement { .. } => PlacementError::new_err(message),
        E::Rank { .. } | E::RanksDiffer { .. } => RankError::new_err(message),
        E::Internal(_) => InternalError::new_err(message),
        E::Cancelled => CancelledError::new_err(message),
        E::Live { .. } => LiveError::new_err(message),
        _ => GantryError::new_err(message),
    }
}

/// `(name, dtype, shape, file, offset, nbytes)`.
type TensorRow = (String, String, Vec<u64>, String, u64, u64);

/// The tensor table of a checkpoint (file, directory or index), from its headers alone:
/// a list of `(name, dtype, shape, file, offset, nbytes)`.
#[pyfunction]
#[pyo3(signature = (source, config = None))]
fn inspect(
    py: Python<'_>,
    source: std::path::PathBuf,
    config: Option<&Bound<'_, pyo3::types::PyDict>>,
) -> PyResult<Vec<TensorRow>> {
    guarded(|| {
        let config = stream::parse_config(config)?;
        let checkpoint = py.detach(|| gantry::open_with(&source, &config)).map_err(to_py)?;
        Ok(table(&checkpoint))
    })
}

fn table(checkpoint: &gantry::Checkpoint) -> Vec<TensorRow> {
    checkpoint
        .tensors
        .iter()
        .map(|t| {
            let file = checkpoint.files[t.file.0].path.display().to_string();
            (t.name.clone(), t.dtype.to_string(), t.shape.clone(), file, t.offset, t.len)
        })
        .collect()
}

/// Free and total bytes of GPU `ordinal`'s memory.
#[pyfunction]
fn device_memory(py: Python<'_>, ordinal: u32) -> PyResult<(usize, usize)> {
    guarded(|| py.detach(|| stream::open_device(ordinal)?.memory()).map_err(to_py))
}

/// Buffers gantry holds for Python now (each load holds one per file until its last tensor
/// is released).
/// Waits at most `timeout_s` for cache copies being completed behind this process's loads;
/// what became of those that ended, and how many are still running.
#[pyfunction]
fn wait_for_cache_copies(py: Python<'_>, timeout_s: f64) -> PyResult<(Vec<String>, usize)> {
    if !(timeout_s.is_finite() && timeout_s >= 0.0) {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "timeout_s must be a finite number of seconds >= 0, not {timeout_s}"
        )));
    }
    let timeout = std::time::Duration::from_secs_f64(timeout_s.min(86_400.0));
    Ok(py.detach(|| gantry::io::cache::wait_behind(timeout)))
}

#[pyfunction]
fn live_buffers() -> usize {
    memory::live_buffers()
}

#[pymodule]
fn _gantry(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("GantryError", py.get_type::<GantryError>())?;
    m.add("FormatError", py.get_type::<FormatError>())?;
    m.add("IoError", py.get_type::<IoError>())?;
    m.add("CudaError", py.get_type::<CudaError>())?;
    m.add("UnavailableError", py.get_type::<UnavailableError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("PlacementError", py.get_type::<PlacementError>())?;
    m.add("RankError", py.get_type::<RankError>())?;
    m.add("CancelledError", py.get_type::<CancelledError>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    m.add("LiveError", py.get_type::<LiveError>())?;
    m.add_class::<stream::Tensor>()?;
    m.add_class::<stream::Stream>()?;
    m.add_class::<serve::Server>()?;
    m.add_function(wrap_pyfunction!(serve::update_host, m)?)?;
    m.add_function(wrap_pyfunction!(serve::update_device, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(wait_for_cache_copies, m)?)?;
    m.add_function(wrap_pyfunction!(placed::load_placed, m)?)?;
    m.add_function(wrap_pyfunction!(placed::load_cooperative_placed, m)?)?;
    m.add_function(wrap_pyfunction!(placed::shard_destinations, m)?)?;
    m.add_function(wrap_pyfunction!(device_memory, m)?)?;
    m.add_function(wrap_pyfunction!(live_buffers, m)?)?;
    m.add_function(wrap_pyfunction!(stream::nccl_unique_id, m)?)?;
    Ok(())
}
