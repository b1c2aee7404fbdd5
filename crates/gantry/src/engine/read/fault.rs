//! Fault injection for the readers' completion handling (TigerBeetle's `storage.zig` idea).
//!
//! Every reader (`uring`, `buffered`, `gds` and `object`) passes every read result through
//! the injector before acting on it, so a test can turn a real result into a short read,
//! `EINTR`, `EAGAIN`, `EIO` or an early end of file at a chosen offset and watch the real
//! pipeline deal with it. A result is what one request returned: a `pread`, an io_uring
//! completion, a `cuFileRead`, or one body chunk of a ranged GET.

use std::fmt;

/// Rewrites read results. `result` is bytes read (>= 0) or a negated errno.
pub trait FaultInjector: Send + Sync {
    /// Called for every completed read of `len` bytes at `offset` of file `file` (its position
    /// in the checkpoint); returns the result the reader should act on.
    fn rewrite(&self, file: usize, offset: u64, len: u64, result: i64) -> i64;
}

impl fmt::Debug for dyn FaultInjector + '_ {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FaultInjector")
    }
}
