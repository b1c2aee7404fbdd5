//! The one rule for copying rows to device memory, shared by the sinks (staged host bytes to
//! a GPU) and cooperative shares (an exchange window to a rank's buffer): a single row, or
//! rows further apart than the driver's pitch limit, go as one plain copy per row; a block of
//! strided rows goes as one `cuMemcpy2DAsync`, which the copy engine walks at full speed.

use cudarc::driver::sys;

use super::driver::cuda_error;
use super::stream::Stream;
use crate::error::Result;

/// Largest pitch handed to `cuMemcpy2DAsync` (the driver's `MAX_PITCH` is 2^31 - 1 on every
/// current GPU); rows further apart than this are copied one by one (they are then long).
pub const PITCH_BYTES_MAX: u64 = (1 << 31) - 1;

/// Where a copy reads from: page-locked host memory or device memory.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Source2d {
    Host(*const u8),
    Device(u64),
}

impl Source2d {
    /// The same memory `bytes` further on.
    fn at(self, bytes: u64) -> Self {
        match self {
            // A pointer within the rows the caller vouched for (see `copy_rows`).
            Source2d::Host(p) => Source2d::Host(p.wrapping_add(bytes as usize)),
            Source2d::Device(p) => Source2d::Device(p + bytes),
        }
    }
}

/// Rows to copy: `count` rows of `width` bytes, `pitch` apart from `source`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rows {
    pub(crate) source: Source2d,
    pub(crate) pitch: u64,
    pub(crate) width: u64,
    pub(crate) count: u64,
}

/// Queues the copy of `rows`, packed at device address `dest`, on `stream`: one plain copy per
/// row when there is one row or the pitch passes [`PITCH_BYTES_MAX`], else one 2-D copy.
///
/// # Safety
/// The rows are readable (page-locked host memory, or device memory of the stream's context)
/// until the stream has passed the copy; the `count * width` bytes at `dest` are device
/// memory of the stream's (current) context that nothing else writes meanwhile.
pub(crate) unsafe fn copy_rows(rows: Rows, dest: u64, stream: &Stream) -> Result<()> {
    let stream = stream.raw();
    let Rows { source, pitch, width, count } = rows;
    if count == 1 || pitch > PITCH_BYTES_MAX {
        for r in 0..count {
            let (from, to) = (source.at(r * pitch), dest + r * width);
            let rc = match from {
                // SAFETY: per the contract: row `r` lies in the readable rows.
                Source2d::Host(p) => unsafe {
                    sys::cuMemcpyHtoDAsync_v2(to, p.cast(), width as usize, stream)
                },
                // SAFETY: as above.
                Source2d::Device(p) => unsafe {
                    sys::cuMemcpyDtoDAsync_v2(to, p, width as usize, stream)
                },
            };
            let op = match from {
                Source2d::Host(_) => "cuMemcpyHtoDAsync",
                Source2d::Device(_) => "cuMemcpyDtoDAsync",
            };
            rc.result().map_err(cuda_error(op))?;
        }
        return Ok(());
    }
    // SAFETY: per the contract; the pitch is within the driver's limit (checked above).
    unsafe { copy_2d(rows, dest, stream) }
}

/// Queues one `cuMemcpy2DAsync` of `rows`, packed at device address `dest`, on `stream`.
///
/// # Safety
/// As [`copy_rows`], and the pitch is at most [`PITCH_BYTES_MAX`].
unsafe fn copy_2d(rows: Rows, dest: u64, stream: sys::CUstream) -> Result<()> {
    let Rows { source, pitch, width, count } = rows;
    let (kind, host, device) = match source {
        Source2d::Host(p) => (sys::CUmemorytype::CU_MEMORYTYPE_HOST, p.cast(), 0),
        Source2d::Device(p) => (sys::CUmemorytype::CU_MEMORYTYPE_DEVICE, std::ptr::null(), p),
    };
    let copy = sys::CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: kind,
        srcHost: host,
        srcDevice: device,
        srcArray: std::ptr::null_mut(),
        srcPitch: pitch as usize,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        dstHost: std::ptr::null_mut(),
        dstDevice: dest,
        dstArray: std::ptr::null_mut(),
        dstPitch: width as usize,
        WidthInBytes: width as usize,
        Height: count as usize,
    };
    // SAFETY: per the contract; the struct lives for the call.
    unsafe { sys::cuMemcpy2DAsync_v2(&copy, stream) }
        .result()
        .map_err(cuda_error(format!("cuMemcpy2DAsync ({count} rows of {width} bytes)")))
}
