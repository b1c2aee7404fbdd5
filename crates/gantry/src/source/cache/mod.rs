//! A local write-through cache of objects (`Config::cache_dir`): a load from object storage
//! also writes each object it reads whole into the cache directory as its parts arrive (no
//! second GET), and a later load of the same object reads the local copy with the local
//! readers (io_uring `O_DIRECT` when cold) after a HEAD shows the object unchanged.
//!
//! **Layout.** `DIR/objects/<name>` holds copies, `DIR/partial/` the copies being written.
//! A copy's name is the SHA-256 (hex) of a length-prefixed encoding of everything that
//! identifies the object ([`Identity`]): the provider, the endpoint as configured
//! (normalized), the account, the bucket or container, the key, the version (ETag exactly as
//! the store gives it, and the generation on Google Cloud Storage) and the size. So the
//! naming is one-to-one whatever the ETag's spelling (weak `W/`, base64, `:` or `.`), the same
//! bucket behind two endpoints has two copies, and every name is 64 characters whatever the
//! key's length. A rewritten object (new ETag) never matches an old copy.
//!
//! **Trust model.** The cache directory is shared ground: nothing in it is believed because
//! of where it is. Below the directory nothing is followed as a link: the directory is opened
//! once and every name below it is one component opened relative to that handle with
//! `O_NOFOLLOW` (the private `fs` module); files are created with `O_EXCL` under random names and renamed into
//! place. What the cache writes is private by default: directories `0700`, copies `0600`; in
//! shared mode (`Config::cache_shared`) directories are `2770` (setgid, so everything in them
//! takes the cache directory's group) and copies `0640`, and the cache trusts every member of
//! that group, but only a group the caller chose: the cache directory must be the caller's or
//! root's, or the caller a member of its group, and writable by no one outside the group (a
//! directory another user made in a world-writable place and gave their own group names no
//! group the caller trusts, and is not used). A copy is read only if, as `fstat` shows it on the opened descriptor, it is a
//! regular file with one link, not writable by others (private: nor by its group), and owned
//! by the caller or root (shared: or of the cache directory's group); its length must be the
//! object's plus its record ([`record`]), and the record must name this very object. Every
//! copy is then checked as it is read: each [`record::SEGMENT_BYTES`] segment's xxh3 against
//! the digest the writer recorded as it wrote ([`check`]), on hashing threads beside the
//! readers. A copy that fails any check, or cannot be opened or read, is dropped (unlinked
//! where the caller may) with a warning naming its path, and the bytes come from the store:
//! at open time the whole object, mid-load the extents that failed. xxh3 catches corruption,
//! not forgery: against a writer who can put files in the cache, the owner and mode checks are
//! the defence, and `verify_sha256` the end-to-end proof.
//!
//! **Writers.** A copy is written under `partial/<name>.<random>.partial`, locked with
//! `flock(LOCK_EX)` for as long as its writer lives, and renamed into place only once every
//! byte of the object arrived (each part was a GET conditioned on that ETag), its record is
//! written and a last HEAD still shows that ETag and size. A load that is interrupted, fails
//! or is cancelled removes its temporary file; one that is killed leaves it locked by nobody,
//! and the next load that opens the cache removes it ([`CacheDir::sweep`]). Several processes
//! loading the same object at once each write their own temporary file; renames are atomic
//! and the bytes the same, so whichever lands last wins. The copy is not synced to disk before
//! the rename: a power loss may leave a named copy whose pages never reached the disk, which
//! the segment check then catches.
//!
//! **The load never waits on the cache.** Every operation on the cache's file system runs on
//! a thread of its own: the lookup (bounded by [`LOOKUP_WAIT`]), each copy's writes, its record
//! and its rename (bounded by [`FINISH_WAIT`] at the end of the load); the memory a copy may
//! hold while its disk is behind is bounded ([`PENDING_BYTES_MAX`]): a part that finds no
//! room is not waited for, and the copy fetches it again and completes behind the load
//! ([`writer`], [`wait_behind`]). A stalled or full cache costs a warning and the copy, never
//! the load.

pub mod check;
mod fs;
mod pending;
pub mod record;
pub mod writer;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use fs::Dir;
pub use writer::{wait_behind, Writer, PENDING_BYTES_MAX};

/// Longest a load waits for the cache's directory to open and a copy to be looked up.
pub const LOOKUP_WAIT: Duration = Duration::from_secs(10);
/// Longest the end of a load waits for a copy's last writes, record and rename.
pub const FINISH_WAIT: Duration = Duration::from_secs(10);

/// Where an object's bucket lives: what names a copy besides the key and version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    /// `s3`, `gcs` or `azure`.
    pub provider: &'static str,
    /// The endpoint as configured, normalized ([`normalize_endpoint`]); empty for the
    /// provider's default.
    pub endpoint: String,
    /// The storage account (Azure); empty elsewhere.
    pub account: String,
    /// The bucket or container.
    pub bucket: String,
}

/// `endpoint` with its scheme and host in lower case, without a default port (`:443` for
/// https, `:80` for http) or trailing `/`: spellings of one endpoint name one cache.
pub fn normalize_endpoint(endpoint: &str) -> String {
    let endpoint = endpoint.trim().trim_end_matches('/');
    let Some((scheme, rest)) = endpoint.split_once("://") else {
        return endpoint.to_owned();
    };
    let scheme = scheme.to_ascii_lowercase();
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut host = host.to_ascii_lowercase();
    let default = if scheme == "https" { ":443" } else { ":80" };
    if host.ends_with(default) {
        host.truncate(host.len() - default.len());
    }
    format!("{scheme}://{host}{path}")
}

/// Everything that identifies one version of one object, encoded without ambiguity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    encoded: Vec<u8>,
}

impl Identity {
    /// The identity of `key` in `origin` at `etag` (and `generation`), `size` bytes; `None`
    /// when the store gives no version at all (nothing would tell a rewrite apart).
    pub fn new(
        origin: &Origin,
        key: &str,
        etag: Option<&str>,
        generation: Option<&str>,
        size: u64,
    ) -> Option<Self> {
        if etag.unwrap_or_default().is_empty() && generation.unwrap_or_default().is_empty() {
            return None;
        }
        let size = size.to_string();
        let fields = [
            origin.provider,
            &origin.endpoint,
            &origin.account,
            &origin.bucket,
            key,
            etag.unwrap_or_default(),
            generation.unwrap_or_default(),
            &size,
        ];
        let mut encoded = b"gantry-cache-v1\0".to_vec();
        for field in fields {
            encoded.extend_from_slice(&(field.len() as u64).to_le_bytes());
            encoded.extend_from_slice(field.as_bytes());
        }
        Some(Self { encoded })
    }

    /// The copy's file name: 64 hex digits.
    pub fn name(&self) -> String {
        crate::integrity::to_hex(&Sha256::digest(&self.encoded).into())
    }

    fn bytes(&self) -> &[u8] {
        &self.encoded
    }
}

/// The cache directory of a load, open, with its rules.
#[derive(Debug)]
pub struct CacheDir {
    objects: Dir,
    partial: Dir,
    rules: Rules,
}

/// Who the cache trusts.
#[derive(Debug, Clone, Copy)]
struct Rules {
    shared: bool,
    /// The caller's effective uid.
    uid: u32,
    /// The cache directory's group: in shared mode, its members are trusted.
    gid: u32,
}

/// Copies in a shared cache: group-readable.
const SHARED_FILE_MODE: u32 = 0o640;
const PRIVATE_FILE_MODE: u32 = 0o600;
const SHARED_DIR_MODE: u32 = 0o2770;
const PRIVATE_DIR_MODE: u32 = 0o700;

impl Rules {
    /// Whether a directory of the cache may be used: ours or root's (shared: of the cache's
    /// group), and writable by no one else (shared: by no one outside the group).
    fn trusted_dir(&self, st: &libc::stat) -> Result<(), String> {
        let mode = st.st_mode & 0o7777;
        let owner_ok = st.st_uid == self.uid || st.st_uid == 0;
        if self.shared {
            if st.st_gid != self.gid || mode & 0o002 != 0 {
                let group = st.st_gid;
                return Err(format!("mode {mode:o}, group {group}: not the cache's group's only"));
            }
        } else if !owner_ok || mode & 0o022 != 0 {
            return Err(format!(
                "owned by uid {} with mode {mode:o}: not private to uid {} (a cache shared \
                 by a group needs Config::cache_shared)",
                st.st_uid, self.uid
            ));
        }
        Ok(())
    }

    /// Whether the cache's own directory may name the group a shared cache trusts: the group
    /// is the directory's, so the caller must own the directory (or root must: an admin made
    /// it and chose its group) or belong to that group itself, and no one outside the group may
    /// write the directory (else anyone could make a subdirectory there that takes its group).
    /// A directory someone else made and gave their own group is never a cache to trust.
    fn trusted_shared_root(&self, st: &libc::stat) -> Result<(), String> {
        let mode = st.st_mode & 0o7777;
        if mode & 0o002 != 0 {
            return Err(format!("mode {mode:o}: writable by users outside its group"));
        }
        if st.st_uid != self.uid && st.st_uid != 0 && !fs::in_group(st.st_gid) {
            return Err(format!(
                "owned by uid {} and group {}: uid {} does not own it and is not a member of \
                 that group, so the group's copies are not to be trusted",
                st.st_uid, st.st_gid, self.uid
            ));
        }
        Ok(())
    }

    /// Why a copy whose descriptor `fstat`s as `st` is not trusted, if it is not.
    fn untrusted_copy(&self, st: &libc::stat) -> Option<String> {
        let mode = st.st_mode & 0o7777;
        let kind = st.st_mode & libc::S_IFMT;
        if kind != libc::S_IFREG {
            let what = if kind == libc::S_IFDIR { "a directory" } else { "something else" };
            return Some(format!("is {what}, not a regular file"));
        }
        if st.st_nlink != 1 {
            return Some(format!("has {} links (a copy has one)", st.st_nlink));
        }
        let owner_ok = st.st_uid == self.uid || st.st_uid == 0;
        let (owner_ok, writable) = if self.shared {
            (owner_ok || st.st_gid == self.gid, mode & 0o002 != 0)
        } else {
            (owner_ok, mode & 0o022 != 0)
        };
        if !owner_ok {
            let (uid, gid) = (st.st_uid, st.st_gid);
            return Some(format!("is owned by uid {uid} (gid {gid}), not by uid {}", self.uid));
        }
        if writable {
            return Some(format!("has mode {mode:o}: writable by others"));
        }
        None
    }
}

impl CacheDir {
    /// Opens (creating what is missing) the cache at `path`; in `shared` mode for its group.
    pub fn open(path: &Path, shared: bool) -> Result<Self, String> {
        let mode = if shared { SHARED_DIR_MODE } else { PRIVATE_DIR_MODE };
        let at = |e: std::io::Error, p: &Path| format!("{}: {e}", p.display());
        let root = Dir::open_root(path, mode).map_err(|e| at(e, path))?;
        let st = root.stat().map_err(|e| at(e, path))?;
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        let rules = Rules { shared, uid, gid: st.st_gid };
        if shared {
            let trusted = rules.trusted_shared_root(&st);
            trusted.map_err(|why| format!("{}: {why}: not used", path.display()))?;
        }
        let sub = |name: &str| {
            let (dir, _) = root.subdir(name, mode).map_err(|e| {
                let path = root.path_of(name);
                format!("{}: {e} (a link, or not a directory: not used)", path.display())
            })?;
            let st = dir.stat().map_err(|e| at(e, &dir.path))?;
            let trusted = rules.trusted_dir(&st);
            trusted.map_err(|why| format!("{}: {why}: not used", dir.path.display()))?;
            Ok::<_, String>(dir)
        };
        Ok(CacheDir { objects: sub("objects")?, partial: sub("partial")?, rules })
    }

    /// Mode of the files the cache writes.
    fn file_mode(&self) -> u32 {
        if self.rules.shared {
            SHARED_FILE_MODE
        } else {
            PRIVATE_FILE_MODE
        }
    }

    /// The path of the copy called `name`, for messages.
    pub fn copy_path(&self, name: &str) -> PathBuf {
        self.objects.path_of(name)
    }

    /// Removes the temporary files of writers that are gone: a file in `partial/` whose
    /// lock nobody holds (its writer was killed) is unlinked. A live writer holds its lock
    /// from the moment it created the file and checks, once it has it, that the name is still
    /// its file, so it never writes to a file this removed.
    pub fn sweep(&self) {
        let Ok(names) = self.partial.entries() else { return };
        // Only what a writer names: anything else in `partial/` is nobody's to remove.
        for name in names.into_iter().filter(|n| fs::is_temporary_name(n)) {
            let gone = match self.partial.open_read(&name) {
                Ok(file) => match fs::flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
                    Ok(true) => self.partial.names(&name, &file),
                    _ => false,
                },
                // A link or something else no writer makes: not ours to keep.
                Err(e) if e.raw_os_error() == Some(libc::ELOOP) => true,
                Err(_) => false,
            };
            if gone {
                match self.partial.unlink(&name) {
                    Ok(()) => log::info!(
                        "cache: removed {}, left by a writer that is gone",
                        self.partial.path_of(&name).display()
                    ),
                    Err(e) => log::debug!("cache: {}: {e}", self.partial.path_of(&name).display()),
                }
            }
        }
    }

    /// Looks for a trusted, complete copy of the object `identity` names, `size` bytes.
    pub fn find(&self, identity: &Identity, size: u64) -> Lookup {
        let name = identity.name();
        let path = self.copy_path(&name);
        let file = match self.objects.open_read(&name) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Lookup::Miss("no copy of this version yet".to_owned());
            }
            Err(e) => {
                let why = if e.raw_os_error() == Some(libc::ELOOP) {
                    "is a symbolic link".to_owned()
                } else {
                    format!("cannot be opened ({e})")
                };
                return Lookup::Miss(self.drop_copy(&name, None, &why));
            }
        };
        let st = match fs::fstat(&file) {
            Ok(st) => st,
            Err(e) => return Lookup::Miss(self.drop_copy(&name, Some(&file), &e.to_string())),
        };
        if let Some(why) = self.rules.untrusted_copy(&st) {
            return Lookup::Miss(self.drop_copy(&name, Some(&file), &why));
        }
        match record::read(&file, st.st_size as u64, size, identity.bytes()) {
            Ok(digests) => Lookup::Hit(Copy { path, name, file, digests, size }),
            Err(why) => Lookup::Miss(self.drop_copy(&name, Some(&file), &why)),
        }
    }

    /// Drops the copy `name` (the file `file` has open, when given: only if the name still is
    /// that file, so that a good copy renamed there meanwhile stays), with a warning naming
    /// it; what happened, for the report.
    pub fn drop_copy(&self, name: &str, file: Option<&File>, why: &str) -> String {
        let path = self.copy_path(name);
        let still = file.is_none_or(|f| self.objects.names(name, f));
        let what = match self.objects.stat_at(name) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                "left in place (a directory)".to_owned()
            }
            Ok(_) if still => match self.objects.unlink(name) {
                Ok(()) => "dropped".to_owned(),
                Err(e) => format!("could not be dropped ({e})"),
            },
            _ => "already replaced".to_owned(),
        };
        log::warn!(
            "cache: the copy {} {why}: not trusted, {what}; reading the object from the store",
            path.display()
        );
        format!("the copy {} {why}: not trusted, {what}", path.display())
    }
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// A trusted copy of the object as the HEAD shows it, open.
    Hit(Copy),
    /// No usable copy, and why.
    Miss(String),
}

/// A copy found in the cache: open, trusted, its record read.
#[derive(Debug)]
pub struct Copy {
    /// Its path, for messages and reports.
    pub path: PathBuf,
    /// Its name in `objects/`.
    pub name: String,
    /// The copy, open to read (the readers open it again through this descriptor).
    pub file: File,
    /// Per segment, the xxh3 its writer recorded.
    pub digests: Vec<u64>,
    /// The object's bytes (the copy's record follows them).
    pub size: u64,
}

/// The cache as one load found it: opened (and swept) at the load's first object and shared
/// by the rest, or why it is not used, so that a cache whose file system hangs or refuses costs
/// one bounded wait and one warning per load, not one per object.
#[derive(Debug, Default)]
pub enum Opened {
    /// Not looked at yet.
    #[default]
    NotYet,
    /// Open.
    Open(Arc<CacheDir>),
    /// Not used for the rest of the load, and why.
    Unusable(String),
}

/// Looks for `identity`'s copy in the cache at `dir`, opening it first (and removing what
/// killed writers left) when `opened` says this load has not yet: on a thread of its own,
/// waited for at most [`LOOKUP_WAIT`], so that a cache whose file system hangs costs a
/// warning, not the load. The open cache (to write a copy into), and what was found.
pub fn open_and_find(
    dir: &Path,
    shared: bool,
    opened: &mut Opened,
    identity: Option<Identity>,
    size: u64,
) -> (Option<Arc<CacheDir>>, Lookup) {
    let known = match opened {
        Opened::Unusable(why) => return (None, Lookup::Miss(format!("not cached: {why}"))),
        Opened::Open(cache) => Some(Arc::clone(cache)),
        Opened::NotYet => None,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let path = dir.to_path_buf();
    let spawned = std::thread::Builder::new().name("gantry-cache".to_owned()).spawn(move || {
        let cache = match known {
            Some(cache) => Ok(cache),
            None => CacheDir::open(&path, shared).map(|cache| {
                cache.sweep();
                Arc::new(cache)
            }),
        };
        let result = cache.map(|cache| {
            let found = match &identity {
                Some(identity) => cache.find(identity, size),
                None => Lookup::Miss("the object has no ETag or generation".to_owned()),
            };
            (cache, found)
        });
        let _ = tx.send(result);
    });
    let why = match spawned.map(|_| rx.recv_timeout(LOOKUP_WAIT)) {
        Ok(Ok(Ok((cache, found)))) => {
            *opened = Opened::Open(Arc::clone(&cache));
            return (Some(cache), found);
        }
        Ok(Ok(Err(e))) => e,
        Ok(Err(_)) => format!(
            "the cache at {} did not answer within {} s",
            dir.display(),
            LOOKUP_WAIT.as_secs()
        ),
        Err(e) => format!("starting the cache's thread: {e}"),
    };
    log::warn!("cache: {why}; the load goes on without the cache");
    *opened = Opened::Unusable(why.clone());
    (None, Lookup::Miss(format!("not cached: {why}")))
}

#[cfg(test)]
mod tests;
