//! Device residency of a live source: a server that also keeps each published file's data
//! section in GPU memory, and readers on the same host that copy from it (or, with
//! `share`, alias it) instead of reading host memory.
//!
//! The server (`gantry serve --device cuda:N`, [`super::ServerOptions::device`]) copies each
//! file's data section from its sealed memfd into one `cuMemAlloc` allocation when it
//! publishes, and exports the allocation's CUDA IPC handle. The allocations belong to the
//! publication, so the lease rules hold for them as for the memfds: a version's device memory
//! is freed when it is neither current nor leased, never under a reader.
//!
//! A reader that asks for device residency (any reader loading to a GPU) gets the handles after
//! the files (`DEVICE` messages) and maps them in its GPU's context (`cuIpcOpenMemHandle`,
//! peer access enabled lazily, so the server's GPU may be another one of the host: the copies
//! then go over NVLink or PCIe). Each mapping's length is checked against the allocation the
//! driver reports before any copy ([`crate::cuda::ImportedBuffer`]), and tensors are copied
//! in runs that are contiguous at both ends. What cannot be mapped (another host's server, a
//! GPU without peer access, the server's own process) is no error: the load reads the
//! memfds as from any live source, and its report says why.
//!
//! The trust rules are those of the host path: the reader trusts only a server of its own user
//! or root; the handles name writable memory, so the server hands them to readers of its own
//! user or root only (another user the socket's mode lets in reads the memfds); the digests
//! of the publication were computed from the memfds the device copies were made from.

use std::sync::Arc;
use std::time::Instant;

use gantry_format::Checkpoint;
use serde_json::{json, Value};

use super::protocol::{DeviceShare, FDS_PER_MESSAGE};
use crate::cuda::stream::{Event, Stream, WaitOnDrop};
use crate::cuda::{CudaDevice, DeviceBuffer, ImportedBuffer, IpcHandle};
use crate::error::{Error, Result};
use crate::{FileReport, LoadReport, ReaderKind};

/// Bytes read from a memfd and copied to the device at a time when publishing.
const PUBLISH_CHUNK: usize = 256 << 20;

/// Granularity of the allocations readers map (the driver's large page).
const SHARED_ALLOCATION_ALIGN: usize = 2 << 20;

/// One publication's device copies: per file, its data section and the allocation's handle
/// (`None` for a file without data).
#[derive(Debug)]
pub(crate) struct Residency {
    device: Arc<CudaDevice>,
    files: Vec<Option<(DeviceBuffer, IpcHandle)>>,
}

impl Residency {
    /// Copies each file's data section (`files`: memfd, data offset, data length) to `device`.
    pub(crate) fn build(
        device: &Arc<CudaDevice>,
        files: &[(&str, &std::fs::File, u64, u64)],
    ) -> Result<Self> {
        let mut out = Vec::with_capacity(files.len());
        let mut chunk = Vec::new();
        for &(name, memfd, offset, len) in files {
            if len == 0 {
                out.push(None);
                continue;
            }
            let len_usize =
                usize::try_from(len).map_err(|_| Error::Internal("a huge file".into()))?;
            // Whole 2 MiB pages: a reader maps the allocation in a fifth of a millisecond
            // then, against ~27 ms for an allocation of a data section's odd length (4 GB,
            // H100; benches/experiments/ipc_map.py --sizes).
            let rounded = len_usize.next_multiple_of(SHARED_ALLOCATION_ALIGN);
            let buffer = device.alloc(rounded, name)?;
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(PUBLISH_CHUNK as u64) as usize;
                chunk.resize(n, 0);
                std::os::unix::fs::FileExt::read_exact_at(memfd, &mut chunk, offset + done)
                    .map_err(|source| Error::Io {
                        op: "read",
                        path: name.into(),
                        offset: offset + done,
                        len: n as u64,
                        source,
                    })?;
                device.copy_from_host(buffer.ptr() + done, &chunk)?;
                done += n as u64;
            }
            // The padding readers may map holds zeros, not an earlier allocation's bytes.
            device.zero(buffer.ptr() + len, rounded - len_usize)?;
            let handle = buffer.ipc_handle()?;
            out.push(Some((buffer, handle)));
        }
        // Every copy from pageable memory, and every zeroing, has landed before a reader can
        // get a handle ([`Residency::messages`] comes after this returns).
        device.synchronize()?;
        Ok(Self { device: Arc::clone(device), files: out })
    }

    /// The `DEVICE` messages that hand the handles to a reader, [`FDS_PER_MESSAGE`] files each.
    pub(crate) fn messages(&self) -> Vec<Value> {
        let handles: Vec<Value> = self
            .files
            .iter()
            .map(|f| f.as_ref().map_or(Value::Null, |(_, h)| Value::String(h.to_hex())))
            .collect();
        handles
            .chunks(FDS_PER_MESSAGE)
            .enumerate()
            .map(|(k, chunk)| {
                json!({
                    "type": "device",
                    "first": k * FDS_PER_MESSAGE,
                    "count": chunk.len(),
                    "bus_id": self.device.bus_id(),
                    "handles": chunk,
                })
            })
            .collect()
    }
}

/// Copies the tensors `targets` names (device addresses on `device`) from `share`'s device
/// memory; `Ok(None)` when it cannot be mapped here (the load then reads the memfds).
/// `on_ready(i)` is called for each tensor once its bytes are in place.
pub(crate) fn fill(
    share: &DeviceShare,
    checkpoint: &Checkpoint,
    device: &Arc<CudaDevice>,
    targets: &[Option<u64>],
    on_ready: &mut dyn FnMut(usize),
) -> Result<Option<LoadReport>> {
    let start = Instant::now();
    let _load = crate::trace::span("phase", "load");
    let mut wanted = vec![false; checkpoint.files.len()];
    for (t, target) in checkpoint.tensors.iter().zip(targets) {
        if target.is_some() && t.len > 0 {
            wanted[t.file.0] = true;
        }
    }
    let Some(mapped) = map_files(share, checkpoint, device, &wanted) else { return Ok(None) };
    let same = share.bus_id.eq_ignore_ascii_case(device.bus_id());
    let how = if same {
        format!(
            "the live source's device memory on this GPU ({}): device-to-device copies",
            share.bus_id
        )
    } else {
        format!(
            "the live source's device memory on GPU {}: peer copies over NVLink or PCIe",
            share.bus_id
        )
    };
    let mut first_tensor = None;
    let mut per_file = vec![0u64; checkpoint.files.len()];
    // Every run's copy queued on one stream, an event after each; a run's tensors are ready
    // once its event has passed (a device-to-device copy does not wait for itself).
    // A blocking stream: the copies wait for what the caller queued before on the default
    // stream (a `torch.zeros` of the destination, say), as `cuMemcpy` did.
    let _bound = device.bind_scoped()?;
    let stream = Stream::blocking()?;
    // Whatever way this returns or unwinds (a panicking `on_ready`), no copy still runs once
    // the mappings and the destinations may go.
    let _waited = WaitOnDrop(&stream);
    let mut queued = Vec::new();
    for run in runs(checkpoint, targets) {
        let Some(source) = &mapped[run.file] else { continue };
        let data_offset = checkpoint.files[run.file].header.data_offset;
        let src = source.ptr() + (run.offset - data_offset);
        let began = crate::trace::now();
        // SAFETY: the source lies in the mapping (checked against the driver's allocation
        // when mapped), the destination is the caller's target for these tensors; the
        // mappings outlive the stream's work (waited for below, on success or failure).
        let done = unsafe { stream.copy_mapped(run.dst, src, run.len) }
            .and_then(|()| Event::record(&stream));
        match done {
            Ok(event) => queued.push((run, began, event)),
            Err(e) => {
                let _ = stream.synchronize("the live copies queued before a failure");
                return Err(e);
            }
        }
    }
    for (run, began, event) in queued {
        if let Err(e) = event.synchronize() {
            let _ = stream.synchronize("the live copies after a failure");
            return Err(e);
        }
        if let Some(began) = began {
            crate::trace::complete(began, None, "copy", "device copy", || {
                crate::trace::Args::new()
                    .u64("bytes", run.len)
                    .u64("gpu", u64::from(device.ordinal()))
            });
        }
        per_file[run.file] += run.len;
        for &i in &run.tensors {
            if first_tensor.is_none() && checkpoint.tensors[i].len > 0 {
                first_tensor = Some(start.elapsed().as_secs_f64());
            }
            on_ready(i);
        }
    }
    let files = file_reports(checkpoint, &mapped, &how, &per_file);
    let moved: u64 = per_file.iter().sum();
    Ok(Some(LoadReport {
        files,
        tensor_bytes: moved,
        read_bytes: moved,
        seconds: start.elapsed().as_secs_f64(),
        first_tensor_seconds: first_tensor,
        version: super::version_of(checkpoint),
        ..LoadReport::default()
    }))
}

/// Per file: read from its mapping (`how`), `moved[f]` bytes of it.
fn file_reports(
    checkpoint: &Checkpoint,
    mapped: &[Option<ImportedBuffer>],
    how: &str,
    moved: &[u64],
) -> Vec<FileReport> {
    let reports = checkpoint.files.iter().zip(mapped).zip(moved);
    reports
        .map(|((info, mapping), &read_bytes)| FileReport {
            path: info.path.clone(),
            reader: mapping.as_ref().map(|_| ReaderKind::Device),
            reason: how.to_owned(),
            facts: format!("CUDA IPC, {} bytes mapped", mapping.as_ref().map_or(0, |m| m.len())),
            read_bytes,
            integrity: None,
        })
        .collect()
}

/// The live server's device memory a shared model's tensors alias, mapped here, and the
/// lease that keeps it: the server frees a version only after its last lease ends.
#[derive(Debug)]
pub struct Aliased {
    mapped: Vec<Option<ImportedBuffer>>,
    _lease: Arc<super::Lease>,
}

impl Aliased {
    /// The device address, in this process, of file `f`'s data section (0 when it has none).
    pub(crate) fn base(&self, f: usize) -> u64 {
        self.mapped.get(f).and_then(Option::as_ref).map_or(0, ImportedBuffer::ptr)
    }
}

/// Maps every file of `lease`'s version with data on `device` for a model to alias;
/// `Ok(None)` when they cannot be mapped here (the load then copies from host memory).
pub(crate) fn alias(
    lease: Arc<super::Lease>,
    checkpoint: &Checkpoint,
    device: &Arc<CudaDevice>,
) -> Result<Option<(Aliased, LoadReport)>> {
    let start = Instant::now();
    let _load = crate::trace::span("phase", "load");
    let Some(share) = lease.device() else { return Ok(None) };
    let with_data: Vec<bool> = checkpoint.files.iter().map(|f| f.header.data_len > 0).collect();
    let Some(mapped) = map_files(share, checkpoint, device, &with_data) else { return Ok(None) };
    let how = format!(
        "aliases the live source's device memory on GPU {} (CUDA IPC): nothing copied",
        share.bus_id
    );
    let files = file_reports(checkpoint, &mapped, &how, &vec![0; checkpoint.files.len()]);
    let report = LoadReport {
        files,
        tensor_bytes: checkpoint.total_bytes(),
        seconds: start.elapsed().as_secs_f64(),
        first_tensor_seconds: Some(start.elapsed().as_secs_f64()),
        version: super::version_of(checkpoint),
        ..LoadReport::default()
    };
    Ok(Some((Aliased { mapped, _lease: lease }, report)))
}

/// Maps each `wanted` file; `None` (with the reason logged) when one cannot be.
fn map_files(
    share: &DeviceShare,
    checkpoint: &Checkpoint,
    device: &Arc<CudaDevice>,
    wanted: &[bool],
) -> Option<Vec<Option<ImportedBuffer>>> {
    if share.handles.len() != checkpoint.files.len() {
        log::info!(
            "live device residency: {} handles for {} files: reading host memory",
            share.handles.len(),
            checkpoint.files.len()
        );
        return None;
    }
    // One after another: mapping them on threads of their own was no faster (16 GB in four
    // files: 0.10 s threaded, 0.08 s in turn, on two H100 machines of the same kind).
    let mut mapped = Vec::with_capacity(wanted.len());
    for (f, info) in checkpoint.files.iter().enumerate() {
        if !wanted[f] {
            mapped.push(None);
            continue;
        }
        let Some(handle) = &share.handles[f] else {
            log::info!(
                "live device residency: no handle for {}: reading host memory",
                info.path.display()
            );
            return None;
        };
        let len = info.header.data_len as usize;
        let _span = crate::trace::span("phase", "map device memory")
            .args(|a| a.u64("bytes", len as u64).u64("file", f as u64));
        match device.import(handle, len, &info.path.display().to_string()) {
            Ok(m) => mapped.push(Some(m)),
            Err(e) => {
                log::info!(
                    "live device residency cannot be mapped on cuda:{} ({e}): reading host memory",
                    device.ordinal()
                );
                return None;
            }
        }
    }
    Some(mapped)
}

/// Tensors copied together: contiguous in the source file and at the destination.
#[derive(Debug, PartialEq)]
struct Run {
    file: usize,
    offset: u64,
    dst: u64,
    len: u64,
    tensors: Vec<usize>,
}

/// The wanted tensors (`targets`) as runs, in file and offset order (the checkpoint's order).
fn runs(checkpoint: &Checkpoint, targets: &[Option<u64>]) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (i, (t, target)) in checkpoint.tensors.iter().zip(targets).enumerate() {
        let Some(dst) = *target else { continue };
        match out.last_mut() {
            Some(r)
                if r.file == t.file.0 && r.offset + r.len == t.offset && r.dst + r.len == dst =>
            {
                r.len += t.len;
                r.tensors.push(i);
            }
            _ => out.push(Run {
                file: t.file.0,
                offset: t.offset,
                dst,
                len: t.len,
                tensors: vec![i],
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share_of(messages: &[Value], files: usize) -> Result<Option<DeviceShare>, String> {
        let mut share = None;
        for m in messages {
            DeviceShare::take(&mut share, m.as_object().unwrap(), files)?;
        }
        Ok(share)
    }

    #[test]
    fn handles_come_in_order_and_anything_else_is_refused() {
        let h = IpcHandle([7; 64]).to_hex();
        let m = |first: usize, handles: Vec<Value>, bus: &str| json!({"type": "device", "first": first, "count": handles.len(), "bus_id": bus, "handles": handles});
        let good = [
            m(0, vec![h.clone().into(), Value::Null], "0000:1A:00.0"),
            m(2, vec![h.clone().into()], "0000:1A:00.0"),
        ];
        let share = share_of(&good, 3).unwrap().unwrap();
        assert_eq!(share.handles, vec![Some(IpcHandle([7; 64])), None, Some(IpcHandle([7; 64]))]);
        assert_eq!(share.bus_id, "0000:1A:00.0");
        for bad in [
            vec![m(1, vec![h.clone().into()], "b")],    // out of order
            vec![m(0, vec![h.clone().into(); 4], "b")], // more than the files
            vec![m(0, vec![], "b")],                    // empty
            vec![m(0, vec!["zz".into()], "b")],         // not hex
            vec![m(0, vec![json!(5)], "b")],            // not a string
            vec![m(0, vec![h.clone().into()], "")],     // no bus id
            vec![m(0, vec![h.clone().into()], "a\nb")], // unprintable
            vec![m(0, vec![h.clone().into()], "a"), m(1, vec![Value::Null], "b")], // bus changed
        ] {
            assert!(share_of(&bad, 3).is_err(), "{bad:?}");
        }
        let mut wrong_count = m(0, vec![h.into()], "b");
        wrong_count["count"] = json!(2);
        assert!(share_of(&[wrong_count], 3).is_err());
    }

    #[test]
    fn runs_join_tensors_contiguous_at_both_ends_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let mut bytes = Vec::new();
        let header = br#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]},"c":{"dtype":"U8","shape":[4],"data_offsets":[8,12]}}"#;
        bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0; 12]);
        std::fs::write(&path, &bytes).unwrap();
        let checkpoint = Checkpoint::open(&path).unwrap();
        let base = checkpoint.files[0].header.data_offset;
        // a and b land side by side, c elsewhere.
        let runs = runs(&checkpoint, &[Some(1000), Some(1004), Some(5000)]);
        assert_eq!(runs.len(), 2);
        assert_eq!(
            (runs[0].offset, runs[0].dst, runs[0].len, runs[0].tensors.clone()),
            (base, 1000, 8, vec![0, 1])
        );
        assert_eq!((runs[1].offset, runs[1].dst, runs[1].len), (base + 8, 5000, 4));
        // a skipped tensor breaks the run.
        let runs = super::runs(&checkpoint, &[Some(1000), None, Some(1008)]);
        assert_eq!(runs.len(), 2);
    }
}
