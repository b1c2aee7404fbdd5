//! A load in progress, iterated from Python: `(name, Tensor)` as each tensor lands.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use gantry::io::object::Provider;
use gantry::memory::host::{file_buffer_layout, HostBuffer};
use gantry::{Checkpoint, Config, CudaDevice, Dtype, LoadReport, Loader, PathChoice};
use parking_lot::Mutex;
use pyo3::exceptions::{PyBufferError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::dlpack::{self, Export, DEVICE_CPU, DEVICE_CUDA};
use crate::memory::Memory;
use crate::to_py;

/// GPU `ordinal`, opened once per process.
pub fn open_device(ordinal: u32) -> gantry::Result<Arc<CudaDevice>> {
    static OPEN: Mutex<Option<HashMap<u32, Arc<CudaDevice>>>> = Mutex::new(None);
    let mut open = OPEN.lock();
    let open = open.get_or_insert_with(HashMap::new);
    if let Some(d) = open.get(&ordinal) {
        return Ok(Arc::clone(d));
    }
    let device = CudaDevice::open(ordinal)?;
    open.insert(ordinal, Arc::clone(&device));
    Ok(device)
}

/// `"cpu"`, `"cuda"` or `"cuda:N"`.
pub(crate) fn parse_device(device: &str) -> PyResult<Option<u32>> {
    match device {
        "cpu" => Ok(None),
        "cuda" => Ok(Some(0)),
        _ => device.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(Some).ok_or_else(|| {
            PyValueError::new_err(format!("'{device}' is not a device (cpu, cuda, cuda:N)"))
        }),
    }
}

/// The config keywords, as `Config`'s setters name them.
const KEYWORDS: &str = "path, profile, queue_depth, chunk_bytes, buffered_chunk_bytes, staging_bytes, threads, hot_fraction, verify_sha256, require_sha256, trace, cache_dir, cache_shared, object_part_bytes, object_concurrency, s3_endpoint, s3_region, s3_options, gcs_endpoint, azure_endpoint, object_options";

pub(crate) fn parse_config(options: Option<&Bound<'_, PyDict>>) -> PyResult<Config> {
    let mut c = Config::default();
    let Some(options) = options else { return Ok(c) };
    for (key, value) in options.iter() {
        let key: String = key.extract()?;
        c = match key.as_str() {
            "path" => c.path(value.extract::<String>()?.parse::<PathChoice>().map_err(to_py)?),
            "profile" => c.profile(value.extract::<String>()?.parse().map_err(to_py)?),
            "queue_depth" => c.queue_depth(count(&key, &value)?),
            "chunk_bytes" => c.chunk_bytes(count(&key, &value)?),
            "buffered_chunk_bytes" => c.buffered_chunk_bytes(count(&key, &value)?),
            "staging_bytes" => c.staging_bytes(count(&key, &value)?),
            "threads" => c.threads(count(&key, &value)?),
            "hot_fraction" => c.hot_fraction(value.extract()?),
            "verify_sha256" => c.verify_sha256(value.extract()?),
            "require_sha256" => c.require_sha256(value.extract()?),
            "cache_dir" => c.cache_dir(path_keyword(&key, &value)?),
            "cache_shared" => c.cache_shared(value.extract()?),
            "trace" => c.trace(path_keyword(&key, &value)?),
            "share_live" => c.share_live(value.extract()?),
            "object_part_bytes" => c.object_part_bytes(count(&key, &value)?),
            "object_concurrency" => c.object_concurrency(count(&key, &value)?),
            "s3_endpoint" => endpoint(c, "s3_endpoint", Provider::S3, value.extract()?)?,
            "s3_region" => c.object_option("aws_region", value.extract::<String>()?),
            "gcs_endpoint" => endpoint(c, "gcs_endpoint", Provider::Gcs, value.extract()?)?,
            "azure_endpoint" => endpoint(c, "azure_endpoint", Provider::Azure, value.extract()?)?,
            // Any provider's keys; `s3_options` is the older name.
            "object_options" | "s3_options" => {
                let options: std::collections::BTreeMap<String, String> = value.extract()?;
                options.into_iter().fold(c, |c, (k, v)| c.object_option(k, v))
            }
            "_read_delay_ms" => c.fault_injector(Arc::new(Delay(count(&key, &value)? as u64))),
            _ => {
                return Err(PyTypeError::new_err(format!(
                    "unknown config keyword '{key}' (one of: {KEYWORDS}, skip)"
                )))
            }
        };
    }
    c.validate().map_err(to_py)?;
    Ok(c)
}

/// A count or size keyword's value: an int from 0 to `usize::MAX` (`TypeError` for what is not
/// an int, `ValueError` naming the keyword for one out of range, never an `OverflowError`).
fn count(key: &str, value: &Bound<'_, PyAny>) -> PyResult<usize> {
    if !value.is_instance_of::<pyo3::types::PyInt>() {
        return Err(PyTypeError::new_err(format!(
            "{key} takes an int, not {}",
            value.get_type().name().map_or_else(|_| "?".to_owned(), |n| n.to_string())
        )));
    }
    value.extract::<usize>().map_err(|_| {
        PyValueError::new_err(format!("{key}={value}: must be from 0 to {}", usize::MAX))
    })
}

/// A path keyword's value (`cache_dir`, `trace`): not empty (an empty one would name the
/// current directory).
fn path_keyword(key: &str, value: &Bound<'_, PyAny>) -> PyResult<PathBuf> {
    let path: PathBuf = value.extract()?;
    if path.as_os_str().is_empty() {
        return Err(crate::ConfigError::new_err(format!(
            "{key} is empty: name a path (or leave the keyword out)"
        )));
    }
    Ok(path)
}

/// `window_mib` in bytes: 1 to [`WINDOW_MIB_MAX`] MiB.
pub(crate) fn window_bytes(mib: u64) -> PyResult<u64> {
    if !(1..=WINDOW_MIB_MAX).contains(&mib) {
        return Err(crate::ConfigError::new_err(format!(
            "window_mib={mib}: must be from 1 to {WINDOW_MIB_MAX} (1 TiB)"
        )));
    }
    Ok(mib << 20)
}

/// The largest `window_mib`: 1 TiB of scratch per GPU is more than any GPU has.
pub(crate) const WINDOW_MIB_MAX: u64 = 1 << 20;

/// The config keyword of a test hook: the load thread panics once it has handed out this
/// many tensors (tests of what a panic in the load leaves behind).
const PANIC_AFTER_READY: &str = "_panic_after_ready";

/// `options` without the panic hook, and the hook's count.
fn take_panic_hook<'py>(
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<(Option<Bound<'py, PyDict>>, Option<usize>)> {
    let Some(options) = options else { return Ok((None, None)) };
    let Some(count) = options.get_item(PANIC_AFTER_READY)? else {
        return Ok((Some(options.clone()), None));
    };
    let rest = options.copy()?;
    rest.del_item(PANIC_AFTER_READY)?;
    Ok((Some(rest), Some(count.extract()?)))
}

/// `c` with the endpoint of `provider`'s store, given as keyword `keyword`
/// ([`gantry::io::object::endpoint_options`]: the same settings as the CLI's flags); an error
/// naming the keyword when `url` is no endpoint.
fn endpoint(c: Config, keyword: &str, provider: Provider, url: String) -> PyResult<Config> {
    let options = gantry::io::object::endpoint_options(provider, &url)
        .map_err(|e| to_py(gantry::Error::Config(format!("{keyword}: {e}"))))?;
    Ok(options.into_iter().fold(c, |c, (k, v)| c.object_option(k, v)))
}

/// Slows every read down (tests of interruption).
struct Delay(u64);

impl gantry::io::fault::FaultInjector for Delay {
    fn rewrite(&self, _file: usize, _offset: u64, _len: u64, result: i64) -> i64 {
        std::thread::sleep(Duration::from_millis(self.0));
        result
    }
}

/// A tensor that has landed, in memory gantry owns; exported without a copy through DLPack
/// (`torch.from_dlpack`, `numpy.from_dlpack`, `cupy.from_dlpack`, `jax.dlpack`).
#[pyclass(frozen, module = "gantry._gantry")]
#[derive(Debug)]
pub struct Tensor {
    name: String,
    dtype: Dtype,
    shape: Vec<u64>,
    nbytes: usize,
    data: u64,
    device: (i32, i32),
    memory: Arc<Memory>,
    /// Export as one-dimensional bytes (`uint8`) instead of its dtype.
    raw: bool,
}

impl Tensor {
    /// A tensor of `shape` (`nbytes` at `data`) inside `memory`, on `device` (DLPack's numbers).
    pub(crate) fn new(
        name: String,
        dtype: Dtype,
        shape: Vec<u64>,
        (data, nbytes): (u64, usize),
        device: (i32, i32),
        memory: Arc<Memory>,
    ) -> Self {
        Tensor { name, dtype, shape, nbytes, data, device, memory, raw: false }
    }
}

#[pymethods]
impl Tensor {
    /// The tensor's name in the checkpoint.
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// Its safetensors dtype (`"BF16"`, `"F8_E4M3"`, ...); `"U8"` for a raw view.
    #[getter]
    fn dtype(&self) -> String {
        if self.raw {
            "U8".to_owned()
        } else {
            self.dtype.to_string()
        }
    }

    /// Its shape; `(nbytes,)` for a raw view.
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        if self.raw {
            PyTuple::new(py, [self.nbytes as u64])
        } else {
            PyTuple::new(py, &self.shape)
        }
    }

    /// Bytes.
    #[getter]
    fn nbytes(&self) -> usize {
        self.nbytes
    }

    /// `"cpu"` or `"cuda:N"`.
    #[getter]
    fn device(&self) -> String {
        match self.device {
            (DEVICE_CUDA, n) => format!("cuda:{n}"),
            _ => "cpu".to_owned(),
        }
    }

    /// Address of the first byte (host, or device in the GPU's primary context).
    fn data_ptr(&self) -> u64 {
        self.data
    }

    /// The same bytes as a one-dimensional `uint8` tensor: for dtypes a consumer cannot take
    /// through DLPack, to be reinterpreted on its side (`.view(dtype)`).
    fn raw(&self) -> Tensor {
        Tensor {
            name: self.name.clone(),
            dtype: self.dtype,
            shape: self.shape.clone(),
            nbytes: self.nbytes,
            data: self.data,
            device: self.device,
            memory: Arc::clone(&self.memory),
            raw: true,
        }
    }

    /// A copy of the bytes in host memory.
    fn tobytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        crate::guarded(|| {
            let bytes = match &*self.memory {
                Memory::Host { .. } => {
                    // SAFETY: `data..data + nbytes` lies inside the host buffer `memory` keeps
                    // alive, and the tensor has landed (it is only handed out after that).
                    unsafe { std::slice::from_raw_parts(self.data as *const u8, self.nbytes) }
                        .to_vec()
                }
                Memory::Device(d) => {
                    let device = Arc::clone(d.device());
                    let (data, nbytes) = (self.data, self.nbytes);
                    py.detach(|| device.copy_to_host(data, nbytes)).map_err(to_py)?
                }
            };
            Ok(pyo3::types::PyBytes::new(py, &bytes))
        })
    }

    /// `(device type, device id)` as DLPack numbers them.
    fn __dlpack_device__(&self) -> (i32, i32) {
        self.device
    }

    /// A DLPack capsule of the tensor. The bytes are complete before the tensor is handed out,
    /// so there is nothing to order on the consumer's `stream`.
    #[pyo3(signature = (*, stream = None, max_version = None, dl_device = None, copy = None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<Bound<'_, PyAny>>,
        max_version: Option<Bound<'_, PyAny>>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        crate::guarded(|| {
            let _ = (stream, max_version);
            if copy == Some(true) {
                return Err(PyBufferError::new_err("gantry exports its tensors without copying"));
            }
            if dl_device.is_some_and(|d| d != self.device) {
                return Err(PyBufferError::new_err(format!(
                    "the tensor is on {}; gantry does not move it",
                    self.device()
                )));
            }
            let (dtype, shape) = if self.raw {
                ((1, 8), vec![self.nbytes as u64])
            } else {
                let dtype = dlpack::dl_dtype(self.dtype).ok_or_else(|| {
                    PyBufferError::new_err(format!(
                        "{}: DLPack has no whole-element type for {}; use .raw()",
                        self.name, self.dtype
                    ))
                })?;
                (dtype, self.shape.clone())
            };
            let export = Export { data: self.data, device: self.device, dtype, shape: &shape };
            dlpack::capsule(py, export, &self.memory)
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "gantry.Tensor(name={:?}, dtype={}, shape={:?}, device={})",
            self.name,
            self.dtype(),
            self.shape,
            self.device()
        )
    }
}

#[derive(Debug)]
enum Event {
    Ready(usize),
    /// What a cooperative load did on this rank (sent before `Done`).
    Coop(gantry::coop::CoopReport),
    Done(gantry::Result<LoadReport>),
}

/// A cooperative load's rank, world size, and the NCCL unique id in hex, or why the ranks
/// read on their own.
pub type CoopArgs = (usize, usize, Result<String, String>);

/// The `coop` argument checked: `0 <= rank < world <= DESTINATIONS_MAX` (every rank is a
/// destination of the load's placement, so `world` sizes what is allocated).
fn coop_args(
    (rank, world, id, reason): (usize, usize, Option<String>, Option<String>),
) -> PyResult<CoopArgs> {
    let max = gantry::placement::DESTINATIONS_MAX;
    if world == 0 || world > max || rank >= world {
        return Err(crate::ConfigError::new_err(format!(
            "rank {rank} of world {world}: a cooperative load needs 0 <= rank < world <= {max}"
        )));
    }
    let link = id.ok_or_else(|| reason.unwrap_or_else(|| "no NCCL unique id".into()));
    Ok((rank, world, link))
}

#[derive(Debug)]
struct State {
    rx: Option<Receiver<Event>>,
    thread: Option<JoinHandle<()>>,
    /// One buffer per file with a wanted tensor; dropped when the load ends, after which only
    /// the tensors handed out hold them.
    memory: Vec<Option<Arc<Memory>>>,
}

/// A load running on its own thread; iterate it for `(name, Tensor)` as tensors land.
///
/// Locks: `state` is held by the iterating thread while it waits for the next tensor with the
/// GIL released, so nothing that holds the GIL may wait for it (only `try_lock` it);
/// `report` is held only for a moment and never while the GIL is released or acquired.
#[pyclass(module = "gantry._gantry")]
#[derive(Debug)]
pub struct Stream {
    checkpoint: Arc<Checkpoint>,
    /// Tensors the load delivers.
    count: usize,
    device: (i32, i32),
    cancel: Arc<AtomicBool>,
    state: Mutex<State>,
    report: Mutex<Option<LoadReport>>,
    /// What a cooperative load did on this rank; held as briefly as `report`.
    coop: Mutex<Option<gantry::coop::CoopReport>>,
}

#[pymethods]
impl Stream {
    /// Opens `source`, allocates its destinations on `device` and starts loading; `skip`
    /// names tensors not to load. `coop` (GPU loads) makes the load one rank of a cooperative
    /// load: `(rank, world, unique_id)` with the NCCL unique id in hex from
    /// `nccl_unique_id()`, or `(rank, world, None, reason)` to read alone for that reason.
    #[new]
    #[pyo3(signature = (source, device = "cuda:0", config = None, skip = None, coop = None))]
    fn new(
        py: Python<'_>,
        source: PathBuf,
        device: &str,
        config: Option<&Bound<'_, PyDict>>,
        skip: Option<Vec<String>>,
        coop: Option<(usize, usize, Option<String>, Option<String>)>,
    ) -> PyResult<Self> {
        crate::guarded(|| {
            let coop = coop.map(coop_args).transpose()?;
            let ordinal = parse_device(device)?;
            let cancel = Arc::new(AtomicBool::new(false));
            let (config, panic_after) = take_panic_hook(config)?;
            let config = parse_config(config.as_ref())?.cancel_flag(Arc::clone(&cancel));
            let skip: std::collections::HashSet<String> =
                skip.unwrap_or_default().into_iter().collect();
            py.detach(|| start(&source, ordinal, config, skip, cancel, panic_after, coop))
                .map_err(to_py)
        })
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<(String, Tensor)>> {
        crate::guarded(|| self.next_tensor(py))
    }

    /// Stops the load; the tensors already handed out stay valid.
    fn cancel(&self, py: Python<'_>) -> PyResult<()> {
        crate::guarded(|| {
            self.cancel.store(true, Ordering::Relaxed);
            if let Some(mut state) = self.state.try_lock() {
                finish(py, &mut state);
            }
            Ok(())
        })
    }

    /// Figures of the finished load: a dict of `tensor_bytes`, `read_bytes`, `seconds`,
    /// `gb_per_s`, `staging_bytes`, per file its reader and why (`files`) and its SHA-256 check
    /// (`sha256`, see [`sha256_report`]); `None` before the end.
    fn report<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        crate::guarded(|| self.report_dict(py))
    }

    /// Tensors the load will deliver.
    fn __len__(&self) -> usize {
        self.count
    }
}

impl Stream {
    fn next_tensor(&self, py: Python<'_>) -> PyResult<Option<(String, Tensor)>> {
        loop {
            let Some(mut state) = self.state.try_lock() else {
                return Err(PyRuntimeError::new_err(
                    "this stream is being iterated on another thread",
                ));
            };
            let Some(rx) = state.rx.take() else { return Ok(None) };
            let (rx, event) = py.detach(move || {
                let event = rx.recv_timeout(Duration::from_millis(50));
                (rx, event)
            });
            state.rx = Some(rx);
            match event {
                Ok(Event::Ready(i)) => {
                    let tensor = self.tensor(&state, i);
                    return Ok(Some((tensor.name.clone(), tensor)));
                }
                Ok(Event::Coop(report)) => *self.coop.lock() = Some(report),
                Ok(Event::Done(result)) => {
                    finish(py, &mut state);
                    return match result {
                        Ok(report) => {
                            *self.report.lock() = Some(report);
                            Ok(None)
                        }
                        Err(e) => Err(to_py(e)),
                    };
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(e) = py.check_signals() {
                        // Ctrl-C: stop the load, wait for its reads in flight, free its memory.
                        self.cancel.store(true, Ordering::Relaxed);
                        finish(py, &mut state);
                        return Err(e);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    finish(py, &mut state);
                    return Err(crate::GantryError::new_err("the load thread ended unexpectedly"));
                }
            }
        }
    }

    fn report_dict<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        // A copy, so that no lock is held while Python objects are made.
        let Some(r) = self.report.lock().clone() else { return Ok(None) };
        let d = PyDict::new(py);
        d.set_item("tensor_bytes", r.tensor_bytes)?;
        d.set_item("read_bytes", r.read_bytes)?;
        d.set_item("seconds", r.seconds)?;
        d.set_item("first_tensor_seconds", r.first_tensor_seconds)?;
        d.set_item("gb_per_s", r.gb_per_s())?;
        d.set_item("staging_bytes", r.staging_bytes)?;
        d.set_item("volume", r.volume.clone())?;
        d.set_item("version", r.version.clone())?;
        let files: Vec<(String, &str, String)> = r
            .files
            .iter()
            .map(|f| {
                (
                    f.path.display().to_string(),
                    f.reader.map_or("none", |k| k.name()),
                    f.reason.clone(),
                )
            })
            .collect();
        d.set_item("files", files)?;
        d.set_item("sha256", sha256_report(py, &r)?)?;
        if let Some(c) = self.coop.lock().clone() {
            d.set_item("cooperative", c.cooperative)?;
            d.set_item("cooperative_reason", c.reason.clone())?;
            d.set_item("rank", c.rank)?;
            d.set_item("world", c.world)?;
            d.set_item("owned_bytes", c.owned_bytes)?;
            d.set_item("received_bytes", c.received_bytes)?;
        }
        Ok(Some(d))
    }

    fn tensor(&self, state: &State, i: usize) -> Tensor {
        let t = &self.checkpoint.tensors[i];
        let file = &self.checkpoint.files[t.file.0];
        let memory = Arc::clone(state.memory[t.file.0].as_ref().expect("memory of a wanted file"));
        let data = memory.base() + offset_in_buffer(file, t.offset, self.device.0 == DEVICE_CPU);
        Tensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            nbytes: t.len as usize,
            data,
            device: self.device,
            memory,
            raw: false,
        }
    }
}

/// Per file of `report`, in the order of `files`, a dict: `path`; `verified` (its SHA-256 was
/// checked against a known digest and matched); `sha256` (64 hex digits, `None` when not
/// computed: `verify_sha256` off, or nothing of the file read); `checked_against` (where the
/// known digest came from, or `None`); `not_verified_because` (why no digest was known, or
/// `None`); `hashing` (how the digest was computed, or `None`).
fn sha256_report<'py>(py: Python<'py>, report: &LoadReport) -> PyResult<Vec<Bound<'py, PyDict>>> {
    report
        .files
        .iter()
        .map(|f| {
            let d = PyDict::new(py);
            let check = f.integrity.as_ref();
            d.set_item("path", f.path.display().to_string())?;
            d.set_item("verified", check.is_some_and(|c| c.verified()))?;
            let digest = check.and_then(|c| c.sha256.as_ref()).map(gantry::integrity::to_hex);
            d.set_item("sha256", digest)?;
            let known = check.and_then(|c| c.known.as_ref());
            d.set_item("checked_against", known.map(|k| k.source.clone()))?;
            let why = check.filter(|c| c.known.is_none()).map(|c| c.unknown_reason.clone());
            d.set_item("not_verified_because", why)?;
            d.set_item("hashing", check.and_then(|c| c.hashing.as_ref()).map(|h| h.to_string()))?;
            Ok(d)
        })
        .collect()
}

impl Drop for Stream {
    fn drop(&mut self) {
        // An abandoned stream stops its load; the thread frees the memory when it ends.
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// Waits for the load thread and lets go of the stream's hold on the memory.
fn finish(py: Python<'_>, state: &mut State) {
    state.rx = None;
    if let Some(thread) = state.thread.take() {
        py.detach(|| {
            let _ = thread.join();
        });
    }
    state.memory.clear();
}

/// Where a tensor at file `offset` starts in its file's buffer: host buffers are laid out as
/// [`file_buffer_layout`] says (so direct reads can land in them), device buffers hold the
/// data section from its first byte.
fn offset_in_buffer(file: &gantry::FileInfo, offset: u64, host: bool) -> u64 {
    let data_offset = file.header.data_offset;
    if host {
        let (lead, _) = file_buffer_layout(data_offset, file.header.data_len);
        offset - (data_offset - lead)
    } else {
        offset - data_offset
    }
}

/// The load thread's hold on the memory it writes. Dropped when the thread lets go, however
/// it ends (returns, or unwinds from a panic), it hands each host buffer to its `Memory`:
/// tensors already handed out point into them, so they must stay mapped.
struct Handover {
    memory: Vec<Option<Arc<Memory>>>,
    /// One per file (empty for a file with nothing wanted).
    buffers: Vec<HostBuffer>,
}

impl Drop for Handover {
    fn drop(&mut self) {
        for (m, buffer) in self.memory.iter().zip(self.buffers.drain(..)) {
            if let Some(m) = m {
                m.keep(buffer);
            }
        }
    }
}

fn start(
    source: &std::path::Path,
    ordinal: Option<u32>,
    config: Config,
    skip: std::collections::HashSet<String>,
    cancel: Arc<AtomicBool>,
    panic_after: Option<usize>,
    coop: Option<CoopArgs>,
) -> gantry::Result<Stream> {
    let checkpoint = Arc::new(gantry::open_with(source, &config)?);
    let wanted: Vec<bool> = checkpoint.tensors.iter().map(|t| !skip.contains(&t.name)).collect();
    let device = ordinal.map(open_device).transpose()?;
    let mut memory = Vec::with_capacity(checkpoint.files.len());
    // Host buffers stay with the load thread until it ends, then go to their `Memory`.
    let mut host_buffers = Vec::with_capacity(checkpoint.files.len());
    for (f, file) in checkpoint.files.iter().enumerate() {
        if !checkpoint.file_wanted(&wanted, f) {
            memory.push(None);
            host_buffers.push(HostBuffer::new(0)?);
            continue;
        }
        let m = match &device {
            Some(d) => {
                let what = file.path.display().to_string();
                Memory::device(d.alloc(file.header.data_len as usize, &what)?)
            }
            None => {
                let (_, len) = file_buffer_layout(file.header.data_offset, file.header.data_len);
                let mut buffer = HostBuffer::new(len as usize)?;
                let m = Memory::host(&mut buffer);
                host_buffers.push(buffer);
                m
            }
        };
        memory.push(Some(Arc::new(m)));
    }
    let count = wanted.iter().filter(|&&w| w).count();
    let loader = Loader::new(config)?;
    let (tx, rx) = mpsc::channel();
    let mut handover = Handover { memory: memory.clone(), buffers: host_buffers };
    let table = Arc::clone(&checkpoint);
    let on_device = device.clone();
    let thread = std::thread::Builder::new()
        .name("gantry-load".to_owned())
        .spawn(move || {
            let mut sent = 0;
            let mut notify = |index: usize| {
                assert!(panic_after != Some(sent), "{PANIC_AFTER_READY}: {sent} tensors out");
                sent += 1;
                let _ = tx.send(Event::Ready(index));
            };
            let result = match &on_device {
                Some(d) if coop.is_some() => {
                    let coop = coop.expect("checked");
                    let addresses: Vec<u64> = handover
                        .memory
                        .iter()
                        .map(|m| m.as_ref().map_or(0, |m| m.base()))
                        .collect();
                    let ready = |r: gantry::ReadyOnDevice<'_>| notify(r.index);
                    let done = cooperative(&loader, &table, d, coop, &wanted, &addresses, ready);
                    done.map(|(report, coop)| {
                        let _ = tx.send(Event::Coop(coop));
                        report
                    })
                }
                Some(d) => {
                    let target = |t: &gantry::TensorEntry| {
                        if skip.contains(&t.name) {
                            return None;
                        }
                        let m = handover.memory[t.file.0].as_ref()?;
                        Some(m.base() + offset_in_buffer(&table.files[t.file.0], t.offset, false))
                    };
                    loader.load_into_device(&table, d, target, |ready| notify(ready.index))
                }
                None => {
                    loader.load_into_file_buffers(&table, &wanted, &mut handover.buffers, |ready| {
                        notify(ready.index)
                    })
                }
            };
            drop(handover);
            let _ = tx.send(Event::Done(result));
        })
        .map_err(|source| gantry::Error::Resource { what: "starting the load thread", source })?;
    let device_id =
        (if device.is_some() { DEVICE_CUDA } else { DEVICE_CPU }, ordinal.map_or(0, |n| n as i32));
    let state = State { rx: Some(rx), thread: Some(thread), memory };
    Ok(Stream {
        checkpoint,
        count,
        device: device_id,
        cancel,
        state: Mutex::new(state),
        report: Mutex::new(None),
        coop: Mutex::new(None),
    })
}

/// One rank of a cooperative load into the file buffers at `addresses`: joins the NCCL
/// communicator of the unique id (on this thread), or reads alone for the reason given.
fn cooperative(
    loader: &Loader,
    checkpoint: &Checkpoint,
    device: &Arc<CudaDevice>,
    (rank, world, link): CoopArgs,
    wanted: &[bool],
    addresses: &[u64],
    ready: impl FnMut(gantry::ReadyOnDevice<'_>),
) -> gantry::Result<(LoadReport, gantry::coop::CoopReport)> {
    use gantry::coop::{Communicator, Cooperation, UniqueId};
    let comm = match &link {
        Ok(hex) => {
            let nccl = gantry::coop::load_nccl()
                .map_err(|reason| gantry::Error::Unavailable { what: "NCCL", reason })?;
            let id = UniqueId::from_hex(hex)?;
            let timeout = gantry::coop::comm::TIMEOUT;
            Some(Communicator::init(nccl, &id, rank, world, device, timeout)?)
        }
        Err(_) => None,
    };
    let coop = match (&comm, link) {
        (Some(c), _) => Cooperation::nccl(c),
        (None, Err(reason)) => Cooperation::alone(rank, world, reason),
        (None, Ok(_)) => {
            return Err(gantry::Error::Config("a unique id without a communicator".into()))
        }
    };
    loader.load_cooperative_into(checkpoint, device, coop, wanted, addresses, ready)
}

/// A new NCCL unique id, in hex (rank 0 of a cooperative load creates it and hands it to the
/// others); `UnavailableError` without NCCL.
#[pyfunction]
pub fn nccl_unique_id() -> PyResult<String> {
    crate::guarded(|| {
        let nccl = gantry::coop::load_nccl()
            .map_err(|reason| to_py(gantry::Error::Unavailable { what: "NCCL", reason }))?;
        gantry::coop::UniqueId::new(&nccl).map(|id| id.to_hex()).map_err(to_py)
    })
}
