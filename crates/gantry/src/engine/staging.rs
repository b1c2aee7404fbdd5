//! The staging ring: one anonymous mapping, allocated once, cut into equal buffers that are
//! handed out as leases.
//!
//! The arena is one mapping, allocated once per loader (and page-locked once for CUDA); each
//! load cuts it into slots of its own size (large for cold reads, smaller for page-cache
//! reads) as a [`Pool`].
//!
//! A lease is the only way to touch a buffer: the reader holds it while the kernel fills the
//! buffer, the consumer holds it while copying out, and dropping it puts the buffer back on
//! the free list. So a buffer goes back to the ring only when both its completion and its
//! consumer are done, and no two parties ever see the same buffer at once (glommio's
//! `UringBufferAllocator` works the same way).
//!
//! A lease whose buffer the kernel may still write (a read that could not be waited for) is
//! leaked with [`Lease::leak`]: its slot never goes back, and its arena is poisoned, so the
//! loader maps a new one for the next load instead of cutting the old one into a new pool
//! whose slots would overlap the leaked one. The poisoned mapping is never unmapped.
//!
//! The mapping is page aligned, so every buffer is aligned for `O_DIRECT` when the buffer size
//! is a multiple of 4096. It is anonymous memory rather than `cuMemHostAlloc` so that io_uring
//! can register it as fixed buffers and CUDA can page-lock the same pages.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};

/// Maps `len` bytes of private anonymous memory (page aligned, zeroed, untouched), with
/// transparent huge pages requested: 2 MiB pages mean 512x fewer faults and TLB misses.
/// `what` names the mapping in errors.
pub fn map_anonymous(len: usize, what: &'static str) -> Result<NonNull<u8>> {
    // SAFETY: an anonymous private mapping with no address hint has no preconditions.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(Error::Resource { what, source: std::io::Error::last_os_error() });
    }
    if len >= 2 << 20 {
        // SAFETY: advice on the mapping just made; failure only loses the hint.
        unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
    }
    Ok(NonNull::new(ptr.cast()).expect("mmap returned null"))
}

/// One anonymous mapping, allocated once and reused by every load of a loader.
#[derive(Debug)]
pub struct Arena {
    base: NonNull<u8>,
    len: usize,
    /// A lease of it was leaked: the kernel may still write into it.
    poisoned: AtomicBool,
}

// SAFETY: the arena is plain memory; access to each slot is arbitrated by leases.
unsafe impl Send for Arena {}
// SAFETY: as above; `&Arena` only gives out addresses, never references to the bytes.
unsafe impl Sync for Arena {}

impl Arena {
    /// Maps `len` bytes (a multiple of the page size), bound to NUMA node `node` when given,
    /// and touches every page so that no load pays for a page fault in it.
    pub fn new(len: usize, node: Option<u32>) -> Result<Self> {
        assert!(len > 0 && len % 4096 == 0);
        let base = map_anonymous(len, "mapping the staging ring")?;
        let arena = Self { base, len, poisoned: AtomicBool::new(false) };
        if let Some(node) = node {
            // SAFETY: the mapping made above, not yet touched.
            unsafe { crate::engine::topology::bind_to_node(arena.base(), len, node) };
        }
        for page in (0..len).step_by(4096) {
            // SAFETY: inside the mapping, which nothing else uses yet.
            unsafe { arena.base().add(page).write_volatile(0) };
        }
        Ok(arena)
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: an arena holds at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Address of the first byte of the mapping.
    pub fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Whether a lease of the arena was leaked ([`Lease::leak`]): no later load may use it.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        if self.is_poisoned() {
            log::warn!("keeping a poisoned staging ring of {} bytes mapped", self.len);
            return;
        }
        // SAFETY: base/len are the mapping made in `new`; no lease outlives the pool that
        // holds an `Arc<Arena>`.
        if unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) } != 0 {
            log::warn!("munmap of the staging ring failed: {}", std::io::Error::last_os_error());
        }
    }
}

/// An arena cut into equal slots for one load, with their free list.
#[derive(Debug)]
pub struct Pool {
    arena: Arc<Arena>,
    slot_bytes: usize,
    count: usize,
    state: Mutex<PoolState>,
    returned: Condvar,
}

#[derive(Debug)]
struct PoolState {
    free: Vec<usize>,
    closed: bool,
}

impl Pool {
    /// `count` slots of `slot_bytes` (a multiple of 4096) from the start of `arena`.
    pub fn new(arena: Arc<Arena>, slot_bytes: usize, count: usize) -> Arc<Self> {
        assert!(slot_bytes > 0 && slot_bytes % 4096 == 0 && count > 0);
        assert!(slot_bytes.checked_mul(count).is_some_and(|n| n <= arena.len()));
        let free = (0..count).rev().collect();
        let state = Mutex::new(PoolState { free, closed: false });
        Arc::new(Self { arena, slot_bytes, count, state, returned: Condvar::new() })
    }

    /// The arena behind the pool.
    pub fn arena(&self) -> &Arc<Arena> {
        &self.arena
    }

    /// Bytes per slot.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Number of slots.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Bytes of the arena the slots use.
    pub fn used_bytes(&self) -> usize {
        self.slot_bytes * self.count
    }

    /// Address of slot `index`.
    pub fn slot_ptr(&self, index: usize) -> *mut u8 {
        assert!(index < self.count);
        // SAFETY: index < count and count * slot_bytes <= arena length (checked in `new`).
        unsafe { self.arena.base().add(index * self.slot_bytes) }
    }

    /// One iovec per slot, for io_uring's fixed-buffer registration.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.count)
            .map(|i| libc::iovec { iov_base: self.slot_ptr(i).cast(), iov_len: self.slot_bytes })
            .collect()
    }

    /// A free slot, waiting for one to come back; `None` once the pool is closed.
    pub fn acquire(self: &Arc<Self>) -> Option<Lease> {
        let mut state = self.state.lock();
        loop {
            if state.closed {
                return None;
            }
            if let Some(index) = state.free.pop() {
                self.traced(&state);
                return Some(Lease { pool: Arc::clone(self), index });
            }
            self.returned.wait(&mut state);
        }
    }

    /// A free slot if there is one now.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Lease> {
        let mut state = self.state.lock();
        if state.closed {
            return None;
        }
        let index = state.free.pop()?;
        self.traced(&state);
        Some(Lease { pool: Arc::clone(self), index })
    }

    /// Slots in use, on the load's timeline (nothing when the thread records nothing).
    fn traced(&self, state: &PoolState) {
        crate::trace::counter(
            "staging",
            "staging slots in use",
            (self.count - state.free.len()) as u64,
        );
    }

    /// Wakes every waiter and makes later acquires return `None` (used on error).
    pub fn close(&self) {
        self.state.lock().closed = true;
        self.returned.notify_all();
    }

    fn release(&self, index: usize) {
        let mut state = self.state.lock();
        state.free.push(index);
        self.traced(&state);
        drop(state);
        self.returned.notify_one();
    }
}

/// Exclusive use of one staging slot until dropped.
#[derive(Debug)]
pub struct Lease {
    pool: Arc<Pool>,
    index: usize,
}

impl Lease {
    /// The slot's position in the pool (its io_uring fixed-buffer index).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Address of the slot, to hand to the kernel or the device.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.pool.slot_ptr(self.index)
    }

    /// Bytes the slot holds.
    pub fn capacity(&self) -> usize {
        self.pool.slot_bytes
    }

    /// The slot's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the lease is the only handle to this slot, so nothing writes it while the
        // returned borrow of `self` lives; the memory is mapped for the pool's lifetime.
        unsafe { std::slice::from_raw_parts(self.pool.slot_ptr(self.index), self.capacity()) }
    }

    /// The slot's bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), self.capacity()) }
    }
}

impl Lease {
    /// Gives the slot up for good, for when the kernel may still write into it (a read that
    /// could not be waited for): it never goes back to the free list, and its arena is
    /// poisoned, so no later load hands out its memory again, and it stays mapped.
    pub fn leak(self) {
        self.pool.arena.poisoned.store(true, Ordering::Release);
        // Keeps the pool, and so the arena's mapping, alive for good.
        std::mem::forget(self);
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
        let pool = Pool::new(Arc::new(Arena::new(3 * 4096, None).unwrap()), 4096, 2);
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

    #[test]
    fn a_leaked_lease_poisons_its_arena_and_keeps_it_mapped() {
        let arena = Arc::new(Arena::new(2 * 4096, None).unwrap());
        let pool = Pool::new(Arc::clone(&arena), 4096, 2);
        let mut lease = pool.acquire().unwrap();
        let leaked = lease.as_mut_ptr();
        let other = pool.acquire().unwrap();
        assert!(!arena.is_poisoned());
        lease.leak();
        assert!(arena.is_poisoned());
        drop(other);
        // The leaked slot never comes back; the other does.
        assert_ne!(pool.try_acquire().unwrap().as_mut_ptr(), leaked);
        drop(pool);
        // The leaked lease holds the pool, so the mapping outlives every other handle.
        assert_eq!(Arc::strong_count(&arena), 2);
        // SAFETY: the leaked slot is still mapped (the write stands for the kernel's).
        unsafe { leaked.write_volatile(1) };
    }
}
