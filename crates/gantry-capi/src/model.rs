//! `gantry_model`: a loaded checkpoint, and the tensor descriptions handed to C.
//!
//! Lookups are by position: a model lists its tensors by their place in the checkpoint's
//! table, and a name leads to that place through one hash map built with the descriptions, so
//! building a model and finding every tensor by name both take time linear in the tensors.
//! Names are matched on their exact bytes. A name with an interior NUL cannot be a C string:
//! its `name` field shows each NUL as `?`, and only `gantry_model_find_bytes` (which takes a
//! length) finds it, so `"a?b"` never finds the tensor called `"a\0b"`.

use std::collections::HashMap;
use std::ffi::{c_char, CString};

use crate::error::{self, ffi_boundary, gantry_status, CallError};

/// One tensor as C sees it. Strings and `shape` stay valid while the model lives (or, in
/// callbacks, for the duration of the callback).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct gantry_tensor {
    /// NUL-terminated name (a NUL inside the name itself shows as `?`).
    pub name: *const c_char,
    /// NUL-terminated safetensors dtype (`"BF16"`, `"F32"`, ...).
    pub dtype: *const c_char,
    /// NUL-terminated path of the file that holds it.
    pub file: *const c_char,
    /// `ndim` dimensions, outermost first.
    pub shape: *const u64,
    /// Number of dimensions.
    pub ndim: u32,
    /// Reserved, 0.
    pub reserved: u32,
    /// Address of the first byte: a host pointer, or a device pointer (`CUdeviceptr`) for a
    /// GPU load; 0 where none is assigned yet.
    pub data: u64,
    /// Bytes.
    pub bytes: u64,
    /// Absolute offset of the first byte in its file.
    pub file_offset: u64,
    /// Position in the checkpoint's tensor table.
    pub index: u64,
}

/// Figures of one load.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct gantry_report {
    /// Bytes of the tensors delivered.
    pub tensor_bytes: u64,
    /// Bytes read from storage.
    pub read_bytes: u64,
    /// Staging memory used.
    pub staging_bytes: u64,
    /// Seconds from the first read to the last byte landing.
    pub seconds: f64,
}

impl From<&engine::LoadReport> for gantry_report {
    fn from(r: &engine::LoadReport) -> Self {
        Self {
            tensor_bytes: r.tensor_bytes,
            read_bytes: r.read_bytes,
            staging_bytes: r.staging_bytes,
            seconds: r.seconds,
        }
    }
}

/// C strings and shapes of a checkpoint's tensors, and each tensor's position by name.
#[derive(Debug)]
pub(crate) struct TensorInfos {
    names: Vec<CString>,
    dtypes: Vec<CString>,
    files: Vec<CString>,
    file_of: Vec<usize>,
    shapes: Vec<Vec<u64>>,
    entries: Vec<(u64, u64)>,
    /// Position in the checkpoint's table of each exact name (interior NULs included).
    positions: HashMap<Box<[u8]>, usize>,
}

impl TensorInfos {
    pub(crate) fn new(checkpoint: &engine::Checkpoint) -> Self {
        let c = |s: &str| CString::new(s.replace('\0', "?")).expect("no NUL after replace");
        Self {
            names: checkpoint.tensors.iter().map(|t| c(&t.name)).collect(),
            dtypes: checkpoint.tensors.iter().map(|t| c(&t.dtype.to_string())).collect(),
            files: checkpoint.files.iter().map(|f| c(&f.path.to_string_lossy())).collect(),
            file_of: checkpoint.tensors.iter().map(|t| t.file.0).collect(),
            shapes: checkpoint.tensors.iter().map(|t| t.shape.clone()).collect(),
            entries: checkpoint.tensors.iter().map(|t| (t.len, t.offset)).collect(),
            positions: checkpoint
                .tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.as_bytes().into(), i))
                .collect(),
        }
    }

    pub(crate) fn tensor(&self, i: usize, data: u64) -> gantry_tensor {
        self.share(i, data, &self.shapes[i], self.entries[i].0)
    }

    /// Tensor `i` with its own name, dtype, file and offset, but `shape` and `bytes` of a
    /// share of it (`shape` must outlive the description).
    pub(crate) fn share(&self, i: usize, data: u64, shape: &[u64], bytes: u64) -> gantry_tensor {
        gantry_tensor {
            name: self.names[i].as_ptr(),
            dtype: self.dtypes[i].as_ptr(),
            file: self.files[self.file_of[i]].as_ptr(),
            shape: shape.as_ptr(),
            ndim: shape.len() as u32,
            reserved: 0,
            data,
            bytes,
            file_offset: self.entries[i].1,
            index: i as u64,
        }
    }

    /// The position in the checkpoint's table of the tensor whose name is exactly `name`.
    pub(crate) fn position(&self, name: &[u8]) -> Option<usize> {
        self.positions.get(name).copied()
    }
}

/// `name` for an error message: lossy UTF-8, control characters (NUL included) escaped.
pub(crate) fn shown(name: &[u8]) -> String {
    String::from_utf8_lossy(name).escape_debug().to_string()
}

/// What owns the tensors' memory; held only to be dropped with the model.
#[derive(Debug)]
#[allow(dead_code)]
enum Loaded {
    Host(engine::HostModel),
    Device(engine::DeviceModel),
}

/// An opaque loaded checkpoint; its memory (host or device) is freed by `gantry_model_free`.
#[derive(Debug)]
pub struct gantry_model {
    _loaded: Loaded,
    infos: TensorInfos,
    /// (checkpoint index, data address) of every loaded tensor, in file and offset order.
    tensors: Vec<(usize, u64)>,
    report: gantry_report,
    pub(crate) sha256: crate::sha256::Sha256Files,
}

impl gantry_model {
    pub(crate) fn host(m: engine::HostModel) -> Self {
        let tensors = (0..m.checkpoint().tensors.len())
            .filter_map(|i| m.get(i).map(|t| (i, t.bytes.as_ptr() as u64)))
            .collect();
        let (infos, report) = (TensorInfos::new(m.checkpoint()), m.report().into());
        let sha256 = crate::sha256::Sha256Files::new(m.report());
        Self { _loaded: Loaded::Host(m), infos, tensors, report, sha256 }
    }

    pub(crate) fn device(m: engine::DeviceModel) -> Self {
        let tensors = (0..m.checkpoint().tensors.len())
            .filter_map(|i| m.get(i).map(|t| (i, t.ptr)))
            .collect();
        let (infos, report) = (TensorInfos::new(m.checkpoint()), m.report().into());
        let sha256 = crate::sha256::Sha256Files::new(m.report());
        Self { _loaded: Loaded::Device(m), infos, tensors, report, sha256 }
    }

    fn describe(&self, position: usize) -> gantry_tensor {
        let (i, data) = self.tensors[position];
        self.infos.tensor(i, data)
    }

    /// The position among the loaded tensors of the one called exactly `name`.
    fn find(&self, name: &[u8]) -> Result<usize, CallError> {
        let i = self.infos.position(name);
        // `tensors` is in checkpoint order.
        i.and_then(|i| self.tensors.binary_search_by_key(&i, |&(t, _)| t).ok())
            .ok_or_else(|| CallError::not_found(format!("no loaded tensor '{}'", shown(name))))
    }
}

/// The number of loaded tensors.
///
/// # Safety
/// `model` is a live model; `count_out` writable.
#[no_mangle]
pub unsafe extern "C" fn gantry_model_tensor_count(
    model: *const gantry_model,
    count_out: *mut usize,
) -> gantry_status {
    // SAFETY: per the contract.
    unsafe {
        error::get_into((model, "model"), (count_out, "count_out"), |model| Ok(model.tensors.len()))
    }
}

/// The loaded tensor at `position` (0 to count - 1, file and offset order).
///
/// # Safety
/// `model` is a live model; `tensor_out` writable.
#[no_mangle]
pub unsafe extern "C" fn gantry_model_tensor(
    model: *const gantry_model,
    position: usize,
    tensor_out: *mut gantry_tensor,
) -> gantry_status {
    ffi_boundary(|| {
        // SAFETY: per the contract.
        let model = unsafe { error::in_ref(model, "model")? };
        let out = error::out_ptr(tensor_out, "tensor_out")?;
        if position >= model.tensors.len() {
            return Err(CallError::not_found(format!(
                "position {position} of {} tensors",
                model.tensors.len()
            )));
        }
        // SAFETY: checked non-NULL.
        unsafe { out.write(model.describe(position)) };
        Ok(())
    })
}

/// The loaded tensor called `name` (matched exactly; see `gantry_model_find_bytes` for a name
/// with a NUL inside).
///
/// # Safety
/// `model` is a live model; `name` NUL-terminated; `tensor_out` writable.
#[no_mangle]
pub unsafe extern "C" fn gantry_model_find(
    model: *const gantry_model,
    name: *const c_char,
    tensor_out: *mut gantry_tensor,
) -> gantry_status {
    ffi_boundary(|| {
        // SAFETY: per the contract.
        let model = unsafe { error::in_ref(model, "model")? };
        // SAFETY: per the contract.
        let name = unsafe { error::in_str(name, "name")? };
        let out = error::out_ptr(tensor_out, "tensor_out")?;
        let position = model.find(name.as_bytes())?;
        // SAFETY: checked non-NULL.
        unsafe { out.write(model.describe(position)) };
        Ok(())
    })
}

/// The loaded tensor whose name is exactly the `name_len` bytes at `name`, which may hold
/// NULs (a safetensors name may; `gantry_model_find` cannot express such a name).
///
/// # Safety
/// `model` is a live model; `name` points to `name_len` readable bytes (or `name_len` is 0);
/// `tensor_out` writable.
#[no_mangle]
pub unsafe extern "C" fn gantry_model_find_bytes(
    model: *const gantry_model,
    name: *const c_char,
    name_len: usize,
    tensor_out: *mut gantry_tensor,
) -> gantry_status {
    ffi_boundary(|| {
        // SAFETY: per the contract.
        let model = unsafe { error::in_ref(model, "model")? };
        // SAFETY: per the contract.
        let name = unsafe { error::in_bytes(name, name_len, "name")? };
        let out = error::out_ptr(tensor_out, "tensor_out")?;
        let position = model.find(name)?;
        // SAFETY: checked non-NULL.
        unsafe { out.write(model.describe(position)) };
        Ok(())
    })
}

/// Figures of the load that made `model`.
///
/// # Safety
/// `model` is a live model; `report_out` writable.
#[no_mangle]
pub unsafe extern "C" fn gantry_model_report(
    model: *const gantry_model,
    report_out: *mut gantry_report,
) -> gantry_status {
    ffi_boundary(|| {
        // SAFETY: per the contract.
        let model = unsafe { error::in_ref(model, "model")? };
        let out = error::out_ptr(report_out, "report_out")?;
        // SAFETY: checked non-NULL.
        unsafe { out.write(model.report) };
        Ok(())
    })
}

/// Frees a model and the memory holding its tensors (NULL is ignored).
///
/// # Safety
/// `model` is NULL or a live model from gantry, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn gantry_model_free(model: *mut gantry_model) {
    let _ = ffi_boundary(|| {
        if !model.is_null() {
            // SAFETY: per the contract, freed once.
            drop(unsafe { Box::from_raw(model) });
        }
        Ok(())
    });
}
