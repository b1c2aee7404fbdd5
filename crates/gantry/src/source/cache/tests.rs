//! The cache's rules on a local directory: names, no-follow, modes, records, sweeping and
//! bounded waits. Loads through the cache are tested against an S3 server in
//! `tests/cache.rs`.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use super::*;

fn origin(provider: &'static str, endpoint: &str, bucket: &str) -> Origin {
    Origin {
        provider,
        endpoint: normalize_endpoint(endpoint),
        account: String::new(),
        bucket: bucket.to_owned(),
    }
}

fn name(origin: &Origin, key: &str, etag: &str) -> String {
    Identity::new(origin, key, Some(etag), None, 10).unwrap().name()
}

#[test]
fn names_are_one_to_one() {
    let s3 = origin("s3", "", "b");
    // ETags that an escaping scheme would fold together, weak and base64 ones included.
    let etags =
        ["\"v1:0\"", "\"v1.0\"", "\"v1_0\"", "W/\"x\"", "\"x\"", "x", "\"a+b/c==\"", "\"a_b_c__\""];
    let mut names: Vec<String> = etags.iter().map(|e| name(&s3, "m/x", e)).collect();
    // The same bucket, key and ETag from another endpoint or provider; `s3://gs/...`.
    names.push(name(&origin("s3", "http://127.0.0.1:9000", "b"), "m/x", "\"x\""));
    names.push(name(&origin("gcs", "", "b"), "m/x", "\"x\""));
    names.push(name(&origin("s3", "", "gs"), "b/m/x", "\"x\""));
    // Field boundaries moved: bucket/key and key/ETag.
    names.push(name(&origin("s3", "", "b/m"), "x", "\"x\""));
    names.push(name(&s3, "m/x\"x", "\""));
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "{names:?}");
    for n in &names {
        assert!(n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()), "{n}");
    }
    // A key with a basename longer than any file system allows still has a 64-character name.
    assert_eq!(name(&s3, &"k".repeat(1000), "\"x\"").len(), 64);
    assert!(Identity::new(&s3, "k", None, None, 1).is_none());
    assert!(Identity::new(&s3, "k", Some(""), None, 1).is_none());
    assert!(Identity::new(&s3, "k", None, Some("17"), 1).is_some());
}

#[test]
fn endpoints_are_normalized() {
    let cases = [
        ("HTTPS://S3.Example.com:443/", "https://s3.example.com"),
        ("http://127.0.0.1:80", "http://127.0.0.1"),
        ("http://127.0.0.1:8333", "http://127.0.0.1:8333"),
        ("https://h/Path/", "https://h/Path"),
        ("", ""),
    ];
    for (given, want) in cases {
        assert_eq!(normalize_endpoint(given), want, "{given}");
    }
}

/// `size` bytes of a pattern.
fn object(size: u64) -> Vec<u8> {
    (0..size).map(|i| (i * 7 % 251) as u8).collect()
}

/// Queues `bytes` at `offset` as chunks of `chunk` bytes, as a GET would.
fn put(w: &Writer, bytes: &[u8], offset: u64, chunk: usize) {
    let chunks: Vec<&[u8]> = bytes.chunks(chunk).collect();
    w.write(offset, &chunks);
}

/// Queues `bytes` as parts of `part` bytes, one `write` each, as the GETs would.
fn put_parts(w: &Writer, bytes: &[u8], part: usize) {
    for (k, p) in bytes.chunks(part).enumerate() {
        put(w, p, (k * part) as u64, 4096);
    }
}

fn identity(key: &str, size: u64) -> Identity {
    Identity::new(&origin("s3", "", "b"), key, Some("\"e\""), None, size).unwrap()
}

/// Writes a complete copy of `bytes` for `key` into `cache` through a writer, in two pieces
/// out of order, neither on a segment boundary, in chunks of odd sizes.
fn write_copy(cache: &Arc<CacheDir>, key: &str, bytes: &[u8]) -> String {
    let size = bytes.len() as u64;
    let w =
        Writer::create(Arc::clone(cache), identity(key, size), size, writer::testing::no_store())
            .unwrap();
    let cut = (record::SEGMENT_BYTES + 1000).min(size) as usize;
    put(&w, &bytes[cut..], cut as u64, 3001);
    put(&w, &bytes[..cut], 0, 7);
    w.finish(Ok(true))
}

#[test]
fn a_copy_reads_back_with_its_record_and_private_modes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("c");
    let cache = Arc::new(CacheDir::open(&root, false).unwrap());
    let size = 3 * record::SEGMENT_BYTES + 77;
    let bytes = object(size);
    let key = format!("m/{}.safetensors", "x".repeat(300));
    let text = write_copy(&cache, &key, &bytes);
    assert!(text.contains("written through"), "{text}");
    let Lookup::Hit(copy) = cache.find(&identity(&key, size), size) else { panic!("no hit") };
    let on_disk = std::fs::read(&copy.path).unwrap();
    assert_eq!(&on_disk[..size as usize], &bytes[..]);
    // The record: the xxh3 of each segment, as the xxhash crate computes it.
    let want: Vec<u64> =
        bytes.chunks(record::SEGMENT_BYTES as usize).map(xxhash_rust::xxh3::xxh3_64).collect();
    assert_eq!(copy.digests, want);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(&root.join("objects")), 0o700);
    assert_eq!(mode(&root.join("partial")), 0o700);
    assert_eq!(mode(&copy.path), 0o600);
    // Another version, size or key is not this copy.
    assert!(matches!(cache.find(&identity(&key, size + 1), size + 1), Lookup::Miss(_)));
    assert!(matches!(cache.find(&identity("other", size), size), Lookup::Miss(_)));
    assert_eq!(std::fs::read_dir(root.join("partial")).unwrap().count(), 0);
}

#[test]
fn shared_mode_is_group_readable_and_setgid() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("c");
    let cache = Arc::new(CacheDir::open(&root, true).unwrap());
    let bytes = object(1000);
    assert!(write_copy(&cache, "k", &bytes).contains("written through"));
    let Lookup::Hit(copy) = cache.find(&identity("k", 1000), 1000) else { panic!("no hit") };
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&root), 0o2770);
    assert_eq!(mode(&root.join("objects")), 0o2770);
    assert_eq!(mode(&copy.path), 0o640);
    // A private cache refuses the group-writable directories of a shared one.
    let e = CacheDir::open(&root, false).unwrap_err();
    assert!(e.contains("objects") && e.contains("not private"), "{e}");
}

/// A copy written, then replaced by `replace`: the lookup misses, saying `why`, and the
/// bad copy is gone (except a directory, which stays).
fn refused(replace: impl Fn(&Path), why: &str) {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(CacheDir::open(&dir.path().join("c"), false).unwrap());
    let bytes = object(5000);
    write_copy(&cache, "k", &bytes);
    let path = cache.copy_path(&identity("k", 5000).name());
    replace(&path);
    let Lookup::Miss(text) = cache.find(&identity("k", 5000), 5000) else { panic!("{why}: hit") };
    assert!(text.contains(why) && text.contains(&path.display().to_string()), "{text}");
    if !path.is_dir() {
        assert!(std::fs::symlink_metadata(&path).is_err(), "{why}: the copy stayed");
    }
}

#[test]
fn untrusted_copies_are_refused_and_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let decoy = dir.path().join("decoy");
    std::fs::write(&decoy, object(5000 + 200)).unwrap();
    refused(
        |p| {
            std::fs::remove_file(p).unwrap();
            std::os::unix::fs::symlink(&decoy, p).unwrap();
        },
        "symbolic link",
    );
    assert!(decoy.exists(), "the link's target was removed");
    refused(
        |p| std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o666)).unwrap(),
        "writable by others",
    );
    refused(
        |p| {
            let mut b = std::fs::read(p).unwrap();
            b.truncate(b.len() - 1);
            std::fs::write(p, b).unwrap();
        },
        "bytes",
    );
    refused(
        |p| {
            let mut b = std::fs::read(p).unwrap();
            let at = b.len() - 3;
            b[at] ^= 1;
            std::fs::write(p, b).unwrap();
        },
        "record",
    );
    refused(
        |p| {
            std::fs::remove_file(p).unwrap();
            std::fs::create_dir(p).unwrap();
        },
        "is a directory, not a regular file",
    );
    refused(|p| std::fs::hard_link(p, p.with_extension("other")).unwrap(), "links");
}

/// Whether this test runs as root, which `what` needs; without root a failure, unless
/// `GANTRY_SKIP_ROOT_TESTS=1` says to skip (then `false`, with a line saying so).
fn as_root(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let skip = std::env::var("GANTRY_SKIP_ROOT_TESTS").as_deref() == Ok("1");
    assert!(skip, "{what} needs root: run as root, or set GANTRY_SKIP_ROOT_TESTS=1");
    println!("skipped: {what} needs root (GANTRY_SKIP_ROOT_TESTS=1)");
    false
}

#[test]
fn a_copy_owned_by_another_user_is_refused() {
    if !as_root("chown") {
        return;
    }
    refused(
        |p| std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap(),
        "owned by uid 65534",
    );
}

#[test]
fn links_below_the_cache_are_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let root = dir.path().join("c");
    std::fs::create_dir(&root).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("objects")).unwrap();
    let e = CacheDir::open(&root, false).unwrap_err();
    assert!(e.contains("objects"), "{e}");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "something was made outside");
}

#[test]
fn the_sweep_removes_only_what_dead_writers_left() {
    let dir = tempfile::tempdir().unwrap();
    let cache = CacheDir::open(&dir.path().join("c"), false).unwrap();
    let partial = dir.path().join("c/partial");
    let temp = |n: u8| format!("{}.{}.partial", "ab".repeat(32), format!("{n:02x}").repeat(16));
    let (dead, live_name) = (partial.join(temp(1)), partial.join(temp(2)));
    std::fs::write(&dead, b"left by a killed writer").unwrap();
    std::fs::write(&live_name, b"being written").unwrap();
    // Not a writer's name: whatever it is, the sweep leaves it.
    std::fs::write(partial.join("state.db"), b"someone else's").unwrap();
    let live = std::fs::File::open(&live_name).unwrap();
    assert!(fs::flock(&live, libc::LOCK_EX).unwrap());
    cache.sweep();
    assert!(!dead.exists());
    assert!(live_name.exists());
    drop(live);
    cache.sweep();
    assert!(!live_name.exists());
    assert!(partial.join("state.db").exists(), "the sweep removed a file no writer made");
}

/// A link planted where the cache is to be, by another user, is not followed (the cache
/// would work, and sweep, in a directory of that user's choosing); the caller's own is.
#[test]
fn a_link_at_the_cache_path_is_followed_only_when_the_caller_made_it() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    std::fs::create_dir_all(target.join("partial")).unwrap();
    std::fs::write(target.join("partial/state.db"), b"not the cache's").unwrap();
    let link = dir.path().join("cache");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert!(CacheDir::open(&link, false).is_ok(), "the caller's own link is followed");
    if !as_root("lchown") {
        return;
    }
    std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
    let e = CacheDir::open(&link, false).map(|_| ()).unwrap_err();
    assert!(e.contains("symbolic link owned by uid 65534") && e.contains("not followed"), "{e}");
    assert!(target.join("partial/state.db").exists());
}

#[test]
fn a_stalled_disk_costs_the_copy_not_the_load() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(CacheDir::open(&dir.path().join("c"), false).unwrap());
    let bytes = object(200_000);
    let stall = writer::testing::STALL.lock();
    let w = writer::testing::writer(
        Arc::clone(&cache),
        identity("k", 200_000),
        200_000,
        Duration::from_millis(200),
        true,
    );
    put(&w, &bytes, 0, 4096);
    // The disk froze before it took a part: no rate to go by, the load waits its bound.
    let text = w.finish(Ok(true));
    assert!(text.contains("did not finish"), "{text}");
    drop(stall);
    // Once the disk wakes up, the copy lands: complete and checked.
    for _ in 0..200 {
        if let Lookup::Hit(copy) = cache.find(&identity("k", 200_000), 200_000) {
            assert_eq!(&std::fs::read(copy.path).unwrap()[..200_000], &bytes[..]);
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the copy never landed");
}

/// A disk that takes the parts far slower than they came: once its rate says the queue
/// would take longer than `DRAIN_WAIT`, the load is not kept waiting, and the copy lands
/// behind it, its outcome kept for `wait_behind`.
#[test]
fn a_slow_disk_completes_the_copy_behind_the_load() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(CacheDir::open(&dir.path().join("c"), false).unwrap());
    let size = 40 * 4096;
    let bytes = object(size);
    let w = writer::testing::slow(
        Arc::clone(&cache),
        identity("s", size),
        size,
        Duration::from_millis(20),
    );
    put_parts(&w, &bytes, 4096);
    // Let the disk take a part or two, so that its rate is known.
    while w.queued_for_disk() == size {
        std::thread::sleep(Duration::from_millis(5));
    }
    let queued = w.queued_for_disk();
    let text = w.finish(Ok(true));
    assert!(text.contains("being completed behind the load"), "{text}");
    assert!(text.contains("bytes are still queued"), "{queued} queued: {text}");
    // Other tests' `wait_behind` may take this copy's note: look for the copy itself.
    for _ in 0..500 {
        if let Lookup::Hit(copy) = cache.find(&identity("s", size), size) {
            assert_eq!(&std::fs::read(copy.path).unwrap()[..size as usize], &bytes[..]);
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the copy never landed");
}

#[test]
fn incomplete_or_changed_copies_never_land() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(CacheDir::open(&dir.path().join("c"), false).unwrap());
    let bytes = object(10);
    let w = Writer::create(Arc::clone(&cache), identity("k", 10), 10, writer::testing::no_store())
        .unwrap();
    put(&w, &bytes[..6], 0, 4);
    assert!(w.finish(Ok(true)).contains("incomplete"));
    let w = Writer::create(Arc::clone(&cache), identity("k", 10), 10, writer::testing::no_store())
        .unwrap();
    put(&w, &bytes, 0, 4);
    assert!(w.finish(Ok(false)).contains("changed"));
    let w = Writer::create(Arc::clone(&cache), identity("k", 10), 10, writer::testing::no_store())
        .unwrap();
    put(&w, &bytes, 0, 4);
    drop(w); // a load that failed
    assert!(matches!(cache.find(&identity("k", 10), 10), Lookup::Miss(_)));
    for _ in 0..200 {
        if std::fs::read_dir(dir.path().join("c/partial")).unwrap().count() == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("a temporary file stayed");
}

/// Waits for the copies completing behind their loads (every test's), at most 30 s.
fn settle_behind() {
    let (_, running) = writer::wait_behind(Duration::from_secs(30));
    assert_eq!(running, 0, "copies still being completed behind their loads");
}

#[test]
fn parts_the_disk_cannot_take_are_fetched_again_behind_the_load() {
    for miss in [1, 3] {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(CacheDir::open(&dir.path().join("c"), false).unwrap());
        let size = 1_000_003;
        let bytes = object(size);
        let reference = bytes.clone();
        let fetched = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = Arc::clone(&fetched);
        let refetch: writer::Refetch = Box::new(move |at, buf: &mut [u8]| {
            counted.fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
            buf.copy_from_slice(&reference[at as usize..at as usize + buf.len()]);
            Ok(())
        });
        let w =
            writer::testing::behind(Arc::clone(&cache), identity("k", size), size, miss, refetch);
        put_parts(&w, &bytes, 65_536 + 17); // parts across segment bounds
        let text = w.finish(Ok(true));
        assert!(text.contains("being completed behind the load"), "{text}");
        settle_behind();
        let Lookup::Hit(copy) = cache.find(&identity("k", size), size) else {
            panic!("the copy completed behind the load did not land (every {miss})")
        };
        assert_eq!(&std::fs::read(copy.path).unwrap()[..size as usize], &bytes[..]);
        let fetched = fetched.load(std::sync::atomic::Ordering::Relaxed);
        match miss {
            1 => assert_eq!(fetched, size, "everything missed is fetched again, once"),
            _ => assert!(fetched > 0 && fetched < size, "only what was missed: {fetched}"),
        }
    }
}

#[test]
fn a_copy_whose_bytes_cannot_be_fetched_again_never_lands() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(CacheDir::open(&dir.path().join("c"), false).unwrap());
    let bytes = object(300_000);
    let refetch: writer::Refetch = Box::new(|at, _: &mut [u8]| Err(format!("412 at {at}")));
    let w =
        writer::testing::behind(Arc::clone(&cache), identity("k", 300_000), 300_000, 2, refetch);
    put_parts(&w, &bytes, 10_000);
    assert!(w.finish(Ok(true)).contains("behind the load"));
    settle_behind();
    assert!(matches!(cache.find(&identity("k", 300_000), 300_000), Lookup::Miss(_)));
    assert_eq!(std::fs::read_dir(dir.path().join("c/partial")).unwrap().count(), 0);
    // A changed object is not fetched again at all.
    let refetch: writer::Refetch = Box::new(|_, _: &mut [u8]| panic!("fetched a changed object"));
    let w =
        writer::testing::behind(Arc::clone(&cache), identity("k", 300_000), 300_000, 2, refetch);
    put_parts(&w, &bytes, 10_000);
    let text = w.finish(Ok(false));
    assert!(text.starts_with("not cached") && !text.contains("behind"), "{text}");
}

/// A gid the caller is not a member of.
fn foreign_gid() -> u32 {
    (1..=65534u32).rev().find(|&g| !fs::in_group(g)).unwrap()
}

#[test]
fn a_shared_cache_trusts_no_group_the_caller_did_not_choose() {
    if !as_root("chown") {
        return;
    }
    // Another user (uid 65534) made a shared cache, gave it a group of theirs the caller is
    // not in, and put a copy in it whose record matches its (their) bytes.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("c");
    let cache = Arc::new(CacheDir::open(&root, true).unwrap());
    let bytes = object(5000);
    assert!(write_copy(&cache, "k", &bytes).contains("written through"));
    drop(cache);
    let gid = foreign_gid();
    for p in files_and_dirs(&root) {
        std::os::unix::fs::chown(&p, Some(65534), Some(gid)).unwrap();
    }
    let e = CacheDir::open(&root, true).unwrap_err();
    assert!(e.contains("not a member") && e.contains(&root.display().to_string()), "{e}");
    // The same cache is the caller's to trust once it belongs to the caller's group.
    // SAFETY: getegid has no preconditions.
    let own = unsafe { libc::getegid() };
    for p in files_and_dirs(&root) {
        std::os::unix::fs::chown(&p, Some(65534), Some(own)).unwrap();
    }
    let cache = CacheDir::open(&root, true).unwrap();
    assert!(matches!(cache.find(&identity("k", 5000), 5000), Lookup::Hit(_)));
}

#[test]
fn a_shared_cache_writable_by_everyone_is_not_used() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("c");
    let cache = Arc::new(CacheDir::open(&root, true).unwrap());
    assert!(write_copy(&cache, "k", &object(5000)).contains("written through"));
    drop(cache);
    // Anyone could make `objects/` there, and it would take the directory's group.
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o2777)).unwrap();
    let e = CacheDir::open(&root, true).unwrap_err();
    assert!(e.contains("outside its group") && e.contains(&root.display().to_string()), "{e}");
}

/// `root` and everything below it.
fn files_and_dirs(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![root.to_path_buf()];
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_and_dirs(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// One load opens (and sweeps) its cache once: later objects reuse the open cache, and a
/// cache that could not be used is not tried again (one warning, one bounded wait per load).
#[test]
fn a_load_opens_its_cache_once_and_remembers_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c");
    let mut opened = Opened::default();
    let (cache, _) = open_and_find(&path, false, &mut opened, Some(identity("a", 10)), 10);
    assert!(cache.is_some() && matches!(opened, Opened::Open(_)), "{opened:?}");
    // The path no longer opens as a cache; the load's open one still serves.
    std::fs::rename(&path, dir.path().join("moved")).unwrap();
    std::fs::write(&path, b"not a directory").unwrap();
    let (cache, found) = open_and_find(&path, false, &mut opened, Some(identity("b", 10)), 10);
    assert!(cache.is_some(), "{found:?}");
    // A new load finds it unusable, and says so again for its next object without retrying.
    let mut opened = Opened::default();
    let (cache, _) = open_and_find(&path, false, &mut opened, Some(identity("a", 10)), 10);
    assert!(cache.is_none() && matches!(opened, Opened::Unusable(_)), "{opened:?}");
    std::fs::remove_file(&path).unwrap();
    let (cache, found) = open_and_find(&path, false, &mut opened, Some(identity("b", 10)), 10);
    assert!(cache.is_none(), "a refused cache was tried again");
    assert!(matches!(&found, Lookup::Miss(why) if why.starts_with("not cached: ")), "{found:?}");
    assert!(!path.exists(), "the refused cache was opened (and created) again");
}

/// Whether `dir` is on a file system that really writes `O_DIRECT` around the page cache:
/// it opens with the flag (as the local readers probe it) and is not tmpfs (which takes the
/// flag since Linux 6.6 and caches all the same).
fn direct_io(dir: &Path) -> bool {
    let probe = dir.join("probe");
    std::fs::write(&probe, b"x").unwrap();
    let Ok((file, _)) = crate::source::probe::open_direct(&probe) else { return false };
    crate::source::probe::file_system(&file, &probe).kind != crate::plan::mount::FsKind::Tmpfs
}

/// Writes `bytes` as parts of `part` bytes at their offsets, from buffers of their own (as a
/// GET does, from where the part landed), lands the copy, checks its bytes and record, and
/// returns the fractions of its first `head` bytes and of the rest that were in the page
/// cache right after it landed, and whether its file system writes `O_DIRECT` directly.
fn copy_in_parts(key: &str, bytes: &[u8], part: usize, head: u64) -> (f64, f64, bool) {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(CacheDir::open(&dir.path().join("c"), false).unwrap());
    let size = bytes.len() as u64;
    let w =
        Writer::create(Arc::clone(&cache), identity(key, size), size, writer::testing::no_store())
            .unwrap();
    for (k, p) in bytes.chunks(part).enumerate() {
        w.write((k * part) as u64, &[p]);
    }
    let text = w.finish(Ok(true));
    assert!(text.contains("written through"), "{text}");
    // Measured before anything reads the copy.
    let path = cache.copy_path(&identity(key, size).name());
    let file = std::fs::File::open(&path).unwrap();
    let cached = |offset, len| crate::source::probe::resident_fraction(&file, offset, len).unwrap();
    let (head_cached, rest_cached) = (cached(0, head), cached(head, size - head));
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[..size as usize], bytes);
    let Lookup::Hit(copy) = cache.find(&identity(key, size), size) else { panic!("no copy") };
    let want: Vec<u64> =
        bytes.chunks(record::SEGMENT_BYTES as usize).map(xxhash_rust::xxh3::xxh3_64).collect();
    assert_eq!(copy.digests, want, "the record");
    (head_cached, rest_cached, direct_io(dir.path()))
}

/// Whole blocks at aligned offsets go to the disk with `O_DIRECT` (never through the page
/// cache) where the file system does that; the object's unaligned last part goes through the
/// page cache; either way the copy is the object's bytes with their record.
#[test]
fn aligned_parts_go_to_the_disk_directly() {
    let part = 256 << 10;
    let bytes = object(6 * part as u64 + 5000);
    let whole = 6 * part as u64;
    let (head, rest, direct) = copy_in_parts("d", &bytes, part, whole);
    if direct {
        assert_eq!(head, 0.0, "aligned parts went through the page cache");
        assert_eq!(rest, 1.0, "the last part goes through the page cache");
    } else {
        assert_eq!(
            (head, rest),
            (1.0, 1.0),
            "without O_DIRECT every part goes through the page cache"
        );
    }
}

/// Parts that end inside record segments (each segment then written by two pieces and read
/// back to be hashed), written directly, then an unaligned last part through the page cache:
/// the bytes and the record still match.
#[test]
fn segments_written_by_direct_and_buffered_pieces_hash_right() {
    let part = (256 << 10) + 4096;
    let bytes = object(5 * part as u64 + 777);
    let (head, _, direct) = copy_in_parts("m", &bytes, part, 5 * part as u64);
    if direct {
        assert!(head < 1.0, "no part was written directly");
    }
}
