//! What the files a checkpoint names may be: regular files only (a FIFO is an error, never a
//! wait), inside the checkpoint's directory once resolved, the same file when it is opened
//! again; and errors that never print what a file holds, with names escaped.

mod common;

use common::file;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use gantry_format::{Checkpoint, ErrorKind, FormatError};

fn shard(path: &Path, tensor: &str) {
    let header = format!(r#"{{"{tensor}":{{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}}}"#);
    fs::write(path, file(&header, 4)).unwrap();
}

fn index(path: &Path, map: &[(&str, &str)]) {
    let entries: Vec<String> = map.iter().map(|(t, s)| format!(r#""{t}":"{s}""#)).collect();
    fs::write(path, format!(r#"{{"weight_map":{{{}}}}}"#, entries.join(","))).unwrap();
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().expect("mkfifo (coreutils) runs");
    assert!(status.success());
}

/// Opens `path` on another thread, so that an open that hangs fails the test instead of
/// hanging it.
fn open_within_seconds(path: &Path) -> Result<Checkpoint, FormatError> {
    let (tx, rx) = mpsc::channel();
    let path = path.to_path_buf();
    std::thread::spawn(move || tx.send(Checkpoint::open(&path)).unwrap());
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("Checkpoint::open hangs on a FIFO"))
}

fn not_regular(result: Result<Checkpoint, FormatError>, path: &Path) {
    let e = result.expect_err("a FIFO must be rejected");
    assert!(matches!(e.kind(), ErrorKind::NotRegularFile { kind: "a FIFO" }), "{e}");
    assert_eq!(e.path(), path, "{e}");
    assert!(e.to_string().contains("not a regular file"), "{e}");
}

#[test]
fn fifo_as_file_index_or_shard_is_an_error_not_a_wait() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("model.safetensors");
    mkfifo(&fifo);
    // The file itself, and a directory whose only checkpoint file is a FIFO.
    not_regular(open_within_seconds(&fifo), &fifo);
    not_regular(open_within_seconds(dir.path()), &fifo);

    // An index given by path, and a directory's index.
    let dir = tempfile::tempdir().unwrap();
    let index_path = dir.path().join("model.safetensors.index.json");
    mkfifo(&index_path);
    not_regular(open_within_seconds(&index_path), &index_path);
    not_regular(open_within_seconds(dir.path()), &index_path);
    let other = dir.path().join("other.safetensors.index.json");
    mkfifo(&other);
    not_regular(open_within_seconds(&other), &other);

    // A shard the index names.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("b.safetensors");
    shard(&dir.path().join("a.safetensors"), "a");
    mkfifo(&fifo);
    index(
        &dir.path().join("model.safetensors.index.json"),
        &[("a", "a.safetensors"), ("b", "b.safetensors")],
    );
    not_regular(open_within_seconds(dir.path()), &fifo);
}

#[test]
fn symlinked_directory_cannot_lead_a_shard_outside() {
    let outside = tempfile::tempdir().unwrap();
    shard(&outside.path().join("secret.safetensors"), "a");
    let dir = tempfile::tempdir().unwrap();
    symlink(outside.path(), dir.path().join("sub")).unwrap();
    index(&dir.path().join("model.safetensors.index.json"), &[("a", "sub/secret.safetensors")]);
    let e = Checkpoint::open(dir.path()).expect_err("a shard behind a symlinked directory");
    let ErrorKind::ShardOutsideDirectory { shard: named, resolved: Some(resolved) } = e.kind()
    else {
        panic!("unexpected error: {e}");
    };
    assert_eq!(named, "sub/secret.safetensors");
    assert_eq!(resolved, &outside.path().canonicalize().unwrap());

    // A real subdirectory, and a symlinked one that stays inside, are fine.
    fs::create_dir(dir.path().join("real")).unwrap();
    shard(&dir.path().join("real/a.safetensors"), "a");
    symlink("real", dir.path().join("alias")).unwrap();
    for name in ["real/a.safetensors", "alias/a.safetensors"] {
        index(&dir.path().join("model.safetensors.index.json"), &[("a", name)]);
        let c = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(c.tensors.len(), 1);
    }
}

/// The Hugging Face cache: `snapshots/<rev>/` holds symlinks into `../../blobs/`.
#[test]
fn shard_files_may_be_symlinks_as_in_the_hugging_face_cache() {
    let repo = tempfile::tempdir().unwrap();
    let blobs = repo.path().join("blobs");
    let snapshot = repo.path().join("snapshots/0123abcd");
    fs::create_dir_all(&blobs).unwrap();
    fs::create_dir_all(&snapshot).unwrap();
    shard(&blobs.join("aaaa"), "a");
    shard(&blobs.join("bbbb"), "b");
    index(&blobs.join("iiii"), &[("a", "model-1.safetensors"), ("b", "model-2.safetensors")]);
    symlink("../../blobs/aaaa", snapshot.join("model-1.safetensors")).unwrap();
    symlink("../../blobs/bbbb", snapshot.join("model-2.safetensors")).unwrap();
    symlink("../../blobs/iiii", snapshot.join("model.safetensors.index.json")).unwrap();
    let c = Checkpoint::open(&snapshot).unwrap();
    let names: Vec<_> = c.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn error_never_prints_the_first_bytes_of_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("passwd.safetensors");
    fs::write(&path, b"root:x:0:0:root:/root:/bin/bash\n").unwrap();
    let e = Checkpoint::open(&path).unwrap_err();
    let message = e.to_string();
    let as_number = u64::from_le_bytes(*b"root:x:0").to_string();
    assert!(!message.contains(&as_number), "{message}");
    assert!(message.contains("not a safetensors file"), "{message}");
}

#[test]
fn unusable_shards_are_said_as_they_are() {
    let dir = tempfile::tempdir().unwrap();
    shard(&dir.path().join("a.safetensors"), "a");
    symlink("loop.safetensors", dir.path().join("loop.safetensors")).unwrap();
    index(
        &dir.path().join("model.safetensors.index.json"),
        &[("a", "a.safetensors"), ("b", "loop.safetensors")],
    );
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(!matches!(e.kind(), ErrorKind::MissingShard { .. }), "{e}");
    assert_eq!(e.path(), dir.path().join("loop.safetensors"));
    assert!(!e.to_string().contains("does not exist"), "{e}");
    let ErrorKind::Io { source, .. } = e.kind() else { panic!("unexpected error: {e}") };
    assert_eq!(source.raw_os_error(), Some(40), "ELOOP: {e}");

    // A directory named like a shard.
    fs::remove_file(dir.path().join("loop.safetensors")).unwrap();
    fs::create_dir(dir.path().join("loop.safetensors")).unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::NotRegularFile { kind: "a directory" }), "{e}");
}

#[test]
fn empty_weight_map_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    shard(&dir.path().join("a.safetensors"), "a");
    index(&dir.path().join("model.safetensors.index.json"), &[]);
    let e = Checkpoint::open(dir.path()).expect_err("an index that names no tensor");
    assert!(matches!(e.kind(), ErrorKind::BadIndex { .. }), "{e}");
    assert!(e.to_string().contains("weight_map\" is empty"), "{e}");
}

#[test]
fn dot_slash_names_the_same_shard() {
    let dir = tempfile::tempdir().unwrap();
    let header = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#;
    fs::write(dir.path().join("a.safetensors"), file(header, 4)).unwrap();
    index(
        &dir.path().join("model.safetensors.index.json"),
        &[("a", "a.safetensors"), ("b", "./a.safetensors")],
    );
    let c = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(c.files.len(), 1);
    assert_eq!(c.tensors.len(), 2);
}

#[test]
fn names_in_errors_are_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    let header = r#"{"evil\n\u001b[31mred":{"dtype":"U8","shape":[3],"data_offsets":[0,4]}}"#;
    fs::write(&path, file(header, 4)).unwrap();
    let message = Checkpoint::open(&path).unwrap_err().to_string();
    assert!(!message.contains('\n') && !message.contains('\u{1b}'), "{message:?}");
    assert!(message.contains(r"evil\n\u{1b}[31mred"), "{message}");
}

fn replace_with(path: &Path, bytes: &[u8]) {
    let tmp: PathBuf = path.with_extension("tmp");
    fs::write(&tmp, bytes).unwrap();
    fs::rename(&tmp, path).unwrap();
}

#[test]
fn a_file_replaced_after_its_header_was_read_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    shard(&path, "a");
    let c = Checkpoint::open(&path).unwrap();
    let info = &c.files[0];
    info.check_unchanged(&fs::File::open(&path).unwrap()).unwrap();

    // The same bytes, but another file (a checkpoint rewritten by a trainer, say).
    replace_with(&path, &fs::read(&path).unwrap());
    let e = info.check_unchanged(&fs::File::open(&path).unwrap()).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::Changed { .. }), "{e}");
    assert!(e.to_string().contains("file changed since its header was read"), "{e}");

    // Rewritten in place with another length.
    let c = Checkpoint::open(&path).unwrap();
    let mut longer = fs::read(&path).unwrap();
    longer.push(0);
    fs::write(&path, &longer).unwrap();
    let e = c.files[0].check_unchanged(&fs::File::open(&path).unwrap()).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::Changed { what: "its length changed" }), "{e}");
}
