//! Cooperative loads through the Rust API, checked against the reference reader. With one GPU:
//! a rank told to read alone. With two GPUs and NCCL: two ranks as two threads of this process
//! (one GPU each), bit-exact with every tensor reported ready once, and a rank whose read fails
//! making the other fail with an error naming it. A rank that joined and then never loads, or
//! stalls mid-load, makes the other fail within its timeout, not hang (`GANTRY_NCCL_BLOCKING=1`
//! shows what blocking communicators do there); a rank whose peers never join fails to join
//! within its timeout. Skipped with the reason otherwise, unless `GANTRY_REQUIRE_GPU=1`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier, Condvar, Mutex};
use std::time::Duration;

use gantry::coop::{Communicator, Cooperation, CooperativeModel, UniqueId};
use gantry::io::fault::FaultInjector;
use gantry::placement::Share;
use gantry::{Config, Error, Loader, TensorEntry};

fn checkpoint(dir: &std::path::Path) -> gantry::Checkpoint {
    common::small_llama(dir, 11)
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
    assert!(
        matches!(err, Err(Error::Placement { reason, .. }) if reason.contains("whole on all 2 ranks"))
    );
}

/// Runs rank `r` of two on GPU `r`, each in its own thread, with `config(r)`.
fn two_ranks(
    dir: &std::path::Path,
    config: impl Fn(usize) -> Config + Sync,
) -> Vec<(gantry::Result<CooperativeModel>, Vec<usize>)> {
    common::two_ranks_with(|r, gpu, comm| {
        let loader = Loader::new(config(r)).unwrap();
        let coop = Cooperation::nccl(comm).timeout(Duration::from_secs(60)).piece_bytes(1 << 20);
        let mut ready = Vec::new();
        let c = gantry::open(dir).unwrap();
        let done = loader.load_cooperative(c, gpu, coop, whole(2), |t| ready.push(t.index));
        (done, ready)
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

/// Traced ranks: the exchanger is a track of each rank's trace, its broadcasts carry every
/// byte of the checkpoint once (this rank's own pieces sent, the rest received), and the
/// verdict is judged over the reads and the exchange.
#[test]
fn traced_ranks_draw_the_exchange_as_a_track() {
    let dir = common::scratch();
    let total = checkpoint(dir.path()).total_bytes();
    let file = |r: usize| dir.path().join(format!("rank-{r}.json"));
    let ranks = two_ranks(dir.path(), |r| Config::default().trace(file(r)));
    for (r, (done, ready)) in ranks.iter().enumerate() {
        let done = done.as_ref().unwrap();
        assert_bit_exact(done, ready);
        let text = std::fs::read_to_string(file(r)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let events = v["traceEvents"].as_array().unwrap();
        let track = events
            .iter()
            .find(|e| e["name"] == "thread_name" && e["args"]["name"] == "exchange")
            .map(|e| e["tid"].clone())
            .expect("an exchange track");
        let spans: Vec<&serde_json::Value> =
            events.iter().filter(|e| e["cat"] == "exchange" && e["ph"] == "X").collect();
        assert!(spans.iter().all(|e| e["tid"] == track), "exchange spans off its track");
        for name in ["connect", "status", "broadcast", "finish"] {
            assert!(spans.iter().any(|e| e["name"] == name), "rank {r}: no {name} span");
        }
        let sum = |key: &str| -> u64 {
            let broadcasts = spans.iter().filter(|e| e["name"] == "broadcast");
            broadcasts.map(|e| e["args"][key].as_u64().unwrap()).sum()
        };
        assert_eq!(sum("bytes"), total, "rank {r}: every byte broadcast once");
        assert_eq!(sum("sent"), done.coop.owned_bytes, "rank {r}: its own pieces sent");
        assert_eq!(sum("bytes") - sum("sent"), done.coop.received_bytes, "rank {r}");
        let verdict = done.model.report().bound_by.clone().expect("a verdict");
        assert!(verdict.to_string().contains("exchange busy"), "rank {r}: {verdict}");
    }
}

#[test]
fn a_rank_whose_read_fails_fails_the_other_naming_it() {
    let dir = common::scratch();
    checkpoint(dir.path());
    let ranks = two_ranks(dir.path(), |r| {
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

/// How long a rank waits for the other in the tests where the other never answers.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the ranks of those tests wait for each other to join (and to finalize).
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Far past [`STALL_TIMEOUT`] (and the teardown it allows): only a hang takes this long.
const HANG: Duration = Duration::from_secs(120);

/// Asserts that `err` is the NCCL error of rank 0 of 2 giving up on the other rank.
fn assert_gave_up_on_the_other(err: &Error) {
    match err {
        Error::Nccl { op, message, .. } => {
            assert!(op.contains("rank 0 of 2"), "the error names the rank: {err}");
            assert!(!message.is_empty(), "the error says what happened: {err}");
        }
        other => panic!("rank 0: {other:?}"),
    }
}

/// Rank 1 joins the communicator and never starts the load; rank 0's load gives up on it
/// within its timeout with an NCCL error naming rank 0 and the operation, instead of waiting
/// in NCCL forever (connecting to a peer that never arrives, with blocking communicators).
/// Rank 1 then closes its communicator within the same deadline.
#[test]
fn a_rank_that_joins_and_never_loads_fails_the_other_within_its_timeout() {
    let Some((nccl, gpus)) = common::gpus_and_nccl(2) else { return };
    let dir = common::scratch();
    checkpoint(dir.path());
    let path = dir.path().to_owned();
    let result = common::with_deadline(HANG, move || {
        let id = UniqueId::new(&nccl).unwrap();
        let (loaded, told) = mpsc::channel::<()>();
        let (nccl1, gpu1) = (Arc::clone(&nccl), Arc::clone(&gpus[1]));
        let idle = std::thread::spawn(move || {
            let comm = Communicator::init(nccl1, &id, 1, 2, &gpu1, JOIN_TIMEOUT).unwrap();
            let _ = told.recv();
            drop(comm);
        });
        let comm = Communicator::init(nccl, &id, 0, 2, &gpus[0], JOIN_TIMEOUT).unwrap();
        let loader = Loader::new(Config::default()).unwrap();
        let coop = Cooperation::nccl(&comm).timeout(STALL_TIMEOUT).piece_bytes(1 << 20);
        let c = gantry::open(&path).unwrap();
        let done = loader.load_cooperative(c, &gpus[0], coop, whole(2), |_| {}).map(|_| ());
        let aborted = comm.is_aborted();
        drop(comm);
        loaded.send(()).unwrap();
        idle.join().unwrap();
        (done, aborted)
    });
    let (done, aborted) = result;
    assert_gave_up_on_the_other(&done.expect_err("rank 1 never loads"));
    assert!(aborted, "rank 0's communicator was aborted");
}

/// Lets reads through until `after` of them completed, then holds every later one until
/// released (or a minute passed): a rank that stops answering mid-load.
#[derive(Default)]
struct Stall {
    after: usize,
    reads: AtomicUsize,
    released: Mutex<bool>,
    wake: Condvar,
}

impl Stall {
    fn release(&self) {
        *self.released.lock().unwrap() = true;
        self.wake.notify_all();
    }
}

impl FaultInjector for Stall {
    fn rewrite(&self, _: usize, _: u64, _: u64, result: i64) -> i64 {
        if self.reads.fetch_add(1, Ordering::SeqCst) >= self.after {
            let released = self.released.lock().unwrap();
            let limit = Duration::from_secs(60);
            drop(self.wake.wait_timeout_while(released, limit, |r| !*r).unwrap());
        }
        result
    }
}

/// Rank 1 stops answering after its first reads; rank 0 gives up on it within its timeout
/// (aborting the communicator) with an NCCL error naming rank 0. Released, rank 1 fails too.
#[test]
fn a_rank_that_stalls_mid_load_fails_the_other_within_its_timeout() {
    let Some((nccl, gpus)) = common::gpus_and_nccl(2) else { return };
    let dir = common::scratch();
    checkpoint(dir.path());
    let path = dir.path().to_owned();
    let stall = Arc::new(Stall { after: 1, ..Stall::default() });
    let held = Arc::clone(&stall);
    let results = common::with_deadline(HANG, move || {
        let id = UniqueId::new(&nccl).unwrap();
        let barrier = Barrier::new(2);
        std::thread::scope(|s| {
            let ranks: Vec<_> = (0..2)
                .map(|r| {
                    let (nccl, gpu, path, barrier) = (Arc::clone(&nccl), &gpus[r], &path, &barrier);
                    let stall = Arc::clone(&held);
                    s.spawn(move || {
                        let comm = Communicator::init(nccl, &id, r, 2, gpu, JOIN_TIMEOUT).unwrap();
                        barrier.wait();
                        let config = Config::default();
                        let config = if r == 1 { config.fault_injector(stall) } else { config };
                        let loader = Loader::new(config).unwrap();
                        // Small pieces: rank 1 has many reads, and stalls after its first.
                        let coop =
                            Cooperation::nccl(&comm).timeout(STALL_TIMEOUT).piece_bytes(256 << 10);
                        let c = gantry::open(path).unwrap();
                        let done = loader.load_cooperative(c, gpu, coop, whole(2), |_| {});
                        done.map(|_| ())
                    })
                })
                .collect();
            let mut ranks = ranks.into_iter();
            let rank0 = ranks.next().unwrap().join().unwrap();
            held.release();
            let rank1 = ranks.next().unwrap().join().unwrap();
            (rank0, rank1)
        })
    });
    stall.release();
    let (rank0, rank1) = results;
    assert_gave_up_on_the_other(&rank0.expect_err("rank 1 stalled"));
    assert!(rank1.is_err(), "rank 1 goes on after rank 0 gave up, and fails too");
}

/// Rank 0 of 2 joins a communicator that rank 1 never joins: joining fails within its timeout
/// with an error, instead of waiting for rank 1 forever. One GPU is enough.
#[test]
fn a_rank_whose_peer_never_joins_fails_to_join_within_its_timeout() {
    let Some((nccl, gpus)) = common::gpus_and_nccl(1) else { return };
    let joined = common::with_deadline(HANG, move || {
        let id = UniqueId::new(&nccl).unwrap();
        Communicator::init(nccl, &id, 0, 2, &gpus[0], STALL_TIMEOUT).map(|_| ())
    });
    match joined {
        Err(Error::Nccl { op, .. }) => assert!(op.contains("rank 0 of 2"), "{op}"),
        other => panic!("joining alone: {other:?}"),
    }
}

/// Rank 0 loads a checkpoint, rank 1 the same checkpoint but for one shard, another version
/// of it (same header and length, other bytes: what a shard replaced between two ranks' opens
/// looks like). Both ranks must fail before a byte is exchanged, naming the shard, instead of
/// each ending with a mix of both versions (rank 0 reads no piece of that shard in some
/// splits, so its own checks never see the other version). Shares agree the same way.
#[test]
fn ranks_that_opened_different_versions_fail_naming_the_file() {
    let dir = common::scratch();
    let c = checkpoint(dir.path());
    let other = common::scratch();
    for (f, file) in c.files.iter().enumerate() {
        let name = file.path.file_name().unwrap();
        if f == 1 {
            let mut bytes = std::fs::read(&file.path).unwrap();
            bytes[file.header.data_offset as usize] ^= 0xff;
            std::fs::write(other.path().join(name), bytes).unwrap();
        } else {
            std::fs::hard_link(&file.path, other.path().join(name)).unwrap();
        }
    }
    let shard = c.files[1].path.file_name().unwrap().to_owned();
    for placed in [false, true] {
        let ranks = common::two_ranks_with(|r, gpu, comm| {
            let c = gantry::open(if r == 0 { dir.path() } else { other.path() }).unwrap();
            let loader = Loader::new(Config::default()).unwrap();
            let coop =
                Cooperation::nccl(comm).timeout(Duration::from_secs(60)).piece_bytes(1 << 20);
            if placed {
                let rows = |t: &TensorEntry| gantry::placement::split(t, Some(0), 2);
                loader.load_cooperative_placed(c, gpu, coop, rows, |_| {}).map(|_| ())
            } else {
                loader.load_cooperative(c, gpu, coop, whole(2), |_| {}).map(|_| ())
            }
        });
        for (r, done) in ranks.iter().enumerate() {
            match done {
                Err(Error::RanksDiffer { rank: 1, world: 2, path: Some(p), what }) => {
                    assert_eq!(p.file_name(), Some(shard.as_os_str()), "rank {r}: {what}");
                    assert!(what.contains("another version"), "rank {r}: {what}");
                }
                other => panic!("rank {r} (placed {placed}): {other:?}"),
            }
        }
    }
}

/// A hashed cooperative load (`verify_sha256`, digests in a `SHA256SUMS` from an independent
/// hash): each file is read whole by one rank and hashed there, so every byte is still read
/// once across the ranks and each file is verified exactly once; a corrupted file fails both
/// ranks (its reader with the digest mismatch, the other naming that rank).
#[test]
fn hashed_cooperative_loads_read_and_verify_each_file_on_one_rank() {
    use sha2::Digest as _;
    let dir = common::scratch();
    let c = checkpoint(dir.path());
    let sums: String = c
        .files
        .iter()
        .map(|f| {
            let digest: [u8; 32] = sha2::Sha256::digest(std::fs::read(&f.path).unwrap()).into();
            let name = f.path.file_name().unwrap().to_str().unwrap();
            format!("{}  {name}\n", gantry::integrity::to_hex(&digest))
        })
        .collect();
    std::fs::write(dir.path().join("SHA256SUMS"), sums).unwrap();
    let file_bytes: u64 = c.files.iter().map(|f| f.file_len).sum();
    let ranks = two_ranks(dir.path(), |_| Config::default().verify_sha256(true));
    if ranks.is_empty() {
        return;
    }
    let (mut read, mut verified) = (0, vec![0; c.files.len()]);
    for (done, ready) in &ranks {
        let done = done.as_ref().unwrap();
        assert_bit_exact(done, ready);
        assert!(done.coop.cooperative, "{}", done.coop.reason);
        read += done.model.report().read_bytes;
        for (f, file) in done.model.report().files.iter().enumerate() {
            verified[f] += usize::from(file.integrity.as_ref().is_some_and(|k| k.verified()));
        }
    }
    assert_eq!(verified, vec![1; c.files.len()], "each file verified on one rank");
    let slack = 2 * 4096 * c.files.len() as u64; // alignment of whole-file reads
    assert!(read >= file_bytes && read <= file_bytes + slack, "{read} bytes for {file_bytes}");
    let shard = &c.files[1];
    let mut bytes = std::fs::read(&shard.path).unwrap();
    bytes[shard.header.data_offset as usize + 7] ^= 1;
    std::fs::write(&shard.path, bytes).unwrap();
    let ranks = two_ranks(dir.path(), |_| Config::default().verify_sha256(true));
    let failed: Vec<String> =
        ranks.iter().map(|(d, _)| format!("{:?}", d.as_ref().err())).collect();
    assert!(failed.iter().any(|e| e.contains("Integrity")), "{failed:?}");
    assert!(failed.iter().all(|e| e.starts_with("Some(")), "{failed:?}");
}
