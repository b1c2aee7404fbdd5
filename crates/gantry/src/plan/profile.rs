//! Volume profiles: the request size and queue depth that reach a class of volume's
//! throughput cap with the fewest I/O operations.
//!
//! Cloud block volumes (EBS) count I/O in units of up to 256 KiB against an IOPS cap and cap
//! throughput per volume; a request is served after the volume's latency. So the bytes in
//! flight must cover `throughput x latency`, each request should be as large as the volume
//! takes whole (fewer submissions, fewer completions), and the IOPS cap must not bind first.
//! [`VolumeModel`] is that arithmetic, used by the tests to check every profile.
//!
//! `auto` looks at the block device under the first file read with `O_DIRECT` (its driver
//! and model from sysfs) and times a few 4 KiB direct reads of it, then [`pick`]s: EBS volumes
//! by their latency (gp3 around a millisecond, io2 Block Express below), local NVMe, and for
//! virtual or unknown disks the large requests measured best on them.

use std::str::FromStr;

use crate::error::{Error, Result};

/// A class of volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VolumeProfile {
    /// Measure the volume at the first cold load and pick (see [`pick`]); its settings
    /// before that, and for virtual or unknown disks, are 64 MiB x 8.
    #[default]
    Auto,
    /// AWS gp3: up to 1,000 MB/s and 16,000 IOPS per volume, ~1 ms.
    Gp3,
    /// AWS io2 Block Express: up to 4,000 MB/s and 256,000 IOPS, sub-millisecond.
    Io2,
    /// Local NVMe: several GB/s, ~0.1 ms, no IOPS cap that matters.
    Nvme,
}

impl VolumeProfile {
    /// Request size in bytes and queue depth.
    pub fn settings(self) -> (usize, usize) {
        match self {
            VolumeProfile::Auto => (64 << 20, 8),
            VolumeProfile::Gp3 => (16 << 20, 4),
            VolumeProfile::Io2 => (16 << 20, 8),
            VolumeProfile::Nvme => (8 << 20, 16),
        }
    }

    /// Name as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            VolumeProfile::Auto => "auto",
            VolumeProfile::Gp3 => "gp3",
            VolumeProfile::Io2 => "io2",
            VolumeProfile::Nvme => "nvme",
        }
    }
}

impl FromStr for VolumeProfile {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "gp3" => Ok(Self::Gp3),
            "io2" => Ok(Self::Io2),
            "nvme" => Ok(Self::Nvme),
            _ => Err(Error::Config(format!("unknown volume profile '{s}' (auto, gp3, io2, nvme)"))),
        }
    }
}

/// The kind of block device under a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskKind {
    /// An AWS EBS volume (NVMe with model "Amazon Elastic Block Store", or Xen `xvd*`).
    Ebs,
    /// A local NVMe drive.
    Nvme,
    /// A virtio block device (`virtio_blk`).
    Virtio,
    /// No block device: a FUSE, NFS or Lustre mount, by its type (`fuse.rclone`, `nfs4`).
    Mount(String),
    /// Something else (loop, device-mapper, md, SCSI...), by its sysfs name.
    Other(String),
}

/// What `auto` learns about the volume under a file.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeFacts {
    /// The block device's name (`nvme0n1`, `vda`), or `"unknown"`.
    pub device: String,
    /// Its kind.
    pub kind: DiskKind,
    /// Median time of a 4 KiB `O_DIRECT` read at queue depth 1, seconds, if measured.
    pub latency_s: Option<f64>,
}

impl VolumeFacts {
    /// The facts in a few words, for `--explain`.
    pub fn summary(&self) -> String {
        let kind = match &self.kind {
            DiskKind::Ebs => "EBS volume".to_owned(),
            DiskKind::Nvme => "local NVMe".to_owned(),
            DiskKind::Virtio => "virtio disk".to_owned(),
            DiskKind::Mount(fstype) => format!("{fstype} mount"),
            DiskKind::Other(name) => format!("{name} device"),
        };
        match self.latency_s {
            Some(l) => format!("{} ({kind}, 4 KiB read {:.3} ms)", self.device, l * 1e3),
            None => format!("{} ({kind}, latency not measured)", self.device),
        }
    }
}

/// EBS latency that separates io2 Block Express (below) from gp3 (above), seconds.
pub const IO2_LATENCY_S: f64 = 0.6e-3;

/// Latency under which a device that is neither EBS, NVMe nor virtio (loop, device-mapper,
/// md over fast drives) is read like NVMe: 8-16 MiB requests beat 64 MiB ones by 15% on a
/// memory-backed loop device (benches/README.md), seconds.
pub const FAST_LATENCY_S: f64 = 0.1e-3;

/// What `auto` picks for a volume, and why: a pure function of the facts.
pub fn pick(facts: &VolumeFacts) -> (VolumeProfile, String) {
    let with = |p: VolumeProfile, why: String| {
        let (mib, qd) = (p.settings().0 >> 20, p.settings().1);
        let name = if p == VolumeProfile::Auto { "large-request" } else { p.name() };
        (p, format!("{why}: {name} profile, {mib} MiB x {qd}"))
    };
    match (&facts.kind, facts.latency_s) {
        (DiskKind::Ebs, Some(l)) if l < IO2_LATENCY_S => with(
            VolumeProfile::Io2,
            format!("EBS answering in {:.2} ms is io2 Block Express class", l * 1e3),
        ),
        (DiskKind::Ebs, Some(l)) => {
            with(VolumeProfile::Gp3, format!("EBS answering in {:.2} ms is gp3 class", l * 1e3))
        }
        (DiskKind::Ebs, None) => {
            with(VolumeProfile::Gp3, "EBS of unknown latency: the lower class, gp3".to_owned())
        }
        (DiskKind::Nvme, _) => {
            with(VolumeProfile::Nvme, "local NVMe: moderate requests, deep queue".to_owned())
        }
        (DiskKind::Mount(fstype), _) => with(
            VolumeProfile::Auto,
            format!(
                "{fstype} mount, each request a round trip through its server or daemon \
                 whatever a 4 KiB read takes: few, very large requests (through an rclone \
                 mount, 64 MiB x 8 O_DIRECT read 0.36 GB/s, buffered reads 0.21)"
            ),
        ),
        (DiskKind::Other(name), Some(l)) if l < FAST_LATENCY_S => with(
            VolumeProfile::Nvme,
            format!("{name} device answering in {:.3} ms: moderate requests, deep queue", l * 1e3),
        ),
        (DiskKind::Virtio, _) | (DiskKind::Other(_), _) => with(
            VolumeProfile::Auto,
            "virtual or unknown disk: few, very large requests (1.5x faster than small ones on virtio)"
                .to_owned(),
        ),
    }
}

/// A volume as its provider meters it.
#[derive(Debug, Clone, Copy)]
pub struct VolumeModel {
    /// Throughput cap, bytes per second.
    pub throughput_bytes_per_s: f64,
    /// IOPS cap, in I/O units per second.
    pub iops: f64,
    /// Bytes per I/O unit (256 KiB on EBS): a larger request counts as several.
    pub io_unit_bytes: f64,
    /// Service time of one request, seconds.
    pub latency_s: f64,
}

impl VolumeModel {
    /// gp3 provisioned at its maximum.
    pub const GP3: VolumeModel = VolumeModel {
        throughput_bytes_per_s: 1.0e9,
        iops: 16_000.0,
        io_unit_bytes: 262_144.0,
        latency_s: 1.0e-3,
    };
    /// io2 Block Express at its maximum.
    pub const IO2: VolumeModel = VolumeModel {
        throughput_bytes_per_s: 4.0e9,
        iops: 256_000.0,
        io_unit_bytes: 262_144.0,
        latency_s: 0.5e-3,
    };
    /// A local NVMe drive.
    pub const NVME: VolumeModel = VolumeModel {
        throughput_bytes_per_s: 7.0e9,
        iops: 1.5e6,
        io_unit_bytes: 131_072.0,
        latency_s: 0.1e-3,
    };

    /// Bytes per second reached with `queue_depth` requests of `request_bytes` in flight: the
    /// least of the latency bound, the throughput cap and the IOPS cap.
    pub fn throughput(&self, request_bytes: usize, queue_depth: usize) -> f64 {
        let r = request_bytes as f64;
        let service_s = self.latency_s + r / self.throughput_bytes_per_s;
        let latency_bound = queue_depth as f64 * r / service_s;
        let units = (r / self.io_unit_bytes).ceil();
        let iops_bound = self.iops / units * r;
        latency_bound.min(self.throughput_bytes_per_s).min(iops_bound)
    }

    /// Requests needed to read `bytes`.
    pub fn requests(&self, bytes: u64, request_bytes: usize) -> u64 {
        bytes.div_ceil(request_bytes as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A common "naive" setting: 128 KiB requests, 32 in flight.
    const NAIVE: (usize, usize) = (128 << 10, 32);

    #[test]
    fn every_profile_reaches_its_cap_with_fewer_requests_than_naive() {
        let bytes = 16_060_522_496u64; // Llama-3-8B in bf16
        for (profile, volume) in [
            (VolumeProfile::Gp3, VolumeModel::GP3),
            (VolumeProfile::Io2, VolumeModel::IO2),
            (VolumeProfile::Nvme, VolumeModel::NVME),
        ] {
            let (r, q) = profile.settings();
            let reached = volume.throughput(r, q) / volume.throughput_bytes_per_s;
            assert!(reached >= 0.95, "{profile:?} reaches only {reached:.2} of its cap");
            assert!(
                volume.requests(bytes, r) * 10 < volume.requests(bytes, NAIVE.0),
                "{profile:?}"
            );
            // Staging stays bounded: the profile's bytes in flight fit the default ring.
            assert!(r * q <= 512 << 20, "{profile:?}");
        }
    }

    #[test]
    fn pick_table() {
        use DiskKind::{Ebs, Other, Virtio};
        use VolumeProfile::{Auto, Gp3, Io2};
        let facts = |kind, latency_ms: Option<f64>| VolumeFacts {
            device: "d".into(),
            kind,
            latency_s: latency_ms.map(|l| l / 1e3),
        };
        // (kind, latency ms, profile, reason contains)
        let cases = [
            (Ebs, Some(0.3), Io2, "0.30 ms is io2 Block Express class: io2 profile, 16 MiB x 8"),
            (Ebs, Some(0.59), Io2, "io2"),
            (Ebs, Some(0.6), Gp3, "0.60 ms is gp3 class: gp3 profile, 16 MiB x 4"),
            (Ebs, Some(2.0), Gp3, "gp3 class"),
            (Ebs, None, Gp3, "unknown latency"),
            (DiskKind::Nvme, Some(0.08), VolumeProfile::Nvme, "nvme profile, 8 MiB x 16"),
            (DiskKind::Nvme, None, VolumeProfile::Nvme, "local NVMe"),
            (Virtio, Some(0.2), Auto, "large-request profile, 64 MiB x 8"),
            (Virtio, Some(0.02), Auto, "large-request"),
            (
                Other("loop".into()),
                Some(0.02),
                VolumeProfile::Nvme,
                "loop device answering in 0.020 ms",
            ),
            (Other("sda".into()), Some(0.5), Auto, "virtual or unknown"),
            (Other("dm".into()), None, Auto, "virtual or unknown"),
            // A FUSE mount answering a 4 KiB read fast still gets the large requests.
            (DiskKind::Mount("fuse.rclone".into()), Some(0.02), Auto, "fuse.rclone mount"),
            (DiskKind::Mount("nfs4".into()), None, Auto, "64 MiB x 8"),
        ];
        for (kind, latency, want, text) in cases {
            let (got, reason) = pick(&facts(kind.clone(), latency));
            assert_eq!(got, want, "{kind:?} {latency:?}: {reason}");
            assert!(reason.contains(text), "{kind:?} {latency:?}: {reason}");
        }
        let line = facts(Virtio, Some(0.25)).summary();
        assert_eq!(line, "d (virtio disk, 4 KiB read 0.250 ms)");
    }

    #[test]
    fn model_binds_where_it_should() {
        let v = VolumeModel::GP3;
        // Small requests on gp3 hit the IOPS cap: 16,000 x 16 KiB = 262 MB/s.
        assert!((v.throughput(16 << 10, 64) - 16_000.0 * 16_384.0).abs() < 1.0);
        // One request in flight is latency bound.
        assert!(v.throughput(1 << 20, 1) < 0.6 * v.throughput_bytes_per_s);
        // Enough large requests reach the throughput cap.
        assert_eq!(v.throughput(16 << 20, 4), v.throughput_bytes_per_s);
        assert!("gp2".parse::<VolumeProfile>().is_err());
        assert_eq!("io2".parse::<VolumeProfile>().unwrap().name(), "io2");
    }
}
