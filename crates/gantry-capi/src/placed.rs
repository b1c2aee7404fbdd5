//! `gantry_placed`: a checkpoint read once and placed across several destinations (host
//! memory or GPUs), replicated or sliced for tensor parallelism.

use std::ffi::{c_char, c_void};
use std::sync::Arc;

use engine::placement::{Share, Slice};

use crate::error::{self, ffi_boundary, gantry_status, CallError};
use crate::model::{gantry_report, gantry_tensor, TensorInfos};
use crate::{gantry_loader, GANTRY_DEVICE_HOST};

/// What of a tensor one destination gets, as a `gantry_place_fn` fills it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct gantry_share {
    /// 1: the whole tensor (the other fields are ignored); 0: a slice.
    pub whole: u32,
    /// The dimension sliced.
    pub dim: u32,
    /// First index taken along `dim`.
    pub start: u64,
    /// Indices taken along `dim`.
    pub len: u64,
}

/// Says what destination `destination` gets of `tensor` (data is 0): fill `*share_out` and
/// return 1, return 0 for nothing, or a negative value to fail the load
/// (`GANTRY_E_INVALID_ARGUMENT`). Called once per tensor and destination, before any read.
pub type gantry_place_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        tensor: *const gantry_tensor,
        destination: usize,
        share_out: *mut gantry_share,
    ) -> i32,
>;

/// The common placements of `gantry_loader_load_split`.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum gantry_split {
    /// Every tensor whole to every destination.
    GANTRY_SPLIT_REPLICATE = 0,
    /// Tensors of two or more dimensions split evenly by rows (dimension 0) where the
    /// destinations divide it; the rest whole to each.
    GANTRY_SPLIT_DIM0 = 1,
    /// As `GANTRY_SPLIT_DIM0`, by columns (dimension 1).
    GANTRY_SPLIT_DIM1 = 2,
    /// The tensor-parallel rule of vLLM and Megatron, by tensor name (Llama, Mistral,
    /// Qwen2/3, Mixtral): column-parallel weights (q/k/v, gate/up, experts' w1/w3, embedding,
    /// LM head) split by rows, row-parallel weights (o_proj, down_proj, experts' w2) by
    /// columns, norms, routers and unnamed tensors whole to each; a split that does not
    /// divide by the destinations is `GANTRY_E_PLACEMENT` naming the tensor.
    GANTRY_SPLIT_TP = 3,
}

/// What owns the shares' memory; held only to be dropped with the handle.
#[derive(Debug)]
#[allow(dead_code)]
enum Loaded {
    Host(engine::PlacedModel),
    Device(engine::PlacedDeviceModel),
}

/// One share as C sees it.
#[derive(Debug)]
struct ShareInfo {
    tensor: usize,
    shape: Vec<u64>,
    data: u64,
    bytes: u64,
}

impl ShareInfo {
    /// `share`, whose first byte is at `data`.
    fn new(share: &engine::placement::ShareEntry, data: u64) -> Self {
        Self { tensor: share.tensor, shape: share.shape.clone(), data, bytes: share.len }
    }
}

/// An opaque placed checkpoint; its memory is freed by `gantry_placed_free`.
#[derive(Debug)]
pub struct gantry_placed {
    _loaded: Loaded,
    infos: TensorInfos,
    /// Per destination, its shares in checkpoint order.
    shares: Vec<Vec<ShareInfo>>,
    report: gantry_report,
    pub(crate) sha256: crate::sha256::Sha256Files,
}

impl gantry_placed {
    fn describe(&self, destination: usize, position: usize) -> gantry_tensor {
        let s = &self.shares[destination][position];
        self.infos.share(s.tensor, s.data, &s.shape, s.bytes)
    }

    fn destination(&self, destination: usize) -> Result<&[ShareInfo], CallError> {
        self.shares.get(destination).map(Vec::as_slice).ok_or_else(|| {
            CallError::not_found(format!("destination {destination} of {}", self.shares.len()))
        })
    }
}

/// Loads `path` across `destinations` places (1 to 1024, else `GANTRY_E_INVALID_ARGUMENT`
/// before `devices` is read): `devices` lists one per destination, either all
/// `GANTRY_DEVICE_HOST` (host memory) or all GPU ordinals (the same GPU may appear more than
/// once). `place` says what each destination gets of each tensor. Bytes several
/// destinations want are read once; a slice along dimension 0 reads only its bytes.
///
/// # Safety
/// `loader` live; `path` NUL-terminated; `devices` points to `destinations` values; `place`
/// follows its contract and does not unwind; `placed_out` writable.
#[no_mangle]
pub unsafe extern "C" fn gantry_loader_load_placed(
    loader: *const gantry_loader,
    path: *const c_char,
    devices: *const i32,
    destinations: usize,
    place: gantry_place_fn,
    user_data: *mut c_void,
    placed_out: *mut *mut gantry_placed,
) -> gantry_status {
    ffi_boundary(|| {
        let place = place.ok_or_else(|| CallError::null("place"))?;
        // SAFETY: per the contract.
        let (loader, devices) = unsafe { arguments(loader, devices, destinations)? };
        // SAFETY: per the contract.
        let path = unsafe { error::in_str(path, "path")? };
        let out = error::out_ptr(placed_out, "placed_out")?;
        let checkpoint = engine::open_with(path, loader.config())?;
        // Descriptions for the callback, which sees each tensor as `gantry_load_into`'s do.
        let infos = TensorInfos::new(&checkpoint);
        let rule = |t: &engine::TensorEntry| -> engine::Result<Vec<(usize, Share)>> {
            let i = infos.position(t.name.as_bytes()).ok_or_else(|| {
                engine::Error::Internal(format!("tensor '{}' is not in the table", t.name))
            })?;
            let described = infos.tensor(i, 0);
            let mut placed = Vec::new();
            for d in 0..destinations {
                let mut share = gantry_share::default();
                // SAFETY: the callback's contract; both pointers live for the call.
                match unsafe { place(user_data, &described, d, &mut share) } {
                    0 => {}
                    1 if share.whole != 0 => placed.push((d, Share::Whole)),
                    1 => placed.push((
                        d,
                        Share::Slice(Slice {
                            dim: share.dim as usize,
                            start: share.start,
                            len: share.len,
                        }),
                    )),
                    rc => {
                        // The callback broke its contract (0 or 1): the caller's argument.
                        return Err(engine::Error::Config(format!(
                            "the place callback returned {rc} for tensor '{}', destination {d}",
                            t.name
                        )));
                    }
                }
            }
            Ok(placed)
        };
        let placed = load(loader, checkpoint, &devices, rule)?;
        // SAFETY: checked non-NULL.
        unsafe { out.write(Box::into_raw(Box::new(placed))) };
        Ok(())
    })
}

/// Loads `path` across `destinations` places (as `gantry_loader_load_placed`) with one of the
/// common placements: replicated, split by rows or columns, or the tensor-parallel rule
/// (`GANTRY_SPLIT_TP`). Strided shares (columns) are copied with one 2-D copy per staged
/// read and destination.
///
/// # Safety
/// `loader` live; `path` NUL-terminated; `devices` points to `destinations` values;
/// `placed_out` writable.
#[no_mangle]
pub unsafe extern "C" fn gantry_loader_load_split(
    loader: *const gantry_loader,
    path: *const c_char,
    devices: *const i32,
    destinations: usize,
    split: i32,
    placed_out: *mut *mut gantry_placed,
) -> gantry_status {
    ffi_boundary(|| {
        // SAFETY: per the contract.
        let (loader, devices) = unsafe { arguments(loader, devices, destinations)? };
        // SAFETY: per the contract.
        let path = unsafe { error::in_str(path, "path")? };
        let out = error::out_ptr(placed_out, "placed_out")?;
        let rule = split_rule(split, destinations)?;
        let checkpoint = engine::open_with(path, loader.config())?;
        let placed = load(loader, checkpoint, &devices, rule)?;
        // SAFETY: checked non-NULL.
        unsafe { out.write(Box::into_raw(Box::new(placed))) };
        Ok(())
    })
}

/// A placement rule: what each destination gets of a tensor.
pub(crate) type Rule =
    Box<dyn Fn(&engine::TensorEntry) -> engine::Result<Vec<(usize, Share)>> + Send + Sync>;

/// The rule of a `gantry_split` over `destinations` (1 to `DESTINATIONS_MAX`), through the
/// engine's one shard parser ([`engine::placement::ShardSpec`]) as the CLI and Python use it.
pub(crate) fn split_rule(split: i32, destinations: usize) -> Result<Rule, CallError> {
    use engine::placement::{ShardRule, ShardSpec};
    let rule = match split {
        s if s == gantry_split::GANTRY_SPLIT_REPLICATE as i32 => ShardRule::Replicate,
        s if s == gantry_split::GANTRY_SPLIT_DIM0 as i32 => ShardRule::Dim(0),
        s if s == gantry_split::GANTRY_SPLIT_DIM1 as i32 => ShardRule::Dim(1),
        s if s == gantry_split::GANTRY_SPLIT_TP as i32 => ShardRule::TensorParallel,
        s => return Err(CallError::invalid(format!("split {s} is not a gantry_split"))),
    };
    Ok(ShardSpec::new(rule, destinations)?.placement(&[])?)
}

/// Where the destinations are.
enum Devices {
    Host(usize),
    Gpus(Vec<u32>),
}

/// The loader and the destinations' devices, checked.
///
/// # Safety
/// `loader` NULL or live; `devices` NULL or pointing to `count` values.
unsafe fn arguments<'a>(
    loader: *const gantry_loader,
    devices: *const i32,
    count: usize,
) -> Result<(&'a engine::Loader, Devices), CallError> {
    // SAFETY: per the contract.
    let loader = &unsafe { error::in_ref(loader, "loader")? }.loader;
    // Bounded before anything is read or allocated: each destination costs a buffer and
    // bookkeeping per tensor.
    engine::placement::check_destinations("destinations", count)?;
    if devices.is_null() {
        return Err(CallError::null("devices"));
    }
    // SAFETY: `count` values, per the contract.
    let list = unsafe { std::slice::from_raw_parts(devices, count) };
    if list.iter().all(|&d| d == GANTRY_DEVICE_HOST) {
        return Ok((loader, Devices::Host(count)));
    }
    if let Some(bad) = list.iter().find(|&&d| d < 0) {
        return Err(CallError::invalid(format!(
            "devices lists {bad}: either every destination is GANTRY_DEVICE_HOST or every one is a GPU"
        )));
    }
    Ok((loader, Devices::Gpus(list.iter().map(|&d| d as u32).collect())))
}

fn load(
    loader: &engine::Loader,
    checkpoint: engine::Checkpoint,
    devices: &Devices,
    rule: impl FnMut(&engine::TensorEntry) -> engine::Result<Vec<(usize, Share)>>,
) -> Result<gantry_placed, CallError> {
    Ok(match devices {
        Devices::Host(n) => {
            let m = loader.load_placed(checkpoint, *n, rule, |_, _| {})?;
            let shares = (0..m.devices())
                .map(|d| {
                    m.tensors(d).map(|t| ShareInfo::new(t.share, t.bytes.as_ptr() as u64)).collect()
                })
                .collect();
            let (infos, report) = (TensorInfos::new(m.checkpoint()), m.report().into());
            gantry_placed {
                sha256: crate::sha256::Sha256Files::new(m.report()),
                _loaded: Loaded::Host(m),
                infos,
                shares,
                report,
            }
        }
        Devices::Gpus(ordinals) => {
            let gpus: Vec<Arc<engine::CudaDevice>> = engine::CudaDevice::open_all(ordinals)?;
            gantry_placed::on_devices(loader.load_placed_to_devices(
                checkpoint,
                &gpus,
                rule,
                |_, _| {},
            )?)
        }
    })
}

impl gantry_placed {
    /// A handle on shares placed on GPUs.
    pub(crate) fn on_devices(m: engine::PlacedDeviceModel) -> Self {
        let shares = (0..m.devices())
            .map(|d| m.tensors(d).map(|t| ShareInfo::new(t.share, t.ptr)).collect())
            .collect();
        let (infos, report) = (TensorInfos::new(m.checkpoint()), m.report().into());
        gantry_placed {
            sha256: crate::sha256::Sha256Files::new(m.report()),
            _loaded: Loaded::Device(m),
            infos,
            shares,
            report,
        }
    }
}

/// The number of destinations.
///
/// # Safety
/// `placed` live; `count_out` writable.
#[no_mangle]
pub unsafe extern "C" fn gantry_placed_destinations(
    placed: *const gantry_placed,
    count_out: *mut usize,
) -> gantry_status {
    // SAFETY: per the contract.
    unsafe {
        error::get_into((placed, "placed"), (count_out, "count_out"), |placed| {
            Ok(placed.shares.len())
        })
    }
}

/// The number of shares destination `destination` holds.
///
/// # Safety
/// `placed` live; `count_out` writable.
#[no_mangle]
pub unsafe extern "C" fn gantry_placed_tensor_count(
    placed: *const gantry_placed,
    destination: usize,
    count_out: *mut usize,
) -> gantry_status {
    ffi_boundary(|| {
        // SAFETY: per the contract.
        let placed = unsafe { error::in_ref(placed, "placed")? };
        let out = error::out_ptr(count_out, "count_out")?;
        let n = placed.destination(destination)?.len();
        // SAFETY: checked non-NULL.
        unsafe { out.write(n) };
        Ok(())
    })
}

/// Share `position` (checkpoint order) of destination `destination`: `shape`, `ndim` and
/// `bytes` are the share's, `data` its address (host pointer or device pointer);
/// `file_offset` and `index` are the whole tensor's.
///
/// # Safety
/// `placed` live; `tensor_out` writable.
#[no_mangle]
pub unsafe extern "C" fn gantry_placed_tensor(
    placed: *const gantry_placed,
    destination: usize,
    position: usize,
    tensor_out: *mut gantry_tensor,
) -> gantry_status {
    ffi_boundary(|| {
        // SAFETY: per the contract.
        let placed = unsafe { error::in_ref(placed, "placed")? };
        let out = error::out_ptr(tensor_out, "tensor_out")?;
        let shares = placed.destination(destination)?;
        if position >= shares.len() {
            return Err(CallError::not_found(format!(
                "position {position} of {} shares on destination {destination}",
                shares.len()
            )));
        }
        // SAFETY: checked non-NULL.
        unsafe { out.write(placed.describe(destination, position)) };
        Ok(())
    })
}

/// Destination `destination`'s share of the tensor called `name` (matched exactly).
///
/// # Safety
/// `placed` live; `name` NUL-terminated; `tensor_out` writable.
#[no_mangle]
pub unsafe extern "C" fn gantry_placed_find(
    placed: *const gantry_placed,
    destination: usize,
    name: *const c_char,
    tensor_out: *mut gantry_tensor,
) -> gantry_status {
    ffi_boundary(|| {
        // SAFETY: per the contract.
        let placed = unsafe { error::in_ref(placed, "placed")? };
        // SAFETY: per the contract.
        let name = unsafe { error::in_str(name, "name")? };
        let out = error::out_ptr(tensor_out, "tensor_out")?;
        let shares = placed.destination(destination)?;
        // Shares are in checkpoint order; the name is matched exactly.
        let position = (placed.infos.position(name.as_bytes()))
            .and_then(|i| shares.binary_search_by_key(&i, |s| s.tensor).ok())
            .ok_or_else(|| {
                CallError::not_found(format!(
                    "no share of '{}' on destination {destination}",
                    crate::model::shown(name.as_bytes())
                ))
            })?;
        // SAFETY: checked non-NULL.
        unsafe { out.write(placed.describe(destination, position)) };
        Ok(())
    })
}

/// Figures of the load (bytes read count each byte once, whatever the destinations).
///
/// # Safety
/// `placed` live; `report_out` writable.
#[no_mangle]
pub unsafe extern "C" fn gantry_placed_report(
    placed: *const gantry_placed,
    report_out: *mut gantry_report,
) -> gantry_status {
    ffi_boundary(|| {
        // SAFETY: per the contract.
        let placed = unsafe { error::in_ref(placed, "placed")? };
        let out = error::out_ptr(report_out, "report_out")?;
        // SAFETY: checked non-NULL.
        unsafe { out.write(placed.report) };
        Ok(())
    })
}

/// Frees a placed checkpoint and the memory of its shares (NULL is ignored).
///
/// # Safety
/// `placed` NULL or live, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn gantry_placed_free(placed: *mut gantry_placed) {
    let _ = ffi_boundary(|| {
        if !placed.is_null() {
            // SAFETY: per the contract, freed once.
            drop(unsafe { Box::from_raw(placed) });
        }
        Ok(())
    });
}
