//! From the tensor table to read extents and copy steps. Pure: no I/O, no `unsafe`.
//!
//! Per file, the wanted tensors are merged into runs of contiguous bytes (a gap of skipped
//! bytes up to `gap_bytes` is read rather than split into two requests: one large request
//! costs less than two small ones on every disk gantry targets). Each run is cut into extents
//! of at most `chunk_bytes`, the first starting at the run's start rounded down to the file's
//! alignment, so every extent of a direct-I/O file starts aligned and is at most one chunk.
//! Extents end at the run's end, which is inside the file; a reader that needs whole aligned
//! blocks rounds the request up itself and ignores what lies past `len`.
//!
//! What is read is a [`ReadSet`]: byte ranges of the checkpoint's files, each of which lands
//! as one unit. A load of tensors reads one range per tensor; a placed load reads atoms (the
//! merged spans its shares need) and a cooperative rank its pieces, each as plain ranges, so
//! that nothing poses as a tensor to be planned.
//!
//! Each extent lists its copy steps: which bytes of the extent go to which byte of which
//! range. A range is ready when all of its steps have been carried out.

use std::ops::Range;

use gantry_format::{Checkpoint, FileId, FileInfo, TensorEntry};

/// `len` bytes of file `file` from `offset`: one unit a load reads and delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileRange {
    /// The file.
    pub file: FileId,
    /// Absolute file offset.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
}

impl FileRange {
    /// The bytes of tensor `t`.
    pub fn of(t: &TensorEntry) -> Self {
        Self { file: t.file, offset: t.offset, len: t.len }
    }

    /// One range per tensor of `checkpoint`, in its order.
    pub fn tensors(checkpoint: &Checkpoint) -> Vec<Self> {
        checkpoint.tensors.iter().map(Self::of).collect()
    }
}

/// What a load reads: `ranges` of `files`, each delivered whole (to where the sink says).
#[derive(Debug, Clone, Copy)]
pub struct ReadSet<'a> {
    /// The checkpoint's files.
    pub files: &'a [FileInfo],
    /// The ranges, each inside its file's data section.
    pub ranges: &'a [FileRange],
    /// When each range is the whole tensor of the same position: the tensors (their names
    /// label the load's trace).
    pub tensors: Option<&'a [TensorEntry]>,
}

impl<'a> ReadSet<'a> {
    /// `ranges` of `files`, not tensors.
    pub fn new(files: &'a [FileInfo], ranges: &'a [FileRange]) -> Self {
        Self { files, ranges, tensors: None }
    }

    /// The tensors of `checkpoint`, as `ranges` ([`FileRange::tensors`]) says they lie.
    pub fn tensors(checkpoint: &'a Checkpoint, ranges: &'a [FileRange]) -> Self {
        assert_eq!(ranges.len(), checkpoint.tensors.len());
        Self { files: &checkpoint.files, ranges, tensors: Some(&checkpoint.tensors) }
    }

    /// Range `i`'s label in the load's trace: its tensor's name, else its file and offset.
    pub fn label(&self, i: usize) -> String {
        match self.tensors {
            Some(tensors) => tensors[i].name.clone(),
            None => {
                let r = &self.ranges[i];
                format!("{}@{}", self.files[r.file.0].path.display(), r.offset)
            }
        }
    }
}

/// One read: `len` bytes of `file` from `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// The file.
    pub file: FileId,
    /// Absolute file offset of the first byte read; a multiple of the file's alignment.
    pub offset: u64,
    /// Bytes needed from `offset`; `offset + len` is inside the file.
    pub len: u64,
    /// This extent's copy steps, as a range of [`Plan::steps`].
    pub steps: Range<usize>,
}

/// Bytes of one extent that belong to one range of the read set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyStep {
    /// Position of the range in the read set (of the tensor, for a load of tensors).
    pub tensor: usize,
    /// Offset of the bytes within the extent.
    pub source_offset: u64,
    /// Offset of the bytes within the range.
    pub target_offset: u64,
    /// Byte count.
    pub len: u64,
}

/// The reads and copies of one load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Reads, sorted by file, then offset.
    pub extents: Vec<Extent>,
    /// Copy steps, grouped by extent.
    pub steps: Vec<CopyStep>,
    /// How many steps each range of the read set has (0 for skipped or empty ranges).
    pub steps_per_tensor: Vec<u32>,
}

/// How one file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilePlan {
    /// Alignment of extent starts (1 for buffered reads).
    pub align: u64,
    /// Largest extent in bytes; a multiple of `align`.
    pub chunk_bytes: u64,
    /// Read the whole file, header and unwanted tensors included, as one run from offset 0
    /// to its end (when any tensor of it is wanted): what hashing the file needs.
    pub whole: bool,
}

impl Plan {
    /// Plans reads of the ranges for which `wanted[i]` holds, file `f` as `files[f]` says;
    /// skipped bytes up to `gap_bytes` between wanted ranges are read rather than split.
    pub fn new(reads: &ReadSet<'_>, wanted: &[bool], files: &[FilePlan], gap_bytes: u64) -> Self {
        let ranges = reads.ranges;
        assert_eq!(wanted.len(), ranges.len());
        assert_eq!(files.len(), reads.files.len());
        let mut plan = Plan { steps_per_tensor: vec![0; wanted.len()], ..Plan::default() };
        for (file, fp) in files.iter().enumerate() {
            let (a, chunk) = (fp.align, fp.chunk_bytes);
            assert!(a.is_power_of_two() && chunk > 0 && chunk % a == 0, "chunk must be aligned");
            let tensors: Vec<usize> = (0..wanted.len())
                .filter(|&i| {
                    let t = &ranges[i];
                    t.file == FileId(file) && wanted[i] && t.len > 0
                })
                .collect();
            if fp.whole && !tensors.is_empty() {
                let span = 0..reads.files[file].file_len;
                plan.add_run(ranges, FileId(file), &tensors, span, chunk);
                continue;
            }
            for run in runs(ranges, &tensors, gap_bytes, a) {
                let first = &ranges[run[0]];
                let last = &ranges[run[run.len() - 1]];
                let span = first.offset - first.offset % a..last.offset + last.len;
                plan.add_run(ranges, FileId(file), &run, span, chunk);
            }
        }
        plan
    }

    /// Bytes read by all extents.
    pub fn read_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }

    /// Cuts `span` (aligned start, end inside the file) into extents of at most `chunk`
    /// bytes, with the copy steps of the ranges of `run` (sorted by offset) inside it.
    fn add_run(
        &mut self,
        ranges: &[FileRange],
        file: FileId,
        run: &[usize],
        span: Range<u64>,
        chunk: u64,
    ) {
        let tensor = |i: usize| &ranges[run[i]];
        let run_end = span.end;
        let mut begin = span.start;
        let mut first = 0; // first tensor of the run that may still overlap
        while begin < run_end {
            let end = (begin + chunk).min(run_end);
            let steps_begin = self.steps.len();
            let mut i = first;
            while i < run.len() && tensor(i).offset < end {
                let t = tensor(i);
                let (s, e) = (t.offset.max(begin), (t.offset + t.len).min(end));
                if s < e {
                    self.steps.push(CopyStep {
                        tensor: run[i],
                        source_offset: s - begin,
                        target_offset: s - t.offset,
                        len: e - s,
                    });
                    self.steps_per_tensor[run[i]] += 1;
                }
                if t.offset + t.len <= end {
                    first = i + 1;
                }
                i += 1;
            }
            let steps = steps_begin..self.steps.len();
            self.extents.push(Extent { file, offset: begin, len: end - begin, steps });
            begin = end;
        }
    }
}

/// Groups ranges (sorted by offset, non-empty) into runs separated by more than `gap_bytes`.
/// A range whose aligned start falls inside the previous run joins it, so that extents of
/// different runs never share a block.
fn runs(ranges: &[FileRange], tensors: &[usize], gap_bytes: u64, align: u64) -> Vec<Vec<usize>> {
    let mut runs: Vec<Vec<usize>> = Vec::new();
    let mut run_end = 0;
    for &i in tensors {
        let t = &ranges[i];
        match runs.last_mut() {
            Some(run) if t.offset - t.offset % align <= run_end + gap_bytes => run.push(i),
            _ => runs.push(vec![i]),
        }
        run_end = t.offset + t.len;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_format::{Dtype, FileInfo, Header, TensorEntry};

    /// A one-file checkpoint whose data section starts at `data_offset` and holds tensors of
    /// the given byte lengths, back to back.
    fn checkpoint(data_offset: u64, lens: &[u64]) -> Checkpoint {
        let mut tensors = Vec::new();
        let mut offset = data_offset;
        for (i, &len) in lens.iter().enumerate() {
            tensors.push(TensorEntry {
                name: format!("t{i}"),
                dtype: Dtype::U8,
                shape: vec![len],
                file: FileId(0),
                offset,
                len,
            });
            offset += len;
        }
        let data_len = offset - data_offset;
        let header = Header {
            header_len: data_offset - 8,
            data_offset,
            data_len,
            metadata: None,
            tensors: vec![],
        };
        let file =
            FileInfo { path: "f".into(), file_len: offset, header, identity: None, version: None };
        Checkpoint { files: vec![file], tensors, index_metadata: Default::default() }
    }

    /// Checks the invariants every plan must hold, and that the steps of every wanted tensor
    /// cover its bytes exactly once, at the right place.
    fn check(c: &Checkpoint, wanted: &[bool], align: u64, chunk: u64, plan: &Plan) {
        let file_len = c.files[0].file_len;
        for e in &plan.extents {
            assert_eq!(e.offset % align, 0, "extent {e:?} unaligned");
            assert!(e.len > 0 && e.len <= chunk, "extent {e:?} size");
            assert!(e.offset + e.len <= file_len, "extent {e:?} past end of file {file_len}");
        }
        for w in plan.extents.windows(2) {
            assert!(w[0].offset + w[0].len <= w[1].offset, "extents overlap");
        }
        let mut covered: Vec<Vec<bool>> =
            c.tensors.iter().map(|t| vec![false; t.len as usize]).collect();
        for e in &plan.extents {
            for s in &plan.steps[e.steps.clone()] {
                let t = &c.tensors[s.tensor];
                assert!(wanted[s.tensor]);
                assert!(s.source_offset + s.len <= e.len);
                // The step's source bytes are the tensor's bytes in the file.
                assert_eq!(e.offset + s.source_offset, t.offset + s.target_offset);
                for b in s.target_offset..s.target_offset + s.len {
                    assert!(!covered[s.tensor][b as usize], "byte covered twice");
                    covered[s.tensor][b as usize] = true;
                }
            }
        }
        for (i, t) in c.tensors.iter().enumerate() {
            let want = wanted[i] && t.len > 0;
            assert_eq!(covered[i].iter().all(|&b| b), want || t.len == 0, "tensor {i} coverage");
            if !wanted[i] {
                assert!(covered[i].iter().all(|&b| !b));
                assert_eq!(plan.steps_per_tensor[i], 0);
            }
        }
    }

    #[test]
    fn table() {
        // (data_offset, tensor lengths, wanted mask (None = all), align, chunk, gap, extents)
        type Case = (u64, Vec<u64>, Option<Vec<bool>>, u64, u64, u64, usize);
        let cases: Vec<Case> = vec![
            // One tensor, file size not a multiple of 4096: one extent ending at the file end.
            (80, vec![5000], None, 4096, 1 << 20, 0, 1),
            // Data section starts unaligned: first extent starts at 0 (covers the header too).
            (136, vec![4096, 4096, 4096], None, 4096, 8192, 0, 2),
            // Chunks split a large tensor.
            (8, vec![100_000], None, 4096, 16384, 0, 7),
            // Empty checkpoint and zero-size tensors.
            (8, vec![], None, 4096, 4096, 0, 0),
            (8, vec![0, 0, 10, 0], None, 4096, 4096, 0, 1),
            // Skipped tensor in the middle: with no gap allowed, two runs.
            (8, vec![4096, 1 << 20, 4096], Some(vec![true, false, true]), 4096, 1 << 20, 0, 2),
            // ... and one run when the gap is allowed (the skipped bytes are read).
            (
                8,
                vec![4096, 1 << 20, 4096],
                Some(vec![true, false, true]),
                4096,
                4 << 20,
                2 << 20,
                1,
            ),
            // Nothing wanted: nothing read.
            (8, vec![10, 20], Some(vec![false, false]), 4096, 4096, 1 << 20, 0),
            // Buffered (align 1): extents start exactly at the data.
            (13, vec![7, 9000, 3], None, 1, 4096, 0, 3),
            // Many small tensors, one chunk.
            (8, vec![3; 1000], None, 4096, 1 << 20, 0, 1),
        ];
        for (data_offset, lens, wanted, align, chunk, gap, extents) in cases {
            let c = checkpoint(data_offset, &lens);
            let wanted = wanted.unwrap_or(vec![true; lens.len()]);
            let plan = Plan::new(
                &ReadSet::tensors(&c, &FileRange::tensors(&c)),
                &wanted,
                &[FilePlan { align, chunk_bytes: chunk, whole: false }],
                gap,
            );
            assert_eq!(plan.extents.len(), extents, "case {lens:?} {wanted:?}: {plan:?}");
            check(&c, &wanted, align, chunk, &plan);
        }
    }

    #[test]
    fn buffered_extents_start_at_data() {
        let c = checkpoint(13, &[7, 9000]);
        let p = Plan::new(
            &ReadSet::tensors(&c, &FileRange::tensors(&c)),
            &[true, true],
            &[FilePlan { align: 1, chunk_bytes: 4096, whole: false }],
            0,
        );
        assert_eq!(p.extents[0].offset, 13);
        assert_eq!(p.read_bytes(), 9007);
    }

    proptest::proptest! {
        #[test]
        fn random_layouts(
            data_offset in 8u64..10_000,
            lens in proptest::collection::vec(0u64..50_000, 0..40),
            mask in proptest::collection::vec(proptest::bool::weighted(0.7), 40),
            align_shift in 0u32..13,
            chunk_blocks in 1u64..40,
            gap in 0u64..20_000,
            whole in proptest::bool::ANY,
        ) {
            let c = checkpoint(data_offset, &lens);
            let wanted: Vec<bool> = mask[..lens.len()].to_vec();
            let align = 1u64 << align_shift;
            let chunk = chunk_blocks * 4096;
            let ranges = FileRange::tensors(&c);
            let plan = Plan::new(&ReadSet::tensors(&c, &ranges), &wanted, &[FilePlan { align, chunk_bytes: chunk, whole }], gap);
            check(&c, &wanted, align, chunk, &plan);
            let any = c.tensors.iter().zip(&wanted).any(|(t, &w)| w && t.len > 0);
            if whole && any {
                // One run over the whole file: extents tile it from 0 to its end.
                let mut next = 0;
                for e in &plan.extents {
                    proptest::prop_assert_eq!(e.offset, next);
                    next += e.len;
                }
                proptest::prop_assert_eq!(next, c.files[0].file_len);
            }
        }
    }
}
