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

/// Every dtype, for looking one up by its safetensors name ([`dtype_named`]).
pub const DTYPES: [Dtype; 22] = [
    Dtype::BOOL,
    Dtype::F4,
    Dtype::F6_E2M3,
    Dtype::F6_E3M2,
    Dtype::U8,
    Dtype::I8,
    Dtype::F8_E5M2,
    Dtype::F8_E4M3,
    Dtype::F8_E8M0,
    Dtype::F8_E4M3FNUZ,
    Dtype::F8_E5M2FNUZ,
    Dtype::I16,
    Dtype::U16,
    Dtype::F16,
    Dtype::BF16,
    Dtype::I32,
    Dtype::U32,
    Dtype::F32,
    Dtype::C64,
    Dtype::F64,
    Dtype::I64,
    Dtype::U64,
];

/// The dtype whose safetensors name is `name` (`"BF16"`, `"F8_E4M3"`, ...), as headers spell it.
pub fn dtype_named(name: &str) -> Option<Dtype> {
    DTYPES.into_iter().find(|d| d.to_string() == name)
}
