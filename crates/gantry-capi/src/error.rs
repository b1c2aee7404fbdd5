//! Status codes, the thread-local last error, and the one `catch_unwind` boundary every
//! exported body runs in.

use std::cell::RefCell;
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What a call did. Stable and append-only: values are never renumbered. Grouped by hundreds:
/// 1xx arguments, 2xx format, 3xx I/O, 4xx CUDA, 5xx cuFile, 6xx unavailable, 9xx panic.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum gantry_status {
    /// Success.
    GANTRY_OK = 0,
    /// A required pointer argument was NULL.
    GANTRY_E_NULL_ARGUMENT = 100,
    /// An argument or setting is out of range (message says which).
    GANTRY_E_INVALID_ARGUMENT = 101,
    /// No tensor of that name, or index out of range.
    GANTRY_E_NOT_FOUND = 102,
    /// A caller-supplied destination does not fit its tensor.
    GANTRY_E_DESTINATION = 103,
    /// A tensor cannot be placed as asked (a split that does not divide its dimension, a
    /// destination out of range or given twice; the message names the tensor and its shape).
    GANTRY_E_PLACEMENT = 104,
    /// The checkpoint's headers or index are malformed.
    GANTRY_E_FORMAT = 200,
    /// A file could not be opened or read (errno in `gantry_last_error_errno`).
    GANTRY_E_IO = 300,
    /// A file ended before the bytes its header promises.
    GANTRY_E_TRUNCATED = 301,
    /// A file's SHA-256 is not the digest known for it (verify_sha256): it is corrupted; or
    /// the check could not be made as asked (a SHA256SUMS that is malformed or not a regular
    /// file, no digest known for a file under require_sha256): the message names the file.
    GANTRY_E_INTEGRITY = 302,
    /// A live source (`unix:///path`) failed: no server answers, the server broke the
    /// protocol or closed, a version is no longer held, a socket another server holds.
    GANTRY_E_LIVE = 303,
    /// A CUDA call failed (code in `gantry_last_error_cuda_code`).
    GANTRY_E_CUDA = 400,
    /// An NCCL call of a cooperative load failed, or the other ranks stopped answering (the
    /// communicator was aborted then).
    GANTRY_E_NCCL = 401,
    /// Another rank of a cooperative load failed (the message names it and its error).
    GANTRY_E_RANK = 402,
    /// A cuFile call failed.
    GANTRY_E_CUFILE = 500,
    /// Something the request needs is not available here (no CUDA driver, no O_DIRECT, ...).
    GANTRY_E_UNAVAILABLE = 600,
    /// The library could not set up its own resources (memory, threads, rings).
    GANTRY_E_RESOURCE = 601,
    /// A bug in gantry (a panic, or an invariant that did not hold); the message says where.
    GANTRY_E_PANIC = 900,
}

pub(crate) fn status_name(status: i32) -> &'static CStr {
    match status {
        0 => c"GANTRY_OK",
        100 => c"GANTRY_E_NULL_ARGUMENT",
        101 => c"GANTRY_E_INVALID_ARGUMENT",
        102 => c"GANTRY_E_NOT_FOUND",
        103 => c"GANTRY_E_DESTINATION",
        104 => c"GANTRY_E_PLACEMENT",
        200 => c"GANTRY_E_FORMAT",
        300 => c"GANTRY_E_IO",
        301 => c"GANTRY_E_TRUNCATED",
        302 => c"GANTRY_E_INTEGRITY",
        303 => c"GANTRY_E_LIVE",
        400 => c"GANTRY_E_CUDA",
        401 => c"GANTRY_E_NCCL",
        402 => c"GANTRY_E_RANK",
        500 => c"GANTRY_E_CUFILE",
        600 => c"GANTRY_E_UNAVAILABLE",
        601 => c"GANTRY_E_RESOURCE",
        900 => c"GANTRY_E_PANIC",
        _ => c"GANTRY_UNKNOWN_STATUS",
    }
}

/// A failed call: its status, message, and the codes behind it.
#[derive(Debug)]
pub(crate) struct CallError {
    status: gantry_status,
    message: String,
    errno: i32,
    cuda_code: i32,
    cufile_code: i32,
}

impl CallError {
    pub(crate) fn null(what: &str) -> Self {
        Self::new(gantry_status::GANTRY_E_NULL_ARGUMENT, format!("{what} is NULL"))
    }
    pub(crate) fn invalid(message: String) -> Self {
        Self::new(gantry_status::GANTRY_E_INVALID_ARGUMENT, message)
    }
    pub(crate) fn not_found(message: String) -> Self {
        Self::new(gantry_status::GANTRY_E_NOT_FOUND, message)
    }
    fn new(status: gantry_status, message: String) -> Self {
        Self { status, message, errno: 0, cuda_code: 0, cufile_code: 0 }
    }
}

impl From<engine::Error> for CallError {
    fn from(e: engine::Error) -> Self {
        use gantry_status::*;
        let status = match &e {
            engine::Error::Format(f) if matches!(f.kind(), engine::FormatErrorKind::Io { .. }) => {
                GANTRY_E_IO
            }
            engine::Error::Format(_) => GANTRY_E_FORMAT,
            engine::Error::Io { .. } => GANTRY_E_IO,
            engine::Error::Truncated { .. } => GANTRY_E_TRUNCATED,
            engine::Error::Integrity { .. } | engine::Error::Sha256 { .. } => GANTRY_E_INTEGRITY,
            engine::Error::Unavailable { .. } => GANTRY_E_UNAVAILABLE,
            engine::Error::Memlock { .. } | engine::Error::Resource { .. } => GANTRY_E_RESOURCE,
            engine::Error::Config(_) => GANTRY_E_INVALID_ARGUMENT,
            engine::Error::Destination { .. } => GANTRY_E_DESTINATION,
            engine::Error::Placement { .. } => GANTRY_E_PLACEMENT,
            engine::Error::Cuda { .. } => GANTRY_E_CUDA,
            engine::Error::CuFile { .. } => GANTRY_E_CUFILE,
            engine::Error::Nccl { .. } => GANTRY_E_NCCL,
            engine::Error::Rank { .. } | engine::Error::RanksDiffer { .. } => GANTRY_E_RANK,
            engine::Error::Internal(_) => GANTRY_E_PANIC,
            engine::Error::Live { .. } => GANTRY_E_LIVE,
            _ => GANTRY_E_RESOURCE,
        };
        let errno = e.raw_os_error().unwrap_or(0);
        let cuda_code = if let engine::Error::Cuda { code, .. } = &e { *code } else { 0 };
        let cufile_code = e.cufile_code().unwrap_or(0);
        Self { status, message: e.to_string(), errno, cuda_code, cufile_code }
    }
}

impl From<engine::FormatError> for CallError {
    fn from(e: engine::FormatError) -> Self {
        engine::Error::from(e).into()
    }
}

thread_local! {
    static LAST: RefCell<Option<CallError>> = const { RefCell::new(None) };
}

/// Runs an exported body: success clears the last error; a failure or a panic records it and
/// becomes a status. Nothing unwinds past this.
pub(crate) fn ffi_boundary(body: impl FnOnce() -> Result<(), CallError>) -> gantry_status {
    let outcome = catch_unwind(AssertUnwindSafe(body));
    let error = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            Some(CallError::new(gantry_status::GANTRY_E_PANIC, format!("gantry panicked: {what}")))
        }
    };
    let status = error.as_ref().map_or(gantry_status::GANTRY_OK, |e| e.status);
    // Never let a failure to record (thread teardown) unwind either.
    let _ = LAST.try_with(|last| *last.borrow_mut() = error);
    status
}

/// Checks an output pointer.
pub(crate) fn out_ptr<T>(ptr: *mut T, what: &str) -> Result<*mut T, CallError> {
    if ptr.is_null() {
        Err(CallError::null(what))
    } else {
        Ok(ptr)
    }
}

/// The body of a getter: borrows `handle` (named `what` in errors), checks `out` (named
/// `out_what`) and writes there what `get` returns, all inside [`ffi_boundary`]; `out` is
/// written only on success.
///
/// # Safety
/// `handle` is NULL or points to a live `H`; `out` is NULL or writable.
pub(crate) unsafe fn get_into<H, T>(
    (handle, what): (*const H, &str),
    (out, out_what): (*mut T, &str),
    get: impl FnOnce(&H) -> Result<T, CallError>,
) -> gantry_status {
    ffi_boundary(|| {
        // SAFETY: per the contract.
        let handle = unsafe { in_ref(handle, what)? };
        let out = out_ptr(out, out_what)?;
        let value = get(handle)?;
        // SAFETY: checked non-NULL; writable per the contract.
        unsafe { out.write(value) };
        Ok(())
    })
}

/// Borrows an input handle.
///
/// # Safety
/// `ptr` is NULL or points to a live `T`.
pub(crate) unsafe fn in_ref<'a, T>(ptr: *const T, what: &str) -> Result<&'a T, CallError> {
    // SAFETY: per the contract.
    unsafe { ptr.as_ref() }.ok_or_else(|| CallError::null(what))
}

/// Borrows an input string.
///
/// # Safety
/// `ptr` is NULL or a NUL-terminated string that outlives the call.
pub(crate) unsafe fn in_str<'a>(ptr: *const c_char, what: &str) -> Result<&'a str, CallError> {
    if ptr.is_null() {
        return Err(CallError::null(what));
    }
    // SAFETY: per the contract.
    unsafe { CStr::from_ptr(ptr) }
        .to_str()
        .map_err(|_| CallError::invalid(format!("{what} is not valid UTF-8")))
}

/// The `len` bytes at `ptr` (NULL allowed when `len` is 0).
///
/// # Safety
/// `ptr` points to `len` readable bytes that outlive `'a`, or `len` is 0.
pub(crate) unsafe fn in_bytes<'a>(
    ptr: *const c_char,
    len: usize,
    what: &str,
) -> Result<&'a [u8], CallError> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(CallError::null(what));
    }
    // SAFETY: non-NULL, `len` readable bytes per the contract.
    Ok(unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) })
}

/// Copies the last failure's message on this thread into `buf` (`len` bytes), NUL-terminated
/// and truncated like `snprintf`; returns the message's full length (0 when the last call
/// succeeded). `buf` may be NULL when `len` is 0, to ask for the length.
///
/// # Safety
/// `buf` points to `len` writable bytes (or `len` is 0).
#[no_mangle]
pub unsafe extern "C" fn gantry_last_error_message(buf: *mut c_char, len: usize) -> usize {
    catch_unwind(|| {
        LAST.with(|last| {
            let last = last.borrow();
            let message = last.as_ref().map_or("", |e| e.message.as_str()).as_bytes();
            if !buf.is_null() && len > 0 {
                let n = message.len().min(len - 1);
                // SAFETY: `buf` has `len` > n bytes, per the contract.
                unsafe {
                    std::ptr::copy_nonoverlapping(message.as_ptr().cast(), buf, n);
                    buf.add(n).write(0);
                }
            }
            message.len()
        })
    })
    .unwrap_or(0)
}

/// The errno behind the last failure on this thread (0 if none).
#[no_mangle]
pub extern "C" fn gantry_last_error_errno() -> i32 {
    LAST.try_with(|l| l.borrow().as_ref().map_or(0, |e| e.errno)).unwrap_or(0)
}

/// The `CUresult` behind the last failure on this thread (0 if none).
#[no_mangle]
pub extern "C" fn gantry_last_error_cuda_code() -> i32 {
    LAST.try_with(|l| l.borrow().as_ref().map_or(0, |e| e.cuda_code)).unwrap_or(0)
}

/// The cuFile status (`CU_FILE_*`, 5000 + n) behind the last failure on this thread (0 if
/// none).
#[no_mangle]
pub extern "C" fn gantry_last_error_cufile_code() -> i32 {
    LAST.try_with(|l| l.borrow().as_ref().map_or(0, |e| e.cufile_code)).unwrap_or(0)
}
