//! Which read to issue next when a load keeps every file in flight. Pure: no I/O.
//!
//! Checkpoints are sharded so that shards can be read side by side, and much of the storage
//! that serves them is fast only in aggregate: several NVMe drives mounted separately, one
//! cloud volume per shard, parallel and network file systems whose throughput is per file or
//! per stripe. Reading the files one after another leaves all but one of those idle. So the
//! reads of a load are sorted into one queue per volume, each with its own depth, and within a
//! volume the files are interleaved so that each advances in proportion to its size: they
//! start together and finish together. Each file is still read front to back, in tensor
//! order, so its tensors land progressively.
//!
//! Depths come from each volume's profile; when the staging ring cannot hold every volume's
//! queue, [`fit_depths`] shares the ring out in proportion, at least one read per volume, so
//! that a slow volume cannot take the buffers the others need.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// One read, as the interleaving sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    /// The file it reads (an index into the load's files).
    pub file: usize,
    /// Bytes it reads.
    pub len: u64,
}

/// Sorts `reads` (each file's reads in the order they must be issued) into one queue per
/// volume (`volume_of[file]`, volumes numbered from 0 to `volumes - 1`), each queue a list of
/// positions in `reads`. Within a queue the next read always comes from the file that has
/// issued the smallest fraction of its bytes (the lower file index on a tie), and each file's
/// reads keep their order.
pub fn interleave(reads: &[Read], volume_of: &[usize], volumes: usize) -> Vec<Vec<usize>> {
    let files = volume_of.len();
    let mut per_file: Vec<Vec<usize>> = vec![Vec::new(); files];
    let mut total = vec![0u64; files];
    for (i, r) in reads.iter().enumerate() {
        assert!(r.file < files, "read of file {} with {files} files", r.file);
        per_file[r.file].push(i);
        total[r.file] += r.len;
    }
    let mut heaps: Vec<BinaryHeap<Next>> = (0..volumes).map(|_| BinaryHeap::new()).collect();
    for (file, list) in per_file.iter().enumerate() {
        if !list.is_empty() {
            assert!(volume_of[file] < volumes, "file {file} on volume {}", volume_of[file]);
            // A file of zero bytes still has its reads issued, first.
            heaps[volume_of[file]].push(Next { done: 0, total: total[file].max(1), file });
        }
    }
    let mut cursor = vec![0usize; files];
    heaps
        .into_iter()
        .map(|mut heap| {
            let mut queue = Vec::new();
            while let Some(mut next) = heap.pop() {
                let read = per_file[next.file][cursor[next.file]];
                queue.push(read);
                cursor[next.file] += 1;
                next.done += reads[read].len;
                if cursor[next.file] < per_file[next.file].len() {
                    heap.push(next);
                }
            }
            queue
        })
        .collect()
}

/// A file's place in its volume's queue: the fraction `done / total` of its bytes issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Next {
    done: u64,
    total: u64,
    file: usize,
}

impl Ord for Next {
    /// Greatest first out of a max-heap: the smallest fraction, then the lowest file.
    fn cmp(&self, other: &Self) -> Ordering {
        let mine = u128::from(self.done) * u128::from(other.total);
        let theirs = u128::from(other.done) * u128::from(self.total);
        theirs.cmp(&mine).then(other.file.cmp(&self.file))
    }
}

impl PartialOrd for Next {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Reads in flight per volume when the ring holds `buffers`: the `wanted` depths when they
/// fit, else shares of `buffers` in proportion to them, each at least 1 and at most its wish.
/// A volume that wants 0 (nothing to read) gets 0.
pub fn fit_depths(wanted: &[usize], buffers: usize) -> Vec<usize> {
    let sum: usize = wanted.iter().sum();
    if sum <= buffers {
        return wanted.to_vec();
    }
    let busy = wanted.iter().filter(|&&w| w > 0).count();
    let spare = buffers.saturating_sub(busy);
    let extra = sum - busy;
    wanted
        .iter()
        .map(|&w| if w == 0 { 0 } else { (1 + (w - 1) * spare / extra.max(1)).min(w) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reads(spec: &[(usize, u64)]) -> Vec<Read> {
        spec.iter().map(|&(file, len)| Read { file, len }).collect()
    }

    /// Every read exactly once, on its file's volume, each file in its own order.
    fn check(reads: &[Read], volume_of: &[usize], queues: &[Vec<usize>]) {
        let mut seen = vec![false; reads.len()];
        for (v, q) in queues.iter().enumerate() {
            let mut last = vec![None; volume_of.len()];
            for &i in q {
                assert!(!seen[i], "read {i} twice");
                seen[i] = true;
                assert_eq!(volume_of[reads[i].file], v, "read {i} on the wrong volume");
                assert!(last[reads[i].file] < Some(i), "file {} out of order", reads[i].file);
                last[reads[i].file] = Some(i);
            }
        }
        assert!(seen.iter().all(|&s| s), "a read is missing");
    }

    #[test]
    fn table() {
        // (reads as (file, len), volume of each file, volumes, the queues wanted)
        type Case = (Vec<(usize, u64)>, Vec<usize>, usize, Vec<Vec<usize>>);
        let cases: Vec<Case> = vec![
            // One file: its order.
            (vec![(0, 8), (0, 8), (0, 3)], vec![0], 1, vec![vec![0, 1, 2]]),
            // Two equal files on one volume: alternate.
            (vec![(0, 8), (0, 8), (1, 8), (1, 8)], vec![0, 0], 1, vec![vec![0, 2, 1, 3]]),
            // Two files on two volumes: one queue each.
            (vec![(0, 8), (0, 8), (1, 8)], vec![0, 1], 2, vec![vec![0, 1], vec![2]]),
            // Unequal sizes: the large file gets two reads for each of the small one's.
            (
                vec![(0, 8), (0, 8), (0, 8), (0, 8), (1, 8), (1, 8)],
                vec![0, 0],
                1,
                vec![vec![0, 4, 1, 2, 5, 3]],
            ),
            // A file with nothing wanted, between two that have reads.
            (vec![(0, 4), (2, 4)], vec![0, 0, 0], 1, vec![vec![0, 1]]),
            // A volume with no reads keeps an empty queue.
            (vec![(1, 4)], vec![0, 1], 2, vec![vec![], vec![0]]),
            // Nothing to read.
            (vec![], vec![0], 1, vec![vec![]]),
            // Three files on one volume, one on another, unequal lengths within a file.
            (
                vec![(0, 1), (0, 9), (1, 5), (1, 5), (2, 10), (3, 4), (3, 4)],
                vec![0, 0, 0, 1],
                2,
                vec![vec![0, 2, 4, 1, 3], vec![5, 6]],
            ),
        ];
        for (spec, volume_of, volumes, want) in cases {
            let r = reads(&spec);
            let got = interleave(&r, &volume_of, volumes);
            check(&r, &volume_of, &got);
            assert_eq!(got, want, "{spec:?} on {volume_of:?}");
        }
    }

    #[test]
    fn files_advance_together() {
        // Four files of 100, 200, 300 and 400 reads of one byte on one volume: at any point
        // of the queue, each file has issued its share of its bytes, give or take one read.
        let spec: Vec<(usize, u64)> =
            (0..4).flat_map(|f| std::iter::repeat_n((f, 1), 100 * (f + 1))).collect();
        let r = reads(&spec);
        let q = &interleave(&r, &[0, 0, 0, 0], 1)[0];
        let mut done = [0f64; 4];
        for (k, &i) in q.iter().enumerate() {
            done[r[i].file] += 1.0;
            let progress = (k + 1) as f64 / q.len() as f64;
            for (f, &d) in done.iter().enumerate() {
                let share = d / (100.0 * (f + 1) as f64);
                assert!((share - progress).abs() <= 1.0 / (100.0 * (f + 1) as f64) + 0.011);
            }
        }
    }

    #[test]
    fn depths() {
        // (wanted, buffers, fitted)
        let cases: Vec<(Vec<usize>, usize, Vec<usize>)> = vec![
            (vec![16, 16, 16, 16], 64, vec![16, 16, 16, 16]),
            (vec![8, 8], 100, vec![8, 8]),
            (vec![16, 16, 16, 16], 32, vec![8, 8, 8, 8]),
            (vec![8, 8], 8, vec![4, 4]),
            (vec![8, 0, 8], 8, vec![4, 0, 4]),
            (vec![8, 8, 8], 2, vec![1, 1, 1]), // never below one read per volume
            (vec![16, 4], 10, vec![7, 2]),
            (vec![1], 0, vec![1]),
        ];
        for (wanted, buffers, want) in cases {
            assert_eq!(fit_depths(&wanted, buffers), want, "{wanted:?} in {buffers}");
        }
    }

    proptest::proptest! {
        #[test]
        fn random(
            spec in proptest::collection::vec((0usize..6, 1u64..100), 0..60),
            volumes_of in proptest::collection::vec(0usize..3, 6),
        ) {
            let r = reads(&spec);
            let queues = interleave(&r, &volumes_of, 3);
            check(&r, &volumes_of, &queues);
        }

        #[test]
        fn random_depths(wanted in proptest::collection::vec(0usize..40, 1..8), buffers in 0usize..200) {
            let fitted = fit_depths(&wanted, buffers);
            let busy = wanted.iter().filter(|&&w| w > 0).count();
            for (w, f) in wanted.iter().zip(&fitted) {
                proptest::prop_assert!(*f <= *w && (*w == 0) == (*f == 0));
            }
            proptest::prop_assert!(fitted.iter().sum::<usize>() <= buffers.max(busy));
        }
    }
}
