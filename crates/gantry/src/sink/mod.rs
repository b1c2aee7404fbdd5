//! Where bytes land. A sink receives each staged extent with its copy steps on the consumer
//! thread, and may offer readers a place to write an extent directly.

pub mod host;

use std::sync::mpsc::Sender;

use crate::error::Result;
use crate::io::Message;
use crate::plan::{CopyStep, Extent};
use crate::staging::Lease;

/// A raw destination a reader writes one whole extent into.
#[derive(Debug, Clone, Copy)]
pub struct RawTarget {
    /// First byte.
    pub ptr: *mut u8,
    /// Bytes; equal to the extent's length.
    pub len: usize,
}

// SAFETY: a target is handed to exactly one reader thread, which is the only writer of those
// bytes until it reports the extent done.
unsafe impl Send for RawTarget {}

/// A destination for the bytes of a load.
pub trait Sink {
    /// Where a buffered reader may write `extent` directly, if its bytes have one contiguous
    /// destination. Each extent is asked for at most once; targets of different extents never
    /// overlap.
    fn direct_target(&mut self, extent: &Extent, steps: &[CopyStep]) -> Option<RawTarget>;

    /// Carries out the copy steps of a staged extent, whose bytes start at the lease's first
    /// byte. Returns `true` when the copies are complete on return; `false` when the sink will
    /// send `Message::Landed` on `landed` once they are (and drop the lease then).
    fn deliver(
        &mut self,
        extent: usize,
        steps: &[CopyStep],
        lease: Lease,
        landed: &Sender<Result<Message>>,
    ) -> Result<bool>;
}
