//! Loader settings, with defaults that fit an ordinary container: a 512 MiB staging ring of
//! 64 MiB buffers, 8 reads in flight (cloud and virtual disks want few, very large requests:
//! 64 MiB x 8 reads 1.5-2x faster than 16 MiB x 8 on the volumes measured). Every value is
//! checked by [`Config::validate`] before a loader uses it.

use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::engine::read::fault::FaultInjector;
use crate::error::{Error, Result};

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

/// A snapshot of a [`Config`]'s values (see the setters for their meaning).
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

/// Loader settings. Build with [`Config::default`] and the setters.
#[derive(Clone)]
pub struct Config {
    pub(crate) queue_depth: usize,
    pub(crate) chunk_bytes: usize,
    pub(crate) buffered_chunk_bytes: usize,
    pub(crate) staging_bytes: usize,
    pub(crate) threads: usize,
    /// Whether the caller chose `threads` (else it is this machine's default).
    pub(crate) threads_chosen: bool,
    pub(crate) path: PathChoice,
    pub(crate) hot_fraction: f64,
    pub(crate) gap_bytes: u64,
    /// `auto` volume profile: request size and queue depth still to be picked from the
    /// volume (no explicit chunk size, queue depth or profile was set).
    pub(crate) measure_volume: bool,
    pub(crate) object_part_bytes: usize,
    pub(crate) object_concurrency: usize,
    pub(crate) object_options: Vec<(String, String)>,
    pub(crate) verify_sha256: bool,
    pub(crate) require_sha256: bool,
    pub(crate) cache_dir: Option<std::path::PathBuf>,
    pub(crate) cache_shared: bool,
    /// Whether a load writes the objects it reads through to the cache (set by the engine,
    /// never by a caller: a cooperative rank reads only its pieces, so it fills no copy).
    pub(crate) cache_fill: bool,
    pub(crate) sha256_segment_bytes: u64,
    pub(crate) replicate_via: Option<ReplicateVia>,
    pub(crate) cancel: Option<Arc<AtomicBool>>,
    pub(crate) fault: Option<Arc<dyn FaultInjector>>,
    pub(crate) trace: Option<std::path::PathBuf>,
}

/// Reader threads by default for one of `sharers` processes reading side by side on a machine
/// of `cores` cores: 3/4 of its share of the cores (the consumer and the copy poller keep the
/// rest), 2 to 16.
pub(crate) fn default_threads(cores: usize, sharers: usize) -> usize {
    (cores * 3 / 4 / sharers.max(1)).clamp(2, 16)
}

impl Default for Config {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        Self {
            queue_depth: 8,
            chunk_bytes: 64 << 20,
            buffered_chunk_bytes: 2 << 20,
            staging_bytes: 512 << 20,
            threads: default_threads(cores, 1),
            threads_chosen: false,
            path: PathChoice::Auto,
            hot_fraction: 0.5,
            gap_bytes: 1 << 20,
            measure_volume: true,
            object_part_bytes: 16 << 20,
            object_concurrency: 16,
            object_options: Vec::new(),
            verify_sha256: false,
            require_sha256: false,
            cache_dir: None,
            cache_shared: false,
            cache_fill: true,
            sha256_segment_bytes: crate::integrity::states::SEGMENT_BYTES_DEFAULT,
            replicate_via: None,
            cancel: None,
            fault: None,
            trace: None,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("queue_depth", &self.queue_depth)
            .field("chunk_bytes", &self.chunk_bytes)
            .field("buffered_chunk_bytes", &self.buffered_chunk_bytes)
            .field("staging_bytes", &self.staging_bytes)
            .field("threads", &self.threads)
            .field("path", &self.path)
            .field("hot_fraction", &self.hot_fraction)
            .field("gap_bytes", &self.gap_bytes)
            .field("measure_volume", &self.measure_volume)
            .field("object_part_bytes", &self.object_part_bytes)
            .field("object_concurrency", &self.object_concurrency)
            .field(
                "object_options",
                &self.object_options.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("verify_sha256", &self.verify_sha256)
            .field("require_sha256", &self.require_sha256)
            .field("cache_dir", &self.cache_dir)
            .field("cache_shared", &self.cache_shared)
            .field("sha256_segment_bytes", &self.sha256_segment_bytes)
            .field("replicate_via", &self.replicate_via)
            .field("cancel", &self.cancel.is_some())
            .field("trace", &self.trace)
            .field("fault", &self.fault.is_some())
            .finish()
    }
}

impl Config {
    /// Reads in flight per volume (1 to 4096; default 8, or what the `auto` volume profile
    /// picks for each volume): a load reads every volume under its files at once, each with
    /// this depth, shared out when the staging ring cannot hold them all. Setting it turns
    /// the profile's measuring off.
    pub fn queue_depth(mut self, n: usize) -> Self {
        self.queue_depth = n;
        self.measure_volume = false;
        self
    }
    /// Bytes per read and per staging buffer, a multiple of 4096 up to 1 GiB (default 64 MiB,
    /// or what the `auto` volume profile picks). Setting it turns the profile's measuring off.
    pub fn chunk_bytes(mut self, n: usize) -> Self {
        self.chunk_bytes = n;
        self.measure_volume = false;
        self
    }
    /// Bytes per read of the buffered (page-cache) reader, a multiple of 4096; at most
    /// `chunk_bytes` is used (default 2 MiB: many threads each copying a small piece keep the
    /// memory system busiest while the copies to a GPU read the ring; 2 MiB pieces loaded a
    /// warm 16 GB checkpoint at 47-48 GB/s on a 16-core H100 machine, 8 MiB ones at 28-47).
    pub fn buffered_chunk_bytes(mut self, n: usize) -> Self {
        self.buffered_chunk_bytes = n;
        self
    }
    /// Total staging memory; at least one chunk (default 512 MiB).
    pub fn staging_bytes(mut self, n: usize) -> Self {
        self.staging_bytes = n;
        self
    }
    /// Threads of the buffered reader (default: three quarters of the cores, 2 to 16, so that
    /// the consumer and the copy poller keep a core: 12 threads read a warm checkpoint onto an
    /// H100 at 47-48 GB/s on 16 cores, 16 threads at 33-40).
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n;
        self.threads_chosen = true;
        self
    }
    /// Which reader to use (default [`PathChoice::Auto`]).
    pub fn path(mut self, path: PathChoice) -> Self {
        self.path = path;
        self
    }
    /// Fraction of a file that must be in the page cache for `Auto` to read it buffered.
    pub fn hot_fraction(mut self, fraction: f64) -> Self {
        self.hot_fraction = fraction;
        self
    }
    /// Skipped bytes between two wanted tensors that are read anyway rather than split into
    /// two requests (default 1 MiB).
    pub fn gap_bytes(mut self, n: u64) -> Self {
        self.gap_bytes = n;
        self
    }
    /// Request size and queue depth for a class of volume (`gp3`, `io2`, `nvme`); staging
    /// grows to hold the queue if it must. `auto` (the default) measures the volume under the
    /// first file read with `O_DIRECT` and picks (see [`crate::plan::profile::pick`]).
    pub fn profile(mut self, profile: crate::plan::profile::VolumeProfile) -> Self {
        let (chunk_bytes, queue_depth) = profile.settings();
        self.chunk_bytes = chunk_bytes;
        self.queue_depth = queue_depth;
        self.measure_volume = profile == crate::plan::profile::VolumeProfile::Auto;
        self.staging_bytes = self.staging_bytes.max(chunk_bytes * queue_depth);
        self
    }
    /// Bytes per ranged GET from object storage, a multiple of 4096 (default 16 MiB, the part
    /// size S3 serves at full speed); staging buffers take this size for object loads.
    pub fn object_part_bytes(mut self, n: usize) -> Self {
        self.object_part_bytes = n;
        self
    }
    /// Ranged GETs in flight per load (default 16; at most the staging buffers).
    pub fn object_concurrency(mut self, n: usize) -> Self {
        self.object_concurrency = n;
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
        self.object_options.push((key.into(), value.into()));
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
        self.verify_sha256 = on;
        self.require_sha256 &= on;
        self
    }
    /// With `on`, every file a load reads must have a known digest ([`Config::verify_sha256`]
    /// is turned on too): a file with none fails the load with [`Error::Sha256`] naming it,
    /// before anything is read, instead of loading with a warning that it was not verified.
    /// For those who need every file checked. Default off.
    pub fn require_sha256(mut self, on: bool) -> Self {
        self.require_sha256 = on;
        self.verify_sha256 |= on;
        self
    }
    /// Bytes per segment of the SHA-256 segment states kept for [`Config::verify_sha256`], a
    /// positive multiple of 64 (default 16 MiB): a local file verified once is hashed in
    /// segments of this size on several threads by later loads. States recorded with another
    /// segment size are not used. See [`crate::integrity::states`].
    pub fn sha256_segment_bytes(mut self, n: u64) -> Self {
        self.sha256_segment_bytes = n;
        self
    }
    /// A local directory that keeps a copy of every object a load reads (see
    /// [`crate::source::cache`]): a load from object storage writes each object there as it
    /// streams (objects are then read whole), and a later load reads the copy with the local
    /// readers once a HEAD shows the object unchanged. A cache that cannot be written costs a
    /// warning, never the load. Default: none.
    pub fn cache_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.cache_dir = Some(dir.into());
        self
    }
    /// Shares [`Config::cache_dir`] with its group: directories the cache creates are `2770`
    /// (setgid: everything in them takes the cache directory's group) and copies `0640`, and
    /// copies written by any member of that group are trusted. Default off: directories
    /// `0700`, copies `0600`, and only copies owned by the caller (or root) are read. See
    /// [`crate::source::cache`].
    pub fn cache_shared(mut self, on: bool) -> Self {
        self.cache_shared = on;
        self
    }
    /// Records a timeline of each load ([`crate::trace`]) and writes it to `path` as Chrome
    /// trace-event JSON (Perfetto) when the load ends, replacing the file; the load's report
    /// then carries its verdict ([`crate::LoadReport::bound_by`]). Default: off.
    pub fn trace(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.trace = Some(path.into());
        self
    }
    /// A flag another thread may set to stop a load: it returns [`Error::Cancelled`] within
    /// about 50 ms, after its reads in flight complete, and frees what it allocated.
    pub fn cancel_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = Some(flag);
        self
    }
    /// Rewrites read results to inject faults (tests of the error paths).
    #[doc(hidden)]
    pub fn fault_injector(mut self, fault: Arc<dyn FaultInjector>) -> Self {
        self.fault = Some(fault);
        self
    }

    /// How replicated bytes reach several GPUs (default: `GANTRY_REPLICATE_VIA` if set to
    /// `host` or `peer`, else [`ReplicateVia::Host`]).
    pub fn replicate_via(mut self, via: ReplicateVia) -> Self {
        self.replicate_via = Some(via);
        self
    }

    /// The replication in effect: the one set, else `GANTRY_REPLICATE_VIA`, else host; an
    /// error for an unknown value in the variable.
    pub fn replication(&self) -> Result<ReplicateVia> {
        if let Some(via) = self.replicate_via {
            return Ok(via);
        }
        match std::env::var(REPLICATE_VIA_ENV) {
            Ok(v) => v.parse().map_err(|_| {
                Error::Config(format!("{REPLICATE_VIA_ENV}='{v}': expected host or peer"))
            }),
            Err(_) => Ok(ReplicateVia::default()),
        }
    }

    /// The current values, for reporting and for bindings in other languages.
    pub fn values(&self) -> ConfigValues {
        ConfigValues {
            queue_depth: self.queue_depth,
            chunk_bytes: self.chunk_bytes,
            buffered_chunk_bytes: self.buffered_chunk_bytes,
            staging_bytes: self.staging_bytes,
            threads: self.threads,
            path: self.path,
            object_part_bytes: self.object_part_bytes,
            object_concurrency: self.object_concurrency,
            verify_sha256: self.verify_sha256,
        }
    }

    /// Staging buffers the ring holds.
    pub fn staging_buffers(&self) -> usize {
        self.staging_bytes / self.chunk_bytes.max(1)
    }

    /// Bytes per ranged GET as used: `object_part_bytes`, at most the staging ring.
    pub fn object_part(&self) -> usize {
        self.object_part_bytes.min(self.staging_bytes / ALIGN_BYTES * ALIGN_BYTES).max(ALIGN_BYTES)
    }

    /// Bytes per buffered read as used: `buffered_chunk_bytes`, at most `chunk_bytes`.
    pub fn buffered_chunk(&self) -> usize {
        self.buffered_chunk_bytes.min(self.chunk_bytes)
    }

    /// Checks every value against its bounds.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.chunk_bytes == 0
            || self.chunk_bytes % ALIGN_BYTES != 0
            || self.chunk_bytes > CHUNK_BYTES_MAX
        {
            return bad(format!(
                "chunk_bytes {} must be a multiple of {ALIGN_BYTES} up to {CHUNK_BYTES_MAX}",
                self.chunk_bytes
            ));
        }
        if self.buffered_chunk_bytes == 0 || self.buffered_chunk_bytes % ALIGN_BYTES != 0 {
            return bad(format!(
                "buffered_chunk_bytes {} must be a positive multiple of {ALIGN_BYTES}",
                self.buffered_chunk_bytes
            ));
        }
        if self.staging_bytes < self.chunk_bytes {
            return bad(format!(
                "staging_bytes {} must hold at least one chunk of {}",
                self.staging_bytes, self.chunk_bytes
            ));
        }
        if self.staging_bytes / self.buffered_chunk().max(1) > u16::MAX as usize {
            return bad(format!(
                "{} staging buffers is more than {} registered buffers",
                self.staging_bytes / self.buffered_chunk().max(1),
                u16::MAX
            ));
        }
        if self.sha256_segment_bytes == 0 || self.sha256_segment_bytes % 64 != 0 {
            return bad(format!(
                "sha256_segment_bytes {} must be a positive multiple of 64",
                self.sha256_segment_bytes
            ));
        }
        if self.object_part_bytes == 0
            || self.object_part_bytes % ALIGN_BYTES != 0
            || self.object_part_bytes > CHUNK_BYTES_MAX
        {
            return bad(format!(
                "object_part_bytes {} must be a multiple of {ALIGN_BYTES} up to {CHUNK_BYTES_MAX}",
                self.object_part_bytes
            ));
        }
        for (key, value) in &self.object_options {
            crate::source::object::settings::check_option(key, value)?;
        }
        if !(1..=QUEUE_DEPTH_MAX).contains(&self.object_concurrency) {
            return bad(format!(
                "object_concurrency {} must be 1 to {QUEUE_DEPTH_MAX}",
                self.object_concurrency
            ));
        }
        if !(1..=QUEUE_DEPTH_MAX).contains(&self.queue_depth) {
            return bad(format!("queue_depth {} must be 1 to {QUEUE_DEPTH_MAX}", self.queue_depth));
        }
        if !(1..=THREADS_MAX).contains(&self.threads) {
            return bad(format!("threads {} must be 1 to {THREADS_MAX}", self.threads));
        }
        if !(0.0..=1.0).contains(&self.hot_fraction) {
            return bad(format!("hot_fraction {} must be 0 to 1", self.hot_fraction));
        }
        Ok(())
    }
}
