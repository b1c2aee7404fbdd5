//! Host memory destinations: one allocation per file's data section (the default), or the
//! caller's own slice per tensor. This is how CI drives the whole pipeline without a GPU.
//!
//! Destinations are kept as raw pointers: readers write whole extents into them from several
//! threads while the consumer copies other extents' bytes into other tensors, and a tensor's
//! bytes are handed to the ready callback while the rest still load. Plain `&mut` borrows
//! cannot express that; the plan can: extents never overlap, and a tensor is read only after
//! all of its steps are done.

use std::sync::mpsc::Sender;

use gantry_format::Checkpoint;

use super::{RawTarget, Sink};
use crate::engine::read::Message;
use crate::engine::staging::Lease;
use crate::error::{Error, Result};
use crate::plan::{CopyStep, Extent};

pub use crate::cuda::host::{file_buffer_layout, HostBuffer};

/// Per-tensor raw destinations in host memory.
#[derive(Debug)]
pub struct HostSink {
    /// `(ptr, len)` of each tensor's destination; null for skipped tensors.
    tensors: Vec<(*mut u8, usize)>,
    /// Per file, when the destinations are the default ones: a page-aligned allocation
    /// holding the file from `file_start` (its data section rounded down to 4096) on, so that
    /// extents can be read straight into place, also with `O_DIRECT`.
    files: Vec<Option<FileBuffer>>,
}

#[derive(Debug, Clone, Copy)]
struct FileBuffer {
    base: *mut u8,
    file_start: u64,
    len: u64,
}

impl HostSink {
    /// Destinations inside one buffer per file laid out by [`file_buffer_layout`]; a buffer of
    /// another length (empty, for files with nothing wanted) gives that file no destinations.
    pub fn for_file_buffers(
        checkpoint: &Checkpoint,
        wanted: &[bool],
        buffers: &mut [HostBuffer],
    ) -> Self {
        let files: Vec<Option<FileBuffer>> = checkpoint
            .files
            .iter()
            .zip(buffers.iter_mut())
            .map(|(f, b)| {
                let (lead, len) = file_buffer_layout(f.header.data_offset, f.header.data_len);
                let file_start = f.header.data_offset - lead;
                (b.len() as u64 == len).then(|| FileBuffer {
                    base: b.as_mut_ptr(),
                    file_start,
                    len,
                })
            })
            .collect();
        let tensors = checkpoint
            .tensors
            .iter()
            .zip(wanted)
            .map(|(t, &w)| {
                if !w {
                    return (std::ptr::null_mut(), 0);
                }
                let fb = files[t.file.0].expect("a buffer for every file with a wanted tensor");
                // SAFETY: the header check guarantees the tensor lies inside the data section,
                // which the buffer covers from `file_start`.
                let ptr = unsafe { fb.base.add((t.offset - fb.file_start) as usize) };
                (ptr, t.len as usize)
            })
            .collect();
        Self { tensors, files }
    }

    /// Destinations the caller supplies per tensor; `None` skips the tensor. Each slice must
    /// be exactly the tensor's length.
    pub fn for_slices(checkpoint: &Checkpoint, targets: Vec<Option<&mut [u8]>>) -> Result<Self> {
        let mut tensors = Vec::with_capacity(targets.len());
        for (t, target) in checkpoint.tensors.iter().zip(targets) {
            match target {
                Some(s) if s.len() as u64 != t.len => {
                    return Err(Error::Destination {
                        tensor: t.name.clone(),
                        message: format!("slice is {} bytes, the tensor is {}", s.len(), t.len),
                    })
                }
                Some(s) => tensors.push((s.as_mut_ptr(), s.len())),
                None => tensors.push((std::ptr::null_mut(), 0)),
            }
        }
        Ok(Self { tensors, files: vec![None; checkpoint.files.len()] })
    }

    /// Which tensors have a destination.
    pub fn wanted(&self) -> Vec<bool> {
        self.tensors.iter().map(|(p, _)| !p.is_null()).collect()
    }

    /// Read access to the destinations, for handing landed tensors to the caller while the
    /// load goes on.
    pub fn views(&self) -> LandedViews {
        LandedViews { tensors: self.tensors.iter().map(|&(p, l)| (p.cast_const(), l)).collect() }
    }
}

/// Raw read access to each tensor's destination.
#[derive(Debug)]
pub struct LandedViews {
    tensors: Vec<(*const u8, usize)>,
}

impl LandedViews {
    /// The bytes of tensor `index`.
    ///
    /// # Safety
    /// All of the tensor's copy steps must have completed (nothing writes these bytes any
    /// more), and the destination must still be alive.
    pub unsafe fn bytes(&self, index: usize) -> &[u8] {
        let (ptr, len) = self.tensors[index];
        if ptr.is_null() {
            return &[];
        }
        // SAFETY: per the contract.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

impl Sink for HostSink {
    fn direct_target(
        &mut self,
        extent: &Extent,
        steps: &[CopyStep],
        align: u64,
    ) -> Option<RawTarget> {
        let len = extent.len.next_multiple_of(align);
        if let Some(fb) = self.files[extent.file.0] {
            let inside =
                extent.offset >= fb.file_start && extent.offset + len <= fb.file_start + fb.len;
            if !inside || (extent.offset - fb.file_start) % align != 0 {
                return None;
            }
            // SAFETY: inside the file buffer, checked just above.
            let ptr = unsafe { fb.base.add((extent.offset - fb.file_start) as usize) };
            return (ptr as u64 % align == 0).then_some(RawTarget { ptr, len: len as usize });
        }
        match steps {
            [s] if s.len == extent.len && len == extent.len => {
                let (ptr, _) = self.tensors[s.tensor];
                // SAFETY: the step lies inside the tensor, whose destination is its full length.
                let ptr = unsafe { ptr.add(s.target_offset as usize) };
                (ptr as u64 % align == 0).then_some(RawTarget { ptr, len: len as usize })
            }
            _ => None,
        }
    }

    fn deliver(
        &mut self,
        _extent: usize,
        steps: &[CopyStep],
        lease: Lease,
        _landed: &Sender<Result<Message>>,
    ) -> Result<bool> {
        let source = lease.as_slice();
        let bytes = steps.iter().map(|s| s.len).sum();
        let _span = crate::trace::span("copy", "host copy").args(|a| a.u64("bytes", bytes));
        for s in steps {
            let (ptr, len) = self.tensors[s.tensor];
            assert!(!ptr.is_null());
            // SAFETY: the tensor's destination is `len` bytes at `ptr`, which no reader writes
            // (only extents with a direct target are written by readers, and this one was
            // staged), and it cannot overlap the staging buffer.
            unsafe { copy_step(source, s, ptr, len as u64) };
        }
        Ok(true)
    }
}

/// Copies step `s` of a staged extent (`source`) into the `len` bytes at `ptr` that take its
/// tensor; panics if the step does not fit there.
///
/// # Safety
/// `ptr..ptr + len` is writable, written by nobody else during the call, and does not overlap
/// `source`.
unsafe fn copy_step(source: &[u8], s: &CopyStep, ptr: *mut u8, len: u64) {
    assert!(s.target_offset + s.len <= len);
    let bytes = &source[s.source_offset as usize..(s.source_offset + s.len) as usize];
    // SAFETY: inside `len` bytes at `ptr` (asserted), per the contract.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            ptr.add(s.target_offset as usize),
            bytes.len(),
        )
    };
}

/// Destinations of a placed load ([`crate::plan::placement::Layout`]): one buffer per destination,
/// each atom copied to every place that takes its bytes.
#[derive(Debug)]
pub struct PlacedSink {
    places: Vec<Vec<crate::plan::placement::Place>>,
}

impl PlacedSink {
    /// Over `buffers`, one per destination, each at least `layout.buffer_bytes` long.
    pub fn new(layout: &crate::plan::placement::Layout, buffers: &mut [HostBuffer]) -> Self {
        assert_eq!(buffers.len(), layout.buffer_bytes.len());
        for (b, &need) in buffers.iter().zip(&layout.buffer_bytes) {
            assert!(b.len() as u64 >= need, "a destination buffer is too small");
        }
        let bases: Vec<u64> = buffers.iter_mut().map(|b| b.as_mut_ptr() as u64).collect();
        Self { places: layout.places(&bases) }
    }
}

impl Sink for PlacedSink {
    fn direct_target(&mut self, _: &Extent, _: &[CopyStep], _: u64) -> Option<RawTarget> {
        None
    }

    fn deliver(
        &mut self,
        _extent: usize,
        steps: &[CopyStep],
        lease: Lease,
        _landed: &Sender<Result<Message>>,
    ) -> Result<bool> {
        let source = lease.as_slice();
        let total: u64 = steps.iter().map(|s| s.len * self.places[s.tensor].len() as u64).sum();
        let _span = crate::trace::span("copy", "host copy").args(|a| a.u64("bytes", total));
        for s in steps {
            let bytes = &source[s.source_offset as usize..(s.source_offset + s.len) as usize];
            for p in &self.places[s.tensor] {
                for piece in p.rows.pieces(s.target_offset, s.len) {
                    // SAFETY: each place's rows are packed inside its share, which lies inside
                    // its destination's buffer (Layout::buffer_bytes, checked in `new`);
                    // shares never overlap and no reader writes these buffers directly.
                    unsafe { copy_piece(bytes, &piece, p.addr as *mut u8, p.rows.len()) };
                }
            }
        }
        Ok(true)
    }
}

/// Copies `piece` of `source` (the bytes of one copy step) row by row into the `len` bytes at
/// `ptr` (a share); panics if the piece does not fit there.
///
/// # Safety
/// `ptr..ptr + len` is writable, written by nobody else during the call, and does not overlap
/// `source`.
unsafe fn copy_piece(source: &[u8], piece: &crate::plan::placement::Piece, ptr: *mut u8, len: u64) {
    assert!(piece.dest + piece.len() <= len, "a piece past its share");
    let width = piece.width as usize;
    for r in 0..piece.rows {
        let from = (piece.source + r * piece.source_pitch) as usize;
        let row = &source[from..from + width];
        // SAFETY: inside `len` bytes at `ptr` (asserted), per the contract.
        unsafe {
            std::ptr::copy_nonoverlapping(
                row.as_ptr(),
                ptr.add((piece.dest + r * piece.width) as usize),
                width,
            )
        };
    }
}
