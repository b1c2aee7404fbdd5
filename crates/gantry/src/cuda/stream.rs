//! Streams, events and the copies queued on them: the one place the engine's sinks, the
//! cooperative exchange and the baselines reach the driver's asynchronous calls, so that each
//! call's error and each handle's release are written once.
//!
//! A [`Stream`] or [`Event`] belongs to the context current when it was made; every method,
//! and the drop, needs that context current on the calling thread (the owners bind their
//! device first, as they did around the raw calls).

use std::ffi::c_void;

use cudarc::driver::{result, sys};

use super::driver::{cuda_error, CudaDevice};
use crate::error::Result;

/// A non-blocking stream of the context current when it was made. Dropping it destroys it
/// without waiting (the driver releases it once its work is done): owners that must wait for
/// its copies first call [`Stream::synchronize`].
#[derive(Debug)]
pub(crate) struct Stream(sys::CUstream);

// SAFETY: a stream handle may be used from any thread with its context current, which every
// owner arranges (see the module's note).
unsafe impl Send for Stream {}

impl Stream {
    /// A new non-blocking stream in the current context.
    pub(crate) fn new() -> Result<Self> {
        result::stream::create(result::stream::StreamKind::NonBlocking)
            .map(Self)
            .map_err(cuda_error("cuStreamCreate"))
    }

    /// A new stream in the current context that waits, as the legacy default stream does,
    /// for work queued before it on the default stream and on other blocking streams (a
    /// caller's pending writes to a destination land first), and they for it.
    pub(crate) fn blocking() -> Result<Self> {
        result::stream::create(result::stream::StreamKind::Default)
            .map(Self)
            .map_err(cuda_error("cuStreamCreate"))
    }

    /// The handle, for libraries that take a `cudaStream_t` (NCCL).
    pub(crate) fn as_ptr(&self) -> *mut c_void {
        self.0.cast()
    }

    /// Waits for everything queued so far; `what` names the work in the error.
    pub(crate) fn synchronize(&self, what: &str) -> Result<()> {
        // SAFETY: a live stream of the current context (see the module's note).
        unsafe { result::stream::synchronize(self.0) }
            .map_err(cuda_error(format!("cuStreamSynchronize ({what})")))
    }

    /// Makes work queued on this stream from now on wait for `event`.
    pub(crate) fn wait_for(&self, event: &Event) -> Result<()> {
        // SAFETY: a recorded event and a stream, both live; the stream's context is current.
        unsafe { sys::cuStreamWaitEvent(self.0, event.0, 0) }
            .result()
            .map_err(cuda_error("cuStreamWaitEvent"))
    }

    /// Queues the copy of `bytes` (host memory) to device address `dest`, in the stream's
    /// order. From pageable memory the driver stages the bytes before it returns.
    ///
    /// # Safety
    /// `bytes` is pageable, or page-locked and untouched until the stream has passed the copy;
    /// the `bytes.len()` bytes at `dest` are device memory of the stream's context that nothing
    /// else writes meanwhile.
    pub(crate) unsafe fn copy_from_host(&self, dest: u64, bytes: &[u8]) -> Result<()> {
        // SAFETY: per the contract.
        unsafe { result::memcpy_htod_async(dest, bytes, self.0) }
            .map_err(cuda_error("cuMemcpyHtoDAsync"))
    }

    /// Queues a copy of `len` bytes from `source` on GPU `from` to `dest` on GPU `to`: a
    /// device-to-device copy on one GPU, a peer copy between two.
    ///
    /// # Safety
    /// Both ranges are device memory of their GPUs, the source complete before the stream
    /// reaches the copy, the destination written by nothing else meanwhile; the stream is
    /// `to`'s, its context current.
    pub(crate) unsafe fn copy_device(
        &self,
        from: &CudaDevice,
        source: u64,
        to: &CudaDevice,
        dest: u64,
        len: u64,
    ) -> Result<()> {
        let rc = if from.ordinal() == to.ordinal() {
            // SAFETY: per the contract.
            unsafe { sys::cuMemcpyDtoDAsync_v2(dest, source, len as usize, self.0) }
        } else {
            // SAFETY: per the contract; the contexts are retained by the devices.
            unsafe {
                sys::cuMemcpyPeerAsync(dest, to.raw().1, source, from.raw().1, len as usize, self.0)
            }
        };
        rc.result().map_err(cuda_error(format!(
            "copying {len} bytes cuda:{} -> cuda:{}",
            from.ordinal(),
            to.ordinal()
        )))
    }

    /// Queues a copy of `len` bytes from device address `source` to `dest`, either of them
    /// memory of this context or mapped into it from any GPU of the host (unified
    /// addressing: the driver routes a peer's memory over NVLink or PCIe).
    ///
    /// # Safety
    /// Both ranges are device memory mapped in the stream's context (current), the source
    /// complete and the destination written by nothing else until the stream has passed the
    /// copy.
    pub(crate) unsafe fn copy_mapped(&self, dest: u64, source: u64, len: u64) -> Result<()> {
        // SAFETY: per the contract.
        unsafe { sys::cuMemcpyAsync(dest, source, len as usize, self.0) }
            .result()
            .map_err(cuda_error(format!("cuMemcpyAsync of {len} bytes {source:#x} -> {dest:#x}")))
    }

    /// The raw handle, for the copies of [`super::copy`].
    pub(super) fn raw(&self) -> sys::CUstream {
        self.0
    }
}

/// Waits for a stream's work when dropped: for copies that read or write memory freed after
/// it, on every way out of the code that queued them, a panic included.
#[derive(Debug)]
pub(crate) struct WaitOnDrop<'a>(pub(crate) &'a Stream);

impl Drop for WaitOnDrop<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.synchronize("copies still queued on the way out") {
            log::warn!("{e}");
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: destroyed once; the driver defers the release until its work is done.
        unsafe { result::stream::destroy(self.0) }.ok();
    }
}

/// An event recorded on a stream, without timing; destroyed on drop (the driver keeps it
/// until the waits on it are done).
#[derive(Debug)]
pub(crate) struct Event(sys::CUevent);

// SAFETY: as for `Stream`: used only with its context current on the using thread.
unsafe impl Send for Event {}

impl Event {
    /// An event recorded after everything queued on `stream` so far.
    pub(crate) fn record(stream: &Stream) -> Result<Self> {
        let event = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map(Self)
            .map_err(cuda_error("cuEventCreate"))?;
        // SAFETY: event and stream belong to the current context; on failure the event,
        // never recorded, is destroyed by its drop.
        unsafe { result::event::record(event.0, stream.0) }.map_err(cuda_error("cuEventRecord"))?;
        Ok(event)
    }

    /// Waits until the work before the event is done.
    pub(crate) fn synchronize(&self) -> Result<()> {
        // SAFETY: a recorded event of the current context.
        unsafe { result::event::synchronize(self.0) }.map_err(cuda_error("cuEventSynchronize"))
    }

    /// Whether the work before the event is done (`Ok(false)`: not yet), without waiting.
    pub(crate) fn is_done(&self) -> Result<bool> {
        // SAFETY: a recorded event of the current context.
        match unsafe { result::event::query(self.0) } {
            Ok(()) => Ok(true),
            Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_NOT_READY => Ok(false),
            Err(e) => Err(cuda_error("cuEventQuery")(e)),
        }
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: destroyed once.
        unsafe { result::event::destroy(self.0) }.ok();
    }
}
