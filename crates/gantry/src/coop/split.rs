//! Which rank reads what, and in which order the ranks exchange it. Pure: no I/O, no
//! `unsafe`, the same answer on every rank from the same inputs, so that every rank issues
//! the same collectives in the same order without talking about it.
//!
//! Each file's wanted bytes are cut into *pieces*: runs of whole tensors up to `piece_bytes`,
//! a tensor larger than that alone in pieces of its own (cut at MiB multiples, so reads stay
//! aligned). Each piece is read from storage by exactly one rank, its *owner*, and broadcast
//! from there to the others.
//!
//! Owners are chosen so that the ranks read about the same number of bytes and storage that
//! is fast only in aggregate is read side by side: every volume gets its own ranks where there
//! are enough (files on different volumes go to different ranks), and the pieces of a volume
//! shared by several ranks go to whichever of them has read the least so far, so neighbouring
//! pieces go to different ranks and the volume is read front to back by all of them together.
//! A last pass moves pieces from the most loaded rank to the least loaded while that lowers the
//! maximum, so the ranks stay balanced within one piece whatever the volumes hold.
//!
//! The exchange runs in *rounds*: round `k` holds the `k`-th piece of every rank, in the order
//! its own reads are issued (files interleaved by progress, as the readers interleave them).
//! A rank issues round `k` once its own piece of round `k` has landed, so reading the next
//! pieces overlaps the exchange of this one, and a round is also where the ranks learn whether
//! any of them failed.

use gantry_format::Checkpoint;

use crate::plan::interleave::{interleave, Read};

/// Largest piece by default: the size of one large read, so a piece is a handful of requests.
pub const PIECE_BYTES: u64 = 64 << 20;

/// Granularity at which a tensor larger than a piece is cut.
const CUT_ALIGN: u64 = 1 << 20;

/// One byte range read by one rank and broadcast to the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// The file (position in the checkpoint's files).
    pub file: usize,
    /// Absolute file offset of the first byte.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// The rank that reads it.
    pub owner: usize,
    /// The tensors it covers, all or in part (positions in the checkpoint's table).
    pub tensors: std::ops::Range<usize>,
}

/// The split of a cooperative load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    /// Every piece, by file, then offset.
    pub pieces: Vec<Piece>,
    /// Per round, its pieces (positions in `pieces`) in rank order: the collectives of a
    /// round are issued in this order on every rank.
    pub rounds: Vec<Vec<usize>>,
    /// Bytes each rank reads.
    pub rank_bytes: Vec<u64>,
}

impl Split {
    /// Cuts the `wanted` tensors of `checkpoint` into pieces of at most `piece_bytes` and
    /// shares them between `world` ranks; file `f` lies on volume `volume_of[f]` (any numbers;
    /// equal numbers mean the same volume).
    pub fn new(
        checkpoint: &Checkpoint,
        wanted: &[bool],
        volume_of: &[usize],
        world: usize,
        piece_bytes: u64,
    ) -> Split {
        assert_eq!(volume_of.len(), checkpoint.files.len());
        let mut pieces = cut(checkpoint, wanted, world, piece_bytes);
        let mut rank_bytes = assign(&mut pieces, volume_of, world);
        balance(&mut pieces, &mut rank_bytes);
        let rounds = rounds(&pieces, world);
        Split { pieces, rounds, rank_bytes }
    }

    /// [`Split::new`] with every file's pieces owned by one rank: for loads that hash each
    /// file (`verify_sha256`), since SHA-256 takes a file's bytes in order in one place. Each
    /// byte is still read once across the ranks (the owner reads its files whole, hashing them,
    /// and broadcasts their pieces); files go largest first to the rank with the fewest bytes so
    /// far (the lowest on a tie), so ranks stay balanced within one file. A checkpoint of fewer
    /// files than ranks leaves ranks without reads: hashing one file is one core's work anyway.
    pub fn whole_files(
        checkpoint: &Checkpoint,
        wanted: &[bool],
        world: usize,
        piece_bytes: u64,
    ) -> Split {
        let mut pieces = cut(checkpoint, wanted, world, piece_bytes);
        let mut file_bytes = vec![0u64; checkpoint.files.len()];
        for p in &pieces {
            file_bytes[p.file] += p.len;
        }
        let mut order: Vec<usize> = (0..file_bytes.len()).filter(|&f| file_bytes[f] > 0).collect();
        order.sort_by_key(|&f| (std::cmp::Reverse(file_bytes[f]), f));
        let mut rank_bytes = vec![0u64; world];
        let mut owner = vec![0usize; file_bytes.len()];
        for f in order {
            let r = (0..world).min_by_key(|&r| (rank_bytes[r], r)).unwrap_or(0);
            owner[f] = r;
            rank_bytes[r] += file_bytes[f];
        }
        for p in &mut pieces {
            p.owner = owner[p.file];
        }
        let rounds = rounds(&pieces, world);
        Split { pieces, rounds, rank_bytes }
    }

    /// The pieces rank `rank` reads.
    #[cfg(test)]
    pub fn owned_by(&self, rank: usize) -> impl Iterator<Item = (usize, &Piece)> {
        self.pieces.iter().enumerate().filter(move |(_, p)| p.owner == rank)
    }

    /// Bytes of all pieces.
    #[cfg(test)]
    pub fn total_bytes(&self) -> u64 {
        self.pieces.iter().map(|p| p.len).sum()
    }
}

/// Cuts each file's wanted tensors (with bytes) into pieces for `world` ranks, owner unset:
/// consecutive, adjacent tensors up to `piece_bytes` together, a larger tensor in pieces of
/// its own.
fn cut(checkpoint: &Checkpoint, wanted: &[bool], world: usize, piece_bytes: u64) -> Vec<Piece> {
    assert!(world > 0, "a split needs a rank");
    assert!(piece_bytes > 0, "pieces need bytes");
    assert_eq!(wanted.len(), checkpoint.tensors.len());
    let mut pieces: Vec<Piece> = Vec::new();
    let mut open = false; // whether the last piece may still grow
    for (i, t) in checkpoint.tensors.iter().enumerate() {
        if !wanted[i] || t.len == 0 {
            open = false;
            continue;
        }
        if let Some(last) = pieces.last_mut().filter(|_| open) {
            let adjacent = last.file == t.file.0 && last.offset + last.len == t.offset;
            if adjacent && last.len + t.len <= piece_bytes {
                last.len += t.len;
                last.tensors.end = i + 1;
                continue;
            }
        }
        let parts = t.len.div_ceil(piece_bytes);
        let part_len = t.len.div_ceil(parts).next_multiple_of(CUT_ALIGN).min(t.len);
        let mut start = 0;
        while start < t.len {
            let len = part_len.min(t.len - start);
            pieces.push(Piece {
                file: t.file.0,
                offset: t.offset + start,
                len,
                owner: 0,
                tensors: i..i + 1,
            });
            start += len;
        }
        open = parts == 1;
    }
    pieces
}

/// Gives every piece an owner: each volume its own ranks (ranks `r` with `r % volumes == v`
/// when there are at least as many ranks as volumes; else whole volumes to ranks, largest
/// first to the least loaded), each piece to the least loaded of its volume's ranks (the
/// lowest rank on a tie). Returns the bytes per rank.
fn assign(pieces: &mut [Piece], volume_of: &[usize], world: usize) -> Vec<u64> {
    let mut ids: Vec<usize> = volume_of.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let volume = |file: usize| ids.binary_search(&volume_of[file]).expect("listed");
    let mut volume_bytes = vec![0u64; ids.len()];
    for p in pieces.iter() {
        volume_bytes[volume(p.file)] += p.len;
    }
    // Ranks of each volume.
    let mut ranks: Vec<Vec<usize>> = vec![Vec::new(); ids.len()];
    if world >= ids.len() {
        for r in 0..world {
            ranks[r % ids.len()].push(r);
        }
    } else {
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&v| (std::cmp::Reverse(volume_bytes[v]), v));
        let mut load = vec![0u64; world];
        for v in order {
            let r = (0..world).min_by_key(|&r| (load[r], r)).expect("a rank");
            load[r] += volume_bytes[v];
            ranks[v].push(r);
        }
    }
    let mut rank_bytes = vec![0u64; world];
    for p in pieces.iter_mut() {
        let candidates = &ranks[volume(p.file)];
        let r = *candidates.iter().min_by_key(|&&r| (rank_bytes[r], r)).expect("a rank");
        p.owner = r;
        rank_bytes[r] += p.len;
    }
    rank_bytes
}

/// Moves pieces from the most loaded rank to the least loaded one while that lowers the
/// most loaded rank's bytes: the largest piece that fits under the difference goes first.
fn balance(pieces: &mut [Piece], rank_bytes: &mut [u64]) {
    loop {
        let max = (0..rank_bytes.len()).max_by_key(|&r| (rank_bytes[r], usize::MAX - r));
        let min = (0..rank_bytes.len()).min_by_key(|&r| (rank_bytes[r], r));
        let (Some(max), Some(min)) = (max, min) else { return };
        let gap = rank_bytes[max] - rank_bytes[min];
        // Moving `len` leaves max at `max - len` and min at `min + len`; both stay below the
        // old maximum when `len < gap`.
        let candidate = pieces
            .iter()
            .enumerate()
            .filter(|(_, p)| p.owner == max && p.len < gap)
            .max_by_key(|&(i, p)| (p.len, usize::MAX - i))
            .map(|(i, _)| i);
        let Some(i) = candidate else { return };
        pieces[i].owner = min;
        rank_bytes[max] -= pieces[i].len;
        rank_bytes[min] += pieces[i].len;
    }
}

/// Per round, the `k`-th piece of each rank that has one, in rank order; each rank's pieces in
/// the order its reads are issued (its files interleaved by progress, each front to back).
fn rounds(pieces: &[Piece], world: usize) -> Vec<Vec<usize>> {
    let mut per_rank: Vec<Vec<usize>> = Vec::with_capacity(world);
    for rank in 0..world {
        let mine: Vec<usize> = (0..pieces.len()).filter(|&i| pieces[i].owner == rank).collect();
        let files = pieces.iter().map(|p| p.file + 1).max().unwrap_or(0);
        let reads: Vec<Read> =
            mine.iter().map(|&i| Read { file: pieces[i].file, len: pieces[i].len }).collect();
        let order = interleave(&reads, &vec![0; files], 1).swap_remove(0);
        per_rank.push(order.into_iter().map(|k| mine[k]).collect());
    }
    let count = per_rank.iter().map(Vec::len).max().unwrap_or(0);
    (0..count).map(|k| per_rank.iter().filter_map(|list| list.get(k).copied()).collect()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_format::{Dtype, FileId, FileInfo, Header, TensorEntry};
    use std::path::PathBuf;

    /// A checkpoint of `files`, each a list of tensor sizes laid end to end from offset 8.
    fn checkpoint(files: &[&[u64]]) -> Checkpoint {
        let mut tensors = Vec::new();
        let mut infos = Vec::new();
        for (f, sizes) in files.iter().enumerate() {
            let mut offset = 8;
            for (k, &len) in sizes.iter().enumerate() {
                tensors.push(TensorEntry {
                    name: format!("f{f}.t{k}"),
                    dtype: Dtype::U8,
                    shape: vec![len],
                    file: FileId(f),
                    offset,
                    len,
                });
                offset += len;
            }
            infos.push(FileInfo {
                path: PathBuf::from(format!("model-{f}.safetensors")),
                file_len: offset,
                identity: None,
                version: None,
                header: Header {
                    header_len: 0,
                    data_offset: 8,
                    data_len: offset - 8,
                    metadata: None,
                    tensors: Vec::new(),
                },
            });
        }
        Checkpoint { files: infos, tensors, index_metadata: Default::default() }
    }

    const MIB: u64 = 1 << 20;

    /// Every wanted tensor byte is in exactly one piece, and nothing else is.
    fn check_exactly_once(c: &Checkpoint, wanted: &[bool], split: &Split) {
        let mut covered: Vec<Vec<(u64, u64)>> = vec![Vec::new(); c.files.len()];
        for p in &split.pieces {
            covered[p.file].push((p.offset, p.offset + p.len));
            for t in &c.tensors[p.tensors.clone()] {
                assert!(t.offset < p.offset + p.len && p.offset < t.offset + t.len);
            }
        }
        for (f, ranges) in covered.iter_mut().enumerate() {
            ranges.sort_unstable();
            let mut want: Vec<(u64, u64)> = c
                .tensors
                .iter()
                .zip(wanted)
                .filter(|(t, &w)| w && t.file.0 == f && t.len > 0)
                .map(|(t, _)| (t.offset, t.offset + t.len))
                .collect();
            // Merge adjacent ranges on both sides, then compare.
            let merge = |v: &mut Vec<(u64, u64)>| {
                let mut out: Vec<(u64, u64)> = Vec::new();
                for &(s, e) in v.iter() {
                    match out.last_mut() {
                        Some(last) if last.1 == s => last.1 = e,
                        Some(last) => {
                            assert!(last.1 < s, "overlap at {s}");
                            out.push((s, e));
                        }
                        None => out.push((s, e)),
                    }
                }
                *v = out;
            };
            merge(ranges);
            merge(&mut want);
            assert_eq!(*ranges, want, "file {f}");
        }
        let mut in_rounds: Vec<usize> = split.rounds.iter().flatten().copied().collect();
        in_rounds.sort_unstable();
        assert_eq!(in_rounds, (0..split.pieces.len()).collect::<Vec<_>>(), "each piece once");
        for round in &split.rounds {
            let owners: Vec<usize> = round.iter().map(|&i| split.pieces[i].owner).collect();
            assert!(owners.windows(2).all(|w| w[0] < w[1]), "one piece per rank, rank order");
        }
        let per_rank: Vec<u64> = (0..split.rank_bytes.len())
            .map(|r| split.owned_by(r).map(|(_, p)| p.len).sum())
            .collect();
        assert_eq!(per_rank, split.rank_bytes);
    }

    #[test]
    fn pieces_cover_every_wanted_byte_once_and_ranks_are_balanced() {
        // (files, world, piece bytes); the ranks may differ by at most the largest piece.
        let cases: &[(&[&[u64]], usize, u64)] = &[
            (&[&[MIB; 64]], 4, 4 * MIB),
            (&[&[3 * MIB, 5 * MIB, 1, 7 * MIB, 100 * MIB, 2]], 4, 16 * MIB),
            (&[&[10 * MIB; 7], &[3 * MIB; 11], &[1; 5]], 2, 8 * MIB),
            (&[&[MIB; 10], &[MIB; 10], &[MIB; 10]], 8, 2 * MIB),
            (&[&[0, 0, MIB]], 3, MIB),
            (&[&[]], 2, MIB),
            (&[&[5 * MIB]], 1, MIB),
        ];
        for (files, world, piece) in cases {
            let c = checkpoint(files);
            let wanted = vec![true; c.tensors.len()];
            let volumes = vec![0; c.files.len()];
            let split = Split::new(&c, &wanted, &volumes, *world, *piece);
            check_exactly_once(&c, &wanted, &split);
            let largest = split.pieces.iter().map(|p| p.len).max().unwrap_or(0);
            assert!(largest <= *piece, "{files:?}: piece of {largest} bytes");
            let (max, min) = (split.rank_bytes.iter().max(), split.rank_bytes.iter().min());
            assert!(max.unwrap() - min.unwrap() <= largest, "{files:?}: {:?}", split.rank_bytes);
            assert_eq!(split.total_bytes(), wanted_bytes(&c, &wanted));
        }
    }

    /// A split for hashed loads: each file read by one rank (SHA-256 needs its bytes in one
    /// place), every wanted byte still once, ranks balanced within the largest file.
    #[test]
    fn whole_files_go_to_one_rank_each_and_stay_balanced() {
        let cases: &[(&[&[u64]], usize)] = &[
            (&[&[MIB; 8], &[MIB; 8], &[MIB; 8], &[MIB; 8]], 4),
            (&[&[5 * MIB, 1], &[3 * MIB], &[2 * MIB], &[MIB; 3], &[7]], 2),
            (&[&[9 * MIB]], 3),
            (&[&[MIB; 2], &[MIB; 2]], 4),
            (&[&[]], 2),
        ];
        for (files, world) in cases {
            let c = checkpoint(files);
            let wanted = vec![true; c.tensors.len()];
            let split = Split::whole_files(&c, &wanted, *world, 2 * MIB);
            check_exactly_once(&c, &wanted, &split);
            let mut owner_of = vec![None; c.files.len()];
            for p in &split.pieces {
                let owner = *owner_of[p.file].get_or_insert(p.owner);
                assert_eq!(owner, p.owner, "{files:?}: file {} has two owners", p.file);
            }
            let largest = (0..c.files.len())
                .map(|f| c.tensors.iter().filter(|t| t.file.0 == f).map(|t| t.len).sum::<u64>())
                .max()
                .unwrap_or(0);
            let (max, min) = (split.rank_bytes.iter().max(), split.rank_bytes.iter().min());
            assert!(max.unwrap() - min.unwrap() <= largest, "{files:?}: {:?}", split.rank_bytes);
            let again = Split::whole_files(&c, &wanted, *world, 2 * MIB);
            assert_eq!(split, again, "the same split on every rank");
        }
    }

    fn wanted_bytes(c: &Checkpoint, wanted: &[bool]) -> u64 {
        c.tensors.iter().zip(wanted).filter(|(_, &w)| w).map(|(t, _)| t.len).sum()
    }

    #[test]
    fn skipped_tensors_split_pieces_and_are_not_read() {
        let c = checkpoint(&[&[MIB, MIB, MIB, MIB]]);
        let wanted = [true, false, true, true];
        let split = Split::new(&c, &wanted, &[0], 2, 8 * MIB);
        check_exactly_once(&c, &wanted, &split);
        let ranges: Vec<(u64, u64)> = split.pieces.iter().map(|p| (p.offset, p.len)).collect();
        assert_eq!(ranges, vec![(8, MIB), (8 + 2 * MIB, 2 * MIB)]);
    }

    #[test]
    fn large_tensors_are_cut_at_mib_multiples() {
        let c = checkpoint(&[&[10 * MIB + 5]]);
        let split = Split::new(&c, &[true], &[0], 3, 4 * MIB);
        let lens: Vec<u64> = split.pieces.iter().map(|p| p.len).collect();
        assert_eq!(lens, vec![4 * MIB, 4 * MIB, 2 * MIB + 5]);
        assert!(split.pieces.iter().all(|p| p.tensors == (0..1)));
        let owners: Vec<usize> = split.pieces.iter().map(|p| p.owner).collect();
        assert_eq!(owners, vec![0, 1, 2]);
    }

    #[test]
    fn files_on_different_volumes_go_to_different_ranks() {
        // Four equal files on four volumes, four ranks: one volume each.
        let c = checkpoint(&[&[MIB; 8], &[MIB; 8], &[MIB; 8], &[MIB; 8]]);
        let wanted = vec![true; c.tensors.len()];
        let split = Split::new(&c, &wanted, &[10, 11, 12, 13], 4, 2 * MIB);
        check_exactly_once(&c, &wanted, &split);
        for (f, _) in c.files.iter().enumerate() {
            let owners: Vec<usize> =
                split.pieces.iter().filter(|p| p.file == f).map(|p| p.owner).collect();
            assert!(owners.iter().all(|&o| o == f), "file {f}: {owners:?}");
        }
        // Two volumes, four ranks: two ranks per volume, never reading the other volume.
        let split = Split::new(&c, &wanted, &[0, 0, 1, 1], 4, 2 * MIB);
        for p in &split.pieces {
            assert_eq!(p.owner % 2, p.file / 2, "{p:?}");
        }
        // Four volumes, two ranks: whole volumes per rank.
        let split = Split::new(&c, &wanted, &[0, 1, 2, 3], 2, 2 * MIB);
        for f in 0..4 {
            let owners: Vec<usize> =
                split.pieces.iter().filter(|p| p.file == f).map(|p| p.owner).collect();
            assert!(owners.windows(2).all(|w| w[0] == w[1]), "file {f} split: {owners:?}");
        }
        assert_eq!(split.rank_bytes, vec![16 * MIB, 16 * MIB]);
        // Unequal volumes still balance: the big volume's pieces move to idle ranks.
        let c = checkpoint(&[&[MIB; 30], &[MIB; 2]]);
        let wanted = vec![true; c.tensors.len()];
        let split = Split::new(&c, &wanted, &[0, 1], 2, MIB);
        check_exactly_once(&c, &wanted, &split);
        assert_eq!(split.rank_bytes, vec![16 * MIB, 16 * MIB]);
    }

    #[test]
    fn rounds_interleave_a_ranks_files_and_are_the_same_every_time() {
        let c = checkpoint(&[&[MIB; 4], &[MIB; 2]]);
        let wanted = vec![true; c.tensors.len()];
        let split = Split::new(&c, &wanted, &[0, 0], 1, MIB);
        let order: Vec<(usize, u64)> = split
            .rounds
            .iter()
            .map(|r| (split.pieces[r[0]].file, split.pieces[r[0]].offset))
            .collect();
        // File 1 (half the size) advances one piece for every two of file 0.
        let want = [(0, 8), (1, 8), (0, 8 + MIB), (0, 8 + 2 * MIB), (1, 8 + MIB), (0, 8 + 3 * MIB)];
        assert_eq!(order, want);
        assert_eq!(split, Split::new(&c, &wanted, &[0, 0], 1, MIB));
    }
}
