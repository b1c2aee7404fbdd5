//! Where bytes land. A sink receives each staged extent with its copy steps on the consumer
//! thread, and may offer readers a place to write an extent directly.

pub mod cuda;
pub(crate) mod gpus;
pub mod host;

use std::sync::mpsc::Sender;

use crate::engine::read::Message;
pub use crate::engine::read::RawTarget;
use crate::engine::staging::Lease;
use crate::error::Result;
use crate::plan::{CopyStep, Extent};

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

    /// Waits until every copy of a delivered extent has completed and every lease passed to
    /// [`Sink::deliver`] has been dropped. A failed load calls it before it returns (and so
    /// before the loader's staging lock is released), so that no later load unpins or reuses
    /// staging memory a copy is still reading.
    fn settle(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Error, Loader, PathChoice};

    /// Holds every lease it is given, as the CUDA sink's poller does while copies are in
    /// flight, and fails the second delivery, as a CUDA error would.
    #[derive(Default)]
    struct HoldingSink {
        held: Vec<Lease>,
        delivered: usize,
    }

    impl Sink for HoldingSink {
        fn direct_target(&mut self, _: &Extent, _: &[CopyStep], _: u64) -> Option<RawTarget> {
            None
        }

        fn deliver(
            &mut self,
            _: usize,
            _: &[CopyStep],
            lease: Lease,
            _: &Sender<Result<Message>>,
        ) -> Result<bool> {
            self.delivered += 1;
            if self.delivered == 2 {
                return Err(Error::Config("a copy failed".into()));
            }
            self.held.push(lease);
            Ok(false)
        }

        fn settle(&mut self) {
            self.held.clear();
        }
    }

    #[test]
    fn a_failed_load_returns_only_after_the_sink_let_go_of_its_leases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let tensors = [("a".to_owned(), vec![8192]), ("b".to_owned(), vec![8192])];
        crate::tools::synth::write_shard(&path, &tensors, &mut 3).unwrap();
        let checkpoint = crate::open(&path).unwrap();
        let config = Config::default()
            .path(PathChoice::Buffered)
            .chunk_bytes(4096)
            .buffered_chunk_bytes(4096)
            .staging_bytes(4 * 4096)
            .threads(1);
        let loader = Loader::new(config).unwrap();
        let mut sink = HoldingSink::default();
        let wanted = vec![true; checkpoint.tensors.len()];
        let err =
            loader.run_tensors(&checkpoint, &wanted, &mut sink, None, &mut |_| {}).unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err}");
        assert_eq!(sink.delivered, 2);
        assert!(sink.held.is_empty(), "the load returned while the sink still held staging");
    }
}
