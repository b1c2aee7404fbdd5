//! The SHA-256 check of local files (`Config::verify_sha256`), against `sha256sum` (coreutils)
//! as the independent reference: digests computed while streaming equal it whatever the
//! layout, reader, request size, ring size and skipped tensors; one flipped byte anywhere in a
//! file (in a wanted tensor, a skipped one, or the header) fails the load naming the file and
//! both digests; the digest comes from a `SHA256SUMS` file or a Hugging Face cache blob link.

mod common;
#[path = "common/cpuinfo.rs"]
mod cpuinfo;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use cpuinfo::implementation_from_cpuinfo;
use gantry::{Config, Dtype, Error, Loader, PathChoice};

/// Writes `SHA256SUMS` beside `files` (in `dir`) with `sha256sum`'s own output.
fn write_sums(dir: &Path, names: &[&str]) {
    let out = Command::new("sha256sum").args(names).current_dir(dir).output().unwrap();
    assert!(out.status.success());
    std::fs::write(dir.join("SHA256SUMS"), out.stdout).unwrap();
}

fn flip_byte(path: &Path, offset: u64) {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    file.read_exact_at(&mut b, offset).unwrap();
    // A digit stays a digit (names stay valid JSON), anything else changes too.
    let flipped = if b[0].is_ascii_digit() { b'0' + (b[0] - b'0' + 1) % 10 } else { b[0] ^ 0x5a };
    file.write_all_at(&[flipped], offset).unwrap();
}

/// A sharded checkpoint of `shards` random files in `dir`; returns their paths.
fn shards(dir: &Path, shards: usize, seed: u64) -> Vec<PathBuf> {
    let mut state = seed;
    (0..shards)
        .map(|s| {
            let tensors: Vec<(Dtype, Vec<usize>)> = (0..3 + s * 2)
                .map(|i| {
                    state =
                        state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let rows = 1 + (state >> 33) as usize % 300;
                    let dtype = [Dtype::F32, Dtype::BF16, Dtype::U8][i % 3];
                    (dtype, vec![rows, 1 + (state >> 20) as usize % 97])
                })
                .collect();
            let path = dir.join(format!("model-{s:05}.safetensors"));
            write_file_named(&path, &tensors, seed + s as u64, &format!("s{s}."));
            path
        })
        .collect()
}

fn configs() -> Vec<Config> {
    let base = || Config::default().verify_sha256(true);
    vec![
        base(),
        base()
            .path(PathChoice::Buffered)
            .buffered_chunk_bytes(4096)
            .chunk_bytes(8192)
            .staging_bytes(1 << 20),
        base().path(PathChoice::Buffered).chunk_bytes(4096).staging_bytes(8192).threads(4),
        base().path(PathChoice::Direct).chunk_bytes(4096).staging_bytes(2 * 4096).queue_depth(2),
        base().path(PathChoice::Direct).chunk_bytes(16384).queue_depth(8),
    ]
}

#[test]
fn digests_match_sha256sum_for_every_reader_and_layout() {
    let dir = scratch();
    let paths = shards(dir.path(), 3, 11);
    let names: Vec<&str> = paths.iter().map(|p| p.file_name().unwrap().to_str().unwrap()).collect();
    write_sums(dir.path(), &names);
    let expected: Vec<String> = paths.iter().map(|p| sha256sum(p)).collect();
    for (k, config) in configs().into_iter().enumerate() {
        let loader = Loader::new(config.clone()).unwrap();
        let root = dir.path().to_path_buf();
        // Every other tensor skipped: the check still reads and hashes the whole file.
        let skip_odd = k % 2 == 1;
        let model = with_deadline(Duration::from_secs(60), move || {
            let c = gantry::open(&root).unwrap();
            let names: Vec<String> = c.tensors.iter().map(|t| t.name.clone()).collect();
            let keep = move |t: &gantry::TensorEntry| {
                !skip_odd || names.iter().position(|n| *n == t.name).unwrap() % 2 == 0
            };
            loader.load_with(c, keep, |_| {})
        })
        .unwrap_or_else(|e| panic!("config {k}: {e}"));
        let wanted = model.tensors().count();
        assert_matches_reference(&model, wanted);
        for (f, report) in model.report().files.iter().enumerate() {
            let check = report.integrity.as_ref().expect("checked");
            let digest = gantry::integrity::to_hex(&check.sha256.expect("computed"));
            assert_eq!(digest, expected[f], "config {k} file {f}");
            let known = check.known.as_ref().expect("SHA256SUMS is known");
            assert!(known.source.ends_with("SHA256SUMS"), "{}", known.source);
            assert!(check.explain().contains("matches"), "{}", check.explain());
            assert_eq!(report.read_bytes, std::fs::metadata(&paths[f]).unwrap().len());
        }
    }
}

#[test]
fn one_flipped_byte_fails_the_load_naming_file_and_digests() {
    let dir = scratch();
    let paths = shards(dir.path(), 2, 23);
    let names: Vec<&str> = paths.iter().map(|p| p.file_name().unwrap().to_str().unwrap()).collect();
    write_sums(dir.path(), &names);
    let c = gantry::open(dir.path()).unwrap();
    let last = c.tensors.iter().rfind(|t| t.file.0 == 1).unwrap().clone();
    let first = c.tensors.iter().find(|t| t.file.0 == 1).unwrap().clone();
    // In a tensor's bytes, in a tensor the load skips, and in the header (a tensor's name,
    // still valid JSON).
    let good = std::fs::read(&paths[1]).unwrap();
    let name_at = good.windows(9).position(|w| w == b"s1.t00000").unwrap() as u64 + 3;
    let spots = [(last.offset + last.len / 2, true), (first.offset, false), (name_at + 1, true)];
    for (offset, want_first) in spots {
        flip_byte(&paths[1], offset);
        let bad = sha256sum(&paths[1]);
        for config in configs() {
            let loader = Loader::new(config).unwrap();
            let checkpoint = gantry::Checkpoint::open(dir.path()).unwrap();
            let skipped = &checkpoint.tensors.iter().find(|t| t.file.0 == 1).unwrap().name;
            let skipped = skipped.clone();
            let result = loader.load_with(checkpoint, |t| want_first || t.name != skipped, |_| {});
            let e = result.expect_err("a corrupted file must fail the load");
            let Error::Integrity { path, expected, actual, .. } = &e else {
                panic!("wrong error: {e}");
            };
            assert_eq!(path, &paths[1]);
            assert_eq!(actual, &bad);
            assert_eq!(expected, &sha256sum_of_bytes(&good));
            let text = e.to_string();
            assert!(text.contains(&bad) && text.contains(expected.as_str()), "{text}");
            assert!(text.contains("model-00001.safetensors"), "{text}");
        }
        std::fs::write(&paths[1], &good).unwrap();
    }
}

fn sha256sum_of_bytes(bytes: &[u8]) -> String {
    let dir = scratch();
    let p = dir.path().join("x");
    std::fs::write(&p, bytes).unwrap();
    sha256sum(&p)
}

#[test]
fn hugging_face_cache_blob_names_are_the_digest() {
    // models--org--name/{blobs/<sha256>, snapshots/<rev>/model.safetensors -> ../../blobs/<sha256>}
    let dir = scratch();
    let repo = dir.path().join("models--org--name");
    let (blobs, snapshot) = (repo.join("blobs"), repo.join("snapshots").join("abc123"));
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    let tmp = blobs.join("incoming");
    write_file(&tmp, &[(Dtype::F32, vec![64, 33]), (Dtype::U8, vec![7000])], 3);
    let digest = sha256sum(&tmp);
    let blob = blobs.join(&digest);
    std::fs::rename(&tmp, &blob).unwrap();
    let link = snapshot.join("model.safetensors");
    std::os::unix::fs::symlink(format!("../../blobs/{digest}"), &link).unwrap();

    for config in configs() {
        let model = Loader::new(config).unwrap().load(&link).unwrap();
        assert_matches_reference(&model, 2);
        let check = model.report().files[0].integrity.clone().unwrap();
        assert_eq!(gantry::integrity::to_hex(&check.sha256.unwrap()), digest);
        assert!(check.known.unwrap().source.contains("Hugging Face"));
    }
    flip_byte(&blob, std::fs::metadata(&blob).unwrap().len() - 1);
    let e = Loader::new(Config::default().verify_sha256(true)).unwrap().load(&link).unwrap_err();
    assert!(matches!(e, Error::Integrity { .. }), "{e}");
}

#[test]
fn no_known_digest_is_said_and_the_load_succeeds() {
    let dir = scratch();
    let paths = shards(dir.path(), 1, 5);
    let model =
        Loader::new(Config::default().verify_sha256(true)).unwrap().load(&paths[0]).unwrap();
    let check = model.report().files[0].integrity.clone().unwrap();
    assert!(check.known.is_none());
    assert_eq!(gantry::integrity::to_hex(&check.sha256.unwrap()), sha256sum(&paths[0]));
    assert!(check.explain().contains("no digest known"), "{}", check.explain());
    // A SHA256SUMS that lists other files only: still unknown for this one.
    std::fs::write(
        dir.path().join("SHA256SUMS"),
        format!("{}  other.safetensors\n", "0".repeat(64)),
    )
    .unwrap();
    let model =
        Loader::new(Config::default().verify_sha256(true)).unwrap().load(&paths[0]).unwrap();
    assert!(model.report().files[0].integrity.as_ref().unwrap().known.is_none());
    // Without the option, nothing is hashed and the report says nothing.
    let model = Loader::new(Config::default()).unwrap().load(&paths[0]).unwrap();
    assert!(model.report().files[0].integrity.is_none());
}

#[test]
fn caller_slices_are_hashed_too() {
    let dir = scratch();
    let paths = shards(dir.path(), 2, 31);
    let names: Vec<&str> = paths.iter().map(|p| p.file_name().unwrap().to_str().unwrap()).collect();
    write_sums(dir.path(), &names);
    let config = Config::default()
        .verify_sha256(true)
        .path(PathChoice::Buffered)
        .chunk_bytes(4096)
        .staging_bytes(1 << 20);
    let loader = Loader::new(config).unwrap();
    let load = |loader: &Loader| {
        let c = gantry::open(dir.path()).unwrap();
        let mut params: Vec<Vec<u8>> = c.tensors.iter().map(|t| vec![0; t.len as usize]).collect();
        let mut slots = params.iter_mut();
        let report = loader.load_into(&c, |_| slots.next().map(|p| p.as_mut_slice()), |_| {});
        if report.is_ok() {
            for (t, p) in c.tensors.iter().zip(&params) {
                assert!(p == &reference(&c, t), "{}", t.name);
            }
        }
        report
    };
    let report = load(&loader).unwrap();
    let check = report.files[1].integrity.clone().unwrap();
    assert_eq!(gantry::integrity::to_hex(&check.sha256.unwrap()), sha256sum(&paths[1]));
    flip_byte(&paths[0], std::fs::metadata(&paths[0]).unwrap().len() - 3);
    let e = load(&loader).unwrap_err();
    assert!(matches!(&e, Error::Integrity { path, .. } if path == &paths[0]), "{e}");
}

/// Bytes per SHA-256 segment in the segment-state tests: 65 blocks, so that extents (multiples
/// of 4096) cross segment boundaries, and the test files are many segments long.
const SEGMENT_BYTES: u64 = 65 * 64;

/// `config` keeping its segment states in `states` (as `Config::cache_dir` does).
fn with_states(config: Config, states: &Path, segment_bytes: u64) -> Config {
    config.cache_dir(states).sha256_segment_bytes(segment_bytes)
}

/// Where the load keeps the record of `path` (the `GANTRY_SHA256_STATES_DIR` of the
/// environment wins over `cache_dir`, as in the loader).
fn record_of(states: &Path, path: &Path) -> PathBuf {
    let digest = gantry::integrity::from_hex(&sha256sum(path)).unwrap();
    let dir = gantry::integrity::states::states_dir(Some(states)).unwrap();
    gantry::integrity::states::record_path(&dir, &digest, std::fs::metadata(path).unwrap().len())
}

/// Loads the checkpoint in `dir`, checks its bytes against the reference and every file's
/// digest against `sha256sum`; returns each file's hashing.
fn verified_load(config: Config, dir: &Path, paths: &[PathBuf]) -> Vec<gantry::integrity::Hashing> {
    let root = dir.to_path_buf();
    let model =
        with_deadline(Duration::from_secs(60), move || Loader::new(config).unwrap().load(&root))
            .unwrap();
    assert_matches_reference(&model, model.tensors().count());
    let files = &model.report().files;
    assert_eq!(files.len(), paths.len());
    files
        .iter()
        .zip(paths)
        .map(|(report, path)| {
            let check = report.integrity.clone().expect("checked");
            assert_eq!(gantry::integrity::to_hex(&check.sha256.unwrap()), sha256sum(path));
            assert!(check.explain().contains("matches"), "{}", check.explain());
            check.hashing.expect("hashed")
        })
        .collect()
}

fn sums_for(dir: &Path, paths: &[PathBuf]) {
    let names: Vec<&str> = paths.iter().map(|p| p.file_name().unwrap().to_str().unwrap()).collect();
    write_sums(dir, &names);
}

fn segments(path: &Path, segment_bytes: u64) -> usize {
    std::fs::metadata(path).unwrap().len().div_ceil(segment_bytes) as usize
}

#[test]
fn a_second_load_hashes_segments_in_parallel_from_recorded_states() {
    use gantry::integrity::Hashing;
    let dir = scratch();
    let paths = shards(dir.path(), 3, 41);
    sums_for(dir.path(), &paths);
    for path in &paths {
        // Not whole blocks, and a last segment shorter than the rest.
        let len = std::fs::metadata(path).unwrap().len();
        assert!(len % 64 != 0 && len % SEGMENT_BYTES != 0 && len > 4 * SEGMENT_BYTES, "{len}");
    }
    for (k, config) in configs().into_iter().enumerate() {
        let states = scratch();
        let config = with_states(config, states.path(), SEGMENT_BYTES);
        for h in verified_load(config.clone(), dir.path(), &paths) {
            assert_eq!(h, Hashing::Sequential { note: "sequential, states recorded".into() });
        }
        for path in &paths {
            assert!(record_of(states.path(), path).is_file(), "config {k}: {}", path.display());
        }
        for (h, path) in verified_load(config, dir.path(), &paths).iter().zip(&paths) {
            let segments = segments(path, SEGMENT_BYTES);
            assert_eq!(h, &Hashing::Parallel { segments }, "config {k}");
            assert!(h.to_string().contains("segments in parallel from recorded states"));
        }
    }
}

#[test]
fn one_segment_and_no_known_digest_record_nothing() {
    use gantry::integrity::Hashing;
    let dir = scratch();
    let paths = shards(dir.path(), 2, 43);
    let states = scratch();
    // No digest known: nothing to key a record by.
    let config = with_states(Config::default().verify_sha256(true), states.path(), SEGMENT_BYTES);
    let model = Loader::new(config).unwrap().load(dir.path()).unwrap();
    for f in &model.report().files {
        let h = f.integrity.as_ref().unwrap().hashing.clone().unwrap();
        assert_eq!(h, Hashing::Sequential { note: "sequential".into() });
    }
    // Files of one segment: nothing worth recording.
    sums_for(dir.path(), &paths);
    let config = with_states(Config::default().verify_sha256(true), states.path(), 1 << 30);
    for h in verified_load(config, dir.path(), &paths) {
        let note = "sequential, one segment: nothing to record".into();
        assert_eq!(h, Hashing::Sequential { note });
    }
    let dir_entries = |p: &Path| std::fs::read_dir(p).map_or(0, |d| d.count());
    assert_eq!(dir_entries(&states.path().join(".sha256-states")), 0);
}

#[test]
fn a_flipped_byte_with_a_valid_record_fails_naming_file_and_digests() {
    let dir = scratch();
    let paths = shards(dir.path(), 2, 47);
    sums_for(dir.path(), &paths);
    let good = std::fs::read(&paths[1]).unwrap();
    let expected = sha256sum(&paths[1]);
    let len = good.len() as u64;
    let data = 8 + u64::from_le_bytes(good[..8].try_into().unwrap());
    assert!(data + 10 < SEGMENT_BYTES);
    // In the first segment, in the middle of a segment, at a boundary, in the last byte.
    for offset in [data + 10, 2 * SEGMENT_BYTES + 700, 3 * SEGMENT_BYTES, len - 1] {
        for (k, config) in configs().into_iter().enumerate() {
            let states = scratch();
            let config = with_states(config, states.path(), SEGMENT_BYTES);
            verified_load(config.clone(), dir.path(), &paths);
            flip_byte(&paths[1], offset);
            let bad = sha256sum(&paths[1]);
            let e = Loader::new(config).unwrap().load(dir.path()).expect_err("corrupted");
            let Error::Integrity { path, expected: want, actual, .. } = &e else {
                panic!("config {k} offset {offset}: wrong error: {e}");
            };
            assert_eq!((path, want, actual), (&paths[1], &expected, &bad), "config {k}");
            let text = e.to_string();
            assert!(text.contains("model-00001.safetensors") && text.contains(&bad), "{text}");
            std::fs::write(&paths[1], &good).unwrap();
        }
    }
}

#[test]
fn a_damaged_record_with_good_data_succeeds_and_is_rewritten() {
    use gantry::integrity::Hashing;
    let dir = scratch();
    let paths = shards(dir.path(), 2, 53);
    sums_for(dir.path(), &paths);
    let segments: Vec<usize> = paths.iter().map(|p| segments(p, SEGMENT_BYTES)).collect();
    for (k, config) in configs().into_iter().enumerate() {
        let states = scratch();
        let config = with_states(config, states.path(), SEGMENT_BYTES);
        verified_load(config.clone(), dir.path(), &paths);
        let record = record_of(states.path(), &paths[0]);
        let good = std::fs::read(&record).unwrap();
        // One bit of one recorded state (the format still reads): the chain breaks there.
        let mut damaged = good.clone();
        let at = damaged.len() - 32 * 2 + 5;
        damaged[at] ^= 0x10;
        std::fs::write(&record, &damaged).unwrap();
        let hashing = verified_load(config.clone(), dir.path(), &paths);
        assert_eq!(hashing[0], Hashing::Reread { segments: segments[0] }, "config {k}");
        assert_eq!(hashing[1], Hashing::Parallel { segments: segments[1] }, "config {k}");
        assert_eq!(std::fs::read(&record).unwrap(), good, "config {k}: the record is rewritten");
        // A record that does not read at all is ignored: hashed sequentially, recorded again.
        std::fs::write(&record, b"not a record").unwrap();
        let hashing = verified_load(config.clone(), dir.path(), &paths);
        let note = "sequential, states recorded".into();
        assert_eq!(hashing[0], Hashing::Sequential { note }, "config {k}");
        assert_eq!(std::fs::read(&record).unwrap(), good, "config {k}");
        let hashing = verified_load(config, dir.path(), &paths);
        assert_eq!(hashing[0], Hashing::Parallel { segments: segments[0] }, "config {k}");
    }
}

#[test]
fn a_record_of_another_segment_size_is_ignored() {
    use gantry::integrity::Hashing;
    let dir = scratch();
    let paths = shards(dir.path(), 1, 59);
    sums_for(dir.path(), &paths);
    let states = scratch();
    let base = || Config::default().verify_sha256(true);
    let (first, second) = (SEGMENT_BYTES, 3 * 64);
    verified_load(with_states(base(), states.path(), first), dir.path(), &paths);
    let recorded = "sequential, states recorded".to_owned();
    let h = verified_load(with_states(base(), states.path(), second), dir.path(), &paths);
    assert_eq!(h[0], Hashing::Sequential { note: recorded.clone() });
    let h = verified_load(with_states(base(), states.path(), second), dir.path(), &paths);
    assert_eq!(h[0], Hashing::Parallel { segments: segments(&paths[0], second) });
    // The file rewritten (another length and digest): the old record is not looked up.
    let len = std::fs::metadata(&paths[0]).unwrap().len();
    assert_eq!(shards(dir.path(), 1, 61), paths);
    assert_ne!(std::fs::metadata(&paths[0]).unwrap().len(), len);
    sums_for(dir.path(), &paths);
    let h = verified_load(with_states(base(), states.path(), second), dir.path(), &paths);
    assert_eq!(h[0], Hashing::Sequential { note: recorded });
}

#[test]
fn the_sha256_implementation_is_what_the_cpu_offers() {
    let named = gantry::integrity::implementation();
    let forced = cfg!(any(sha2_backend = "soft", sha2_256_backend = "soft"));
    if forced {
        assert_eq!(named.name(), "portable");
        return;
    }
    let Some(expected) = implementation_from_cpuinfo() else {
        println!("skipped: /proc/cpuinfo names no x86 flags or AArch64 features");
        return;
    };
    assert_eq!(named.name(), expected, "{named}");
    assert!(named.to_string().starts_with(expected), "{named}");
}
