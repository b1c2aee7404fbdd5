//! One error type for everything that can be wrong with a checkpoint's headers and index.
//!
//! Every error carries the path of the file it is about and a kind that says exactly what is
//! wrong there: which tensor, which offset, which shard. `Display` prints both, so a caller can
//! show the message as it is.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What is wrong with one file of a checkpoint, and which file.
#[derive(Debug)]
pub struct FormatError {
    path: PathBuf,
    kind: ErrorKind,
}

impl FormatError {
    /// An error about `path` (for sources outside this crate, such as object storage).
    pub fn new(path: &Path, kind: ErrorKind) -> Self {
        Self { path: path.to_path_buf(), kind }
    }

    /// The file the error is about (a `.safetensors` file, an index, or a directory).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What is wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }
}

/// What is wrong with a checkpoint file. Offsets named `data_*` count from the first byte of
/// the data section; offsets named `file_*` count from the first byte of the file. Fields are
/// named for what they hold.
#[derive(Debug)]
#[non_exhaustive]
#[allow(missing_docs)]
pub enum ErrorKind {
    /// The file could not be opened, measured or read.
    Io {
        /// What was being done.
        op: &'static str,
        /// The operating system's error.
        source: io::Error,
    },
    /// The file is shorter than the 8-byte header length prefix.
    TooSmall { file_len: u64 },
    /// The length prefix asks for a header larger than the cap.
    HeaderTooLarge { header_len: u64, max_header_len: u64 },
    /// The header would extend past the end of the file.
    HeaderPastEnd { header_len: u64, file_len: u64 },
    /// The header is not valid UTF-8.
    HeaderNotUtf8 { file_offset: u64 },
    /// The header is not valid JSON, or not a JSON object.
    HeaderJson { message: String },
    /// A tensor entry is malformed (missing field, wrong type).
    BadTensorEntry { tensor: String, message: String },
    /// A tensor names a dtype that safetensors does not define.
    UnknownDtype { tensor: String, dtype: String },
    /// `__metadata__` is not an object of strings.
    BadMetadata { message: String },
    /// The same tensor name appears twice in one header.
    DuplicateTensor { tensor: String },
    /// A tensor's end offset is before its start offset.
    OffsetsReversed { tensor: String, data_begin: u64, data_end: u64 },
    /// A tensor starts before the previous one (sorted by offset) ends.
    Overlap { tensor: String, data_begin: u64, previous: String, previous_end: u64 },
    /// A tensor starts after the previous one ends, leaving bytes that belong to nobody.
    Gap { tensor: String, data_begin: u64, expected_begin: u64 },
    /// The number of elements, or the byte size, overflows 64 bits.
    ShapeOverflow { tensor: String, shape: Vec<u64> },
    /// A sub-byte dtype whose element count does not fill whole bytes.
    PartialByte { tensor: String, bits: u64 },
    /// `dtype size x product(shape)` differs from the byte length the offsets give.
    SizeMismatch {
        tensor: String,
        dtype: String,
        shape: Vec<u64>,
        expected_bytes: u64,
        data_bytes: u64,
    },
    /// A tensor ends past the end of the data section: the file is truncated, or the offsets
    /// are wrong.
    PastEnd { tensor: String, data_end: u64, data_len: u64, file_len: u64 },
    /// The data section has bytes after the last tensor.
    TrailingBytes { data_used: u64, data_len: u64 },
    /// The index file is malformed.
    BadIndex { message: String },
    /// A shard path in the index leaves the checkpoint's directory: lexically (absolute,
    /// `..`), or through a symlinked directory (`resolved` is where its directory leads).
    ShardOutsideDirectory { shard: String, resolved: Option<PathBuf> },
    /// A shard the index names does not exist.
    MissingShard { shard: String, tensor: String },
    /// The index maps a tensor to a shard that does not hold it.
    TensorNotInShard { tensor: String, shard: String },
    /// A shard holds a tensor that the index does not map to it.
    ShardTensorNotInIndex { tensor: String, shard: String },
    /// Two shards hold a tensor of the same name.
    TensorInTwoShards { tensor: String, first: PathBuf, second: PathBuf },
    /// A directory holds no index and no `.safetensors` file.
    NoCheckpoint,
    /// The path is not a regular file (a FIFO, a device, a directory, ...): `kind` says
    /// what it is.
    NotRegularFile { kind: &'static str },
    /// The file is not the one whose header was read: `what` says how it differs.
    Changed { what: &'static str },
    /// A directory holds several index files, and none is `model.safetensors.index.json`.
    AmbiguousIndex { candidates: Vec<String> },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", escape_path(&self.path), self.kind)
    }
}

/// Text from a file or a path, made safe to print on one line of a terminal: control
/// characters (newlines, escape sequences), bidirectional overrides and backslashes are
/// written as Rust escapes (`\n`, `\u{1b}`, `\\`); everything else as it is.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

/// [`Escaped`] `text`, for `Display` in messages and human-readable output.
pub fn escape(text: &str) -> Escaped<'_> {
    Escaped(text)
}

/// A path, [`Escaped`] (lossy for bytes that are not UTF-8).
pub fn escape_path(path: &Path) -> String {
    escape(&path.to_string_lossy()).to_string()
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        for c in self.0.chars() {
            let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if c == '\\' || c.is_control() || bidi {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ErrorKind::*;
        // Names and shard paths come from the file: escaped, so one error stays one line and
        // a file cannot drive the terminal.
        let e = |s: &str| escape(s).to_string();
        let p = |p: &Path| escape_path(p);
        match self {
            Io { op, source } => write!(f, "{op} failed: {source}"),
            TooSmall { file_len } => write!(
                f,
                "file is {file_len} bytes, shorter than the 8-byte header length prefix"
            ),
            // A length this large is not a length: the file is something else, and the number
            // would only show its first bytes.
            HeaderTooLarge { max_header_len, .. } => write!(
                f,
                "not a safetensors file: its header length field is over the cap of {max_header_len} bytes"
            ),
            HeaderPastEnd { header_len, file_len } => write!(
                f,
                "header length prefix is {header_len} bytes, but the file has only {} bytes after the prefix",
                file_len.saturating_sub(8)
            ),
            HeaderNotUtf8 { file_offset } => {
                write!(f, "header is not valid UTF-8 at file offset {file_offset}")
            }
            HeaderJson { message } => {
                write!(f, "header is not a valid JSON object: {}", e(message))
            }
            BadTensorEntry { tensor, message } => {
                write!(f, "tensor '{}': malformed entry: {}", e(tensor), e(message))
            }
            UnknownDtype { tensor, dtype } => {
                write!(f, "tensor '{}': unknown dtype '{}'", e(tensor), e(dtype))
            }
            BadMetadata { message } => {
                write!(f, "__metadata__ must map strings to strings: {}", e(message))
            }
            DuplicateTensor { tensor } => {
                write!(f, "tensor '{}' appears twice in the header", e(tensor))
            }
            OffsetsReversed { tensor, data_begin, data_end } => write!(
                f,
                "tensor '{}': data_offsets [{data_begin}, {data_end}] end before they begin",
                e(tensor)
            ),
            Overlap { tensor, data_begin, previous, previous_end } => write!(
                f,
                "tensor '{}' begins at data offset {data_begin}, inside tensor '{}' which ends at {previous_end}",
                e(tensor),
                e(previous)
            ),
            Gap { tensor, data_begin, expected_begin } => write!(
                f,
                "tensor '{}' begins at data offset {data_begin}, leaving a gap of {} bytes after data offset {expected_begin}",
                e(tensor),
                data_begin - expected_begin
            ),
            ShapeOverflow { tensor, shape } => {
                write!(f, "tensor '{}': shape {shape:?} overflows 64 bits", e(tensor))
            }
            PartialByte { tensor, bits } => write!(
                f,
                "tensor '{}': {bits} bits of data do not fill whole bytes",
                e(tensor)
            ),
            SizeMismatch { tensor, dtype, shape, expected_bytes, data_bytes } => write!(
                f,
                "tensor '{}': {dtype} x {shape:?} needs {expected_bytes} bytes, but its data_offsets span {data_bytes}",
                e(tensor)
            ),
            PastEnd { tensor, data_end, data_len, file_len } => write!(
                f,
                "tensor '{}' ends at data offset {data_end}, past the end of the data section ({data_len} bytes, file is {file_len} bytes): the file is truncated or the offsets are wrong",
                e(tensor)
            ),
            TrailingBytes { data_used, data_len } => write!(
                f,
                "data section is {data_len} bytes but the tensors use only {data_used}: {} trailing bytes",
                data_len - data_used
            ),
            BadIndex { message } => write!(f, "malformed index: {}", e(message)),
            ShardOutsideDirectory { shard, resolved: None } => {
                write!(f, "shard '{}' is outside the index's directory", e(shard))
            }
            ShardOutsideDirectory { shard, resolved: Some(dir) } => write!(
                f,
                "shard '{}' is outside the index's directory: its directory resolves to {}",
                e(shard),
                p(dir)
            ),
            MissingShard { shard, tensor } => write!(
                f,
                "shard '{}' (named for tensor '{}') does not exist",
                e(shard),
                e(tensor)
            ),
            TensorNotInShard { tensor, shard } => write!(
                f,
                "index maps tensor '{}' to shard '{}', which does not hold it",
                e(tensor),
                e(shard)
            ),
            ShardTensorNotInIndex { tensor, shard } => write!(
                f,
                "shard '{}' holds tensor '{}', which the index does not map to it",
                e(shard),
                e(tensor)
            ),
            TensorInTwoShards { tensor, first, second } => write!(
                f,
                "tensor '{}' is in two shards: {} and {}",
                e(tensor),
                p(first),
                p(second)
            ),
            NoCheckpoint => write!(
                f,
                "no model.safetensors.index.json and no .safetensors files in this directory"
            ),
            AmbiguousIndex { candidates } => write!(
                f,
                "several index files and none is model.safetensors.index.json: {}",
                e(&candidates.join(", "))
            ),
            NotRegularFile { kind } => write!(f, "not a regular file ({kind})"),
            Changed { what } => write!(
                f,
                "file changed since its header was read ({what}): open the checkpoint again"
            ),
        }
    }
}

impl std::error::Error for FormatError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ErrorKind::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
