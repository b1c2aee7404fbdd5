//! [`Loader::load_cooperative`]: whole tensors on every rank, each piece read from storage by
//! its owner straight into that rank's own device buffers (the normal pipeline, with targets
//! only for its pieces), then broadcast in place from there into every other rank's buffers
//! by the exchanger ([`super::rounds`]), which trails the reads by a round or two.
//!
//! A rank that fails tells the others in the next status exchange and returns its own error;
//! they stop their readers and return [`Error::Rank`] naming it. A rank that dies or stalls is
//! noticed by the others' timeout, which aborts the communicator.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use gantry_format::{Checkpoint, FileId, TensorEntry};

use super::agree::{plan_word, Agreement};
use super::comm::Exchange;
use super::contract::{check_comm, volumes, CoopReport, Cooperation, Link};
use super::rounds::{exchanger, Heard, Note, Tally};
use super::split::{Piece, Split};
use crate::api::device::{DeviceModel, ReadyOnDevice};
use crate::api::loader::{LoadReport, Loader};
use crate::cuda::{CudaDevice, DeviceBuffer};
use crate::engine::sink::cuda::CudaSink;
use crate::error::{Error, Result};
use crate::plan::placement::Share;
use crate::plan::{FileRange, ReadSet};
use crate::trace;

/// A checkpoint loaded cooperatively: this rank's tensors on its GPU, and what it did.
#[derive(Debug)]
pub struct CooperativeModel {
    /// The tensors (its report counts every tensor delivered, and the bytes this rank read).
    pub model: DeviceModel,
    /// Reads and exchange on this rank.
    pub coop: CoopReport,
}

/// Per tensor, whether the cooperative load delivers it: `place` must give every rank the
/// whole tensor, or none of them (tensor-parallel shares are not exchanged yet).
fn wanted_whole(
    checkpoint: &Checkpoint,
    world: usize,
    mut place: impl FnMut(&TensorEntry) -> Result<Vec<(usize, Share)>>,
) -> Result<Vec<bool>> {
    let mut wanted = Vec::with_capacity(checkpoint.tensors.len());
    for t in &checkpoint.tensors {
        let mut shares = place(t)?;
        shares.sort_by_key(|s| s.0);
        let whole = shares.len() == world
            && shares.iter().enumerate().all(|(r, &(d, s))| d == r && s == Share::Whole);
        if !shares.is_empty() && !whole {
            return Err(Error::placement(t, format!(
                "a cooperative load places each tensor whole on all {world} ranks or skips it; got {shares:?}"
            )));
        }
        wanted.push(whole);
    }
    Ok(wanted)
}

/// The pieces as ranges of the checkpoint's files (what the pipeline reads).
fn piece_ranges(split: &Split) -> Vec<FileRange> {
    let range = |p: &Piece| FileRange { file: FileId(p.file), offset: p.offset, len: p.len };
    split.pieces.iter().map(range).collect()
}

impl Loader {
    /// Loads `checkpoint` onto `device` as one rank of a group of processes, one per GPU: the
    /// ranks split the reads (each byte read from storage by one rank, balanced by bytes and
    /// spread across volumes; see `split`) and exchange what they read with NCCL, so
    /// that every rank ends with every tensor `place` gives it. `place` gives each tensor
    /// whole to every rank (`(r, Share::Whole)` for each `r`) or to none. `on_ready` is called
    /// on this thread as each tensor is complete in this rank's memory.
    ///
    /// With [`Link::Alone`] (no NCCL, world size 1) each rank reads its tensors on its own
    /// and the report says why. When a rank fails, every rank fails: the failed one with its
    /// own error, the others with [`Error::Rank`] naming it, or with [`Error::Nccl`] after
    /// `coop.timeout` when it stopped answering (the communicator is then aborted).
    pub fn load_cooperative(
        &self,
        checkpoint: Checkpoint,
        device: &Arc<CudaDevice>,
        coop: Cooperation<'_>,
        place: impl FnMut(&TensorEntry) -> Result<Vec<(usize, Share)>>,
        mut on_ready: impl FnMut(ReadyOnDevice<'_>),
    ) -> Result<CooperativeModel> {
        let wanted = wanted_whole(&checkpoint, coop.world, place)?;
        let mut buffers = Vec::with_capacity(checkpoint.files.len());
        for (f, file) in checkpoint.files.iter().enumerate() {
            let len =
                if checkpoint.file_wanted(&wanted, f) { file.header.data_len as usize } else { 0 };
            buffers.push(device.alloc(len, &file.path.display().to_string()));
        }
        // An allocation that failed is this rank's failure, which the others must hear of.
        let (buffers, failed): (Vec<_>, Vec<_>) = buffers.into_iter().partition(Result::is_ok);
        let failed = failed.into_iter().find_map(Result::err);
        let buffers: Vec<DeviceBuffer> = buffers.into_iter().map(|b| b.expect("ok")).collect();
        let addresses: Vec<u64> = buffers.iter().map(DeviceBuffer::ptr).collect();
        let bases = file_bases(&checkpoint, &addresses);
        let at = Landing { checkpoint: &checkpoint, device, wanted: &wanted, bases: &bases };
        let (report, coop) = self.run_cooperative(at, coop, failed, &mut on_ready)?;
        let model =
            DeviceModel::from_parts(checkpoint, buffers, wanted, report, Arc::clone(device));
        Ok(CooperativeModel { model, coop })
    }

    /// [`Loader::load_cooperative`] into the caller's device memory: `file_buffers[f]` is the
    /// device address of a copy of file `f`'s data section (`data_len` bytes, in `device`'s
    /// primary context) for every file with a `wanted` tensor, 0 for the others. Every rank
    /// must want the same tensors. For bindings that own the memory they hand out.
    pub fn load_cooperative_into(
        &self,
        checkpoint: &Checkpoint,
        device: &Arc<CudaDevice>,
        coop: Cooperation<'_>,
        wanted: &[bool],
        file_buffers: &[u64],
        mut on_ready: impl FnMut(ReadyOnDevice<'_>),
    ) -> Result<(LoadReport, CoopReport)> {
        if wanted.len() != checkpoint.tensors.len() || file_buffers.len() != checkpoint.files.len()
        {
            return Err(Error::Config(format!(
                "{} wanted flags and {} file buffers for {} tensors in {} files",
                wanted.len(),
                file_buffers.len(),
                checkpoint.tensors.len(),
                checkpoint.files.len()
            )));
        }
        device.bind()?;
        for (f, file) in checkpoint.files.iter().enumerate() {
            if checkpoint.file_wanted(wanted, f) && file.header.data_len > 0 {
                device.check_range(file_buffers[f], file.header.data_len).map_err(|message| {
                    Error::Destination { tensor: file.path.display().to_string(), message }
                })?;
            }
        }
        let bases = file_bases(checkpoint, file_buffers);
        let at = Landing { checkpoint, device, wanted, bases: &bases };
        self.run_cooperative(at, coop, None, &mut on_ready)
    }

    /// Reads alone, or splits the reads and exchanges, into the file buffers of `at`;
    /// `failed` is an error this rank already has (told to the others, then returned).
    fn run_cooperative(
        &self,
        at: Landing<'_>,
        coop: Cooperation<'_>,
        failed: Option<Error>,
        on_ready: &mut dyn FnMut(ReadyOnDevice<'_>),
    ) -> Result<(LoadReport, CoopReport)> {
        coop.check_rank()?;
        let Landing { checkpoint, device, wanted, .. } = at;
        let comm = match coop.link {
            Link::Nccl(comm) if coop.world > 1 => comm,
            _ => {
                if let Some(e) = failed {
                    return Err(e);
                }
                let reason = coop.alone_reason();
                return self.read_alone(at, &coop, reason, on_ready);
            }
        };
        check_comm(comm, &coop)?;
        let mut exchange = Exchange::new(comm, device, coop.timeout)?;
        let volume_of = volumes(checkpoint);
        // A hashed load reads each file on one rank (SHA-256 takes a file's bytes in order, in
        // one place), still each byte once across the ranks.
        let whole_files = self.settings().verify_sha256;
        let sizes = (coop.piece_bytes, 0);
        let plan = plan_word(coop.world, sizes, whole_files, wanted, &volume_of);
        exchange.agree_on(Agreement::new(checkpoint, plan));
        let split = if whole_files {
            Split::whole_files(checkpoint, wanted, coop.world, coop.piece_bytes)
        } else {
            Split::new(checkpoint, wanted, &volume_of, coop.world, coop.piece_bytes)
        };
        let (mut report, done) = self.cooperate(at, &split, &mut exchange, failed, on_ready)?;
        report.tensor_bytes =
            checkpoint.tensors.iter().zip(wanted).filter(|(_, &w)| w).map(|(t, _)| t.len).sum();
        let mut coop_report = CoopReport::cooperative(comm, &split, &report);
        coop_report.received_bytes = done.received_bytes;
        coop_report.exchange_tail_seconds = done.tail_seconds;
        coop_report.read_seconds = report.seconds - done.tail_seconds;
        Ok((report, coop_report))
    }

    /// The fallback: this rank reads every tensor it wants on its own into the buffers of
    /// `at`.
    fn read_alone(
        &self,
        at: Landing<'_>,
        coop: &Cooperation<'_>,
        reason: String,
        on_ready: &mut dyn FnMut(ReadyOnDevice<'_>),
    ) -> Result<(LoadReport, CoopReport)> {
        let Landing { checkpoint, device, wanted, bases } = at;
        log::info!("rank {} of {}: {reason}", coop.rank, coop.world);
        let mut i = 0;
        let target = |t: &TensorEntry| {
            let ptr = wanted[i].then(|| bases[t.file.0] + t.offset);
            i += 1;
            ptr
        };
        let report = self.load_into_device(checkpoint, device, target, on_ready)?;
        let coop = CoopReport {
            rank: coop.rank,
            world: coop.world,
            cooperative: false,
            reason,
            read_bytes: report.read_bytes,
            owned_bytes: report.tensor_bytes,
            ..CoopReport::default()
        };
        Ok((report, coop))
    }

    /// One exchange: reads this rank's pieces of `split` into the buffers of `at` (whose
    /// `wanted` are the tensors the split covers) while the exchanger runs the rounds, and
    /// reports each tensor as it is complete here. `failed` is an error this rank already
    /// has: it is told to the others at the first round, then returned.
    pub(super) fn cooperate(
        &self,
        at: Landing<'_>,
        split: &Split,
        exchange: &mut Exchange<'_>,
        failed: Option<Error>,
        on_ready: &mut dyn FnMut(ReadyOnDevice<'_>),
    ) -> Result<(LoadReport, Exchanged)> {
        let Landing { checkpoint, wanted, bases, .. } = at;
        let (rank, world) = (exchange.rank(), exchange.world());
        // One timeline for the reads and the exchange: the caller's, else our own when asked
        // for (the pipeline's load then records into it rather than making one).
        let own = match (&self.settings().trace, trace::current()) {
            (Some(_), None) => Some(trace::Trace::new()),
            _ => None,
        };
        let _in = trace::enter(own.as_ref(), "load");
        let trace = trace::current();
        let mut tally = Tally::new(checkpoint, split, rank);
        let (notes, notes_rx) = mpsc::channel();
        let (heard_tx, heard) = mpsc::channel();
        std::thread::scope(|s| {
            let thread = std::thread::Builder::new()
                .name("gantry-coop-exchange".into())
                .spawn_scoped(s, move || {
                    let _in = trace::enter(trace.as_ref(), "exchange");
                    exchanger(split, rank, world, bases, exchange, notes_rx, heard_tx)
                })
                .map_err(|source| Error::Resource {
                    what: "spawning the exchange thread",
                    source,
                })?;
            let mut stopped = false; // the readers stopped because the exchange failed
            let read = match failed {
                Some(e) => Err(e),
                None => {
                    tally.ready_at_once(checkpoint, wanted, bases, on_ready);
                    let mut pipe = Pipe { notes: &notes, heard: &heard, stopped: &mut stopped };
                    self.read_pieces(at, split, &mut tally, &mut pipe, on_ready)
                }
            };
            let tail = Instant::now();
            if let Err(e) = &read {
                let _ = notes.send(Note::Failed(e.to_string()));
            }
            drop(notes);
            tally.hear(&heard, true, checkpoint, bases, on_ready);
            if thread.join().is_err() {
                return Err(Error::Internal("the exchange thread panicked".into()));
            }
            let done = Exchanged {
                received_bytes: tally.received_bytes,
                tail_seconds: tail.elapsed().as_secs_f64(),
            };
            match (read, tally.done.take()) {
                (Ok(report), Some(Ok(()))) => {
                    let seconds = report.seconds + done.tail_seconds;
                    // The verdict again, now that the exchanger's events are in.
                    let bound_by = verdict_now().or(report.bound_by);
                    if let (Some(t), Some(path)) = (&own, &self.settings().trace) {
                        t.write(path)?;
                    }
                    Ok((LoadReport { seconds, bound_by, ..report }, done))
                }
                (Ok(_), outcome) => Err(exchange_failure(outcome)),
                (Err(_), outcome @ Some(Err(_))) if stopped => Err(exchange_failure(outcome)),
                (Err(own), _) => Err(own),
            }
        })
    }

    /// Runs the pipeline over this rank's pieces of `split`, telling the exchanger as each
    /// lands and handling what it says between pieces.
    fn read_pieces(
        &self,
        at: Landing<'_>,
        split: &Split,
        tally: &mut Tally<'_>,
        pipe: &mut Pipe<'_>,
        on_ready: &mut dyn FnMut(ReadyOnDevice<'_>),
    ) -> Result<LoadReport> {
        let Landing { checkpoint, device, bases, .. } = at;
        let rank = tally.rank();
        let pieces = piece_ranges(split);
        let mine: Vec<bool> = split.pieces.iter().map(|p| p.owner == rank).collect();
        let targets: Vec<Option<u64>> =
            pieces.iter().zip(&mine).map(|(p, &m)| m.then(|| bases[p.file.0] + p.offset)).collect();
        let cancel = Arc::new(AtomicBool::new(false));
        let lent = self.lend(Arc::clone(&cancel), split.rank_bytes.len());
        let user_cancel = self.settings().cancel.clone();
        let lens: Vec<u64> = pieces.iter().map(|p| p.len).collect();
        let run = CudaSink::new(device, targets, &lens).and_then(|mut sink| {
            let reads = ReadSet::new(&checkpoint.files, &pieces);
            lent.run(reads, &mine, &mut sink, Some(device), &mut |piece| {
                if user_cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
                    cancel.store(true, Ordering::Relaxed);
                    return;
                }
                tally.deliver(piece, checkpoint, bases, on_ready);
                let _ = pipe.notes.send(Note::Landed(piece));
                tally.hear(pipe.heard, false, checkpoint, bases, on_ready);
                if tally.failure(&cancel).is_some() {
                    *pipe.stopped = true;
                }
            })
        });
        self.take_back(lent);
        run
    }
}

/// Where a rank's reads of a cooperative load land: the checkpoint, this rank's GPU, the
/// tensors it wants, and per file the device address of the file's byte 0 (`bases[f]` plus a
/// tensor's file offset is the tensor's address; see [`file_bases`]).
#[derive(Clone, Copy)]
pub(super) struct Landing<'a> {
    pub(super) checkpoint: &'a Checkpoint,
    pub(super) device: &'a Arc<CudaDevice>,
    pub(super) wanted: &'a [bool],
    pub(super) bases: &'a [u64],
}

/// Per file, the address of its byte 0 when its data section starts at `addresses[f]`
/// (wrapping: a file with nothing wanted has address 0, and nothing is added to its base).
pub(super) fn file_bases(checkpoint: &Checkpoint, addresses: &[u64]) -> Vec<u64> {
    (checkpoint.files.iter().zip(addresses))
        .map(|(f, &a)| a.wrapping_sub(f.header.data_offset))
        .collect()
}

/// The channels between the caller's thread and the exchanger, and whether the exchange
/// stopped the readers.
struct Pipe<'a> {
    notes: &'a mpsc::Sender<Note>,
    heard: &'a mpsc::Receiver<Heard>,
    stopped: &'a mut bool,
}

/// What an exchange did beside the reads.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Exchanged {
    /// Bytes received from the other ranks.
    pub(super) received_bytes: u64,
    /// Seconds from this rank's last read to the end of the exchange.
    pub(super) tail_seconds: f64,
}

/// The verdict on the trace the calling thread is in, as it stands.
pub(super) fn verdict_now() -> Option<trace::Verdict> {
    trace::current().and_then(|t| trace::measure(&t.events())).map(|u| trace::verdict(&u))
}

/// The exchanger's error (it always says why it stopped).
fn exchange_failure(outcome: Option<Result<()>>) -> Error {
    match outcome {
        Some(Err(e)) => e,
        _ => Error::Internal("the exchange ended before its last round".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::placement::{even, Slice};

    #[test]
    fn a_cooperative_load_takes_whole_tensors_on_every_rank_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let spec = crate::tools::synth::SynthSpec {
            vocab: 64,
            hidden: 64,
            intermediate: 224,
            kv: 16,
            layers: 1,
            shards: 1,
        };
        crate::tools::synth::write_checkpoint(dir.path(), &spec, 0).unwrap();
        let c = crate::open(dir.path()).unwrap();
        let all = wanted_whole(&c, 3, |_| Ok((0..3).rev().map(|r| (r, Share::Whole)).collect()));
        assert_eq!(all.unwrap(), vec![true; c.tensors.len()]);
        let norms = wanted_whole(&c, 2, |t| {
            Ok(if t.name.contains("norm") {
                vec![(0, Share::Whole), (1, Share::Whole)]
            } else {
                vec![]
            })
        })
        .unwrap();
        let want: Vec<bool> = c.tensors.iter().map(|t| t.name.contains("norm")).collect();
        assert_eq!(norms, want);
        type Place = dyn Fn(&TensorEntry) -> Result<Vec<(usize, Share)>>;
        let refused: &[&Place] = &[
            &|_| Ok(vec![(0, Share::Whole)]),
            &|_| Ok(vec![(0, Share::Whole), (0, Share::Whole)]),
            &|_| Ok(vec![(0, Share::Whole), (2, Share::Whole)]),
            &|t| Ok(vec![(0, Share::Slice(even(t, 0, 1, 0)?)), (1, Share::Whole)]),
            &|_| Ok(vec![(0, Share::Slice(Slice { dim: 0, start: 0, len: 1 })), (1, Share::Whole)]),
        ];
        for place in refused {
            let err = wanted_whole(&c, 2, place).unwrap_err();
            assert!(err.to_string().contains("whole on all 2 ranks"), "{err}");
        }
    }
}
