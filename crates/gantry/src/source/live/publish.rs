//! Building a publication: each checkpoint file whole in a sealed memfd, and the table of
//! per-tensor XXH3-64 digests beside it.
//!
//! From a checkpoint source, gantry's own loader fills the memfds (any source it reads: local
//! files, object storage, another live source), through a shared mapping of each memfd into
//! which every tensor lands at its offset in the file. A local file keeps its own header
//! bytes, so a memfd is byte for byte the file; a file from elsewhere gets its header written
//! from its parsed table, with the data section's layout unchanged. From tensors in memory
//! (a framework's state dict), one `model.safetensors` is laid out: the header, then each
//! tensor in the order given, packed. The digests are computed on all cores before sealing
//! (16 GB takes about a second); the mappings are gone before the seals go on (a writable
//! mapping would make `F_SEAL_WRITE` fail), and after them nothing can change the bytes.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};

use gantry_format::{Checkpoint, Dtype};
use serde_json::{json, Map, Value};

use super::protocol;
use crate::config::Config;
use crate::error::{Error, Result};

/// One publication's memory: its files as sealed memfds and its sealed table.
#[derive(Debug)]
pub(crate) struct Publication {
    /// Per file: its name, the sealed memfd, its length.
    pub files: Vec<(String, File, u64)>,
    /// Per file: where its data section lies in it (offset, length).
    pub data: Vec<(u64, u64)>,
    /// The table (file list and digests, JSON), sealed.
    pub table: File,
    /// The table's length in bytes.
    pub table_len: u64,
    /// Tensors published.
    pub tensors: usize,
    /// Bytes of tensor data published.
    pub tensor_bytes: u64,
    /// XXH3-64 of the names and digests, in the version id.
    pub content: u64,
}

/// A tensor to publish from memory: name, dtype, shape, bytes.
pub type TensorBytes<'a> = (&'a str, Dtype, &'a [u64], &'a [u8]);

/// Loads `source` with `config` into sealed memfds.
pub(crate) fn from_source(source: &Path, config: &Config) -> Result<Publication> {
    let checkpoint = crate::open_with(source, config)?;
    let loader = crate::Loader::new(config.clone())?;
    let mut names = HashSet::new();
    let mut files = Vec::with_capacity(checkpoint.files.len());
    let mut maps = Vec::with_capacity(checkpoint.files.len());
    let mut shifts = Vec::with_capacity(checkpoint.files.len());
    let mut data = Vec::with_capacity(checkpoint.files.len());
    for info in &checkpoint.files {
        let name = file_name(&info.path);
        if !names.insert(name.clone()) {
            return Err(Error::Config(format!(
                "{}: two files of the checkpoint are called '{name}': a publication names its \
                 files uniquely",
                source.display()
            )));
        }
        let header = header_of(info)?;
        // Where the data section moves when the header is written anew (0 for local files).
        let shift = header.len() as i128 - info.header.data_offset as i128;
        let len = u64::try_from(info.file_len as i128 + shift)
            .map_err(|_| Error::Internal("a published file of negative length".into()))?;
        let memfd = protocol::memfd(&name).map_err(|e| io_error("memfd_create", &name, e))?;
        memfd.set_len(len).map_err(|e| io_error("ftruncate", &name, e))?;
        let mut map = Mapping::new(&memfd, len).map_err(|e| io_error("mmap", &name, e))?;
        map.bytes_mut()[..header.len()].copy_from_slice(&header);
        maps.push(map);
        shifts.push(shift);
        files.push((name, memfd, len));
        data.push((header.len() as u64, info.header.data_len));
    }
    fill(&loader, &checkpoint, &mut maps, &shifts)?;
    let slices: Vec<&[u8]> = checkpoint
        .tensors
        .iter()
        .map(|t| {
            let at = (t.offset as i128 + shifts[t.file.0]) as usize;
            &maps[t.file.0].bytes()[at..at + t.len as usize]
        })
        .collect();
    let digests = hash_all(&slices);
    drop(slices);
    drop(maps);
    for (name, memfd, _) in &files {
        protocol::seal(memfd).map_err(|e| io_error("seal", name, e))?;
    }
    let names: Vec<&str> = checkpoint.tensors.iter().map(|t| t.name.as_str()).collect();
    finish(files, data, &names, &digests, checkpoint.total_bytes())
}

/// Loads `checkpoint`'s tensors into `maps`, each at its offset moved by its file's shift.
fn fill(
    loader: &crate::Loader,
    checkpoint: &Checkpoint,
    maps: &mut [Mapping],
    shifts: &[i128],
) -> Result<()> {
    let mut slices = checkpoint.tensors.iter().map(|t| {
        let map = &maps[t.file.0];
        let at = (t.offset as i128 + shifts[t.file.0]) as usize;
        assert!(at + t.len as usize <= map.len, "a tensor inside its file's mapping");
        // SAFETY: the range lies inside the mapping (asserted), which outlives the load;
        // tensors of a validated header do not overlap, so the slices are disjoint, and
        // nothing else touches the mappings while the load runs.
        Some(unsafe { std::slice::from_raw_parts_mut(map.ptr.as_ptr().add(at), t.len as usize) })
    });
    loader.load_into(checkpoint, |_| slices.next().flatten(), |_| {})?;
    Ok(())
}

/// Lays `tensors` out as one `model.safetensors` in a sealed memfd.
pub(crate) fn from_tensors<'a>(
    tensors: impl IntoIterator<Item = TensorBytes<'a>>,
) -> Result<Publication> {
    let tensors: Vec<TensorBytes<'a>> = tensors.into_iter().collect();
    let mut seen = HashSet::with_capacity(tensors.len());
    let mut entries = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for &(name, dtype, shape, bytes) in &tensors {
        let bad = |message: String| Error::Destination { tensor: name.to_owned(), message };
        if name.is_empty() || name == "__metadata__" || !seen.insert(name) {
            return Err(bad("an empty, reserved or repeated tensor name".to_owned()));
        }
        let bits = shape
            .iter()
            .try_fold(dtype.bitsize() as u64, |n, &d| n.checked_mul(d))
            .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
        if bits % 8 != 0 || bits / 8 != bytes.len() as u64 {
            return Err(bad(format!(
                "{} bytes, but {dtype} {shape:?} takes {bits} bits",
                bytes.len()
            )));
        }
        entries.push((name, dtype, shape, offset, offset + bytes.len() as u64));
        offset += bytes.len() as u64;
    }
    let header = header_bytes(&entries, None);
    let name = "model.safetensors";
    let memfd = protocol::memfd(name).map_err(|e| io_error("memfd_create", name, e))?;
    let len = header.len() as u64 + offset;
    memfd.set_len(len).map_err(|e| io_error("ftruncate", name, e))?;
    memfd.write_all_at(&header, 0).map_err(|e| io_error("write", name, e))?;
    for (&(_, _, _, begin, _), &(_, _, _, bytes)) in entries.iter().zip(&tensors) {
        let at = header.len() as u64 + begin;
        memfd.write_all_at(bytes, at).map_err(|e| io_error("write", name, e))?;
    }
    // The layout is checked by the same parser every reader uses.
    gantry_format::parse_header(Path::new(name), &header[8..], len)?;
    protocol::seal(&memfd).map_err(|e| io_error("seal", name, e))?;
    let digests = hash_all(&tensors.iter().map(|t| t.3).collect::<Vec<_>>());
    let names: Vec<&str> = tensors.iter().map(|t| t.0).collect();
    let data = vec![(header.len() as u64, offset)];
    finish(vec![(name.to_owned(), memfd, len)], data, &names, &digests, offset)
}

/// The table (file list, digests) in a sealed memfd, and the publication around it.
fn finish(
    files: Vec<(String, File, u64)>,
    data: Vec<(u64, u64)>,
    names: &[&str],
    digests: &[u64],
    tensor_bytes: u64,
) -> Result<Publication> {
    let mut table = Map::new();
    let list: Vec<Value> = files.iter().map(|(n, _, len)| json!({"name": n, "len": len})).collect();
    table.insert("files".into(), Value::Array(list));
    let mut content = xxhash_rust::xxh3::Xxh3::new();
    let mut map = Map::new();
    for (name, d) in names.iter().zip(digests) {
        content.update(name.as_bytes());
        content.update(&d.to_le_bytes());
        map.insert((*name).to_owned(), Value::String(format!("{d:016x}")));
    }
    table.insert("digests".into(), Value::Object(map));
    let text = serde_json::to_vec(&Value::Object(table))
        .map_err(|e| Error::Internal(format!("writing the digest table: {e}")))?;
    let memfd = protocol::memfd("table").map_err(|e| io_error("memfd_create", "table", e))?;
    memfd.write_all_at(&text, 0).map_err(|e| io_error("write", "table", e))?;
    protocol::seal(&memfd).map_err(|e| io_error("seal", "table", e))?;
    Ok(Publication {
        files,
        data,
        table: memfd,
        table_len: text.len() as u64,
        tensors: names.len(),
        tensor_bytes,
        content: content.digest(),
    })
}

/// The header bytes a published file starts with: a local file's own, else written from its
/// parsed table.
fn header_of(info: &gantry_format::FileInfo) -> Result<Vec<u8>> {
    let text = info.path.to_str().unwrap_or_default();
    if !crate::source::object::is_url(&info.path) && !super::is_url(text) {
        let file = crate::engine::read::open_for_data(info)?;
        let mut bytes = vec![0u8; info.header.data_offset as usize];
        file.read_exact_at(&mut bytes, 0).map_err(|source| Error::Io {
            op: "read header",
            path: info.path.clone(),
            offset: 0,
            len: bytes.len() as u64,
            source,
        })?;
        let again = gantry_format::parse_header(&info.path, &bytes[8..], info.file_len)?;
        if again == info.header {
            return Ok(bytes);
        }
        return Err(Error::Config(format!(
            "{}: the header changed since the checkpoint was opened",
            info.path.display()
        )));
    }
    let start = info.header.data_offset;
    let entries: Vec<_> = info
        .header
        .tensors
        .iter()
        .map(|t| {
            (t.name.as_str(), t.dtype, &t.shape[..], t.offset - start, t.offset - start + t.len)
        })
        .collect();
    let header = header_bytes(&entries, info.header.metadata.as_ref());
    // Zero-filled gaps keep the data section's length.
    Ok(header)
}

/// A safetensors header: the length prefix, then the JSON padded with spaces to 8 bytes.
fn header_bytes(
    tensors: &[(&str, Dtype, &[u64], u64, u64)],
    metadata: Option<&HashMap<String, String>>,
) -> Vec<u8> {
    let mut map = Map::new();
    if let Some(m) = metadata {
        map.insert("__metadata__".into(), json!(m));
    }
    for &(name, dtype, shape, begin, end) in tensors {
        let entry =
            json!({"dtype": dtype.to_string(), "shape": shape, "data_offsets": [begin, end]});
        map.insert(name.to_owned(), entry);
    }
    let mut text = Value::Object(map).to_string().into_bytes();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out
}

/// A file's name in the publication: the last part of its path (of a live source's file, the
/// part after `#`).
fn file_name(path: &Path) -> String {
    let text = path.to_string_lossy();
    let last = text.rsplit(['/', '#']).next().unwrap_or_default();
    if last.is_empty() {
        "model.safetensors".to_owned()
    } else {
        last.to_owned()
    }
}

/// XXH3-64 of each of `slices`, on all cores (largest first, taken as threads free up).
pub(crate) fn hash_all(slices: &[&[u8]]) -> Vec<u64> {
    let mut order: Vec<usize> = (0..slices.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(slices[i].len()));
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get()).min(slices.len());
    let next = AtomicUsize::new(0);
    let mut digests = vec![0u64; slices.len()];
    let done: Vec<Vec<(usize, u64)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    while let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
                        out.push((i, xxhash_rust::xxh3::xxh3_64(slices[i])));
                    }
                    out
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or_default()).collect()
    });
    let mut hashed = 0;
    for (i, d) in done.into_iter().flatten() {
        digests[i] = d;
        hashed += 1;
    }
    if hashed != slices.len() {
        // A hashing thread panicked (a bug): hash what it left on this thread.
        log::warn!("a digest thread failed; hashing on one thread");
        return slices.iter().map(|s| xxhash_rust::xxh3::xxh3_64(s)).collect();
    }
    digests
}

fn io_error(op: &'static str, name: &str, source: std::io::Error) -> Error {
    Error::Io { op, path: format!("memfd:{name}").into(), offset: 0, len: 0, source }
}

/// A shared, writable mapping of a memfd, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(file: &File, len: u64) -> std::io::Result<Self> {
        let len = usize::try_from(len).map_err(std::io::Error::other)?.max(1);
        // SAFETY: a new shared mapping of a memfd we own, `len` bytes (the memfd's size).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| std::io::Error::other("null mapping"))?;
        Ok(Self { ptr, len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        if unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) } != 0 {
            log::warn!(
                "munmap of a publication's memfd failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where each memfd's data section lies, read back from its own 8-byte prefix.
    fn data_of(publication: &Publication) -> Vec<(u64, u64)> {
        let prefix = |f: &File| {
            let mut n = [0u8; 8];
            f.read_exact_at(&mut n, 0).unwrap();
            8 + u64::from_le_bytes(n)
        };
        let files = publication.files.iter();
        files.map(|(_, f, len)| (prefix(f), len - prefix(f))).collect()
    }

    #[test]
    fn the_data_sections_recorded_are_where_the_memfds_put_them() {
        let a: Vec<u8> = (0..24u8).collect();
        let shape = [2u64, 3];
        let from_tensors = from_tensors([("w", Dtype::F32, &shape[..], &a[..])]).unwrap();
        assert_eq!(from_tensors.data, data_of(&from_tensors));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![2, 3], &a).unwrap();
        safetensors::serialize_to_file([("w", view)], None, &path).unwrap();
        let from_source = from_source(&path, &Config::default()).unwrap();
        assert_eq!(from_source.data, data_of(&from_source));
        assert_eq!(from_source.data[0].1, 24);
    }
}
