//! Host memory gantry owns: page-aligned anonymous mappings with transparent huge pages,
//! used for host destinations and by the readers' probes.

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use crate::error::Result;

/// Page-aligned host memory for one file's data section, from an anonymous mapping with
/// transparent huge pages requested: a 16 GB load into 4 KiB pages takes four million page
/// faults, into 2 MiB pages eight thousand.
#[derive(Debug)]
pub struct HostBuffer {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain owned memory.
unsafe impl Send for HostBuffer {}
// SAFETY: shared access is read-only through `Deref`.
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    /// `len` zeroed bytes (no memory is touched until written).
    pub fn new(len: usize) -> Result<Self> {
        if len == 0 {
            return Ok(Self { ptr: NonNull::dangling(), len: 0 });
        }
        let ptr = crate::engine::staging::map_anonymous(
            len,
            "allocating host memory for a data section",
        )?;
        Ok(Self { ptr, len })
    }
}

impl Deref for HostBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr/len describe memory this buffer owns (or a dangling pointer with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for HostBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        if self.len > 0 && unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) } != 0 {
            log::warn!("munmap of a host buffer failed: {}", std::io::Error::last_os_error());
        }
    }
}

/// Alignment of the file offset at which a file buffer starts.
pub const FILE_BUFFER_ALIGN: u64 = 4096;

/// For a data section at `data_offset` of `data_len` bytes: where its bytes start in a file
/// buffer (`lead`), and the buffer's length, a multiple of 4096 covering the data section.
pub fn file_buffer_layout(data_offset: u64, data_len: u64) -> (u64, u64) {
    let lead = data_offset % FILE_BUFFER_ALIGN;
    (lead, (lead + data_len).next_multiple_of(FILE_BUFFER_ALIGN))
}
