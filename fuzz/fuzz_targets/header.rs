//! A whole file's bytes (prefix, header, data) through the header parser: it must return,
//! never panic, and whatever it accepts must lie inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(header) = gantry_format::parse_file_bytes("fuzz.safetensors".as_ref(), bytes) {
        let end = header.data_offset + header.data_len;
        assert_eq!(end, bytes.len() as u64);
        for t in &header.tensors {
            assert!(t.offset >= header.data_offset && t.offset + t.len <= end);
        }
    }
});
