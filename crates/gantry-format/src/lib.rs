//! safetensors checkpoints, parsed and validated from their headers alone.
//!
//! [`Checkpoint::open`] takes a `.safetensors` file, a directory, or a sharded index
//! (`model.safetensors.index.json`) and returns a tensor table (name, dtype, shape, file,
//! absolute offset, byte length) plus each file's data-section range, ready for planning
//! reads. It never reads tensor data, caps header sizes before allocating, and rejects
//! anything whose offsets could make a reader go out of bounds. Every error names the file
//! and what is wrong in it.
//!
//! The spec's types (`Dtype`) are the `safetensors` crate's own.
//!
//! ```no_run
//! let checkpoint = gantry_format::Checkpoint::open("model/")?;
//! for t in &checkpoint.tensors {
//!     println!("{} {} {:?} @ {}+{}", t.name, t.dtype, t.shape, t.offset, t.len);
//! }
//! # Ok::<(), gantry_format::FormatError>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod checkpoint;
mod error;
mod header;
mod index;
mod open;

pub use checkpoint::{Checkpoint, FileId, FileInfo, TensorEntry, INDEX_FILE_NAME};
pub use error::{escape, escape_path, ErrorKind, Escaped, FormatError};
pub use header::{
    check_prefix, parse_file_bytes, parse_header, read_header, read_header_identified, Header,
    HeaderTensor, MAX_HEADER_BYTES, PREFIX_BYTES,
};
pub use index::{parse_index, Index, MAX_INDEX_BYTES};
pub use open::{open_regular, FileIdentity};
pub use safetensors::Dtype;
