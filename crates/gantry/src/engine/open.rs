//! Opening a load's files: each local file probed and given its reader (and the volume under
//! it, with the request size and depth its profile picks), each object opened or found in the
//! cache.

use std::path::Path;
use std::sync::Arc;

use gantry_format::{FileId, FileInfo};

use crate::api::loader::Loader;
use crate::engine::pipeline::{Files, Volume};
use crate::engine::pipeline::{Identity, OpenedFile, Reader};
use crate::engine::read::OpenFile;
use crate::error::{Error, Result};
use crate::plan::schedule::{self, Choice, FileFacts, ReaderKind};
use crate::plan::ReadSet;
use crate::source::probe;

impl Loader {
    /// Sets each volume's request size and queue depth: the `auto` profile's pick for it,
    /// measured through its first direct file (one line per volume, joined, says what was
    /// measured and chosen), or the config's settings when they were given explicitly.
    pub(crate) fn volume_settings(&self, infos: &[FileInfo], files: &mut Files) -> Option<String> {
        if !self.config.measure_volume || files.volumes.is_empty() {
            return None;
        }
        let mut lines = Vec::with_capacity(files.volumes.len());
        for (v, volume) in files.volumes.iter_mut().enumerate() {
            let members: Vec<(usize, &OpenFile)> = files
                .opened
                .iter()
                .filter_map(|f| match &f.reader {
                    Reader::Direct { file, volume } if *volume == v => Some((f.id.0, file)),
                    _ => None,
                })
                .collect();
            let (first, file) = members[0];
            let range = infos[first].data_range();
            let facts = probe::volume(&file.file, range.start, range.end - range.start);
            let (profile, reason) = crate::plan::profile::pick(&facts);
            let (chunk_bytes, queue_depth) = profile.settings();
            let aligned = members.iter().all(|(_, f)| chunk_bytes as u64 % f.align == 0);
            if chunk_bytes <= self.config.staging_bytes && aligned {
                volume.chunk_bytes = chunk_bytes;
                volume.queue_depth = queue_depth;
            }
            let line = format!("{} -> {reason}", facts.summary());
            log::debug!("volume {line}");
            volume.choice = Some(line.clone());
            lines.push(line);
        }
        Some(lines.join("; "))
    }

    /// Probes and opens every file that has a wanted tensor with bytes, with the reader the
    /// schedule picks for it.
    pub(crate) fn open_files(
        &self,
        reads: &ReadSet<'_>,
        wanted: &[bool],
        target: Target,
    ) -> Result<Files> {
        let mut files = Files { checkpoint_files: reads.files.len(), ..Files::default() };
        // The object reader's in-flight GETs: as the network asks, within the configured
        // cap and, where the parts land in staging buffers (device loads), what the ring
        // holds; parts that land in place (host loads) take no staging, so the cap alone
        // bounds them.
        let part = self.config.object_part();
        let memory_parts = match target {
            Target::Host => usize::MAX,
            Target::Device | Target::Devices => self.config.staging_bytes / part.max(1),
        };
        let mut net = crate::source::object::tune::Net::new(
            part as u64,
            self.config.object_concurrency,
            memory_parts,
        );
        if self.config.object_part_given {
            net = net.fixed_parts(); // the caller's part size, every GET
        }
        files.net = Arc::new(net);
        // Each file with a wanted tensor, and what its path names.
        #[derive(Clone, Copy, PartialEq)]
        enum Kind {
            Live,
            Object,
            Local,
        }
        let needed: Vec<(usize, Kind)> = (0..reads.files.len())
            .filter(|&f| {
                reads.ranges.iter().zip(wanted).any(|(t, &w)| w && t.len > 0 && t.file.0 == f)
            })
            .map(|f| {
                let path = &reads.files[f].path;
                let kind = if path.to_str().is_some_and(crate::source::live::is_url) {
                    Kind::Live
                } else if crate::source::object::is_url(path) {
                    Kind::Object
                } else {
                    Kind::Local
                };
                (f, kind)
            })
            .collect();
        // Every object's HEAD at once, where one is needed (a cache): one round trip for the
        // lot.
        let objects: Vec<usize> =
            needed.iter().filter(|(_, k)| *k == Kind::Object).map(|&(f, _)| f).collect();
        let infos: Vec<_> = objects.iter().map(|&f| &reads.files[f]).collect();
        let mut heads: Vec<Option<Result<_>>> = reads.files.iter().map(|_| None).collect();
        let opened = crate::source::object::open_for_load(
            &infos,
            &self.config.object_options,
            self.config.cache_dir.is_some(),
        );
        for (f, head) in objects.into_iter().zip(opened) {
            heads[f] = Some(head);
        }
        let mut cache = crate::source::cache::Opened::default();
        for (f, kind) in needed {
            let (id, info) = (FileId(f), &reads.files[f]);
            let opened = match kind {
                Kind::Live => open_live(id, info, self.config.path)?,
                Kind::Object => {
                    let head = heads[f].take();
                    let object =
                        head.unwrap_or_else(|| Err(Error::Internal("not opened".into())))?;
                    self.open_object(id, info, object, target, &mut files.volumes, &mut cache)?
                }
                Kind::Local => {
                    let (reader, choice, facts) =
                        self.open_local(&info.path, None, info, target, &mut files.volumes)?;
                    OpenedFile { id, reader, choice, facts, identity: Identity::Local }
                }
            };
            files.opened.push(opened);
        }
        Ok(files)
    }

    /// The position in `volumes` of the disk under `file`, added with the config's request
    /// size and queue depth if it is new. Files on one disk share its queue; files on
    /// different disks (or network file systems) are read side by side.
    fn volume_of(&self, volumes: &mut Vec<Volume>, file: &std::fs::File) -> usize {
        use std::os::unix::fs::MetadataExt;
        let name =
            file.metadata().map_or_else(|_| "unknown".to_owned(), |m| probe::disk(m.dev()).0);
        if let Some(v) = volumes.iter().position(|v| v.name == name) {
            return v;
        }
        volumes.push(Volume {
            name,
            chunk_bytes: self.config.chunk_bytes,
            queue_depth: self.config.queue_depth,
            choice: None,
        });
        volumes.len() - 1
    }

    /// Opens object `info` for a load (`object`: as a HEAD shows it now where there is a
    /// cache, else as its header's read saw it): from the cache when
    /// it holds a trusted copy of that version (read as a local file, each extent checked
    /// against the copy's record), else from the store (written through to the cache when
    /// there is one).
    fn open_object(
        &self,
        id: FileId,
        info: &gantry_format::FileInfo,
        mut object: crate::source::object::ObjectFile,
        target: Target,
        volumes: &mut Vec<Volume>,
        opened: &mut crate::source::cache::Opened,
    ) -> Result<OpenedFile> {
        use crate::source::cache;
        let mut cache_note = String::new();
        if let Some(dir) = &self.config.cache_dir {
            let identity = object.cache_identity();
            let shared = self.config.cache_shared;
            let (cache, found) =
                cache::open_and_find(dir, shared, opened, identity.clone(), object.size);
            match (found, cache, identity) {
                (cache::Lookup::Hit(copy), Some(cache), _) => {
                    return self.open_copy(id, info, target, volumes, copy, object, cache);
                }
                (cache::Lookup::Miss(why), Some(_), Some(_)) if !self.config.cache_fill => {
                    cache_note = format!(
                        "; not in the cache ({why}), and not written through: the ranks of a \
                         cooperative load read each byte once between them, so none holds a \
                         whole object (a load of one process fills the cache)"
                    );
                }
                (cache::Lookup::Miss(why), Some(cache), Some(identity)) => {
                    // What the cache's disk cannot take in time is fetched again behind
                    // the load, never waited for by the GETs.
                    let again = object.without_cache();
                    let refetch: cache::writer::Refetch = Box::new(move |at, buf: &mut [u8]| {
                        again.read_into(at, buf).map_err(|e| e.to_string())
                    });
                    match cache::Writer::create(cache, identity, object.size, refetch) {
                        Ok(w) => {
                            cache_note = format!("; not in the cache ({why}), written through");
                            object.cache = Some(Arc::new(w));
                        }
                        Err(e) => {
                            log::warn!("cache: {}: not cached: {e}", info.path.display());
                            cache_note = format!("; not in the cache ({why}), and not cached: {e}");
                        }
                    }
                }
                // A hit comes only from an open cache.
                (cache::Lookup::Hit(_), None, _) => {}
                (cache::Lookup::Miss(why), _, _) => cache_note = format!("; {why}"),
            }
        }
        let facts = format!(
            "object of {} bytes, ETag {}",
            object.size,
            object.etag.as_deref().unwrap_or("none")
        );
        let part = self.config.object_part();
        let part = if part >= 1 << 20 {
            format!("{} MiB", part >> 20)
        } else {
            format!("{} KiB", part >> 10)
        };
        let reason = format!(
            "object storage: ranged GETs of {part}, as many in flight as the network's \
             bandwidth-delay product asks, more while more move more (at most {}), each \
             conditioned on the ETag{cache_note}",
            self.config.object_concurrency
        );
        let identity = Identity::Object { object: Box::new(object.without_cache()), copy: None };
        let choice = Choice { reader: ReaderKind::Object, reason };
        Ok(OpenedFile { id, reader: Reader::Object(object), choice, facts, identity })
    }

    /// Opens `copy` of object `info` (found in `cache`) for a load: read as a local file, each
    /// extent checked against the copy's record, `object` kept to replace what fails.
    #[allow(clippy::too_many_arguments)]
    fn open_copy(
        &self,
        id: FileId,
        info: &gantry_format::FileInfo,
        target: Target,
        volumes: &mut Vec<Volume>,
        copy: crate::source::cache::Copy,
        object: crate::source::object::ObjectFile,
        cache: Arc<crate::source::cache::CacheDir>,
    ) -> Result<OpenedFile> {
        let path = copy.path.clone();
        let opened = copy.file.try_clone().map_err(|source| Error::Io {
            op: "open",
            path: path.clone(),
            offset: 0,
            len: 0,
            source,
        })?;
        let (reader, mut choice, facts) =
            self.open_local(&path, Some(opened), info, target, volumes)?;
        choice.reason = format!(
            "from the cache ({}: ETag {} and size unchanged on the store; every extent checked \
             against the copy's record): {}",
            path.display(),
            object.etag.as_deref().unwrap_or_default(),
            choice.reason
        );
        let checked = crate::source::cache::check::Checked::new(copy, object.clone(), cache);
        let identity = Identity::Object { object: Box::new(object), copy: Some(Arc::new(checked)) };
        Ok(OpenedFile { id, reader, choice, facts, identity })
    }

    /// Probes and opens local file `path` (of checkpoint file `info`; `path` is `info.path`,
    /// or a cache copy, `copy` as the cache opened and checked it) with the reader the
    /// schedule picks: the reader, the choice and the facts it was made from (in one line).
    fn open_local(
        &self,
        path: &Path,
        copy: Option<std::fs::File>,
        info: &gantry_format::FileInfo,
        target: Target,
        volumes: &mut Vec<Volume>,
    ) -> Result<(Reader, Choice, String)> {
        let to_device = target != Target::Host;
        // A regular file, and the one whose header was read (a cache copy: the file the cache
        // opened and checked); O_DIRECT opens that same file again through its descriptor,
        // never whatever is at the path by now.
        let from_cache = copy.is_some();
        let plain = match copy {
            Some(file) => file,
            None => crate::engine::read::open_for_data(info)?,
        };
        let range = info.data_range();
        let direct = probe::open_direct(&crate::engine::read::reopen_path(&plain, path));
        let residency = probe::residency(&plain, range.start, range.end - range.start);
        let fs = probe::file_system(&plain, path);
        let facts = FileFacts {
            direct: direct.as_ref().map(|(_, align)| *align).map_err(Clone::clone),
            io_uring: probe::io_uring(),
            resident: residency.map(|(fraction, _)| fraction),
            resident_probe: residency.map_or("none", |(_, probe)| probe),
            to_device,
            gds: match from_cache {
                // cuFile reads straight to the GPU, where the copy's check cannot see them.
                true => Err("a cache copy is checked in host memory as it is read".to_owned()),
                false => gds_facts(target, self.config.path, self.config.verify_sha256, &plain),
            },
            fs,
        };
        let mut choice = schedule::choose(self.config.path, self.config.hot_fraction, &facts)?;
        if let (ReaderKind::Direct, Ok((_, align))) = (choice.reader, &direct) {
            if self.config.chunk_bytes as u64 % align != 0 {
                let reason = format!("direct I/O alignment {align} does not divide the chunk size");
                if self.config.path == crate::PathChoice::Direct {
                    return Err(Error::Unavailable { what: "O_DIRECT", reason });
                }
                choice = Choice { reader: ReaderKind::Buffered, reason };
            }
        }
        if let Some(advice) = facts.fs.advice() {
            choice.reason = format!("{}; {advice}", choice.reason);
        }
        log::debug!("{}: {} ({})", path.display(), choice.reader.name(), choice.reason);
        crate::trace::file_chosen(path, choice.reader, facts.resident);
        let open = |file, align| OpenFile {
            path: path.to_path_buf(),
            file,
            file_len: info.file_len,
            align,
            cache_copy: from_cache,
        };
        let reader = match (choice.reader, direct) {
            (ReaderKind::Direct, Ok((file, align))) => {
                let volume = self.volume_of(volumes, &file);
                Reader::Direct { file: open(file, align), volume }
            }
            (ReaderKind::Gds, direct) => {
                // cuFile wants an O_DIRECT descriptor; in compatibility mode a plain one works.
                let (file, align) = direct.unwrap_or((plain, 4096));
                Reader::Gds(open(file, align))
            }
            _ => Reader::Buffered(open(plain, 1)),
        };
        Ok((reader, choice, facts.summary()))
    }
}

/// Opens file `f` of a live source (`info`) for a load: its leased memfd, read with buffered
/// reads (shared memory: `O_DIRECT` does not apply).
fn open_live(
    id: FileId,
    info: &gantry_format::FileInfo,
    path: crate::PathChoice,
) -> Result<OpenedFile> {
    let (file, reason) = crate::source::live::open_for_load(info, path)?;
    let (path, file_len) = (info.path.clone(), info.file_len);
    let reader = Reader::Buffered(OpenFile { path, file, file_len, align: 1, cache_copy: false });
    let choice = Choice { reader: ReaderKind::Buffered, reason };
    let facts = "shared memory (a sealed memfd)".to_owned();
    Ok(OpenedFile { id, reader, choice, facts, identity: Identity::Local })
}

/// Per checkpoint file read with `O_DIRECT`, the volume it is on and how that is read, for
/// its report.
pub(crate) fn volume_notes(files: &Files) -> std::collections::HashMap<usize, String> {
    let mut notes = std::collections::HashMap::new();
    for opened in &files.opened {
        let Reader::Direct { volume, .. } = opened.reader else { continue };
        let v = &files.volumes[volume];
        notes.insert(
            opened.id.0,
            format!(
                "; on {}: {} KiB reads, {} in flight, {} of {} volume(s) read side by side",
                v.name,
                v.chunk_bytes >> 10,
                v.queue_depth,
                volume + 1,
                files.volumes.len()
            ),
        );
    }
    notes
}

/// Where a load's bytes go, as far as choosing readers is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// Host memory.
    Host,
    /// Device memory, one destination per tensor (readers may write it themselves).
    Device,
    /// Device memory, some tensors to several destinations (through staging only).
    Devices,
}

/// cuFile's facts for one file of a load: unavailable for host loads, real GPUDirect Storage
/// only when the driver supports it and the file is on NVMe, else compatibility mode (when
/// the driver allows it). Opening the cuFile driver takes hundreds of milliseconds, so `auto`
/// opens it only for files on NVMe, the only ones it could choose cuFile for.
fn gds_facts(
    target: Target,
    path: crate::PathChoice,
    verify_sha256: bool,
    file: &std::fs::File,
) -> Result<bool, String> {
    match target {
        Target::Host => return Err("host load".to_owned()),
        Target::Devices => {
            return Err("bytes go to several destinations: read once into staging, copied to each"
                .to_owned())
        }
        Target::Device => {}
    }
    if verify_sha256 {
        return Err(
            "the SHA-256 check hashes bytes in host memory; cuFile reads past it".to_owned()
        );
    }
    let on_nvme = crate::engine::read::gds::file_on_nvme(file);
    if path == crate::PathChoice::Auto && !on_nvme {
        return Err("not on NVMe, so no GPUDirect Storage (driver not opened)".to_owned());
    }
    let facts = crate::engine::read::gds::facts();
    facts.available.clone()?;
    if facts.real() && on_nvme {
        return Ok(true);
    }
    if facts.compat_allowed {
        Ok(false)
    } else {
        Err(format!(
            "nvidia-fs {}.{}, no P2PDMA for this file, and allow_compat_mode is off",
            facts.nvfs_version.0, facts.nvfs_version.1
        ))
    }
}
