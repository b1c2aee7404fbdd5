//! Placement across several destinations (GPUs, or host shards): every tensor to every
//! destination (replicated), or a slice of it along one dimension to each (tensor-parallel
//! sharding), or skipped. Pure: no I/O, no `unsafe`.
//!
//! A share is described by [`Rows`]: a slice along dimension 0 (or a whole tensor) is one
//! contiguous run of the tensor's bytes, so only those bytes are read; a slice along another
//! dimension is one strided pattern (one row per index of the dimensions before it), read as
//! the span from its first row to its last and copied with one 2-D copy per staged extent.
//! When several destinations want bytes of the same range, the range is read once:
//! [`Layout::new`] merges overlapping spans into disjoint *atoms*, each read once and copied
//! to every destination that wants part of it. Atoms, deliveries and copies are counted in
//! tensors and destinations, never in rows, so planning a tensor-parallel load of an
//! 8-billion-parameter model takes milliseconds.
//!
//! [`TensorParallel`] is the tensor-parallel rule by tensor names (`tp:N`); [`ShardSpec`] parses the
//! rules users type and bounds their destinations ([`DESTINATIONS_MAX`]).

mod rows;
mod spec;
pub(crate) mod tp;

use std::collections::BTreeMap;

use gantry_format::{Checkpoint, FileId, TensorEntry};

use crate::error::{Error, Result};
use crate::plan::FileRange;
pub use rows::{Piece, Rows};
pub use spec::{
    check_destinations, parse_tp_rule, Placement, ShardRule, ShardSpec, DESTINATIONS_MAX,
};
pub use tp::{tensor_parallel, Split, TensorParallel, DEFAULT_RULES};

/// A slice of a tensor along one dimension: indices `start..start + len` of dimension `dim`,
/// everything of the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    /// The dimension cut.
    pub dim: usize,
    /// First index kept.
    pub start: u64,
    /// Indices kept.
    pub len: u64,
}

/// What one destination gets of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// The whole tensor.
    Whole,
    /// A slice of it.
    Slice(Slice),
}

/// Part `index` of `parts` equal slices of dimension `dim` (the common tensor-parallel split);
/// an error unless `parts` divides that dimension.
pub fn even(entry: &TensorEntry, dim: usize, parts: u64, index: u64) -> Result<Slice> {
    let size = *entry
        .shape
        .get(dim)
        .ok_or_else(|| Error::placement(entry, format!("it has no dimension {dim} to split")))?;
    if parts == 0 || size % parts != 0 || index >= parts {
        return Err(Error::placement(
            entry,
            format!("dimension {dim} of size {size} does not split into {parts} equal parts"),
        ));
    }
    let len = size / parts;
    Ok(Slice { dim, start: index * len, len })
}

/// The common tensor-parallel placement over `parts` destinations: a tensor of two or more
/// dimensions is split evenly along `dim` where `parts` divides that dimension; everything
/// else (every tensor when `dim` is `None`) goes whole to each destination.
pub fn split(entry: &TensorEntry, dim: Option<usize>, parts: usize) -> Result<Vec<(usize, Share)>> {
    let cut = dim.filter(|&d| {
        entry.shape.len() >= 2
            && entry.shape.get(d).is_some_and(|&n| parts > 0 && n % parts as u64 == 0)
    });
    (0..parts)
        .map(|r| match cut {
            Some(d) => Ok((r, Share::Slice(even(entry, d, parts as u64, r as u64)?))),
            None => Ok((r, Share::Whole)),
        })
        .collect()
}

fn element_bytes(entry: &TensorEntry) -> Result<u64> {
    let bits = entry.dtype.bitsize() as u64;
    if bits % 8 != 0 {
        return Err(Error::placement(
            entry,
            format!("{} packs elements below a byte; it can only be placed whole", entry.dtype),
        ));
    }
    Ok(bits / 8)
}

/// The shape of `entry`'s share.
pub fn shape_of(entry: &TensorEntry, share: Share) -> Vec<u64> {
    let mut shape = entry.shape.clone();
    if let Share::Slice(s) = share {
        shape[s.dim] = s.len;
    }
    shape
}

/// Where `entry`'s share lies in its file: rows at absolute file offsets, in destination
/// order (one row for a whole tensor or a slice along dimension 0); an error for a slice
/// outside the tensor.
pub fn rows_of(entry: &TensorEntry, share: Share) -> Result<Rows> {
    let Share::Slice(s) = share else {
        return Ok(Rows::contiguous(entry.offset, entry.len));
    };
    let dims = &entry.shape;
    let Some(&size) = dims.get(s.dim) else {
        return Err(Error::placement(entry, format!("it has no dimension {}", s.dim)));
    };
    if s.start.checked_add(s.len).is_none_or(|end| end > size) {
        return Err(Error::placement(
            entry,
            format!(
                "slice {}..{} of dimension {} is outside its size {size}",
                s.start,
                s.start.saturating_add(s.len),
                s.dim
            ),
        ));
    }
    let inner: u64 = dims[s.dim + 1..].iter().product::<u64>() * element_bytes(entry)?;
    let outer: u64 = dims[..s.dim].iter().product();
    let (width, pitch) = (s.len * inner, size * inner);
    if width == 0 || outer == 0 {
        return Ok(Rows::contiguous(entry.offset, 0));
    }
    Ok(Rows::strided(entry.offset + s.start * inner, width, pitch, outer))
}

/// One destination's copy out of an atom: which share, and which rows of the atom's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// The destination.
    pub device: usize,
    /// Position of the share in that destination's [`Layout::shares`].
    pub share: usize,
    /// The share's rows, as offsets into the atom (the share's first byte at the first row).
    pub rows: Rows,
}

/// One tensor's share at one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareEntry {
    /// The tensor's position in the checkpoint.
    pub tensor: usize,
    /// What of it.
    pub share: Share,
    /// The share's shape.
    pub shape: Vec<u64>,
    /// Its bytes.
    pub len: u64,
    /// Its offset in the destination's buffer (shares are packed, each 256-byte aligned).
    pub offset: u64,
}

/// The reads and copies of a placed load.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The atoms: disjoint byte ranges of the checkpoint's files, each read once.
    pub atoms: Vec<FileRange>,
    /// Per atom, every destination that takes bytes of it.
    pub copies: Vec<Vec<Delivery>>,
    /// Per destination, its shares in checkpoint order.
    pub shares: Vec<Vec<ShareEntry>>,
    /// Per destination, the bytes its buffer needs.
    pub buffer_bytes: Vec<u64>,
}

/// Alignment of each share in a destination's buffer.
pub const SHARE_ALIGN: u64 = 256;

/// One wanted share in a file: its span `start..end` and where its rows go.
type Wanted = (u64, u64, usize, usize, Rows);

impl Layout {
    /// Lays out `devices` destinations (1 to [`DESTINATIONS_MAX`]): `place(tensor)` lists, for
    /// a tensor, which destinations get what of it (none: skipped).
    pub fn new(
        checkpoint: &Checkpoint,
        devices: usize,
        mut place: impl FnMut(&TensorEntry) -> Result<Vec<(usize, Share)>>,
    ) -> Result<Layout> {
        check_destinations("placed load", devices)?;
        let mut shares: Vec<Vec<ShareEntry>> = vec![Vec::new(); devices];
        let mut buffer_bytes = vec![0u64; devices];
        // Per file: every wanted share's span and rows (absolute file offsets).
        let mut wanted: BTreeMap<usize, Vec<Wanted>> = BTreeMap::new();
        for (i, t) in checkpoint.tensors.iter().enumerate() {
            for (device, share) in place(t)? {
                if device >= devices {
                    return Err(Error::placement(
                        t,
                        format!("placed on destination {device} of {devices}"),
                    ));
                }
                if shares[device].last().is_some_and(|s| s.tensor == i) {
                    return Err(Error::placement(
                        t,
                        format!("placed twice on destination {device}"),
                    ));
                }
                let rows = rows_of(t, share)?;
                let offset = buffer_bytes[device].next_multiple_of(SHARE_ALIGN);
                buffer_bytes[device] = offset + rows.len();
                let share_index = shares[device].len();
                shares[device].push(ShareEntry {
                    tensor: i,
                    share,
                    shape: shape_of(t, share),
                    len: rows.len(),
                    offset,
                });
                if !rows.is_empty() {
                    let span = (rows.first, rows.end());
                    wanted.entry(t.file.0).or_default().push((
                        span.0,
                        span.1,
                        device,
                        share_index,
                        rows,
                    ));
                }
            }
        }
        let (mut atoms, mut copies) = (Vec::new(), Vec::new());
        for (file, spans) in wanted {
            merge_spans(file, spans, &mut atoms, &mut copies);
        }
        Ok(Layout { atoms, copies, shares, buffer_bytes })
    }

    /// Bytes read from storage: the atoms' total.
    pub fn atom_bytes(&self) -> u64 {
        self.atoms.iter().map(|a| a.len).sum()
    }

    /// Per atom, every place its bytes go, with destination `d`'s buffer at address
    /// `bases[d]` (a host pointer or a device address).
    pub fn places(&self, bases: &[u64]) -> Vec<Vec<Place>> {
        assert_eq!(bases.len(), self.shares.len(), "one base per destination");
        self.copies
            .iter()
            .zip(&self.atoms)
            .map(|(copies, atom)| {
                copies
                    .iter()
                    .map(|c| {
                        let share = &self.shares[c.device][c.share];
                        debug_assert!(c.rows.len() == share.len && c.rows.end() <= atom.len);
                        Place {
                            destination: c.device,
                            addr: bases[c.device] + share.offset,
                            rows: c.rows,
                        }
                    })
                    .collect()
            })
            .collect()
    }
}

/// Merges the wanted spans of one file into atoms: spans that overlap share an atom (read
/// once), spans that only touch do not (so a rank's rows of a tensor split along dimension 0
/// stay their own atom).
fn merge_spans(
    file: usize,
    mut spans: Vec<Wanted>,
    atoms: &mut Vec<FileRange>,
    copies: &mut Vec<Vec<Delivery>>,
) {
    spans.sort_by_key(|&(s, e, ..)| (s, e));
    let mut i = 0;
    while i < spans.len() {
        let (start, mut end) = (spans[i].0, spans[i].1);
        let mut j = i + 1;
        while j < spans.len() && spans[j].0 < end {
            end = end.max(spans[j].1);
            j += 1;
        }
        atoms.push(FileRange { file: FileId(file), offset: start, len: end - start });
        copies.push(
            spans[i..j]
                .iter()
                .map(|&(_, _, device, share, rows)| Delivery {
                    device,
                    share,
                    rows: rows.shifted_back(start),
                })
                .collect(),
        );
        i = j;
    }
}

/// Where a tensor's (or atom's) bytes go: `rows` of its bytes, packed from address `addr` of
/// destination `destination`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// Position of the destination (a GPU of a sink's device list, a host buffer).
    pub destination: usize,
    /// Address there of the first row's first byte: a host pointer or a device address.
    pub addr: u64,
    /// Which bytes of the source, in rows.
    pub rows: Rows,
}

impl Place {
    /// The whole of a `len`-byte source to `addr`.
    pub fn whole(destination: usize, addr: u64, len: u64) -> Self {
        Place { destination, addr, rows: Rows::contiguous(0, len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_format::Dtype;
    use std::path::PathBuf;

    fn entry(shape: &[u64], dtype: Dtype, offset: u64) -> TensorEntry {
        let len = shape.iter().product::<u64>() * dtype.bitsize() as u64 / 8;
        TensorEntry { name: "w".into(), dtype, shape: shape.to_vec(), file: FileId(0), offset, len }
    }

    #[test]
    fn split_divides_where_it_can_and_replicates_the_rest() {
        let m = entry(&[6, 4], Dtype::F32, 0);
        let slice = |dim, start, len| Share::Slice(Slice { dim, start, len });
        assert_eq!(
            split(&m, Some(0), 3).unwrap(),
            vec![(0, slice(0, 0, 2)), (1, slice(0, 2, 2)), (2, slice(0, 4, 2))]
        );
        assert_eq!(split(&m, Some(1), 2).unwrap(), vec![(0, slice(1, 0, 2)), (1, slice(1, 2, 2))]);
        // 4 columns do not split in 3; 1-D tensors and dimensions past the shape go whole.
        let whole = |n| (0..n).map(|d| (d, Share::Whole)).collect::<Vec<_>>();
        assert_eq!(split(&m, Some(1), 3).unwrap(), whole(3));
        assert_eq!(split(&entry(&[8], Dtype::F32, 0), Some(0), 2).unwrap(), whole(2));
        assert_eq!(split(&m, Some(5), 2).unwrap(), whole(2));
        assert_eq!(split(&m, None, 4).unwrap(), whole(4));
        assert!(split(&m, Some(0), 0).unwrap().is_empty());
    }

    #[test]
    fn rows_of_slices() {
        let t = entry(&[4, 6], Dtype::F32, 1000); // rows of 24 bytes
        assert_eq!(rows_of(&t, Share::Whole).unwrap(), Rows::contiguous(1000, 96));
        let rows = rows_of(&t, Share::Slice(Slice { dim: 0, start: 2, len: 2 })).unwrap();
        assert_eq!(rows, Rows::contiguous(1048, 48));
        let cols = rows_of(&t, Share::Slice(Slice { dim: 1, start: 3, len: 3 })).unwrap();
        assert_eq!(cols, Rows { first: 1012, width: 12, pitch: 24, count: 4 });
        // A 3-D tensor: dimension 1 is rows of whole last-dimension runs, dimension 2 a row
        // per index of the first two.
        let cube = entry(&[2, 3, 4], Dtype::BF16, 0);
        let mid = rows_of(&cube, Share::Slice(Slice { dim: 1, start: 1, len: 2 })).unwrap();
        assert_eq!(mid, Rows { first: 8, width: 16, pitch: 24, count: 2 });
        let last = rows_of(&cube, Share::Slice(Slice { dim: 2, start: 2, len: 2 })).unwrap();
        assert_eq!(last, Rows { first: 4, width: 4, pitch: 8, count: 6 });
        assert!(rows_of(&t, Share::Slice(Slice { dim: 2, start: 0, len: 1 })).is_err());
        assert!(rows_of(&t, Share::Slice(Slice { dim: 1, start: 5, len: 2 })).is_err());
        assert!(rows_of(&t, Share::Slice(Slice { dim: 0, start: u64::MAX, len: 2 })).is_err());
        let f4 = entry(&[4, 8], Dtype::F4, 0);
        assert!(rows_of(&f4, Share::Slice(Slice { dim: 0, start: 0, len: 2 })).is_err());
        assert_eq!(even(&t, 1, 3, 2).unwrap(), Slice { dim: 1, start: 4, len: 2 });
        assert!(even(&t, 1, 4, 0).is_err());
        assert_eq!(shape_of(&t, Share::Slice(Slice { dim: 1, start: 0, len: 2 })), vec![4, 2]);
    }

    #[test]
    fn atoms_are_disjoint_and_read_once() {
        let t = entry(&[4, 6], Dtype::F32, 0);
        let checkpoint = Checkpoint {
            files: vec![gantry_format::FileInfo {
                path: PathBuf::from("m.safetensors"),
                file_len: 96,
                header: gantry_format::Header {
                    header_len: 0,
                    data_offset: 0,
                    data_len: 96,
                    metadata: None,
                    tensors: Vec::new(),
                },
                identity: None,
                version: None,
            }],
            tensors: vec![t],
            index_metadata: Default::default(),
        };
        // Destination 0 takes the whole tensor, 1 and 2 the two column halves.
        let layout = Layout::new(&checkpoint, 3, |t| {
            Ok(vec![
                (0, Share::Whole),
                (1, Share::Slice(even(t, 1, 2, 0)?)),
                (2, Share::Slice(even(t, 1, 2, 1)?)),
            ])
        })
        .unwrap();
        assert_eq!(layout.atom_bytes(), 96, "every byte read once");
        assert_eq!(layout.atoms.len(), 1, "overlapping spans share one atom");
        let mut rows: Vec<(usize, Rows)> =
            layout.copies[0].iter().map(|c| (c.device, c.rows)).collect();
        rows.sort_by_key(|r| r.0);
        assert_eq!(
            rows,
            vec![
                (0, Rows::contiguous(0, 96)),
                (1, Rows { first: 0, width: 12, pitch: 24, count: 4 }),
                (2, Rows { first: 12, width: 12, pitch: 24, count: 4 }),
            ]
        );
        assert_eq!(layout.buffer_bytes, vec![96, 48, 48]);
        // Rows split along dimension 0 touch but do not overlap: one atom per rank.
        let rows = Layout::new(&checkpoint, 2, |t| {
            Ok((0..2).map(|r| (r, Share::Slice(even(t, 0, 2, r as u64).unwrap()))).collect())
        })
        .unwrap();
        assert_eq!(rows.atoms.len(), 2);
        assert_eq!(rows.atom_bytes(), 96);
        assert!(Layout::new(&checkpoint, 1, |_| Ok(vec![(1, Share::Whole)])).is_err());
        assert!(Layout::new(&checkpoint, 1, |_| Ok(vec![(0, Share::Whole), (0, Share::Whole)]))
            .is_err());
    }
}
