//! Loader settings, with defaults that fit an ordinary container: a 512 MiB staging ring of
//! 64 MiB buffers, 8 reads in flight (cloud and virtual disks want few, very large requests:
//! 64 MiB x 8 reads 1.5-2x faster than 16 MiB x 8 on the volumes measured).
//!
//! [`Config`] is a facade over one struct per concern ([`Read`], [`Staging`], [`Object`],
//! [`Integrity`], [`Gpus`], [`Control`]), with builder methods for the common settings. A
//! value is either given or `None`, meaning "auto", decided when a load starts (in
//! `settings`, the one place that decides them): no setter flips a hidden flag, so the order of the builder calls never
//! matters (`.chunk_bytes(n).profile(p)` keeps `n`, and so does `.profile(p).chunk_bytes(n)`)
//! and a binding sets exactly what its caller gave. The cost: a value's effective default
//! is known only once resolved ([`Config::values`] shows it for this machine). Every value is
//! checked by [`Config::validate`] before a loader uses it.

mod parts;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::engine::read::fault::FaultInjector;
pub(crate) mod settings;

use crate::error::{Error, Result};
pub use parts::{Control, Gpus, Integrity, Object, Read, Staging, OBJECT_CONCURRENCY};
pub(crate) use settings::Settings;

/// Which reader a load uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PathChoice {
    /// Per file: buffered when the file is mostly in the page cache or its file system has no
    /// `O_DIRECT`, io_uring `O_DIRECT` otherwise.
    #[default]
    Auto,
    /// io_uring with `O_DIRECT` for every file; an error where that is unavailable.
    Direct,
    /// Several threads of buffered `pread` for every file.
    Buffered,
    /// cuFile (GPUDirect Storage) for every file of a GPU load, compatibility mode included;
    /// an error where cuFile is unavailable or the load goes to host memory.
    Gds,
}

impl std::str::FromStr for PathChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "direct" => Ok(Self::Direct),
            "buffered" => Ok(Self::Buffered),
            "gds" => Ok(Self::Gds),
            _ => Err(Error::Config(format!("unknown path '{s}' (auto, direct, buffered, gds)"))),
        }
    }
}

/// How a placed load onto several GPUs delivers bytes that several GPUs want whole (replicated
/// tensors).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplicateVia {
    /// One host-to-device copy from pinned staging per GPU.
    Host,
    /// One host-to-device copy (to a GPU chosen in turn, so every PCIe link takes its part),
    /// then device-to-device copies to the others over NVLink (peer access); pairs of GPUs
    /// without peer access get their own host-to-device copy. The default: on 4 H100s with
    /// NVLink, `replicate:4` warm delivered 162 GB/s this way against 151 GB/s by host
    /// copies, with 169 GB/s the four GPUs' summed pinned host-to-device ceiling.
    #[default]
    Peer,
}

impl std::str::FromStr for ReplicateVia {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "host" => Ok(Self::Host),
            "peer" => Ok(Self::Peer),
            _ => Err(Error::Config(format!("unknown replication '{s}' (host, peer)"))),
        }
    }
}

/// The environment variable that picks [`ReplicateVia`] when the config does not.
pub const REPLICATE_VIA_ENV: &str = "GANTRY_REPLICATE_VIA";

/// Smallest unit of direct I/O and of chunk sizes.
pub const ALIGN_BYTES: usize = 4096;
/// Largest chunk: one io_uring read is at most this long.
pub const CHUNK_BYTES_MAX: usize = 1 << 30;
/// Most reads in flight on one ring.
pub const QUEUE_DEPTH_MAX: usize = 4096;
/// Most reader threads.
pub const THREADS_MAX: usize = 256;

/// A snapshot of the values a [`Config`] loads with, "auto" decided (see the setters for
/// their meaning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct ConfigValues {
    pub queue_depth: usize,
    pub chunk_bytes: usize,
    pub buffered_chunk_bytes: usize,
    pub staging_bytes: usize,
    pub threads: usize,
    pub path: PathChoice,
    pub object_part_bytes: usize,
    pub object_concurrency: usize,
    pub verify_sha256: bool,
}

/// Loader settings: one struct per concern, each field given or `None` for "auto". Build with
/// [`Config::default`] and the builder methods, or set the fields.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Config {
    /// How local files are read.
    pub read: Read,
    /// The staging ring.
    pub staging: Staging,
    /// Object storage and its cache.
    pub object: Object,
    /// SHA-256 checks.
    pub integrity: Integrity,
    /// Loads onto several GPUs.
    pub gpus: Gpus,
    /// Cancelling, tracing and fault injection.
    pub control: Control,
}

impl Config {
    /// Reads in flight per volume (1 to 4096; default: the volume profile's, 8 for `auto`,
    /// or what `auto` picks for each volume): a load reads every volume under its files at
    /// once, each with this depth, shared out when the staging ring cannot hold them all.
    /// Giving it (or [`Config::chunk_bytes`]) turns the `auto` profile's measuring off.
    pub fn queue_depth(mut self, n: usize) -> Self {
        self.read.queue_depth = Some(n);
        self
    }
    /// Bytes per read and per staging buffer, a multiple of 4096 up to 1 GiB (default: the
    /// volume profile's, 64 MiB for `auto`, or what `auto` picks). Giving it (or
    /// [`Config::queue_depth`]) turns the `auto` profile's measuring off.
    pub fn chunk_bytes(mut self, n: usize) -> Self {
        self.read.chunk_bytes = Some(n);
        self
    }
    /// Bytes per read of the buffered (page-cache) reader, a multiple of 4096; at most
    /// `chunk_bytes` is used (default 2 MiB: many threads each copying a small piece keep the
    /// memory system busiest while the copies to a GPU read the ring; 2 MiB pieces loaded a
    /// warm 16 GB checkpoint at 47-48 GB/s on a 16-core H100 machine, 8 MiB ones at 28-47).
    pub fn buffered_chunk_bytes(mut self, n: usize) -> Self {
        self.read.buffered_chunk_bytes = n;
        self
    }
    /// Total staging memory; at least one chunk (default 512 MiB, or the volume profile's
    /// queue of reads where that is larger).
    pub fn staging_bytes(mut self, n: usize) -> Self {
        self.staging.bytes = Some(n);
        self
    }
    /// Threads of the buffered reader (default: three quarters of the cores, 2 to 16, so that
    /// the consumer and the copy poller keep a core: 12 threads read a warm checkpoint onto an
    /// H100 at 47-48 GB/s on 16 cores, 16 threads at 33-40; the ranks of a cooperative load
    /// on one machine share the cores out).
    pub fn threads(mut self, n: usize) -> Self {
        self.read.threads = Some(n);
        self
    }
    /// Which reader to use (default [`PathChoice::Auto`]).
    pub fn path(mut self, path: PathChoice) -> Self {
        self.read.path = path;
        self
    }
    /// Fraction of a file that must be in the page cache for `Auto` to read it buffered.
    pub fn hot_fraction(mut self, fraction: f64) -> Self {
        self.read.hot_fraction = fraction;
        self
    }
    /// Skipped bytes between two wanted tensors that are read anyway rather than split into
    /// two requests (default 1 MiB).
    pub fn gap_bytes(mut self, n: u64) -> Self {
        self.read.gap_bytes = n;
        self
    }
    /// Request size and queue depth for a class of volume (`gp3`, `io2`, `nvme`), where
    /// [`Config::chunk_bytes`] or [`Config::queue_depth`] is not given, whichever order they
    /// are set in; staging grows to hold the profile's queue unless [`Config::staging_bytes`]
    /// is given. `auto` (the default) measures the volume under the first file read with
    /// `O_DIRECT` and picks (see [`crate::plan::profile::pick`]) when neither is given.
    pub fn profile(mut self, profile: crate::plan::profile::VolumeProfile) -> Self {
        self.read.profile = profile;
        self
    }
    /// Bytes per ranged GET from object storage, a multiple of 4096: every GET is of this
    /// size (staging buffers take it for object loads). Unset (auto): 16 MiB parts, the size
    /// S3 serves at full speed, joined into longer GETs as the measured latency asks.
    pub fn object_part_bytes(mut self, n: usize) -> Self {
        self.object.part_bytes = Some(n);
        self
    }
    /// Most ranged GETs in flight per load (default 64; at most the staging buffers): the load
    /// keeps as many as its GETs' measured time to first byte and per-connection rate ask,
    /// and more while more move more (see [`crate::io::object::tune`]), up to this.
    pub fn object_concurrency(mut self, n: usize) -> Self {
        self.object.concurrency = n;
        self
    }
    /// An object-storage client setting that overrides the environment's: an `object_store`
    /// configuration key and its value. `aws_*` keys (`aws_endpoint_url`, `aws_region`,
    /// `aws_allow_http`, `aws_access_key_id`, ...) configure S3, `google_*` keys
    /// (`google_service_account_key`, `google_base_url`, ...) Google Cloud Storage, `azure_*`
    /// keys (`azure_storage_account_name`, `azure_storage_account_key`,
    /// `azure_storage_endpoint`, ...) Azure, and HTTP client keys (`allow_http`, `timeout`,
    /// `proxy_url`, ...) every store. Later settings of a key win. Values are never logged.
    pub fn object_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.object.options.push((key.into(), value.into()));
        self
    }
    /// Computes the SHA-256 of every file the load reads, from the bytes as they are read, and
    /// checks it against the digest known for the file (Hugging Face blob name, `SHA256SUMS`
    /// beside it, object metadata `sha256`): a mismatch fails the load with
    /// [`Error::Integrity`]. Each file read is then read whole (header and skipped tensors
    /// too), and never with cuFile. A local file whose digest matched keeps its SHA-256
    /// segment states (in `GANTRY_SHA256_STATES_DIR`, else `.sha256-states` in
    /// [`Config::cache_dir`], else the user's cache directory), so that later loads hash it on
    /// several threads. Turning it off turns [`Config::require_sha256`] off. Default off. See
    /// [`crate::integrity`].
    pub fn verify_sha256(mut self, on: bool) -> Self {
        self.integrity.verify_sha256 = on;
        self.integrity.require_sha256 &= on;
        self
    }
    /// With `on`, every file a load reads must have a known digest ([`Config::verify_sha256`]
    /// is turned on too): a file with none fails the load with [`Error::Sha256`] naming it,
    /// before anything is read, instead of loading with a warning that it was not verified.
    /// For those who need every file checked. Default off.
    pub fn require_sha256(mut self, on: bool) -> Self {
        self.integrity.require_sha256 = on;
        self.integrity.verify_sha256 |= on;
        self
    }
    /// Bytes per segment of the SHA-256 segment states kept for [`Config::verify_sha256`], a
    /// positive multiple of 64 (default 16 MiB): a local file verified once is hashed in
    /// segments of this size on several threads by later loads. States recorded with another
    /// segment size are not used. See [`crate::integrity::states`].
    pub fn sha256_segment_bytes(mut self, n: u64) -> Self {
        self.integrity.sha256_segment_bytes = n;
        self
    }
    /// A local directory that keeps a copy of every object a load reads (see
    /// [`crate::source::cache`]): a load from object storage writes each object there as it
    /// streams (objects are then read whole), and a later load reads the copy with the local
    /// readers once a HEAD shows the object unchanged. A cache that cannot be written costs a
    /// warning, never the load. Default: none.
    pub fn cache_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.object.cache_dir = Some(dir.into());
        self
    }
    /// Shares [`Config::cache_dir`] with its group: directories the cache creates are `2770`
    /// (setgid: everything in them takes the cache directory's group) and copies `0640`, and
    /// copies written by any member of that group are trusted. Default off: directories
    /// `0700`, copies `0600`, and only copies owned by the caller (or root) are read. See
    /// [`crate::source::cache`].
    pub fn cache_shared(mut self, on: bool) -> Self {
        self.object.cache_shared = on;
        self
    }
    /// Records a timeline of each load ([`crate::trace`]) and writes it to `path` as Chrome
    /// trace-event JSON (Perfetto) when the load ends, replacing the file; the load's report
    /// then carries its verdict ([`crate::LoadReport::bound_by`]). Default: off.
    pub fn trace(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.control.trace = Some(path.into());
        self
    }
    /// A flag another thread may set to stop a load: it returns [`Error::Cancelled`] within
    /// about 50 ms, after its reads in flight complete, and frees what it allocated.
    pub fn cancel_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.control.cancel = Some(flag);
        self
    }
    /// Rewrites read results to inject faults (tests of the error paths).
    #[doc(hidden)]
    pub fn fault_injector(mut self, fault: Arc<dyn FaultInjector>) -> Self {
        self.control.fault = Some(fault);
        self
    }

    /// Loads to a GPU from a live source whose server keeps its version on a GPU of this host
    /// ([`crate::live`]) return tensors that alias the server's device memory instead of
    /// copies: nothing moves, and the model holds the lease on that version (the server keeps
    /// it until the model is dropped, whatever it publishes meanwhile). The memory is the
    /// server's: read-only by contract (a write would change what every other reader of that
    /// version sees). Loads into the caller's own memory still copy. Default off.
    pub fn share_live(mut self, on: bool) -> Self {
        self.gpus.share_live = on;
        self
    }

    /// How replicated bytes reach several GPUs (default: `GANTRY_REPLICATE_VIA` if set to
    /// `host` or `peer`, else [`ReplicateVia::Peer`]).
    pub fn replicate_via(mut self, via: ReplicateVia) -> Self {
        self.gpus.replicate_via = Some(via);
        self
    }

    /// The replication in effect: the one set, else `GANTRY_REPLICATE_VIA`, else peer; an
    /// error for an unknown value in the variable.
    pub fn replication(&self) -> Result<ReplicateVia> {
        if let Some(via) = self.gpus.replicate_via {
            return Ok(via);
        }
        match std::env::var(REPLICATE_VIA_ENV) {
            Ok(v) => v.parse().map_err(|_| {
                Error::Config(format!("{REPLICATE_VIA_ENV}='{v}': expected host or peer"))
            }),
            Err(_) => Ok(ReplicateVia::default()),
        }
    }

    /// The values a load by this process would use on this machine ("auto" decided), for
    /// reporting and for bindings in other languages.
    pub fn values(&self) -> ConfigValues {
        let s = self.settings(1);
        ConfigValues {
            queue_depth: s.queue_depth,
            chunk_bytes: s.chunk_bytes,
            buffered_chunk_bytes: s.buffered_chunk_bytes,
            staging_bytes: s.staging_bytes,
            threads: s.threads,
            path: s.path,
            object_part_bytes: s.object_part_bytes,
            object_concurrency: s.object_concurrency,
            verify_sha256: s.verify_sha256,
        }
    }

    /// Staging buffers the ring holds.
    pub fn staging_buffers(&self) -> usize {
        self.settings(1).staging_buffers()
    }

    /// Bytes per ranged GET as used: `object_part_bytes`, at most the staging ring.
    pub fn object_part(&self) -> usize {
        self.settings(1).object_part()
    }

    /// Bytes per buffered read as used: `buffered_chunk_bytes`, at most `chunk_bytes`.
    pub fn buffered_chunk(&self) -> usize {
        self.settings(1).buffered_chunk()
    }

    /// Checks every value, as a load would use it, against its bounds.
    pub fn validate(&self) -> Result<()> {
        self.settings(1).validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::profile::VolumeProfile;

    /// A value given is used whatever order the builder calls come in: a profile set after
    /// `chunk_bytes` or `queue_depth` fills only what was not given.
    #[test]
    fn a_profile_set_later_keeps_the_values_given() {
        let (chunk, depth) = (8 << 20, 3);
        for profile in [VolumeProfile::Auto, VolumeProfile::Gp3, VolumeProfile::Nvme] {
            let before = Config::default().chunk_bytes(chunk).queue_depth(depth).profile(profile);
            let after = Config::default().profile(profile).chunk_bytes(chunk).queue_depth(depth);
            for config in [before, after] {
                let s = config.settings(1);
                assert_eq!((s.chunk_bytes, s.queue_depth), (chunk, depth), "{profile:?}");
                assert!(!s.measure_volume, "{profile:?}: given values are not measured over");
            }
        }
        // Through the public snapshot too: `auto` set last does not drop the chunk given.
        let values = Config::default().chunk_bytes(chunk).profile(VolumeProfile::Auto).values();
        assert_eq!(values.chunk_bytes, chunk);
        // One value given: the profile's table fills the other (gp3 is 16 MiB x 4).
        let s = Config::default().chunk_bytes(chunk).profile(VolumeProfile::Gp3).settings(1);
        assert_eq!((s.chunk_bytes, s.queue_depth), (chunk, 4));
    }

    /// Only the `auto` profile with neither request size nor depth given measures the volume.
    #[test]
    fn only_auto_with_nothing_given_measures() {
        assert!(Config::default().settings(1).measure_volume);
        assert!(Config::default().profile(VolumeProfile::Auto).settings(1).measure_volume);
        assert!(!Config::default().queue_depth(8).settings(1).measure_volume);
        assert!(!Config::default().chunk_bytes(64 << 20).settings(1).measure_volume);
        assert!(!Config::default().profile(VolumeProfile::Io2).settings(1).measure_volume);
    }

    /// Staging not given holds the profile's queue; staging given is kept, in either order.
    #[test]
    fn a_verified_load_stages_room_for_its_hashing() {
        let plain = Config::default().settings(1).staging_bytes;
        assert_eq!(plain, 512 << 20, "auto: 64 MiB x 8");
        let verified = Config::default().verify_sha256(true).settings(1).staging_bytes;
        assert_eq!(verified, (64 << 20) * (8 + settings::HASHING_SLOTS));
        let required = Config::default().require_sha256(true).settings(1).staging_bytes;
        assert_eq!(required, verified);
        let given = Config::default().verify_sha256(true).staging_bytes(256 << 20);
        assert_eq!(given.settings(1).staging_bytes, 256 << 20, "a given size is kept");
    }

    #[test]
    fn staging_given_is_kept_and_auto_holds_the_queue() {
        let nvme = Config::default().profile(VolumeProfile::Nvme).settings(1);
        assert_eq!(nvme.staging_bytes, 512 << 20, "8 MiB x 16 fits the default 512 MiB");
        let s = Config::default().staging_bytes(256 << 20).profile(VolumeProfile::Gp3);
        assert_eq!(s.settings(1).staging_bytes, 256 << 20);
        let chunk = Config::default().staging_bytes(64 << 20).chunk_bytes(64 << 20);
        assert_eq!(chunk.values().staging_bytes, 64 << 20);
    }

    /// Threads not given are this process's share of the cores; threads given are kept for
    /// every share (a cooperative rank's loader resolves with the ranks sharing the machine).
    #[test]
    fn threads_given_are_kept_for_every_share() {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        for ranks in [1, 2, 8] {
            let auto = Config::default().settings(ranks).threads;
            assert_eq!(auto, (cores * 3 / 4 / ranks).clamp(2, 16), "{ranks} ranks");
            assert_eq!(Config::default().threads(5).settings(ranks).threads, 5);
        }
    }

    /// Requiring a digest implies verifying, also when the fields are set directly.
    #[test]
    fn require_implies_verify() {
        let mut config = Config::default();
        config.integrity.require_sha256 = true;
        assert!(config.settings(1).verify_sha256 && config.values().verify_sha256);
        assert!(
            !Config::default().require_sha256(true).verify_sha256(false).values().verify_sha256
        );
    }

    /// The replication default is the one the docs name: peer.
    #[test]
    fn replication_defaults_to_peer() {
        if std::env::var_os(REPLICATE_VIA_ENV).is_none() {
            assert_eq!(Config::default().replication().unwrap(), ReplicateVia::Peer);
        }
        let host = Config::default().replicate_via(ReplicateVia::Host);
        assert_eq!(host.replication().unwrap(), ReplicateVia::Host);
    }
}
