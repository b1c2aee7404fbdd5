//! Per file of a load, whether its SHA-256 was checked and against what
//! (`gantry_model_file_sha256`, `gantry_placed_file_sha256`), so that a C caller can tell a
//! file checked against a known digest from one only hashed, and from one not hashed at all.
//! The strings stay valid while the model (or placed checkpoint) lives.

use std::ffi::{c_char, CString};

use crate::error::{self, gantry_status, CallError};
use crate::model::gantry_model;
use crate::placed::gantry_placed;

/// A file's SHA-256 was not computed: `verify_sha256` was off, or nothing of the file was read.
pub const GANTRY_SHA256_NOT_COMPUTED: i32 = 0;
/// A file's SHA-256 was checked against the digest known for it, and matched (a mismatch fails
/// the load with `GANTRY_E_INTEGRITY`).
pub const GANTRY_SHA256_VERIFIED: i32 = 1;
/// A file's SHA-256 was computed, but no digest was known to check it against
/// (`require_sha256=1` makes that an error instead).
pub const GANTRY_SHA256_UNVERIFIED: i32 = 2;

/// The SHA-256 check of one file of a load.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct gantry_file_sha256 {
    /// NUL-terminated path of the file.
    pub path: *const c_char,
    /// NUL-terminated: where the known digest came from (`GANTRY_SHA256_VERIFIED`), why no
    /// digest was known (`GANTRY_SHA256_UNVERIFIED`), or "" (`GANTRY_SHA256_NOT_COMPUTED`).
    pub source: *const c_char,
    /// One of `GANTRY_SHA256_NOT_COMPUTED`, `GANTRY_SHA256_VERIFIED`,
    /// `GANTRY_SHA256_UNVERIFIED`.
    pub state: i32,
    /// Reserved, 0.
    pub reserved: i32,
    /// The file's SHA-256 when computed, else zeros.
    pub sha256: [u8; 32],
}

/// The checks of a load's files, as C sees them.
#[derive(Debug)]
pub(crate) struct Sha256Files {
    paths: Vec<CString>,
    sources: Vec<CString>,
    states: Vec<(i32, [u8; 32])>,
}

impl Sha256Files {
    pub(crate) fn new(report: &engine::LoadReport) -> Self {
        let c = |s: String| CString::new(s.replace('\0', "?")).unwrap_or_default();
        let mut files = Self { paths: Vec::new(), sources: Vec::new(), states: Vec::new() };
        for f in &report.files {
            files.paths.push(c(f.path.to_string_lossy().into_owned()));
            let (state, source) = match &f.integrity {
                Some(check) if check.verified() => {
                    (GANTRY_SHA256_VERIFIED, check.known.as_ref().map(|k| k.source.clone()))
                }
                Some(check) if check.sha256.is_some() => {
                    (GANTRY_SHA256_UNVERIFIED, Some(check.unknown_reason.clone()))
                }
                _ => (GANTRY_SHA256_NOT_COMPUTED, None),
            };
            files.sources.push(c(source.unwrap_or_default()));
            let digest = f.integrity.as_ref().and_then(|c| c.sha256).unwrap_or([0; 32]);
            files.states.push((state, digest));
        }
        files
    }

    fn get(&self, file: usize) -> Result<gantry_file_sha256, CallError> {
        let &(state, sha256) = self.states.get(file).ok_or_else(|| {
            CallError::not_found(format!("file {file} (the load has {})", self.states.len()))
        })?;
        Ok(gantry_file_sha256 {
            path: self.paths[file].as_ptr(),
            source: self.sources[file].as_ptr(),
            state,
            reserved: 0,
            sha256,
        })
    }
}

/// Files of the checkpoint `model` was loaded from.
///
/// # Safety
/// `model` is a live model; `count_out` writable.
#[no_mangle]
pub unsafe extern "C" fn gantry_model_file_count(
    model: *const gantry_model,
    count_out: *mut usize,
) -> gantry_status {
    // SAFETY: per the contract.
    unsafe {
        error::get_into((model, "model"), (count_out, "count_out"), |model| {
            Ok(model.sha256.states.len())
        })
    }
}

/// Whether file `file` (0 to the file count - 1) of the load that made `model` had its SHA-256
/// checked, against what, and the digest; `GANTRY_E_NOT_FOUND` past the last file.
///
/// # Safety
/// `model` is a live model; `check_out` writable.
#[no_mangle]
pub unsafe extern "C" fn gantry_model_file_sha256(
    model: *const gantry_model,
    file: usize,
    check_out: *mut gantry_file_sha256,
) -> gantry_status {
    // SAFETY: per the contract.
    unsafe {
        error::get_into((model, "model"), (check_out, "check_out"), |model| model.sha256.get(file))
    }
}

/// Files of the checkpoint `placed` was loaded from.
///
/// # Safety
/// `placed` live; `count_out` writable.
#[no_mangle]
pub unsafe extern "C" fn gantry_placed_file_count(
    placed: *const gantry_placed,
    count_out: *mut usize,
) -> gantry_status {
    // SAFETY: per the contract.
    unsafe {
        error::get_into((placed, "placed"), (count_out, "count_out"), |placed| {
            Ok(placed.sha256.states.len())
        })
    }
}

/// [`gantry_model_file_sha256`] for a placed checkpoint.
///
/// # Safety
/// `placed` live; `check_out` writable.
#[no_mangle]
pub unsafe extern "C" fn gantry_placed_file_sha256(
    placed: *const gantry_placed,
    file: usize,
    check_out: *mut gantry_file_sha256,
) -> gantry_status {
    // SAFETY: per the contract.
    unsafe {
        error::get_into((placed, "placed"), (check_out, "check_out"), |placed| {
            placed.sha256.get(file)
        })
    }
}
