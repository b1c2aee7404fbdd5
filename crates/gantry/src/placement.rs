//! Placement across several destinations (GPUs, or host shards): every tensor to every
//! destination (replicated), or a slice of it along one dimension to each (tensor-parallel
//! sharding), or skipped. Pure: no I/O, no `unsafe`.
//!
//! A slice along dimension 0 is one contiguous run of the tensor's bytes, so only those bytes
//! are read. A slice along another dimension is one run per index of the dimensions before it
//! (one per row, for a matrix split by columns): the whole extent is read once and split on
//! the host side. When several destinations want bytes of the same range, the range is read
//! once: [`Layout::new`] cuts every wanted range at every boundary into disjoint *atoms*, each
//! read once and copied to every destination that wants it.

use std::collections::BTreeMap;

use gantry_format::{Checkpoint, Dtype, FileId, TensorEntry};

use crate::error::{Error, Result};

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
    let size = *entry.shape.get(dim).ok_or_else(|| {
        Error::Config(format!(
            "tensor '{}' of shape {:?} has no dimension {dim} to split",
            entry.name, entry.shape
        ))
    })?;
    if parts == 0 || size % parts != 0 || index >= parts {
        return Err(Error::Config(format!(
            "tensor '{}': dimension {dim} of size {size} does not split into {parts} equal parts",
            entry.name
        )));
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

/// One contiguous run of a tensor's share: `len` bytes at absolute file offset `offset`, which
/// land at `dest` bytes into the share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Absolute file offset.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Offset within the share's bytes.
    pub dest: u64,
}

fn element_bytes(entry: &TensorEntry) -> Result<u64> {
    let bits = entry.dtype.bitsize() as u64;
    if bits % 8 != 0 {
        return Err(Error::Config(format!(
            "tensor '{}': {} packs elements below a byte; it can only be placed whole",
            entry.name, entry.dtype
        )));
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

/// The runs of `entry`'s share, in destination order; an error for a slice outside the tensor.
pub fn runs(entry: &TensorEntry, share: Share) -> Result<Vec<Run>> {
    let Share::Slice(s) = share else {
        return Ok(vec![Run { offset: entry.offset, len: entry.len, dest: 0 }]);
    };
    let dims = &entry.shape;
    let Some(&size) = dims.get(s.dim) else {
        return Err(Error::Config(format!(
            "tensor '{}' of shape {dims:?} has no dimension {}",
            entry.name, s.dim
        )));
    };
    if s.start.checked_add(s.len).is_none_or(|end| end > size) {
        return Err(Error::Config(format!(
            "tensor '{}': slice {}..{} of dimension {} is outside its size {size}",
            entry.name,
            s.start,
            s.start.saturating_add(s.len),
            s.dim
        )));
    }
    let inner: u64 = dims[s.dim + 1..].iter().product::<u64>() * element_bytes(entry)?;
    let outer: u64 = dims[..s.dim].iter().product();
    let run_len = s.len * inner;
    if run_len == 0 || outer == 0 {
        return Ok(Vec::new());
    }
    Ok((0..outer)
        .map(|o| Run {
            offset: entry.offset + (o * size + s.start) * inner,
            len: run_len,
            dest: o * run_len,
        })
        .collect())
}

/// One destination's copy of an atom: which share, and where in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// The destination.
    pub device: usize,
    /// Position of the share in that destination's [`Layout::shares`].
    pub share: usize,
    /// Byte offset in the share.
    pub dest: u64,
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
    /// The atoms as a tensor table over the same files: disjoint byte ranges, each read once.
    pub atoms: Checkpoint,
    /// Per atom, every destination that takes its bytes.
    pub copies: Vec<Vec<Delivery>>,
    /// Per destination, its shares in checkpoint order.
    pub shares: Vec<Vec<ShareEntry>>,
    /// Per destination, the bytes its buffer needs.
    pub buffer_bytes: Vec<u64>,
}

/// Alignment of each share in a destination's buffer.
pub const SHARE_ALIGN: u64 = 256;

impl Layout {
    /// Lays out `devices` destinations: `place(tensor)` lists, for a tensor, which
    /// destinations get what of it (none: skipped).
    pub fn new(
        checkpoint: &Checkpoint,
        devices: usize,
        mut place: impl FnMut(&TensorEntry) -> Result<Vec<(usize, Share)>>,
    ) -> Result<Layout> {
        let mut shares: Vec<Vec<ShareEntry>> = vec![Vec::new(); devices];
        let mut buffer_bytes = vec![0u64; devices];
        // Per file: (start, end, copy) of every wanted run.
        let mut wanted: BTreeMap<usize, Vec<(u64, u64, Delivery)>> = BTreeMap::new();
        for (i, t) in checkpoint.tensors.iter().enumerate() {
            for (device, share) in place(t)? {
                if device >= devices {
                    return Err(Error::Config(format!(
                        "tensor '{}' placed on destination {device} of {devices}",
                        t.name
                    )));
                }
                if shares[device].last().is_some_and(|s| s.tensor == i) {
                    return Err(Error::Config(format!(
                        "tensor '{}' placed twice on destination {device}",
                        t.name
                    )));
                }
                let runs = runs(t, share)?;
                let len = match share {
                    Share::Whole => t.len,
                    Share::Slice(_) => runs.iter().map(|r| r.len).sum(),
                };
                let offset = buffer_bytes[device].next_multiple_of(SHARE_ALIGN);
                buffer_bytes[device] = offset + len;
                let share_index = shares[device].len();
                shares[device].push(ShareEntry {
                    tensor: i,
                    share,
                    shape: shape_of(t, share),
                    len,
                    offset,
                });
                for r in runs {
                    let copy = Delivery { device, share: share_index, dest: r.dest };
                    wanted.entry(t.file.0).or_default().push((r.offset, r.offset + r.len, copy));
                }
            }
        }
        let mut atoms = Vec::new();
        let mut copies = Vec::new();
        for (file, mut runs) in wanted {
            runs.sort_by_key(|&(s, e, _)| (s, e));
            let mut cuts: Vec<u64> = runs.iter().flat_map(|&(s, e, _)| [s, e]).collect();
            cuts.sort_unstable();
            cuts.dedup();
            // Sweep the cuts: each interval between two cuts that some run covers is an atom,
            // copied to every run covering it.
            let mut active: Vec<(u64, u64, Delivery)> = Vec::new();
            let mut next = 0;
            for w in cuts.windows(2) {
                let (a, b) = (w[0], w[1]);
                active.retain(|&(_, e, _)| e > a);
                while next < runs.len() && runs[next].0 <= a {
                    if runs[next].1 > a {
                        active.push(runs[next]);
                    }
                    next += 1;
                }
                if active.is_empty() {
                    continue;
                }
                atoms.push(TensorEntry {
                    name: format!("{}@{a}", checkpoint.files[file].path.display()),
                    dtype: Dtype::U8,
                    shape: vec![b - a],
                    file: FileId(file),
                    offset: a,
                    len: b - a,
                });
                copies.push(
                    active
                        .iter()
                        .map(|&(s, _, c)| Delivery { dest: c.dest + (a - s), ..c })
                        .collect(),
                );
            }
        }
        let atoms = Checkpoint {
            files: checkpoint.files.clone(),
            tensors: atoms,
            index_metadata: checkpoint.index_metadata.clone(),
        };
        Ok(Layout { atoms, copies, shares, buffer_bytes })
    }

    /// Bytes read from storage: the atoms' total.
    pub fn atom_bytes(&self) -> u64 {
        self.atoms.tensors.iter().map(|a| a.len).sum()
    }

    /// Per atom, every place its bytes go, with destination `d`'s buffer at address
    /// `bases[d]` (a host pointer or a device address).
    pub fn places(&self, bases: &[u64]) -> Vec<Vec<Place>> {
        assert_eq!(bases.len(), self.shares.len(), "one base per destination");
        self.copies
            .iter()
            .zip(&self.atoms.tensors)
            .map(|(copies, atom)| {
                copies
                    .iter()
                    .map(|c| {
                        let share = &self.shares[c.device][c.share];
                        debug_assert!(c.dest + atom.len <= share.len);
                        Place {
                            destination: c.device,
                            addr: bases[c.device] + share.offset + c.dest,
                            len: atom.len,
                        }
                    })
                    .collect()
            })
            .collect()
    }
}

/// Where one tensor's (or atom's) bytes go: `len` bytes at address `addr` of destination
/// `destination`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// Position of the destination (a GPU of a sink's device list, a host buffer).
    pub destination: usize,
    /// Address of the first byte there: a host pointer or a device address.
    pub addr: u64,
    /// Bytes available there.
    pub len: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn runs_of_slices() {
        let t = entry(&[4, 6], Dtype::F32, 1000); // rows of 24 bytes
        let whole = runs(&t, Share::Whole).unwrap();
        assert_eq!(whole, vec![Run { offset: 1000, len: 96, dest: 0 }]);
        let rows = runs(&t, Share::Slice(Slice { dim: 0, start: 2, len: 2 })).unwrap();
        assert_eq!(rows, vec![Run { offset: 1048, len: 48, dest: 0 }]);
        let cols = runs(&t, Share::Slice(Slice { dim: 1, start: 3, len: 3 })).unwrap();
        let want: Vec<Run> =
            (0..4).map(|r| Run { offset: 1000 + r * 24 + 12, len: 12, dest: r * 12 }).collect();
        assert_eq!(cols, want);
        assert!(runs(&t, Share::Slice(Slice { dim: 2, start: 0, len: 1 })).is_err());
        assert!(runs(&t, Share::Slice(Slice { dim: 1, start: 5, len: 2 })).is_err());
        assert!(runs(&t, Share::Slice(Slice { dim: 0, start: u64::MAX, len: 2 })).is_err());
        let f4 = entry(&[4, 8], Dtype::F4, 0);
        assert!(runs(&f4, Share::Slice(Slice { dim: 0, start: 0, len: 2 })).is_err());
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
        let mut end = 0;
        for (a, copies) in layout.atoms.tensors.iter().zip(&layout.copies) {
            assert!(a.offset >= end, "atoms overlap");
            end = a.offset + a.len;
            assert_eq!(copies.len(), 2, "whole + one half");
            assert!(copies.iter().any(|c| c.device == 0 && c.dest == a.offset));
        }
        assert_eq!(layout.buffer_bytes, vec![96, 48, 48]);
        assert!(Layout::new(&checkpoint, 1, |_| Ok(vec![(1, Share::Whole)])).is_err());
        assert!(Layout::new(&checkpoint, 1, |_| Ok(vec![(0, Share::Whole), (0, Share::Whole)]))
            .is_err());
    }
}
