//! The SHA-256 check of local files (`Config::verify_sha256`), against `sha256sum` (coreutils)
//! as the independent reference: digests computed while streaming equal it whatever the
//! layout, reader, request size, ring size and skipped tensors; one flipped byte anywhere in a
//! file (in a wanted tensor, a skipped one, or the header) fails the load naming the file and
//! both digests; the digest comes from a `SHA256SUMS` file or a Hugging Face cache blob link.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use gantry::{Config, Dtype, Error, Loader, PathChoice};

/// `sha256sum FILE`'s digest.
fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum (coreutils) must be installed: apt-get install coreutils");
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
}

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
