//! Faults driven through the real pipeline, all four readers: short reads, EINTR, EAGAIN, EIO
//! at a chosen offset, an early end of file, and a file truncated after its header was read.
//! Each gives correct data or a clear error; never a hang, never a reported success. The
//! direct and buffered readers run everywhere; the object reader against SeaweedFS as
//! `tests/object.rs` starts it (`GANTRY_SKIP_OBJECT_TESTS=1` skips it); cuFile, in whichever
//! mode the driver offers, only on a GPU machine (a GPU trial: it skips without a GPU unless
//! `GANTRY_REQUIRE_GPU=1`).

mod common;
#[path = "common/store.rs"]
mod store;
#[path = "common/tools.rs"]
mod tools;

use std::collections::HashSet;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use gantry::io::fault::FaultInjector;
use gantry::{Checkpoint, Config, Dtype, Error, HostModel, Loader, PathChoice};
use parking_lot::Mutex;

/// A rewrite of one read result.
type Rewrite = fn(i64) -> i64;

/// Applies `kind` to the first result seen at each (file, offset); later results pass.
struct Once {
    kind: Rewrite,
    seen: Mutex<HashSet<(usize, u64)>>,
}

impl FaultInjector for Once {
    fn rewrite(&self, file: usize, offset: u64, _len: u64, result: i64) -> i64 {
        if self.seen.lock().insert((file, offset)) {
            (self.kind)(result)
        } else {
            result
        }
    }
}

/// Fails every read that covers `at` with `errno` (0: reports end of file there).
struct At {
    at: u64,
    errno: i32,
}

impl FaultInjector for At {
    fn rewrite(&self, _file: usize, offset: u64, len: u64, result: i64) -> i64 {
        if (offset..offset + len).contains(&self.at) {
            -i64::from(self.errno)
        } else {
            result
        }
    }
}

fn checkpoint() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = scratch();
    let path = path_of(&dir, "m.safetensors");
    let tensors: Vec<(Dtype, Vec<usize>)> =
        (0..12).map(|i| (Dtype::F32, vec![1000 + 37 * i, 3])).collect();
    write_file(&path, &tensors, 9);
    (dir, path)
}

/// Runs a load on another thread and fails the test if it does not finish in time.
fn load(
    path: &std::path::Path,
    reader: PathChoice,
    fault: Arc<dyn FaultInjector>,
) -> Result<HostModel, Error> {
    let config = Config::default()
        .path(reader)
        .chunk_bytes(16 << 10)
        .staging_bytes(64 << 10)
        .queue_depth(3)
        .threads(3)
        .fault_injector(fault);
    let path = path.to_path_buf();
    with_deadline(move || Loader::new(config)?.load(&path))
}

/// Runs `f` on another thread and fails the test if it does not return within a minute.
fn with_deadline(
    f: impl FnOnce() -> Result<HostModel, Error> + Send + 'static,
) -> Result<HostModel, Error> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60)).expect("the load hung")
}

const READERS: [PathChoice; 2] = [PathChoice::Direct, PathChoice::Buffered];

#[test]
fn transient_faults_still_give_correct_data() {
    let kinds: [(&str, Rewrite); 4] = [
        ("short read", |r| if r > 1 { r / 2 } else { r }),
        ("one byte", |r| r.min(1)),
        ("EINTR", |_| -i64::from(libc::EINTR)),
        ("EAGAIN", |_| -i64::from(libc::EAGAIN)),
    ];
    let (_dir, path) = checkpoint();
    for reader in READERS {
        for (name, kind) in kinds {
            let fault = Arc::new(Once { kind, seen: Mutex::new(HashSet::new()) });
            let model = load(&path, reader, fault.clone())
                .unwrap_or_else(|e| panic!("{reader:?} {name}: {e}"));
            assert_matches_reference(&model, 12);
            assert!(
                fault.seen.lock().len() > 1,
                "{reader:?} {name}: the injector was not exercised"
            );
        }
    }
}

#[test]
fn eio_names_file_and_offset() {
    let (_dir, path) = checkpoint();
    let at = 70_000;
    for reader in READERS {
        let err = load(&path, reader, Arc::new(At { at, errno: libc::EIO }))
            .expect_err("EIO must fail the load");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        let Error::Io { path: p, offset, len, .. } = &err else { panic!("{err:?}") };
        assert_eq!(p, &path);
        assert!(*offset <= at && at < offset + len, "{reader:?}: {err}");
        let message = err.to_string();
        assert!(
            message.contains("m.safetensors") && message.contains(&format!("offset {offset}")),
            "{message}"
        );
    }
}

#[test]
fn early_end_of_file_is_truncation() {
    let (_dir, path) = checkpoint();
    for reader in READERS {
        let err = load(&path, reader, Arc::new(At { at: 50_000, errno: 0 }))
            .expect_err("EOF must fail the load");
        assert!(matches!(err, Error::Truncated { .. }), "{reader:?}: {err}");
    }
}

#[test]
fn file_truncated_after_planning() {
    let (_dir, path) = checkpoint();
    for reader in READERS {
        let checkpoint = Checkpoint::open(&path).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(len - 5000).unwrap();
        let config = Config::default().path(reader).chunk_bytes(16 << 10).staging_bytes(64 << 10);
        let err =
            with_deadline(move || Loader::new(config)?.load_with(checkpoint, |_| true, |_| {}))
                .expect_err("truncated file must fail");
        let Error::Truncated { path: p, offset, expected_len } = &err else {
            panic!("{reader:?}: {err:?}")
        };
        assert_eq!((p, *expected_len), (&path, len));
        assert!(*offset <= len - 5000, "{err}");
        assert!(err.to_string().contains("truncated"));
        file.set_len(len).unwrap(); // zeros: a later load reads wrong bytes but the right length
    }
}

/// Sets the cancel flag at the first read it sees, then slows every read down, so the load
/// could only succeed by ignoring the flag for seconds.
struct CancelAtFirstRead(Arc<std::sync::atomic::AtomicBool>);

impl FaultInjector for CancelAtFirstRead {
    fn rewrite(&self, _file: usize, _offset: u64, _len: u64, result: i64) -> i64 {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        result
    }
}

#[test]
fn cancel_flag_stops_the_load_with_an_error() {
    let (_dir, path) = checkpoint();
    for reader in READERS {
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let config = Config::default()
            .path(reader)
            .chunk_bytes(4096)
            .staging_bytes(16384)
            .queue_depth(2)
            .threads(2)
            .cancel_flag(Arc::clone(&flag))
            .fault_injector(Arc::new(CancelAtFirstRead(Arc::clone(&flag))));
        let path = path.clone();
        match with_deadline(move || Loader::new(config)?.load(&path)) {
            Err(Error::Cancelled) => {}
            other => panic!("{reader:?}: {:?}", other.map(|m| m.report().clone())),
        }
    }
}

/// The transient faults every reader must see through.
const TRANSIENT: [(&str, Rewrite); 4] = [
    ("short read", |r| if r > 1 { r / 2 } else { r }),
    ("one byte", |r| r.min(1)),
    ("EINTR", |_| -i64::from(libc::EINTR)),
    ("EAGAIN", |_| -i64::from(libc::EAGAIN)),
];

/// Checks that `err` is `EIO` at `at` of the file or object `path`.
fn assert_eio_at(err: &Error, path: &std::path::Path, at: u64, what: &str) {
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{what}: {err}");
    let Error::Io { path: p, offset, len, .. } = err else { panic!("{what}: {err:?}") };
    assert_eq!(p, path, "{what}");
    assert!(*offset <= at && at < offset + len, "{what}: {err}");
    let message = err.to_string();
    assert!(
        message.contains("m.safetensors") && message.contains(&format!("offset {offset}")),
        "{what}: {message}"
    );
}

/// The object reader: ranged GETs from SeaweedFS, each body chunk a read result.
#[test]
fn object_reader_faults_against_seaweedfs() {
    let Some(weed) = store::weed() else { return };
    let mut server = store::Server::start(&weed);
    let (_dir, path) = checkpoint();
    server.upload(&path, "faults/m.safetensors");
    let url = format!("s3://{}/faults/m.safetensors", store::BUCKET);
    let config = |fault: Arc<dyn FaultInjector>| {
        Config::default()
            .object_option("aws_endpoint_url", &server.endpoint)
            .object_option("aws_allow_http", "true")
            .object_option("aws_region", "us-east-1")
            .object_option("aws_access_key_id", store::ACCESS_KEY)
            .object_option("aws_secret_access_key", store::SECRET_KEY)
            .object_part_bytes(16 << 10)
            .chunk_bytes(16 << 10)
            .staging_bytes(64 << 10)
            .object_concurrency(3)
            .fault_injector(fault)
    };
    let load = |fault: Arc<dyn FaultInjector>| {
        let (config, url) = (config(fault), url.clone());
        with_deadline(move || Loader::new(config)?.load(&url))
    };
    for (name, kind) in TRANSIENT {
        let fault = Arc::new(Once { kind, seen: Mutex::new(HashSet::new()) });
        let model = load(fault.clone()).unwrap_or_else(|e| panic!("object {name}: {e}"));
        assert_eq!(model.report().files[0].reader, Some(gantry::ReaderKind::Object));
        for t in model.tensors() {
            let local = Checkpoint::open(&path).unwrap();
            let entry = local.tensors.iter().find(|l| l.name == t.entry.name).unwrap();
            assert!(t.bytes == reference(&local, entry), "object {name}: {}", t.entry.name);
        }
        assert_eq!(model.tensors().count(), 12, "object {name}");
        assert!(fault.seen.lock().len() > 1, "object {name}: the injector was not exercised");
    }
    let at = 70_000;
    let err = load(Arc::new(At { at, errno: libc::EIO })).expect_err("EIO must fail the load");
    assert_eio_at(&err, std::path::Path::new(&url), at, "object");
    let err = load(Arc::new(At { at: 50_000, errno: 0 })).expect_err("EOF must fail the load");
    assert!(matches!(err, Error::Truncated { .. }), "object: {err}");
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cancelling = config(Arc::new(CancelAtFirstRead(Arc::clone(&flag))))
        .object_part_bytes(4096)
        .object_concurrency(2)
        .cancel_flag(flag);
    let url = url.clone();
    match with_deadline(move || Loader::new(cancelling)?.load(&url)) {
        Err(Error::Cancelled) => {}
        other => panic!("object: {:?}", other.map(|m| m.report().clone())),
    }
    server.stop();
}

/// The cuFile reader, a GPU trial: each `cuFileRead` result through the injector.
#[test]
fn gds_reader_faults_on_a_gpu() {
    let Some(dev) = gpu() else { return };
    if let Err(reason) = &gantry::io::gds::facts().available {
        assert!(
            std::env::var("GANTRY_REQUIRE_GDS").as_deref() != Ok("1"),
            "GANTRY_REQUIRE_GDS=1 but: {reason}"
        );
        println!("skipped: cuFile unavailable ({reason})");
        return;
    }
    let (_dir, path) = checkpoint();
    let load = |fault: Arc<dyn FaultInjector>| {
        let config = Config::default()
            .path(PathChoice::Gds)
            .chunk_bytes(16 << 10)
            .queue_depth(3)
            .fault_injector(fault);
        Loader::new(config)?.load_to_device(&path, &dev)
    };
    for (name, kind) in TRANSIENT {
        let fault = Arc::new(Once { kind, seen: Mutex::new(HashSet::new()) });
        let model = match load(fault.clone()) {
            Err(e @ Error::Unavailable { .. })
                if e.to_string().contains("udev")
                    && std::env::var("GANTRY_REQUIRE_GDS").as_deref() != Ok("1") =>
            {
                println!("skipped: {e}");
                return;
            }
            other => other.unwrap_or_else(|e| panic!("cuFile {name}: {e}")),
        };
        let mut n = 0;
        for t in model.tensors() {
            let got = model.copy_to_host(&t).unwrap();
            let want = reference(model.checkpoint(), t.entry);
            assert!(got == want, "cuFile {name}: {}", t.entry.name);
            n += 1;
        }
        assert_eq!(n, 12, "cuFile {name}");
        assert!(fault.seen.lock().len() > 1, "cuFile {name}: the injector was not exercised");
    }
    let at = 70_000;
    let err = load(Arc::new(At { at, errno: libc::EIO })).expect_err("EIO must fail the load");
    assert_eio_at(&err, &path, at, "cuFile");
    let err = load(Arc::new(At { at: 50_000, errno: 0 })).expect_err("EOF must fail the load");
    assert!(matches!(err, Error::Truncated { .. }), "cuFile: {err}");
}
