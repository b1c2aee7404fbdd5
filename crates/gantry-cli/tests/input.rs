//! Hostile or odd input to the `gantry` binary: FIFOs, permissions, names with control
//! characters, placed loads with checks, and checks under a memory limit. Each run has a
//! deadline, so an input that makes gantry hang fails the test instead of hanging it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

#[path = "common/deadline.rs"]
mod deadline;
use deadline::run_with_deadline;

fn gantry(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gantry"));
    cmd.args(args);
    run_with_deadline(cmd)
}

/// `gantry` as the unprivileged user 65534 (tests run as root, who ignores permissions).
fn gantry_unprivileged(args: &[&str]) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_gantry")]);
    cmd.args(args);
    run_with_deadline(cmd)
}

fn error_line(out: &Output) -> String {
    assert!(!out.status.success(), "must fail: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr.clone()).unwrap();
    assert!(err.starts_with("error: ") && err.lines().count() == 1, "{err:?}");
    err
}

fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>)]) -> Vec<u8> {
    let datas: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, d, shape)| {
            let n = shape.iter().product::<usize>() * d.bitsize() / 8;
            (0..n).map(|i| (i * 31 + i / 7) as u8).collect()
        })
        .collect();
    let views: Vec<_> = tensors
        .iter()
        .zip(&datas)
        .map(|((name, d, shape), b)| (*name, TensorView::new(*d, shape.clone(), b).unwrap()))
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

fn mkfifo(path: &Path) {
    assert!(Command::new("mkfifo").arg(path).status().expect("mkfifo (coreutils)").success());
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn fifo_as_file_index_or_directory_index_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    mkfifo(&file);
    let index_dir = tempfile::tempdir().unwrap();
    let index = index_dir.path().join("model.safetensors.index.json");
    mkfifo(&index);
    for (path, named) in [(&file, &file), (&index, &index), (&index_dir.path().into(), &index)] {
        for args in [vec!["inspect", s(path)], vec!["load", s(path), "--device", "cpu"]] {
            let err = error_line(&gantry(&args));
            assert!(err.contains("not a regular file"), "{err}");
            assert!(err.contains(s(named)), "{err}");
        }
    }
}

#[test]
fn names_are_escaped_in_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    write(&path, &[("evil\n\u{1b}[2Jname", Dtype::U8, vec![4]), ("ok", Dtype::U8, vec![2])]);
    let out = gantry(&["inspect", s(&path)]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains('\u{1b}'), "{text:?}");
    assert_eq!(text.lines().count(), 4, "header, two rows, total: {text:?}");
    assert!(text.contains(r"evil\n\u{1b}[2Jname"), "{text}");
    // JSON keeps the name as it is (serde escapes it).
    let out = gantry(&["inspect", "--json", s(&path)]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tensors"][0]["name"], "evil\n\u{1b}[2Jname");
}

/// Each destination's checksum of each share equals XXH3 of the bytes the safetensors crate
/// finds in the file, sliced here by rows.
#[test]
fn shard_takes_verify_and_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let bytes = write(&path, &[("w", Dtype::BF16, vec![4, 6]), ("b", Dtype::F32, vec![6])]);
    let out = gantry(&[
        "load",
        s(&path),
        "--device",
        "cpu",
        "--shard",
        "dim0:2",
        "--verify",
        "--checksum",
        "xxh3",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let hash = |b: &[u8]| format!("{:016x}", xxhash_rust::xxh3::xxh3_64(b));
    let (w, b) = (st.tensor("w").unwrap(), st.tensor("b").unwrap());
    for d in 0..2 {
        let sums = v["destinations"][d]["checksums"].as_array().expect("checksums");
        let got: Vec<(&str, &str)> = sums
            .iter()
            .map(|c| (c["name"].as_str().unwrap(), c["xxh3"].as_str().unwrap()))
            .collect();
        let half = &w.data()[d * 24..(d + 1) * 24];
        assert_eq!(got, [("b", hash(b.data()).as_str()), ("w", hash(half).as_str())]);
    }
    let text = gantry(&["load", s(&path), "--shard", "dim1:2", "--verify", "--checksum", "xxh3"]);
    assert!(text.status.success(), "{}", String::from_utf8_lossy(&text.stderr));
    let text = String::from_utf8(text.stdout).unwrap();
    assert_eq!(text.matches(", verified").count(), 2, "{text}");
}

#[test]
fn permission_errors_are_said_as_they_are() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    write(&model.join("a.safetensors"), &[("a", Dtype::U8, vec![4])]);
    write(&model.join("b.safetensors"), &[("b", Dtype::U8, vec![4])]);
    std::fs::write(
        model.join("model.safetensors.index.json"),
        r#"{"weight_map":{"a":"a.safetensors","b":"b.safetensors"}}"#,
    )
    .unwrap();
    let ok = gantry_unprivileged(&["inspect", s(&model)]);
    assert!(ok.status.success(), "setpriv to uid 65534: {}", String::from_utf8_lossy(&ok.stderr));

    // A shard the user may not read: not "does not exist".
    std::fs::set_permissions(model.join("b.safetensors"), std::fs::Permissions::from_mode(0o000))
        .unwrap();
    let err = error_line(&gantry_unprivileged(&["inspect", s(&model)]));
    assert!(err.contains("Permission denied") && err.contains("b.safetensors"), "{err}");
    assert!(!err.contains("does not exist"), "{err}");

    // A directory without search permission: not "no .safetensors files".
    std::fs::set_permissions(&model, std::fs::Permissions::from_mode(0o744)).unwrap();
    let err = error_line(&gantry_unprivileged(&["inspect", s(&model)]));
    assert!(err.contains("Permission denied"), "{err}");
    assert!(!err.contains("no .safetensors"), "{err}");
    std::fs::remove_file(model.join("model.safetensors.index.json")).ok();
    let err = error_line(&gantry_unprivileged(&["inspect", s(&model)]));
    assert!(err.contains("Permission denied") && !err.contains("no .safetensors"), "{err}");
}

/// `--verify` and `--checksum` of a tensor far larger than their pieces, under an address
/// space limit that holds the model and the staging ring but not a copy of the tensor.
#[test]
fn checks_run_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.safetensors");
    let big = 384usize << 20;
    write(&path, &[("big", Dtype::U8, vec![big])]);
    let limit = format!("--as={}", (big as u64) + (256 << 20));
    let mut cmd = Command::new("prlimit");
    cmd.env("MALLOC_ARENA_MAX", "1").args([&limit, "--", env!("CARGO_BIN_EXE_gantry")]);
    cmd.args(["load", s(&path), "--staging-mib", "32", "--chunk-mib", "8", "--threads", "2"]);
    cmd.args(["--verify"]);
    cmd.args(["--checksum", "xxh3", "--json"]);
    let out = run_with_deadline(cmd);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let expected = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(st.tensor("big").unwrap().data()));
    assert_eq!(v["tensors"][0]["xxh3"], expected);
}
