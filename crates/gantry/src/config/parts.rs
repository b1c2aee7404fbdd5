//! The settings of a [`crate::Config`], one struct per concern: what and how a load reads
//! ([`Read`]), the staging ring ([`Staging`]), object storage and its cache ([`Object`]),
//! SHA-256 checks ([`Integrity`]), several GPUs ([`Gpus`]) and the caller's hooks
//! ([`Control`]).
//!
//! A value left `None` is "auto": the engine decides it when a load starts, from the volume
//! profile, this machine's cores or the environment, and a value given is used as given,
//! whatever order it was set in. Nothing here remembers how a value got there: there are no
//! flags beside the values, so two configs with the same fields load the same way. The
//! structs are `#[non_exhaustive]`: build them from `Default` (or through the builder methods
//! of [`crate::Config`]) and change the fields you need.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::{PathChoice, ReplicateVia};
use crate::engine::read::fault::FaultInjector;
use crate::plan::profile::VolumeProfile;

/// How a load reads local files.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Read {
    /// Which reader (default [`PathChoice::Auto`]).
    pub path: PathChoice,
    /// The class of volume whose request size and queue depth apply where
    /// [`Read::chunk_bytes`] or [`Read::queue_depth`] is not given (default
    /// [`VolumeProfile::Auto`]: measure the volume under the first direct file, when neither
    /// is given).
    pub profile: VolumeProfile,
    /// Reads in flight per volume; `None`: the profile's.
    pub queue_depth: Option<usize>,
    /// Bytes per read and per staging buffer; `None`: the profile's.
    pub chunk_bytes: Option<usize>,
    /// Bytes per read of the buffered (page-cache) reader (default 2 MiB).
    pub buffered_chunk_bytes: usize,
    /// Threads of the buffered reader; `None`: three quarters of this process's share of the
    /// cores, 2 to 16.
    pub threads: Option<usize>,
    /// Fraction of a file in the page cache from which `Auto` reads it buffered (default 0.5).
    pub hot_fraction: f64,
    /// Skipped bytes between two wanted tensors read anyway rather than split (default 1 MiB).
    pub gap_bytes: u64,
}

impl Default for Read {
    fn default() -> Self {
        Self {
            path: PathChoice::Auto,
            profile: VolumeProfile::Auto,
            queue_depth: None,
            chunk_bytes: None,
            buffered_chunk_bytes: 2 << 20,
            threads: None,
            hot_fraction: 0.5,
            gap_bytes: 1 << 20,
        }
    }
}

/// The staging ring of pinned host memory between the readers and the destinations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Staging {
    /// Total bytes; `None`: 512 MiB, or the profile's queue of reads where that is larger.
    pub bytes: Option<usize>,
}

/// Object storage (`s3://`, `gs://`, `az://` sources) and the local cache of its objects.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Object {
    /// Bytes per ranged GET: `None` (auto, the default) plans 16 MiB parts and joins
    /// consecutive ones into longer GETs as the measured latency asks
    /// ([`crate::io::object::tune`]); a size given is each GET's, as given.
    pub part_bytes: Option<usize>,
    /// Most ranged GETs in flight per load (default [`OBJECT_CONCURRENCY`]).
    pub concurrency: usize,
    /// `object_store` client keys and values, over the environment's; later keys win.
    pub options: Vec<(String, String)>,
    /// The local directory that keeps a copy of every object read (default none).
    pub cache_dir: Option<PathBuf>,
    /// Whether the cache is shared with its directory's group (default off).
    pub cache_shared: bool,
}

/// Most ranged GETs in flight per object load by default: room above the 16 (and the
/// bandwidth-delay product) the model keeps for the climb, which finds a store that serves
/// each connection at a bounded rate (S3: about 90 MB/s a GET; 64 GETs, about 5.8 GB/s) and
/// stays at the model's count where more GETs move nothing more
/// ([`crate::io::object::tune`]).
pub const OBJECT_CONCURRENCY: usize = 64;

impl Default for Object {
    fn default() -> Self {
        Self {
            part_bytes: None,
            concurrency: OBJECT_CONCURRENCY,
            options: Vec::new(),
            cache_dir: None,
            cache_shared: false,
        }
    }
}

impl fmt::Debug for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Option values may be secrets (keys, tokens): only their keys are shown.
        f.debug_struct("Object")
            .field("part_bytes", &self.part_bytes)
            .field("concurrency", &self.concurrency)
            .field("options", &self.options.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field("cache_dir", &self.cache_dir)
            .field("cache_shared", &self.cache_shared)
            .finish()
    }
}

/// SHA-256 checks of the files a load reads (see [`crate::integrity`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Integrity {
    /// Hash every file read and check it against its known digest (default off).
    pub verify_sha256: bool,
    /// Every file read must have a known digest; implies `verify_sha256` (default off).
    pub require_sha256: bool,
    /// Bytes per segment of the recorded SHA-256 states (default 16 MiB).
    pub sha256_segment_bytes: u64,
}

impl Default for Integrity {
    fn default() -> Self {
        Self {
            verify_sha256: false,
            require_sha256: false,
            sha256_segment_bytes: crate::integrity::states::SEGMENT_BYTES_DEFAULT,
        }
    }
}

/// Loads onto several GPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Gpus {
    /// How replicated bytes reach several GPUs; `None`: `GANTRY_REPLICATE_VIA` if set, else
    /// [`ReplicateVia::Peer`].
    pub replicate_via: Option<ReplicateVia>,
    /// A load to a GPU from a live source that keeps its version on a GPU of this host
    /// aliases the server's memory instead of copying it (see [`crate::Config::share_live`]).
    pub share_live: bool,
}

/// The caller's hooks into a load: cancelling it, seeing it, and (tests) breaking it.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct Control {
    /// A flag another thread may set to stop a load.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Where each load's timeline is written as Chrome trace-event JSON.
    pub trace: Option<PathBuf>,
    /// Rewrites read results to inject faults (tests of the error paths).
    #[doc(hidden)]
    pub fault: Option<Arc<dyn FaultInjector>>,
}

impl fmt::Debug for Control {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Control")
            .field("cancel", &self.cancel.is_some())
            .field("trace", &self.trace)
            .field("fault", &self.fault.is_some())
            .finish()
    }
}
