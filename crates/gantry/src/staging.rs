//! The staging ring: one anonymous mapping, allocated once, cut into equal buffers that are
//! handed out as leases.
//!
//! A lease is the only way to touch a buffer: the reader holds it while the kernel fills the
//! buffer, the consumer holds it while copying out, and dropping it puts the buffer back on
//! the free list. So a buffer goes back to the ring only when both its completion and its
//! consumer are done, and no two parties ever see the same buffer at once (glommio's
//! `UringBufferAllocator` works the same way).
//!
//! The mapping is page aligned, so every buffer is aligned for `O_DIRECT` when the buffer size
//! is a multiple of 4096. It is anonymous memory rather than `cuMemHostAlloc` so that io_uring
//! can register it as fixed buffers and CUDA can page-lock the same pages.

use std::ptr::NonNull;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};

/// An anonymous mapping of `count` buffers of `buffer_bytes` each.
#[derive(Debug)]
pub struct Arena {
    base: NonNull<u8>,
    buffer_bytes: usize,
    count: usize,
}

// SAFETY: the arena is plain memory; access to each buffer is arbitrated by leases.
unsafe impl Send for Arena {}
// SAFETY: as above; `&Arena` only gives out addresses, never references to the bytes.
unsafe impl Sync for Arena {}

impl Arena {
    /// Maps `count` buffers of `buffer_bytes` (a multiple of the page size).
    pub fn new(buffer_bytes: usize, count: usize) -> Result<Self> {
        assert!(buffer_bytes > 0 && buffer_bytes % 4096 == 0 && count > 0);
        let len = buffer_bytes.checked_mul(count).expect("staging size overflows");
        // SAFETY: an anonymous private mapping with no address hint has no preconditions.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            let source = std::io::Error::last_os_error();
            return Err(Error::Resource { what: "mapping the staging ring", source });
        }
        let base = NonNull::new(ptr.cast()).expect("mmap returned null");
        Ok(Self { base, buffer_bytes, count })
    }

    /// Bytes per buffer.
    pub fn buffer_bytes(&self) -> usize {
        self.buffer_bytes
    }

    /// Number of buffers.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Total bytes mapped.
    pub fn len(&self) -> usize {
        self.buffer_bytes * self.count
    }

    /// Always false: an arena holds at least one buffer.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Address of the first byte of the mapping.
    pub fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Address of buffer `index`.
    pub fn buffer_ptr(&self, index: usize) -> *mut u8 {
        assert!(index < self.count);
        // SAFETY: index < count, so the offset stays inside the mapping.
        unsafe { self.base.as_ptr().add(index * self.buffer_bytes) }
    }

    /// One iovec per buffer, for io_uring's fixed-buffer registration.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.count)
            .map(|i| libc::iovec {
                iov_base: self.buffer_ptr(i).cast(),
                iov_len: self.buffer_bytes,
            })
            .collect()
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: base/len are the mapping made in `new`; no lease outlives the pool that
        // holds an `Arc<Arena>`.
        if unsafe { libc::munmap(self.base.as_ptr().cast(), self.len()) } != 0 {
            log::warn!("munmap of the staging ring failed: {}", std::io::Error::last_os_error());
        }
    }
}

/// Free list of an arena's buffers, shared by readers and consumers.
#[derive(Debug)]
pub struct Pool {
    arena: Arc<Arena>,
    state: Mutex<PoolState>,
    returned: Condvar,
}

#[derive(Debug)]
struct PoolState {
    free: Vec<usize>,
    closed: bool,
}

impl Pool {
    /// A pool over every buffer of `arena`.
    pub fn new(arena: Arc<Arena>) -> Arc<Self> {
        let free = (0..arena.count()).rev().collect();
        Arc::new(Self {
            arena,
            state: Mutex::new(PoolState { free, closed: false }),
            returned: Condvar::new(),
        })
    }

    /// The arena behind the pool.
    pub fn arena(&self) -> &Arc<Arena> {
        &self.arena
    }

    /// A free buffer, waiting for one to come back; `None` once the pool is closed.
    pub fn acquire(self: &Arc<Self>) -> Option<Lease> {
        let mut state = self.state.lock();
        loop {
            if state.closed {
                return None;
            }
            if let Some(index) = state.free.pop() {
                return Some(Lease { pool: Arc::clone(self), index });
            }
            self.returned.wait(&mut state);
        }
    }

    /// A free buffer if there is one now.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Lease> {
        let mut state = self.state.lock();
        if state.closed {
            return None;
        }
        state.free.pop().map(|index| Lease { pool: Arc::clone(self), index })
    }

    /// Wakes every waiter and makes later acquires return `None` (used on error).
    pub fn close(&self) {
        self.state.lock().closed = true;
        self.returned.notify_all();
    }

    fn release(&self, index: usize) {
        self.state.lock().free.push(index);
        self.returned.notify_one();
    }
}

/// Exclusive use of one staging buffer until dropped.
#[derive(Debug)]
pub struct Lease {
    pool: Arc<Pool>,
    index: usize,
}

impl Lease {
    /// The buffer's position in the arena (its io_uring fixed-buffer index).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Address of the buffer, to hand to the kernel or the device.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.pool.arena.buffer_ptr(self.index)
    }

    /// Bytes the buffer holds.
    pub fn capacity(&self) -> usize {
        self.pool.arena.buffer_bytes()
    }

    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the lease is the only handle to this buffer, so nothing writes it while the
        // returned borrow of `self` lives; the memory is mapped for the pool's lifetime.
        unsafe {
            std::slice::from_raw_parts(self.pool.arena.buffer_ptr(self.index), self.capacity())
        }
    }

    /// The buffer's bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), self.capacity()) }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.release(self.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_exclusive_and_come_back() {
        let pool = Pool::new(Arc::new(Arena::new(4096, 2).unwrap()));
        let mut a = pool.acquire().unwrap();
        let b = pool.try_acquire().unwrap();
        assert_ne!(a.index(), b.index());
        assert!(pool.try_acquire().is_none());
        a.as_mut_slice()[0] = 7;
        assert_eq!(a.as_slice()[0], 7);
        assert_eq!(a.as_mut_ptr() as usize % 4096, 0);
        drop(b);
        assert!(pool.try_acquire().is_some());
        pool.close();
        assert!(pool.acquire().is_none());
    }
}
