//! A [`Config`] resolved for one load: every "auto" value decided (from the volume profile,
//! this machine's cores and the processes sharing them), the values the engine reads.
//!
//! The engine reads only this, never the caller's [`Config`], so the rules that turn "not
//! given" into a value live in one function ([`Config::settings`]). It also carries what only
//! the engine sets (`cache_fill`, the rank's share of cores): a caller has no way to set
//! them, and they cannot leak back into the config a caller sees.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::{Config, PathChoice, ALIGN_BYTES, CHUNK_BYTES_MAX, QUEUE_DEPTH_MAX, THREADS_MAX};
use crate::engine::read::fault::FaultInjector;
use crate::error::{Error, Result};
use crate::plan::profile::VolumeProfile;

/// Staging bytes when the caller gives none and the profile's queue fits in them.
const STAGING_BYTES_DEFAULT: usize = 512 << 20;

/// Staging buffers a verified load adds to the reads in flight (when the staging size is not
/// given): a staged extent keeps its buffer until its SHA-256 lanes have hashed it, 10-15 ms
/// for a 64 MiB extent, so without room for that the reads in flight drop below the queue
/// depth. Measured on an H100 machine, cold verified loads read 0.96x the plain ones (64 MiB
/// x 8 in flight, a ring of exactly 8 buffers), every one of five runs below plain.
pub(crate) const HASHING_SLOTS: usize = 2;
/// The planned object part when the caller gives none: the size S3 serves at full speed.
const OBJECT_PART_BYTES: usize = 16 << 20;

/// Reader threads by default for one of `sharers` processes reading side by side on a machine
/// of `cores` cores: 3/4 of its share of the cores (the consumer and the copy poller keep the
/// rest), 2 to 16.
pub(crate) fn default_threads(cores: usize, sharers: usize) -> usize {
    (cores * 3 / 4 / sharers.max(1)).clamp(2, 16)
}

/// The values a load runs with (see [`Config`]'s methods for their meaning).
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) queue_depth: usize,
    pub(crate) chunk_bytes: usize,
    pub(crate) buffered_chunk_bytes: usize,
    pub(crate) staging_bytes: usize,
    pub(crate) threads: usize,
    pub(crate) path: PathChoice,
    pub(crate) hot_fraction: f64,
    pub(crate) gap_bytes: u64,
    /// Request size and queue depth still to be picked per volume: the `auto` profile, with
    /// neither given.
    pub(crate) measure_volume: bool,
    pub(crate) object_part_bytes: usize,
    /// Whether the caller gave the part size: then GETs are never joined.
    pub(crate) object_part_given: bool,
    pub(crate) object_concurrency: usize,
    pub(crate) object_options: Vec<(String, String)>,
    pub(crate) verify_sha256: bool,
    pub(crate) require_sha256: bool,
    pub(crate) cache_dir: Option<PathBuf>,
    pub(crate) cache_shared: bool,
    /// Whether a load writes the objects it reads through to the cache (off for a cooperative
    /// rank: it reads only its pieces, so it fills no copy).
    pub(crate) cache_fill: bool,
    pub(crate) sha256_segment_bytes: u64,
    pub(crate) cancel: Option<Arc<AtomicBool>>,
    pub(crate) fault: Option<Arc<dyn FaultInjector>>,
    pub(crate) trace: Option<PathBuf>,
    pub(crate) share_live: bool,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Object option values may be secrets: only their keys are shown.
        f.debug_struct("Settings")
            .field("queue_depth", &self.queue_depth)
            .field("chunk_bytes", &self.chunk_bytes)
            .field("buffered_chunk_bytes", &self.buffered_chunk_bytes)
            .field("staging_bytes", &self.staging_bytes)
            .field("threads", &self.threads)
            .field("path", &self.path)
            .field("gap_bytes", &self.gap_bytes)
            .field("measure_volume", &self.measure_volume)
            .field(
                "object_options",
                &self.object_options.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("verify_sha256", &self.verify_sha256)
            .field("require_sha256", &self.require_sha256)
            .field("cache_dir", &self.cache_dir)
            .field("cache_fill", &self.cache_fill)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// This config resolved for a load by one of `sharers` processes reading side by side.
    pub(crate) fn settings(&self, sharers: usize) -> Settings {
        let (read, profile) = (&self.read, self.read.profile);
        let (profile_chunk, profile_depth) = profile.settings();
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        let verify_sha256 = self.integrity.verify_sha256 || self.integrity.require_sha256;
        Settings {
            queue_depth: read.queue_depth.unwrap_or(profile_depth),
            chunk_bytes: read.chunk_bytes.unwrap_or(profile_chunk),
            buffered_chunk_bytes: read.buffered_chunk_bytes,
            staging_bytes: self.staging.bytes.unwrap_or_else(|| {
                let slots = profile_depth + if verify_sha256 { HASHING_SLOTS } else { 0 };
                STAGING_BYTES_DEFAULT.max(profile_chunk.saturating_mul(slots))
            }),
            threads: read.threads.unwrap_or_else(|| default_threads(cores, sharers)),
            path: read.path,
            hot_fraction: read.hot_fraction,
            gap_bytes: read.gap_bytes,
            measure_volume: profile == VolumeProfile::Auto
                && read.chunk_bytes.is_none()
                && read.queue_depth.is_none(),
            object_part_bytes: self.object.part_bytes.unwrap_or(OBJECT_PART_BYTES),
            object_part_given: self.object.part_bytes.is_some(),
            object_concurrency: self.object.concurrency,
            object_options: self.object.options.clone(),
            verify_sha256,
            require_sha256: self.integrity.require_sha256,
            cache_dir: self.object.cache_dir.clone(),
            cache_shared: self.object.cache_shared,
            cache_fill: true,
            sha256_segment_bytes: self.integrity.sha256_segment_bytes,
            cancel: self.control.cancel.clone(),
            fault: self.control.fault.clone(),
            trace: self.control.trace.clone(),
            share_live: self.gpus.share_live,
        }
    }
}

impl Settings {
    /// Staging buffers the ring holds.
    pub(crate) fn staging_buffers(&self) -> usize {
        self.staging_bytes / self.chunk_bytes.max(1)
    }

    /// Bytes per ranged GET as used: `object_part_bytes`, at most the staging ring.
    pub(crate) fn object_part(&self) -> usize {
        self.object_part_bytes.min(self.staging_bytes / ALIGN_BYTES * ALIGN_BYTES).max(ALIGN_BYTES)
    }

    /// Bytes per buffered read as used: `buffered_chunk_bytes`, at most `chunk_bytes`.
    pub(crate) fn buffered_chunk(&self) -> usize {
        self.buffered_chunk_bytes.min(self.chunk_bytes)
    }

    /// Checks the sizes and counts against their bounds.
    pub(crate) fn validate(&self) -> Result<()> {
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
        self.validate_counts()
    }

    /// The object settings, depths, threads and fraction against their bounds.
    fn validate_counts(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
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
