//! A local write-through cache of objects (`Config::cache_dir`): a load from object storage
//! also writes each object it reads whole into the cache directory as its parts arrive (no
//! second GET), and a later load of the same object reads the local copy with the local
//! readers (io_uring `O_DIRECT` when cold) after a HEAD shows the object unchanged.
//!
//! An object's copy is `DIR/<bucket>/<key>@<ETag>` (the bucket as
//! [`super::object::client::Client::cache_name`] spells it: `gs/<bucket>` for Google Cloud
//! Storage, `az/<account>/<container>` for Azure): the ETag in the name is what makes a copy
//! trustworthy, so a rewritten object (new ETag) never matches an old copy, and there is no
//! separate metadata to keep consistent. A copy is written under a temporary name
//! (`...@<ETag>.partial-<pid>-<n>`) and renamed into place only once every byte of the object
//! arrived (each part was a GET conditioned on that ETag) and a last HEAD still shows that
//! ETag and size; so a load that is interrupted, fails or is cancelled leaves only a
//! temporary file, which no load trusts. Several processes loading the same object at once
//! each write their own temporary file; the renames are atomic and the bytes the same, so
//! whichever lands last wins and readers never see a partial copy. A cache that cannot be
//! written (unwritable directory, full disk) costs a warning, never the load. The copy is not
//! synced to disk before the rename: a kill leaves nothing to trust, but a power loss may
//! leave a named copy whose pages never reached the disk (`verify_sha256` catches that).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Where the copy of `bucket`/`key` at `etag` lives under `dir`; `None` when the key or ETag
/// cannot name a file safely (empty, `.` or `..` components).
pub fn copy_path(dir: &Path, bucket: &str, key: &str, etag: Option<&str>) -> Option<PathBuf> {
    let etag = etag?.trim_matches('"');
    let etag: String = etag
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    let safe = |part: &str| !part.is_empty() && part != "." && part != "..";
    if etag.is_empty() || !bucket.split('/').all(safe) || !key.split('/').all(safe) {
        return None;
    }
    let mut path = dir.join(bucket).join(key);
    let name = path.file_name()?.to_str()?.to_owned();
    path.set_file_name(format!("{name}@{etag}"));
    Some(path)
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// A complete copy of the object as the HEAD shows it.
    Hit(PathBuf),
    /// No usable copy, and why.
    Miss(String),
}

/// Looks for the copy of an object that a HEAD showed at `etag` and `size` bytes.
pub fn lookup(dir: &Path, bucket: &str, key: &str, etag: Option<&str>, size: u64) -> Lookup {
    let Some(path) = copy_path(dir, bucket, key, etag) else {
        return Lookup::Miss("the object has no ETag or a key that names no file".to_owned());
    };
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() && m.len() == size => Lookup::Hit(path),
        Ok(m) => Lookup::Miss(format!(
            "{} is {} bytes, the object {size}: not trusted",
            path.display(),
            m.len()
        )),
        Err(_) => Lookup::Miss(format!("no copy of ETag {} yet", etag.unwrap_or_default())),
    }
}

/// The copy of one object being written as its parts arrive.
#[derive(Debug)]
pub struct Writer {
    file: File,
    partial: PathBuf,
    /// The name it takes once complete.
    pub path: PathBuf,
    size: u64,
    written: AtomicU64,
    failed: AtomicBool,
}

impl Writer {
    /// A temporary file for the copy of `bucket`/`key` at `etag`, `size` bytes; an error
    /// message (for a warning) when the cache cannot take it.
    pub fn create(
        dir: &Path,
        bucket: &str,
        key: &str,
        etag: Option<&str>,
        size: u64,
    ) -> Result<Self, String> {
        static SEQUENCE: AtomicU64 = AtomicU64::new(0);
        let path = copy_path(dir, bucket, key, etag)
            .ok_or("the object has no ETag or a key that names no file")?;
        let parent = path.parent().expect("under the cache directory");
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let mut partial = path.clone().into_os_string();
        partial.push(format!(".partial-{}-{n}", std::process::id()));
        let partial = PathBuf::from(partial);
        let file = File::create_new(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
        // Reserve the space first, so that a full disk shows now rather than mid-load.
        // SAFETY: a valid descriptor; fallocate only changes the file's allocation.
        if unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, size as i64) }
            != 0
        {
            let e = std::io::Error::last_os_error();
            let _ = std::fs::remove_file(&partial);
            return Err(format!("{}: reserving {size} bytes: {e}", partial.display()));
        }
        Ok(Self {
            file,
            partial,
            path,
            size,
            written: AtomicU64::new(0),
            failed: AtomicBool::new(false),
        })
    }

    /// Writes the bytes of one part, at `offset`. A failure is logged once and stops the copy.
    pub fn write_at(&self, bytes: &[u8], offset: u64) {
        if self.failed.load(Ordering::Relaxed) {
            return;
        }
        match self.file.write_all_at(bytes, offset) {
            Ok(()) => {
                self.written.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                if !self.failed.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "cache: writing {} failed ({e}); the load goes on without caching it",
                        self.partial.display()
                    );
                }
            }
        }
    }

    /// Whether every byte of the object was written.
    pub fn complete(&self) -> bool {
        !self.failed.load(Ordering::Relaxed) && self.written.load(Ordering::Relaxed) == self.size
    }

    /// Renames the copy into place, if it is complete and `still_same` (a HEAD now shows the
    /// same ETag and size); otherwise removes it. Returns what happened, for the report.
    pub fn finish(self, still_same: Result<bool, String>) -> String {
        if !self.complete() {
            return format!("not cached: the copy at {} is incomplete", self.partial.display());
        }
        match still_same {
            Ok(true) => match std::fs::rename(&self.partial, &self.path) {
                Ok(()) => format!("written through to the cache at {}", self.path.display()),
                Err(e) => {
                    log::warn!("cache: renaming {} failed: {e}", self.partial.display());
                    format!("not cached: renaming the copy failed: {e}")
                }
            },
            Ok(false) => "not cached: the object changed since the load began".to_owned(),
            Err(e) => format!("not cached: the last HEAD failed: {e}"),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // After a rename the temporary name is gone; before it, nothing may trust the file.
        let _ = std::fs::remove_file(&self.partial);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_paths() {
        let dir = Path::new("/c");
        let cases = [
            ("b", "m/x.safetensors", Some("\"abc-1\""), Some("/c/b/m/x.safetensors@abc-1")),
            ("b", "x.safetensors", Some("a/b\"c"), Some("/c/b/x.safetensors@a_b_c")),
            ("b", "x.safetensors", None, None),
            ("b", "x.safetensors", Some("\"\""), None),
            ("b", "../x.safetensors", Some("e"), None),
            ("b", "m//x.safetensors", Some("e"), None),
            ("..", "x.safetensors", Some("e"), None),
            ("gs/b", "x.safetensors", Some("e"), Some("/c/gs/b/x.safetensors@e")),
            ("az/a/c", "m/x", Some("\"0x8D\""), Some("/c/az/a/c/m/x@0x8D")),
            ("gs/..", "x.safetensors", Some("e"), None),
            ("gs//b", "x.safetensors", Some("e"), None),
        ];
        for (bucket, key, etag, want) in cases {
            assert_eq!(
                copy_path(dir, bucket, key, etag),
                want.map(PathBuf::from),
                "{key} {etag:?}"
            );
        }
    }

    #[test]
    fn only_a_complete_copy_is_renamed() {
        let dir = tempfile::tempdir().unwrap();
        let (etag, size) = (Some("e1"), 10);
        let w = Writer::create(dir.path(), "b", "m/x", etag, size).unwrap();
        w.write_at(&[1; 6], 0);
        let text = w.finish(Ok(true));
        assert!(text.contains("incomplete"), "{text}");
        assert!(matches!(lookup(dir.path(), "b", "m/x", etag, size), Lookup::Miss(_)));
        assert_eq!(std::fs::read_dir(dir.path().join("b/m")).unwrap().count(), 0);

        let w = Writer::create(dir.path(), "b", "m/x", etag, size).unwrap();
        w.write_at(&[2; 4], 6);
        w.write_at(&[1; 6], 0);
        assert!(w.finish(Ok(false)).contains("changed"));
        assert!(matches!(lookup(dir.path(), "b", "m/x", etag, size), Lookup::Miss(_)));

        let w = Writer::create(dir.path(), "b", "m/x", etag, size).unwrap();
        w.write_at(&[2; 4], 6);
        w.write_at(&[1; 6], 0);
        assert!(w.finish(Ok(true)).contains("written through"));
        let Lookup::Hit(path) = lookup(dir.path(), "b", "m/x", etag, size) else { panic!() };
        assert_eq!(std::fs::read(path).unwrap(), [1, 1, 1, 1, 1, 1, 2, 2, 2, 2]);
        assert!(matches!(lookup(dir.path(), "b", "m/x", Some("e2"), size), Lookup::Miss(_)));
        assert!(matches!(lookup(dir.path(), "b", "m/x", etag, 11), Lookup::Miss(_)));
    }
}
