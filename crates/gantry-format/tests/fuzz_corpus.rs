//! Replays the fuzz corpus (`fuzz/corpus/`) through both parsers as an ordinary test, so CI
//! exercises every input the fuzzers kept without a nightly toolchain. The corpus holds the
//! seeds and any crash reproducer worth keeping; each must parse or fail cleanly, and whatever
//! parses must lie inside the file.

use std::fs;
use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus in {}", dir.display());
    files
}

#[test]
fn header_corpus() {
    let mut accepted = 0;
    for path in corpus("header") {
        let bytes = fs::read(&path).unwrap();
        match gantry_format::parse_file_bytes(&path, &bytes) {
            Ok(h) => {
                accepted += 1;
                assert_eq!(h.data_offset + h.data_len, bytes.len() as u64);
                assert!(h.tensors.iter().all(|t| t.offset + t.len <= bytes.len() as u64));
            }
            Err(e) => assert!(e.to_string().contains(&*path.to_string_lossy())),
        }
    }
    assert!(accepted >= 2, "the corpus's valid seeds must parse");
}

#[test]
fn index_corpus() {
    let mut accepted = 0;
    for path in corpus("index") {
        let bytes = fs::read(&path).unwrap();
        if let Ok(index) = gantry_format::parse_index(&path, &bytes) {
            accepted += 1;
            assert!(index.weight_map.iter().all(|(_, s)| *s < index.shards.len()));
        }
    }
    assert_eq!(accepted, 1, "only the valid seed parses");
}
