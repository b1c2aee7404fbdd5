//! Shared helpers of the format crate's tests.
#![allow(dead_code)]

/// A file from a JSON header and a data section, padded like the reference serializer.
pub fn file(header: &str, data_len: usize) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    bytes.extend((0..data_len).map(|i| i as u8));
    bytes
}
