//! The record a copy carries: the object's identity and an xxh3 digest of each
//! [`SEGMENT_BYTES`] segment of its bytes, computed by the writer as the bytes went to disk.
//!
//! It is a trailer after the object's bytes, in the same file, so that a copy and its
//! record are renamed into place in one step and can never be paired with another's:
//!
//! ```text
//! [object bytes: size][identity][digest: u64 LE per segment]
//! [b"GANTRYC1"][size: u64][segment bytes: u64][identity bytes: u64][xxh3 of the trailer: u64]
//! ```
//!
//! Everything in the trailer is checked on read: its length follows from the object's size
//! (as the store's HEAD gives it) and the identity's, so it is never larger than the size
//! dictates; the identity must be the one the copy's name is the digest of; the trailer's own
//! xxh3 must match. xxh3 catches corruption (a flipped bit, a torn write, a copy of another
//! object); it is no defence against a forger, which is why only files the cache's owner
//! (or its group, in shared mode) could have written are read at all.

use std::fs::File;
use std::os::unix::fs::FileExt;

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// Bytes per checked segment: small enough that every read extent of a copy (the readers'
/// requests are at least this large) holds whole segments, large enough that hashing costs
/// nothing per call and the record is 1/8192 of the object.
pub const SEGMENT_BYTES: u64 = 64 << 10;

const MAGIC: [u8; 8] = *b"GANTRYC1";
const FOOTER_BYTES: u64 = 40;
/// Largest identity accepted (keys are at most 1 KiB on every store; endpoints are short).
pub const IDENTITY_BYTES_MAX: u64 = 64 << 10;

/// Segments of an object of `size` bytes.
pub fn segments(size: u64) -> u64 {
    size.div_ceil(SEGMENT_BYTES)
}

/// The bytes of segment `k` of an object of `size` bytes.
pub fn segment_range(k: u64, size: u64) -> std::ops::Range<u64> {
    let start = k * SEGMENT_BYTES;
    start..(start + SEGMENT_BYTES).min(size)
}

/// The digest of one segment's bytes.
pub fn digest(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

/// The digest of one segment given in pieces, in order.
pub fn digest_of<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    let mut h = Xxh3::new();
    for p in pieces {
        h.update(p);
    }
    h.digest()
}

/// Bytes of the trailer of a copy of `size` bytes with `identity_len` bytes of identity.
pub fn trailer_bytes(size: u64, identity_len: u64) -> u64 {
    identity_len + 8 * segments(size) + FOOTER_BYTES
}

/// The trailer for an object of `size` bytes, `identity`, segment `digests`.
pub fn encode(size: u64, identity: &[u8], digests: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(trailer_bytes(size, identity.len() as u64) as usize);
    out.extend_from_slice(identity);
    for d in digests {
        out.extend_from_slice(&d.to_le_bytes());
    }
    out.extend_from_slice(&MAGIC);
    for v in [size, SEGMENT_BYTES, identity.len() as u64] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let sum = xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// The segment digests of the copy `file` (`file_len` bytes) of an object of `size` bytes
/// with `identity`; why not when its trailer is not exactly what that object's copy has.
pub fn read(file: &File, file_len: u64, size: u64, identity: &[u8]) -> Result<Vec<u64>, String> {
    let trailer = trailer_bytes(size, identity.len() as u64);
    if identity.len() as u64 > IDENTITY_BYTES_MAX || size.checked_add(trailer) != Some(file_len) {
        return Err(format!(
            "is {file_len} bytes, a copy of this object {} (object and record)",
            size.saturating_add(trailer)
        ));
    }
    let mut bytes = vec![0u8; trailer as usize];
    file.read_exact_at(&mut bytes, size).map_err(|e| format!("reading its record: {e}"))?;
    let (body, sum) = bytes.split_at(bytes.len() - 8);
    let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().unwrap_or([0; 8]));
    let footer = body.len() - 32;
    let fields = (u64_at(footer + 8), u64_at(footer + 16), u64_at(footer + 24));
    if body[footer..footer + 8] != MAGIC
        || fields != (size, SEGMENT_BYTES, identity.len() as u64)
        || xxh3_64(body).to_le_bytes() != sum
    {
        return Err("its record is damaged or of another format".to_owned());
    }
    if &body[..identity.len()] != identity {
        return Err("its record is of another object".to_owned());
    }
    let digests = body[identity.len()..footer].chunks_exact(8);
    Ok(digests.map(|d| u64::from_le_bytes(d.try_into().unwrap_or([0; 8]))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_and_any_change_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy");
        let size = 3 * SEGMENT_BYTES + 5;
        let object: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let digests: Vec<u64> = (0..segments(size))
            .map(|k| {
                digest(
                    &object[segment_range(k, size).start as usize
                        ..segment_range(k, size).end as usize],
                )
            })
            .collect();
        let identity = b"identity".to_vec();
        let mut bytes = object.clone();
        bytes.extend(encode(size, &identity, &digests));
        std::fs::write(&path, &bytes).unwrap();
        let len = bytes.len() as u64;
        let file = File::open(&path).unwrap();
        assert_eq!(read(&file, len, size, &identity).unwrap(), digests);
        assert!(read(&file, len, size, b"identitx").unwrap_err().contains("another object"));
        assert!(read(&file, len, size - 1, &identity).is_err());
        assert!(read(&file, len + 1, size, &identity).is_err());
        for at in size..len {
            let mut bad = bytes.clone();
            bad[at as usize] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            let file = File::open(&path).unwrap();
            assert!(read(&file, len, size, &identity).is_err(), "byte {at}");
        }
    }
}
