//! NCCL's ABI, and nothing else: the `#[repr(C)]` types of `nccl.h` that gantry passes, a
//! function table loaded at run time with `libloading` from `libnccl.so.2`, the decoding of
//! `ncclResult_t` in one place, and where to look for the library. A missing library or symbol
//! is an error, never a panic. The safe layer that owns communicators and decides when to use
//! them lives in the `gantry` crate.
//!
//! Where the library comes from: `GANTRY_NCCL_LIB` (a path or a name) when it is set, and
//! nothing else then, so that a deployment can pin one library or switch NCCL off by naming a
//! file that does not exist. Otherwise the dynamic loader's own search (`LD_LIBRARY_PATH`,
//! the system's directories), then the copy PyTorch's wheels ship in
//! `site-packages/nvidia/nccl/lib/` under the usual Python prefixes.
#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::path::{Path, PathBuf};

/// Bytes of a unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

/// `ncclUniqueId`: what rank 0 creates and every rank passes to `ncclCommInitRank`.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ncclUniqueId {
    /// Opaque bytes.
    pub internal: [c_char; NCCL_UNIQUE_ID_BYTES],
}

impl Default for ncclUniqueId {
    fn default() -> Self {
        Self { internal: [0; NCCL_UNIQUE_ID_BYTES] }
    }
}

impl fmt::Debug for ncclUniqueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ncclUniqueId")
    }
}

impl ncclUniqueId {
    /// The id as 256 lowercase hex digits (to pass it on a command line or through a store).
    pub fn to_hex(&self) -> String {
        self.internal.iter().map(|&b| format!("{:02x}", b as u8)).collect()
    }

    /// Parses [`ncclUniqueId::to_hex`]'s output; `Err` says what is wrong.
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.len() != 2 * NCCL_UNIQUE_ID_BYTES || !text.is_ascii() {
            return Err(format!(
                "an NCCL unique id is {} hex digits, got {} characters",
                2 * NCCL_UNIQUE_ID_BYTES,
                text.len()
            ));
        }
        let mut id = Self::default();
        for (i, slot) in id.internal.iter_mut().enumerate() {
            let byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
                .map_err(|_| format!("not a hex digit pair at position {}", 2 * i))?;
            *slot = byte as c_char;
        }
        Ok(id)
    }
}

/// `NCCL_CONFIG_UNDEF_INT` (`INT_MIN`): a config field left to NCCL's default.
pub const NCCL_CONFIG_UNDEF_INT: c_int = c_int::MIN;
/// `NCCL_API_MAGIC`: what `NCCL_CONFIG_INITIALIZER` puts in `magic`.
pub const NCCL_API_MAGIC: u32 = 0xcafe_beef;
/// `NCCL_VERSION(2, 30, 7)`: the `nccl.h` whose [`ncclConfig_t`] is declared here. NCCL reads
/// `min(size, its own size)` bytes of a config and defaults every field the declared version
/// predates, so one layout serves older and newer libraries alike (fields are only appended).
pub const NCCL_CONFIG_VERSION: u32 = 2 * 10000 + 30 * 100 + 7;

/// `ncclConfig_t` (`ncclConfig_v23000` of NCCL 2.30): how `ncclCommInitRankConfig` creates a
/// communicator. Build it with [`ncclConfig_t::default`] (`NCCL_CONFIG_INITIALIZER`: every
/// attribute undefined) and set only what is wanted.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_snake_case, missing_docs)]
pub struct ncclConfig_t {
    /// `sizeof(ncclConfig_t)`.
    pub size: usize,
    /// [`NCCL_API_MAGIC`].
    pub magic: u32,
    /// [`NCCL_CONFIG_VERSION`].
    pub version: u32,
    /// 0: calls return `ncclInProgress` and finish in the background (NCCL >= 2.14).
    pub blocking: c_int,
    pub cgaClusterSize: c_int,
    pub minCTAs: c_int,
    pub maxCTAs: c_int,
    pub netName: *const c_char,
    pub splitShare: c_int,
    pub trafficClass: c_int,
    pub commName: *const c_char,
    pub collnetEnable: c_int,
    pub CTAPolicy: c_int,
    pub shrinkShare: c_int,
    pub nvlsCTAs: c_int,
    pub nChannelsPerNetPeer: c_int,
    pub nvlinkCentricSched: c_int,
    pub graphUsageMode: c_int,
    pub numRmaCtx: c_int,
    pub maxP2pPeers: c_int,
    pub graphStreamOrdering: c_int,
}

impl Default for ncclConfig_t {
    /// `NCCL_CONFIG_INITIALIZER`.
    fn default() -> Self {
        const UNDEF: c_int = NCCL_CONFIG_UNDEF_INT;
        Self {
            size: std::mem::size_of::<Self>(),
            magic: NCCL_API_MAGIC,
            version: NCCL_CONFIG_VERSION,
            blocking: UNDEF,
            cgaClusterSize: UNDEF,
            minCTAs: UNDEF,
            maxCTAs: UNDEF,
            netName: std::ptr::null(),
            splitShare: UNDEF,
            trafficClass: UNDEF,
            commName: std::ptr::null(),
            collnetEnable: UNDEF,
            CTAPolicy: UNDEF,
            shrinkShare: UNDEF,
            nvlsCTAs: UNDEF,
            nChannelsPerNetPeer: UNDEF,
            nvlinkCentricSched: UNDEF,
            graphUsageMode: UNDEF,
            numRmaCtx: UNDEF,
            maxP2pPeers: UNDEF,
            graphStreamOrdering: UNDEF,
        }
    }
}

/// `ncclComm_t`: an opaque communicator handle.
pub type ncclComm_t = *mut c_void;
/// `cudaStream_t` (the same handle as the driver's `CUstream`).
pub type cudaStream_t = *mut c_void;
/// `ncclResult_t`.
pub type ncclResult_t = c_int;
/// `ncclDataType_t`.
pub type ncclDataType_t = c_int;
/// `ncclRedOp_t`.
pub type ncclRedOp_t = c_int;

/// `ncclSuccess`.
pub const NCCL_SUCCESS: ncclResult_t = 0;
/// `ncclInProgress`: a non-blocking operation has not finished.
pub const NCCL_IN_PROGRESS: ncclResult_t = 7;
/// `ncclUint8`.
pub const NCCL_UINT8: ncclDataType_t = 1;
/// `ncclInt32`.
pub const NCCL_INT32: ncclDataType_t = 2;
/// `ncclSum`.
pub const NCCL_SUM: ncclRedOp_t = 0;
/// `ncclMax`.
pub const NCCL_MAX: ncclRedOp_t = 2;

/// An `ncclResult_t` other than success. Unknown values are kept as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NcclCode(pub ncclResult_t);

impl NcclCode {
    /// The symbolic name (`"ncclRemoteError"`), or `None` for an unknown code.
    pub fn name(self) -> Option<&'static str> {
        CODES.get(usize::try_from(self.0).ok()?).copied()
    }
}

impl fmt::Display for NcclCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({})", self.0),
            None => write!(f, "unknown NCCL result {}", self.0),
        }
    }
}

/// Names of `ncclResult_t` values, by value, from `nccl.h`.
const CODES: &[&str] = &[
    "ncclSuccess",
    "ncclUnhandledCudaError",
    "ncclSystemError",
    "ncclInternalError",
    "ncclInvalidArgument",
    "ncclInvalidUsage",
    "ncclRemoteError",
    "ncclInProgress",
];

/// Decodes a result: `Ok` for success, else the code.
pub fn check(result: ncclResult_t) -> Result<(), NcclCode> {
    if result == NCCL_SUCCESS {
        Ok(())
    } else {
        Err(NcclCode(result))
    }
}

/// NCCL's entry points, resolved from one loaded library.
#[allow(missing_docs)]
pub struct Nccl {
    _lib: libloading::Library,
    /// Where the library was loaded from.
    pub loaded_from: String,
    pub get_version: unsafe extern "C" fn(*mut c_int) -> ncclResult_t,
    pub get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> ncclResult_t,
    pub comm_init_rank:
        unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> ncclResult_t,
    /// `ncclCommInitRankConfig` (NCCL >= 2.14; `None` before).
    pub comm_init_rank_config: Option<
        unsafe extern "C" fn(
            *mut ncclComm_t,
            c_int,
            ncclUniqueId,
            c_int,
            *mut ncclConfig_t,
        ) -> ncclResult_t,
    >,
    /// `ncclCommFinalize` (NCCL >= 2.14; `None` before).
    pub comm_finalize: Option<unsafe extern "C" fn(ncclComm_t) -> ncclResult_t>,
    pub comm_destroy: unsafe extern "C" fn(ncclComm_t) -> ncclResult_t,
    pub comm_abort: unsafe extern "C" fn(ncclComm_t) -> ncclResult_t,
    pub comm_get_async_error: unsafe extern "C" fn(ncclComm_t, *mut ncclResult_t) -> ncclResult_t,
    pub comm_count: unsafe extern "C" fn(ncclComm_t, *mut c_int) -> ncclResult_t,
    pub comm_user_rank: unsafe extern "C" fn(ncclComm_t, *mut c_int) -> ncclResult_t,
    pub get_error_string: unsafe extern "C" fn(ncclResult_t) -> *const c_char,
    pub broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        c_int,
        ncclComm_t,
        cudaStream_t,
    ) -> ncclResult_t,
    pub all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        ncclRedOp_t,
        ncclComm_t,
        cudaStream_t,
    ) -> ncclResult_t,
    pub group_start: unsafe extern "C" fn() -> ncclResult_t,
    pub group_end: unsafe extern "C" fn() -> ncclResult_t,
}

impl fmt::Debug for Nccl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nccl").field("loaded_from", &self.loaded_from).finish_non_exhaustive()
    }
}

/// The variable that names the library to load (a path or a file name) instead of the search.
pub const LIBRARY_VARIABLE: &str = "GANTRY_NCCL_LIB";

/// Names the dynamic loader is asked for, in order, before the Python prefixes are searched.
pub const LIBRARY_NAMES: &[&str] = &["libnccl.so.2", "libnccl.so"];

/// Where NCCL is looked for: `GANTRY_NCCL_LIB` alone when set; else [`LIBRARY_NAMES`], then
/// every `libnccl.so.2` under `<prefix>/lib/python3*/{site,dist}-packages/nvidia/nccl/lib/`
/// of the active virtual environment, conda environment, the user's and the system's prefixes.
pub fn candidates() -> Vec<String> {
    if let Some(path) = std::env::var_os(LIBRARY_VARIABLE) {
        return vec![path.to_string_lossy().into_owned()];
    }
    let mut out: Vec<String> = LIBRARY_NAMES.iter().map(|s| (*s).to_owned()).collect();
    let mut prefixes: Vec<PathBuf> = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(p) = std::env::var_os(var) {
            prefixes.push(PathBuf::from(p));
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        prefixes.push(Path::new(&home).join(".local"));
    }
    prefixes.extend(["/usr/local", "/usr", "/opt/conda"].map(PathBuf::from));
    for prefix in prefixes {
        out.extend(wheel_libraries(&prefix).into_iter().map(|p| p.display().to_string()));
    }
    out
}

/// `libnccl.so.2` of the NCCL wheel under one Python prefix, for every Python version there.
pub fn wheel_libraries(prefix: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(prefix.join("lib")) else { return found };
    let mut versions: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path())
        .collect();
    versions.sort();
    for dir in versions.iter().rev() {
        for packages in ["site-packages", "dist-packages"] {
            let lib = dir.join(packages).join("nvidia/nccl/lib/libnccl.so.2");
            if lib.is_file() {
                found.push(lib);
            }
        }
    }
    found
}

impl Nccl {
    /// Loads NCCL from the first of [`candidates`] that loads and resolves every entry point;
    /// `Err` says what was tried and why each failed.
    pub fn load() -> Result<Self, String> {
        Self::load_from(&candidates())
    }

    /// As [`Nccl::load`], from the given names or paths.
    pub fn load_from(names: &[String]) -> Result<Self, String> {
        let mut tried = Vec::new();
        for name in names {
            // SAFETY: loading libnccl runs its initialisers, which have no preconditions.
            match unsafe { libloading::Library::new(name) } {
                Ok(lib) => match Self::resolve(lib, name) {
                    Ok(table) => return Ok(table),
                    Err(e) => tried.push(format!("{name}: {e}")),
                },
                Err(e) => tried.push(format!("{name}: {e}")),
            }
        }
        Err(format!("libnccl could not be loaded ({})", tried.join("; ")))
    }

    fn resolve(lib: libloading::Library, name: &str) -> Result<Self, libloading::Error> {
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the symbol is declared in nccl.h with exactly this signature.
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }?
            };
        }
        // Entry points that older libraries lack: absent, not an error.
        macro_rules! optional {
            ($name:literal) => {
                // SAFETY: as `sym!`.
                unsafe { lib.get(concat!($name, "\0").as_bytes()) }.ok().map(|s| *s)
            };
        }
        Ok(Self {
            get_version: sym!("ncclGetVersion"),
            get_unique_id: sym!("ncclGetUniqueId"),
            comm_init_rank: sym!("ncclCommInitRank"),
            comm_init_rank_config: optional!("ncclCommInitRankConfig"),
            comm_finalize: optional!("ncclCommFinalize"),
            comm_destroy: sym!("ncclCommDestroy"),
            comm_abort: sym!("ncclCommAbort"),
            comm_get_async_error: sym!("ncclCommGetAsyncError"),
            comm_count: sym!("ncclCommCount"),
            comm_user_rank: sym!("ncclCommUserRank"),
            get_error_string: sym!("ncclGetErrorString"),
            broadcast: sym!("ncclBroadcast"),
            all_reduce: sym!("ncclAllReduce"),
            group_start: sym!("ncclGroupStart"),
            group_end: sym!("ncclGroupEnd"),
            loaded_from: name.to_owned(),
            _lib: lib,
        })
    }

    /// NCCL's description of `code`, with its name.
    pub fn describe(&self, code: NcclCode) -> String {
        // SAFETY: ncclGetErrorString takes any value and returns a static string or NULL.
        let text = unsafe { (self.get_error_string)(code.0) };
        if text.is_null() {
            return code.to_string();
        }
        // SAFETY: a NUL-terminated static string from NCCL.
        let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
        format!("{code}: {text}")
    }

    /// The library's version as `(major, minor, patch)`.
    pub fn version(&self) -> Result<(u32, u32, u32), NcclCode> {
        let mut v: c_int = 0;
        // SAFETY: out pointer valid for the call.
        check(unsafe { (self.get_version)(&mut v) })?;
        let v = v.max(0) as u32;
        // NCCL_VERSION(X,Y,Z) is X*10000+Y*100+Z from 2.9 on, X*1000+Y*100+Z before.
        Ok(if v >= 10000 {
            (v / 10000, v / 100 % 100, v % 100)
        } else {
            (v / 1000, v / 100 % 10, v % 100)
        })
    }
}

// Layouts as `nccl.h` gives them: the unique id is passed by value, so its size is the ABI.
const _: () = {
    assert!(std::mem::size_of::<ncclUniqueId>() == NCCL_UNIQUE_ID_BYTES);
    assert!(std::mem::align_of::<ncclUniqueId>() == 1);
};

// `ncclConfig_t` is passed by pointer and read up to its `size`: its offsets are the ABI.
#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(std::mem::size_of::<ncclConfig_t>() == 96);
    assert!(std::mem::align_of::<ncclConfig_t>() == 8);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_names_and_unknown_codes_are_safe() {
        assert_eq!(NcclCode(6).name(), Some("ncclRemoteError"));
        assert_eq!(NcclCode(7).to_string(), "ncclInProgress (7)");
        assert_eq!(NcclCode(-3).name(), None);
        assert_eq!(NcclCode(99).to_string(), "unknown NCCL result 99");
        assert_eq!(check(0), Ok(()));
        assert_eq!(check(2), Err(NcclCode(2)));
    }

    #[test]
    fn unique_ids_round_trip_through_hex() {
        let mut id = ncclUniqueId::default();
        for (i, b) in id.internal.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37) as c_char;
        }
        let hex = id.to_hex();
        assert_eq!(hex.len(), 256);
        assert_eq!(&hex[..6], "00254a");
        assert_eq!(ncclUniqueId::from_hex(&hex), Ok(id));
        assert!(ncclUniqueId::from_hex("00").unwrap_err().contains("256 hex digits"));
        let bad = format!("zz{}", &hex[2..]);
        assert!(ncclUniqueId::from_hex(&bad).unwrap_err().contains("position 0"));
    }

    /// Offsets of `ncclConfig_v23000` as a C compiler lays out `src/nccl.h.in` of NCCL 2.30.7
    /// on a 64-bit target: `size_t`, two `unsigned int`, then `int`s and pointers in order,
    /// each pointer aligned to 8. NCCL 2.14 to 2.16 read `blocking` at 16 whatever the size.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn config_layout_matches_nccl_h() {
        use std::mem::offset_of;
        let offsets = [
            (offset_of!(ncclConfig_t, size), 0),
            (offset_of!(ncclConfig_t, magic), 8),
            (offset_of!(ncclConfig_t, version), 12),
            (offset_of!(ncclConfig_t, blocking), 16),
            (offset_of!(ncclConfig_t, cgaClusterSize), 20),
            (offset_of!(ncclConfig_t, minCTAs), 24),
            (offset_of!(ncclConfig_t, maxCTAs), 28),
            (offset_of!(ncclConfig_t, netName), 32),
            (offset_of!(ncclConfig_t, splitShare), 40),
            (offset_of!(ncclConfig_t, trafficClass), 44),
            (offset_of!(ncclConfig_t, commName), 48),
            (offset_of!(ncclConfig_t, collnetEnable), 56),
            (offset_of!(ncclConfig_t, CTAPolicy), 60),
            (offset_of!(ncclConfig_t, shrinkShare), 64),
            (offset_of!(ncclConfig_t, nvlsCTAs), 68),
            (offset_of!(ncclConfig_t, nChannelsPerNetPeer), 72),
            (offset_of!(ncclConfig_t, nvlinkCentricSched), 76),
            (offset_of!(ncclConfig_t, graphUsageMode), 80),
            (offset_of!(ncclConfig_t, numRmaCtx), 84),
            (offset_of!(ncclConfig_t, maxP2pPeers), 88),
            (offset_of!(ncclConfig_t, graphStreamOrdering), 92),
        ];
        for (i, (got, want)) in offsets.iter().enumerate() {
            assert_eq!(got, want, "field {i} of ncclConfig_t");
        }
        assert_eq!(std::mem::size_of::<ncclConfig_t>(), 96);
    }

    /// `NCCL_CONFIG_INITIALIZER`, byte for byte: the size, the magic, the version, and every
    /// other field undefined (`INT_MIN`, NULL), read back from the struct's memory.
    #[test]
    fn the_default_config_is_nccl_config_initializer() {
        let config = ncclConfig_t { blocking: 0, ..ncclConfig_t::default() };
        // SAFETY: a plain repr(C) struct read as its bytes.
        let bytes: &[u8] = unsafe {
            std::slice::from_raw_parts(
                (&config as *const ncclConfig_t).cast(),
                std::mem::size_of::<ncclConfig_t>(),
            )
        };
        let word = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap());
        assert_eq!(u64::from_ne_bytes(bytes[..8].try_into().unwrap()), bytes.len() as u64);
        assert_eq!(word(8), 0xcafe_beef);
        assert_eq!(word(12), 23007, "NCCL_VERSION(2, 30, 7)");
        assert_eq!(word(16), 0, "blocking = 0");
        let undefined = [20, 24, 28, 40, 44, 56, 60, 64, 68, 72, 76, 80, 84, 88, 92];
        for at in undefined {
            assert_eq!(word(at), 0x8000_0000, "int at {at}: NCCL_CONFIG_UNDEF_INT");
        }
        for at in [32, 48] {
            assert!(bytes[at..at + 8].iter().all(|&b| b == 0), "pointer at {at}: NULL");
        }
    }

    #[test]
    fn a_missing_library_is_an_error_not_a_panic() {
        let err = Nccl::load_from(&["/nonexistent/libnccl.so.2".to_owned()]).expect_err("missing");
        assert!(err.contains("/nonexistent/libnccl.so.2"), "{err}");
    }

    #[test]
    fn wheel_libraries_are_found_under_a_prefix() {
        let prefix = tempfile::tempdir().unwrap();
        let lib = prefix.path().join("lib/python3.11/site-packages/nvidia/nccl/lib");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::write(lib.join("libnccl.so.2"), b"").unwrap();
        assert_eq!(wheel_libraries(prefix.path()), vec![lib.join("libnccl.so.2")]);
        assert!(wheel_libraries(&prefix.path().join("absent")).is_empty());
    }
}
