//! Which reader each file gets, and why. The decision is a pure function of probed facts, so
//! it is table-tested; `gantry load --explain` prints its reasons.

use crate::config::PathChoice;
use crate::error::{Error, Result};
use crate::plan::mount::{FileSystem, FsKind};

/// Facts probed for one file.
#[derive(Debug, Clone)]
pub struct FileFacts {
    /// `O_DIRECT` alignment, or why direct I/O is impossible for this file.
    pub direct: Result<u64, String>,
    /// Whether io_uring works in this process, or why not.
    pub io_uring: Result<(), String>,
    /// Fraction of the file's data section in the page cache, if it could be measured.
    pub resident: Option<f64>,
    /// The probe that measured `resident` (`cachestat`, `mincore`, `RWF_NOWAIT sample`).
    pub resident_probe: &'static str,
    /// The load goes to a GPU (cuFile reads into device memory only).
    pub to_device: bool,
    /// cuFile: `Err` when it cannot be used at all; `Ok(true)` for real GPUDirect Storage to
    /// this file (nvidia-fs or P2PDMA, file on NVMe), `Ok(false)` for compatibility mode only.
    pub gds: Result<bool, String>,
    /// The file system under the file.
    pub fs: FileSystem,
}

impl FileFacts {
    /// The facts in one line, for `--explain`.
    pub fn summary(&self) -> String {
        let resident = self.resident.map_or("unknown (no probe answered)".to_owned(), |r| {
            format!("{:.0}% ({})", r * 100.0, self.resident_probe)
        });
        let direct = match &self.direct {
            Ok(align) => format!("yes (align {align})"),
            Err(e) => format!("no ({e})"),
        };
        let uring = match &self.io_uring {
            Ok(()) => "yes".to_owned(),
            Err(e) => format!("no ({e})"),
        };
        let gds = match &self.gds {
            Ok(true) => "real GPUDirect Storage".to_owned(),
            Ok(false) => {
                "compatibility mode only (no nvidia-fs or P2PDMA for this file)".to_owned()
            }
            Err(e) => format!("unavailable ({e})"),
        };
        format!(
            "file system {}; page cache {resident}; O_DIRECT {direct}; io_uring {uring}; cuFile {gds}",
            self.fs.summary()
        )
    }
}

/// The readers gantry has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReaderKind {
    /// io_uring, `O_DIRECT`, registered buffers.
    Direct,
    /// Threads of buffered `pread`.
    Buffered,
    /// cuFile straight into device memory.
    Gds,
    /// Ranged GETs from object storage into the staging ring.
    Object,
    /// Copies from a live source's device memory (CUDA IPC), on one GPU or between GPUs.
    Device,
}

impl ReaderKind {
    /// Name used in reports (`"direct"`, `"buffered"`).
    pub fn name(self) -> &'static str {
        match self {
            ReaderKind::Direct => "direct",
            ReaderKind::Buffered => "buffered",
            ReaderKind::Gds => "gds",
            ReaderKind::Object => "object",
            ReaderKind::Device => "device",
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
        PathChoice::Gds => {
            if !facts.to_device {
                let reason =
                    "cuFile reads into GPU memory; this load goes to host memory".to_owned();
                return Err(Error::Unavailable { what: "cuFile", reason });
            }
            match &facts.gds {
                Err(reason) => Err(Error::Unavailable { what: "cuFile", reason: reason.clone() }),
                Ok(true) => pick(ReaderKind::Gds, format!("forced by config: real GPUDirect Storage ({resident})")),
                Ok(false) => pick(
                    ReaderKind::Gds,
                    format!("forced by config, compatibility mode: cuFile reads through its own bounce buffer, what the pinned staging path does faster ({resident})"),
                ),
            }
        }
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
            if facts.fs.kind == FsKind::Tmpfs {
                return pick(
                    ReaderKind::Buffered,
                    "tmpfs: the file is in memory, buffered reads copy it once".to_owned(),
                );
            }
            if facts.resident.is_some_and(|r| r >= hot_fraction) {
                return pick(
                    ReaderKind::Buffered,
                    format!("{resident}: hot, direct I/O would re-read it from disk"),
                );
            }
            if let Err(reason) = &facts.direct {
                return pick(ReaderKind::Buffered, format!("{resident}, but {reason}"));
            }
            if facts.to_device && facts.gds == Ok(true) {
                return pick(
                    ReaderKind::Gds,
                    format!("{resident}: cold, GPUDirect Storage from NVMe to the GPU"),
                );
            }
            if let Err(reason) = &facts.io_uring {
                return pick(ReaderKind::Buffered, format!("{resident}, but {reason}"));
            }
            if facts.fs.kind.is_remote() {
                // Measured through an rclone mount: O_DIRECT 64 MiB x 8 read 0.36 GB/s,
                // buffered reads 0.21 (the kernel's readahead trickles 128 KiB requests).
                return pick(
                    ReaderKind::Direct,
                    format!(
                        "{resident}: cold, on {}: O_DIRECT hands the daemon large requests, \
                         several at once, where buffered reads trickle through readahead",
                        facts.fs.kind.name()
                    ),
                );
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
            resident_probe: "cachestat",
            to_device: false,
            gds: Err("libcufile could not be loaded".into()),
            fs: FileSystem { kind: FsKind::Other, mount: None, behind: None },
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

    #[test]
    fn file_system_table() {
        use ReaderKind::{Buffered, Direct};
        let on = |kind, direct: bool, resident: f64| FileFacts {
            fs: FileSystem { kind, mount: None, behind: None },
            ..facts(direct, true, Some(resident))
        };
        // (kind, O_DIRECT opens, resident, reader, reason contains)
        let cases = [
            (FsKind::Fuse, true, 0.0, Direct, "on FUSE: O_DIRECT hands the daemon large"),
            (FsKind::Nfs, true, 0.0, Direct, "on NFS"),
            (FsKind::Lustre, true, 0.0, Direct, "on Lustre"),
            (FsKind::Fuse, true, 1.0, Buffered, "hot"),
            (FsKind::Fuse, false, 0.0, Buffered, "does not support O_DIRECT"),
            (FsKind::Tmpfs, true, 0.0, Buffered, "tmpfs: the file is in memory"),
            (FsKind::Overlay, true, 0.0, Direct, "read around the page cache"),
            (FsKind::Other, true, 0.0, Direct, "read around the page cache"),
        ];
        for (kind, direct, resident, want, text) in cases {
            let c = choose(PathChoice::Auto, 0.5, &on(kind, direct, resident)).unwrap();
            assert!(c.reader == want && c.reason.contains(text), "{kind:?} {direct}: {c:?}");
        }
        // A forced path is kept whatever the file system.
        let c = choose(PathChoice::Direct, 0.5, &on(FsKind::Tmpfs, true, 1.0)).unwrap();
        assert_eq!(c.reader, Direct);
        let line = on(FsKind::Fuse, true, 0.0).summary();
        assert!(line.starts_with("file system FUSE; page cache 0%"), "{line}");
    }

    #[test]
    fn gds_table() {
        use PathChoice::{Auto, Gds};
        let with = |to_device: bool, gds: Result<bool, String>, resident: f64| FileFacts {
            to_device,
            gds,
            ..facts(true, true, Some(resident))
        };
        // (path, facts, expected reader or None for an error, text)
        let cases = [
            (Auto, with(true, Ok(true), 0.0), Some(ReaderKind::Gds), "GPUDirect Storage"),
            (Auto, with(true, Ok(true), 1.0), Some(ReaderKind::Buffered), "hot"),
            (Auto, with(true, Ok(false), 0.0), Some(ReaderKind::Direct), "cold"),
            (Auto, with(false, Ok(true), 0.0), Some(ReaderKind::Direct), "cold"),
            (Auto, with(true, Err("no libcufile".into()), 0.0), Some(ReaderKind::Direct), "cold"),
            (Gds, with(true, Ok(true), 0.0), Some(ReaderKind::Gds), "real GPUDirect"),
            (Gds, with(true, Ok(false), 0.0), Some(ReaderKind::Gds), "compatibility mode"),
            (
                Gds,
                with(true, Err("no libcufile".into()), 0.0),
                None,
                "cuFile is not available: no libcufile",
            ),
            (Gds, with(false, Ok(true), 0.0), None, "host memory"),
        ];
        for (path, f, want, text) in cases {
            match (want, choose(path, 0.5, &f)) {
                (Some(r), Ok(c)) => {
                    assert!(c.reader == r && c.reason.contains(text), "{path:?} {f:?}: {c:?}")
                }
                (None, Err(e)) => assert!(e.to_string().contains(text), "{e}"),
                (want, got) => panic!("{path:?} {f:?}: want {want:?}, got {got:?}"),
            }
        }
        let line = with(true, Ok(false), 0.25).summary();
        assert!(line.contains("page cache 25% (cachestat); O_DIRECT yes (align 4096)"), "{line}");
        assert!(line.contains("cuFile compatibility mode only"), "{line}");
    }
}
