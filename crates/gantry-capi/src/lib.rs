//! The C ABI of gantry, for inference servers written in C and C++ (`include/gantry.h`).
//!
//! Conventions (rustls-ffi's): opaque handles (`gantry_loader`, `gantry_model`),
//! `gantry_<object>_<verb>` names, every fallible call returns a [`gantry_status`], outputs
//! are `*_out` pointers written only on success, every pointer is checked for NULL, and every
//! body runs inside one `catch_unwind` boundary: a panic becomes `GANTRY_E_PANIC` with a
//! message, never an unwind into C. The message of the last failure on the calling thread is
//! kept for `gantry_last_error_message`.
//!
//! Threads: a `gantry_loader` may be used from any thread, one load at a time (loads on one
//! loader are serialised); use one loader per concurrent load. A `gantry_model` is read-only
//! and may be shared between threads; free it once.
//!
//! CUDA: device loads use the device's primary context (the one the CUDA runtime uses), so
//! the device pointers gantry returns or fills are valid in the caller's `cudaMalloc` world.
//! Synchronisation point: when a load call returns `GANTRY_OK`, every copy has completed;
//! the memory may be used on any stream. The ready callback is called on the loading thread
//! as each tensor's copies complete, before the call returns.
#![allow(non_camel_case_types)]

mod coop;
mod error;
mod model;
mod placed;
mod serve;
mod sha256;

use std::ffi::{c_char, c_void};
use std::sync::Arc;

pub use coop::{gantry_coop_report, gantry_loader_load_cooperative};
use error::{ffi_boundary, CallError};
pub use error::{
    gantry_last_error_cuda_code, gantry_last_error_cufile_code, gantry_last_error_errno,
    gantry_last_error_message, gantry_status,
};
pub use model::{gantry_model, gantry_report, gantry_tensor};
pub use placed::{gantry_place_fn, gantry_placed, gantry_share, gantry_split};
pub use serve::{gantry_serve_options, gantry_server, GANTRY_SERVE_VERSION_MAX};
pub use sha256::gantry_file_sha256;

/// The ABI version: bumped when a signature or a struct layout changes incompatibly.
pub const GANTRY_ABI_VERSION: u32 = 2;

/// Device number meaning host memory.
pub const GANTRY_DEVICE_HOST: i32 = -1;

/// Which reader a load uses.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum gantry_path {
    /// Per file, from page-cache residency and what the file system supports.
    GANTRY_PATH_AUTO = 0,
    /// io_uring with O_DIRECT for every file; an error where unavailable.
    GANTRY_PATH_DIRECT = 1,
    /// Threads of buffered pread for every file.
    GANTRY_PATH_BUFFERED = 2,
}

/// Loader settings. Fill with `gantry_config_init`, then change what you need. A field that
/// says "0: auto" is decided when a load starts (`gantry_config_init` writes 0 there); any
/// other value is used as given.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct gantry_config {
    /// Reads in flight per volume (1 to 4096; 0: auto, the volume's measured pick or 8).
    /// Giving it or `chunk_bytes` turns the measuring of the volume off.
    pub queue_depth: u32,
    /// Threads of the buffered reader (1 to 256; 0: auto, three quarters of the cores, 2 to
    /// 16).
    pub threads: u32,
    /// Bytes per direct read and staging slot (multiple of 4096, up to 1 GiB; 0: auto, the
    /// volume's measured pick or 64 MiB).
    pub chunk_bytes: u64,
    /// Bytes per buffered read (multiple of 4096).
    pub buffered_chunk_bytes: u64,
    /// Staging ring size in bytes (at least one chunk; 0: auto, 512 MiB).
    pub staging_bytes: u64,
    /// Reader choice, a `gantry_path` value.
    pub path: i32,
    /// Reserved, set to 0.
    pub reserved: u32,
}

/// An opaque loader: settings and the staging ring, reused across loads.
#[derive(Debug)]
pub struct gantry_loader {
    loader: engine::Loader,
}

/// Chooses each tensor's destination for `gantry_loader_load_into`: write its address (host
/// pointer for `GANTRY_DEVICE_HOST`, else a device pointer with at least `tensor->bytes`
/// bytes; any value, NULL included, for a tensor of 0 bytes) to `*dest_out` and return 1 to
/// load it, or return 0 to skip it. Each tensor loaded is reported ready exactly once.
pub type gantry_target_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        tensor: *const gantry_tensor,
        dest_out: *mut u64,
    ) -> i32,
>;

/// Called on the loading thread as each tensor's bytes have landed (`tensor->data` is its
/// destination).
pub type gantry_ready_fn =
    Option<unsafe extern "C" fn(user_data: *mut c_void, tensor: *const gantry_tensor)>;

/// The library's version, `"MAJOR.MINOR.PATCH"` (static string).
#[no_mangle]
pub extern "C" fn gantry_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The library's ABI version (`GANTRY_ABI_VERSION` of the header it was built with).
#[no_mangle]
pub extern "C" fn gantry_abi_version() -> u32 {
    GANTRY_ABI_VERSION
}

/// The `count` strings at `ptr`.
///
/// # Safety
/// `ptr` is NULL with `count` 0, or points to `count` NUL-terminated strings.
unsafe fn options<'a>(ptr: *const *const c_char, count: usize) -> Result<Vec<&'a str>, CallError> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if ptr.is_null() {
        return Err(CallError::null("object_options"));
    }
    // SAFETY: `count` pointers, per the contract.
    let ptrs = unsafe { std::slice::from_raw_parts(ptr, count) };
    // SAFETY: each NULL or a NUL-terminated string, per the contract.
    ptrs.iter().map(|&p| unsafe { error::in_str(p, "object option") }).collect()
}

/// Writes the default settings to `*config_out`.
///
/// # Safety
/// `config_out` is NULL or points to writable memory for one `gantry_config`.
#[no_mangle]
pub unsafe extern "C" fn gantry_config_init(config_out: *mut gantry_config) -> gantry_status {
    ffi_boundary(|| {
        let out = error::out_ptr(config_out, "config_out")?;
        let d = engine::Config::default();
        let config = gantry_config {
            queue_depth: 0,
            threads: 0,
            chunk_bytes: 0,
            buffered_chunk_bytes: d.read.buffered_chunk_bytes as u64,
            staging_bytes: 0,
            path: gantry_path::GANTRY_PATH_AUTO as i32,
            reserved: 0,
        };
        // SAFETY: checked non-NULL; the caller gives writable memory.
        unsafe { out.write(config) };
        Ok(())
    })
}

/// Creates a loader. `config` may be NULL for the defaults.
///
/// # Safety
/// `config` is NULL or a valid `gantry_config`; `loader_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn gantry_loader_new(
    config: *const gantry_config,
    loader_out: *mut *mut gantry_loader,
) -> gantry_status {
    // SAFETY: the same contract, with no options.
    unsafe { gantry_loader_new_with_options(config, std::ptr::null(), 0, loader_out) }
}

/// Creates a loader with options, each `"key=value"`: `verify_sha256=1` (hash every file read
/// while it streams and check it against the digest known for it: Hugging Face blob name,
/// `SHA256SUMS` beside it, object metadata `sha256`; a mismatch is `GANTRY_E_INTEGRITY`;
/// `gantry_model_file_sha256` says per file whether it was checked), `require_sha256=1` (the
/// same, and a file with no known digest is `GANTRY_E_INTEGRITY` naming it),
/// `cache_dir=DIR` (keep a local copy of every object read, written while it streams, and
/// read it on later loads while the object's ETag is unchanged; private to the caller),
/// `cache_shared=1` (the cache is shared with its directory's group: see the README's trust
/// model), `trace=FILE` (write each load's timeline to FILE as Chrome trace-event JSON, for
/// Perfetto), or
/// for object sources an `object_store` client key: `aws_*` for `s3://` (`aws_endpoint_url`,
/// `aws_region`, `aws_allow_http`, `aws_access_key_id`, ...), `google_*` for `gs://`
/// (`google_service_account_key`, `google_base_url`, ...), `azure_*` for `az://`, `abfs://`
/// and `https://ACCOUNT.blob.core.windows.net/` (`azure_storage_account_name`,
/// `azure_storage_account_key`, `azure_storage_endpoint`, ...), or an HTTP client key for
/// every store (`allow_http`, `timeout`), each applied over its provider's environment
/// variables. An unknown key is `GANTRY_E_INVALID_ARGUMENT`. `config` may be NULL for the
/// defaults.
///
/// # Safety
/// `config` is NULL or a valid `gantry_config`; `object_options` is NULL (with
/// `option_count` 0) or points to `option_count` NUL-terminated strings; `loader_out` is NULL
/// or writable.
#[no_mangle]
pub unsafe extern "C" fn gantry_loader_new_with_options(
    config: *const gantry_config,
    object_options: *const *const c_char,
    option_count: usize,
    loader_out: *mut *mut gantry_loader,
) -> gantry_status {
    ffi_boundary(|| {
        let out = error::out_ptr(loader_out, "loader_out")?;
        let mut c = engine::Config::default();
        // SAFETY: NULL or a valid config, per the contract.
        if let Some(cfg) = unsafe { config.as_ref() } {
            let path = match cfg.path {
                0 => engine::PathChoice::Auto,
                1 => engine::PathChoice::Direct,
                2 => engine::PathChoice::Buffered,
                other => {
                    return Err(CallError::invalid(format!(
                        "config.path {other} is not a gantry_path"
                    )))
                }
            };
            // 0 is "auto" (left `None`); every other value is taken as given.
            let given = |n: u64| (n != 0).then_some(n as usize);
            c.read.queue_depth = given(cfg.queue_depth.into());
            c.read.threads = given(cfg.threads.into());
            c.read.chunk_bytes = given(cfg.chunk_bytes);
            c.staging.bytes = given(cfg.staging_bytes);
            c.read.buffered_chunk_bytes = cfg.buffered_chunk_bytes as usize;
            c.read.path = path;
        }
        // SAFETY: NULL or `count` valid strings, per the contract (of the `_with_options` call;
        // plain `gantry_loader_new` passes none).
        for option in unsafe { options(object_options, option_count) }? {
            let (key, value) = option.split_once('=').ok_or_else(|| {
                CallError::invalid(format!("object option '{option}' is not key=value"))
            })?;
            c = match key {
                "verify_sha256" => c.verify_sha256(parse_flag(key, value)?),
                "require_sha256" => c.require_sha256(parse_flag(key, value)?),
                "cache_dir" if value.is_empty() => {
                    return Err(CallError::invalid(
                        "option cache_dir= is empty: name a directory (or leave it out)".into(),
                    ))
                }
                "cache_dir" => c.cache_dir(value),
                "cache_shared" => c.cache_shared(parse_flag(key, value)?),
                "trace" if value.is_empty() => {
                    return Err(CallError::invalid(
                        "option trace= is empty: name the file to write (or leave it out)".into(),
                    ))
                }
                "trace" => c.trace(value),
                _ => c.object_option(key, value),
            };
        }
        let loader = engine::Loader::new(c)?;
        // SAFETY: checked non-NULL.
        unsafe { out.write(Box::into_raw(Box::new(gantry_loader { loader }))) };
        Ok(())
    })
}

/// A boolean option's value: `1`/`true` or `0`/`false`.
fn parse_flag(key: &str, value: &str) -> Result<bool, CallError> {
    match value {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(CallError::invalid(format!("option {key}={value}: expected 1, 0, true or false"))),
    }
}

/// Frees a loader (NULL is ignored). Models it loaded stay valid.
///
/// # Safety
/// `loader` is NULL or came from `gantry_loader_new` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn gantry_loader_free(loader: *mut gantry_loader) {
    let _ = ffi_boundary(|| {
        if !loader.is_null() {
            // SAFETY: per the contract, a live loader from gantry_loader_new, freed once.
            drop(unsafe { Box::from_raw(loader) });
        }
        Ok(())
    });
}

/// Loads every tensor of `path` (a `.safetensors` file, a directory, an index, an object
/// source, `s3://`, `gs://` or `az://`, see `gantry_loader_new_with_options`, or a live source,
/// `unix:///path/to/socket`, see `gantry_serve_start`) into host memory
/// (`device == GANTRY_DEVICE_HOST`) or onto GPU `device`, into memory gantry owns.
/// Free the model with `gantry_model_free`.
///
/// # Safety
/// `loader` is a live loader; `path` a NUL-terminated string; `model_out` writable.
#[no_mangle]
pub unsafe extern "C" fn gantry_loader_load(
    loader: *const gantry_loader,
    path: *const c_char,
    device: i32,
    model_out: *mut *mut gantry_model,
) -> gantry_status {
    ffi_boundary(|| {
        // SAFETY: per the contract.
        let loader = &unsafe { error::in_ref(loader, "loader")? }.loader;
        // SAFETY: per the contract.
        let path = unsafe { error::in_str(path, "path")? };
        let out = error::out_ptr(model_out, "model_out")?;
        let model = match device {
            GANTRY_DEVICE_HOST => model::gantry_model::host(loader.load(path)?),
            n if n >= 0 => {
                let gpu = engine::CudaDevice::open(n as u32)?;
                model::gantry_model::device(loader.load_to_device(path, &gpu)?)
            }
            n => {
                return Err(CallError::invalid(format!(
                    "device {n} is neither GANTRY_DEVICE_HOST nor a GPU"
                )))
            }
        };
        // SAFETY: checked non-NULL.
        unsafe { out.write(Box::into_raw(Box::new(model))) };
        Ok(())
    })
}

/// Loads `path` into destinations the caller chooses: `target` is asked for each tensor (see
/// `gantry_target_fn`), `ready` (may be NULL) is told as each lands. For a GPU, destinations
/// are device pointers in the device's primary context; each is checked against its
/// allocation before anything is read. Figures go to `*report_out` (may be NULL).
///
/// # Safety
/// `loader` live; `path` NUL-terminated; `target` non-NULL; the callbacks follow their
/// contracts and do not unwind; destinations stay valid and unused until the call returns.
#[no_mangle]
pub unsafe extern "C" fn gantry_loader_load_into(
    loader: *const gantry_loader,
    path: *const c_char,
    device: i32,
    target: gantry_target_fn,
    ready: gantry_ready_fn,
    user_data: *mut c_void,
    report_out: *mut gantry_report,
) -> gantry_status {
    ffi_boundary(|| {
        // SAFETY: per the contract.
        let loader = &unsafe { error::in_ref(loader, "loader")? }.loader;
        // SAFETY: per the contract.
        let path = unsafe { error::in_str(path, "path")? };
        let target = target.ok_or_else(|| CallError::null("target"))?;
        let checkpoint = engine::open_with(path, loader.config())?;
        let infos = model::TensorInfos::new(&checkpoint);
        let mut dests = vec![0u64; checkpoint.tensors.len()];
        let mut wanted = vec![false; checkpoint.tensors.len()];
        for (i, _) in checkpoint.tensors.iter().enumerate() {
            let info = infos.tensor(i, 0);
            // SAFETY: the callback's contract; `info` and `dests[i]` are valid for the call.
            wanted[i] = unsafe { target(user_data, &info, &mut dests[i]) } != 0;
            if wanted[i] && dests[i] == 0 && checkpoint.tensors[i].len > 0 {
                return Err(CallError::invalid(format!(
                    "target gave a NULL destination for '{}'",
                    checkpoint.tensors[i].name
                )));
            }
        }
        let on_ready = |index: usize| {
            if let Some(ready) = ready {
                let info = infos.tensor(index, dests[index]);
                // SAFETY: the callback's contract; `info` is valid for the call.
                unsafe { ready(user_data, &info) };
            }
        };
        let report = if device == GANTRY_DEVICE_HOST {
            let mut slices: Vec<Option<&mut [u8]>> = Vec::with_capacity(dests.len());
            for (i, t) in checkpoint.tensors.iter().enumerate() {
                slices.push(wanted[i].then(|| {
                    // SAFETY: the caller promises `bytes` writable bytes at the destination,
                    // unused by anyone else until the call returns.
                    unsafe { destination(dests[i], t.len) }
                }));
            }
            let mut slices = slices.into_iter();
            loader.load_into(&checkpoint, |_| slices.next().flatten(), |r| on_ready(r.index))?
        } else if device >= 0 {
            let gpu: Arc<engine::CudaDevice> = engine::CudaDevice::open(device as u32)?;
            let mut i = 0;
            loader.load_into_device(
                &checkpoint,
                &gpu,
                |_| {
                    let d = wanted[i].then_some(dests[i]);
                    i += 1;
                    d
                },
                |r| on_ready(r.index),
            )?
        } else {
            return Err(CallError::invalid(format!(
                "device {device} is neither GANTRY_DEVICE_HOST nor a GPU"
            )));
        };
        // SAFETY: NULL or writable, per the contract.
        if let Some(out) = unsafe { report_out.as_mut() } {
            *out = gantry_report::from(&report);
        }
        Ok(())
    })
}

/// The caller's host destination of `len` bytes at address `dest`. An empty tensor gets an
/// empty slice whatever its address (NULL included: no slice may be built from NULL), and so
/// still counts as wanted and is reported ready once.
///
/// # Safety
/// For `len` > 0, `dest` is non-zero and points to `len` writable bytes that nobody else uses
/// during `'a`.
unsafe fn destination<'a>(dest: u64, len: u64) -> &'a mut [u8] {
    if len == 0 {
        return &mut [];
    }
    // SAFETY: per the contract.
    unsafe { std::slice::from_raw_parts_mut(dest as usize as *mut u8, len as usize) }
}

/// The name of a status code (`"GANTRY_E_IO"`), a static string.
#[no_mangle]
pub extern "C" fn gantry_status_name(status: i32) -> *const c_char {
    error::status_name(status).as_ptr()
}
