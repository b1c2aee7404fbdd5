//! Segment states: how one file's SHA-256 is checked on many cores.
//!
//! SHA-256 runs a compression function over the message in 64-byte blocks, carrying a state of
//! eight words from one block to the next; the digest is the state after the padded last
//! block. One digest cannot be split across cores, but the chain can be cut: if the state at
//! every segment boundary (a multiple of 64 bytes) is known, each segment can be hashed on its
//! own, from its starting state. The first time a file is verified it is hashed sequentially
//! and the states at its segment boundaries are kept; once its digest has matched the digest
//! `D` known for it, they are written to a record keyed by `D` and the file's length. A later
//! load hashes every segment in parallel, segment 0 from SHA-256's initial value and segment
//! `k` from the recorded state `k`, and checks that the end state of each segment is the
//! recorded start of the next and that the last one, padded for the file's length, gives `D`.
//! When all of that holds, the states computed from the bytes read are exactly the states of a
//! sequential SHA-256 of those bytes, whose digest is then `D`: the check is the plain check,
//! only computed in pieces. The record is not trusted: a wrong state makes a link fail, never
//! a bad file pass.
//!
//! A link that fails leaves open whether the bytes or the record are wrong, so the file is
//! hashed again sequentially with a plain read loop ([`reread`]), which also hashes each
//! segment again from the starting state the load used: the load's bytes pass only where every
//! segment of the file hashes as the load's bytes did and the file's digest is `D`.
//!
//! Records are small files `<dir>/<D hex>-<length>.states` (32 bytes per segment), written
//! under a random temporary name with an exclusive, no-follow create and renamed into place,
//! private to the user (0600 in a 0700 directory); the directory may sit in a cache shared with
//! other users, so it is opened once and everything in it relative to it, never through a link
//! (the `files` module states the rules). A record that is not trusted (a link, not a regular
//! file, owned or writable by another user, not the size its segment count needs) is ignored
//! with a warning; one that does not fit (another segment size, digest or length, a bad magic)
//! with a note in the debug log. Either way the file is hashed sequentially, and a record
//! cannot make a bad file pass.

use std::ffi::OsString;
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use sha2::block_api::compress256;
use sha2::digest::array::Array;
use sha2::digest::consts::U64;

use super::{files, to_hex, Digest};

/// SHA-256's chaining state: eight 32-bit words.
pub type State = [u32; 8];

/// SHA-256's initial state (FIPS 180-4, 5.3.3).
pub const IV: State = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// Bytes per segment by default: a warm load's staging ring (512 MiB) holds extents of many
/// segments at once, so that many threads have work; a record costs 2 KiB per GiB of file.
pub const SEGMENT_BYTES_DEFAULT: u64 = 16 << 20;

/// The environment variable naming the directory of the records (it wins over the others).
pub const STATES_DIR_ENV: &str = "GANTRY_SHA256_STATES_DIR";

const MAGIC: &[u8; 8] = b"GNTYSHA2";
const VERSION: u32 = 1;
/// Magic, version, segment bytes, file length, digest, state count.
const HEADER_BYTES: usize = 8 + 4 + 8 + 8 + 32 + 8;

/// SHA-256 from a given state, over bytes that arrive in pieces of any length.
#[derive(Debug, Clone)]
pub struct Chain {
    state: State,
    block: [u8; 64],
    filled: usize,
}

impl Chain {
    /// A chain that starts from `start` (the state after a whole number of blocks).
    pub fn new(start: State) -> Self {
        Self { state: start, block: [0; 64], filled: 0 }
    }

    /// Hashes `bytes`, keeping a partial block for the next call.
    pub fn update(&mut self, mut bytes: &[u8]) {
        if self.filled > 0 {
            let take = bytes.len().min(64 - self.filled);
            self.block[self.filled..self.filled + take].copy_from_slice(&bytes[..take]);
            self.filled += take;
            bytes = &bytes[take..];
            if self.filled < 64 {
                return;
            }
            compress256(&mut self.state, &[self.block]);
            self.filled = 0;
        }
        let (blocks, rest) = Array::<u8, U64>::slice_as_chunks(bytes);
        if !blocks.is_empty() {
            compress256(&mut self.state, Array::cast_slice_to_core(blocks));
        }
        self.block[..rest.len()].copy_from_slice(rest);
        self.filled = rest.len();
    }

    /// The state, when the bytes hashed so far are a whole number of blocks.
    pub fn state(&self) -> Option<State> {
        (self.filled == 0).then_some(self.state)
    }

    /// The digest of a message of `total_bytes` whose last bytes these were: SHA-256's padding
    /// (0x80, zeros, the length in bits big-endian) and the state as big-endian words.
    pub fn finalize(mut self, total_bytes: u64) -> Digest {
        let mut tail = [0u8; 128];
        tail[..self.filled].copy_from_slice(&self.block[..self.filled]);
        tail[self.filled] = 0x80;
        let end = if self.filled + 1 + 8 <= 64 { 64 } else { 128 };
        tail[end - 8..end].copy_from_slice(&total_bytes.wrapping_mul(8).to_be_bytes());
        let (blocks, _) = Array::<u8, U64>::slice_as_chunks(&tail[..end]);
        compress256(&mut self.state, Array::cast_slice_to_core(blocks));
        state_bytes(&self.state)
    }
}

/// A state as SHA-256 writes its output: the words big-endian.
pub fn state_bytes(state: &State) -> Digest {
    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(state) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

/// Segments of a file of `file_bytes` (at least one; the last may be shorter).
pub fn segment_count(file_bytes: u64, segment_bytes: u64) -> usize {
    assert!(segment_bytes > 0 && segment_bytes % 64 == 0, "segments are whole blocks");
    file_bytes.div_ceil(segment_bytes).max(1) as usize
}

/// What hashing one segment gives: the end state (as [`state_bytes`]) of every segment but the
/// last, the digest for the last.
pub fn segment_outcome(chain: Chain, last: bool, file_bytes: u64) -> Digest {
    match last {
        true => chain.finalize(file_bytes),
        false => state_bytes(&chain.state().expect("segments are whole blocks")),
    }
}

/// The recorded states of one file whose SHA-256 was `digest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Bytes per segment.
    pub segment_bytes: u64,
    /// The file's length.
    pub file_bytes: u64,
    /// The file's SHA-256.
    pub digest: Digest,
    /// The starting state of segments 1, 2, ... (segment 0 starts from [`IV`]).
    pub starts: Vec<State>,
}

impl Record {
    /// The file's bytes: magic, version, segment bytes, file length, digest, state count, then
    /// the states, little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + 32 * self.starts.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.segment_bytes.to_le_bytes());
        out.extend_from_slice(&self.file_bytes.to_le_bytes());
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(&(self.starts.len() as u64).to_le_bytes());
        for word in self.starts.iter().flatten() {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out
    }

    /// Reads a record, or says what is wrong with it.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < HEADER_BYTES || &bytes[..8] != MAGIC {
            return Err(format!("not a states record ({} bytes, bad magic)", bytes.len()));
        }
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4"));
        if version != VERSION {
            return Err(format!("version {version}, not {VERSION}"));
        }
        let (segment_bytes, file_bytes) = (u64_at(12), u64_at(20));
        let digest: Digest = bytes[28..60].try_into().expect("32");
        let count = u64_at(60);
        if segment_bytes == 0 || segment_bytes % 64 != 0 {
            return Err(format!("segment size {segment_bytes} is not a positive multiple of 64"));
        }
        let want = segment_count(file_bytes, segment_bytes) as u64 - 1;
        if count != want || (bytes.len() - HEADER_BYTES) as u64 != 32 * want {
            return Err(format!(
                "{count} states in {} bytes, a file of {file_bytes} bytes has {want}",
                bytes.len()
            ));
        }
        let starts = bytes[HEADER_BYTES..]
            .chunks_exact(32)
            .map(|s| {
                let mut state = [0u32; 8];
                for (word, b) in state.iter_mut().zip(s.chunks_exact(4)) {
                    *word = u32::from_le_bytes(b.try_into().expect("4"));
                }
                state
            })
            .collect();
        Ok(Self { segment_bytes, file_bytes, digest, starts })
    }
}

/// The name of the record of a file of `file_bytes` with digest `digest`.
fn record_name(digest: &Digest, file_bytes: u64) -> PathBuf {
    PathBuf::from(format!("{}-{file_bytes}.states", to_hex(digest)))
}

/// Where the record of a file of `file_bytes` with digest `digest` lives in `dir`.
pub fn record_path(dir: &Path, digest: &Digest, file_bytes: u64) -> PathBuf {
    dir.join(record_name(digest, file_bytes))
}

/// The bytes of the record of a file of `file_bytes` in segments of `segment_bytes`.
fn record_bytes(file_bytes: u64, segment_bytes: u64) -> u64 {
    HEADER_BYTES as u64 + 32 * (segment_count(file_bytes, segment_bytes) as u64 - 1)
}

/// The directory of the records: `GANTRY_SHA256_STATES_DIR`, else `.sha256-states` in
/// `cache_dir` (a name no bucket of the object cache can have), else
/// `$XDG_CACHE_HOME/gantry/sha256`, else `$HOME/.cache/gantry/sha256`.
pub fn states_dir(cache_dir: Option<&Path>) -> Option<PathBuf> {
    Records::new(cache_dir).map(|r| r.path().to_owned())
}

/// Where the records directory starts (the user's own directory, followed as given) and the
/// components below it that are opened without following links.
type Location = (PathBuf, &'static [&'static str]);

fn resolve_dir(
    over: Option<OsString>,
    cache_dir: Option<&Path>,
    xdg: Option<OsString>,
    home: Option<OsString>,
) -> Option<Location> {
    let set = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set(over) {
        return Some((dir, &[]));
    }
    if let Some(dir) = cache_dir {
        return Some((dir.to_owned(), &[".sha256-states"]));
    }
    let xdg = set(xdg).filter(|d| d.is_absolute());
    let cache = xdg.or_else(|| set(home).map(|h| h.join(".cache")))?;
    Some((cache, &["gantry", "sha256"]))
}

/// The records directory of a load (see the `files` module for how it is opened and what is
/// trusted in it). Opened once, when first needed.
#[derive(Debug)]
pub struct Records {
    path: PathBuf,
    anchor: PathBuf,
    below: &'static [&'static str],
    dir: Mutex<Option<Arc<OwnedFd>>>,
}

impl Records {
    /// The records directory for `cache_dir` ([`states_dir`]), if there is one.
    pub fn new(cache_dir: Option<&Path>) -> Option<Self> {
        let var = |name| std::env::var_os(name);
        let (anchor, below) =
            resolve_dir(var(STATES_DIR_ENV), cache_dir, var("XDG_CACHE_HOME"), var("HOME"))?;
        Some(Self::below(anchor, below))
    }

    /// Records kept in `dir` itself.
    pub fn at(dir: &Path) -> Self {
        Self::below(dir.to_owned(), &[])
    }

    fn below(anchor: PathBuf, below: &'static [&'static str]) -> Self {
        let path = below.iter().fold(anchor.clone(), |p, c| p.join(c));
        Self { path, anchor, below, dir: Mutex::new(None) }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's descriptor, opened (and created first when `create`) once.
    fn dir(&self, create: bool) -> std::io::Result<Arc<OwnedFd>> {
        let mut dir = self.dir.lock();
        if let Some(fd) = dir.as_ref() {
            return Ok(Arc::clone(fd));
        }
        let fd = Arc::new(files::open_dir(&self.anchor, self.below, create)?);
        *dir = Some(Arc::clone(&fd));
        Ok(fd)
    }

    /// The record for a file of `file_bytes` with digest `digest`, when there is one that fits
    /// (`segment_bytes` segments). One that is not trusted (a link, not a regular file, owned
    /// or writable by another user, of the wrong size) is ignored with a warning; one recorded
    /// for another segment size or file, with a note in the debug log.
    pub fn load(&self, digest: &Digest, file_bytes: u64, segment_bytes: u64) -> Option<Record> {
        let name = record_name(digest, file_bytes);
        let path = self.path.join(&name);
        let dir = match self.dir(false) {
            Ok(dir) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                log::warn!("{}: SHA-256 states not used: {e}", self.path.display());
                return None;
            }
        };
        let bytes =
            match files::read_record(dir.as_fd(), &name, record_bytes(file_bytes, segment_bytes)) {
                Ok(Some(bytes)) => bytes,
                Ok(None) => return None,
                Err(e) => {
                    log::warn!("{}: SHA-256 states ignored: {e}", path.display());
                    return None;
                }
            };
        let record = Record::decode(&bytes).and_then(|r| {
            if r.segment_bytes != segment_bytes {
                Err(format!("segments of {} bytes, not {segment_bytes}", r.segment_bytes))
            } else if r.file_bytes != file_bytes || r.digest != *digest {
                Err("recorded for another file".to_owned())
            } else {
                Ok(r)
            }
        });
        record.map_err(|e| log::debug!("{}: SHA-256 states ignored: {e}", path.display())).ok()
    }

    /// Writes `record` (the directory created 0700 if missing) under a random temporary name
    /// renamed into place, so that a reader never sees half a record and a link at its name
    /// is replaced, never written through. Returns the record's path.
    pub fn store(&self, record: &Record) -> std::io::Result<PathBuf> {
        let dir = self.dir(true)?;
        let name = record_name(&record.digest, record.file_bytes);
        files::write_private(dir.as_fd(), &name, &record.encode())?;
        Ok(self.path.join(name))
    }
}

/// A file hashed again from storage after its segments did not chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reread {
    /// The file's SHA-256 now.
    pub digest: Digest,
    /// Its true segment starting states (segments 1, 2, ...), for a new record.
    pub starts: Vec<State>,
    /// Segments whose bytes, hashed from the start the load used, do not give what the load's
    /// bytes gave: the bytes the load read there are not the file's.
    pub differ: Vec<usize>,
}

/// Bytes read per `pread` of [`reread`].
const REREAD_BYTES: usize = 8 << 20;

/// Hashes `path` (of `file_bytes`) again with a plain read loop: its digest and true segment
/// states, and, per segment `k`, whether its bytes hashed from `used[k]` (the start the load
/// used) give `outcomes[k]` (what the load's bytes gave, see [`segment_outcome`]).
pub fn reread(
    path: &Path,
    file_bytes: u64,
    segment_bytes: u64,
    used: &[State],
    outcomes: &[Digest],
) -> std::io::Result<Reread> {
    let segments = segment_count(file_bytes, segment_bytes);
    assert!(used.len() == segments && outcomes.len() == segments);
    let file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; REREAD_BYTES.min(segment_bytes as usize).max(64)];
    let (mut truth, mut starts, mut differ) = (Chain::new(IV), Vec::new(), Vec::new());
    for k in 0..segments {
        let start = k as u64 * segment_bytes;
        let end = (start + segment_bytes).min(file_bytes);
        let true_start = truth.state().expect("segments are whole blocks");
        if k > 0 {
            starts.push(true_start);
        }
        // Where the load started from the true state, the true chain says it all.
        let mut side = (used[k] != true_start).then(|| Chain::new(used[k]));
        let mut at = start;
        while at < end {
            let n = buf.len().min((end - at) as usize);
            file.read_exact_at(&mut buf[..n], at)?;
            truth.update(&buf[..n]);
            if let Some(side) = side.as_mut() {
                side.update(&buf[..n]);
            }
            at += n as u64;
        }
        let last = k + 1 == segments;
        let outcome = match side {
            Some(side) => segment_outcome(side, last, file_bytes),
            None => segment_outcome(truth.clone(), last, file_bytes),
        };
        if outcome != outcomes[k] {
            differ.push(k);
        }
    }
    let mut probe = [0u8; 1];
    if file.read_at(&mut probe, file_bytes)? != 0 {
        return Err(std::io::Error::other(format!("longer than the {file_bytes} bytes planned")));
    }
    Ok(Reread { digest: truth.finalize(file_bytes), starts, differ })
}

#[cfg(test)]
mod tests;
