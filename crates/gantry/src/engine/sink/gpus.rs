//! The GPUs of a CUDA sink: each destination's streams and allocation, set up one thread per
//! destination so that contexts, allocations and streams of several GPUs come up side by side
//! (and while the loader opens files and reads the first extents); peer access between them
//! for replicated bytes; and the copy calls a staged piece needs (one 2-D copy for a block of
//! strided rows, a peer copy for a relay).

use std::sync::Arc;
use std::thread::JoinHandle;

use cudarc::driver::{result, sys};

use crate::cuda::copy::{copy_rows, Rows, Source2d};
use crate::cuda::driver::{cuda_error, CudaDevice, DeviceBuffer};
use crate::error::{Error, Result};
use crate::plan::placement::Piece;

/// Copy streams per GPU: enough to keep both copy engines busy while events are polled.
pub(crate) const STREAMS: usize = 4;

/// A destination GPU of a sink and its copy streams (destroyed on drop, after waiting).
pub(crate) struct Gpu {
    pub(crate) device: Arc<CudaDevice>,
    pub(crate) streams: Vec<sys::CUstream>,
    pub(crate) next_stream: usize,
}

// SAFETY: streams are used only with their context current on the using thread (`bind`).
unsafe impl Send for Gpu {}

impl Gpu {
    /// `STREAMS` non-blocking streams on `device` (bound on this thread).
    pub(crate) fn new(device: &Arc<CudaDevice>) -> Result<Gpu> {
        device.bind()?;
        let mut gpu = Gpu { device: Arc::clone(device), streams: Vec::new(), next_stream: 0 };
        for _ in 0..STREAMS {
            let s = result::stream::create(result::stream::StreamKind::NonBlocking)
                .map_err(cuda_error("cuStreamCreate"))?;
            gpu.streams.push(s); // pushed at once: Drop destroys what was created so far
        }
        Ok(gpu)
    }

    /// The next stream in turn.
    pub(crate) fn take_stream(&mut self) -> sys::CUstream {
        let stream = self.streams[self.next_stream];
        self.next_stream = (self.next_stream + 1) % self.streams.len();
        stream
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let _ = self.device.bind();
        for &s in &self.streams {
            // SAFETY: a stream of this context; every copy on it is waited for, then it is
            // destroyed once.
            unsafe { result::stream::synchronize(s) }.ok();
            // SAFETY: as above.
            unsafe { result::stream::destroy(s) }.ok();
        }
    }
}

/// What one destination's set-up thread made: its streams and its allocation.
pub(crate) type Made = (Gpu, DeviceBuffer);

/// Per-destination set-up running on its own threads.
pub(crate) struct Setup {
    threads: Vec<JoinHandle<Result<Made>>>,
}

impl Setup {
    /// Starts one thread per destination `d`: streams on `devices[d]` and `bytes[d]` of device
    /// memory there.
    pub(crate) fn start(devices: &[Arc<CudaDevice>], bytes: &[u64]) -> Result<Setup> {
        assert_eq!(devices.len(), bytes.len());
        let mut setup = Setup { threads: Vec::with_capacity(devices.len()) };
        for (d, (device, &n)) in devices.iter().zip(bytes).enumerate() {
            let device = Arc::clone(device);
            let thread = std::thread::Builder::new()
                .name(format!("gantry-gpu-{d}"))
                .spawn(move || {
                    let gpu = Gpu::new(&device)?;
                    let buffer = device.alloc(n as usize, &format!("placed destination {d}"))?;
                    Ok((gpu, buffer))
                })
                .map_err(|source| Error::Resource { what: "spawning a GPU set-up thread", source });
            match thread {
                Ok(t) => setup.threads.push(t),
                Err(e) => {
                    drop(setup.finish()); // wait for the threads started, free what they made
                    return Err(e);
                }
            }
        }
        Ok(setup)
    }

    /// Waits for every thread; the first error wins (what the others made is freed).
    pub(crate) fn finish(self) -> Result<Vec<Made>> {
        let mut made = Vec::with_capacity(self.threads.len());
        let mut failure = None;
        for t in self.threads {
            match t.join() {
                Ok(Ok(m)) => made.push(m),
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(_) => {
                    failure =
                        failure.or(Some(Error::Internal("a GPU set-up thread panicked".into())))
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(made),
        }
    }
}

/// Which destinations can relay bytes to which: `can[a][b]` when a device-to-device copy
/// from destination `a` to `b` does not pass through host memory (the same GPU, or peer
/// access enabled between the two). Enables peer access where the driver allows it.
pub(crate) fn enable_peers(gpus: &[Gpu]) -> Vec<Vec<bool>> {
    let n = gpus.len();
    let mut can = vec![vec![false; n]; n];
    for a in 0..n {
        for b in 0..n {
            let (da, db) = (&gpus[a].device, &gpus[b].device);
            can[a][b] = da.ordinal() == db.ordinal() || peer_access(da, db);
        }
    }
    can
}

/// Enables access from `from`'s context to `to`'s memory; whether it is on.
fn peer_access(from: &CudaDevice, to: &CudaDevice) -> bool {
    let (from_dev, _) = from.raw();
    let (to_dev, to_ctx) = to.raw();
    let mut can = 0;
    // SAFETY: valid device handles, an out pointer to a local.
    let rc = unsafe { sys::cuDeviceCanAccessPeer(&mut can, from_dev, to_dev) };
    if rc != sys::cudaError_enum::CUDA_SUCCESS || can == 0 || from.bind().is_err() {
        log::debug!("no peer access cuda:{} -> cuda:{}", from.ordinal(), to.ordinal());
        return false;
    }
    // SAFETY: `to_ctx` is a retained primary context; `from`'s context is current.
    let rc = unsafe { sys::cuCtxEnablePeerAccess(to_ctx, 0) };
    let on = matches!(
        rc,
        sys::cudaError_enum::CUDA_SUCCESS
            | sys::cudaError_enum::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED
    );
    if !on {
        log::debug!(
            "enabling peer access cuda:{} -> cuda:{}: {rc:?}",
            from.ordinal(),
            to.ordinal()
        );
    }
    on
}

/// Queues the host-to-device copy of `piece` of `source` (a copy step's staged bytes) to
/// device address `dest` on `stream` (one plain copy for a row, one 2-D copy for a block of
/// rows: [`copy_rows`]).
///
/// # Safety
/// `source` is page-locked and stays untouched until the stream has passed this copy; the
/// `piece.len()` bytes at `dest` are device memory of the stream's (current) context that
/// nothing else writes meanwhile.
pub(crate) unsafe fn copy_piece(
    source: &[u8],
    piece: &Piece,
    dest: u64,
    stream: sys::CUstream,
) -> Result<()> {
    let last = piece.source + (piece.rows - 1) * piece.source_pitch + piece.width;
    assert!(last <= source.len() as u64, "a piece past its staged bytes");
    let rows = Rows {
        source: Source2d::Host(source[piece.source as usize..].as_ptr()),
        pitch: piece.source_pitch,
        width: piece.width,
        count: piece.rows,
    };
    // SAFETY: the source rows lie inside `source` (asserted), the destination is
    // `piece.len()` bytes at `dest` per the contract.
    unsafe { copy_rows(rows, dest, stream) }
}

/// Queues a device-to-device copy of `len` bytes from `source` on `from` to `dest` on `to`, on
/// `stream` (of `to`'s context, current).
///
/// # Safety
/// Both ranges are device memory of their GPUs, the source complete before the stream reaches
/// the copy (an event waited for), the destination written by nothing else meanwhile.
pub(crate) unsafe fn relay(
    from: &CudaDevice,
    source: u64,
    to: &CudaDevice,
    dest: u64,
    len: u64,
    stream: sys::CUstream,
) -> Result<()> {
    let rc = if from.ordinal() == to.ordinal() {
        // SAFETY: per the contract.
        unsafe { sys::cuMemcpyDtoDAsync_v2(dest, source, len as usize, stream) }
    } else {
        // SAFETY: per the contract; the contexts are retained by the devices.
        unsafe {
            sys::cuMemcpyPeerAsync(dest, to.raw().1, source, from.raw().1, len as usize, stream)
        }
    };
    rc.result().map_err(cuda_error(format!(
        "copying {len} bytes cuda:{} -> cuda:{}",
        from.ordinal(),
        to.ordinal()
    )))
}
