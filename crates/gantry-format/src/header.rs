//! One `.safetensors` file's header: the 8-byte little-endian length, the JSON header, and the
//! checks that make its offsets safe to plan reads from.
//!
//! The spec's own types come from the `safetensors` crate (`Dtype`, `TensorInfo`); what is
//! added here is reading only the header bytes (never the data), a header-size cap checked
//! before any allocation, duplicate-name detection (a plain JSON map keeps the last
//! duplicate silently), and errors that name the tensor and the offset.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use safetensors::tensor::TensorInfo;
use safetensors::Dtype;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::{ErrorKind, FormatError};
use crate::open::{open_regular, FileIdentity};

/// Bytes of the little-endian header length that opens every file.
pub const PREFIX_BYTES: u64 = 8;

/// Largest header accepted, the same cap the `safetensors` crate applies.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor of one file, as its header describes it, with offsets made absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderTensor {
    /// The tensor's name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape, outermost dimension first.
    pub shape: Vec<u64>,
    /// Absolute file offset of the tensor's first byte.
    pub offset: u64,
    /// Byte length of the tensor's data.
    pub len: u64,
}

/// A parsed and validated `.safetensors` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Length of the JSON header in bytes (the value of the prefix).
    pub header_len: u64,
    /// Absolute file offset of the data section (`8 + header_len`).
    pub data_offset: u64,
    /// Length of the data section in bytes; equal to the file's length minus `data_offset`.
    pub data_len: u64,
    /// The `__metadata__` entry, when the header has one.
    pub metadata: Option<HashMap<String, String>>,
    /// Tensors sorted by offset.
    pub tensors: Vec<HeaderTensor>,
}

/// Reads and validates the header of the file at `path`, never reading its data section.
/// Only a regular file is read (a FIFO or a device is an error, never a wait).
pub fn read_header(path: &Path) -> Result<Header, FormatError> {
    read_header_identified(path).map(|(header, _)| header)
}

/// [`read_header`], and the identity of the file it was read from, for checking later that
/// the file opened for its data is the same one.
pub fn read_header_identified(path: &Path) -> Result<(Header, FileIdentity), FormatError> {
    let (mut file, meta) = open_regular(path)?;
    let file_len = meta.len();
    let header_len = check_prefix(path, read_prefix(path, &mut file, file_len)?, file_len)?;
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|source| FormatError::new(path, ErrorKind::Io { op: "read header", source }))?;
    Ok((parse_header(path, &header, file_len)?, FileIdentity::of(&meta)))
}

/// Parses a whole file held in memory (prefix, header and data). Used by fuzzing and tests.
pub fn parse_file_bytes(path: &Path, bytes: &[u8]) -> Result<Header, FormatError> {
    let file_len = bytes.len() as u64;
    let prefix: [u8; 8] = bytes
        .get(..8)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| FormatError::new(path, ErrorKind::TooSmall { file_len }))?;
    let header_len = check_prefix(path, u64::from_le_bytes(prefix), file_len)?;
    let header = &bytes[8..8 + header_len as usize];
    parse_header(path, header, file_len)
}

fn read_prefix(path: &Path, file: &mut File, file_len: u64) -> Result<u64, FormatError> {
    if file_len < PREFIX_BYTES {
        return Err(FormatError::new(path, ErrorKind::TooSmall { file_len }));
    }
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix).map_err(|source| {
        FormatError::new(path, ErrorKind::Io { op: "read header length", source })
    })?;
    Ok(u64::from_le_bytes(prefix))
}

/// Checks the length prefix against the cap and the file's length; returns the header length.
pub fn check_prefix(path: &Path, header_len: u64, file_len: u64) -> Result<u64, FormatError> {
    if header_len > MAX_HEADER_BYTES {
        let max_header_len = MAX_HEADER_BYTES;
        return Err(FormatError::new(
            path,
            ErrorKind::HeaderTooLarge { header_len, max_header_len },
        ));
    }
    if PREFIX_BYTES + header_len > file_len {
        return Err(FormatError::new(path, ErrorKind::HeaderPastEnd { header_len, file_len }));
    }
    Ok(header_len)
}

/// Parses and validates the JSON header `header` of a file of `file_len` bytes.
pub fn parse_header(path: &Path, header: &[u8], file_len: u64) -> Result<Header, FormatError> {
    let err = |kind| FormatError::new(path, kind);
    let header_len = header.len() as u64;
    let data_offset = PREFIX_BYTES + header_len;
    let data_len = file_len
        .checked_sub(data_offset)
        .ok_or_else(|| err(ErrorKind::HeaderPastEnd { header_len, file_len }))?;
    let text = std::str::from_utf8(header).map_err(|e| {
        err(ErrorKind::HeaderNotUtf8 { file_offset: PREFIX_BYTES + e.valid_up_to() as u64 })
    })?;
    let entries = parse_entries(text).map_err(|message| err(ErrorKind::HeaderJson { message }))?;

    let mut metadata = None;
    let mut seen = HashSet::with_capacity(entries.len());
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if !seen.insert(name.clone()) {
            return Err(err(ErrorKind::DuplicateTensor { tensor: name }));
        }
        if name == "__metadata__" {
            let map = serde_json::from_str::<HashMap<String, String>>(value.get())
                .map_err(|e| err(ErrorKind::BadMetadata { message: e.to_string() }))?;
            metadata = Some(map);
            continue;
        }
        tensors.push(tensor_entry(name, value).map_err(err)?);
    }
    tensors.sort_by_key(|(_, begin, end)| (*begin, *end));
    let tensors = check_layout(tensors, data_offset, data_len, file_len).map_err(err)?;
    Ok(Header { header_len, data_offset, data_len, metadata, tensors })
}

/// A tensor before its offsets are checked against its neighbours: (tensor, begin, end) with
/// begin and end relative to the data section.
type Entry = (HeaderTensor, u64, u64);

/// Only the `dtype` of a tensor entry, read first so that an unknown dtype is reported as such
/// whatever else is wrong with the entry. Other fields are skipped without being stored.
#[derive(serde::Deserialize)]
struct DtypeOnly<'a> {
    #[serde(borrow)]
    dtype: Option<std::borrow::Cow<'a, str>>,
}

fn tensor_entry(name: String, value: &RawValue) -> Result<Entry, ErrorKind> {
    if let Ok(DtypeOnly { dtype: Some(dtype) }) = serde_json::from_str(value.get()) {
        let known = serde::de::value::StrDeserializer::<serde::de::value::Error>::new(&dtype);
        if Dtype::deserialize(known).is_err() {
            return Err(ErrorKind::UnknownDtype { tensor: name, dtype: dtype.into_owned() });
        }
    }
    // Typed: fields the spec does not define are skipped (serde's `IgnoredAny`), never
    // built into a tree, so a header's memory stays close to its size.
    let info: TensorInfo = match serde_json::from_str(value.get()) {
        Ok(info) => info,
        Err(e) => return Err(ErrorKind::BadTensorEntry { tensor: name, message: e.to_string() }),
    };
    let (begin, end) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
    if end < begin {
        return Err(ErrorKind::OffsetsReversed { tensor: name, data_begin: begin, data_end: end });
    }
    let shape: Vec<u64> = info.shape.iter().map(|&d| d as u64).collect();
    let bits = shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .and_then(|n| n.checked_mul(info.dtype.bitsize() as u64));
    let Some(bits) = bits else {
        return Err(ErrorKind::ShapeOverflow { tensor: name, shape });
    };
    if bits % 8 != 0 {
        return Err(ErrorKind::PartialByte { tensor: name, bits });
    }
    if bits / 8 != end - begin {
        return Err(ErrorKind::SizeMismatch {
            tensor: name,
            dtype: info.dtype.to_string(),
            shape,
            expected_bytes: bits / 8,
            data_bytes: end - begin,
        });
    }
    let tensor = HeaderTensor { name, dtype: info.dtype, shape, offset: begin, len: end - begin };
    Ok((tensor, begin, end))
}

/// Checks that the tensors, sorted by offset, tile the data section exactly, and makes their
/// offsets absolute.
fn check_layout(
    sorted: Vec<Entry>,
    data_offset: u64,
    data_len: u64,
    file_len: u64,
) -> Result<Vec<HeaderTensor>, ErrorKind> {
    let mut expected_begin = 0u64;
    let mut previous: Option<String> = None;
    let mut tensors = Vec::with_capacity(sorted.len());
    for (mut tensor, begin, end) in sorted {
        if begin < expected_begin {
            return Err(ErrorKind::Overlap {
                tensor: tensor.name,
                data_begin: begin,
                previous: previous.unwrap_or_default(),
                previous_end: expected_begin,
            });
        }
        if begin > expected_begin {
            return Err(ErrorKind::Gap { tensor: tensor.name, data_begin: begin, expected_begin });
        }
        if end > data_len {
            return Err(ErrorKind::PastEnd {
                tensor: tensor.name,
                data_end: end,
                data_len,
                file_len,
            });
        }
        expected_begin = end;
        tensor.offset = data_offset + begin;
        previous = Some(tensor.name.clone());
        tensors.push(tensor);
    }
    if expected_begin != data_len {
        return Err(ErrorKind::TrailingBytes { data_used: expected_begin, data_len });
    }
    Ok(tensors)
}

/// Parses a JSON object into its entries in order, keeping duplicates so they can be reported.
/// Each value is kept as its raw JSON text (a slice of `text`, nothing copied) to be parsed
/// into its own type by the caller.
pub(crate) fn parse_entries(text: &str) -> Result<Vec<(String, &RawValue)>, String> {
    let mut de = serde_json::Deserializer::from_str(text);
    let entries = (&mut de).deserialize_map(EntriesVisitor).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(entries)
}

struct EntriesVisitor;

impl<'de> Visitor<'de> for EntriesVisitor {
    type Value = Vec<(String, &'de RawValue)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(4096));
        while let Some(entry) = map.next_entry::<String, &'de RawValue>()? {
            entries.push(entry);
        }
        Ok(entries)
    }
}
