//! Reference readers that benchmarks measure gantry against, in the same run: the disk
//! ceiling (plain `O_DIRECT` `pread` with large requests, a few in flight) and the page-cache
//! ceiling (many threads of buffered `pread` into a preallocated, pre-faulted buffer), and the
//! SHA-256 ceiling a verified load is held to (every core hashing a stream of its own). They
//! are deliberately simple, so that a ratio to them says how much of the hardware gantry uses.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crate::engine::staging::Arena;
use crate::source::probe;

/// One measured read.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// Bytes read.
    pub bytes: u64,
    /// Seconds taken.
    pub seconds: f64,
}

impl Measured {
    /// GB/s (10^9).
    pub fn gb_per_s(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e9
    }
}

/// Reads `paths` whole with `O_DIRECT` `pread` requests of `request_bytes`, one in flight on
/// each of `threads` threads, blocks handed out round robin across the files (the first block
/// of each file, then the second of each...), so that every file, and every volume under
/// them, is in flight at once.
pub fn read_direct(
    paths: &[&Path],
    request_bytes: usize,
    threads: usize,
) -> std::io::Result<Measured> {
    let files: Vec<(File, u64)> = paths
        .iter()
        .map(|p| {
            let (file, _) = probe::open_direct(p).map_err(std::io::Error::other)?;
            let len = file.metadata()?.len();
            Ok((file, len))
        })
        .collect::<std::io::Result<_>>()?;
    let request = request_bytes as u64;
    let most = files.iter().map(|(_, len)| len.div_ceil(request)).max().unwrap_or(0);
    let blocks: Vec<(usize, u64)> = (0..most)
        .flat_map(|b| {
            files
                .iter()
                .enumerate()
                .filter(move |(_, (_, len))| b < len.div_ceil(request))
                .map(move |(f, _)| (f, b * request))
        })
        .collect();
    let arena = Arena::new(request_bytes * threads, None).map_err(std::io::Error::other)?;
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    let bytes: std::io::Result<u64> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (files, blocks, next, arena) = (&files, &blocks, &next, &arena);
                // SAFETY: each thread uses only its own slice `t` of the arena, which outlives the
                // scope.
                let buf = unsafe {
                    std::slice::from_raw_parts_mut(
                        arena.base().add(t * request_bytes),
                        request_bytes,
                    )
                };
                s.spawn(move || {
                    let mut total = 0u64;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(f, offset)) = blocks.get(i) else {
                            return Ok(total);
                        };
                        total += files[f].0.read_at(buf, offset)? as u64;
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("reader thread")).sum()
    });
    Ok(Measured { bytes: bytes?, seconds: start.elapsed().as_secs_f64() })
}

/// The object-storage ceiling: every object of `paths` fetched whole with ranged GETs, as
/// [`crate::source::object::fetch_whole`] does, timed.
pub fn object_ceiling(paths: &[&Path], config: &crate::Config) -> crate::Result<Measured> {
    let start = Instant::now();
    let bytes = crate::source::object::fetch_whole(paths, config)?;
    Ok(Measured { bytes, seconds: start.elapsed().as_secs_f64() })
}

/// Files opened with buffers of their size, allocated and written once so that no page fault
/// is left for the timed read.
#[derive(Debug)]
pub struct Prefaulted {
    files: Vec<(File, Vec<u8>)>,
}

impl Prefaulted {
    /// Opens `paths` and pre-faults a buffer for each.
    pub fn new(paths: &[&Path]) -> std::io::Result<Self> {
        let files = paths
            .iter()
            .map(|p| {
                let file = File::open(p)?;
                let len = file.metadata()?.len() as usize;
                Ok((file, vec![1u8; len]))
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Self { files })
    }

    /// Reads every file whole into its buffer with `threads` threads of buffered `pread`,
    /// `chunk_bytes` at a time.
    pub fn read(&mut self, threads: usize, chunk_bytes: usize) -> std::io::Result<Measured> {
        let mut jobs: Vec<(&File, u64, &mut [u8])> = Vec::new();
        for (file, buf) in &mut self.files {
            let mut offset = 0u64;
            for chunk in buf.chunks_mut(chunk_bytes) {
                let len = chunk.len() as u64;
                jobs.push((&*file, offset, chunk));
                offset += len;
            }
        }
        let queue = parking_lot::Mutex::new(jobs.into_iter());
        let start = Instant::now();
        let bytes: std::io::Result<u64> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    let queue = &queue;
                    s.spawn(move || {
                        let mut total = 0u64;
                        loop {
                            let Some((file, offset, buf)) = queue.lock().next() else {
                                return Ok(total);
                            };
                            file.read_exact_at(buf, offset)?;
                            total += buf.len() as u64;
                        }
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().expect("reader thread")).sum()
        });
        Ok(Measured { bytes: bytes?, seconds: start.elapsed().as_secs_f64() })
    }
}

/// Reads every file of `paths` once through a small buffer, so that they are in the page
/// cache without this process holding their bytes.
pub fn warm(paths: &[&Path]) -> std::io::Result<()> {
    use std::io::Read;
    let mut buf = vec![0u8; 16 << 20];
    for p in paths {
        let mut f = File::open(p)?;
        while f.read(&mut buf)? > 0 {}
    }
    Ok(())
}

/// Drops every file of `paths` from the page cache.
pub fn evict(paths: &[&Path]) -> std::io::Result<()> {
    for p in paths {
        probe::evict(&File::open(p)?)?;
    }
    Ok(())
}

/// The pinned host-to-device ceiling: `total_bytes` copied from page-locked host memory to
/// device memory in 64 MiB pieces over 4 streams, timed after a warm-up copy.
pub fn pinned_h2d(
    device: &std::sync::Arc<crate::CudaDevice>,
    total_bytes: usize,
) -> crate::Result<Measured> {
    use crate::cuda::stream::{Stream, WaitOnDrop};
    const PIECE: usize = 64 << 20;
    let buffer_bytes = 1 << 30;
    // The device's context is current for the streams and copies below, and the caller's
    // again when this returns.
    let _bound = device.bind_scoped()?;
    let arena = std::sync::Arc::new(Arena::new(buffer_bytes, device.numa_node())?);
    let _pinned = crate::cuda::PinnedHost::new(std::sync::Arc::clone(&arena), device)?;
    let target = device.alloc(buffer_bytes, "the host-to-device ceiling")?;
    let streams: Vec<Stream> = (0..4).map(|_| Stream::new()).collect::<crate::Result<_>>()?;
    // Every way out, an error included, waits for the copies before the buffers go.
    let _waited: Vec<WaitOnDrop<'_>> = streams.iter().map(WaitOnDrop).collect();
    // SAFETY: the arena is mapped and page-locked for `buffer_bytes`; nothing else uses it.
    let source = unsafe { std::slice::from_raw_parts(arena.base(), buffer_bytes) };
    let copy = |bytes: usize| -> crate::Result<()> {
        for (i, offset) in (0..bytes).step_by(PIECE).enumerate() {
            let o = offset % buffer_bytes;
            let n = PIECE.min(bytes - offset).min(buffer_bytes - o);
            // SAFETY: source and target ranges lie inside their buffers; the source is
            // page-locked and untouched until the streams are waited for below.
            unsafe { streams[i % 4].copy_from_host(target.ptr() + o as u64, &source[o..o + n]) }?;
        }
        for s in &streams {
            s.synchronize("the host-to-device ceiling")?;
        }
        Ok(())
    };
    copy(buffer_bytes)?;
    let start = Instant::now();
    copy(total_bytes)?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(Measured { bytes: total_bytes as u64, seconds })
}

/// Bytes of the buffer each thread of [`sha256_all_cores`] hashes over and over: larger than a
/// core's caches, as a hashing lane reads extents from the staging ring, not from its cache.
pub const SHA256_BUFFER_BYTES: usize = 64 << 20;

/// The SHA-256 ceiling: `threads` (at least one) independent SHA-256 streams, one per thread (as a verified
/// load's hashing lanes run, one per core up to
/// [`HASH_THREADS_MAX`](crate::integrity::HASH_THREADS_MAX)), together hashing about
/// `total_bytes` of in-memory data with the code a load hashes with
/// ([`crate::integrity::implementation`]), timed from a common start to the last stream's end.
/// Each thread hashes a pre-faulted buffer of its own ([`SHA256_BUFFER_BYTES`] at most) again
/// and again, so no I/O and no page fault is timed.
pub fn sha256_all_cores(total_bytes: u64, threads: usize) -> Measured {
    use sha2::{Digest as _, Sha256};
    let threads = threads.max(1);
    let share = total_bytes.div_ceil(threads as u64).max(1 << 20);
    let buffer_bytes = usize::try_from(share).unwrap_or(usize::MAX).min(SHA256_BUFFER_BYTES);
    let start = std::sync::Barrier::new(threads + 1);
    let (bytes, seconds) = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let start = &start;
                s.spawn(move || {
                    // Pseudo-random bytes (never all equal), written once: pre-faulted.
                    let buffer: Vec<u8> = (0..buffer_bytes)
                        .map(|i| {
                            ((i as u64 ^ t as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
                        })
                        .collect();
                    start.wait();
                    let mut hasher = Sha256::new();
                    let mut left = share;
                    while left > 0 {
                        let n = left.min(buffer_bytes as u64) as usize;
                        hasher.update(&buffer[..n]);
                        left -= n as u64;
                    }
                    std::hint::black_box(hasher.finalize());
                    share
                })
            })
            .collect();
        start.wait();
        let timer = Instant::now();
        let bytes: u64 = workers.into_iter().map(|w| w.join().expect("hashing thread")).sum();
        (bytes, timer.elapsed().as_secs_f64())
    });
    Measured { bytes, seconds }
}
