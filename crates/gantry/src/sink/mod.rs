//! Where bytes land. A sink receives each staged extent with its copy steps on the consumer
//! thread, and may offer readers a place to write an extent directly.

pub mod cuda;
mod gpus;
pub mod host;

use std::sync::mpsc::Sender;

use crate::error::Result;
use crate::io::Message;
pub use crate::io::RawTarget;
use crate::plan::{CopyStep, Extent};
use crate::staging::Lease;

/// A destination for the bytes of a load.
pub trait Sink {
    /// Where a reader may write `extent` directly, if its bytes have one contiguous
    /// destination that can take `extent.len` rounded up to `align` bytes at an address
    /// aligned to `align`. Each extent is asked for at most once; targets of different
    /// extents never overlap.
    fn direct_target(
        &mut self,
        extent: &Extent,
        steps: &[CopyStep],
        align: u64,
    ) -> Option<RawTarget>;

    /// Whether readers may write device memory themselves (cuFile): every wanted tensor has
    /// one destination, given by [`Sink::device_pointer`].
    fn device_reads(&self) -> bool {
        false
    }

    /// The device address of tensor `tensor`'s destination, for readers that write device
    /// memory themselves (cuFile); `None` for host sinks.
    fn device_pointer(&self, _tensor: usize) -> Option<u64> {
        None
    }

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
