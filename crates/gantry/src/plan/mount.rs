//! The file system under a local file and what it means for reading it. Pure: the probe
//! (`source::probe::file_system`) hands over `fstatfs`'s magic number and the file's line of
//! `/proc/self/mountinfo`; this module names the kind, and for a FUSE mount of an object store
//! derives the URL gantry could read instead.
//!
//! The kinds that change a choice: FUSE, NFS and Lustre answer every request with a round
//! trip through a server (a FUSE daemon splits it further into 128 KiB-1 MiB requests), so
//! the latency of a 4 KiB probe read says nothing about the best request size, and the large
//! request profile is used whatever it measured; tmpfs holds the bytes in memory already, so
//! it is read buffered. A FUSE mount of a bucket (rclone, s3fs, GCSFuse, Mountpoint for S3)
//! is slower than the store's own ranged GETs: measured on one store, an rclone mount read
//! 0.36 GB/s where `s3://` read 0.96, so `--explain` names the URL where it can be derived.

use std::path::Path;

/// `fstatfs` magic numbers (`linux/magic.h`; Lustre's from its own headers).
const FUSE_MAGIC: u64 = 0x6573_5546;
const NFS_MAGIC: u64 = 0x6969;
const LUSTRE_MAGIC: u64 = 0x0BD0_0BD0;
const OVERLAY_MAGIC: u64 = 0x794C_7630;
const TMPFS_MAGIC: u64 = 0x0102_1994;

/// The kind of file system under a file, from its `fstatfs` magic number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// A file system in user space (rclone, s3fs, GCSFuse, Mountpoint for S3, virtiofs...).
    Fuse,
    /// NFS.
    Nfs,
    /// Lustre.
    Lustre,
    /// overlayfs (container image layers).
    Overlay,
    /// tmpfs: the file is in memory.
    Tmpfs,
    /// Anything else (ext4, xfs, btrfs...), named by its mount's type.
    Other,
}

impl FsKind {
    /// The kind of magic number `magic`.
    pub fn of_magic(magic: u64) -> FsKind {
        match magic {
            FUSE_MAGIC => FsKind::Fuse,
            NFS_MAGIC => FsKind::Nfs,
            LUSTRE_MAGIC => FsKind::Lustre,
            OVERLAY_MAGIC => FsKind::Overlay,
            TMPFS_MAGIC => FsKind::Tmpfs,
            _ => FsKind::Other,
        }
    }

    /// Whether every read is a round trip through a server or daemon (FUSE, NFS, Lustre).
    pub fn is_remote(self) -> bool {
        matches!(self, FsKind::Fuse | FsKind::Nfs | FsKind::Lustre)
    }

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Fuse => "FUSE",
            FsKind::Nfs => "NFS",
            FsKind::Lustre => "Lustre",
            FsKind::Overlay => "overlayfs",
            FsKind::Tmpfs => "tmpfs",
            FsKind::Other => "local",
        }
    }
}

/// One mount, from its line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The directory of the mounted file system that is mounted (`/` for a whole one).
    pub root: String,
    /// Where it is mounted.
    pub point: String,
    /// Its type (`ext4`, `fuse.rclone`, `fuse`, `nfs4`).
    pub fstype: String,
    /// Its source (`/dev/nvme0n1p1`, `remote:bucket/dir`, a bucket name).
    pub source: String,
}

/// The mount of device `major:minor` in mountinfo text `text` (the last one listed wins, as
/// a later mount hides an earlier one); `None` when it is not there.
pub fn mount_of(text: &str, major: u32, minor: u32) -> Option<Mount> {
    let dev = format!("{major}:{minor}");
    text.lines().rev().filter_map(parse_line).find(|(d, _)| *d == dev).map(|(_, m)| m)
}

/// A mountinfo line: `ID PARENT MAJ:MIN ROOT POINT OPTIONS [TAGS...] - TYPE SOURCE SUPER`,
/// with spaces and other characters in paths escaped as octal (`\040`).
fn parse_line(line: &str) -> Option<(String, Mount)> {
    let (left, right) = line.split_once(" - ")?;
    let fields: Vec<&str> = left.split(' ').collect();
    let mut right = right.split(' ');
    let (fstype, source) = (right.next()?, right.next()?);
    let mount = Mount {
        root: unescape(fields.get(3)?),
        point: unescape(fields.get(4)?),
        fstype: unescape(fstype),
        source: unescape(source),
    };
    Some((fields.get(2)?.to_string(), mount))
}

/// `text` with mountinfo's `\ooo` octal escapes decoded.
fn unescape(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What is behind a FUSE mount, for `--explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Behind {
    /// The daemon and its source, in words (`rclone remote 'seaweed:models' (s3)`).
    pub what: String,
    /// What gantry could read instead: an object URL, or a local path; `None` when it cannot
    /// be derived from the mount.
    pub instead: Option<String>,
}

/// What serves FUSE mount `mount` and, where it can be derived, the URL (or local path) of
/// file `relative` (its path below the mount point) there. `rclone_type` gives an rclone
/// remote's backend type from rclone's configuration (`s3`, `google cloud storage`,
/// `azureblob`). `None` for a mount of no daemon known to serve object stores.
pub fn behind(
    mount: &Mount,
    relative: &Path,
    rclone_type: impl Fn(&str) -> Option<String>,
) -> Option<Behind> {
    let rel = Path::new(&mount.root).join(relative);
    let rel = rel.to_string_lossy();
    let rel = rel.trim_start_matches('/');
    let join = |prefix: &str| {
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            rel.to_owned()
        } else {
            format!("{prefix}/{rel}")
        }
    };
    let subtype = mount.fstype.strip_prefix("fuse.").unwrap_or("");
    let source = mount.source.as_str();
    match (subtype, source) {
        ("rclone", s) if s.starts_with('/') => Some(Behind {
            what: format!("rclone serving the local directory {s}"),
            instead: Some(format!("/{}", join(s))),
        }),
        ("rclone", s) => {
            // `:s3,opt=x:path` names its backend; `name:path` is configured (its type there).
            let inline = s.strip_prefix(':');
            let (remote, path) = inline.unwrap_or(s).split_once(':')?;
            let name = remote.split([',', '{']).next().unwrap_or("");
            let backend = match inline {
                Some(_) => Some(name.to_owned()),
                None => rclone_type(name),
            };
            let remote = if inline.is_some() { format!(":{remote}") } else { remote.to_owned() };
            let scheme = match backend.as_deref() {
                Some("s3") => Some("s3"),
                Some("google cloud storage" | "gcs") => Some("gs"),
                Some("azureblob") => Some("az"),
                _ => None,
            };
            let kind = backend.as_deref().unwrap_or("type not found in rclone's config");
            Some(Behind {
                what: format!("rclone remote '{remote}:' ({kind})"),
                instead: scheme.map(|scheme| format!("{scheme}://{}", join(path))),
            })
        }
        ("s3fs", _) => Some(Behind {
            what: "s3fs (an S3 bucket; its name is not in the mount table)".to_owned(),
            instead: None,
        }),
        ("gcsfuse", bucket) => Some(Behind {
            what: format!("GCSFuse serving bucket {bucket}"),
            instead: Some(format!("gs://{}", join(bucket))),
        }),
        (_, "mountpoint-s3") => Some(Behind {
            what: "Mountpoint for Amazon S3 (its bucket is not in the mount table)".to_owned(),
            instead: None,
        }),
        _ => None,
    }
}

/// An rclone remote's backend type from the text of rclone's config file: `type = ...` in
/// section `[remote]`.
pub fn rclone_config_type(config: &str, remote: &str) -> Option<String> {
    let mut inside = false;
    for line in config.lines().map(str::trim) {
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = section == remote;
        } else if let Some((key, value)) = line.split_once('=') {
            if inside && key.trim() == "type" {
                return Some(value.trim().to_owned());
            }
        }
    }
    None
}

/// The file system under one file, as probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSystem {
    /// Its kind (from `fstatfs`).
    pub kind: FsKind,
    /// Its mount (from mountinfo), when found.
    pub mount: Option<Mount>,
    /// For a FUSE mount of a known daemon: what serves it.
    pub behind: Option<Behind>,
}

impl FileSystem {
    /// In a few words, for the per-file facts: `FUSE (fuse.rclone from /data)`.
    pub fn summary(&self) -> String {
        let mut line = match &self.mount {
            Some(m) => format!("{} ({} from {})", self.kind.name(), m.fstype, m.source),
            None => self.kind.name().to_owned(),
        };
        if let Some(b) = &self.behind {
            line.push_str(&format!(", served by {}", b.what));
        }
        line
    }

    /// For a FUSE mount whose source gantry can read directly, the sentence `--explain` adds.
    pub fn advice(&self) -> Option<String> {
        let b = self.behind.as_ref()?;
        Some(match &b.instead {
            Some(local) if local.starts_with('/') => format!(
                "this FUSE mount re-serves the local file {local}: loading that path skips the daemon"
            ),
            Some(url) => format!(
                "this FUSE mount serves {url}: loading that URL reads the store with ranged GETs, \
                 faster (one store measured 0.96 GB/s by URL, 0.36 through an rclone mount)"
            ),
            None => "this FUSE mount serves an object store: loading its s3:// (or gs://, az://) \
                 URL reads the store with ranged GETs, faster than through the mount"
                .to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_from_magic() {
        let cases = [
            (0x6573_5546, FsKind::Fuse, true),
            (0x6969, FsKind::Nfs, true),
            (0x0BD0_0BD0, FsKind::Lustre, true),
            (0x794C_7630, FsKind::Overlay, false),
            (0x0102_1994, FsKind::Tmpfs, false),
            (0xEF53, FsKind::Other, false),
        ];
        for (magic, kind, remote) in cases {
            assert_eq!(FsKind::of_magic(magic), kind, "{magic:#x}");
            assert_eq!(kind.is_remote(), remote, "{kind:?}");
        }
    }

    const MOUNTINFO: &str = "\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw
45 22 0:40 / /mnt/models ro,nosuid,nodev,relatime shared:5 - fuse.rclone seaweed:models/v1 ro,user_id=0
46 22 0:41 /sub /mnt/my\\040dir rw - fuse.rclone /srv/local\\040weights rw
47 22 0:42 / /mnt/g rw - fuse.gcsfuse my-bucket rw
48 22 0:43 / /mnt/s rw - fuse.s3fs s3fs rw
49 22 0:44 / /mnt/m rw - fuse mountpoint-s3 rw
50 22 0:45 / /mnt/i rw - fuse.rclone :s3{a1b2}:b/p rw
51 22 0:46 / /mnt/x rw - fuse.sshfs me@host:/w rw
52 22 0:40 / /mnt/models rw - fuse.rclone seaweed:models/v2 rw
";

    #[test]
    fn mount_lines() {
        let m = mount_of(MOUNTINFO, 259, 1).unwrap();
        assert_eq!((m.point.as_str(), m.fstype.as_str()), ("/", "ext4"));
        // A later mount of the same device hides the earlier one.
        assert_eq!(mount_of(MOUNTINFO, 0, 40).unwrap().source, "seaweed:models/v2");
        let m = mount_of(MOUNTINFO, 0, 41).unwrap();
        assert_eq!((m.root.as_str(), m.point.as_str()), ("/sub", "/mnt/my dir"));
        assert_eq!(m.source, "/srv/local weights");
        assert_eq!(mount_of(MOUNTINFO, 0, 99), None);
        assert_eq!(mount_of("garbage\n1 2 3\n", 0, 40), None);
    }

    #[test]
    fn what_serves_a_mount() {
        let types = |remote: &str| (remote == "seaweed").then(|| "s3".to_owned());
        let file = Path::new("llama/model.safetensors");
        // (device minor, what contains, instead)
        let cases: [(u32, &str, Option<&str>); 7] = [
            (40, "rclone remote 'seaweed:' (s3)", Some("s3://models/v2/llama/model.safetensors")),
            (41, "local directory", Some("/srv/local weights/sub/llama/model.safetensors")),
            (
                42,
                "GCSFuse serving bucket my-bucket",
                Some("gs://my-bucket/llama/model.safetensors"),
            ),
            (43, "s3fs", None),
            (44, "Mountpoint for Amazon S3", None),
            (45, "(s3)", Some("s3://b/p/llama/model.safetensors")),
            (46, "", None),
        ];
        for (minor, what, instead) in cases {
            let mount = mount_of(MOUNTINFO, 0, minor).unwrap();
            match behind(&mount, file, types) {
                Some(b) => {
                    assert!(b.what.contains(what), "{minor}: {b:?}");
                    assert_eq!(b.instead.as_deref(), instead, "{minor}");
                }
                None => assert!(what.is_empty(), "{minor}: nothing behind"),
            }
        }
        let unknown = mount_of(MOUNTINFO, 0, 40).unwrap();
        let b = behind(&unknown, file, |_| None).unwrap();
        assert_eq!(b.instead, None, "an rclone remote of unknown type gives no URL");
    }

    #[test]
    fn rclone_config() {
        let config = "[local]\ntype = local\n\n[seaweed]\nprovider = Other\ntype = s3\n";
        assert_eq!(rclone_config_type(config, "seaweed").as_deref(), Some("s3"));
        assert_eq!(rclone_config_type(config, "local").as_deref(), Some("local"));
        assert_eq!(rclone_config_type(config, "gone"), None);
    }

    #[test]
    fn advice_names_the_url() {
        let fs = |instead: Option<&str>| FileSystem {
            kind: FsKind::Fuse,
            mount: None,
            behind: Some(Behind { what: "x".into(), instead: instead.map(Into::into) }),
        };
        assert!(fs(Some("s3://b/k")).advice().unwrap().contains("serves s3://b/k"));
        assert!(fs(Some("/srv/k")).advice().unwrap().contains("local file /srv/k"));
        assert!(fs(None).advice().unwrap().contains("object store"));
        let plain = FileSystem { kind: FsKind::Other, mount: None, behind: None };
        assert_eq!(plain.advice(), None);
    }
}
