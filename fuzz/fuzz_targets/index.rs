//! An index file's bytes through the index parser: it must return, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(index) = gantry_format::parse_index("fuzz.index.json".as_ref(), bytes) {
        for (_, shard) in &index.weight_map {
            assert!(*shard < index.shards.len());
        }
    }
});
