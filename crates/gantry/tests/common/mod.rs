//! Shared test helpers: random checkpoints written by the `safetensors` crate's serializer, and
//! the reference reader (`read_exact_at` into a `Vec`).
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use gantry::{Checkpoint, Dtype, TensorEntry};
use safetensors::tensor::TensorView;

/// A directory on a disk file system (not tmpfs), so `O_DIRECT` reads go to the device:
/// `GANTRY_TEST_TMPDIR` when set (test binaries run on another machine), else the build's.
pub fn scratch() -> tempfile::TempDir {
    let base = std::env::var_os("GANTRY_TEST_TMPDIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")), PathBuf::from);
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

/// A checkpoint file of tensors with the given dtypes and shapes; bytes from `seed`.
pub fn write_file(path: &Path, tensors: &[(Dtype, Vec<usize>)], seed: u64) {
    write_file_named(path, tensors, seed, "");
}

/// [`write_file`] with every tensor name (`t00000`, `t00001`...) prefixed with `prefix`, so
/// that the shards of one checkpoint name their tensors apart.
pub fn write_file_named(path: &Path, tensors: &[(Dtype, Vec<usize>)], seed: u64, prefix: &str) {
    let mut state = seed;
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(dtype, shape)| {
            let mut v = vec![0u8; shape.iter().product::<usize>() * dtype.bitsize() / 8];
            gantry::synth::fill_random(&mut v, &mut state);
            v
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&data)
        .enumerate()
        .map(|(i, ((dtype, shape), d))| {
            (format!("{prefix}t{i:05}"), TensorView::new(*dtype, shape.clone(), d).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// The reference: a tensor's bytes read with a plain `read_exact_at`.
pub fn reference(checkpoint: &Checkpoint, t: &TensorEntry) -> Vec<u8> {
    let file = std::fs::File::open(&checkpoint.file(t.file).path).unwrap();
    let mut v = vec![0u8; t.len as usize];
    file.read_exact_at(&mut v, t.offset).unwrap();
    v
}

/// Asserts that every tensor of `model` equals the reference, and that it loaded `expected`.
pub fn assert_matches_reference(model: &gantry::HostModel, expected: usize) {
    let c = model.checkpoint();
    let mut n = 0;
    for t in model.tensors() {
        assert_eq!(t.bytes.len() as u64, t.entry.len);
        assert!(
            t.bytes == reference(c, t.entry).as_slice(),
            "tensor {} differs from the reference",
            t.entry.name
        );
        n += 1;
    }
    assert_eq!(n, expected);
}

/// Runs `f` on another thread and fails the test if it does not return within `limit`.
pub fn with_deadline<T: Send + 'static>(
    limit: std::time::Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).expect("the load hung")
}

/// Every tensor of `model` (loaded from object storage) equals the local file's bytes.
pub fn assert_matches_local(model: &gantry::HostModel, local: &Checkpoint) {
    assert_eq!(model.checkpoint().tensors.len(), local.tensors.len());
    for (t, l) in model.tensors().zip(&local.tensors) {
        assert_eq!((&t.entry.name, t.entry.len), (&l.name, l.len));
        assert!(t.bytes == reference(local, l).as_slice(), "tensor {} differs", l.name);
    }
}

pub fn path_of(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// GPU 0, held by one test at a time: tests that measure free device memory must not see
/// another test's allocations come and go. `None` (with a line saying why) without a GPU,
/// unless `GANTRY_REQUIRE_GPU=1`, which turns the skip into a failure.
pub struct Gpu {
    device: std::sync::Arc<gantry::CudaDevice>,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl std::ops::Deref for Gpu {
    type Target = std::sync::Arc<gantry::CudaDevice>;
    fn deref(&self) -> &std::sync::Arc<gantry::CudaDevice> {
        &self.device
    }
}

pub fn gpu() -> Option<Gpu> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match gantry::CudaDevice::open(0) {
        Ok(device) => Some(Gpu { device, _serial: serial }),
        Err(e) => {
            assert!(
                std::env::var("GANTRY_REQUIRE_GPU").as_deref() != Ok("1"),
                "GANTRY_REQUIRE_GPU=1 but: {e}"
            );
            println!("skipped: no GPU ({e})");
            None
        }
    }
}

/// The slice of a tensor cut element by element from the reference read (independent of the
/// engine's runs).
pub fn reference_slice(
    checkpoint: &Checkpoint,
    t: &TensorEntry,
    share: gantry::placement::Share,
) -> Vec<u8> {
    let full = reference(checkpoint, t);
    let gantry::placement::Share::Slice(s) = share else { return full };
    let elem = (t.dtype.bitsize() / 8) as u64;
    let shape = &t.shape;
    let count: u64 = shape.iter().product();
    let mut out = Vec::new();
    for flat in 0..count {
        // The multi-index of element `flat`, outermost first.
        let mut rest = flat;
        let mut index = vec![0u64; shape.len()];
        for d in (0..shape.len()).rev() {
            index[d] = rest % shape[d];
            rest /= shape[d];
        }
        if index[s.dim] >= s.start && index[s.dim] < s.start + s.len {
            let at = (flat * elem) as usize;
            out.extend_from_slice(&full[at..at + elem as usize]);
        }
    }
    out
}

/// GPUs `0..n` and NCCL for ranks as threads, or `None` after saying why (a failure with
/// `GANTRY_REQUIRE_GPU=1`).
#[allow(dead_code)]
pub fn gpus_and_nccl(
    n: usize,
) -> Option<(std::sync::Arc<gantry::coop::Nccl>, Vec<std::sync::Arc<gantry::CudaDevice>>)> {
    let found = gantry::coop::load_nccl()
        .map_err(|e| format!("NCCL is not available: {e}"))
        .and_then(|nccl| {
            let gpus: Vec<_> =
                (0..n as u32).map_while(|g| gantry::CudaDevice::open(g).ok()).collect();
            if gpus.len() == n {
                Ok((nccl, gpus))
            } else {
                Err(format!("{} GPU(s); {n} ranks need {n}", gpus.len()))
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

/// Fails every read with EIO (a rank whose storage fails).
pub struct Eio;

impl gantry::io::fault::FaultInjector for Eio {
    fn rewrite(&self, _: usize, _: u64, _: u64, _: i64) -> i64 {
        -(libc::EIO as i64)
    }
}

/// Rank 1 of 2 failed with its reads' EIO (`own`), and rank 0 (`other`) failed naming it.
pub fn assert_rank_1_failed_with_eio<T: std::fmt::Debug, U: std::fmt::Debug>(
    own: &gantry::Result<T>,
    other: &gantry::Result<U>,
) {
    let own = own.as_ref().expect_err("rank 1's reads fail");
    assert!(own.to_string().contains("Input/output error"), "{own}");
    match other {
        Err(gantry::Error::Rank { rank: 1, world: 2, message }) => {
            assert!(message.contains("Input/output error"), "{message}")
        }
        other => panic!("rank 0: {other:?}"),
    }
}

/// Runs `rank(r, gpu, communicator)` for ranks 0 and 1 of a cooperative load on GPUs 0 and 1,
/// each in a thread of its own, both communicators joined first (60 s timeout); returns each
/// rank's result in rank order, or nothing when the machine lacks two GPUs or NCCL (after
/// saying why; a failure with `GANTRY_REQUIRE_GPU=1`).
pub fn two_ranks_with<T: Send>(
    rank: impl Fn(usize, &std::sync::Arc<gantry::CudaDevice>, &gantry::coop::Communicator) -> T + Sync,
) -> Vec<T> {
    let Some((nccl, gpus)) = gpus_and_nccl(2) else { return Vec::new() };
    let id = gantry::coop::UniqueId::new(&nccl).unwrap();
    let barrier = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|r| {
                let (nccl, gpu, rank, barrier) =
                    (std::sync::Arc::clone(&nccl), &gpus[r], &rank, &barrier);
                s.spawn(move || {
                    let timeout = std::time::Duration::from_secs(60);
                    let comm =
                        gantry::coop::Communicator::init(nccl, &id, r, 2, gpu, timeout).unwrap();
                    barrier.wait();
                    rank(r, gpu, &comm)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A small Llama-shaped checkpoint in two shards (a few MiB, every tensor-parallel split
/// divides by 2 and 4) written into `dir` from `seed`, opened.
pub fn small_llama(dir: &Path, seed: u64) -> Checkpoint {
    let spec = gantry::synth::SynthSpec {
        vocab: 1024,
        hidden: 256,
        intermediate: 768,
        kv: 64,
        layers: 3,
        shards: 2,
    };
    gantry::synth::write_checkpoint(dir, &spec, seed).unwrap();
    gantry::open(dir).unwrap()
}

/// Whether this test may run: root, or a failure that says how to run it (or skip it with
/// `GANTRY_SKIP_ROOT_TESTS=1`, then `false` and a line saying so).
pub fn root_or_skip(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("GANTRY_SKIP_ROOT_TESTS").as_deref() == Ok("1"),
        "{what} needs root: run the tests as root (sudo -E cargo test ...), or set GANTRY_SKIP_ROOT_TESTS=1 to skip it"
    );
    println!("skipped: {what} needs root (GANTRY_SKIP_ROOT_TESTS=1)");
    false
}

/// `sha256sum FILE`'s digest (coreutils: the reference the engine's SHA-256 is checked with).
pub fn sha256sum(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum (coreutils) must be installed: apt-get install coreutils");
    assert!(out.status.success(), "sha256sum {}", path.display());
    let line = String::from_utf8(out.stdout).unwrap();
    // A name with a backslash makes the line start with one (an escaped name).
    line.trim_start_matches('\\').split_whitespace().next().unwrap().to_owned()
}
