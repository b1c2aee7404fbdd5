//! Cooperative loads for servers that run one process per GPU (tensor parallelism under MPI
//! or their own launcher): the server passes the `ncclComm_t` of its tensor-parallel group,
//! the ranks split the checkpoint's reads and exchange them over it.

use std::ffi::{c_char, c_void};
use std::sync::Arc;

use engine::coop::Communicator;

use crate::error::{self, ffi_boundary, CallError};
use crate::placed::{gantry_placed, split_rule};
use crate::{gantry_loader, gantry_model, gantry_ready_fn, model};

/// What a cooperative load did on this rank.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct gantry_coop_report {
    /// 1 when the ranks split the reads and exchanged over NCCL, 0 when this rank read
    /// everything itself (no communicator, world size 1; the log says why).
    pub cooperative: i32,
    /// This rank.
    pub rank: i32,
    /// Ranks in the load.
    pub world: i32,
    /// Reserved, 0.
    pub reserved: i32,
    /// Bytes this rank read from storage.
    pub read_bytes: u64,
    /// Bytes of the pieces this rank read and broadcast to the others.
    pub owned_bytes: u64,
    /// Bytes this rank received from the others.
    pub received_bytes: u64,
}

/// Loads every tensor of `path` onto GPU `device` as rank `rank` of `world`, whole tensors on
/// every rank: each byte is read from storage by one rank and broadcast to the others over
/// `nccl_comm`, the server's `ncclComm_t` (its tensor-parallel group, on `device`, from the
/// same `libnccl.so.2` the process has loaded). With `nccl_comm` NULL each rank reads
/// everything itself. Every rank of the group must make this call with the same `path` and
/// loader settings; nothing else may be issued on the communicator until it returns. `ready`
/// (may be NULL) is told as each tensor is complete on this rank. When a rank fails, every
/// rank fails: that one with its own error, the others with `GANTRY_E_RANK` naming it, or
/// `GANTRY_E_NCCL` when it stopped answering for 120 s (the communicator is then aborted and
/// must not be used again). A communicator created non-blocking (`ncclConfig_t.blocking = 0`,
/// NCCL >= 2.14) keeps that bound everywhere; with a blocking one, NCCL's own host calls (the
/// first connection to a peer, the end of a group) can wait without limit for a peer that
/// died, until the server aborts the communicator from another thread. Figures go to
/// `*report_out` (may be NULL).
///
/// # Safety
/// `loader` live; `path` NUL-terminated; `nccl_comm` NULL or a live `ncclComm_t`; `ready`
/// follows its contract and does not unwind; `model_out` writable; `report_out` NULL or
/// writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn gantry_loader_load_cooperative(
    loader: *const gantry_loader,
    path: *const c_char,
    device: i32,
    nccl_comm: *mut c_void,
    rank: i32,
    world: i32,
    ready: gantry_ready_fn,
    user_data: *mut c_void,
    model_out: *mut *mut gantry_model,
    report_out: *mut gantry_coop_report,
) -> crate::gantry_status {
    ffi_boundary(|| {
        // SAFETY: per the contract.
        let loader = &unsafe { error::in_ref(loader, "loader")? }.loader;
        // SAFETY: per the contract.
        let path = unsafe { error::in_str(path, "path")? };
        let out = error::out_ptr(model_out, "model_out")?;
        let (rank, world) = rank_of(device, rank, world)?;
        // SAFETY: per the contract.
        let (gpu, checkpoint, comm) = unsafe { open_rank(loader, path, device, nccl_comm) }?;
        let infos = model::TensorInfos::new(&checkpoint);
        let coop = cooperation(comm.as_ref(), rank, world)?;
        let whole = |_: &engine::TensorEntry| {
            Ok((0..world).map(|r| (r, engine::placement::Share::Whole)).collect())
        };
        let done = loader.load_cooperative(checkpoint, &gpu, coop, whole, |r| {
            if let Some(ready) = ready {
                let info = infos.tensor(r.index, r.ptr);
                // SAFETY: the callback's contract; `info` is valid for the call.
                unsafe { ready(user_data, &info) };
            }
        })?;
        // SAFETY: NULL or writable, per the contract.
        unsafe { write_report(report_out, &done.coop) };
        // SAFETY: checked non-NULL.
        unsafe { out.write(Box::into_raw(Box::new(gantry_model::device(done.model)))) };
        Ok(())
    })
}

/// As `gantry_loader_load_cooperative`, but each rank keeps only its shares under `split` (a
/// `gantry_split`, over `world` ranks: `GANTRY_SPLIT_TP` is the tensor-parallel rule): the
/// ranks still read each byte once, and exchange a window of the checkpoint at a time
/// (2 GiB of scratch on each GPU beside its shares). The result is a `gantry_placed` with one
/// destination, this rank's GPU (`gantry_placed_tensor(placed, 0, i, ...)`).
///
/// # Safety
/// As `gantry_loader_load_cooperative`; `placed_out` writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn gantry_loader_load_cooperative_split(
    loader: *const gantry_loader,
    path: *const c_char,
    device: i32,
    nccl_comm: *mut c_void,
    rank: i32,
    world: i32,
    split: i32,
    placed_out: *mut *mut gantry_placed,
    report_out: *mut gantry_coop_report,
) -> crate::gantry_status {
    ffi_boundary(|| {
        // SAFETY: per the contract.
        let loader = &unsafe { error::in_ref(loader, "loader")? }.loader;
        // SAFETY: per the contract.
        let path = unsafe { error::in_str(path, "path")? };
        let out = error::out_ptr(placed_out, "placed_out")?;
        let (rank, world) = rank_of(device, rank, world)?;
        let rule = split_rule(split, world)?;
        // SAFETY: per the contract.
        let (gpu, checkpoint, comm) = unsafe { open_rank(loader, path, device, nccl_comm) }?;
        let coop = cooperation(comm.as_ref(), rank, world)?;
        let done = loader.load_cooperative_placed(checkpoint, &gpu, coop, rule, |_| {})?;
        // SAFETY: NULL or writable, per the contract.
        unsafe { write_report(report_out, &done.coop) };
        // SAFETY: checked non-NULL.
        unsafe { out.write(Box::into_raw(Box::new(gantry_placed::on_devices(done.model)))) };
        Ok(())
    })
}

/// The rank and world of a call, checked.
fn rank_of(device: i32, rank: i32, world: i32) -> Result<(usize, usize), CallError> {
    let max = engine::placement::DESTINATIONS_MAX;
    if device < 0 || rank < 0 || world < 1 || rank >= world || world as usize > max {
        return Err(CallError::invalid(format!(
            "device {device}, rank {rank} of {world}: a cooperative load needs a GPU and 0 <= rank < world <= {max}"
        )));
    }
    Ok((rank as usize, world as usize))
}

/// A rank's GPU `device` (checked by [`rank_of`]), the checkpoint at `path`, and the caller's
/// communicator (none for NULL).
///
/// # Safety
/// `nccl_comm` NULL or a live `ncclComm_t` of the process's `libnccl.so.2`.
unsafe fn open_rank(
    loader: &engine::Loader,
    path: &str,
    device: i32,
    nccl_comm: *mut c_void,
) -> Result<(Arc<engine::CudaDevice>, engine::Checkpoint, Option<Communicator>), CallError> {
    let gpu = engine::CudaDevice::open(device as u32)?;
    let checkpoint = engine::open_with(path, loader.config())?;
    if nccl_comm.is_null() {
        return Ok((gpu, checkpoint, None));
    }
    let nccl = engine::coop::load_nccl()
        .map_err(|reason| engine::Error::Unavailable { what: "NCCL", reason })?;
    // SAFETY: per the contract.
    let comm = unsafe { engine::coop::Communicator::from_raw(nccl, nccl_comm) }?;
    Ok((gpu, checkpoint, Some(comm)))
}

/// Rank `rank` of `world` over `comm`, or alone without one.
fn cooperation(
    comm: Option<&engine::coop::Communicator>,
    rank: usize,
    world: usize,
) -> Result<engine::coop::Cooperation<'_>, CallError> {
    let coop = match comm {
        Some(c) => engine::coop::Cooperation::nccl(c),
        None => engine::coop::Cooperation::alone(rank, world, "no communicator given"),
    };
    if (coop.rank, coop.world) != (rank, world) {
        return Err(CallError::invalid(format!(
            "the communicator is rank {} of {}, the call says rank {rank} of {world}",
            coop.rank, coop.world
        )));
    }
    Ok(coop)
}

/// Writes what the load did on this rank to `report_out`.
///
/// # Safety
/// `report_out` NULL or writable.
unsafe fn write_report(report_out: *mut gantry_coop_report, coop: &engine::coop::CoopReport) {
    // SAFETY: per the contract.
    if let Some(report) = unsafe { report_out.as_mut() } {
        *report = gantry_coop_report {
            cooperative: i32::from(coop.cooperative),
            rank: coop.rank as i32,
            world: coop.world as i32,
            reserved: 0,
            read_bytes: coop.read_bytes,
            owned_bytes: coop.owned_bytes,
            received_bytes: coop.received_bytes,
        };
    }
}
