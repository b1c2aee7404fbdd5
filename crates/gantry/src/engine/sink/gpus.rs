//! The GPUs of a CUDA sink: each destination's streams and allocation, set up one thread per
//! destination so that contexts, allocations and streams of several GPUs come up side by side
//! (and while the loader opens files and reads the first extents); peer access between them
//! for replicated bytes; and the copy calls a staged piece needs (one 2-D copy for a block of
//! strided rows, a peer copy for a relay).

use std::sync::Arc;
use std::thread::JoinHandle;

use crate::cuda::copy::{copy_rows, Rows, Source2d};
use crate::cuda::stream::Stream;
use crate::cuda::{CudaDevice, DeviceBuffer};
use crate::error::{Error, Result};
use crate::plan::placement::Piece;

/// Copy streams per GPU: enough to keep both copy engines busy while events are polled.
pub(crate) const STREAMS: usize = 4;

/// A destination GPU of a sink and its copy streams (destroyed on drop, after waiting).
pub(crate) struct Gpu {
    pub(crate) device: Arc<CudaDevice>,
    pub(crate) streams: Vec<Stream>,
    pub(crate) next_stream: usize,
}

impl Gpu {
    /// `STREAMS` non-blocking streams on `device` (bound on this thread).
    pub(crate) fn new(device: &Arc<CudaDevice>) -> Result<Gpu> {
        device.bind()?;
        let mut gpu = Gpu { device: Arc::clone(device), streams: Vec::new(), next_stream: 0 };
        for _ in 0..STREAMS {
            gpu.streams.push(Stream::new()?); // pushed at once: Drop destroys what was made
        }
        Ok(gpu)
    }

    /// The position of the next stream in turn.
    pub(crate) fn take_stream(&mut self) -> usize {
        let stream = self.next_stream;
        self.next_stream = (self.next_stream + 1) % self.streams.len();
        stream
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let _ = self.device.bind();
        for s in self.streams.drain(..) {
            // Every copy on it is waited for, then it is destroyed (its drop).
            s.synchronize("a GPU's copy stream").ok();
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
            can[a][b] = da.ordinal() == db.ordinal() || da.enable_peer_access(db);
        }
    }
    can
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
    stream: &Stream,
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
