//! The adversarial corpus: each malformed checkpoint, and the error it must give.

mod common;

use common::file;
use std::fs;
use std::path::Path;

use gantry_format::{parse_file_bytes, Checkpoint, ErrorKind, FormatError, MAX_HEADER_BYTES};

fn parse(bytes: &[u8]) -> Result<gantry_format::Header, FormatError> {
    parse_file_bytes(Path::new("bad.safetensors"), bytes)
}

fn err(bytes: &[u8]) -> FormatError {
    let e = parse(bytes).expect_err("malformed input must be rejected");
    let message = e.to_string();
    assert!(message.starts_with("bad.safetensors: "), "{message}");
    e
}

macro_rules! rejects {
    ($name:ident, $bytes:expr, $pattern:pat) => {
        #[test]
        fn $name() {
            let e = err(&$bytes);
            assert!(matches!(e.kind(), $pattern), "unexpected error: {e}");
        }
    };
}

rejects!(empty_file, [], ErrorKind::TooSmall { file_len: 0 });
rejects!(
    prefix_larger_than_file,
    {
        let mut b = 64u64.to_le_bytes().to_vec();
        b.extend(b"{}");
        b
    },
    ErrorKind::HeaderPastEnd { header_len: 64, .. }
);
rejects!(
    huge_prefix,
    u64::MAX.to_le_bytes(),
    ErrorKind::HeaderTooLarge { header_len: u64::MAX, .. }
);
rejects!(
    prefix_just_over_cap,
    (MAX_HEADER_BYTES + 1).to_le_bytes(),
    ErrorKind::HeaderTooLarge { .. }
);
rejects!(
    non_utf8_header,
    {
        let mut b = 4u64.to_le_bytes().to_vec();
        b.extend([b'{', 0xff, 0xfe, b'}']);
        b
    },
    ErrorKind::HeaderNotUtf8 { file_offset: 9 }
);
rejects!(invalid_json, file("{\"a\": ", 0), ErrorKind::HeaderJson { .. });
rejects!(json_not_object, file("[1, 2]", 0), ErrorKind::HeaderJson { .. });
rejects!(trailing_garbage_json, file("{} {}", 0), ErrorKind::HeaderJson { .. });
rejects!(
    overlapping,
    file(
        r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},
            "b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
        6
    ),
    ErrorKind::Overlap { data_begin: 2, previous_end: 4, .. }
);
rejects!(
    gap,
    file(
        r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},
            "b":{"dtype":"U8","shape":[4],"data_offsets":[8,12]}}"#,
        12
    ),
    ErrorKind::Gap { data_begin: 8, expected_begin: 4, .. }
);
rejects!(
    first_tensor_not_at_zero,
    file(r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#, 8),
    ErrorKind::Gap { data_begin: 4, expected_begin: 0, .. }
);
rejects!(
    offsets_past_end,
    file(r#"{"a":{"dtype":"U8","shape":[4096],"data_offsets":[0,4096]}}"#, 16),
    ErrorKind::PastEnd { data_end: 4096, data_len: 16, .. }
);
rejects!(
    truncated_data_section,
    {
        let mut b = file(r#"{"a":{"dtype":"F32","shape":[8],"data_offsets":[0,32]}}"#, 32);
        b.truncate(b.len() - 1);
        b
    },
    ErrorKind::PastEnd { data_end: 32, data_len: 31, .. }
);
rejects!(
    trailing_bytes,
    file(r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#, 9),
    ErrorKind::TrailingBytes { data_used: 4, data_len: 9 }
);
rejects!(
    dtype_shape_length_mismatch,
    file(r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#, 20),
    ErrorKind::SizeMismatch { expected_bytes: 24, data_bytes: 20, .. }
);
rejects!(
    shape_product_overflow,
    file(r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}}"#, 0),
    ErrorKind::ShapeOverflow { .. }
);
rejects!(
    unknown_dtype,
    file(r#"{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#, 16),
    ErrorKind::UnknownDtype { .. }
);
rejects!(
    duplicate_names,
    file(
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},
            "a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
        2
    ),
    ErrorKind::DuplicateTensor { .. }
);
rejects!(
    reversed_offsets,
    file(r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}"#, 4),
    ErrorKind::OffsetsReversed { data_begin: 4, data_end: 0, .. }
);
rejects!(
    missing_field,
    file(r#"{"a":{"dtype":"U8","shape":[1]}}"#, 1),
    ErrorKind::BadTensorEntry { .. }
);
rejects!(
    negative_dimension,
    file(r#"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#, 1),
    ErrorKind::BadTensorEntry { .. }
);
rejects!(
    metadata_not_strings,
    file(r#"{"__metadata__":{"a":1}}"#, 0),
    ErrorKind::BadMetadata { .. }
);
rejects!(
    partial_byte,
    file(r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}}"#, 1),
    ErrorKind::PartialByte { bits: 12, .. }
);

#[test]
fn messages_name_tensor_and_offset() {
    let e = err(&file(
        r#"{"w.0":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},
            "w.1":{"dtype":"U8","shape":[4],"data_offsets":[8,12]}}"#,
        12,
    ));
    let m = e.to_string();
    assert!(m.contains("'w.1'") && m.contains("data offset 8") && m.contains("gap of 4"), "{m}");
}

#[test]
fn zero_tensors_and_zero_size_tensors_are_valid() {
    let h = parse(&file("{}", 0)).unwrap();
    assert!(h.tensors.is_empty());
    assert_eq!(h.data_len, 0);
    let h = parse(&file(
        r#"{"__metadata__":{"format":"pt"},
            "e":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]},
            "s":{"dtype":"F32","shape":[],"data_offsets":[0,4]},
            "z":{"dtype":"BF16","shape":[0],"data_offsets":[4,4]}}"#,
        4,
    ))
    .unwrap();
    assert_eq!(h.tensors.len(), 3);
    assert_eq!(h.metadata.unwrap()["format"], "pt");
    assert_eq!(h.tensors.iter().map(|t| t.len).sum::<u64>(), 4);
}

#[test]
fn sub_byte_dtype_accepted_when_whole_bytes() {
    let h = parse(&file(r#"{"a":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}"#, 2)).unwrap();
    assert_eq!(h.tensors[0].len, 2);
}

// ---- sharded checkpoints ----

fn shard(dir: &Path, name: &str, tensors: &[(&str, usize)]) {
    let mut header = String::from("{");
    let mut offset = 0;
    for (i, (t, n)) in tensors.iter().enumerate() {
        if i > 0 {
            header.push(',');
        }
        header += &format!(
            r#""{t}":{{"dtype":"U8","shape":[{n}],"data_offsets":[{offset},{}]}}"#,
            offset + n
        );
        offset += n;
    }
    header.push('}');
    fs::write(dir.join(name), file(&header, offset)).unwrap();
}

fn index(dir: &Path, map: &[(&str, &str)]) {
    let entries: Vec<String> = map.iter().map(|(t, s)| format!(r#""{t}":"{s}""#)).collect();
    let text =
        format!(r#"{{"metadata":{{"total_size":12}},"weight_map":{{{}}}}}"#, entries.join(","));
    fs::write(dir.join("model.safetensors.index.json"), text).unwrap();
}

fn sharded() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    shard(dir.path(), "model-00001-of-00002.safetensors", &[("a", 4), ("b", 4)]);
    shard(dir.path(), "model-00002-of-00002.safetensors", &[("c", 4)]);
    dir
}

const GOOD_MAP: &[(&str, &str)] = &[
    ("a", "model-00001-of-00002.safetensors"),
    ("b", "model-00001-of-00002.safetensors"),
    ("c", "model-00002-of-00002.safetensors"),
];

fn open_err(path: &Path) -> FormatError {
    Checkpoint::open(path).expect_err("must be rejected")
}

#[test]
fn sharded_checkpoint_resolves_through_directory_and_index() {
    let dir = sharded();
    index(dir.path(), GOOD_MAP);
    for path in [dir.path().to_path_buf(), dir.path().join("model.safetensors.index.json")] {
        let c = Checkpoint::open(&path).unwrap();
        assert_eq!(c.files.len(), 2);
        let names: Vec<_> = c.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(c.total_bytes(), 12);
        assert_eq!(c.index_metadata["total_size"], "12");
        assert_eq!(c.tensors[2].offset, c.files[1].header.data_offset);
    }
}

#[test]
fn directory_without_index_uses_its_files() {
    let dir = sharded();
    let c = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(c.tensors.len(), 3);
}

#[test]
fn index_naming_missing_shard() {
    let dir = sharded();
    index(dir.path(), &[("a", "model-00001-of-00002.safetensors"), ("c", "gone.safetensors")]);
    let e = open_err(dir.path());
    assert!(
        matches!(e.kind(), ErrorKind::MissingShard { shard, tensor } if shard == "gone.safetensors" && tensor == "c"),
        "{e}"
    );
}

#[test]
fn index_maps_tensor_to_wrong_shard() {
    let dir = sharded();
    let mut map = GOOD_MAP.to_vec();
    map[2] = ("c", "model-00001-of-00002.safetensors");
    map.push(("d", "model-00002-of-00002.safetensors"));
    index(dir.path(), &map);
    let e = open_err(dir.path());
    assert!(matches!(e.kind(), ErrorKind::TensorNotInShard { tensor, .. } if tensor == "c"), "{e}");
}

#[test]
fn shard_tensor_missing_from_index() {
    let dir = sharded();
    // Both shards named, but the map leaves out 'b'.
    index(dir.path(), &[GOOD_MAP[0], GOOD_MAP[2]]);
    let e = open_err(dir.path());
    assert!(
        matches!(e.kind(), ErrorKind::ShardTensorNotInIndex { tensor, .. } if tensor == "b"),
        "{e}"
    );
}

#[test]
fn tensor_in_two_shards() {
    let dir = sharded();
    shard(dir.path(), "model-00002-of-00002.safetensors", &[("a", 4)]);
    let e = open_err(dir.path());
    assert!(
        matches!(e.kind(), ErrorKind::TensorInTwoShards { tensor, .. } if tensor == "a"),
        "{e}"
    );
}

#[test]
fn index_rejects_escaping_and_duplicate_entries() {
    let dir = sharded();
    index(dir.path(), &[("a", "../model-00001-of-00002.safetensors")]);
    assert!(matches!(open_err(dir.path()).kind(), ErrorKind::ShardOutsideDirectory { .. }));
    index(dir.path(), &[("a", "/etc/passwd")]);
    assert!(matches!(open_err(dir.path()).kind(), ErrorKind::ShardOutsideDirectory { .. }));
    index(dir.path(), &[GOOD_MAP[0], GOOD_MAP[0]]);
    let e = open_err(dir.path());
    assert!(e.to_string().contains("appears twice in weight_map"), "{e}");
    fs::write(dir.path().join("model.safetensors.index.json"), "{\"metadata\":{}}").unwrap();
    assert!(matches!(open_err(dir.path()).kind(), ErrorKind::BadIndex { .. }));
}

#[test]
fn empty_directory_and_missing_path() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(open_err(dir.path()).kind(), ErrorKind::NoCheckpoint));
    let e = open_err(&dir.path().join("nope.safetensors"));
    assert!(matches!(e.kind(), ErrorKind::Io { .. }));
    assert!(e.to_string().contains("nope.safetensors"));
}

#[test]
fn shards_are_in_name_order_whatever_the_map_order() {
    let dir = sharded();
    let mut map = GOOD_MAP.to_vec();
    map.reverse();
    index(dir.path(), &map);
    let c = Checkpoint::open(dir.path()).unwrap();
    let names: Vec<_> = c.files.iter().map(|f| f.path.file_name().unwrap().to_owned()).collect();
    assert_eq!(names, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]);
    assert_eq!(c.tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
}
