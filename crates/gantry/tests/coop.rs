//! Cooperative loads through the Rust API, checked against the reference reader. With one GPU:
//! a rank told to read alone. With two GPUs and NCCL: two ranks as two threads of this process
//! (one GPU each), bit-exact with every tensor reported ready once, and a rank whose read fails
//! making the other fail with an error naming it. Skipped with the reason otherwise, unless
//! `GANTRY_REQUIRE_GPU=1`.

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use gantry::coop::{Communicator, Cooperation, CooperativeModel, UniqueId};
use gantry::io::fault::FaultInjector;
use gantry::placement::Share;
use gantry::{Config, CudaDevice, Error, Loader, TensorEntry};

fn checkpoint(dir: &std::path::Path) -> gantry::Checkpoint {
    let spec = gantry::synth::SynthSpec {
        vocab: 1024,
        hidden: 256,
        intermediate: 768,
        kv: 64,
        layers: 3,
        shards: 2,
    };
    gantry::synth::write_checkpoint(dir, &spec, 11).unwrap();
    gantry::open(dir).unwrap()
}

fn whole(world: usize) -> impl FnMut(&TensorEntry) -> gantry::Result<Vec<(usize, Share)>> {
    move |_| Ok((0..world).map(|r| (r, Share::Whole)).collect())
}

/// Every tensor of `done` equals the reference and was reported ready exactly once.
fn assert_bit_exact(done: &CooperativeModel, ready: &[usize]) {
    let c = done.model.checkpoint();
    let mut seen = vec![0; c.tensors.len()];
    for &i in ready {
        seen[i] += 1;
    }
    assert!(seen.iter().all(|&n| n == 1), "ready counts {seen:?}");
    for t in done.model.tensors() {
        let got = done.model.copy_to_host(&t).unwrap();
        assert!(got == common::reference(c, t.entry), "tensor {} differs", t.entry.name);
    }
}

#[test]
fn a_rank_told_to_read_alone_loads_everything_and_says_why() {
    let Some(gpu) = common::gpu() else { return };
    let dir = common::scratch();
    let c = checkpoint(dir.path());
    let total = c.total_bytes();
    let loader = Loader::new(Config::default()).unwrap();
    let mut ready = Vec::new();
    let coop = Cooperation::alone(1, 4, "NCCL is not available: test");
    let done = loader.load_cooperative(c, &gpu, coop, whole(4), |r| ready.push(r.index)).unwrap();
    assert_bit_exact(&done, &ready);
    assert!(!done.coop.cooperative);
    assert!(done.coop.reason.contains("NCCL is not available: test"), "{}", done.coop.reason);
    assert_eq!(done.model.report().tensor_bytes, total);
    // A placement other than whole-on-every-rank is refused before anything is read.
    let c = gantry::open(dir.path()).unwrap();
    let half = |_: &TensorEntry| Ok(vec![(0, Share::Whole)]);
    let err = loader.load_cooperative(c, &gpu, Cooperation::alone(0, 2, "x"), half, |_| {});
    assert!(matches!(err, Err(Error::Config(m)) if m.contains("whole on all 2 ranks")));
}

/// Two GPUs and NCCL, or `None` after saying why (a failure with `GANTRY_REQUIRE_GPU=1`).
fn two_gpus() -> Option<(Arc<gantry::coop::Nccl>, Vec<Arc<CudaDevice>>)> {
    let found = gantry::coop::load_nccl()
        .map_err(|e| format!("NCCL is not available: {e}"))
        .and_then(|nccl| {
            let gpus: Vec<_> = (0..2).map_while(|n| CudaDevice::open(n).ok()).collect();
            if gpus.len() == 2 {
                Ok((nccl, gpus))
            } else {
                Err(format!("{} GPU(s); two ranks need two", gpus.len()))
            }
        });
    match found {
        Ok(found) => Some(found),
        Err(why) => {
            assert!(
                std::env::var("GANTRY_REQUIRE_GPU").as_deref() != Ok("1"),
                "GANTRY_REQUIRE_GPU=1 but: {why}"
            );
            println!("skipped: {why}");
            None
        }
    }
}

/// Runs rank `r` of two on `gpus[r]`, each in its own thread, with `config(r)`.
fn two_ranks(
    dir: &std::path::Path,
    config: impl Fn(usize) -> Config + Sync,
) -> Vec<(gantry::Result<CooperativeModel>, Vec<usize>)> {
    let Some((nccl, gpus)) = two_gpus() else { return Vec::new() };
    let id = UniqueId::new(&nccl).unwrap();
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|r| {
                let (nccl, gpu, config, barrier) = (Arc::clone(&nccl), &gpus[r], &config, &barrier);
                s.spawn(move || {
                    let timeout = Duration::from_secs(60);
                    let comm = Communicator::init(nccl, &id, r, 2, gpu, timeout).unwrap();
                    barrier.wait();
                    let loader = Loader::new(config(r)).unwrap();
                    let coop = Cooperation::nccl(&comm).timeout(timeout).piece_bytes(1 << 20);
                    let mut ready = Vec::new();
                    let c = gantry::open(dir).unwrap();
                    let done =
                        loader.load_cooperative(c, gpu, coop, whole(2), |t| ready.push(t.index));
                    (done, ready)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn two_ranks_share_the_reads_and_are_bit_exact() {
    let dir = common::scratch();
    let total = checkpoint(dir.path()).total_bytes();
    let ranks = two_ranks(dir.path(), |_| Config::default());
    let mut owned = 0;
    for (r, (done, ready)) in ranks.iter().enumerate() {
        let done = done.as_ref().unwrap();
        assert_bit_exact(done, ready);
        assert!(done.coop.cooperative, "{}", done.coop.reason);
        assert_eq!(done.coop.rank, r);
        assert_eq!(done.coop.owned_bytes + done.coop.received_bytes, total);
        owned += done.coop.owned_bytes;
    }
    if !ranks.is_empty() {
        assert_eq!(owned, total, "every byte read by one rank");
    }
}

/// Fails every read with EIO.
struct Eio;
impl FaultInjector for Eio {
    fn rewrite(&self, _: usize, _: u64, _: u64, _: i64) -> i64 {
        -(libc::EIO as i64)
    }
}

#[test]
fn a_rank_whose_read_fails_fails_the_other_naming_it() {
    let dir = common::scratch();
    checkpoint(dir.path());
    let ranks = two_ranks(dir.path(), |r| {
        let c = Config::default();
        if r == 1 {
            c.fault_injector(Arc::new(Eio))
        } else {
            c
        }
    });
    if ranks.is_empty() {
        return;
    }
    let own = ranks[1].0.as_ref().expect_err("rank 1's reads fail");
    assert!(own.to_string().contains("Input/output error"), "{own}");
    match &ranks[0].0 {
        Err(Error::Rank { rank: 1, world: 2, message }) => {
            assert!(message.contains("Input/output error"), "{message}")
        }
        other => panic!("rank 0: {other:?}"),
    }
}
