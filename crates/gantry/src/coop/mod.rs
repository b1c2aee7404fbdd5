//! Cooperative loads for one process per GPU: the ranks of a tensor-parallel group split the
//! reads of a checkpoint between them (every byte read from storage once across the ranks)
//! and exchange what they read over NVLink with NCCL.

mod agree;
pub mod comm;
mod contract;
mod load;
pub(crate) mod placed;
mod rounds;
pub(crate) mod split;

pub use comm::{load_nccl, Communicator, UniqueId};
pub use contract::{CoopReport, Cooperation, Link, WINDOW_BYTES};
pub use load::CooperativeModel;
pub use nccl_sys::Nccl;
pub use placed::CooperativePlacedModel;
pub use split::PIECE_BYTES;
