//! The memory the parts of copies wait in for their disk: [`PENDING_BYTES_MAX`] bytes in
//! slabs of [`SLAB_BYTES`], mapped once per process and reused.
//!
//! The GETs once handed a part to its copy as the HTTP client's own body buffers, kept until
//! the part was whole and then until the copy's thread had written them: up to a part per GET
//! in flight (16 x 16-32 MiB) that the client could not reuse, so its reads landed in freshly
//! allocated memory whose every page was faulted in and zeroed on the connections' workers
//! (a first load of 1 GiB with a cache took 90-150 thousand page faults, nearly all of them in
//! `recv`, against 6 thousand without one). Now a GET copies its part, once whole, from where
//! it landed into slabs of this pool (one `memcpy` of bytes still in the CPU's caches), and
//! the client's buffers are reused at once; the slabs are faulted in once and then reused from
//! part to part and load to load. When no copy is being written and every slab is back, their
//! pages are given back to the system (the mapping stays, untouched).

use std::ptr::NonNull;

use parking_lot::Mutex;

/// Bytes of parts received but not yet written to their copies, across every copy of the
/// process: what the cache may hold in memory while the disk catches up. A part that finds
/// no room is fetched again behind the load (see the writer's note).
pub const PENDING_BYTES_MAX: usize = 256 << 20;

/// Bytes per slab: a part takes whole slabs, so small enough that a short part (an object's
/// last) wastes little. The pool is one mapping with transparent huge pages requested, so it
/// faults in whole 2 MiB pages whatever the slab size.
pub const SLAB_BYTES: usize = 256 << 10;

const SLABS: usize = PENDING_BYTES_MAX / SLAB_BYTES;

/// A pool's state: the mapping (made on first use), the free slabs, and the copies alive.
struct State {
    base: Option<NonNull<u8>>,
    /// The mapping could not be made (said once): every part is missed.
    unmapped: bool,
    free: Vec<usize>,
    copies: usize,
}

// SAFETY: the pool hands out disjoint slabs of its mapping; the pointer itself is only an
// address.
unsafe impl Send for State {}

/// A pool of [`SLABS`] slabs (the process has one, [`PENDING`]).
pub struct Pool(Mutex<State>);

/// The process's pending memory.
pub static PENDING: Pool = Pool::new();

/// One slab of a pool holding `len` bytes of a part; back in its pool when dropped.
pub struct Slab {
    pool: &'static Pool,
    index: usize,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a slab is the only handle to its bytes until it is dropped.
unsafe impl Send for Slab {}

impl AsRef<[u8]> for Slab {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` is the start of this slab's `SLAB_BYTES` (>= len), written by
        // `copy_in` before the slab was handed out, and no one else holds it.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        let mut state = self.pool.0.lock();
        state.free.push(self.index);
        release_if_idle(&mut state);
    }
}

/// A copy counted as alive (see [`Pool::copy_alive`]).
pub struct CopyAlive(&'static Pool);

impl Drop for CopyAlive {
    fn drop(&mut self) {
        let mut state = self.0 .0.lock();
        state.copies -= 1;
        release_if_idle(&mut state);
    }
}

/// With no copy alive and every slab back, the pages go back to the system.
fn release_if_idle(state: &mut State) {
    if let (0, Some(base)) = (state.copies, state.base) {
        if state.free.len() == SLABS {
            // SAFETY: the pool's own mapping, none of it handed out: dropping its pages
            // loses no one's bytes (they read as zeros when next faulted in).
            unsafe { libc::madvise(base.as_ptr().cast(), PENDING_BYTES_MAX, libc::MADV_DONTNEED) };
        }
    }
}

impl Pool {
    pub const fn new() -> Self {
        Self(Mutex::new(State { base: None, unmapped: false, free: Vec::new(), copies: 0 }))
    }

    /// Counts a copy as alive while the returned guard lives: the pool keeps its pages
    /// while any copy may still ask for slabs.
    pub fn copy_alive(&'static self) -> CopyAlive {
        self.0.lock().copies += 1;
        CopyAlive(self)
    }

    /// Free slabs.
    #[cfg(test)]
    fn free_slabs(&self) -> usize {
        let state = self.0.lock();
        if state.base.is_some() {
            state.free.len()
        } else {
            SLABS
        }
    }

    /// Copies `chunks` (`len` bytes in all) into slabs of the pool, as `Bytes` that go back to
    /// the pool when dropped; `None` when the pool has too few free slabs (or cannot be
    /// mapped).
    pub fn copy_in<B: AsRef<[u8]>>(
        &'static self,
        chunks: &[B],
        len: usize,
    ) -> Option<Vec<bytes::Bytes>> {
        let want = len.div_ceil(SLAB_BYTES);
        let slabs: Vec<(usize, NonNull<u8>)> = {
            let mut state = self.0.lock();
            let base = match state.base {
                Some(base) => base,
                None if state.unmapped => return None,
                None => {
                    let mapped = crate::engine::staging::map_anonymous(
                        PENDING_BYTES_MAX,
                        "mapping the cache's pending memory",
                    );
                    let base = match mapped {
                        Ok(base) => base,
                        Err(e) => {
                            log::warn!(
                                "cache: {e}; every copy of this process is fetched again behind its load"
                            );
                            state.unmapped = true;
                            return None;
                        }
                    };
                    state.base = Some(base);
                    state.free = (0..SLABS).rev().collect();
                    base
                }
            };
            if state.free.len() < want {
                return None;
            }
            let at = state.free.len() - want;
            state
                .free
                .drain(at..)
                .map(|i| {
                    // SAFETY: slab `i` lies inside the pool's mapping of SLABS slabs.
                    (i, unsafe { NonNull::new_unchecked(base.as_ptr().add(i * SLAB_BYTES)) })
                })
                .collect()
        };
        let mut source = chunks.iter().flat_map(|c| c.as_ref().chunks(SLAB_BYTES)).peekable();
        let mut out = Vec::with_capacity(want);
        for (index, ptr) in slabs {
            let mut filled = 0;
            while let Some(piece) = source.peek_mut() {
                let n = piece.len().min(SLAB_BYTES - filled);
                // SAFETY: the slab is ours alone (taken from the free list), `filled + n` is
                // at most SLAB_BYTES, and `piece` is borrowed from the caller's chunks.
                unsafe {
                    std::ptr::copy_nonoverlapping(piece.as_ptr(), ptr.as_ptr().add(filled), n)
                };
                filled += n;
                *piece = &piece[n..];
                if piece.is_empty() {
                    source.next();
                }
                if filled == SLAB_BYTES {
                    break;
                }
            }
            out.push(bytes::Bytes::from_owner(Slab { pool: self, index, ptr, len: filled }));
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes come out as they went in, across chunk and slab boundaries; the slabs go back
    /// when dropped, a part larger than the free slabs is refused, not waited for, and with
    /// no copy alive the pool gives its pages back.
    #[test]
    fn parts_copy_into_slabs_and_the_slabs_come_back() {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new()));
        let alive = pool.copy_alive();
        let data: Vec<u8> = (0..5 * SLAB_BYTES + 12_345).map(|i| (i * 31 % 251) as u8).collect();
        let chunks: Vec<bytes::Bytes> =
            data.chunks(SLAB_BYTES / 3 + 17).map(bytes::Bytes::copy_from_slice).collect();
        let out = pool.copy_in(&chunks, data.len()).expect("room");
        assert_eq!(out.len(), 6);
        assert_eq!(pool.free_slabs(), SLABS - 6);
        let joined: Vec<u8> = out.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(joined, data);
        drop(out);
        assert_eq!(pool.free_slabs(), SLABS);
        let held = pool.copy_in(&chunks, data.len()).unwrap();
        let all = vec![bytes::Bytes::from(vec![7u8; PENDING_BYTES_MAX])];
        assert!(pool.copy_in(&all, PENDING_BYTES_MAX).is_none(), "refused while 6 slabs are out");
        drop(held);
        let whole = pool.copy_in(&all, PENDING_BYTES_MAX).expect("every slab free again");
        let base = pool.0.lock().base.unwrap().as_ptr() as usize;
        drop(whole);
        let resident = |base: usize| {
            let mut pages = vec![0u8; PENDING_BYTES_MAX / 4096];
            // SAFETY: the pool's live mapping; a byte per page.
            let rc = unsafe {
                libc::mincore(base as *mut libc::c_void, PENDING_BYTES_MAX, pages.as_mut_ptr())
            };
            assert_eq!(rc, 0);
            pages.iter().filter(|&&p| p & 1 == 1).count()
        };
        assert!(resident(base) > 0, "a copy is still alive: the pages are kept");
        drop(alive);
        assert_eq!(resident(base), 0, "no copy alive: the pages went back");
    }
}
