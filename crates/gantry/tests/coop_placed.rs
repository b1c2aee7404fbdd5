//! Cooperative loads of tensor-parallel shares through the Rust API: every rank's shares
//! compared with slices cut element by element from a plain read of the file. With one GPU: a
//! rank told to read alone. With two GPUs and NCCL: two ranks as two threads of this process,
//! with windows small enough that the load goes through many of them, each byte read by one
//! rank; a rank whose read fails makes the other fail naming it. Skipped with the reason
//! otherwise, unless `GANTRY_REQUIRE_GPU=1`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use gantry::coop::{Cooperation, CooperativePlacedModel};
use gantry::placement::tensor_parallel;
use gantry::{Config, Loader};

fn checkpoint(dir: &std::path::Path) -> gantry::Checkpoint {
    common::small_llama(dir, 23)
}

/// Every share of `done` (rank `rank` of `world` under `tp:world`) equals the slice of the
/// reference, and each tensor was reported ready once.
fn assert_shares_exact(done: &CooperativePlacedModel, rank: usize, world: usize, ready: &[String]) {
    let m = &done.model;
    let c = m.checkpoint();
    let tp = tensor_parallel(world);
    let mut expected = 0;
    for t in &c.tensors {
        let mine: Vec<_> = tp.place(t).unwrap().into_iter().filter(|&(r, _)| r == rank).collect();
        let [(_, share)] = mine.as_slice() else { panic!("{}: {mine:?}", t.name) };
        let got = m.tensor(0, &t.name).unwrap_or_else(|| panic!("{} missing", t.name));
        assert_eq!(got.share.share, *share, "{}", t.name);
        let bytes = m.copy_to_host(0, &got).unwrap();
        assert!(bytes == common::reference_slice(c, t, *share), "rank {rank}: {} differs", t.name);
        expected += 1;
        assert_eq!(ready.iter().filter(|n| **n == t.name).count(), 1, "{} ready", t.name);
    }
    assert_eq!(ready.len(), expected);
}

#[test]
fn a_rank_told_to_read_alone_loads_its_shares() {
    let Some(gpu) = common::gpu() else { return };
    let dir = common::scratch();
    let c = checkpoint(dir.path());
    let loader = Loader::new(Config::default()).unwrap();
    let mut ready = Vec::new();
    let coop = Cooperation::alone(1, 2, "NCCL is not available: test");
    let tp = tensor_parallel(2);
    let done = loader
        .load_cooperative_placed(c, &gpu, coop, |t| tp.place(t), |t| ready.push(t.name.clone()))
        .unwrap();
    assert_shares_exact(&done, 1, 2, &ready);
    assert!(!done.coop.cooperative);
    assert!(done.coop.reason.contains("NCCL is not available: test"), "{}", done.coop.reason);
}

/// Runs rank `r` of two on GPU `r`, each in its own thread, with `config(r)`, tp:2 shares and
/// windows of `window_bytes`.
fn two_ranks(
    dir: &std::path::Path,
    window_bytes: u64,
    config: impl Fn(usize) -> Config + Sync,
) -> Vec<(gantry::Result<CooperativePlacedModel>, Vec<String>)> {
    common::two_ranks_with(|r, gpu, comm| {
        let loader = Loader::new(config(r)).unwrap();
        let coop = Cooperation::nccl(comm)
            .timeout(Duration::from_secs(60))
            .piece_bytes(256 << 10)
            .window_bytes(window_bytes);
        let tp = tensor_parallel(2);
        let mut ready = Vec::new();
        let c = gantry::open(dir).unwrap();
        let done = loader.load_cooperative_placed(
            c,
            gpu,
            coop,
            |t| tp.place(t),
            |t| ready.push(t.name.clone()),
        );
        (done, ready)
    })
}

#[test]
fn two_ranks_keep_their_shares_bit_exact_reading_each_byte_once() {
    let dir = common::scratch();
    let total = checkpoint(dir.path()).total_bytes();
    for window_bytes in [1 << 20, 1 << 40] {
        let ranks = two_ranks(dir.path(), window_bytes, |_| Config::default());
        let mut owned = 0;
        for (r, (done, ready)) in ranks.iter().enumerate() {
            let done = done.as_ref().unwrap();
            assert_shares_exact(done, r, 2, ready);
            assert!(done.coop.cooperative, "{}", done.coop.reason);
            assert_eq!(done.coop.owned_bytes + done.coop.received_bytes, total);
            if window_bytes == 1 << 20 {
                assert!(done.coop.windows > 4, "{} windows", done.coop.windows);
            } else {
                assert_eq!(done.coop.windows, 1);
            }
            owned += done.coop.owned_bytes;
        }
        if !ranks.is_empty() {
            assert_eq!(owned, total, "every byte read by one rank");
        }
    }
}

#[test]
fn a_rank_whose_read_fails_fails_the_other_naming_it() {
    let dir = common::scratch();
    checkpoint(dir.path());
    let ranks = two_ranks(dir.path(), 1 << 20, |r| {
        let c = Config::default();
        if r == 1 {
            c.fault_injector(Arc::new(common::Eio))
        } else {
            c
        }
    });
    if ranks.is_empty() {
        return;
    }
    common::assert_rank_1_failed_with_eio(&ranks[1].0, &ranks[0].0);
}
