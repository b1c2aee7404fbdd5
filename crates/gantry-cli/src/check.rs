//! `--checksum` and `--verify`: hashing loaded tensors, and comparing them with the files.
//!
//! Both work in pieces of [`CHECK_CHUNK_BYTES`] (GPU tensors are copied back a piece at a
//! time), so their memory is bounded whatever the tensor or model size.
//!
//! `--verify` is a check of the load, so it shares nothing with it: each file's table comes
//! from the `safetensors` crate's own parser over header bytes read with plain
//! `read_exact_at`, the expected bytes from `read_exact_at`, and a slice of a placed load is
//! located with its own arithmetic. A file that changed after the load, or a header the load
//! misread, is an error that names the file, the tensor and the offset, never a panic.

use std::collections::HashMap;
use std::error::Error;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use gantry::placement::Share;
use gantry::Checkpoint;
use gantry_format::{escape, escape_path};

/// Bytes hashed or compared at a time.
pub const CHECK_CHUNK_BYTES: usize = 8 << 20;

/// Fills a buffer with bytes of a loaded tensor (or share), from `at` bytes into it.
pub type ReadAt<'a> = dyn FnMut(u64, &mut [u8]) -> Result<(), gantry::Error> + 'a;

/// `read(i, at, buf)`: bytes of loaded tensor `i` (its position in the table).
pub type ReadTensor<'a> = dyn FnMut(usize, u64, &mut [u8]) -> Result<(), gantry::Error> + 'a;

/// `read(destination, share, at, buf)`: bytes of a placed load's share (its position in
/// the destination's share list).
pub type ReadShare<'a> = dyn FnMut(usize, usize, u64, &mut [u8]) -> Result<(), gantry::Error> + 'a;

/// XXH3-64 of `len` bytes that `read` gives, hashed in pieces of at most `chunk_bytes`.
pub fn xxh3(len: u64, chunk_bytes: usize, read: &mut ReadAt<'_>) -> Result<u64, gantry::Error> {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; chunk_bytes.min(len as usize)];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        read(at, &mut buf[..n])?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hasher.digest())
}

/// One tensor's place in its file as the `safetensors` crate reads the header.
struct Reference {
    offset: u64,
    len: u64,
}

/// The table of the file at `path`, from the `safetensors` crate's parser over the header
/// bytes (which also checks that the tensors tile a data section ending at the file's end).
fn reference_table(path: &Path, file: &File) -> Result<HashMap<String, Reference>, Box<dyn Error>> {
    let at = |what: &str| format!("verify: {}: {what}", escape_path(path));
    let file_len = file.metadata().map_err(|e| at(&format!("stat failed: {e}")))?.len();
    let mut prefix = [0u8; 8];
    file.read_exact_at(&mut prefix, 0).map_err(|e| at(&format!("read failed: {e}")))?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > gantry_format::MAX_HEADER_BYTES || 8 + header_len > file_len {
        return Err(at("not a safetensors file any more (header length field)").into());
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8).map_err(|e| at(&format!("read failed: {e}")))?;
    let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&header)
        .map_err(|e| at(&format!("the safetensors crate rejects the header: {e}")))?;
    let data_offset = 8 + header_len;
    let tensors = metadata.tensors();
    let data_end = tensors.values().map(|t| t.data_offsets.1 as u64).max().unwrap_or(0);
    if data_offset + data_end != file_len {
        return Err(at(&format!(
            "the header's tensors end at file offset {}, but the file is {file_len} bytes",
            data_offset + data_end
        ))
        .into());
    }
    Ok(tensors
        .into_iter()
        .map(|(name, t)| {
            let (begin, end) = (t.data_offsets.0 as u64, t.data_offsets.1 as u64);
            (name, Reference { offset: data_offset + begin, len: end - begin })
        })
        .collect())
}

/// Compares `len` bytes that `read` gives with the file's bytes from `file_offset`, a piece at
/// a time; the first difference is an error naming `what`, the file and the file offset.
fn compare(
    path: &Path,
    file: &File,
    what: &str,
    (file_offset, len): (u64, u64),
    read: &mut ReadAt<'_>,
) -> Result<(), Box<dyn Error>> {
    let n_max = CHECK_CHUNK_BYTES.min(len as usize);
    let (mut got, mut expected) = (vec![0u8; n_max], vec![0u8; n_max]);
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(n_max as u64) as usize;
        read(at, &mut got[..n])?;
        file.read_exact_at(&mut expected[..n], file_offset + at).map_err(|e| {
            format!(
                "verify: {}: read of {n} bytes at offset {} failed: {e}",
                escape_path(path),
                file_offset + at
            )
        })?;
        if let Some(i) = got[..n].iter().zip(&expected[..n]).position(|(a, b)| a != b) {
            return Err(format!(
                "verify: {what} differs at byte {} (file {}, offset {}): loaded {:#04x}, file has {:#04x}",
                at + i as u64,
                escape_path(path),
                file_offset + at + i as u64,
                got[i],
                expected[i]
            )
            .into());
        }
        at += n as u64;
    }
    Ok(())
}

/// The files of `checkpoint`, opened (regular files only) with their reference tables, as
/// they are needed.
struct Files<'a> {
    checkpoint: &'a Checkpoint,
    open: HashMap<usize, (File, HashMap<String, Reference>)>,
}

impl<'a> Files<'a> {
    fn new(checkpoint: &'a Checkpoint) -> Self {
        Self { checkpoint, open: HashMap::new() }
    }

    /// Tensor `i`'s file, and its offset and length there by the reference table, which
    /// must agree with the table the load used.
    fn locate(&mut self, i: usize) -> Result<(&Path, &File, u64), Box<dyn Error>> {
        let t = &self.checkpoint.tensors[i];
        let path = &self.checkpoint.file(t.file).path;
        if let std::collections::hash_map::Entry::Vacant(slot) = self.open.entry(t.file.0) {
            let (file, _) = gantry_format::open_regular(path)?;
            let table = reference_table(path, &file)?;
            slot.insert((file, table));
        }
        let (file, table) = &self.open[&t.file.0];
        match table.get(&t.name) {
            Some(r) if (r.offset, r.len) == (t.offset, t.len) => Ok((path, file, t.offset)),
            found => Err(format!(
                "verify: {}: tensor '{}' was loaded from file offset {} ({} bytes), but the safetensors crate {}: the file changed after the load, or its header was misread",
                escape_path(path),
                escape(&t.name),
                t.offset,
                t.len,
                match found {
                    Some(r) => format!("puts it at file offset {} ({} bytes)", r.offset, r.len),
                    None => "finds no tensor of that name".to_owned(),
                }
            )
            .into()),
        }
    }
}

/// Compares each loaded tensor (`loaded`: table positions) with its file; `read(i, at, buf)`
/// gives tensor `i`'s loaded bytes.
pub fn verify(
    checkpoint: &Checkpoint,
    loaded: &[usize],
    read: &mut ReadTensor<'_>,
) -> Result<(), Box<dyn Error>> {
    let mut files = Files::new(checkpoint);
    for &i in loaded {
        let t = &checkpoint.tensors[i];
        let (path, file, offset) = files.locate(i)?;
        let what = format!("tensor '{}'", escape(&t.name));
        compare(path, file, &what, (offset, t.len), &mut |at, buf| read(i, at, buf))?;
    }
    Ok(())
}

/// The runs of a share in file order: (file offset, bytes, offset in the share). A slice
/// along `dim` keeps `len` indices from `start` of every row of that dimension.
pub fn share_runs(entry: &gantry::TensorEntry, share: Share) -> Vec<(u64, u64, u64)> {
    let Share::Slice(s) = share else {
        return vec![(entry.offset, entry.len, 0)];
    };
    let outer: u64 = entry.shape[..s.dim].iter().product();
    let rows = outer * entry.shape[s.dim];
    if rows == 0 || s.len == 0 {
        return Vec::new();
    }
    let inner = entry.len / rows; // bytes of one index of `dim`
    (0..outer)
        .map(|o| {
            let file_offset = entry.offset + (o * entry.shape[s.dim] + s.start) * inner;
            (file_offset, s.len * inner, o * s.len * inner)
        })
        .collect()
}

/// Compares every share of a placed load with its file: `shares[d]` lists destination `d`'s
/// (tensor position, share), and `read(d, share, at, buf)` gives that share's loaded bytes.
pub fn verify_placed(
    checkpoint: &Checkpoint,
    shares: &[Vec<(usize, Share)>],
    read: &mut ReadShare<'_>,
) -> Result<(), Box<dyn Error>> {
    let mut files = Files::new(checkpoint);
    for (d, list) in shares.iter().enumerate() {
        for (s, &(i, share)) in list.iter().enumerate() {
            let t = &checkpoint.tensors[i];
            let (path, file, _) = files.locate(i)?;
            let what = format!("tensor '{}' at destination {d}", escape(&t.name));
            for (file_offset, len, dest) in share_runs(t, share) {
                let mut piece = |at: u64, buf: &mut [u8]| read(d, s, dest + at, buf);
                compare(path, file, &what, (file_offset, len), &mut piece)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, tensors: &[(&str, Vec<u8>)]) -> Vec<u8> {
        use safetensors::tensor::TensorView;
        let views: Vec<_> = tensors
            .iter()
            .map(|(n, b)| (*n, TensorView::new(safetensors::Dtype::U8, vec![b.len()], b).unwrap()))
            .collect();
        let bytes = safetensors::serialize(views, None).unwrap();
        std::fs::write(path, &bytes).unwrap();
        bytes
    }

    /// Reads a tensor's bytes from a copy of the file taken at load time.
    fn from_copy<'a>(
        c: &'a Checkpoint,
        copy: &'a [u8],
    ) -> impl FnMut(usize, u64, &mut [u8]) -> Result<(), gantry::Error> + 'a {
        move |i, at, buf| {
            let start = (c.tensors[i].offset + at) as usize;
            buf.copy_from_slice(&copy[start..start + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn hashing_in_pieces_equals_one_shot_xxh3() {
        let data: Vec<u8> = (0..100_003u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for chunk in [1usize, 4096, 65_536, 1 << 20] {
            let mut read = |at: u64, buf: &mut [u8]| {
                assert!(buf.len() <= chunk, "a piece larger than the chunk");
                buf.copy_from_slice(&data[at as usize..at as usize + buf.len()]);
                Ok(())
            };
            let hash = xxh3(data.len() as u64, chunk, &mut read).unwrap();
            assert_eq!(hash, xxhash_rust::xxh3::xxh3_64(&data), "chunk {chunk}");
        }
        assert_eq!(xxh3(0, 4096, &mut |_, _| Ok(())).unwrap(), xxhash_rust::xxh3::xxh3_64(&[]));
    }

    #[test]
    fn a_byte_changed_after_the_load_is_named_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let copy = write(&path, &[("a", vec![1; 10]), ("b", vec![2; 20_000_000])]);
        let c = gantry_format::Checkpoint::open(&path).unwrap();
        verify(&c, &[0, 1], &mut from_copy(&c, &copy)).unwrap();
        // One byte of `b`, past the first piece, changed in place.
        let mut changed = copy.clone();
        let at = c.tensors[1].offset as usize + CHECK_CHUNK_BYTES + 5;
        changed[at] ^= 0xff;
        std::fs::write(&path, &changed).unwrap();
        let e = verify(&c, &[0, 1], &mut from_copy(&c, &copy)).unwrap_err().to_string();
        assert!(e.contains("tensor 'b' differs"), "{e}");
        assert!(e.contains(&format!("offset {at}")), "{e}");
        assert!(e.contains("m.safetensors"), "{e}");
    }

    #[test]
    fn a_header_changed_after_the_load_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let copy = write(&path, &[("a", vec![1; 10]), ("b", vec![2; 20])]);
        let c = gantry_format::Checkpoint::open(&path).unwrap();
        for tensors in [vec![("a", vec![1; 20]), ("b", vec![2; 10])], vec![("z", vec![1; 30])]] {
            write(&path, &tensors);
            let e = verify(&c, &[0, 1], &mut from_copy(&c, &copy)).unwrap_err().to_string();
            assert!(e.contains("the file changed after the load"), "{e}");
            assert!(e.contains("m.safetensors") && e.contains("tensor '"), "{e}");
        }
        // Not a safetensors file any more.
        std::fs::write(&path, b"root:x:0:0:root:/root:/bin/bash\n").unwrap();
        let e = verify(&c, &[0], &mut from_copy(&c, &copy)).unwrap_err().to_string();
        assert!(e.contains("not a safetensors file"), "{e}");
    }

    #[test]
    fn share_runs_of_slices() {
        // A 3x4 tensor of 2-byte elements at file offset 100.
        let t = gantry::TensorEntry {
            name: "w".into(),
            dtype: gantry::Dtype::BF16,
            shape: vec![3, 4],
            file: gantry_format::FileId(0),
            offset: 100,
            len: 24,
        };
        let slice = |dim, start, len| Share::Slice(gantry::placement::Slice { dim, start, len });
        assert_eq!(share_runs(&t, Share::Whole), vec![(100, 24, 0)]);
        assert_eq!(share_runs(&t, slice(0, 1, 2)), vec![(108, 16, 0)]);
        assert_eq!(share_runs(&t, slice(1, 2, 2)), vec![(104, 4, 0), (112, 4, 4), (120, 4, 8)]);
    }
}
