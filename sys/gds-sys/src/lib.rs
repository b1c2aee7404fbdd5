//! cuFile's ABI (GPUDirect Storage), and nothing else: `#[repr(C)]` types checked against
//! `cufile.h`, a function table loaded at run time with `libloading` from `libcufile.so.0`
//! (then `libcufile.so`), the decoding of return values in one place, and a name table for
//! cuFile status codes. A missing library or symbol is an error, never a panic. The safe layer
//! that owns handles and decides when to use GDS lives in the `gantry` crate.
#![allow(non_camel_case_types)]

use std::ffi::{c_int, c_uint, c_void};
use std::fmt;

/// `CUfileError_t`: a cuFile status and, for `CU_FILE_CUDA_DRIVER_ERROR`, the `CUresult`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CUfileError_t {
    /// `CUfileOpError`: 0 or `5000 + n`.
    pub err: c_int,
    /// `CUresult` when `err` is `CU_FILE_CUDA_DRIVER_ERROR`.
    pub cu_err: c_int,
}

/// `CUfileDrvProps_t.nvfs`: what the nvidia-fs kernel driver reports.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct CUfileDrvPropsNvfs {
    /// nvidia-fs major version (0 when the module is not loaded).
    pub major_version: c_uint,
    /// nvidia-fs minor version.
    pub minor_version: c_uint,
    /// IO size under which polling is used.
    pub poll_thresh_size: usize,
    /// Largest direct IO.
    pub max_direct_io_size: usize,
    /// Bits `1 << CU_FILE_*_SUPPORTED`: file systems and devices GDS supports here.
    pub dstatusflags: c_uint,
    /// Bits `1 << CU_FILE_USE_POLL_MODE`, `1 << CU_FILE_ALLOW_COMPAT_MODE`.
    pub dcontrolflags: c_uint,
}

/// `CUfileDrvProps_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
#[allow(missing_docs)]
pub struct CUfileDrvProps_t {
    pub nvfs: CUfileDrvPropsNvfs,
    pub fflags: c_uint,
    pub max_device_cache_size: c_uint,
    pub per_buffer_cache_size: c_uint,
    pub max_device_pinned_mem_size: c_uint,
    pub max_batch_io_size: c_uint,
    pub max_batch_io_timeout_msecs: c_uint,
}

/// The handle union of `CUfileDescr_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union CUfileDescrHandle {
    /// A Linux file descriptor (`CU_FILE_HANDLE_TYPE_OPAQUE_FD`).
    pub fd: c_int,
    /// A Windows handle or user-space file system handle.
    pub handle: *mut c_void,
}

/// `CUfileDescr_t`: what `cuFileHandleRegister` registers.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CUfileDescr_t {
    /// `CU_FILE_HANDLE_TYPE_*`.
    pub type_: c_int,
    /// The descriptor.
    pub handle: CUfileDescrHandle,
    /// `const CUfileFSOps_t *`, NULL for kernel file systems.
    pub fs_ops: *const c_void,
}

impl fmt::Debug for CUfileDescrHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CUfileDescrHandle")
    }
}

impl fmt::Debug for CUfileDescr_t {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CUfileDescr_t").field("type_", &self.type_).finish_non_exhaustive()
    }
}

/// `CUfileHandle_t`.
pub type CUfileHandle_t = *mut c_void;
/// `CUfileBatchHandle_t`.
pub type CUfileBatchHandle_t = *mut c_void;

/// `CUfileIOParams_t.u.batch`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
#[allow(missing_docs)]
pub struct CUfileIOParamsBatch {
    pub dev_ptr_base: *mut c_void,
    pub file_offset: libc::off_t,
    pub dev_ptr_offset: libc::off_t,
    pub size: usize,
}

/// `CUfileIOParams_t`: one request of the batch API.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
#[allow(missing_docs)]
pub struct CUfileIOParams_t {
    /// `CUFILE_BATCH`.
    pub mode: c_int,
    pub batch: CUfileIOParamsBatch,
    pub fh: CUfileHandle_t,
    /// `CUFILE_READ` or `CUFILE_WRITE`.
    pub opcode: c_int,
    pub cookie: *mut c_void,
}

/// `CUfileIOEvents_t`: one completion of the batch API.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
#[allow(missing_docs)]
pub struct CUfileIOEvents_t {
    pub cookie: *mut c_void,
    /// `CUFILE_WAITING` ... `CUFILE_FAILED`.
    pub status: c_int,
    /// Bytes done, or a negative error.
    pub ret: usize,
}

// Layouts as `cufile.h` (CUDA 12/13) gives them on x86-64; a C program compiled against the
// header prints the same numbers (see `examples/layout.c`).
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<CUfileError_t>() == 8 && align_of::<CUfileError_t>() == 4);
    assert!(size_of::<CUfileDrvProps_t>() == 56 && align_of::<CUfileDrvProps_t>() == 8);
    assert!(offset_of!(CUfileDrvProps_t, fflags) == 32);
    assert!(offset_of!(CUfileDrvProps_t, max_batch_io_timeout_msecs) == 52);
    assert!(size_of::<CUfileDescr_t>() == 24 && offset_of!(CUfileDescr_t, fs_ops) == 16);
    assert!(size_of::<CUfileIOParams_t>() == 64);
    assert!(offset_of!(CUfileIOParams_t, fh) == 40 && offset_of!(CUfileIOParams_t, opcode) == 48);
    assert!(offset_of!(CUfileIOParams_t, cookie) == 56);
    assert!(size_of::<CUfileIOEvents_t>() == 24 && offset_of!(CUfileIOEvents_t, ret) == 16);
};

/// `CU_FILE_HANDLE_TYPE_OPAQUE_FD`.
pub const CU_FILE_HANDLE_TYPE_OPAQUE_FD: c_int = 1;
/// `CUFILE_BATCH`.
pub const CUFILE_BATCH: c_int = 1;
/// `CUFILE_READ`.
pub const CUFILE_READ: c_int = 0;
/// `CUFILE_COMPLETE`.
pub const CUFILE_COMPLETE: c_int = 0x10;
/// `CUFILE_FAILED`.
pub const CUFILE_FAILED: c_int = 0x40;
/// Bit of `dstatusflags`: GDS supports NVMe here.
pub const CU_FILE_NVME_SUPPORTED: u32 = 4;
/// Bit of `dstatusflags`: GDS supports NVMe through PCI P2PDMA (no nvidia-fs) here.
pub const CU_FILE_NVME_P2P_SUPPORTED: u32 = 11;
/// Bit of `dcontrolflags`: compatibility mode allowed (cuFile falls back to POSIX I/O and a
/// bounce buffer where GDS cannot be used).
pub const CU_FILE_ALLOW_COMPAT_MODE: u32 = 1;
/// First cuFile error code; `CUfileOpError` values are `CUFILEOP_BASE_ERR + n`.
pub const CUFILEOP_BASE_ERR: c_int = 5000;

/// A cuFile status code. Unknown values are kept as they are, never undefined behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CuFileCode(pub c_int);

impl CuFileCode {
    /// Success.
    pub const SUCCESS: CuFileCode = CuFileCode(0);

    /// The symbolic name (`"CU_FILE_DRIVER_NOT_INITIALIZED"`), or `None` for an unknown code.
    pub fn name(self) -> Option<&'static str> {
        CODES.iter().find(|(c, _, _)| *c == self.0).map(|(_, n, _)| *n)
    }

    /// cuFile's description of the code.
    pub fn description(self) -> &'static str {
        CODES.iter().find(|(c, _, _)| *c == self.0).map_or("unknown cufile error", |(_, _, d)| d)
    }
}

impl fmt::Display for CuFileCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({}): {}", self.0, self.description()),
            None => write!(f, "unknown cuFile code {}", self.0),
        }
    }
}

const B: c_int = CUFILEOP_BASE_ERR;
/// (code, name, description) from `cufile.h`'s `CUFILEOP_STATUS_ENTRIES`.
const CODES: &[(c_int, &str, &str)] = &[
    (0, "CU_FILE_SUCCESS", "cufile success"),
    (B + 1, "CU_FILE_DRIVER_NOT_INITIALIZED", "nvidia-fs driver is not loaded; set allow_compat_mode to true in cufile.json to enable compatibility mode"),
    (B + 2, "CU_FILE_DRIVER_INVALID_PROPS", "invalid property"),
    (B + 3, "CU_FILE_DRIVER_UNSUPPORTED_LIMIT", "property range error"),
    (B + 4, "CU_FILE_DRIVER_VERSION_MISMATCH", "nvidia-fs driver version mismatch"),
    (B + 5, "CU_FILE_DRIVER_VERSION_READ_ERROR", "nvidia-fs driver version read error"),
    (B + 6, "CU_FILE_DRIVER_CLOSING", "driver shutdown in progress"),
    (B + 7, "CU_FILE_PLATFORM_NOT_SUPPORTED", "GPUDirect Storage not supported on current platform"),
    (B + 8, "CU_FILE_IO_NOT_SUPPORTED", "GPUDirect Storage not supported on current file"),
    (B + 9, "CU_FILE_DEVICE_NOT_SUPPORTED", "GPUDirect Storage not supported on current GPU"),
    (B + 10, "CU_FILE_NVFS_DRIVER_ERROR", "nvidia-fs driver ioctl error"),
    (B + 11, "CU_FILE_CUDA_DRIVER_ERROR", "CUDA Driver API error"),
    (B + 12, "CU_FILE_CUDA_POINTER_INVALID", "invalid device pointer"),
    (B + 13, "CU_FILE_CUDA_MEMORY_TYPE_INVALID", "invalid pointer memory type"),
    (B + 14, "CU_FILE_CUDA_POINTER_RANGE_ERROR", "pointer range exceeds allocated address range"),
    (B + 15, "CU_FILE_CUDA_CONTEXT_MISMATCH", "cuda context mismatch"),
    (B + 16, "CU_FILE_INVALID_MAPPING_SIZE", "access beyond maximum pinned size"),
    (B + 17, "CU_FILE_INVALID_MAPPING_RANGE", "access beyond mapped size"),
    (B + 18, "CU_FILE_INVALID_FILE_TYPE", "unsupported file type"),
    (B + 19, "CU_FILE_INVALID_FILE_OPEN_FLAG", "unsupported file open flags"),
    (B + 20, "CU_FILE_DIO_NOT_SET", "fd direct IO not set"),
    (B + 22, "CU_FILE_INVALID_VALUE", "invalid arguments"),
    (B + 23, "CU_FILE_MEMORY_ALREADY_REGISTERED", "device pointer already registered"),
    (B + 24, "CU_FILE_MEMORY_NOT_REGISTERED", "device pointer lookup failure"),
    (B + 25, "CU_FILE_PERMISSION_DENIED", "driver or file access error"),
    (B + 26, "CU_FILE_DRIVER_ALREADY_OPEN", "driver is already open"),
    (B + 27, "CU_FILE_HANDLE_NOT_REGISTERED", "file descriptor is not registered"),
    (B + 28, "CU_FILE_HANDLE_ALREADY_REGISTERED", "file descriptor is already registered"),
    (B + 29, "CU_FILE_DEVICE_NOT_FOUND", "GPU device not found"),
    (B + 30, "CU_FILE_INTERNAL_ERROR", "internal error"),
    (B + 31, "CU_FILE_GETNEWFD_FAILED", "failed to obtain new file descriptor"),
    (B + 33, "CU_FILE_NVFS_SETUP_ERROR", "NVFS driver initialization error"),
    (B + 34, "CU_FILE_IO_DISABLED", "GPUDirect Storage disabled by config on current file"),
    (B + 35, "CU_FILE_BATCH_SUBMIT_FAILED", "failed to submit batch operation"),
    (B + 36, "CU_FILE_GPU_MEMORY_PINNING_FAILED", "failed to allocate pinned GPU Memory"),
    (B + 37, "CU_FILE_BATCH_FULL", "queue full for batch operation"),
    (B + 38, "CU_FILE_ASYNC_NOT_SUPPORTED", "cuFile stream operation not supported"),
    (B + 39, "CU_FILE_IO_MAX_ERROR", "GPUDirect Storage Max Error"),
];

/// What a `cuFileRead`/`cuFileWrite` return value means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoReturn {
    /// Bytes transferred.
    Bytes(usize),
    /// `-1`: a system error; `errno` holds it.
    Errno(i32),
    /// Another negative value: a cuFile status, negated.
    CuFile(CuFileCode),
}

/// Decodes an IO return value; `errno` is the thread's errno read right after the call.
pub fn decode_io(ret: isize, errno: i32) -> IoReturn {
    match ret {
        r if r >= 0 => IoReturn::Bytes(r as usize),
        -1 => IoReturn::Errno(errno),
        r => IoReturn::CuFile(CuFileCode(r.unsigned_abs().min(c_int::MAX as usize) as c_int)),
    }
}

/// Decodes a `CUfileError_t`: `Ok` for success, else the code (and the `CUresult`).
pub fn decode_status(status: CUfileError_t) -> Result<(), (CuFileCode, c_int)> {
    if status.err == 0 {
        Ok(())
    } else {
        Err((CuFileCode(status.err), status.cu_err))
    }
}

/// cuFile's entry points, resolved from one loaded library.
#[allow(missing_docs)]
pub struct CuFile {
    _lib: libloading::Library,
    pub driver_open: unsafe extern "C" fn() -> CUfileError_t,
    /// `cuFileDriverClose` is a macro for `cuFileDriverClose_v2` in the header.
    pub driver_close: unsafe extern "C" fn() -> CUfileError_t,
    pub driver_get_properties: unsafe extern "C" fn(*mut CUfileDrvProps_t) -> CUfileError_t,
    pub handle_register:
        unsafe extern "C" fn(*mut CUfileHandle_t, *mut CUfileDescr_t) -> CUfileError_t,
    pub handle_deregister: unsafe extern "C" fn(CUfileHandle_t),
    pub buf_register: unsafe extern "C" fn(*const c_void, usize, c_int) -> CUfileError_t,
    pub buf_deregister: unsafe extern "C" fn(*const c_void) -> CUfileError_t,
    pub read:
        unsafe extern "C" fn(CUfileHandle_t, *mut c_void, usize, libc::off_t, libc::off_t) -> isize,
    pub batch_io_set_up: unsafe extern "C" fn(*mut CUfileBatchHandle_t, c_uint) -> CUfileError_t,
    pub batch_io_submit: unsafe extern "C" fn(
        CUfileBatchHandle_t,
        c_uint,
        *mut CUfileIOParams_t,
        c_uint,
    ) -> CUfileError_t,
    pub batch_io_get_status: unsafe extern "C" fn(
        CUfileBatchHandle_t,
        c_uint,
        *mut c_uint,
        *mut CUfileIOEvents_t,
        *mut libc::timespec,
    ) -> CUfileError_t,
    pub batch_io_destroy: unsafe extern "C" fn(CUfileBatchHandle_t),
}

impl fmt::Debug for CuFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CuFile")
    }
}

/// Library names tried, in order.
pub const LIBRARY_NAMES: &[&str] = &["libcufile.so.0", "libcufile.so"];

impl CuFile {
    /// Loads libcufile from the first of [`LIBRARY_NAMES`] that loads and resolves every entry
    /// point; `Err` says what was tried and why each failed.
    pub fn load() -> Result<Self, String> {
        Self::load_from(LIBRARY_NAMES)
    }

    /// As [`CuFile::load`], from the given names.
    pub fn load_from(names: &[&str]) -> Result<Self, String> {
        let mut tried = Vec::new();
        for name in names {
            // SAFETY: loading libcufile runs its initialisers, which have no preconditions.
            match unsafe { libloading::Library::new(*name) } {
                Ok(lib) => match Self::resolve(lib) {
                    Ok(table) => return Ok(table),
                    Err(e) => tried.push(format!("{name}: {e}")),
                },
                Err(e) => tried.push(format!("{name}: {e}")),
            }
        }
        Err(format!("libcufile could not be loaded ({})", tried.join("; ")))
    }

    fn resolve(lib: libloading::Library) -> Result<Self, libloading::Error> {
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the symbol is declared in cufile.h with exactly this signature.
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }?
            };
        }
        Ok(Self {
            driver_open: sym!("cuFileDriverOpen"),
            driver_close: sym!("cuFileDriverClose_v2"),
            driver_get_properties: sym!("cuFileDriverGetProperties"),
            handle_register: sym!("cuFileHandleRegister"),
            handle_deregister: sym!("cuFileHandleDeregister"),
            buf_register: sym!("cuFileBufRegister"),
            buf_deregister: sym!("cuFileBufDeregister"),
            read: sym!("cuFileRead"),
            batch_io_set_up: sym!("cuFileBatchIOSetUp"),
            batch_io_submit: sym!("cuFileBatchIOSubmit"),
            batch_io_get_status: sym!("cuFileBatchIOGetStatus"),
            batch_io_destroy: sym!("cuFileBatchIODestroy"),
            _lib: lib,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_names_and_unknown_codes_are_safe() {
        assert_eq!(CuFileCode(5001).name(), Some("CU_FILE_DRIVER_NOT_INITIALIZED"));
        assert_eq!(CuFileCode::SUCCESS.name(), Some("CU_FILE_SUCCESS"));
        assert_eq!(CuFileCode(5021).name(), None); // a gap in the table
        assert_eq!(CuFileCode(-7).name(), None);
        assert_eq!(CuFileCode(123_456).to_string(), "unknown cuFile code 123456");
        assert!(CuFileCode(5008).to_string().contains("not supported on current file"));
    }

    #[test]
    fn io_returns_decode_in_one_place() {
        assert_eq!(decode_io(4096, 0), IoReturn::Bytes(4096));
        assert_eq!(decode_io(0, 0), IoReturn::Bytes(0));
        assert_eq!(decode_io(-1, libc::EIO), IoReturn::Errno(libc::EIO));
        assert_eq!(decode_io(-5008, 0), IoReturn::CuFile(CuFileCode(5008)));
        assert_eq!(decode_io(isize::MIN, 0), IoReturn::CuFile(CuFileCode(c_int::MAX)));
        assert_eq!(decode_status(CUfileError_t { err: 0, cu_err: 0 }), Ok(()));
        assert_eq!(
            decode_status(CUfileError_t { err: 5011, cu_err: 2 }),
            Err((CuFileCode(5011), 2))
        );
    }

    #[test]
    fn a_missing_library_is_an_error_not_a_panic() {
        let err = CuFile::load_from(&["libcufile-that-does-not-exist.so"]).expect_err("missing");
        assert!(err.contains("libcufile-that-does-not-exist.so"), "{err}");
        // On machines without CUDA (CI), the real names fail the same way.
        if let Err(e) = CuFile::load() {
            assert!(e.contains("libcufile.so.0"), "{e}");
        }
    }
}
