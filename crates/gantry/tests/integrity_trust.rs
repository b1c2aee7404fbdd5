//! What the SHA-256 check reads and writes beside the checkpoint, tried as a hostile or careless
//! user would: segment-state records (a planted link at the record or its temporary names, a
//! linked records directory, records another user owns or can write, a FIFO or `/dev/zero` in
//! place of a record) and `SHA256SUMS` (a FIFO, `/dev/zero`, too large; every format
//! `sha256sum` writes; malformed lines and duplicate names). Every load is compared with a
//! plain read of the files, every digest with `sha256sum`'s.

mod common;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use gantry::integrity::{states, Hashing};
use gantry::{Config, Dtype, Error, Loader};

/// Bytes per SHA-256 segment: the test file is many segments long.
const SEGMENT_BYTES: u64 = 65 * 64;

/// Hang guard: a load that reads a FIFO would never return.
const DEADLINE: Duration = Duration::from_secs(120);

/// `sha256sum ARGS NAME` in `dir`, as `SHA256SUMS` there.
fn write_sums(dir: &Path, args: &[&str], name: &str) {
    let out = Command::new("sha256sum").args(args).arg(name).current_dir(dir).output().unwrap();
    assert!(out.status.success());
    std::fs::write(dir.join("SHA256SUMS"), out.stdout).unwrap();
}

/// A one-file checkpoint named `name` in a fresh directory, many segments long.
fn checkpoint(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = scratch();
    let path = dir.path().join(name);
    let tensors: Vec<(Dtype, Vec<usize>)> =
        (0..5).map(|i| (Dtype::F32, vec![37 + i * 11, 29])).collect();
    write_file(&path, &tensors, 7);
    assert!(std::fs::metadata(&path).unwrap().len() > 4 * SEGMENT_BYTES);
    (dir, path)
}

fn config(cache: &Path) -> Config {
    Config::default().verify_sha256(true).cache_dir(cache).sha256_segment_bytes(SEGMENT_BYTES)
}

/// Loads `dir` (within [`DEADLINE`]), compares every tensor with a plain read, and returns the
/// file's check.
fn load(config: Config, dir: &Path) -> gantry::Result<gantry::integrity::FileCheck> {
    let root = dir.to_path_buf();
    let model = with_deadline(DEADLINE, move || Loader::new(config)?.load(&root))?;
    assert_matches_reference(&model, model.tensors().count());
    Ok(model.report().files[0].integrity.clone().expect("checked"))
}

/// The records directory `config(cache)` uses, unless the environment names another one.
fn records_dir(cache: &Path) -> Option<PathBuf> {
    if std::env::var_os(states::STATES_DIR_ENV).is_some() {
        println!("skipped: {} is set and wins over the cache directory", states::STATES_DIR_ENV);
        return None;
    }
    Some(states::states_dir(Some(cache)).unwrap())
}

fn record_of(dir: &Path, path: &Path) -> PathBuf {
    let digest = gantry::integrity::from_hex(&sha256sum(path)).unwrap();
    states::record_path(dir, &digest, std::fs::metadata(path).unwrap().len())
}

fn recorded() -> Hashing {
    Hashing::Sequential { note: "sequential, states recorded".into() }
}

fn parallel(h: &Hashing) -> bool {
    matches!(h, Hashing::Parallel { .. })
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

#[test]
fn a_planted_link_at_a_record_or_its_temporary_names_is_never_written_through() {
    let (dir, path) = checkpoint("m.safetensors");
    write_sums(dir.path(), &[], "m.safetensors");
    let cache = scratch();
    let Some(records) = records_dir(cache.path()) else { return };
    std::fs::create_dir(&records).unwrap();
    std::fs::set_permissions(&records, std::fs::Permissions::from_mode(0o700)).unwrap();
    let outside = scratch();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, b"not yours to write").unwrap();
    let record = record_of(&records, &path);
    std::os::unix::fs::symlink(&victim, &record).unwrap();
    // The temporary names a writer that names them after its PID and a counter would use.
    for n in 0..64 {
        let temp = record.with_extension(format!("states.tmp-{}-{n}", std::process::id()));
        std::os::unix::fs::symlink(&victim, temp).unwrap();
    }
    assert_eq!(load(config(cache.path()), dir.path()).unwrap().hashing, Some(recorded()));
    assert_eq!(std::fs::read(&victim).unwrap(), b"not yours to write");
    let meta = std::fs::symlink_metadata(&record).unwrap();
    assert!(meta.is_file(), "the link at the record's name is replaced by the record");
    assert_eq!(mode(&record), 0o600);
    assert!(parallel(&load(config(cache.path()), dir.path()).unwrap().hashing.unwrap()));
}

#[test]
fn a_linked_records_directory_is_not_followed_and_new_ones_are_private() {
    let (dir, path) = checkpoint("m.safetensors");
    write_sums(dir.path(), &[], "m.safetensors");
    let cache = scratch();
    let Some(records) = records_dir(cache.path()) else { return };
    let elsewhere = scratch();
    std::os::unix::fs::symlink(elsewhere.path(), &records).unwrap();
    let check = load(config(cache.path()), dir.path()).unwrap();
    let note = Hashing::Sequential { note: "sequential, the states could not be recorded".into() };
    assert_eq!(check.hashing, Some(note));
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0, "written through a link");
    // A record planted behind the link is not read either.
    std::fs::remove_file(&records).unwrap();
    let fresh = scratch();
    let check = load(config(fresh.path()), dir.path()).unwrap();
    assert_eq!(check.hashing, Some(recorded()));
    let records = records_dir(fresh.path()).unwrap();
    std::fs::copy(record_of(&records, &path), record_of(elsewhere.path(), &path)).unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), records_dir(cache.path()).unwrap()).unwrap();
    assert!(!parallel(&load(config(cache.path()), dir.path()).unwrap().hashing.unwrap()));
    // What was created is private to its owner.
    assert_eq!(mode(&records), 0o700);
    assert_eq!(mode(&record_of(&records, &path)), 0o600);
}

#[test]
fn records_writable_by_others_or_owned_by_another_user_are_not_used() {
    let (dir, path) = checkpoint("m.safetensors");
    write_sums(dir.path(), &[], "m.safetensors");
    let cache = scratch();
    let Some(records) = records_dir(cache.path()) else { return };
    assert_eq!(load(config(cache.path()), dir.path()).unwrap().hashing, Some(recorded()));
    let record = record_of(&records, &path);
    std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o666)).unwrap();
    // Not used: hashed sequentially, and a private record replaces it.
    assert_eq!(load(config(cache.path()), dir.path()).unwrap().hashing, Some(recorded()));
    assert_eq!(mode(&record), 0o600);
    assert!(parallel(&load(config(cache.path()), dir.path()).unwrap().hashing.unwrap()));
    if !root_or_skip("a record owned by another user") {
        return;
    }
    std::os::unix::fs::chown(&record, Some(65534), Some(65534)).unwrap();
    assert_eq!(load(config(cache.path()), dir.path()).unwrap().hashing, Some(recorded()));
    assert_eq!(std::fs::metadata(&record).unwrap().uid(), 0, "replaced by one of our own");
    // A records directory another user owns is not used at all.
    std::os::unix::fs::chown(&records, Some(65534), Some(65534)).unwrap();
    let note = Hashing::Sequential { note: "sequential, the states could not be recorded".into() };
    assert_eq!(load(config(cache.path()), dir.path()).unwrap().hashing, Some(note));
}

fn mkfifo(path: &Path) {
    let out = Command::new("mkfifo").arg(path).output().expect("mkfifo (coreutils)");
    assert!(out.status.success(), "mkfifo {}", path.display());
}

#[test]
fn a_fifo_or_dev_zero_in_place_of_a_record_is_ignored() {
    let (dir, path) = checkpoint("m.safetensors");
    write_sums(dir.path(), &[], "m.safetensors");
    let cache = scratch();
    let Some(records) = records_dir(cache.path()) else { return };
    assert_eq!(load(config(cache.path()), dir.path()).unwrap().hashing, Some(recorded()));
    let record = record_of(&records, &path);
    std::fs::remove_file(&record).unwrap();
    mkfifo(&record);
    assert!(!parallel(&load(config(cache.path()), dir.path()).unwrap().hashing.unwrap()));
    std::fs::remove_file(&record).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &record).unwrap();
    assert!(!parallel(&load(config(cache.path()), dir.path()).unwrap().hashing.unwrap()));
    // A record far larger than its segment count needs: not read whole, not used.
    std::fs::remove_file(&record).unwrap();
    std::fs::write(&record, vec![0u8; 8 << 20]).unwrap();
    std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(!parallel(&load(config(cache.path()), dir.path()).unwrap().hashing.unwrap()));
}

/// The error a load of `dir` with SHA-256 on gives.
fn load_error(dir: &Path) -> Error {
    let cache = scratch();
    load(config(cache.path()), dir).expect_err("the load should fail")
}

#[test]
fn a_sha256sums_that_is_a_fifo_dev_zero_or_too_large_is_an_error_naming_it() {
    let (dir, _) = checkpoint("m.safetensors");
    let sums = dir.path().join("SHA256SUMS");
    mkfifo(&sums);
    let e = load_error(dir.path());
    assert!(matches!(&e, Error::Sha256 { path, .. } if path == &sums), "{e}");
    assert!(e.to_string().contains("FIFO"), "{e}");
    std::fs::remove_file(&sums).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &sums).unwrap();
    let e = load_error(dir.path());
    assert!(matches!(&e, Error::Sha256 { path, .. } if path == &sums), "{e}");
    assert!(e.to_string().contains("character device"), "{e}");
    std::fs::remove_file(&sums).unwrap();
    let line = format!("{}  other.safetensors\n", "0".repeat(64));
    std::fs::write(&sums, line.repeat(gantry::integrity::SUMS_BYTES_MAX as usize / line.len() + 1))
        .unwrap();
    let e = load_error(dir.path());
    assert!(matches!(&e, Error::Sha256 { path, .. } if path == &sums), "{e}");
}

/// What a test calls a format, `sha256sum`'s arguments, and an edit of its output.
type Format = (&'static str, &'static [&'static str], fn(Vec<u8>) -> Vec<u8>);

#[test]
fn every_sha256sum_format_is_checked_and_a_wrong_digest_in_it_fails() {
    // A name sha256sum escapes, and one it writes as it is.
    for name in ["back\\slash.safetensors", "m.safetensors"] {
        let (dir, path) = checkpoint(name);
        let bom = |text: Vec<u8>| [b"\xef\xbb\xbf".as_slice(), &text].concat();
        let indent = |text: Vec<u8>| [b"  ".as_slice(), &text].concat();
        let formats: [Format; 4] = [
            ("text", &[], |t| t),
            ("--tag", &["--tag"], |t| t),
            ("a byte-order mark", &["-b"], bom),
            ("a leading space", &["--tag"], indent),
        ];
        for (what, args, edit) in formats {
            write_sums(dir.path(), args, name);
            let sums = dir.path().join("SHA256SUMS");
            let text = edit(std::fs::read(&sums).unwrap());
            std::fs::write(&sums, &text).unwrap();
            let check = load(config(scratch().path()), dir.path())
                .unwrap_or_else(|e| panic!("{name:?} {what}: {e}"));
            let known = check.known.unwrap_or_else(|| panic!("{name:?} {what}: no digest known"));
            assert_eq!(gantry::integrity::to_hex(&known.digest), sha256sum(&path), "{what}");
            // The same list with the digest of other bytes: the load fails.
            let wrong =
                String::from_utf8(text).unwrap().replace(&sha256sum(&path), &"0".repeat(64));
            std::fs::write(&sums, wrong).unwrap();
            let e = load_error(dir.path());
            assert!(matches!(&e, Error::Integrity { path: p, .. } if p == &path), "{what}: {e}");
        }
    }
}

#[test]
fn a_duplicate_name_or_a_malformed_line_is_an_error_naming_the_line() {
    let (dir, path) = checkpoint("m.safetensors");
    let sums = dir.path().join("SHA256SUMS");
    let digest = sha256sum(&path);
    std::fs::write(
        &sums,
        format!("{digest}  m.safetensors\n{}  ./m.safetensors\n", "0".repeat(64)),
    )
    .unwrap();
    let e = load_error(dir.path());
    assert!(matches!(&e, Error::Sha256 { path, .. } if path == &sums), "{e}");
    assert!(e.to_string().contains("line 2"), "{e}");
    std::fs::write(&sums, format!("{digest}  m.safetensors\n{digest}  other\nnot a digest line\n"))
        .unwrap();
    let e = load_error(dir.path());
    assert!(e.to_string().contains("line 3"), "{e}");
}

#[test]
fn require_sha256_fails_on_a_file_with_no_known_digest_before_reading_it() {
    let (dir, path) = checkpoint("m.safetensors");
    let cache = scratch();
    // No SHA256SUMS: the check alone loads, saying nothing was known.
    let check = load(config(cache.path()), dir.path()).unwrap();
    assert!(!check.verified() && check.known.is_none(), "{}", check.explain());
    assert_eq!(gantry::integrity::to_hex(&check.sha256.unwrap()), sha256sum(&path));
    let e = load(config(cache.path()).require_sha256(true), dir.path()).unwrap_err();
    assert!(matches!(&e, Error::Sha256 { path: p, .. } if p == &path), "{e}");
    assert!(e.to_string().contains("require_sha256"), "{e}");
    // require_sha256 alone turns the check on; listed, the file passes verified.
    write_sums(dir.path(), &[], "m.safetensors");
    let required = Config::default().require_sha256(true).cache_dir(cache.path());
    assert!(load(required, dir.path()).unwrap().verified());
}
