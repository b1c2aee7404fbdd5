//! What to read and where it goes, decided before a byte moves. Pure: no I/O, no `unsafe`;
//! each step is a function of the tensor table and probed facts, and table-tested.
//!
//! - `extents` (re-exported here): the tensor table cut into aligned read extents of
//!   `chunk_bytes`, each with its copy steps.
//! - [`placement`]: several destinations, each tensor replicated, sliced or skipped.
//! - `schedule`: which reader each file gets, and why (`--explain`).
//! - [`mount`]: the file system under a file (FUSE, NFS...) and what serves a FUSE mount.
//! - [`profile`]: request size and queue depth per class of volume.
//! - `interleave`: the order of the reads when every file is in flight.

mod extents;
pub(crate) mod interleave;
pub mod mount;
pub mod placement;
pub mod profile;
pub(crate) mod schedule;

pub use extents::*;
