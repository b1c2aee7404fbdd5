//! What cooperating ranks agree on before they exchange a byte: that they opened the same
//! checkpoint, and plan the same exchange.
//!
//! Each rank opens the checkpoint on its own, and a file or object can be replaced between
//! two ranks' opens; a rank would then broadcast pieces of one version into tensors that the
//! others' headers describe from another, and every rank would end with a silent mix of both.
//! `--verify-sha256` does not catch it (a rank hashes its own reads, and keeps the bytes it
//! received). So at connect every rank hands the others its [`Identity`]: per file its length,
//! its version (a local file's inode, modification and status-change times; an object's ETag
//! and generation, which its reads are pinned to) and its header (tensors, offsets, metadata),
//! and one word for the plan (ranks, piece and window sizes, wanted tensors, volumes). Every
//! rank compares every rank's identity with rank 0's, so all reach the same verdict, and a
//! difference fails every rank with an error that names the file and what differs.
//!
//! The words are 64-bit XXH3 digests: this is agreement between cooperating processes, not a
//! defence against a forger (a rank can send anything it likes anyway). The device number is
//! left out: ranks on two hosts reading one shared file system see different device numbers
//! for the same file. Ranks on two hosts that read two copies of a checkpoint (two inodes)
//! differ by this rule and are told so.

use std::path::PathBuf;

use gantry_format::{Checkpoint, FileInfo};
use xxhash_rust::xxh3::Xxh3;

use crate::error::{Error, Result};

/// One file as a rank sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileWords {
    /// Its length in bytes.
    pub len: u64,
    /// A digest of its version (inode and times, or ETag and generation).
    pub version: u64,
    /// A digest of its header.
    pub header: u64,
}

/// What a rank loads: its files, then its plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Per file of the checkpoint, in its order.
    pub files: Vec<FileWords>,
    /// A digest of the plan (see [`plan_word`]).
    pub plan: u64,
}

/// The words of one u64 each that a summary holds: file count, digest of everything, plan.
const SUMMARY_WORDS: usize = 3;

/// Bytes of a summary.
pub const SUMMARY_BYTES: usize = SUMMARY_WORDS * 8;

impl Identity {
    /// The identity of `checkpoint` loaded with plan word `plan`.
    pub fn of(checkpoint: &Checkpoint, plan: u64) -> Self {
        let files = checkpoint
            .files
            .iter()
            .map(|f| FileWords {
                len: f.file_len,
                version: version_word(f),
                header: header_word(f),
            })
            .collect();
        Self { files, plan }
    }

    /// Every word, little-endian: each file's three, then the plan.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.files.len() * 24 + 8);
        for f in &self.files {
            for w in [f.len, f.version, f.header] {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
        out.extend_from_slice(&self.plan.to_le_bytes());
        out
    }

    /// The identity `bytes` hold (from [`Identity::to_bytes`]); `None` when they hold none.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() % 8 != 0 || bytes.len() < 8 || (bytes.len() - 8) % 24 != 0 {
            return None;
        }
        let words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        let (plan, files) = words.split_last()?;
        let files = files
            .chunks_exact(3)
            .map(|w| FileWords { len: w[0], version: w[1], header: w[2] })
            .collect();
        Some(Self { files, plan: *plan })
    }

    /// A fixed-size summary (file count, a digest of every word, the plan), equal on two
    /// ranks when their identities are (but for a digest collision).
    pub fn summary(&self) -> [u8; SUMMARY_BYTES] {
        let words =
            [self.files.len() as u64, xxhash_rust::xxh3::xxh3_64(&self.to_bytes()), self.plan];
        let mut out = [0u8; SUMMARY_BYTES];
        for (slot, w) in out.chunks_exact_mut(8).zip(words) {
            slot.copy_from_slice(&w.to_le_bytes());
        }
        out
    }
}

/// The plan word: what every rank must choose alike for the exchange to line up (`whole_files`:
/// each file read by one rank, as hashed loads split: [`super::split::Split::whole_files`]).
pub fn plan_word(
    world: usize,
    (piece_bytes, window_bytes): (u64, u64),
    whole_files: bool,
    wanted: &[bool],
    volumes: &[usize],
) -> u64 {
    let mut h = Xxh3::new();
    let sizes = [piece_bytes, window_bytes, u64::from(whole_files)];
    for w in [world as u64, wanted.len() as u64, volumes.len() as u64].into_iter().chain(sizes) {
        h.update(&w.to_le_bytes());
    }
    let bits: Vec<u8> = wanted.iter().map(|&w| u8::from(w)).collect();
    h.update(&bits);
    for &v in volumes {
        h.update(&(v as u64).to_le_bytes());
    }
    h.digest()
}

fn version_word(file: &FileInfo) -> u64 {
    let mut h = Xxh3::new();
    if let Some(id) = &file.identity {
        h.update(b"file");
        h.update(&id.ino.to_le_bytes());
        h.update(&id.len.to_le_bytes());
        h.update(&id.mtime_ns.to_le_bytes());
        h.update(&id.ctime_ns.to_le_bytes());
    }
    if let Some(version) = &file.version {
        h.update(b"object");
        h.update(&(version.len() as u64).to_le_bytes());
        h.update(version.as_bytes());
    }
    h.digest()
}

/// A digest of everything the header says, each field length-prefixed so that no two
/// headers share an encoding.
fn header_word(file: &FileInfo) -> u64 {
    let header = &file.header;
    let mut h = Xxh3::new();
    let mut text = |s: &str| {
        h.update(&(s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    let mut metadata: Vec<(&String, &String)> =
        header.metadata.iter().flat_map(|m| m.iter()).collect();
    metadata.sort();
    text(&format!("{} metadata entries", metadata.len()));
    for (k, v) in metadata {
        text(k);
        text(v);
    }
    for t in &header.tensors {
        text(&t.name);
        text(&format!("{:?} {:?} {} {}", t.dtype, t.shape, t.offset, t.len));
    }
    for w in [header.header_len, header.data_offset, header.data_len, header.tensors.len() as u64] {
        h.update(&w.to_le_bytes());
    }
    h.digest()
}

/// Checks every rank's summary (`summaries[r]`, in rank order) against rank 0's: `Ok(true)`
/// when they all agree, `Ok(false)` when the full identities must be compared (equal file
/// counts), an error when the file counts differ.
pub fn compare_summaries(summaries: &[Vec<u8>], world: usize) -> Result<bool> {
    let count = |s: &[u8]| u64::from_le_bytes(s[..8].try_into().unwrap_or_default());
    let Some(first) = summaries.first() else { return Ok(true) };
    for (rank, s) in summaries.iter().enumerate().skip(1) {
        if count(s) != count(first) {
            let what = format!(
                "its checkpoint has {} files where rank 0's has {}",
                count(s),
                count(first)
            );
            return Err(Error::RanksDiffer { rank, world, path: None, what });
        }
    }
    Ok(summaries.iter().all(|s| s == first))
}

/// The first difference between rank 0's identity and another rank's (`all[r]`, in rank
/// order; `paths` are the checkpoint's files), as the error every rank returns.
pub fn disagreement(all: &[Identity], paths: &[PathBuf]) -> Option<Error> {
    let first = all.first()?;
    let world = all.len();
    for (rank, other) in all.iter().enumerate().skip(1) {
        for (f, (a, b)) in first.files.iter().zip(&other.files).enumerate() {
            let what = if a.len != b.len {
                format!("its length is {} bytes there and {} on rank 0", b.len, a.len)
            } else if a.header != b.header {
                "its header differs from rank 0's (another version of the file)".to_owned()
            } else if a.version != b.version {
                "it is another version than rank 0's (another inode, modification or \
                 status-change time, ETag or generation: replaced or rewritten between the \
                 ranks' opens, or a separate copy)"
                    .to_owned()
            } else {
                continue;
            };
            return Some(Error::RanksDiffer { rank, world, path: paths.get(f).cloned(), what });
        }
        if first.files.len() != other.files.len() {
            let what = format!(
                "its checkpoint has {} files where rank 0's has {}",
                other.files.len(),
                first.files.len()
            );
            return Some(Error::RanksDiffer { rank, world, path: None, what });
        }
        if first.plan != other.plan {
            let what = "it plans another exchange than rank 0 (ranks, piece or window size, \
                        wanted tensors or volumes differ)"
                .to_owned();
            return Some(Error::RanksDiffer { rank, world, path: None, what });
        }
    }
    None
}

/// What [`super::comm::Exchange::connect`] checks before the first exchange: this rank's
/// identity and the checkpoint's file paths (for errors).
#[derive(Debug, Clone)]
pub struct Agreement {
    /// This rank's identity.
    pub identity: Identity,
    /// The checkpoint's files, for errors.
    pub paths: Vec<PathBuf>,
}

impl Agreement {
    /// The agreement on `checkpoint` loaded with plan word `plan`.
    pub fn new(checkpoint: &Checkpoint, plan: u64) -> Self {
        let paths = checkpoint.files.iter().map(|f| f.path.clone()).collect();
        Self { identity: Identity::of(checkpoint, plan), paths }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_format::{Dtype, FileIdentity, Header, HeaderTensor};

    fn file(name: &str, tensor_len: u64) -> FileInfo {
        let tensors = vec![HeaderTensor {
            name: "w".into(),
            dtype: Dtype::F32,
            shape: vec![tensor_len / 4],
            offset: 16,
            len: tensor_len,
        }];
        let header = Header {
            header_len: 8,
            data_offset: 16,
            data_len: tensor_len,
            metadata: None,
            tensors,
        };
        let identity =
            FileIdentity { dev: 1, ino: 7, len: 16 + tensor_len, mtime_ns: 1_000, ctime_ns: 2_000 };
        FileInfo {
            path: name.into(),
            file_len: 16 + tensor_len,
            header,
            identity: Some(identity),
            version: None,
        }
    }

    fn checkpoint(files: Vec<FileInfo>) -> Checkpoint {
        Checkpoint { files, tensors: Vec::new(), index_metadata: Default::default() }
    }

    fn verdict(a: &Checkpoint, b: &Checkpoint) -> Option<String> {
        let ids = [Identity::of(a, 1), Identity::of(b, 1)];
        let paths: Vec<PathBuf> = a.files.iter().map(|f| f.path.clone()).collect();
        // The summaries must tell a difference whenever the full comparison does.
        let summaries: Vec<Vec<u8>> = ids.iter().map(|i| i.summary().to_vec()).collect();
        let same = compare_summaries(&summaries, 2).map_err(|e| e.to_string());
        let found = disagreement(&ids, &paths).map(|e| e.to_string());
        match same {
            Ok(true) => assert_eq!(found, None, "summaries agree, identities do not"),
            Ok(false) => assert!(found.is_some(), "summaries differ, identities agree"),
            Err(e) => return Some(e),
        }
        found
    }

    #[test]
    fn the_same_checkpoint_agrees() {
        let a = checkpoint(vec![file("a", 64), file("b", 32)]);
        assert_eq!(verdict(&a, &a.clone()), None);
        // The device number may differ (one shared file system seen from two hosts).
        let mut b = a.clone();
        b.files[0].identity.as_mut().unwrap().dev = 99;
        assert_eq!(verdict(&a, &b), None);
    }

    #[test]
    fn each_difference_names_the_file_and_what() {
        let a = checkpoint(vec![file("a", 64), file("b", 32)]);
        type Change = Box<dyn Fn(&mut Checkpoint)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|c| c.files[1].identity.as_mut().unwrap().ino = 8), "another version"),
            (Box::new(|c| c.files[1].identity.as_mut().unwrap().ctime_ns += 1), "another version"),
            (Box::new(|c| c.files[1].identity.as_mut().unwrap().mtime_ns += 1), "another version"),
            (Box::new(|c| c.files[1].version = Some("\"v2\"".into())), "another version"),
            (Box::new(|c| c.files[1].header.tensors[0].name = "x".into()), "header differs"),
            (
                Box::new(|c| {
                    c.files[1].header.metadata = Some([("format".into(), "pt".into())].into())
                }),
                "header differs",
            ),
            (Box::new(|c| c.files[1].file_len += 4), "length is"),
        ];
        for (change, what) in cases {
            let mut b = a.clone();
            change(&mut b);
            let message = verdict(&a, &b).expect("a difference");
            assert!(message.contains(what) && message.contains("rank 1 of 2"), "{message}");
            assert!(message.starts_with("b: "), "names the file: {message}");
        }
    }

    #[test]
    fn another_file_count_or_plan_is_named() {
        let a = checkpoint(vec![file("a", 64), file("b", 32)]);
        let b = checkpoint(vec![file("a", 64)]);
        let message = verdict(&a, &b).expect("a difference");
        assert!(message.contains("1 files where rank 0's has 2"), "{message}");
        let ids = [Identity::of(&a, 1), Identity::of(&a, 2)];
        let message = disagreement(&ids, &[]).expect("plans differ").to_string();
        assert!(message.contains("plans another exchange"), "{message}");
    }

    #[test]
    fn identities_survive_their_bytes_and_plans_see_every_input() {
        let a = checkpoint(vec![file("a", 64), file("b", 32)]);
        let id = Identity::of(&a, 5);
        assert_eq!(Identity::from_bytes(&id.to_bytes()), Some(id));
        assert_eq!(Identity::from_bytes(&[0; 12]), None);
        let base = plan_word(2, (8, 0), false, &[true, false], &[0, 1]);
        for other in [
            plan_word(3, (8, 0), false, &[true, false], &[0, 1]),
            plan_word(2, (16, 0), false, &[true, false], &[0, 1]),
            plan_word(2, (8, 4), false, &[true, false], &[0, 1]),
            plan_word(2, (8, 0), true, &[true, false], &[0, 1]),
            plan_word(2, (8, 0), false, &[true, true], &[0, 1]),
            plan_word(2, (8, 0), false, &[true, false], &[0, 0]),
        ] {
            assert_ne!(base, other);
        }
    }
}
