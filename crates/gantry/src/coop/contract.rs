//! The contract of a cooperative load, shared by whole-tensor loads ([`super::load`]) and
//! placed loads ([`super::placed`]): how a rank takes part ([`Cooperation`], [`Link`]), what it
//! reports ([`CoopReport`]), and what every rank must agree on before it reads (the
//! communicator's rank and size, each file's volume).
//!
//! Both loads build on this file and it on neither. The dependency between them runs one
//! way: a placed load sends each window through the whole-tensor exchange (`cooperate` in
//! `load.rs`), and nothing in `load.rs` reaches into `placed.rs`.

use std::time::Duration;

use gantry_format::Checkpoint;

use super::comm::{Communicator, TIMEOUT};
use super::split::{Split, PIECE_BYTES};
use crate::api::loader::LoadReport;
use crate::error::{Error, Result};

/// Bytes of one window by default (a window holding one tensor larger than this is larger).
pub const WINDOW_BYTES: u64 = 2 << 30;

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
    /// Bytes of checkpoint exchanged at a time when ranks keep shares of tensors (default
    /// [`WINDOW_BYTES`]): each rank holds one window of scratch beside its shares.
    pub window_bytes: u64,
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
            window_bytes: WINDOW_BYTES,
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
            window_bytes: WINDOW_BYTES,
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

    /// An error unless `rank < world`.
    pub(super) fn check_rank(&self) -> Result<()> {
        if self.rank >= self.world {
            let (rank, world) = (self.rank, self.world);
            return Err(Error::Config(format!("rank {rank} of {world}: no such rank")));
        }
        Ok(())
    }

    /// Why this rank reads on its own (when it does).
    pub(super) fn alone_reason(&self) -> String {
        match &self.link {
            Link::Alone(reason) => format!("each rank reads on its own: {reason}"),
            Link::Nccl(_) => "world size 1: nothing to share".to_owned(),
        }
    }

    /// Sets the bytes exchanged at a time when ranks keep shares of tensors.
    pub fn window_bytes(mut self, bytes: u64) -> Self {
        self.window_bytes = bytes.max(1);
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
    /// Windows the load went through (tensor-parallel shares: a window of the checkpoint at a
    /// time is exchanged whole, then each rank keeps its shares of it); 1 for whole tensors.
    pub windows: usize,
    /// Seconds from this rank's last read to the end of the exchange (summed over windows).
    pub exchange_tail_seconds: f64,
    /// Seconds this rank's pipeline ran, from its first read to its last piece landing
    /// (summed over windows).
    pub read_seconds: f64,
    /// Seconds copying this rank's shares out of the windows.
    pub share_copy_seconds: f64,
}

impl CoopReport {
    /// The report of a cooperative load over `comm` of `split`.
    pub(super) fn cooperative(comm: &Communicator, split: &Split, load: &LoadReport) -> Self {
        let rank = comm.rank();
        CoopReport {
            rank,
            world: comm.world(),
            cooperative: true,
            reason: format!(
                "{} ranks split the reads and exchange over {}",
                comm.world(),
                comm.describe()
            ),
            read_bytes: load.read_bytes,
            owned_bytes: split.rank_bytes[rank],
            received_bytes: 0,
            pieces: split.pieces.len(),
            rounds: split.rounds.len(),
            windows: 1,
            exchange_tail_seconds: 0.0,
            read_seconds: 0.0,
            share_copy_seconds: 0.0,
        }
    }
}

/// The communicator must be the load's rank and size.
pub(super) fn check_comm(comm: &Communicator, coop: &Cooperation<'_>) -> Result<()> {
    if (comm.rank(), comm.world()) != (coop.rank, coop.world) {
        return Err(Error::Config(format!(
            "the communicator is rank {} of {}, the load rank {} of {}",
            comm.rank(),
            comm.world(),
            coop.rank,
            coop.world
        )));
    }
    Ok(())
}

/// Per file, a volume number: files on the same disk share one (object storage: one for all).
pub(super) fn volumes(checkpoint: &Checkpoint) -> Vec<usize> {
    use std::os::unix::fs::MetadataExt;
    let mut names: Vec<String> = Vec::new();
    checkpoint
        .files
        .iter()
        .map(|f| {
            let name = if crate::source::object::is_url(&f.path) {
                "object storage".to_owned()
            } else {
                std::fs::metadata(&f.path).map_or_else(
                    |_| "unknown".to_owned(),
                    |m| crate::source::probe::disk(m.dev()).0,
                )
            };
            names.iter().position(|n| *n == name).unwrap_or_else(|| {
                names.push(name);
                names.len() - 1
            })
        })
        .collect()
}
