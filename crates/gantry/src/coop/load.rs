//! [`Loader::load_cooperative`]: whole tensors on every rank, each piece read from storage by
//! its owner straight into that rank's own device buffers (the normal pipeline, with targets
//! only for its pieces), then broadcast in place from there into every other rank's buffers.
//!
//! The consumer thread drives the exchange: as this rank's piece of round `k` lands, it joins
//! round `k`'s status exchange (every rank says whether it failed) and then issues round `k`'s
//! broadcasts as one group, without waiting for them; the readers go on with the next pieces
//! meanwhile. The status exchange of round `k + 1` completes only after round `k`'s broadcasts
//! did (one stream), which is when the tensors received in round `k` are reported ready.
//!
//! A rank that fails tells the others in the next status exchange and returns its own error;
//! they stop their readers and return [`Error::Rank`] naming it. A rank that dies or stalls is
//! noticed by the others' timeout, which aborts the communicator.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_format::{Checkpoint, Dtype, FileId, TensorEntry};

use super::comm::{Communicator, Exchange, TIMEOUT};
use super::split::{Split, PIECE_BYTES};
use crate::device::{DeviceModel, ReadyOnDevice};
use crate::error::{Error, Result};
use crate::loader::{LoadReport, Loader};
use crate::memory::{CudaDevice, DeviceBuffer};
use crate::placement::Share;
use crate::sink::cuda::CudaSink;

/// How the ranks of a cooperative load reach each other.
#[derive(Debug)]
pub enum Link<'a> {
    /// Over this communicator (its rank and size are the load's).
    Nccl(&'a Communicator),
    /// Not at all: each rank reads everything it needs itself, for the reason given.
    Alone(String),
}

/// One rank's part in a cooperative load.
#[derive(Debug)]
pub struct Cooperation<'a> {
    /// This rank.
    pub rank: usize,
    /// Ranks in the load.
    pub world: usize,
    /// How the ranks reach each other.
    pub link: Link<'a>,
    /// Largest piece read by one rank (default [`PIECE_BYTES`]).
    pub piece_bytes: u64,
    /// How long a rank waits for the others before it gives up (default [`TIMEOUT`]).
    pub timeout: Duration,
}

impl<'a> Cooperation<'a> {
    /// The ranks of `comm`, exchanging over it.
    pub fn nccl(comm: &'a Communicator) -> Self {
        Self {
            rank: comm.rank(),
            world: comm.world(),
            link: Link::Nccl(comm),
            piece_bytes: PIECE_BYTES,
            timeout: TIMEOUT,
        }
    }

    /// Rank `rank` of `world`, reading on its own because of `reason`.
    pub fn alone(rank: usize, world: usize, reason: impl Into<String>) -> Self {
        Self {
            rank,
            world,
            link: Link::Alone(reason.into()),
            piece_bytes: PIECE_BYTES,
            timeout: TIMEOUT,
        }
    }

    /// Sets how long a rank waits for the others.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the largest piece one rank reads.
    pub fn piece_bytes(mut self, bytes: u64) -> Self {
        self.piece_bytes = bytes.max(1);
        self
    }
}

/// What a cooperative load did on this rank.
#[derive(Debug, Clone, Default)]
pub struct CoopReport {
    /// This rank.
    pub rank: usize,
    /// Ranks in the load.
    pub world: usize,
    /// Whether the ranks split the reads and exchanged them (else this rank read alone).
    pub cooperative: bool,
    /// The communicator used, or why this rank read on its own.
    pub reason: String,
    /// Bytes this rank read from storage (its pieces, with alignment).
    pub read_bytes: u64,
    /// Bytes of the pieces this rank read and broadcast.
    pub owned_bytes: u64,
    /// Bytes received from the other ranks.
    pub received_bytes: u64,
    /// Pieces of the whole load.
    pub pieces: usize,
    /// Exchange rounds.
    pub rounds: usize,
    /// Seconds from this rank's last read to the end of the exchange.
    pub exchange_tail_seconds: f64,
}

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
            return Err(Error::Config(format!(
                "tensor '{}': a cooperative load places each tensor whole on all {world} ranks or skips it; got {shares:?}",
                t.name
            )));
        }
        wanted.push(whole);
    }
    Ok(wanted)
}

/// Per file, a volume number: files on the same disk share one (object storage: one for all).
fn volumes(checkpoint: &Checkpoint) -> Vec<usize> {
    use std::os::unix::fs::MetadataExt;
    let mut names: Vec<String> = Vec::new();
    checkpoint
        .files
        .iter()
        .map(|f| {
            let name = if crate::io::object::is_url(&f.path) {
                "object storage".to_owned()
            } else {
                std::fs::metadata(&f.path)
                    .map_or_else(|_| "unknown".to_owned(), |m| crate::io::probe::disk(m.dev()).0)
            };
            names.iter().position(|n| *n == name).unwrap_or_else(|| {
                names.push(name);
                names.len() - 1
            })
        })
        .collect()
}

/// The pieces as a tensor table over the same files (what the pipeline reads).
fn piece_table(checkpoint: &Checkpoint, split: &Split) -> Checkpoint {
    let tensors = split
        .pieces
        .iter()
        .enumerate()
        .map(|(i, p)| TensorEntry {
            name: format!("piece {i}"),
            dtype: Dtype::U8,
            shape: vec![p.len],
            file: FileId(p.file),
            offset: p.offset,
            len: p.len,
        })
        .collect();
    Checkpoint {
        files: checkpoint.files.clone(),
        tensors,
        index_metadata: checkpoint.index_metadata.clone(),
    }
}

impl Loader {
    /// Loads `checkpoint` onto `device` as one rank of a group of processes, one per GPU: the
    /// ranks split the reads (each byte read from storage by one rank, balanced by bytes and
    /// spread across volumes; see [`super::split`]) and exchange what they read with NCCL, so
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
        let (report, coop) = self.run_cooperative(
            &checkpoint,
            device,
            coop,
            &wanted,
            &addresses,
            failed,
            &mut on_ready,
        )?;
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
        self.run_cooperative(checkpoint, device, coop, wanted, file_buffers, None, &mut on_ready)
    }

    /// Reads alone, or splits the reads and exchanges, into the file buffers at `addresses`;
    /// `failed` is an error this rank already has (told to the others, then returned).
    #[allow(clippy::too_many_arguments)]
    fn run_cooperative(
        &self,
        checkpoint: &Checkpoint,
        device: &Arc<CudaDevice>,
        coop: Cooperation<'_>,
        wanted: &[bool],
        addresses: &[u64],
        failed: Option<Error>,
        on_ready: &mut dyn FnMut(ReadyOnDevice<'_>),
    ) -> Result<(LoadReport, CoopReport)> {
        if coop.rank >= coop.world {
            return Err(Error::Config(format!(
                "rank {} of {}: no such rank",
                coop.rank, coop.world
            )));
        }
        let bases: Vec<u64> = checkpoint
            .files
            .iter()
            .zip(addresses)
            .map(|(f, &a)| a.wrapping_sub(f.header.data_offset))
            .collect();
        let comm = match coop.link {
            Link::Nccl(comm) if coop.world > 1 => comm,
            _ => {
                if let Some(e) = failed {
                    return Err(e);
                }
                let reason = match &coop.link {
                    Link::Alone(reason) => format!("each rank reads on its own: {reason}"),
                    Link::Nccl(_) => "world size 1: nothing to share".to_owned(),
                };
                return self
                    .read_alone(checkpoint, device, &coop, wanted, &bases, reason, on_ready);
            }
        };
        if (comm.rank(), comm.world()) != (coop.rank, coop.world) {
            return Err(Error::Config(format!(
                "the communicator is rank {} of {}, the load rank {} of {}",
                comm.rank(),
                comm.world(),
                coop.rank,
                coop.world
            )));
        }
        let mut exchange = Exchange::new(comm, device, coop.timeout)?;
        let mut state = State::new(checkpoint, wanted, &coop);
        let outcome = match failed {
            Some(e) => Err(e),
            None => self.cooperate(checkpoint, device, &bases, &mut state, &mut exchange, on_ready),
        };
        let mut report = match outcome {
            Ok(report) => report,
            Err(e) => return Err(state.fail(&mut exchange, e)),
        };
        report.tensor_bytes =
            checkpoint.tensors.iter().zip(wanted).filter(|(_, &w)| w).map(|(t, _)| t.len).sum();
        let coop_report = state.report(comm, &report);
        Ok((report, coop_report))
    }

    /// The fallback: this rank reads every tensor it wants on its own (`bases[f]` plus a
    /// tensor's file offset is its address).
    #[allow(clippy::too_many_arguments)]
    fn read_alone(
        &self,
        checkpoint: &Checkpoint,
        device: &Arc<CudaDevice>,
        coop: &Cooperation<'_>,
        wanted: &[bool],
        bases: &[u64],
        reason: String,
        on_ready: &mut dyn FnMut(ReadyOnDevice<'_>),
    ) -> Result<(LoadReport, CoopReport)> {
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

    /// Reads this rank's pieces into the file buffers at `bases` (plus file offsets) and
    /// runs the exchange.
    fn cooperate(
        &self,
        checkpoint: &Checkpoint,
        device: &Arc<CudaDevice>,
        bases: &[u64],
        state: &mut State,
        exchange: &mut Exchange<'_>,
        on_ready: &mut dyn FnMut(ReadyOnDevice<'_>),
    ) -> Result<LoadReport> {
        state.ready_at_once(checkpoint, bases, on_ready);
        let pieces = piece_table(checkpoint, &state.split);
        let mine: Vec<bool> = state.split.pieces.iter().map(|p| p.owner == state.rank).collect();
        let targets: Vec<Option<u64>> = pieces
            .tensors
            .iter()
            .zip(&mine)
            .map(|(p, &m)| m.then(|| bases[p.file.0] + p.offset))
            .collect();
        let cancel = Arc::new(AtomicBool::new(false));
        let lent = self.lend(Arc::clone(&cancel));
        let user_cancel = self.config().cancel.clone();
        let run = CudaSink::new(device, targets, &pieces).and_then(|mut sink| {
            lent.run(&pieces, &mine, &mut sink, Some(device), &mut |piece| {
                if user_cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
                    cancel.store(true, Ordering::Relaxed);
                    return;
                }
                state.landed(piece, checkpoint, bases, on_ready);
                if let Err(e) = state.advance(exchange, checkpoint, bases, on_ready) {
                    state.failed = Some(e);
                    cancel.store(true, Ordering::Relaxed);
                }
            })
        });
        self.take_back(lent);
        let report = match (run, state.failed.take()) {
            (_, Some(e)) => return Err(e),
            (Err(e), None) => return Err(e),
            (Ok(report), None) => report,
        };
        let tail = Instant::now();
        state.advance(exchange, checkpoint, bases, on_ready)?;
        state.finish(exchange, checkpoint, bases, on_ready)?;
        state.tail_seconds = tail.elapsed().as_secs_f64();
        Ok(LoadReport { seconds: report.seconds + state.tail_seconds, ..report })
    }
}

/// Where one rank's cooperative load stands: which of its pieces landed, which round is
/// next, which tensors are still incomplete.
#[derive(Debug)]
struct State {
    split: Split,
    rank: usize,
    world: usize,
    wanted: Vec<bool>,
    /// Per tensor, pieces not yet in this rank's memory.
    pending: Vec<u32>,
    /// Per piece, its round.
    round_of: Vec<usize>,
    /// Per round, whether this rank's piece of it has landed (true when it has none).
    mine_landed: Vec<bool>,
    next_round: usize,
    /// The error that stopped the load while the pipeline ran.
    failed: Option<Error>,
    /// Whether the error came from the exchange itself (then the status exchange cannot
    /// carry it).
    exchange_error: bool,
    received_bytes: u64,
    tail_seconds: f64,
}

impl State {
    fn new(checkpoint: &Checkpoint, wanted: &[bool], coop: &Cooperation<'_>) -> Self {
        let split =
            Split::new(checkpoint, wanted, &volumes(checkpoint), coop.world, coop.piece_bytes);
        let mut pending = vec![0u32; checkpoint.tensors.len()];
        for p in &split.pieces {
            for t in p.tensors.clone() {
                pending[t] += 1;
            }
        }
        let mut round_of = vec![0; split.pieces.len()];
        let mut mine_landed = vec![true; split.rounds.len()];
        for (k, round) in split.rounds.iter().enumerate() {
            for &i in round {
                round_of[i] = k;
                if split.pieces[i].owner == coop.rank {
                    mine_landed[k] = false;
                }
            }
        }
        Self {
            split,
            rank: coop.rank,
            world: coop.world,
            wanted: wanted.to_vec(),
            pending,
            round_of,
            mine_landed,
            next_round: 0,
            failed: None,
            exchange_error: false,
            received_bytes: 0,
            tail_seconds: 0.0,
        }
    }

    /// Reports the wanted tensors that have no bytes to wait for.
    fn ready_at_once(
        &self,
        checkpoint: &Checkpoint,
        bases: &[u64],
        on_ready: &mut dyn FnMut(ReadyOnDevice<'_>),
    ) {
        for (i, t) in checkpoint.tensors.iter().enumerate() {
            if self.wanted[i] && self.pending[i] == 0 {
                on_ready(ReadyOnDevice { index: i, entry: t, ptr: bases[t.file.0] + t.offset });
            }
        }
    }

    /// This rank's piece `piece` has landed in its memory.
    fn landed(
        &mut self,
        piece: usize,
        checkpoint: &Checkpoint,
        bases: &[u64],
        on_ready: &mut dyn FnMut(ReadyOnDevice<'_>),
    ) {
        self.mine_landed[self.round_of[piece]] = true;
        self.deliver(piece, checkpoint, bases, on_ready);
    }

    fn deliver(
        &mut self,
        piece: usize,
        checkpoint: &Checkpoint,
        bases: &[u64],
        on_ready: &mut dyn FnMut(ReadyOnDevice<'_>),
    ) {
        for i in self.split.pieces[piece].tensors.clone() {
            self.pending[i] -= 1;
            if self.pending[i] == 0 {
                let t = &checkpoint.tensors[i];
                on_ready(ReadyOnDevice { index: i, entry: t, ptr: bases[t.file.0] + t.offset });
            }
        }
    }

    /// The broadcasts of round `round` have completed: its pieces from other ranks are here.
    fn received(
        &mut self,
        round: usize,
        checkpoint: &Checkpoint,
        bases: &[u64],
        on_ready: &mut dyn FnMut(ReadyOnDevice<'_>),
    ) {
        for k in 0..self.split.rounds[round].len() {
            let piece = self.split.rounds[round][k];
            if self.split.pieces[piece].owner != self.rank {
                self.received_bytes += self.split.pieces[piece].len;
                self.deliver(piece, checkpoint, bases, on_ready);
            }
        }
    }

    /// Runs every round whose piece from this rank has landed: the status exchange, then the
    /// round's broadcasts (issued, not waited for).
    fn advance(
        &mut self,
        exchange: &mut Exchange<'_>,
        checkpoint: &Checkpoint,
        bases: &[u64],
        on_ready: &mut dyn FnMut(ReadyOnDevice<'_>),
    ) -> Result<()> {
        while self.next_round < self.split.rounds.len() && self.mine_landed[self.next_round] {
            let k = self.next_round;
            let statuses = exchange.status(k, None).map_err(|e| self.broken(e))?;
            if let Some((rank, message)) =
                statuses.into_iter().enumerate().find_map(|(r, s)| s.map(|m| (r, m)))
            {
                return Err(Error::Rank { rank, world: self.world, message });
            }
            if k > 0 {
                self.received(k - 1, checkpoint, bases, on_ready);
            }
            let ranges: Vec<(u64, u64, usize)> = self.split.rounds[k]
                .iter()
                .map(|&i| {
                    let p = &self.split.pieces[i];
                    (bases[p.file] + p.offset, p.len, p.owner)
                })
                .collect();
            // SAFETY: each range is a piece of this rank's file buffers (which outlive the
            // exchange: they are freed only after `finish` or an abort); the owner's piece
            // has landed (this rank's, `mine_landed`; the others', their own status), and no
            // copy of this load writes another rank's piece.
            unsafe { exchange.broadcast(&ranges) }.map_err(|e| self.broken(e))?;
            self.next_round += 1;
        }
        Ok(())
    }

    /// Waits for the last round's broadcasts.
    fn finish(
        &mut self,
        exchange: &mut Exchange<'_>,
        checkpoint: &Checkpoint,
        bases: &[u64],
        on_ready: &mut dyn FnMut(ReadyOnDevice<'_>),
    ) -> Result<()> {
        assert_eq!(self.next_round, self.split.rounds.len(), "every round issued");
        if let Some(last) = self.split.rounds.len().checked_sub(1) {
            exchange.finish().map_err(|e| self.broken(e))?;
            self.received(last, checkpoint, bases, on_ready);
        }
        Ok(())
    }

    fn broken(&mut self, e: Error) -> Error {
        self.exchange_error = true;
        e
    }

    /// Ends a failed load: a failure of this rank's own is told to the others in the next
    /// status exchange; a broken exchange aborts the communicator (the others give up after
    /// their timeout); another rank's failure is known to all already.
    fn fail(&mut self, exchange: &mut Exchange<'_>, e: Error) -> Error {
        if matches!(e, Error::Rank { .. }) {
            return e;
        }
        if self.exchange_error {
            exchange.abort();
            return e;
        }
        if !exchange.is_aborted() && self.next_round < self.split.rounds.len() {
            let message = format!("{e}");
            if let Err(told) = exchange.status(self.next_round, Some(&message)) {
                log::warn!("rank {}: telling the other ranks of its failure: {told}", self.rank);
            }
        }
        e
    }

    fn report(&self, comm: &Communicator, load: &LoadReport) -> CoopReport {
        CoopReport {
            rank: self.rank,
            world: self.world,
            cooperative: true,
            reason: format!(
                "{} ranks split the reads and exchange over {}",
                self.world,
                comm.describe()
            ),
            read_bytes: load.read_bytes,
            owned_bytes: self.split.rank_bytes[self.rank],
            received_bytes: self.received_bytes,
            pieces: self.split.pieces.len(),
            rounds: self.split.rounds.len(),
            exchange_tail_seconds: self.tail_seconds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{even, Slice};

    #[test]
    fn a_cooperative_load_takes_whole_tensors_on_every_rank_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let spec = crate::synth::SynthSpec {
            vocab: 64,
            hidden: 64,
            intermediate: 224,
            kv: 16,
            layers: 1,
            shards: 1,
        };
        crate::synth::write_checkpoint(dir.path(), &spec, 0).unwrap();
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
