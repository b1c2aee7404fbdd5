//! One cooperative exchange on two threads. The caller's thread runs the pipeline over this
//! rank's pieces and learns, piece by piece, what landed in its memory; a thread of its own
//! (the *exchanger*) first connects the ranks (NCCL connects peers at their first collective,
//! a tenth of a second or more: done while the first pieces are read), then runs the rounds:
//! round `k`'s status exchange (every rank says whether it failed), then its broadcasts as one
//! group, issued as soon as this rank's piece of round `k` has landed and not waited for. So
//! the readers never wait for the other ranks: only the exchanger does, and it trails the
//! reads by a round or two.
//!
//! The status exchange of round `k + 1` completes only after round `k`'s broadcasts did (one
//! stream), which is when the exchanger tells the caller's thread that the pieces received in
//! round `k` are here; that thread reports their tensors ready.
//!
//! Traced (the caller's thread hands the exchanger the load's trace, which it enters as the
//! track `exchange`), each step is a span of category `exchange`: `connect`, per round
//! `status` and `broadcast` (with the round, its pieces and bytes, and the bytes this rank
//! sent), the final `finish`, and `waiting for pieces` while nothing of this rank's was ready
//! to send. The verdict counts the first four as the exchange at work; the fifth is the
//! exchanger idle, waiting on this rank's readers.
//!
//! Failures: this rank's own error (a read, a copy, a cancel) goes to the exchanger, which
//! tells the others in its next status exchange; another rank's failure comes back from a
//! status exchange as [`Error::Rank`]; an exchange that broke (a timeout, an NCCL error) has
//! aborted the communicator, which stops the others' collectives too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};

use gantry_format::Checkpoint;

use super::comm::Exchange;
use super::split::Split;
use crate::api::device::ReadyOnDevice;
use crate::error::{Error, Result};
use crate::trace;

/// From the caller's thread to the exchanger.
#[derive(Debug)]
pub(super) enum Note {
    /// This rank's piece (position in the split) is in its memory.
    Landed(usize),
    /// This rank failed: tell the others.
    Failed(String),
}

/// From the exchanger to the caller's thread.
#[derive(Debug)]
pub(super) enum Heard {
    /// The broadcasts of this round have completed.
    Received(usize),
    /// The exchange is over: every round done, or why not.
    Done(Result<()>),
}

/// Tensor `i` is whole in this rank's memory: its landing in the load's trace.
fn landed(i: usize, t: &gantry_format::TensorEntry) {
    trace::instant("tensor", "landed", || {
        trace::Args::new().str("name", t.name.clone()).u64("bytes", t.len).u64("tensor", i as u64)
    });
}

/// The caller's side: which tensors still wait for bytes, and what was received.
#[derive(Debug)]
pub(super) struct Tally<'s> {
    split: &'s Split,
    rank: usize,
    /// Per tensor, pieces not yet in this rank's memory.
    pending: Vec<u32>,
    pub(super) received_bytes: u64,
    /// Set once the exchanger has said it is done.
    pub(super) done: Option<Result<()>>,
}

impl<'s> Tally<'s> {
    pub(super) fn new(checkpoint: &Checkpoint, split: &'s Split, rank: usize) -> Self {
        let mut pending = vec![0u32; checkpoint.tensors.len()];
        for p in &split.pieces {
            for t in p.tensors.clone() {
                pending[t] += 1;
            }
        }
        Self { split, rank, pending, received_bytes: 0, done: None }
    }

    /// This rank.
    pub(super) fn rank(&self) -> usize {
        self.rank
    }

    /// Reports the `wanted` tensors that have no bytes to wait for.
    pub(super) fn ready_at_once(
        &self,
        checkpoint: &Checkpoint,
        wanted: &[bool],
        bases: &[u64],
        on_ready: &mut dyn FnMut(ReadyOnDevice<'_>),
    ) {
        for (i, t) in checkpoint.tensors.iter().enumerate() {
            if wanted[i] && self.pending[i] == 0 {
                landed(i, t);
                on_ready(ReadyOnDevice { index: i, entry: t, ptr: bases[t.file.0] + t.offset });
            }
        }
    }

    /// Piece `piece` is in this rank's memory: reports the tensors it completes.
    pub(super) fn deliver(
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
                landed(i, t);
                on_ready(ReadyOnDevice { index: i, entry: t, ptr: bases[t.file.0] + t.offset });
            }
        }
    }

    /// Handles what the exchanger has said so far; with `until_done`, waits for the rest.
    pub(super) fn hear(
        &mut self,
        heard: &Receiver<Heard>,
        until_done: bool,
        checkpoint: &Checkpoint,
        bases: &[u64],
        on_ready: &mut dyn FnMut(ReadyOnDevice<'_>),
    ) {
        loop {
            let message = if until_done && self.done.is_none() {
                match heard.recv() {
                    Ok(m) => m,
                    Err(_) => {
                        let gone =
                            Error::Internal("the exchange thread ended without a word".into());
                        self.done = Some(Err(gone));
                        return;
                    }
                }
            } else {
                match heard.try_recv() {
                    Ok(m) => m,
                    Err(_) => return,
                }
            };
            match message {
                Heard::Received(round) => {
                    for k in 0..self.split.rounds[round].len() {
                        let piece = self.split.rounds[round][k];
                        if self.split.pieces[piece].owner != self.rank {
                            self.received_bytes += self.split.pieces[piece].len;
                            self.deliver(piece, checkpoint, bases, on_ready);
                        }
                    }
                }
                Heard::Done(outcome) => self.done = Some(outcome),
            }
        }
    }

    /// The exchanger's failure, if it has reported one; stops the readers then.
    pub(super) fn failure(&self, cancel: &AtomicBool) -> Option<&Error> {
        let e = self.done.as_ref()?.as_ref().err()?;
        cancel.store(true, Ordering::Relaxed);
        Some(e)
    }
}

/// The exchanger: runs every round of `split` for rank `rank`, each once this rank's piece of
/// it has landed (told by `notes`), and says so on `heard`. `bases[f]` plus a file offset is
/// the device address of that byte on this rank.
pub(super) fn exchanger(
    split: &Split,
    rank: usize,
    world: usize,
    bases: &[u64],
    exchange: &mut Exchange<'_>,
    notes: Receiver<Note>,
    heard: Sender<Heard>,
) {
    let outcome = run_rounds(split, rank, world, bases, exchange, &notes, &heard);
    let _ = heard.send(Heard::Done(outcome));
}

fn run_rounds(
    split: &Split,
    rank: usize,
    world: usize,
    bases: &[u64],
    exchange: &mut Exchange<'_>,
    notes: &Receiver<Note>,
    heard: &Sender<Heard>,
) -> Result<()> {
    let rounds = split.rounds.len();
    let mut round_of = vec![0; split.pieces.len()];
    let mut mine_landed = vec![true; rounds];
    for (k, round) in split.rounds.iter().enumerate() {
        for &i in round {
            round_of[i] = k;
            if split.pieces[i].owner == rank {
                mine_landed[k] = false;
            }
        }
    }
    let mut next = 0;
    let mut spent = Spent::default();
    let clock = std::time::Instant::now();
    let span = trace::span("exchange", "connect").args(|a| a.u64("world", world as u64));
    exchange.connect().map_err(|e| broke(exchange, e))?;
    drop(span);
    spent.connect = clock.elapsed();
    loop {
        while next < rounds && mine_landed[next] {
            let clock = std::time::Instant::now();
            let span = trace::span("exchange", "status").args(|a| a.u64("round", next as u64));
            let statuses = exchange.status(next, None).map_err(|e| broke(exchange, e))?;
            drop(span);
            spent.status += clock.elapsed();
            if let Some((rank, message)) =
                statuses.into_iter().enumerate().find_map(|(r, s)| s.map(|m| (r, m)))
            {
                return Err(Error::Rank { rank, world, message });
            }
            if next > 0 {
                let _ = heard.send(Heard::Received(next - 1));
            }
            let ranges: Vec<(u64, u64, usize)> = split.rounds[next]
                .iter()
                .map(|&i| {
                    let p = &split.pieces[i];
                    (bases[p.file] + p.offset, p.len, p.owner)
                })
                .collect();
            let clock = std::time::Instant::now();
            let span = trace::span("exchange", "broadcast").args(|a| {
                let bytes = ranges.iter().map(|r| r.1).sum();
                let sent = ranges.iter().filter(|r| r.2 == rank).map(|r| r.1).sum();
                let (round, pieces) = (next as u64, ranges.len() as u64);
                a.u64("round", round).u64("pieces", pieces).u64("bytes", bytes).u64("sent", sent)
            });
            // SAFETY: each range is a piece of this rank's buffers, which outlive the exchange
            // (the caller joins this thread before it frees them); the owner's piece has
            // landed (this rank's: `mine_landed`; the others': their own status), and no copy
            // of this load writes another rank's piece.
            unsafe { exchange.broadcast(&ranges) }.map_err(|e| broke(exchange, e))?;
            drop(span);
            spent.broadcast += clock.elapsed();
            next += 1;
        }
        if next == rounds {
            let clock = std::time::Instant::now();
            if rounds > 0 {
                let _span =
                    trace::span("exchange", "finish").args(|a| a.u64("rounds", rounds as u64));
                exchange.finish().map_err(|e| broke(exchange, e))?;
                let _ = heard.send(Heard::Received(rounds - 1));
            }
            spent.finish += clock.elapsed();
            log::debug!("rank {rank}: {rounds} rounds: {spent:?}");
            return Ok(());
        }
        let clock = std::time::Instant::now();
        let span = trace::span("exchange", trace::WAITING_FOR_PIECES);
        let note = notes.recv();
        drop(span);
        spent.pieces += clock.elapsed();
        let failure = match note {
            Ok(Note::Landed(piece)) => {
                mine_landed[round_of[piece]] = true;
                continue;
            }
            Ok(Note::Failed(message)) => message,
            Err(_) => "the load ended before this rank's pieces were read".to_owned(),
        };
        if !exchange.is_aborted() {
            if let Err(told) = exchange.status(next, Some(&failure)) {
                log::warn!("rank {rank}: telling the other ranks of its failure: {told}");
            }
        }
        // The caller returns its own error; this one only ends the exchange.
        return Err(Error::Rank { rank, world, message: failure });
    }
}

/// Where the exchanger's time went: connecting the ranks, waiting for this rank's pieces, in
/// the rounds' status exchanges (each waits for the previous round's broadcasts), issuing the
/// broadcasts, and in the wait for the last ones (logged at debug).
#[derive(Debug, Default)]
struct Spent {
    connect: std::time::Duration,
    pieces: std::time::Duration,
    status: std::time::Duration,
    broadcast: std::time::Duration,
    finish: std::time::Duration,
}

/// An exchange that failed cannot be trusted to line up with the other ranks' any more:
/// aborting the communicator stops their collectives too (they fail instead of waiting).
fn broke(exchange: &Exchange<'_>, e: Error) -> Error {
    exchange.abort();
    e
}
