//! The public entry point: a [`Loader`] built from a [`Config`] loads checkpoints into host
//! memory (this module) and, with a GPU, into device memory.
//!
//! A loader owns one staging arena, allocated at its first load and reused by later ones, so
//! the memory it holds is the ring plus the destinations, never proportional to the model.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use gantry_format::{Checkpoint, FileInfo, TensorEntry};
use parking_lot::Mutex;

use crate::config::{Config, Settings};
use crate::cuda::{CudaDevice, HostBuffer, PinnedHost};
use crate::engine::pipeline::{self, Files, Identity, Jobs, Reader, Staging, Volume};
use crate::engine::sink::host::{file_buffer_layout, HostSink};
use crate::engine::sink::Sink;
use crate::engine::staging::{Arena, Pool};
use crate::error::{Error, Result};
use crate::plan::schedule::ReaderKind;
use crate::plan::{FilePlan, FileRange, Plan, ReadSet};
use crate::source::probe;
use crate::trace;

use crate::engine::open::{volume_notes, Target};

/// Loads safetensors checkpoints. Cheap to share between threads; loads run one at a time per
/// loader (they share its staging ring), so use one loader per concurrent load.
#[derive(Debug)]
pub struct Loader {
    /// The config as the caller gave it.
    pub(crate) given: Config,
    /// The config resolved for this loader's loads: what the engine reads.
    pub(crate) config: Settings,
    /// The staging arena, kept between loads; the lock also makes loads run one at a time.
    staging: Mutex<Option<StagingArena>>,
}

/// The arena and, once a load went to a GPU, its page-locking. Field order matters: the
/// registration is dropped before the mapping.
#[derive(Debug)]
struct StagingArena {
    pinned: Option<PinnedHost>,
    arena: Arc<Arena>,
    node: Option<u32>,
}

impl StagingArena {
    /// `bytes` of staging on `device`'s NUMA node, page-locked for it.
    fn new(bytes: usize, device: &Arc<CudaDevice>) -> Result<Self> {
        let node = device.numa_node();
        let arena = Arc::new(Arena::new(bytes, node)?);
        let pinned = Some(PinnedHost::new(Arc::clone(&arena), device)?);
        Ok(Self { pinned, arena, node })
    }
}

/// What happened to one file in a load.
#[derive(Debug, Clone)]
pub struct FileReport {
    /// The file.
    pub path: PathBuf,
    /// The reader used, or `None` when no tensor of the file was wanted.
    pub reader: Option<ReaderKind>,
    /// Why that reader.
    pub reason: String,
    /// The probed facts the choice was made from, in one line.
    pub facts: String,
    /// Bytes read from the file (tensor bytes plus alignment and skipped gaps).
    pub read_bytes: u64,
    /// With [`Config::verify_sha256`], the file's SHA-256 and what it was checked against
    /// (`None` when the check is off or nothing of the file was read).
    pub integrity: Option<crate::integrity::FileCheck>,
}

/// Figures of one load.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Per file: reader, reason, bytes read.
    pub files: Vec<FileReport>,
    /// Bytes of the tensors delivered.
    pub tensor_bytes: u64,
    /// Bytes read from storage.
    pub read_bytes: u64,
    /// Wall-clock seconds from the start of reading to the last byte landing.
    pub seconds: f64,
    /// Seconds from the start of reading until the first tensor with bytes had landed (what a
    /// streaming consumer waits before it can start); `None` when no tensor had bytes.
    pub first_tensor_seconds: Option<f64>,
    /// Seconds spent planning reads and copies (for placed loads, laying out the shares too).
    pub plan_seconds: f64,
    /// Bytes of staging memory the load used.
    pub staging_bytes: u64,
    /// Whether the staging buffers were registered with io_uring.
    pub registered_buffers: bool,
    /// What the `auto` volume profile measured and picked, when it ran.
    pub volume: Option<String>,
    /// The publication version a load from a live source read (`None` for files and
    /// objects).
    pub version: Option<String>,
    /// What the object reader's GETs measured (time to first byte, per-connection rate)
    /// and how many it kept in flight; `None` when nothing was read from object storage.
    pub object: Option<crate::source::object::tune::NetReport>,
    /// What bound the load, when it was traced ([`Config::trace`], or a trace the calling
    /// thread is in: see [`crate::trace`]).
    pub bound_by: Option<trace::Verdict>,
}

impl LoadReport {
    /// Tensor bytes per second, in GB/s (10^9).
    pub fn gb_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.tensor_bytes as f64 / self.seconds / 1e9
        } else {
            0.0
        }
    }
}

/// A tensor whose bytes have landed, as handed to the ready callback.
#[derive(Debug, Clone, Copy)]
pub struct Ready<'a> {
    /// Position in the checkpoint's tensor table.
    pub index: usize,
    /// Name, dtype, shape, file and offset.
    pub entry: &'a TensorEntry,
    /// The bytes (host loads).
    pub bytes: &'a [u8],
}

/// A checkpoint loaded into host memory: one buffer per file's data section.
#[derive(Debug)]
pub struct HostModel {
    checkpoint: Checkpoint,
    buffers: Vec<HostBuffer>,
    wanted: Vec<bool>,
    report: LoadReport,
}

/// A loaded tensor in host memory.
#[derive(Debug, Clone, Copy)]
pub struct HostTensor<'a> {
    /// Name, dtype, shape, file and offset.
    pub entry: &'a TensorEntry,
    /// The tensor's bytes.
    pub bytes: &'a [u8],
}

impl HostModel {
    /// The checkpoint's table.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// Figures of the load.
    pub fn report(&self) -> &LoadReport {
        &self.report
    }

    /// Every loaded tensor, in file and offset order.
    pub fn tensors(&self) -> impl Iterator<Item = HostTensor<'_>> {
        (0..self.checkpoint.tensors.len()).filter(|&i| self.wanted[i]).map(|i| self.at(i))
    }

    /// The loaded tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<HostTensor<'_>> {
        let i = self.checkpoint.tensors.iter().position(|t| t.name == name)?;
        self.wanted[i].then(|| self.at(i))
    }

    /// The tensor at position `index` of the checkpoint's table, if it was loaded.
    pub fn get(&self, index: usize) -> Option<HostTensor<'_>> {
        (*self.wanted.get(index)?).then(|| self.at(index))
    }

    fn at(&self, i: usize) -> HostTensor<'_> {
        let entry = &self.checkpoint.tensors[i];
        let file = &self.checkpoint.files[entry.file.0];
        let (lead, _) = file_buffer_layout(file.header.data_offset, file.header.data_len);
        let begin = (lead + entry.offset - file.header.data_offset) as usize;
        HostTensor { entry, bytes: &self.buffers[entry.file.0][begin..begin + entry.len as usize] }
    }
}

impl Loader {
    /// A loader with `config`, checked.
    pub fn new(config: Config) -> Result<Self> {
        config.validate()?;
        Ok(Self { config: config.settings(1), given: config, staging: Mutex::new(None) })
    }

    /// The loader's settings.
    pub fn config(&self) -> &Config {
        &self.given
    }

    /// The settings this loader's loads run with.
    pub(crate) fn settings(&self) -> &Settings {
        &self.config
    }

    /// Loads every tensor of the checkpoint at `path` (file, directory or index) into host
    /// memory.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let spec = gantry::synth::SynthSpec { vocab: 64, hidden: 64, intermediate: 224, kv: 16, layers: 1, shards: 2 };
    /// # gantry::synth::write_checkpoint(dir.path(), &spec, 0)?;
    /// let loader = gantry::Loader::new(gantry::Config::default())?;
    /// let model = loader.load(dir.path())?;
    /// let norm = model.tensor("model.norm.weight").expect("loaded");
    /// assert_eq!(norm.bytes.len() as u64, norm.entry.len);
    /// assert_eq!(model.tensors().count(), spec.tensors().len());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn load(&self, path: impl AsRef<Path>) -> Result<HostModel> {
        self.load_with(crate::open_with(path, &self.given)?, |_| true, |_| {})
    }

    /// Loads the tensors of `checkpoint` that `filter` keeps into host memory, calling
    /// `on_ready` on this thread as each one lands. Nothing is read for a file whose tensors
    /// are all skipped.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let spec = gantry::synth::SynthSpec { vocab: 64, hidden: 64, intermediate: 224, kv: 16, layers: 2, shards: 2 };
    /// # gantry::synth::write_checkpoint(dir.path(), &spec, 0)?;
    /// let loader = gantry::Loader::new(gantry::Config::default())?;
    /// let checkpoint = gantry::Checkpoint::open(dir.path())?;
    /// let mut landed = Vec::new();
    /// let model = loader.load_with(checkpoint, |t| t.name.contains("layers.0."), |ready| {
    ///     landed.push(ready.entry.name.clone()); // bytes are in `ready.bytes` already
    /// })?;
    /// assert_eq!(landed.len(), 9);
    /// assert!(model.tensor("model.layers.1.mlp.up_proj.weight").is_none());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn load_with(
        &self,
        checkpoint: Checkpoint,
        filter: impl Fn(&TensorEntry) -> bool,
        mut on_ready: impl FnMut(Ready<'_>),
    ) -> Result<HostModel> {
        let wanted: Vec<bool> = checkpoint.tensors.iter().map(&filter).collect();
        let mut buffers: Vec<HostBuffer> = checkpoint
            .files
            .iter()
            .enumerate()
            .map(|(f, file)| {
                let (_, len) = file_buffer_layout(file.header.data_offset, file.header.data_len);
                HostBuffer::new(if checkpoint.file_wanted(&wanted, f) { len as usize } else { 0 })
            })
            .collect::<Result<_>>()?;
        let report = self.fill(&checkpoint, &wanted, &mut buffers, &mut on_ready)?;
        Ok(HostModel { checkpoint, buffers, wanted, report })
    }

    /// Reads `model`'s tensors again from its files into the memory it already holds (a
    /// weights refresh: no allocation, no page faults), replacing its report. A file replaced
    /// or rewritten since its header was read is an error (its layout may differ): open the
    /// checkpoint again to load new weights.
    pub fn reload(&self, model: &mut HostModel) -> Result<()> {
        let HostModel { checkpoint, buffers, wanted, report } = model;
        *report = self.fill(checkpoint, wanted, buffers, &mut |_| {})?;
        Ok(())
    }

    /// Loads the `wanted` tensors into the caller's file buffers: one per file, laid out by
    /// [`file_buffer_layout`] (an empty buffer for a file with nothing wanted), so that
    /// direct reads land in them without a staging copy. `on_ready` is called as each
    /// tensor lands; its bytes are in `ready.bytes`. For bindings that hand tensors out while
    /// the load goes on and own the memory themselves.
    pub fn load_into_file_buffers(
        &self,
        checkpoint: &Checkpoint,
        wanted: &[bool],
        buffers: &mut [HostBuffer],
        mut on_ready: impl FnMut(Ready<'_>),
    ) -> Result<LoadReport> {
        if wanted.len() != checkpoint.tensors.len() || buffers.len() != checkpoint.files.len() {
            return Err(Error::Config(format!(
                "{} wanted flags and {} buffers for {} tensors in {} files",
                wanted.len(),
                buffers.len(),
                checkpoint.tensors.len(),
                checkpoint.files.len()
            )));
        }
        for (f, file) in checkpoint.files.iter().enumerate() {
            let (_, len) = file_buffer_layout(file.header.data_offset, file.header.data_len);
            if checkpoint.file_wanted(wanted, f) && buffers[f].len() as u64 != len {
                return Err(Error::Destination {
                    tensor: file.path.display().to_string(),
                    message: format!(
                        "file buffer is {} bytes, its layout needs {len}",
                        buffers[f].len()
                    ),
                });
            }
        }
        self.fill(checkpoint, wanted, buffers, &mut on_ready)
    }

    fn fill(
        &self,
        checkpoint: &Checkpoint,
        wanted: &[bool],
        buffers: &mut [HostBuffer],
        on_ready: &mut dyn FnMut(Ready<'_>),
    ) -> Result<LoadReport> {
        let mut sink = HostSink::for_file_buffers(checkpoint, wanted, buffers);
        let views = sink.views();
        self.run_tensors(checkpoint, wanted, &mut sink, None, &mut |i| {
            // SAFETY: `run` reports a tensor only once all of its steps have landed, and the
            // buffers outlive this call.
            let bytes = unsafe { views.bytes(i) };
            on_ready(Ready { index: i, entry: &checkpoint.tensors[i], bytes });
        })
    }

    /// Loads into the caller's own host memory: `target` gives each tensor's destination, a
    /// slice of exactly its length, or `None` to skip it. `on_ready` is called on this thread
    /// as each tensor lands.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let spec = gantry::synth::SynthSpec { vocab: 64, hidden: 64, intermediate: 224, kv: 16, layers: 1, shards: 1 };
    /// # gantry::synth::write_checkpoint(dir.path(), &spec, 0)?;
    /// let loader = gantry::Loader::new(gantry::Config::default())?;
    /// let checkpoint = gantry::Checkpoint::open(dir.path())?;
    /// // The engine's own parameter storage, one buffer per tensor.
    /// let mut params: Vec<Vec<u8>> = checkpoint.tensors.iter().map(|t| vec![0; t.len as usize]).collect();
    /// let mut slots = params.iter_mut();
    /// let report = loader.load_into(&checkpoint, |_| slots.next().map(|p| p.as_mut_slice()), |_| {})?;
    /// assert_eq!(report.tensor_bytes, checkpoint.total_bytes());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn load_into<'a>(
        &self,
        checkpoint: &Checkpoint,
        mut target: impl FnMut(&TensorEntry) -> Option<&'a mut [u8]>,
        mut on_ready: impl FnMut(Ready<'_>),
    ) -> Result<LoadReport> {
        let targets = checkpoint.tensors.iter().map(&mut target).collect();
        let mut sink = HostSink::for_slices(checkpoint, targets)?;
        let wanted = sink.wanted();
        let views = sink.views();
        self.run_tensors(checkpoint, &wanted, &mut sink, None, &mut |i| {
            // SAFETY: as in `load_with`; the slices outlive this call ('a).
            let bytes = unsafe { views.bytes(i) };
            on_ready(Ready { index: i, entry: &checkpoint.tensors[i], bytes });
        })
    }

    /// A loader with this one's settings but `cancel` as its cancel flag, lent this loader's
    /// staging arena (a cooperative load stops its own pipeline when another rank fails), for
    /// one of `ranks` processes reading side by side (the default reader threads are its share
    /// of the cores); [`Loader::take_back`] returns the arena.
    pub(crate) fn lend(&self, cancel: Arc<std::sync::atomic::AtomicBool>, ranks: usize) -> Loader {
        // A rank reads only its own pieces: the bytes between them are other ranks' to read.
        let given = self.given.clone().cancel_flag(cancel).gap_bytes(0);
        // The ranks' processes read side by side: each takes its share of the cores.
        let mut config = given.settings(ranks);
        // Its own pieces are all a rank reads of an object: a copy written through would read
        // the whole object on every rank (world times the egress) to fill it.
        config.cache_fill = false;
        Loader { given, config, staging: Mutex::new(self.staging.lock().take()) }
    }

    /// Takes back the staging arena lent to `lent` by [`Loader::lend`].
    pub(crate) fn take_back(&self, lent: Loader) {
        *self.staging.lock() = lent.staging.into_inner();
    }

    /// Loads the `wanted` ranges of `reads` into `sink`: [`Loader::prepare`]s the load, then
    /// [`Loader::read`]s it, calling `on_landed(i)` as range `i` lands. With `device`, staging
    /// is page-locked for it and placed on its NUMA node.
    pub(crate) fn run(
        &self,
        reads: ReadSet<'_>,
        wanted: &[bool],
        sink: &mut dyn Sink,
        device: Option<&Arc<CudaDevice>>,
        on_landed: &mut dyn FnMut(usize),
    ) -> Result<LoadReport> {
        let mut cached = self.staging.lock();
        // One timeline per load: the caller's, when its thread is in one, else our own.
        let own = match (&self.config.trace, trace::current()) {
            (Some(_), None) => Some(trace::Trace::new()),
            _ => None,
        };
        let _in = trace::enter(own.as_ref(), "load");
        let prepared = self.prepare(&mut cached, &reads, wanted, sink, device)?;
        let report = self.read(prepared, &reads, wanted, sink, on_landed)?;
        if let (Some(t), Some(path)) = (&own, &self.config.trace) {
            t.write(path)?;
        }
        Ok(report)
    }

    /// Loads the `wanted` tensors of `checkpoint` into `sink`, `on_landed(t)` as tensor `t`
    /// lands.
    pub(crate) fn run_tensors(
        &self,
        checkpoint: &Checkpoint,
        wanted: &[bool],
        sink: &mut dyn Sink,
        device: Option<&Arc<CudaDevice>>,
        on_landed: &mut dyn FnMut(usize),
    ) -> Result<LoadReport> {
        let ranges = FileRange::tensors(checkpoint);
        self.run(ReadSet::tensors(checkpoint, &ranges), wanted, sink, device, on_landed)
    }

    /// Everything before the first read: opens and probes the files (mapping and page-locking
    /// staging meanwhile), measures their volumes, finds the digests to check, plans the
    /// reads, sorts them into jobs, sets up staging and fits the volumes' depths to it.
    fn prepare(
        &self,
        cached: &mut Option<StagingArena>,
        reads: &ReadSet<'_>,
        wanted: &[bool],
        sink: &mut dyn Sink,
        device: Option<&Arc<CudaDevice>>,
    ) -> Result<Prepared> {
        let setup = Instant::now();
        let target = match device {
            None => Target::Host,
            Some(_) if sink.device_reads() => Target::Device,
            Some(_) => Target::Devices,
        };
        let range_bytes: u64 =
            reads.ranges.iter().zip(wanted).filter(|(_, &w)| w).map(|(r, _)| r.len).sum();
        let (mut files, opened) =
            self.open_and_stage(cached, reads, wanted, target, device, range_bytes)?;
        let measuring = trace::span("phase", "volume profile");
        let volume = self.volume_settings(reads.files, &mut files);
        drop(measuring);
        let measured = setup.elapsed().as_secs_f64();
        let mut config = self.config.clone();
        if let Some(largest) = files.volumes.iter().map(|v| v.chunk_bytes).max() {
            config.chunk_bytes = largest;
        }
        let file_plans = file_plans(&files, &config);
        let checks = match config.verify_sha256 {
            true => Some(self.checks(reads.files, &files)?),
            false => None,
        };
        let planning = Instant::now();
        let span = trace::span("phase", "plan");
        let plan = Plan::new(reads, wanted, &file_plans, config.gap_bytes);
        let jobs = Jobs::new(&plan, &files, sink);
        drop(span);
        let plan_seconds = planning.elapsed().as_secs_f64();
        let node = device.and_then(|d| d.numa_node());
        let slot_bytes = if jobs.has_staged_objects() {
            config.object_part()
        } else if jobs.staged_direct_count() > 0 {
            config.chunk_bytes
        } else {
            config.buffered_chunk()
        };
        let count = (config.staging_bytes / slot_bytes).min(jobs.staged_count());
        let span = trace::span("phase", "staging set-up");
        let staging = self.staging(cached, slot_bytes, count, device, node)?;
        drop(span);
        if jobs.staged_direct_count() > 0 {
            fit_depths(&mut files.volumes, count);
        }
        trace::instant("gantry", "settings", || settings(&files, &config, count));
        log::debug!(
            "setup: files opened and probed {opened:.3} s, volume {:.3} s, staging {:.3} s",
            measured - opened,
            setup.elapsed().as_secs_f64() - measured
        );
        Ok(Prepared {
            files,
            plan,
            jobs,
            staging,
            config,
            checks,
            volume,
            plan_seconds,
            range_bytes,
        })
    }

    /// Opens and probes the files of `reads`, mapping and page-locking the staging arena
    /// meanwhile when a device load will fill it; with the seconds that took.
    fn open_and_stage(
        &self,
        cached: &mut Option<StagingArena>,
        reads: &ReadSet<'_>,
        wanted: &[bool],
        target: Target,
        device: Option<&Arc<CudaDevice>>,
        range_bytes: u64,
    ) -> Result<(Files, f64)> {
        let setup = Instant::now();
        let opening = trace::span("phase", "open and probe");
        let (opened, early) = std::thread::scope(|s| {
            // A device load that will fill the ring maps, touches and page-locks it while the
            // files are opened and probed, instead of after.
            let early = match device {
                Some(d) if cached.is_none() && range_bytes >= self.config.staging_bytes as u64 => {
                    let (bytes, t) = (self.config.staging_bytes, trace::current());
                    Some(s.spawn(move || {
                        let _in = trace::enter(t.as_ref(), "staging set-up");
                        let _span = trace::span("phase", "staging set-up");
                        StagingArena::new(bytes, d)
                    }))
                }
                _ => None,
            };
            let opened = self.open_files(reads, wanted, target);
            let panicked = || Err(Error::Internal("the staging set-up thread panicked".into()));
            (opened, early.map(|h| h.join().unwrap_or_else(|_| panicked())))
        });
        drop(opening);
        if let Some(arena) = early {
            *cached = Some(arena?);
        }
        Ok((opened?, setup.elapsed().as_secs_f64()))
    }

    /// Reads a prepared load: runs the pipeline, calling `on_landed(i)` as each wanted range
    /// `i` lands (ranges of no bytes at once), renames finished cache copies into place, and
    /// reports.
    fn read(
        &self,
        prepared: Prepared,
        reads: &ReadSet<'_>,
        wanted: &[bool],
        sink: &mut dyn Sink,
        on_landed: &mut dyn FnMut(usize),
    ) -> Result<LoadReport> {
        let (range_bytes, plan_seconds) = (prepared.range_bytes, prepared.plan_seconds);
        let Prepared { mut files, plan, jobs, staging, config, mut checks, volume, .. } = prepared;
        let staging_bytes = staging.pool.as_ref().map_or(0, |p| p.used_bytes() as u64);
        let registered = staging.register_buffers;
        let start = Instant::now();
        let loading = trace::span("phase", "load");
        // A tensor's landing, or a piece's (a cooperative rank's ranges; that load marks its
        // tensors' landings itself, those it read and those it received).
        let cat = if reads.tensors.is_some() { "tensor" } else { "piece" };
        let landed = |i: usize| {
            let bytes = reads.ranges[i].len;
            let args = || trace::Args::new().str("name", reads.label(i)).u64("bytes", bytes);
            trace::instant(cat, "landed", || args().u64(cat, i as u64));
        };
        for (i, r) in reads.ranges.iter().enumerate() {
            if wanted[i] && r.len == 0 {
                landed(i);
                on_landed(i);
            }
        }
        let mut first_tensor_seconds = None;
        let ran =
            pipeline::run(&plan, &files, jobs, staging, &config, sink, checks.as_mut(), &mut |i| {
                first_tensor_seconds.get_or_insert_with(|| start.elapsed().as_secs_f64());
                landed(i);
                on_landed(i);
            });
        ran.map_err(|e| crate::source::cache::check::blame_copy(e, reads.files, &files.copies()))?;
        let seconds = start.elapsed().as_secs_f64();
        drop(loading);
        let notes = FileNotes { volume: volume_notes(&files), cache: finish_cache(&mut files) };
        let mut report = LoadReport {
            tensor_bytes: range_bytes,
            read_bytes: plan.read_bytes(),
            seconds,
            first_tensor_seconds,
            plan_seconds,
            staging_bytes,
            registered_buffers: registered,
            volume,
            files: Vec::new(),
            version: crate::source::live::version_of_files(reads.files),
            object: files.net.report(),
            bound_by: trace::current()
                .and_then(|t| trace::measure(&t.events()))
                .map(|u| trace::verdict(&u)),
        };
        report.files = file_reports(reads.files, &plan, &files, &notes, checks.as_mut());
        Ok(report)
    }

    /// The integrity checks of a load: every file it reads, with the digest known for it.
    fn checks(&self, infos: &[FileInfo], files: &Files) -> Result<crate::integrity::Checks> {
        let local = "no Hugging Face blob link, no SHA256SUMS entry beside it";
        // Each file read (`None`: not read), and the object it is when it is one.
        let opened: Vec<_> = (0..infos.len())
            .map(|f| {
                files.get(gantry_format::FileId(f)).map(|opened| match &opened.identity {
                    Identity::Object { object, .. } => Some(&**object),
                    Identity::Local => None,
                })
            })
            .collect();
        // The objects' digests, looked up all at once.
        let objects: Vec<_> = opened.iter().flatten().flatten().copied().collect();
        let mut digests = crate::source::object::known_digests(&objects).into_iter();
        let mut checks = Vec::with_capacity(infos.len());
        for (info, opened) in infos.iter().zip(opened) {
            let Some(remote) = opened else {
                checks.push(None);
                continue;
            };
            let known = match remote {
                Some(_) => digests
                    .next()
                    .unwrap_or_else(|| Err(Error::Internal("no digest looked up".into())))?,
                None => crate::integrity::known_local(&info.path)?.ok_or(local.to_owned()),
            };
            let (known, unknown_reason) = match known {
                Ok(k) => (Some(k), String::new()),
                Err(reason) => (None, reason),
            };
            checks.push(Some(crate::integrity::FileCheck {
                path: info.path.clone(),
                file_len: info.file_len,
                known,
                unknown_reason,
                local: remote.is_none(),
                sha256: None,
                hashing: None,
            }));
        }
        crate::integrity::unknown_digests(&checks, self.config.require_sha256)?;
        Ok(checks)
    }

    /// `count` slots of `slot_bytes` over the loader's arena (mapped, bound to `node` and
    /// page-locked for `device` the first time they are needed), and whether to register them
    /// with io_uring.
    fn staging(
        &self,
        cached: &mut Option<StagingArena>,
        slot_bytes: usize,
        count: usize,
        device: Option<&Arc<CudaDevice>>,
        node: Option<u32>,
    ) -> Result<Staging> {
        let cpus = node.map(crate::engine::topology::node_cpus).unwrap_or_default();
        if count == 0 {
            return Ok(Staging {
                pool: None,
                register_buffers: false,
                cpus,
                device: device.cloned(),
            });
        }
        let need = slot_bytes * count;
        if cached.as_ref().is_some_and(|c| c.arena.is_poisoned()) {
            // A read of an earlier load may still land in it (a leaked lease, which keeps
            // the mapping alive): never hand its slots out again.
            log::warn!("staging ring poisoned by an earlier load: mapping a new one");
            *cached = None;
        }
        if cached.as_ref().is_some_and(|c| c.arena.len() < need || c.node != node) {
            *cached = None; // unpin and unmap the old ring before mapping the new one
        }
        if cached.is_none() {
            let arena = Arc::new(Arena::new(need, node)?);
            *cached = Some(StagingArena { pinned: None, arena, node });
        }
        let staging = cached.as_mut().expect("just set");
        if let (Some(device), None) = (device, &staging.pinned) {
            staging.pinned = Some(PinnedHost::new(Arc::clone(&staging.arena), device)?);
        }
        let (limit, privileged) = probe::memlock();
        let register = privileged || need as u64 <= limit;
        if !register {
            log::info!(
                "RLIMIT_MEMLOCK is {limit} bytes, below the {need}-byte staging ring: reading into unregistered buffers (raise memlock to register them)"
            );
        }
        let pool = Pool::new(Arc::clone(&staging.arena), slot_bytes, count);
        Ok(Staging { pool: Some(pool), register_buffers: register, cpus, device: device.cloned() })
    }
}

/// A load made ready to read: its opened files, plan, jobs and staging, and what the
/// report says of how they were chosen.
struct Prepared {
    files: Files,
    plan: Plan,
    jobs: Jobs,
    staging: Staging,
    /// The loader's settings with the largest volume's request size.
    config: Settings,
    checks: Option<crate::integrity::Checks>,
    volume: Option<String>,
    plan_seconds: f64,
    /// Bytes of the wanted ranges.
    range_bytes: u64,
}

/// The ceilings of a load, for its timeline's verdict.
fn settings(files: &Files, config: &Settings, staging_slots: usize) -> trace::Args {
    let volumes = files.volumes.iter().map(|v| (v.name.clone(), v.queue_depth as u64)).collect();
    let settings = trace::Settings {
        volumes,
        threads: config.threads as u64,
        warm: false, // from the files' own events (trace::file_chosen)
        staging_slots: staging_slots as u64,
        object_concurrency: config.object_concurrency as u64,
    };
    settings.args()
}

/// What became of each file beside its reader's reason: its volume, its cache copy.
struct FileNotes {
    volume: std::collections::HashMap<usize, String>,
    cache: std::collections::HashMap<usize, String>,
}

/// Per checkpoint file: its reader, why, the facts, the bytes read and its integrity check.
fn file_reports(
    infos: &[FileInfo],
    plan: &Plan,
    files: &Files,
    notes: &FileNotes,
    mut checks: Option<&mut crate::integrity::Checks>,
) -> Vec<FileReport> {
    let mut read_bytes = vec![0u64; infos.len()];
    for e in &plan.extents {
        read_bytes[e.file.0] += e.len;
    }
    let mut reports = Vec::with_capacity(infos.len());
    for (f, file) in infos.iter().enumerate() {
        let (reader, mut reason, facts) = match files.get(gantry_format::FileId(f)) {
            Some(opened) => {
                let (c, facts) = (&opened.choice, &opened.facts);
                let note = notes.cache.get(&f).map_or(String::new(), |n| format!("; {n}"));
                (Some(c.reader), format!("{}{note}", c.reason), facts.clone())
            }
            None => (None, "no tensor wanted: not read".to_owned(), String::new()),
        };
        if let Some(suffix) = notes.volume.get(&f) {
            reason.push_str(suffix);
        }
        let integrity = checks.as_mut().and_then(|c| c[f].take());
        reports.push(FileReport {
            path: file.path.clone(),
            reader,
            reason,
            facts,
            read_bytes: read_bytes[f],
            integrity,
        });
    }
    reports
}

/// How each file of a load is read: its reader's alignment and request size (a direct file's
/// from its volume), whole when its bytes are hashed or copied to the cache; a file read from
/// a cache copy in whole segments of its record where its request size allows.
fn file_plans(files: &Files, config: &Settings) -> Vec<FilePlan> {
    (0..files.checkpoint_files)
        .map(|f| {
            let chunk_bytes = config.chunk_bytes as u64;
            let opened = files.get(gantry_format::FileId(f));
            // Hashing needs every byte of a file; so does a complete copy in the cache.
            let copied = opened.is_some_and(
                |o| matches!(&o.reader, Reader::Object(object) if object.cache.is_some()),
            );
            let whole = config.verify_sha256 || copied;
            let plan = match opened.map(|o| &o.reader) {
                Some(Reader::Direct { file, volume }) => FilePlan {
                    align: file.align,
                    chunk_bytes: files.volumes[*volume].chunk_bytes as u64,
                    whole,
                },
                Some(Reader::Gds(file)) => FilePlan { align: file.align, chunk_bytes, whole },
                Some(Reader::Object(_)) => {
                    FilePlan { align: 1, chunk_bytes: config.object_part() as u64, whole }
                }
                _ => FilePlan { align: 1, chunk_bytes: config.buffered_chunk() as u64, whole },
            };
            match opened.map(|o| &o.identity) {
                Some(Identity::Object { copy: Some(_), .. }) => {
                    crate::source::cache::check::segment_plan(plan)
                }
                _ => plan,
            }
        })
        .collect()
}

/// Shares `buffers` staging buffers out between the volumes' queues when they cannot all
/// have their depth (see [`crate::plan::interleave::fit_depths`]).
fn fit_depths(volumes: &mut [Volume], buffers: usize) {
    let wanted: Vec<usize> = volumes.iter().map(|v| v.queue_depth).collect();
    let fitted = crate::plan::interleave::fit_depths(&wanted, buffers);
    if fitted != wanted {
        log::debug!("{buffers} staging buffers for {wanted:?} reads in flight: {fitted:?}");
    }
    for (v, depth) in volumes.iter_mut().zip(fitted) {
        v.queue_depth = depth;
    }
}

/// Renames the complete cache copies of a finished load into place (each after a HEAD shows
/// its object unchanged); per checkpoint file, what became of its copy.
fn finish_cache(files: &mut Files) -> std::collections::HashMap<usize, String> {
    let mut notes = std::collections::HashMap::new();
    for opened in &mut files.opened {
        let f = opened.id.0;
        if let Reader::Object(object) = &mut opened.reader {
            let Some(writer) = object.cache.take().and_then(Arc::into_inner) else { continue };
            let note = writer.finish(object.unchanged());
            log::debug!("{}: {note}", object.path.display());
            notes.insert(f, note);
        }
        if let Identity::Object { copy: Some(copy), .. } = &opened.identity {
            if let Some(failure) = copy.failure() {
                notes.insert(f, format!("{failure}: the extents that failed came from the store"));
            }
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rank's loader reads only its pieces (no gap reads) and fills no cache copy, which
    /// would take whole objects (world times the reads across the ranks).
    #[test]
    fn a_lent_loader_reads_only_its_pieces() {
        let config = Config::default().cache_dir("/nonexistent").gap_bytes(1 << 20);
        let loader = Loader::new(config).unwrap();
        let lent = loader.lend(Arc::new(std::sync::atomic::AtomicBool::new(false)), 2);
        assert!(!lent.config.cache_fill && lent.config.gap_bytes == 0, "{:?}", lent.config);
        assert!(loader.config.cache_fill, "the lender's own loads still fill the cache");
    }

    /// A load after one whose reader leaked a lease (a read the kernel may still complete)
    /// gets staging that does not overlap the leaked slot.
    #[test]
    fn a_poisoned_staging_ring_is_replaced_not_reused() {
        let loader = Loader::new(Config::default()).unwrap();
        let mut cached = loader.staging.lock();
        let first = loader.staging(&mut cached, 4096, 2, None, None).unwrap();
        let pool = first.pool.expect("a pool");
        let old = Arc::clone(pool.arena());
        let mut lease = pool.acquire().unwrap();
        let leaked = lease.as_mut_ptr() as usize;
        lease.leak();
        drop(pool);
        let second = loader.staging(&mut cached, 4096, 2, None, None).unwrap();
        let pool = second.pool.expect("a pool");
        assert!(!Arc::ptr_eq(pool.arena(), &old), "the poisoned arena was reused");
        let base = pool.arena().base() as usize;
        assert!(!(base..base + pool.arena().len()).contains(&leaked));
        assert!(!pool.arena().is_poisoned());
    }
}
