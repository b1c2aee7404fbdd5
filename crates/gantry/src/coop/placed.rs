//! [`Loader::load_cooperative_placed`]: tensor-parallel shares (or any placement) on each rank
//! of a cooperative load, in bounded memory.
//!
//! The wanted tensors are taken a *window* at a time: about [`super::WINDOW_BYTES`], a slab of
//! every file (so that files on different volumes are still read side by side). The ranks read
//! and exchange a window whole, as a whole-tensor load does, into a scratch buffer on each
//! rank; then every rank copies its shares out of the scratch (one 2-D copy per share) and the
//! scratch takes the next window. Each byte is still read from storage by one rank; a rank
//! holds its shares and one window, whatever the model's size.
//!
//! Failures line up as in a whole-tensor load: a rank's failure while a window is read is told
//! in that window's rounds; one while it copies its shares, in the next window's first round,
//! or in the status exchange every rank joins after the last window.

use std::sync::Arc;
use std::time::Instant;

use gantry_format::{Checkpoint, TensorEntry};

use super::agree::{plan_word, Agreement};
use super::comm::Exchange;
use super::contract::{check_comm, volumes, CoopReport, Cooperation, Link};
use super::load::Landing;
use super::split::Split;
use crate::api::loader::{LoadReport, Loader};
use crate::api::placed::PlacedDeviceModel;
use crate::cuda::copy::{copy_rows, Rows, Source2d};
use crate::cuda::stream::Stream;
use crate::cuda::{CudaDevice, DeviceBuffer};
use crate::error::{Error, Result};
use crate::plan::placement::{rows_of, Layout, Share, ShareEntry};

/// Alignment of each file's slab in the scratch buffer.
const SLAB_ALIGN: u64 = 4096;

/// One rank's shares of a checkpoint loaded cooperatively, and what it did.
#[derive(Debug)]
pub struct CooperativePlacedModel {
    /// This rank's shares (one destination: this rank's GPU).
    pub model: PlacedDeviceModel,
    /// Reads and exchange on this rank (summed over the windows).
    pub coop: CoopReport,
}

/// One window of a cooperative placed load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// The tensors it covers.
    pub wanted: Vec<bool>,
    /// Per file, `(first file offset of its slab, the slab's offset in the scratch)`, or
    /// `None` when the window holds nothing of that file.
    pub slabs: Vec<Option<(u64, u64)>>,
    /// Scratch bytes it needs.
    pub bytes: u64,
}

impl Window {
    /// Per file, the address that plus a file offset is that byte's place in a scratch
    /// buffer at `scratch` (0 for files the window does not hold).
    pub fn bases(&self, scratch: u64) -> Vec<u64> {
        let base = |&(start, at): &(u64, u64)| scratch.wrapping_add(at).wrapping_sub(start);
        self.slabs.iter().map(|s| s.as_ref().map_or(0, base)).collect()
    }
}

/// Cuts the `wanted` tensors (with bytes) into windows of about `window_bytes`: each file's
/// wanted bytes in as many slabs as there are windows, a tensor in the slab where its first
/// byte falls, window `w` the `w`-th slab of every file. Pure: the same on every rank.
pub fn windows(checkpoint: &Checkpoint, wanted: &[bool], window_bytes: u64) -> Vec<Window> {
    assert_eq!(wanted.len(), checkpoint.tensors.len());
    let with_bytes = |i: usize| wanted[i] && checkpoint.tensors[i].len > 0;
    let total: u64 =
        (0..wanted.len()).filter(|&i| with_bytes(i)).map(|i| checkpoint.tensors[i].len).sum();
    if total == 0 {
        return Vec::new();
    }
    let n = total.div_ceil(window_bytes.max(1)) as usize;
    let files = checkpoint.files.len();
    let mut out =
        vec![Window { wanted: vec![false; wanted.len()], slabs: vec![None; files], bytes: 0 }; n];
    // Per file, per window: the span of the window's tensors in that file.
    let mut spans: Vec<Vec<Option<(u64, u64)>>> = vec![vec![None; n]; files];
    for (f, file_spans) in spans.iter_mut().enumerate() {
        let mut mine: Vec<usize> = (0..wanted.len())
            .filter(|&i| with_bytes(i) && checkpoint.tensors[i].file.0 == f)
            .collect();
        mine.sort_by_key(|&i| checkpoint.tensors[i].offset);
        let file_total: u64 = mine.iter().map(|&i| checkpoint.tensors[i].len).sum();
        let mut before = 0u64;
        for i in mine {
            let t = &checkpoint.tensors[i];
            let w = (u128::from(before) * n as u128 / u128::from(file_total)) as usize;
            before += t.len;
            out[w].wanted[i] = true;
            let span = file_spans[w].get_or_insert((t.offset, t.offset + t.len));
            *span = (span.0.min(t.offset), span.1.max(t.offset + t.len));
        }
    }
    for (w, window) in out.iter_mut().enumerate() {
        for (f, file_spans) in spans.iter().enumerate() {
            if let Some((start, end)) = file_spans[w] {
                window.slabs[f] = Some((start, window.bytes));
                window.bytes = (window.bytes + end - start).next_multiple_of(SLAB_ALIGN);
            }
        }
    }
    out.retain(|w| w.bytes > 0);
    out
}

impl Loader {
    /// Loads `checkpoint` onto `device` as one rank of a group of processes, one per GPU, each
    /// rank ending with the shares `place` gives it (`place(tensor)` lists `(rank, share)` for
    /// every rank, the same on every rank: the tensor-parallel rule of
    /// [`crate::plan::placement::tensor_parallel`], say). The ranks split the reads (each byte read
    /// from storage by one rank) and exchange a window of the checkpoint at a time
    /// ([`Cooperation::window_bytes`]); each rank keeps its shares of it. `on_ready(tensor)`
    /// is called on this thread once this rank's share of the tensor is in its memory.
    ///
    /// Failures are every rank's, as for [`Loader::load_cooperative`]. Without NCCL or with
    /// one rank, this rank reads its shares on its own and the report says why.
    pub fn load_cooperative_placed(
        &self,
        checkpoint: Checkpoint,
        device: &Arc<CudaDevice>,
        coop: Cooperation<'_>,
        place: impl FnMut(&TensorEntry) -> Result<Vec<(usize, Share)>>,
        mut on_ready: impl FnMut(&TensorEntry),
    ) -> Result<CooperativePlacedModel> {
        coop.check_rank()?;
        let layout = Layout::new(&checkpoint, coop.world, place)?;
        let mine = layout.shares[coop.rank].clone();
        let comm = match coop.link {
            Link::Nccl(comm) if coop.world > 1 => comm,
            _ => return self.placed_alone(checkpoint, device, &coop, mine, &mut on_ready),
        };
        check_comm(comm, &coop)?;
        let mut wanted = vec![false; checkpoint.tensors.len()];
        for share in layout.shares.iter().flatten() {
            wanted[share.tensor] |= share.len > 0;
        }
        let windows = windows(&checkpoint, &wanted, coop.window_bytes);
        let scratch_bytes = windows.iter().map(|w| w.bytes).max().unwrap_or(0);
        let own_bytes = layout.buffer_bytes[coop.rank];
        let buffer = device.alloc(own_bytes as usize, "this rank's shares");
        let scratch = device.alloc(scratch_bytes as usize, "the exchange window");
        let mut exchange = Exchange::new(comm, device, coop.timeout)?;
        let sizes = (coop.piece_bytes, coop.window_bytes);
        let plan = plan_word(coop.world, sizes, false, &wanted, &volumes(&checkpoint));
        exchange.agree_on(Agreement::new(&checkpoint, plan));
        let (buffer, scratch) = match (buffer, scratch) {
            (Ok(b), Ok(s)) => (b, s),
            (Err(e), _) | (_, Err(e)) => {
                let told = exchange.status(0, Some(&e.to_string()));
                return Err(told.err().unwrap_or(e));
            }
        };
        for s in mine.iter().filter(|s| s.len == 0) {
            on_ready(&checkpoint.tensors[s.tensor]);
        }
        let run = Windows { checkpoint: &checkpoint, device, mine: &mine, buffer: &buffer };
        let (report, coop_report) =
            run.load(self, &coop, &windows, &scratch, &mut exchange, &mut on_ready)?;
        drop(scratch);
        let layout = Layout {
            atoms: Vec::new(),
            copies: Vec::new(),
            shares: vec![mine],
            buffer_bytes: vec![own_bytes],
        };
        let model = PlacedDeviceModel::from_parts(checkpoint, layout, vec![buffer], report);
        Ok(CooperativePlacedModel { model, coop: coop_report })
    }

    /// The fallback: this rank reads its shares (`mine`) on its own.
    fn placed_alone(
        &self,
        checkpoint: Checkpoint,
        device: &Arc<CudaDevice>,
        coop: &Cooperation<'_>,
        mine: Vec<ShareEntry>,
        on_ready: &mut dyn FnMut(&TensorEntry),
    ) -> Result<CooperativePlacedModel> {
        let reason = coop.alone_reason();
        log::info!("rank {} of {}: {reason}", coop.rank, coop.world);
        let mut share_of = vec![None; checkpoint.tensors.len()];
        for s in &mine {
            share_of[s.tensor] = Some(s.share);
        }
        let mut i = 0;
        let place = |_: &TensorEntry| {
            let share = share_of[i].map(|s| vec![(0, s)]).unwrap_or_default();
            i += 1;
            Ok(share)
        };
        let devices = [Arc::clone(device)];
        let model = self.load_placed_to_devices(checkpoint, &devices, place, |_, t| on_ready(t))?;
        let report = model.report();
        let coop = CoopReport {
            rank: coop.rank,
            world: coop.world,
            cooperative: false,
            reason,
            read_bytes: report.read_bytes,
            owned_bytes: report.tensor_bytes,
            ..CoopReport::default()
        };
        Ok(CooperativePlacedModel { model, coop })
    }
}

/// The window-by-window part of a cooperative placed load.
struct Windows<'a> {
    checkpoint: &'a Checkpoint,
    device: &'a Arc<CudaDevice>,
    /// This rank's shares, in checkpoint order.
    mine: &'a [ShareEntry],
    /// Where they go.
    buffer: &'a DeviceBuffer,
}

impl Windows<'_> {
    /// Reads and exchanges each window into `scratch`, then copies this rank's shares out.
    fn load(
        &self,
        loader: &Loader,
        coop: &Cooperation<'_>,
        windows: &[Window],
        scratch: &DeviceBuffer,
        exchange: &mut Exchange<'_>,
        on_ready: &mut dyn FnMut(&TensorEntry),
    ) -> Result<(LoadReport, CoopReport)> {
        let start = Instant::now();
        // The first window's set-up (files opened and probed, staging mapped and locked) is not
        // part of the load's seconds, as for every other load; later windows' set-ups are.
        let mut first_setup = 0.0;
        let volume_of = volumes(self.checkpoint);
        let mut failed: Option<Error> = None;
        let mut total: Option<(LoadReport, CoopReport)> = None;
        let mut rounds = 0;
        for window in windows {
            let window_start = Instant::now();
            let bases = window.bases(scratch.ptr());
            let split = Split::new(
                self.checkpoint,
                &window.wanted,
                &volume_of,
                coop.world,
                coop.piece_bytes,
            );
            let at = Landing {
                checkpoint: self.checkpoint,
                device: self.device,
                wanted: &window.wanted,
                bases: &bases,
            };
            let (report, done) =
                loader.cooperate(at, &split, exchange, failed.take(), &mut |_| {})?;
            rounds += split.rounds.len();
            if total.is_none() {
                first_setup = (window_start.elapsed().as_secs_f64() - report.seconds).max(0.0);
            }
            let copy = Instant::now();
            match self.copy_shares(&window.wanted, &bases) {
                Ok(()) => self.report_ready(&window.wanted, on_ready),
                Err(e) => failed = Some(e), // told to the others in the next exchange
            }
            let mut step = CoopReport::cooperative(exchange.comm(), &split, &report);
            step.received_bytes = done.received_bytes;
            step.exchange_tail_seconds = done.tail_seconds;
            step.read_seconds = report.seconds - done.tail_seconds;
            step.share_copy_seconds = copy.elapsed().as_secs_f64();
            total = Some(match total {
                None => (report, step),
                Some(sum) => add(sum, (report, step)),
            });
        }
        // Every rank joins one last status exchange: a failure in the last window's copies.
        let statuses =
            exchange.status(rounds, failed.as_ref().map(|e| e.to_string()).as_deref())?;
        if let Some(e) = failed {
            return Err(e);
        }
        if let Some((rank, message)) =
            statuses.into_iter().enumerate().find_map(|(r, s)| s.map(|m| (r, m)))
        {
            return Err(Error::Rank { rank, world: coop.world, message });
        }
        let (mut report, mut coop_report) = total.unwrap_or_else(|| {
            let report = LoadReport::default();
            (report.clone(), CoopReport::cooperative(exchange.comm(), &Split::default(), &report))
        });
        report.seconds = start.elapsed().as_secs_f64() - first_setup;
        report.tensor_bytes = self.mine.iter().map(|s| s.len).sum();
        // Over every window's reads and exchange (each window's report judged its own).
        report.bound_by = super::load::verdict_now().or(report.bound_by);
        coop_report.windows = windows.len();
        Ok((report, coop_report))
    }

    /// Copies this rank's shares of the window's tensors from the scratch (`bases[f]` plus a
    /// file offset) into its buffer, and waits for the copies.
    fn copy_shares(&self, wanted: &[bool], bases: &[u64]) -> Result<()> {
        self.device.bind()?;
        let stream = Stream::new()?;
        let mut queued = Ok(());
        for s in self.mine.iter().filter(|s| wanted[s.tensor] && s.len > 0) {
            let t = &self.checkpoint.tensors[s.tensor];
            let rows = rows_of(t, s.share)?;
            let source = bases[t.file.0] + rows.first;
            let dest = self.buffer.ptr() + s.offset;
            let rows = Rows {
                source: Source2d::Device(source),
                pitch: rows.pitch,
                width: rows.width,
                count: rows.count,
            };
            // SAFETY: the rows lie inside the tensor's bytes, which the window put in the
            // scratch at `bases` (the exchange has completed); the destination is the share's
            // place in this rank's buffer; the stream is waited for below.
            queued = unsafe { copy_rows(rows, dest, &stream) };
            if queued.is_err() {
                break;
            }
        }
        let waited = stream.synchronize("share copies"); // then destroyed by its drop
        queued.and(waited)
    }

    /// Reports the window's tensors of which this rank holds a share.
    fn report_ready(&self, wanted: &[bool], on_ready: &mut dyn FnMut(&TensorEntry)) {
        for s in self.mine.iter().filter(|s| wanted[s.tensor] && s.len > 0) {
            on_ready(&self.checkpoint.tensors[s.tensor]);
        }
    }
}

/// Sums the figures of two windows.
fn add(a: (LoadReport, CoopReport), b: (LoadReport, CoopReport)) -> (LoadReport, CoopReport) {
    let (mut load, mut coop) = a;
    load.read_bytes += b.0.read_bytes;
    for (file, more) in load.files.iter_mut().zip(&b.0.files) {
        file.read_bytes += more.read_bytes;
        if file.reader.is_none() {
            file.reader = more.reader;
            file.reason.clone_from(&more.reason);
        }
    }
    coop.read_bytes += b.1.read_bytes;
    coop.owned_bytes += b.1.owned_bytes;
    coop.received_bytes += b.1.received_bytes;
    coop.pieces += b.1.pieces;
    coop.rounds += b.1.rounds;
    coop.exchange_tail_seconds += b.1.exchange_tail_seconds;
    coop.read_seconds += b.1.read_seconds;
    coop.share_copy_seconds += b.1.share_copy_seconds;
    (load, coop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(dir: &std::path::Path, shards: usize) -> Checkpoint {
        let spec = crate::tools::synth::SynthSpec {
            vocab: 128,
            hidden: 64,
            intermediate: 224,
            kv: 16,
            layers: 3,
            shards,
        };
        crate::tools::synth::write_checkpoint(dir, &spec, 0).unwrap();
        crate::open(dir).unwrap()
    }

    #[test]
    fn windows_cover_every_wanted_tensor_once_within_their_slabs() {
        let dir = tempfile::tempdir().unwrap();
        let c = checkpoint(dir.path(), 3);
        let mut wanted = vec![true; c.tensors.len()];
        wanted[1] = false;
        let total: u64 =
            c.tensors.iter().zip(&wanted).filter(|(_, &w)| w).map(|(t, _)| t.len).sum();
        for window_bytes in [1, 4096, total / 5, total / 2, total, u64::MAX] {
            let ws = windows(&c, &wanted, window_bytes);
            let mut seen = vec![0; c.tensors.len()];
            for w in &ws {
                let bases = w.bases(1 << 40);
                for (i, t) in c.tensors.iter().enumerate().filter(|(i, _)| w.wanted[*i]) {
                    seen[i] += 1;
                    let (start, at) = w.slabs[t.file.0].expect("the tensor's file has a slab");
                    assert!(t.offset >= start);
                    let place = bases[t.file.0] + t.offset - (1 << 40);
                    assert_eq!(place, at + t.offset - start);
                    assert!(place + t.len <= w.bytes, "tensor {i} past its window");
                }
                // Slabs do not overlap in the scratch.
                let mut placed: Vec<(u64, u64)> = Vec::new();
                for (f, slab) in w.slabs.iter().enumerate() {
                    let Some((start, at)) = *slab else { continue };
                    let end = c
                        .tensors
                        .iter()
                        .enumerate()
                        .filter(|(i, t)| w.wanted[*i] && t.file.0 == f)
                        .map(|(_, t)| t.offset + t.len - start + at)
                        .max()
                        .unwrap();
                    assert!(placed.iter().all(|&(a, b)| end <= a || at >= b), "slabs overlap");
                    placed.push((at, end));
                }
            }
            let expected: Vec<i32> = wanted.iter().map(|&w| i32::from(w)).collect();
            assert_eq!(seen, expected, "window bytes {window_bytes}");
            let most = ws.iter().map(|w| w.bytes).max().unwrap();
            let largest = c.tensors.iter().map(|t| t.len).max().unwrap();
            if window_bytes >= total {
                assert_eq!(ws.len(), 1);
            } else {
                // A window holds about its share: each file's slab may exceed it by a tensor.
                let files = c.files.len() as u64;
                assert!(most <= window_bytes + files * (largest + SLAB_ALIGN), "{most} bytes");
            }
        }
    }

    #[test]
    fn no_wanted_bytes_no_windows() {
        let dir = tempfile::tempdir().unwrap();
        let c = checkpoint(dir.path(), 1);
        assert!(windows(&c, &vec![false; c.tensors.len()], 1 << 20).is_empty());
    }
}
