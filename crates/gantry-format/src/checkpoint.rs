//! A whole checkpoint: one file, a directory, or a sharded index, resolved to its files and
//! validated into one tensor table that is ready for planning reads.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::error::{ErrorKind, FormatError};
use crate::header::{read_header_identified, Header};
use crate::index::{parse_index, Index, MAX_INDEX_BYTES};
use crate::open::{check_contained, file_kind, open_regular, shard_error, FileIdentity};

/// The index file name that Hugging Face tools write for sharded checkpoints.
pub const INDEX_FILE_NAME: &str = "model.safetensors.index.json";

/// Position of a file in [`Checkpoint::files`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileId(pub usize);

/// One `.safetensors` file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// Path as resolved (relative paths stay relative to the working directory).
    pub path: PathBuf,
    /// File length in bytes.
    pub file_len: u64,
    /// The parsed header.
    pub header: Header,
    /// The file's identity when its header was read (`None` for sources that are not local
    /// files): compare with [`FileInfo::check_unchanged`] after opening it for its data.
    pub identity: Option<FileIdentity>,
    /// The version of an object whose header was read from object storage (its ETag, and on
    /// Google Cloud Storage its generation, as `etag` or `etag#generation`): the reads of its
    /// data are pinned to it. `None` for local files (see `identity`).
    pub version: Option<String>,
}

impl FileInfo {
    /// Absolute file offset range of the data section.
    pub fn data_range(&self) -> std::ops::Range<u64> {
        self.header.data_offset..self.header.data_offset + self.header.data_len
    }

    /// Checks that `file`, opened for this file's data, is a regular file and the very one
    /// whose header was read (same device, inode, length and modification time).
    pub fn check_unchanged(&self, file: &fs::File) -> Result<(), FormatError> {
        let meta = file
            .metadata()
            .map_err(|source| FormatError::new(&self.path, ErrorKind::Io { op: "stat", source }))?;
        if !meta.is_file() {
            let kind = ErrorKind::NotRegularFile { kind: file_kind(&meta) };
            return Err(FormatError::new(&self.path, kind));
        }
        match &self.identity {
            Some(identity) => identity.check(&self.path, &meta),
            None => Ok(()),
        }
    }
}

/// One tensor of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    /// Name as in the header.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape, outermost dimension first.
    pub shape: Vec<u64>,
    /// The file that holds it.
    pub file: FileId,
    /// Absolute file offset of its first byte.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
}

/// A validated checkpoint: its files and every tensor, sorted by file, then offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The files, in shard order (index order, or name order for a plain directory).
    pub files: Vec<FileInfo>,
    /// Every tensor, sorted by file, then offset.
    pub tensors: Vec<TensorEntry>,
    /// The index's `metadata`, for a sharded checkpoint.
    pub index_metadata: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Resolves `path` (a `.safetensors` file, an index `.json`, or a directory) and validates
    /// every header, reading no tensor data.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, FormatError> {
        let path = path.as_ref();
        let meta = fs::metadata(path)
            .map_err(|source| FormatError::new(path, ErrorKind::Io { op: "stat", source }))?;
        if meta.is_dir() {
            return Self::open_dir(path);
        }
        if path.extension().is_some_and(|e| e == "json") {
            return Self::open_index(path);
        }
        Self::from_files(vec![path.to_path_buf()])
    }

    /// Sum of every tensor's byte length.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.len).sum()
    }

    /// The file a tensor lives in.
    pub fn file(&self, id: FileId) -> &FileInfo {
        &self.files[id.0]
    }

    /// Whether file `file` holds a tensor for which `wanted` (one flag per tensor) is set.
    pub fn file_wanted(&self, wanted: &[bool], file: usize) -> bool {
        self.tensors.iter().zip(wanted).any(|(t, &w)| w && t.file.0 == file)
    }

    fn open_dir(dir: &Path) -> Result<Self, FormatError> {
        let index = dir.join(INDEX_FILE_NAME);
        // Anything but "not found" (no search permission, a symlink loop) is said as it is,
        // not taken for a missing index.
        match fs::metadata(&index) {
            Ok(_) => return Self::open_index(&index),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(FormatError::new(&index, ErrorKind::Io { op: "stat", source }))
            }
        }
        let io_err = |source| FormatError::new(dir, ErrorKind::Io { op: "read directory", source });
        let mut files = Vec::new();
        let mut indexes = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err)? {
            let path = entry.map_err(io_err)?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.ends_with(".safetensors.index.json") {
                indexes.push(path);
            } else if name.ends_with(".safetensors") {
                // A FIFO, a dangling symlink or an unreadable entry is an error, not a file
                // silently left out of the checkpoint.
                crate::open::stat_regular(&path)?;
                files.push(path);
            }
        }
        indexes.sort();
        match indexes.len() {
            0 => {}
            1 => return Self::open_index(&indexes[0]),
            _ => {
                let candidates = indexes.iter().map(|p| p.display().to_string()).collect();
                return Err(FormatError::new(dir, ErrorKind::AmbiguousIndex { candidates }));
            }
        }
        if files.is_empty() {
            return Err(FormatError::new(dir, ErrorKind::NoCheckpoint));
        }
        files.sort();
        Self::from_files(files)
    }

    fn open_index(index_path: &Path) -> Result<Self, FormatError> {
        let io_err = |op, source| FormatError::new(index_path, ErrorKind::Io { op, source });
        let (file, _) = open_regular(index_path)?;
        let mut bytes = Vec::new();
        file.take(MAX_INDEX_BYTES + 1).read_to_end(&mut bytes).map_err(|e| io_err("read", e))?;
        if bytes.len() as u64 > MAX_INDEX_BYTES {
            let message = format!("larger than the cap of {MAX_INDEX_BYTES} bytes");
            return Err(FormatError::new(index_path, ErrorKind::BadIndex { message }));
        }
        let index = parse_index(index_path, &bytes)?;
        let base = index_path.parent().unwrap_or(Path::new(""));
        check_shards_exist(index_path, base, &index)?;
        let paths = index.shards.iter().map(|s| base.join(s)).collect();
        Self::from_files(paths)?.with_index(index)
    }

    /// Checks this table, built from an index's shards in its order, against the index's
    /// `weight_map`, and keeps the index's metadata.
    pub fn with_index(mut self, index: Index) -> Result<Self, FormatError> {
        check_index_agrees(&self, &index)?;
        self.index_metadata = index.metadata;
        Ok(self)
    }

    /// Builds the table from a list of `.safetensors` files, rejecting a tensor name held by
    /// two files.
    fn from_files(paths: Vec<PathBuf>) -> Result<Self, FormatError> {
        let mut identities = Vec::with_capacity(paths.len());
        let mut headers = Vec::with_capacity(paths.len());
        for path in paths {
            let (header, identity) = read_header_identified(&path)?;
            identities.push(identity);
            headers.push((path, header));
        }
        let mut checkpoint = Self::from_headers(headers)?;
        for (file, identity) in checkpoint.files.iter_mut().zip(identities) {
            file.identity = Some(identity);
        }
        Ok(checkpoint)
    }

    /// Builds the table from headers read elsewhere (object storage, say), one per file in
    /// shard order, rejecting a tensor name held by two files.
    pub fn from_headers(headers: Vec<(PathBuf, Header)>) -> Result<Self, FormatError> {
        let mut files = Vec::with_capacity(headers.len());
        let mut tensors = Vec::new();
        let mut owner: HashMap<String, usize> = HashMap::new();
        for (i, (path, header)) in headers.into_iter().enumerate() {
            let file_len = header.data_offset + header.data_len;
            for t in &header.tensors {
                if let Some(&first) = owner.get(&t.name) {
                    let first: &FileInfo = &files[first];
                    return Err(FormatError::new(
                        &path,
                        ErrorKind::TensorInTwoShards {
                            tensor: t.name.clone(),
                            first: first.path.clone(),
                            second: path.clone(),
                        },
                    ));
                }
                owner.insert(t.name.clone(), i);
                tensors.push(TensorEntry {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    file: FileId(i),
                    offset: t.offset,
                    len: t.len,
                });
            }
            files.push(FileInfo { path, file_len, header, identity: None, version: None });
        }
        Ok(Self { files, tensors, index_metadata: BTreeMap::new() })
    }
}

/// Every shard stays inside the index's directory (see `open`'s containment rule) and is a
/// regular file; a missing shard is named with a tensor the index maps to it, anything else
/// (no permission, a symlink loop, a FIFO) is said as it is.
fn check_shards_exist(index_path: &Path, base: &Path, index: &Index) -> Result<(), FormatError> {
    for (shard_pos, shard) in index.shards.iter().enumerate() {
        check_contained(index_path, base, shard)?;
        let path = base.join(shard);
        let meta = fs::metadata(&path)
            .map_err(|e| shard_error(&path, e, index.missing_shard(index_path, shard_pos)))?;
        if !meta.is_file() {
            let kind = ErrorKind::NotRegularFile { kind: file_kind(&meta) };
            return Err(FormatError::new(&path, kind));
        }
    }
    Ok(())
}

/// Every tensor of the map is in the shard it names, and every shard tensor is in the map.
fn check_index_agrees(checkpoint: &Checkpoint, index: &Index) -> Result<(), FormatError> {
    let held: HashMap<&str, usize> =
        checkpoint.tensors.iter().map(|t| (t.name.as_str(), t.file.0)).collect();
    let mapped: HashMap<&str, usize> =
        index.weight_map.iter().map(|(t, s)| (t.as_str(), *s)).collect();
    for (tensor, shard) in &index.weight_map {
        if held.get(tensor.as_str()) != Some(shard) {
            let path = &checkpoint.files[*shard].path;
            let kind = ErrorKind::TensorNotInShard {
                tensor: tensor.clone(),
                shard: index.shards[*shard].clone(),
            };
            return Err(FormatError::new(path, kind));
        }
    }
    for t in &checkpoint.tensors {
        if mapped.get(t.name.as_str()) != Some(&t.file.0) {
            let path = &checkpoint.files[t.file.0].path;
            let kind = ErrorKind::ShardTensorNotInIndex {
                tensor: t.name.clone(),
                shard: index.shards[t.file.0].clone(),
            };
            return Err(FormatError::new(path, kind));
        }
    }
    Ok(())
}
