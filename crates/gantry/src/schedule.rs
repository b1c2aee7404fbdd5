//! Which reader each file gets, and why. The decision is a pure function of probed facts, so
//! it is table-tested; `gantry load --explain` prints its reasons.

use crate::config::PathChoice;
use crate::error::{Error, Result};

/// Facts probed for one file.
#[derive(Debug, Clone)]
pub struct FileFacts {
    /// `O_DIRECT` alignment, or why direct I/O is impossible for this file.
    pub direct: Result<u64, String>,
    /// Whether io_uring works in this process, or why not.
    pub io_uring: Result<(), String>,
    /// Fraction of the file's data section in the page cache, if it could be measured.
    pub resident: Option<f64>,
}

/// The readers gantry has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReaderKind {
    /// io_uring, `O_DIRECT`, registered buffers.
    Direct,
    /// Threads of buffered `pread`.
    Buffered,
}

impl ReaderKind {
    /// Name used in reports (`"direct"`, `"buffered"`).
    pub fn name(self) -> &'static str {
        match self {
            ReaderKind::Direct => "direct",
            ReaderKind::Buffered => "buffered",
        }
    }
}

/// A file's reader and the reason for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The reader.
    pub reader: ReaderKind,
    /// One sentence on why.
    pub reason: String,
}

/// Chooses the reader for a file. A forced path that is unavailable is an error.
pub fn choose(path: PathChoice, hot_fraction: f64, facts: &FileFacts) -> Result<Choice> {
    let resident = match facts.resident {
        Some(r) => format!("{:.0}% in page cache", r * 100.0),
        None => "page-cache residency unknown".to_owned(),
    };
    let pick = |reader, reason: String| Ok(Choice { reader, reason });
    match path {
        PathChoice::Buffered => {
            pick(ReaderKind::Buffered, format!("forced by config ({resident})"))
        }
        PathChoice::Direct => {
            if let Err(reason) = &facts.direct {
                return Err(Error::Unavailable { what: "O_DIRECT", reason: reason.clone() });
            }
            if let Err(reason) = &facts.io_uring {
                return Err(Error::Unavailable { what: "io_uring", reason: reason.clone() });
            }
            pick(ReaderKind::Direct, format!("forced by config ({resident})"))
        }
        PathChoice::Auto => {
            if facts.resident.is_some_and(|r| r >= hot_fraction) {
                return pick(
                    ReaderKind::Buffered,
                    format!("{resident}: hot, direct I/O would re-read it from disk"),
                );
            }
            if let Err(reason) = &facts.direct {
                return pick(ReaderKind::Buffered, format!("{resident}, but {reason}"));
            }
            if let Err(reason) = &facts.io_uring {
                return pick(ReaderKind::Buffered, format!("{resident}, but {reason}"));
            }
            pick(ReaderKind::Direct, format!("{resident}: cold, read around the page cache"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(direct: bool, uring: bool, resident: Option<f64>) -> FileFacts {
        FileFacts {
            direct: if direct {
                Ok(4096)
            } else {
                Err("its file system does not support O_DIRECT".into())
            },
            io_uring: if uring { Ok(()) } else { Err("kernel.io_uring_disabled is 2".into()) },
            resident,
        }
    }

    #[test]
    fn table() {
        use PathChoice::{Auto, Buffered as ForceBuffered, Direct as ForceDirect};
        use ReaderKind::{Buffered, Direct};
        // (path, direct ok, io_uring ok, resident, expected reader or None for an error, reason contains)
        let cases = [
            (Auto, true, true, Some(0.0), Some(Direct), "0% in page cache: cold"),
            (Auto, true, true, None, Some(Direct), "unknown"),
            (Auto, true, true, Some(0.49), Some(Direct), "49%"),
            (Auto, true, true, Some(0.5), Some(Buffered), "hot"),
            (Auto, true, true, Some(1.0), Some(Buffered), "100% in page cache: hot"),
            (Auto, false, true, Some(0.0), Some(Buffered), "does not support O_DIRECT"),
            (Auto, true, false, Some(0.0), Some(Buffered), "io_uring_disabled"),
            (ForceBuffered, true, true, Some(0.0), Some(Buffered), "forced"),
            (ForceDirect, true, true, Some(1.0), Some(Direct), "forced"),
            (ForceDirect, false, true, Some(0.0), None, "O_DIRECT is not available"),
            (ForceDirect, true, false, Some(0.0), None, "io_uring is not available"),
        ];
        for (path, direct, uring, resident, want, text) in cases {
            let got = choose(path, 0.5, &facts(direct, uring, resident));
            match (want, got) {
                (Some(reader), Ok(c)) => {
                    assert_eq!(c.reader, reader, "{path:?} {direct} {uring} {resident:?}");
                    assert!(c.reason.contains(text), "{}", c.reason);
                }
                (None, Err(e)) => assert!(e.to_string().contains(text), "{e}"),
                (want, got) => {
                    panic!("{path:?} {direct} {uring} {resident:?}: want {want:?}, got {got:?}")
                }
            }
        }
    }
}
