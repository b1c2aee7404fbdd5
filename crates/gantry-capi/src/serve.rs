//! Serving a live source from C (`gantry_serve_*`): a checkpoint published on a Unix socket,
//! which readers load as `unix:///path` through the ordinary load calls. The server keeps
//! each version in sealed shared memory; publishing again makes a new version, and a reader
//! holding an older one keeps it whole until it lets go.

use std::ffi::{c_char, c_void};

use engine::live::{Server, ServerOptions};

use crate::error::{self, gantry_status, CallError};
use crate::{ffi_boundary, gantry_loader};

/// Bytes a version id takes at most, its NUL included: a buffer this size always holds it.
pub const GANTRY_SERVE_VERSION_MAX: usize = 64;

/// How `gantry_serve_start` binds, reads and keeps what it serves. Zero it (host memory,
/// the defaults), then set `socket`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct gantry_serve_options {
    /// NUL-terminated path of the socket to bind (required). A symbolic link or anything but
    /// a socket there is refused; a socket another server answers on is refused
    /// (`GANTRY_E_LIVE`); a stale one is replaced.
    pub socket: *const c_char,
    /// The socket file's mode (0: 0600, this user alone; at most 0777).
    pub socket_mode: u32,
    /// Most connections (leases) one user may hold at once, so that one user the mode lets in
    /// cannot take every connection (more are refused, and the reader's error says so): 1 to
    /// 1024, 0 for the default (256).
    pub max_connections_per_user: u32,
    /// A loader whose settings read the sources published (object options, paths); NULL:
    /// the defaults. Only its settings are used; it may be freed after the call.
    pub loader: *const gantry_loader,
    /// Where each publication is kept besides host memory, NUL-terminated, as `gantry serve
    /// --device` takes it: NULL, `""` or `"cpu"`, host memory alone; `"cuda:N"` (`"cuda"` is
    /// `"cuda:0"`), also on GPU N, whose copy readers on this host load from (or alias) over
    /// CUDA IPC. Anything else is `GANTRY_E_INVALID_ARGUMENT`; a GPU that cannot be used is
    /// `GANTRY_E_UNAVAILABLE` (no CUDA driver) or `GANTRY_E_CUDA`.
    pub device: *const c_char,
}

/// The GPU `device` names (`gantry_serve_options::device`), `None` for host memory.
fn serve_device(device: Option<&str>) -> Result<Option<u32>, CallError> {
    match device {
        None | Some("" | "cpu") => Ok(None),
        Some("cuda") => Ok(Some(0)),
        Some(text) => {
            let digits =
                text.strip_prefix("cuda:").filter(|n| n.bytes().all(|b| b.is_ascii_digit()));
            digits.and_then(|n| n.parse().ok()).map(Some).ok_or_else(|| {
                CallError::invalid(format!(
                    "options->device '{}' is not a device: NULL, \"\", \"cpu\" or \"cuda:N\"",
                    text.escape_debug()
                ))
            })
        }
    }
}

/// An opaque live server. Its calls may come from any thread.
#[derive(Debug)]
pub struct gantry_server {
    server: Server,
    config: engine::Config,
}

/// Binds `options->socket`, publishes `source` (any source a load takes: a checkpoint path,
/// an object URL, another `unix://` source) as the first version, and starts serving; readers
/// load it as `"unix://" + options->socket`. With `options->device` naming a GPU, each version
/// is kept on it too. Free with `gantry_serve_close`.
///
/// # Safety
/// `source` is a NUL-terminated string; `options` is NULL or valid, its `socket` a
/// NUL-terminated string, its `device` NULL or one, and its `loader` NULL or live;
/// `server_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn gantry_serve_start(
    source: *const c_char,
    options: *const gantry_serve_options,
    server_out: *mut *mut gantry_server,
) -> gantry_status {
    ffi_boundary(|| {
        // SAFETY: per the contract.
        let source = unsafe { error::in_str(source, "source")? };
        // SAFETY: per the contract.
        let options = unsafe { error::in_ref(options, "options")? };
        // SAFETY: per the contract.
        let socket = unsafe { error::in_str(options.socket, "options->socket")? };
        let out = error::out_ptr(server_out, "server_out")?;
        let device = match options.device.is_null() {
            true => None,
            // SAFETY: non-NULL, a NUL-terminated string per the contract.
            false => Some(unsafe { error::in_str(options.device, "options->device")? }),
        };
        let device = serve_device(device)?;
        if options.socket_mode > 0o777 {
            return Err(CallError::invalid(format!(
                "options: socket_mode {:#o} is not a mode (at most 0777)",
                options.socket_mode
            )));
        }
        let defaults = ServerOptions::default();
        let per_user = match options.max_connections_per_user {
            0 => defaults.max_connections_per_user,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        // SAFETY: NULL or a live loader, per the contract.
        let config = match unsafe { options.loader.as_ref() } {
            Some(l) => l.loader.config().clone(),
            None => engine::Config::default(),
        };
        let mode = if options.socket_mode == 0 { 0o600 } else { options.socket_mode };
        let options =
            ServerOptions { mode, device, max_connections_per_user: per_user, ..defaults };
        let server = Server::start(socket, &options)?;
        // On failure the server is dropped here: it stops and removes its socket file.
        server.publish(source, &config)?;
        // SAFETY: checked non-NULL.
        unsafe { out.write(Box::into_raw(Box::new(gantry_server { server, config }))) };
        Ok(())
    })
}

/// Publishes `source` as a new version. New readers get it; a reader holding an older one
/// keeps it. On failure the current version stays.
///
/// # Safety
/// `server` is a live server; `source` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn gantry_serve_publish(
    server: *const gantry_server,
    source: *const c_char,
) -> gantry_status {
    ffi_boundary(|| {
        // SAFETY: per the contract.
        let server = unsafe { error::in_ref(server, "server")? };
        // SAFETY: per the contract.
        let source = unsafe { error::in_str(source, "source")? };
        server.server.publish(source, &server.config)?;
        Ok(())
    })
}

/// Copies the current version's id, NUL-terminated, into `buf` (`len` bytes; at most
/// `GANTRY_SERVE_VERSION_MAX` are ever needed). A buffer too small is
/// `GANTRY_E_INVALID_ARGUMENT` and `buf` is left untouched.
///
/// # Safety
/// `server` is a live server; `buf` points to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn gantry_serve_version(
    server: *const gantry_server,
    buf: *mut c_char,
    len: usize,
) -> gantry_status {
    ffi_boundary(|| {
        // SAFETY: per the contract.
        let server = unsafe { error::in_ref(server, "server")? };
        let buf = error::out_ptr(buf, "buf")?;
        let version = server.server.version().ok_or_else(|| {
            CallError::not_found(format!("{}: nothing published", server.server.url()))
        })?;
        if version.len() >= len {
            return Err(CallError::invalid(format!(
                "buf is {len} bytes; version {version} needs {}",
                version.len() + 1
            )));
        }
        // SAFETY: `buf` has `len` > version.len() writable bytes, per the contract.
        unsafe {
            std::ptr::copy_nonoverlapping(version.as_ptr().cast(), buf, version.len());
            buf.add(version.len()).write(0);
        }
        Ok(())
    })
}

/// Stops serving and frees the server (NULL is ignored): the socket file is removed; readers
/// holding a lease keep their bytes until they let go.
///
/// # Safety
/// `server` is NULL or came from `gantry_serve_start` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn gantry_serve_close(server: *mut gantry_server) {
    let _ = ffi_boundary(|| {
        if !server.is_null() {
            // SAFETY: per the contract, a live server from gantry_serve_start, freed once.
            let server = unsafe { Box::from_raw(server) };
            server.server.close();
        }
        Ok(())
    });
}

/// One tensor to publish from memory (`gantry_serve_publish_tensors`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct gantry_tensor_in {
    /// NUL-terminated name, unique in the publication.
    pub name: *const c_char,
    /// NUL-terminated safetensors dtype (`"BF16"`, `"F32"`, ...).
    pub dtype: *const c_char,
    /// `ndim` dimensions (NULL when `ndim` is 0: a scalar).
    pub shape: *const u64,
    /// Dimensions.
    pub ndim: usize,
    /// The tensor's bytes in host memory, `len` of them (NULL when `len` is 0).
    pub data: *const c_void,
    /// Bytes at `data`: the dtype's size times the product of the shape.
    pub len: u64,
}

/// Publishes `count` tensors from host memory as a new version (one `model.safetensors` laid
/// out in the order given; the bytes are copied into the server's shared memory before this
/// returns, so the caller may change or free them afterwards). Each tensor's length must match
/// its dtype and shape, and names must be unique (`GANTRY_E_INVALID_ARGUMENT` naming the
/// tensor); on failure the current version stays. This is how a trainer publishes weights it
/// holds: readers load `unix:///path` as from any source.
///
/// # Safety
/// `server` is a live server; `tensors` points to `count` valid `gantry_tensor_in`, each with
/// NUL-terminated `name` and `dtype`, `ndim` readable `shape` entries and `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn gantry_serve_publish_tensors(
    server: *const gantry_server,
    tensors: *const gantry_tensor_in,
    count: usize,
) -> gantry_status {
    ffi_boundary(|| {
        // SAFETY: per the contract.
        let server = unsafe { error::in_ref(server, "server")? };
        if tensors.is_null() && count > 0 {
            return Err(CallError::null("tensors"));
        }
        let list: &[gantry_tensor_in] = match count {
            0 => &[],
            // SAFETY: non-NULL, `count` valid entries per the contract.
            n => unsafe { std::slice::from_raw_parts(tensors, n) },
        };
        let mut views = Vec::with_capacity(list.len());
        for (i, t) in list.iter().enumerate() {
            // SAFETY: per the contract.
            let name = unsafe { error::in_str(t.name, &format!("tensors[{i}].name"))? };
            // SAFETY: per the contract.
            let dtype = unsafe { error::in_str(t.dtype, &format!("tensors[{i}].dtype"))? };
            let dtype = engine::dtype_named(dtype).ok_or_else(|| {
                CallError::invalid(format!("tensor '{name}': {dtype:?} is not a safetensors dtype"))
            })?;
            let shape: &[u64] = match t.ndim {
                0 => &[],
                _ if t.shape.is_null() => {
                    return Err(CallError::null(&format!("tensors[{i}].shape")));
                }
                // SAFETY: non-NULL, `ndim` readable entries per the contract.
                n => unsafe { std::slice::from_raw_parts(t.shape, n) },
            };
            let len = usize::try_from(t.len).map_err(|_| {
                CallError::invalid(format!("tensor '{name}': {} bytes do not fit memory", t.len))
            })?;
            // SAFETY: `len` readable bytes at `data`, per the contract.
            let bytes =
                unsafe { error::in_bytes(t.data.cast(), len, &format!("tensors[{i}].data"))? };
            views.push((name, dtype, shape, bytes));
        }
        server.server.publish_tensors(views)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::serve_device;

    /// Device names as `gantry serve --device` takes them; anything else is refused, naming it.
    #[test]
    fn devices_are_named_as_the_cli_names_them() {
        for (text, want) in
            [(None, None), (Some(""), None), (Some("cpu"), None), (Some("cuda"), Some(0))]
        {
            assert_eq!(serve_device(text).unwrap(), want, "{text:?}");
        }
        assert_eq!(serve_device(Some("cuda:7")).unwrap(), Some(7));
        let bad_ones = [
            "gpu",
            "cuda:",
            "cuda:x",
            "cuda:-1",
            "cuda:+1",
            "cuda:4294967296",
            " cuda:0",
            "CUDA:0",
        ];
        for bad in bad_ones {
            let e = serve_device(Some(bad)).unwrap_err();
            assert!(format!("{e:?}").contains(&format!("'{bad}' is not a device")), "{e:?}");
        }
    }
    /// The numbers `gantry_serve_options::max_connections_per_user` documents (cbindgen copies
    /// doc text, not constants) are the engine's.
    #[test]
    fn the_documented_connection_caps_are_the_engines() {
        assert_eq!(engine::live::server::CONNECTIONS_MAX, 1024);
        assert_eq!(engine::live::server::CONNECTIONS_PER_USER_DEFAULT, 256);
    }
}
