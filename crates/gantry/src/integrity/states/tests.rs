//! The state-chain math against `sha2`'s own SHA-256, the record format, and [`reread`].

use proptest::prelude::*;
use sha2::{Digest as _, Sha256};

use super::*;

fn reference(bytes: &[u8]) -> Digest {
    Sha256::digest(bytes).into()
}

/// Sequential states at every segment boundary (what a first verified load records).
fn record_states(bytes: &[u8], segment_bytes: u64) -> Vec<State> {
    let mut chain = Chain::new(IV);
    let mut starts = Vec::new();
    for (k, segment) in bytes.chunks(segment_bytes as usize).enumerate() {
        if k > 0 {
            starts.push(chain.state().unwrap());
        }
        chain.update(segment);
    }
    starts
}

/// Each segment hashed on its own from `starts`: every outcome (as the parallel check does).
fn outcomes(bytes: &[u8], segment_bytes: u64, starts: &[State]) -> Vec<Digest> {
    let n = segment_count(bytes.len() as u64, segment_bytes);
    (0..n)
        .map(|k| {
            let lo = k * segment_bytes as usize;
            let hi = (lo + segment_bytes as usize).min(bytes.len());
            let mut chain = Chain::new(if k == 0 { IV } else { starts[k - 1] });
            chain.update(&bytes[lo..hi]);
            segment_outcome(chain, k + 1 == n, bytes.len() as u64)
        })
        .collect()
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Hashed in pieces of any length, the chain finalizes to SHA-256.
    #[test]
    fn chain_in_pieces_is_sha256(
        bytes in proptest::collection::vec(any::<u8>(), 0..2000),
        cuts in proptest::collection::vec(0usize..2000, 0..8),
    ) {
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let mut chain = Chain::new(IV);
        let mut at = 0;
        for c in cuts.into_iter().chain([bytes.len()]) {
            chain.update(&bytes[at..c]);
            at = c;
        }
        prop_assert_eq!(chain.finalize(bytes.len() as u64), reference(&bytes));
    }

    /// Segments hashed apart from the recorded states link up, and the last gives SHA-256.
    #[test]
    fn segments_from_recorded_states_chain_to_sha256(
        len in 0usize..5000,
        blocks in 1u64..20,
        seed in any::<u64>(),
    ) {
        let bytes = random(len, seed);
        let segment_bytes = blocks * 64;
        let starts = record_states(&bytes, segment_bytes);
        prop_assert_eq!(starts.len() + 1, segment_count(len as u64, segment_bytes));
        let ends = outcomes(&bytes, segment_bytes, &starts);
        for k in 0..starts.len() {
            prop_assert_eq!(ends[k], state_bytes(&starts[k]));
        }
        prop_assert_eq!(*ends.last().unwrap(), reference(&bytes));
    }
}

#[test]
fn padding_edges_match_sha256() {
    // 55 bytes: padding fits the block; 56 to 63: it takes a second block; 64: a whole block.
    for len in [0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129] {
        let bytes = random(len, len as u64 + 3);
        let mut chain = Chain::new(IV);
        chain.update(&bytes);
        assert_eq!(chain.finalize(len as u64), reference(&bytes), "{len} bytes");
    }
}

#[test]
fn record_round_trip_and_rejects() {
    let bytes = random(1000, 9);
    let record = Record {
        segment_bytes: 128,
        file_bytes: 1000,
        digest: reference(&bytes),
        starts: record_states(&bytes, 128),
    };
    assert_eq!(record.starts.len(), 7);
    let encoded = record.encode();
    assert_eq!(Record::decode(&encoded), Ok(record.clone()));
    let mut bad_magic = encoded.clone();
    bad_magic[0] ^= 1;
    let mut bad_version = encoded.clone();
    bad_version[8] = 9;
    let mut bad_segment = encoded.clone();
    bad_segment[12] = 65; // 65 bytes: not whole blocks
    let mut bad_count = encoded.clone();
    bad_count[60] = 6;
    for (what, bytes) in [
        ("magic", bad_magic),
        ("version", bad_version),
        ("segment", bad_segment),
        ("count", bad_count),
        ("short", encoded[..encoded.len() - 1].to_vec()),
        ("long", [encoded.as_slice(), &[0]].concat()),
        ("empty", Vec::new()),
    ] {
        assert!(Record::decode(&bytes).is_err(), "{what}");
    }
}

#[test]
fn load_ignores_records_that_do_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = random(1000, 5);
    let digest = reference(&bytes);
    let record =
        Record { segment_bytes: 128, file_bytes: 1000, digest, starts: record_states(&bytes, 128) };
    let records = Records::at(dir.path());
    let path = records.store(&record).unwrap();
    assert_eq!(path, record_path(dir.path(), &digest, 1000));
    assert_eq!(records.load(&digest, 1000, 128), Some(record.clone()));
    assert_eq!(records.load(&digest, 1000, 192), None, "another segment size");
    assert_eq!(records.load(&digest, 999, 128), None, "another length: no such record");
    let other = [7u8; 32];
    assert_eq!(records.load(&other, 1000, 128), None, "another digest: no such record");
    // A record renamed to another file's name: its own digest and length do not fit.
    std::fs::copy(&path, record_path(dir.path(), &other, 1000)).unwrap();
    assert_eq!(records.load(&other, 1000, 128), None);
    std::fs::write(&path, b"garbage").unwrap();
    assert_eq!(records.load(&digest, 1000, 128), None, "malformed");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn directory_precedence() {
    let os = |s: &str| Some(OsString::from(s));
    let cache = Path::new("/c");
    let cases = [
        (os("/o"), Some(cache), os("/x"), os("/h"), Some("/o")),
        (os(""), Some(cache), os("/x"), os("/h"), Some("/c/.sha256-states")),
        (None, None, os("/x"), os("/h"), Some("/x/gantry/sha256")),
        (None, None, os("relative"), os("/h"), Some("/h/.cache/gantry/sha256")),
        (None, None, None, os("/h"), Some("/h/.cache/gantry/sha256")),
        (None, None, None, None, None),
    ];
    for (over, cache_dir, xdg, home, want) in cases {
        let got = resolve_dir(over.clone(), cache_dir, xdg.clone(), home.clone())
            .map(|(anchor, below)| below.iter().fold(anchor, |p, c| p.join(c)));
        assert_eq!(got, want.map(PathBuf::from), "{over:?} {cache_dir:?} {xdg:?} {home:?}");
    }
}

#[test]
fn reread_tells_bad_records_from_bad_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let (seg, len) = (192u64, 1000usize);
    let bytes = random(len, 77);
    std::fs::write(&path, &bytes).unwrap();
    let starts = record_states(&bytes, seg);
    let used: Vec<State> = [IV].into_iter().chain(starts.iter().copied()).collect();

    // Good record, good bytes: nothing differs.
    let good = outcomes(&bytes, seg, &starts);
    let r = reread(&path, len as u64, seg, &used, &good).unwrap();
    assert_eq!((r.digest, &r.starts, r.differ.as_slice()), (reference(&bytes), &starts, &[][..]));

    // A corrupted record, good bytes: the load hashed segment 2 from a wrong start, and the
    // file hashed from that same start gives the same: the bytes are the file's.
    let mut bad_starts = starts.clone();
    bad_starts[1][3] ^= 1;
    let bad_used: Vec<State> = [IV].into_iter().chain(bad_starts.iter().copied()).collect();
    let from_bad = outcomes(&bytes, seg, &bad_starts);
    let r = reread(&path, len as u64, seg, &bad_used, &from_bad).unwrap();
    assert_eq!((r.digest, &r.starts, r.differ.as_slice()), (reference(&bytes), &starts, &[][..]));

    // Bytes read that are not the file's (in segment 3), with the wrong record too.
    let mut read = bytes.clone();
    read[3 * seg as usize + 5] ^= 0x40;
    let r = reread(&path, len as u64, seg, &bad_used, &outcomes(&read, seg, &bad_starts)).unwrap();
    assert_eq!((r.digest, r.differ.as_slice()), (reference(&bytes), &[3][..]));
    // In the last (short) segment, with a good record.
    let mut read = bytes.clone();
    read[len - 1] ^= 1;
    let r = reread(&path, len as u64, seg, &used, &outcomes(&read, seg, &starts)).unwrap();
    assert_eq!(r.differ, vec![5]);

    // The file longer or shorter than planned: an error, not a verdict.
    assert!(reread(&path, len as u64 - 1, seg, &used[..6], &good[..6]).is_err());
    assert!(reread(&path, len as u64 + 64, seg, &used, &good).is_err());
}
