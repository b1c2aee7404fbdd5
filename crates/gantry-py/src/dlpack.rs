//! The DLPack exchange: `DLManagedTensor` (DLPack 0.8 ABI, which every consumer accepts)
//! wrapped in a `"dltensor"` capsule. The managed tensor keeps the memory it points into alive
//! until the consumer calls its deleter; a capsule nobody consumed deletes it itself.

use std::ffi::c_void;
use std::sync::Arc;

use gantry::Dtype;
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;

use crate::memory::Memory;

/// `DLDeviceType` values gantry produces.
pub const DEVICE_CPU: i32 = 1;
/// `kDLCUDA`.
pub const DEVICE_CUDA: i32 = 2;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
#[derive(Debug)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
#[derive(Debug)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// What a managed tensor keeps alive: its shape array and the memory it points into.
struct Context {
    shape: Vec<i64>,
    _memory: Arc<Memory>,
}

// Layout checks against dlpack.h on x86-64.
const _: () = assert!(std::mem::size_of::<DLTensor>() == 48);
const _: () = assert!(std::mem::size_of::<DLManagedTensor>() == 64);

/// DLPack's type code and bits for a safetensors dtype; `None` for those DLPack cannot
/// describe as whole elements (the sub-byte float4 and float6).
pub fn dl_dtype(dtype: Dtype) -> Option<(u8, u8)> {
    const INT: u8 = 0;
    const UINT: u8 = 1;
    const FLOAT: u8 = 2;
    const BFLOAT: u8 = 4;
    const COMPLEX: u8 = 5;
    const BOOL: u8 = 6;
    Some(match dtype {
        Dtype::BOOL => (BOOL, 8),
        Dtype::U8 => (UINT, 8),
        Dtype::I8 => (INT, 8),
        Dtype::I16 => (INT, 16),
        Dtype::U16 => (UINT, 16),
        Dtype::I32 => (INT, 32),
        Dtype::U32 => (UINT, 32),
        Dtype::I64 => (INT, 64),
        Dtype::U64 => (UINT, 64),
        Dtype::F16 => (FLOAT, 16),
        Dtype::BF16 => (BFLOAT, 16),
        Dtype::F32 => (FLOAT, 32),
        Dtype::F64 => (FLOAT, 64),
        Dtype::C64 => (COMPLEX, 64),
        // DLPack 1.1 codes: kDLFloat8_e4m3fn, _e4m3fnuz, _e5m2, _e5m2fnuz, _e8m0fnu.
        Dtype::F8_E4M3 => (10, 8),
        Dtype::F8_E4M3FNUZ => (11, 8),
        Dtype::F8_E5M2 => (12, 8),
        Dtype::F8_E5M2FNUZ => (13, 8),
        Dtype::F8_E8M0 => (14, 8),
        _ => return None,
    })
}

unsafe extern "C" fn delete_managed(managed: *mut DLManagedTensor) {
    if managed.is_null() {
        return;
    }
    // SAFETY: `managed` and its context were made by `Box::into_raw` in `capsule`, and DLPack
    // calls the deleter once.
    unsafe {
        drop(Box::from_raw((*managed).manager_ctx.cast::<Context>()));
        drop(Box::from_raw(managed));
    }
}

const NAME: &std::ffi::CStr = c"dltensor";

unsafe extern "C" fn delete_capsule(capsule: *mut ffi::PyObject) {
    // A consumer renames the capsule to "used_dltensor" and owns the tensor from then on; a
    // capsule still named "dltensor" was never consumed and deletes its tensor here. The
    // destructor may run while an exception is in flight (a capsule dropped as the stack
    // unwinds), so the error state is saved first and put back as it was: whatever these
    // calls leave in it is dropped, and the exception reaches the caller unchanged.
    let mut error = [std::ptr::null_mut(); 3];
    // SAFETY: called by Python, with the GIL, for the capsule being destroyed; the three
    // pointers are writable. PyErr_Restore takes back the references PyErr_Fetch handed out.
    unsafe {
        ffi::PyErr_Fetch(&mut error[0], &mut error[1], &mut error[2]);
        if ffi::PyCapsule_IsValid(capsule, NAME.as_ptr()) == 1 {
            let managed = ffi::PyCapsule_GetPointer(capsule, NAME.as_ptr()).cast();
            delete_managed(managed);
        }
        ffi::PyErr_Restore(error[0], error[1], error[2]);
    }
}

/// A tensor's description for DLPack.
#[derive(Debug, Clone, Copy)]
pub struct Export<'a> {
    /// Address of the first byte.
    pub data: u64,
    /// `(device type, device id)`.
    pub device: (i32, i32),
    /// DLPack type code and bits.
    pub dtype: (u8, u8),
    /// Shape, C-contiguous.
    pub shape: &'a [u64],
}

/// A `"dltensor"` capsule for `export`, keeping `memory` alive until it is deleted.
pub fn capsule(py: Python<'_>, export: Export<'_>, memory: &Arc<Memory>) -> PyResult<Py<PyAny>> {
    let mut context = Box::new(Context {
        shape: export.shape.iter().map(|&d| d as i64).collect(),
        _memory: Arc::clone(memory),
    });
    let ndim = i32::try_from(context.shape.len())
        .map_err(|_| PyBufferError::new_err("too many dimensions"))?;
    let shape = context.shape.as_mut_ptr();
    let managed = Box::into_raw(Box::new(DLManagedTensor {
        dl_tensor: DLTensor {
            data: export.data as *mut c_void,
            device: DLDevice { device_type: export.device.0, device_id: export.device.1 },
            ndim,
            dtype: DLDataType { code: export.dtype.0, bits: export.dtype.1, lanes: 1 },
            shape,
            strides: std::ptr::null_mut(),
            byte_offset: 0,
        },
        manager_ctx: Box::into_raw(context).cast(),
        deleter: Some(delete_managed),
    }));
    let destructor = Some(delete_capsule as unsafe extern "C" fn(*mut ffi::PyObject));
    // SAFETY: a valid pointer, a static name, and a destructor that handles both the consumed
    // and the unconsumed capsule.
    let capsule = unsafe { ffi::PyCapsule_New(managed.cast(), NAME.as_ptr(), destructor) };
    if capsule.is_null() {
        // SAFETY: the capsule was not made, so nobody else owns `managed`.
        unsafe { delete_managed(managed) };
        return Err(PyErr::fetch(py));
    }
    // SAFETY: PyCapsule_New returned a new reference.
    Ok(unsafe { Bound::from_owned_ptr(py, capsule) }.unbind())
}

/// A host tensor's bytes taken through its `__dlpack__` capsule: the producer keeps them alive
/// until [`Imported`] is dropped (which calls its deleter; drop it with the GIL held, as
/// producers' deleters may touch Python objects).
pub struct Imported {
    managed: *mut DLManagedTensor,
    ptr: *mut u8,
    len: usize,
}

impl Imported {
    /// Takes `object.__dlpack__()`: C-contiguous memory in host memory (`kDLCPU`, or
    /// `kDLCUDAHost`), whole elements. An error names `tensor`.
    pub fn host(object: &Bound<'_, PyAny>, tensor: &str) -> PyResult<Self> {
        let bad = |what: &str| PyBufferError::new_err(format!("{tensor}: {what}"));
        let capsule = object
            .call_method0("__dlpack__")
            .map_err(|e| bad(&format!("has no usable __dlpack__: {e}")))?;
        const NAME: &std::ffi::CStr = c"dltensor";
        const USED: &std::ffi::CStr = c"used_dltensor";
        // SAFETY: `capsule` is a live object; IsValid only reads its type and name.
        if unsafe { ffi::PyCapsule_IsValid(capsule.as_ptr(), NAME.as_ptr()) } != 1 {
            return Err(bad("__dlpack__ did not return an unused \"dltensor\" capsule"));
        }
        // SAFETY: a valid "dltensor" capsule (checked), whose pointer is a DLManagedTensor by
        // the DLPack protocol. Renaming it to "used_dltensor" makes this the tensor's only
        // owner: the capsule's own destructor then leaves it to us.
        let managed = unsafe {
            let managed = ffi::PyCapsule_GetPointer(capsule.as_ptr(), NAME.as_ptr());
            if managed.is_null() || ffi::PyCapsule_SetName(capsule.as_ptr(), USED.as_ptr()) != 0 {
                return Err(PyErr::take(object.py()).unwrap_or_else(|| bad("an empty capsule")));
            }
            managed.cast::<DLManagedTensor>()
        };
        let mut imported = Self { managed, ptr: std::ptr::null_mut(), len: 0 };
        // SAFETY: the producer's DLManagedTensor, alive until its deleter runs (on drop).
        let t = unsafe { &(*managed).dl_tensor };
        if !matches!(t.device.device_type, DEVICE_CPU | 3) {
            return Err(bad("not in host memory"));
        }
        let ndim = usize::try_from(t.ndim).map_err(|_| bad("a negative ndim"))?;
        let shape: &[i64] = match ndim {
            0 => &[],
            // SAFETY: DLPack: `shape` holds `ndim` values while the tensor lives.
            _ => unsafe { std::slice::from_raw_parts(t.shape, ndim) },
        };
        let strides: &[i64] = match (ndim, t.strides.is_null()) {
            (0, _) | (_, true) => &[],
            // SAFETY: DLPack: non-null `strides` holds `ndim` values while the tensor lives.
            _ => unsafe { std::slice::from_raw_parts(t.strides, ndim) },
        };
        if t.dtype.lanes != 1 || t.dtype.bits % 8 != 0 {
            return Err(bad("not whole-byte elements of one lane"));
        }
        let mut elements = 1u64;
        let mut expected_stride = 1i64;
        for d in (0..ndim).rev() {
            let n = u64::try_from(shape[d]).map_err(|_| bad("a negative dimension"))?;
            if !strides.is_empty() && n > 1 && strides[d] != expected_stride {
                return Err(bad("not contiguous"));
            }
            expected_stride = expected_stride.saturating_mul(shape[d]);
            elements = elements.checked_mul(n).ok_or_else(|| bad("too many elements"))?;
        }
        let len = elements
            .checked_mul(u64::from(t.dtype.bits / 8))
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| bad("too many bytes"))?;
        imported.len = len;
        if len > 0 {
            let offset = usize::try_from(t.byte_offset).map_err(|_| bad("a bad byte_offset"))?;
            imported.ptr = t.data.cast::<u8>().wrapping_add(offset);
            if imported.ptr.is_null() {
                return Err(bad("a null data pointer"));
            }
        }
        Ok(imported)
    }

    /// Address of the first byte.
    pub fn addr(&self) -> usize {
        self.ptr as usize
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The bytes, read only.
    pub fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `len` bytes of contiguous host memory at `ptr` (checked in `host`), alive
        // while the producer's tensor is, which is until `self` drops.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, to write into.
    ///
    /// # Safety
    /// No other slice over these bytes may be alive while the returned one is (the caller
    /// checks that the imported tensors do not overlap), and the producer must not hand out
    /// read-only memory through DLPack (numpy refuses to export read-only arrays; torch
    /// tensors are writable).
    pub unsafe fn bytes_mut(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as in `bytes`; uniqueness is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Imported {
    fn drop(&mut self) {
        // SAFETY: the DLManagedTensor taken in `host`, owned by us alone since its capsule
        // was renamed; its deleter is called exactly once, here.
        unsafe {
            if let Some(deleter) = (*self.managed).deleter {
                deleter(self.managed);
            }
        }
    }
}
