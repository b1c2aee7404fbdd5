//! The one error type of the engine. Variants carry what a person needs to act on it: the
//! operation, the file, the offset and length, the errno, the limit to raise.

use std::fmt;
use std::io;
use std::path::PathBuf;

use gantry_format::FormatError;

/// Everything that can go wrong while loading.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The checkpoint's headers or index are malformed.
    Format(FormatError),
    /// A system call on a checkpoint file failed.
    Io {
        /// What was being done (`"open"`, `"read"`, ...).
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// File offset of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// The operating system's error.
        source: io::Error,
    },
    /// A file ended before the bytes its header promises: it was truncated after its header
    /// was read, or is being rewritten.
    Truncated {
        /// The file.
        path: PathBuf,
        /// File offset where data was missing.
        offset: u64,
        /// The file's length when the header was read.
        expected_len: u64,
    },
    /// A path or resource that the configuration demands is not available here.
    Unavailable {
        /// What is missing (`"io_uring"`, `"O_DIRECT"`, ...).
        what: &'static str,
        /// Why, as probed.
        reason: String,
    },
    /// Registering the staging buffers would pass `RLIMIT_MEMLOCK`.
    Memlock {
        /// Bytes that would be locked.
        needed_bytes: u64,
        /// The current soft limit in bytes.
        limit_bytes: u64,
    },
    /// A setting the caller gave is invalid: out of range, malformed, or not one this load
    /// can use (the message names it).
    Config(String),
    /// A tensor cannot be placed as the placement asks: a split that does not divide its
    /// dimension, a dimension it does not have, a destination out of range or given twice,
    /// a share a cooperative load cannot deliver.
    Placement {
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<u64>,
        /// What does not fit.
        reason: String,
    },
    /// A caller-supplied destination does not fit its tensor.
    Destination {
        /// The tensor.
        tensor: String,
        /// What is wrong.
        message: String,
    },
    /// A CUDA driver call failed (out of device memory, bad device ordinal, ...).
    Cuda {
        /// What was being done.
        op: String,
        /// The `CUresult` code.
        code: i32,
        /// The driver's description of the code.
        message: String,
    },
    /// A cuFile (GPUDirect Storage) call failed with a cuFile status.
    CuFile {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// File offset of the request.
        offset: u64,
        /// The cuFile status code (`CU_FILE_*`, 5000 + n).
        code: i32,
        /// Its name and cuFile's description.
        message: String,
    },
    /// A file's SHA-256, computed from the bytes the load read, is not the digest known for it:
    /// the file is corrupted (or the known digest is stale). The load did not succeed.
    Integrity {
        /// The file.
        path: PathBuf,
        /// The digest known for it, 64 hex digits.
        expected: String,
        /// The digest of the bytes read, 64 hex digits.
        actual: String,
        /// Where the expected digest came from.
        expected_from: String,
    },
    /// The SHA-256 check could not be made as asked: a `SHA256SUMS` that is not a regular
    /// file, too large or malformed (the message names the line), or no digest known for a
    /// file when [`crate::Config::require_sha256`] asks for one.
    Sha256 {
        /// The file (the checksum list, or the checkpoint file with no digest).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The caller's cancel flag ([`crate::Config::cancel_flag`]) was set during the load;
    /// everything the load had allocated is freed.
    Cancelled,
    /// An NCCL call of a cooperative load failed, or timed out.
    Nccl {
        /// What was being done.
        op: String,
        /// The `ncclResult_t` (0 for a timeout).
        code: i32,
        /// NCCL's description, or what did not happen in time.
        message: String,
    },
    /// Another rank of a cooperative load failed; this rank stopped with it.
    Rank {
        /// The rank that failed.
        rank: usize,
        /// Ranks in the load.
        world: usize,
        /// Its error, as it reported it.
        message: String,
    },
    /// The ranks of a cooperative load did not open the same checkpoint (a file replaced
    /// between two ranks' opens), or do not plan the same exchange: every rank fails before a
    /// byte is exchanged.
    RanksDiffer {
        /// The first rank (after rank 0) that differs from rank 0.
        rank: usize,
        /// Ranks in the load.
        world: usize,
        /// The file that differs, when it is one file.
        path: Option<PathBuf>,
        /// What differs.
        what: String,
    },
    /// A bug in gantry: one of its own threads panicked, or an invariant did not hold. Never
    /// the caller's input; the message says where.
    Internal(String),
    /// A live source (`unix:///path`) failed: no server answers, the server closed the
    /// connection or broke the protocol, a version is no longer held, a digest differs.
    Live {
        /// The source, `unix:///path`.
        url: String,
        /// What went wrong, and what to do about it.
        message: String,
    },
    /// Setting up the loader's own resources (memory, threads, rings) failed.
    Resource {
        /// What was being set up.
        what: &'static str,
        /// The operating system's error.
        source: io::Error,
    },
}

/// Short for `std::result::Result<T, gantry::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Paths and tensor names come from checkpoints: escaped, so one error stays one line.
        let p = |path: &PathBuf| gantry_format::escape_path(path);
        match self {
            Error::Format(e) => e.fmt(f),
            Error::Io { op, path, offset, len, source } => write!(
                f,
                "{}: {op} of {len} bytes at offset {offset} failed: {source}",
                p(path)
            ),
            Error::Truncated { path, offset, expected_len } => write!(
                f,
                "{}: file ends before offset {offset}, but its header says it is {expected_len} bytes: it was truncated or is being rewritten",
                p(path)
            ),
            Error::Unavailable { what, reason } => write!(f, "{what} is not available: {reason}"),
            Error::Memlock { needed_bytes, limit_bytes } => write!(
                f,
                "registering {needed_bytes} bytes of staging memory passes RLIMIT_MEMLOCK ({limit_bytes} bytes): raise it (ulimit -l, or --ulimit memlock=-1 for containers) or lower the staging size"
            ),
            Error::Config(message) => write!(f, "invalid configuration: {message}"),
            Error::Internal(message) => {
                write!(f, "internal error (a bug in gantry, please report it): {message}")
            }
            Error::Placement { tensor, shape, reason } => {
                write!(f, "tensor '{}' of shape {shape:?}: {reason}", gantry_format::escape(tensor))
            }
            Error::Destination { tensor, message } => {
                write!(f, "destination for tensor '{}': {message}", gantry_format::escape(tensor))
            }
            Error::Resource { what, source } => write!(f, "{what} failed: {source}"),
            Error::Live { url, message } => write!(f, "{}: {message}", gantry_format::escape(url)),
            Error::CuFile { op, path, offset, message, .. } => {
                write!(f, "{}: {op} at offset {offset} failed: {message}", p(path))
            }
            Error::Integrity { path, expected, actual, expected_from } => write!(
                f,
                "{}: SHA-256 mismatch: the bytes read hash to {actual}, {expected_from} says {expected}: the file is corrupted",
                p(path)
            ),
            Error::Sha256 { path, message } => write!(f, "{}: {message}", p(path)),
            Error::Cancelled => f.write_str("the load was cancelled"),
            Error::Nccl { op, message, .. } => write!(f, "NCCL: {op} failed: {message}"),
            Error::Rank { rank, world, message } => {
                write!(f, "rank {rank} of {world} failed, so this rank stopped: {message}")
            }
            Error::RanksDiffer { rank, world, path, what } => {
                if let Some(path) = path {
                    write!(f, "{}: ", p(path))?;
                }
                write!(
                    f,
                    "rank {rank} of {world} opened another checkpoint than rank 0, so no rank exchanged a byte: {what}"
                )
            }
            Error::Cuda { op, code, message } => write!(f, "CUDA: {op} failed: {message} (CUresult {code})"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Format(e) => Some(e),
            Error::Io { source, .. } | Error::Resource { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<FormatError> for Error {
    fn from(e: FormatError) -> Self {
        Error::Format(e)
    }
}

impl Error {
    /// A placement failure of `entry`.
    pub(crate) fn placement(entry: &gantry_format::TensorEntry, reason: String) -> Error {
        Error::Placement { tensor: entry.name.clone(), shape: entry.shape.clone(), reason }
    }

    /// The cuFile status behind a cuFile error, when there is one.
    pub fn cufile_code(&self) -> Option<i32> {
        match self {
            Error::CuFile { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The errno behind an I/O error, when there is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } | Error::Resource { source, .. } => source.raw_os_error(),
            Error::Format(f) => match f.kind() {
                gantry_format::ErrorKind::Io { source, .. } => source.raw_os_error(),
                _ => None,
            },
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant that names a file escapes it the same way, so that one error stays one
    /// line: a SHA-256 mismatch too.
    #[test]
    fn paths_are_escaped_in_every_variant() {
        let path = PathBuf::from("ck/a\nb.safetensors");
        let escaped = gantry_format::escape_path(&path).to_string();
        assert!(!escaped.contains('\n'), "{escaped}");
        let digest = "0".repeat(64);
        let errors = [
            Error::Integrity {
                path: path.clone(),
                expected: digest.clone(),
                actual: digest.clone(),
                expected_from: "SHA256SUMS".into(),
            },
            Error::Sha256 { path: path.clone(), message: "no digest".into() },
            Error::Truncated { path: path.clone(), offset: 8, expected_len: 16 },
        ];
        for e in errors {
            let text = e.to_string();
            assert!(text.starts_with(&format!("{escaped}: ")) && !text.contains('\n'), "{text}");
        }
    }

    /// A placement error names the tensor (escaped) and its shape.
    #[test]
    fn a_placement_error_names_the_tensor_and_its_shape() {
        let e = Error::Placement { tensor: "w\n".into(), shape: vec![4, 6], reason: "r".into() };
        assert_eq!(e.to_string(), "tensor 'w\\n' of shape [4, 6]: r");
    }
}
