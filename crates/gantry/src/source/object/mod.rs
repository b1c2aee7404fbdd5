//! Object storage: checkpoints in S3 (or an S3-compatible store), Google Cloud Storage or
//! Azure Blob Storage, streamed into the staging ring with ranged GETs, many in flight.
//!
//! A source `s3://bucket/key.safetensors` (or `gs://`, `az://`, ... see [`source`]) is one
//! file; `s3://bucket/prefix/` is a checkpoint folder (its `model.safetensors.index.json`,
//! else its `*.safetensors`); a key ending in `.json` is an index. A file's header comes from
//! one ranged GET of its first bytes (its size and version from the same answer), a second
//! for a header longer than that. At load time every part is a
//! ranged GET conditioned on the ETag its header was read at (or a HEAD before the load saw,
//! where a cache needs one), and on Google Cloud Storage also pinned to its generation, and
//! each answer's ETag and size are checked against them (a store that ignores `If-Match`
//! included), so an object rewritten since is an error, never a mix of two versions; each
//! part lands in a staging buffer of the ring (or in place, where its extent's destination
//! takes it whole) and goes through the same copy steps as a local read, so memory stays
//! bounded by the ring. A part's GET does not wait for its buffers to be issued: they are
//! bound, in the order the parts were issued, while it waits for its first byte
//! (`Binder`), so far from the store more GETs are in flight than the ring holds parts.
//!
//! A key is what the store holds, byte for byte: the one from the URL as written (see
//! [`source`]), from an index, or from a listing, never escaped by us (the client encodes it
//! once on the wire; `object_store`'s `Path::from` would escape reserved characters a second
//! time and name another object). Keys the client cannot address at all (`a//b`, a leading
//! `/`, `.` or `..` segments, control characters) are an error naming the key.
//!
//! The clients are the `object_store` crate's ([`client`]: each provider's own environment
//! and credential chain, retries with backoff on 5xx and throttling). Their async runtime
//! stays inside this module. Errors name the object, never the credentials.

pub mod client;
pub mod settings;
pub mod source;
pub mod tune;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{self, Either};
use futures::{FutureExt, StreamExt};
use gantry_format::{
    check_prefix, parse_header, parse_index, Checkpoint, ErrorKind, FileId, FormatError, Header,
    INDEX_FILE_NAME, MAX_INDEX_BYTES, PREFIX_BYTES,
};
use object_store::path::Path as ObjectPath;
use object_store::{Attribute, GetOptions, GetRange, ObjectMeta, ObjectStore, ObjectStoreExt};

use crate::engine::read::fault::FaultInjector;
use crate::engine::read::uring::Job;
use crate::engine::read::{complete, Completion, Failed, Message};
use crate::engine::staging::{Lease, Pool};
use crate::error::{Error, Result};
use crate::integrity::{self, Known, SUMS_FILE_NAME};
pub(crate) use client::Options;
use client::{block_on, changed, panicked, request_error, runtime};
pub use settings::endpoint_options;
pub use source::{is_url, Provider, Source};

/// Opens an object source and validates every header, reading no tensor data.
pub fn open_checkpoint(path: &Path, options: &Options) -> Result<Checkpoint> {
    let source = parse(path)?;
    let store = client::client(&source, options)?.store;
    block_on(path, async {
        let key = source.key.clone();
        let remote = Remote { store, source };
        if remote.source.is_prefix() {
            remote.open_prefix(&key).await
        } else if key.ends_with(".json") {
            remote.open_index(&key).await
        } else {
            let (header, pin) = match remote.header(&key).await {
                Err(e) if is_not_found(&e) => return Err(remote.did_you_mean(&key, e).await),
                result => result?,
            };
            let checkpoint = Checkpoint::from_headers(vec![(remote.url_of(&key), header)])?;
            Ok(pinned(checkpoint, vec![pin]))
        }
    })?
}

/// Most shard headers read at once when a checkpoint is opened: each costs a round trip or
/// two, which would otherwise add up shard after shard.
const HEADER_READS_MAX: usize = 16;

/// Bytes the first GET of a shard asks for: its 8-byte length and the header of nearly every
/// checkpoint (a Llama-3-8B shard's header is under 30 KB, a shard of a large mixture of
/// experts' a few hundred KB) in one round trip, instead of a HEAD and two GETs one after
/// another. A longer header costs one more GET; the bytes past it are read again by the load.
const HEADER_GUESS_BYTES: u64 = 256 << 10;

/// `path` as an object source; an error when it names none.
fn parse(path: &Path) -> Result<Source> {
    let text = path.to_str().unwrap_or_default();
    Source::parse(text)?.ok_or_else(|| Error::Config(format!("'{text}' is not an object URL")))
}

/// Whether `e` says an object is not there.
fn is_not_found(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
}

/// Object `key` (at `url`, for errors) as the client addresses it: the key exactly as it is,
/// never escaped again (the client percent-encodes it once, on the wire). A key the client
/// cannot address (an empty segment `a//b`, a leading `/`, a `.` or `..` segment, a control
/// character) is an error naming it, never another object.
fn location(url: &Path, key: &str) -> Result<ObjectPath> {
    let parsed = ObjectPath::parse(key).ok().filter(|p| p.as_ref() == key || key.is_empty());
    parsed.ok_or_else(|| {
        Error::Config(format!(
            "{}: the key '{}' cannot be read: object keys with an empty segment ('//'), a \
             leading '/', a '.' or '..' segment or a control character are not supported",
            url.display(),
            key.escape_debug()
        ))
    })
}

/// What every GET of one object is conditioned on: the ETag the load saw and, on Google Cloud
/// Storage, its generation (a GET of a generation since overwritten finds nothing, and S3 and
/// Azure versions are only there where versioning is on).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pin {
    etag: Option<String>,
    generation: Option<String>,
}

impl Pin {
    /// The version this pin names, as [`gantry_format::FileInfo::version`] keeps it.
    fn version(&self) -> Option<String> {
        match (&self.etag, &self.generation) {
            (None, None) => None,
            (etag, None) => etag.clone(),
            (etag, Some(g)) => Some(format!("{}#{g}", etag.as_deref().unwrap_or_default())),
        }
    }

    /// The pin [`Pin::version`] made `version` from (on Google Cloud Storage, the generation,
    /// all digits, follows the last `#`).
    fn of_version(provider: Provider, version: Option<&str>) -> Self {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let generation = |g: &str| !g.is_empty() && g.bytes().all(|b| b.is_ascii_digit());
        match (provider, version) {
            (_, None) => Self { etag: None, generation: None },
            (Provider::Gcs, Some(v)) => match v.rsplit_once('#') {
                Some((etag, g)) if generation(g) => Self { etag: some(etag), generation: some(g) },
                _ => Self { etag: some(v), generation: None },
            },
            (_, Some(v)) => Self { etag: some(v), generation: None },
        }
    }

    /// Whether GETs under this pin fail once the object is rewritten: a generation, or one
    /// ETag (not empty, not `*`, not a list, each of which `If-Match` takes for any object or
    /// for more than one).
    fn binds(&self) -> bool {
        let one_etag = |e: &String| !e.is_empty() && e != "*" && !e.contains(',');
        self.generation.is_some() || self.etag.as_ref().is_some_and(one_etag)
    }

    /// `Err` naming `url` when a GET's answer (`meta`) is not of the version pinned or not
    /// `size` bytes long: a store that ignores `If-Match`, or a size the caller got wrong,
    /// never lands another version's bytes.
    fn check(&self, url: &Path, offset: u64, len: u64, size: u64, meta: &ObjectMeta) -> Result<()> {
        fn etag(e: &Option<String>) -> Option<&str> {
            e.as_deref().map(|e| e.trim_start_matches("W/"))
        }
        let why = match (etag(&self.etag), etag(&meta.e_tag)) {
            (Some(read), Some(now)) if read != now => {
                format!("its header was read at ETag {read}, this GET answered with ETag {now}")
            }
            _ if meta.size != size => format!(
                "its header was read from {size} bytes, this GET answered for {} bytes",
                meta.size
            ),
            _ => return Ok(()),
        };
        Err(changed("get", url, offset, len, &why))
    }

    fn of(provider: Provider, meta: &ObjectMeta) -> Self {
        let generation = meta.version.clone().filter(|_| provider == Provider::Gcs);
        Self { etag: meta.e_tag.clone(), generation }
    }

    /// A ranged GET of `range` under this pin.
    fn get(&self, range: std::ops::Range<u64>) -> GetOptions {
        GetOptions {
            range: Some(GetRange::Bounded(range)),
            if_match: self.etag.clone(),
            version: self.generation.clone(),
            ..Default::default()
        }
    }

    /// The error for a failed GET under this pin ([`Pin::changed`], else the request's).
    fn error(&self, url: &Path, offset: u64, len: u64, e: object_store::Error) -> Error {
        match self.changed(url, offset, len, &e) {
            Some(changed) => changed,
            None => request_error("get", url, offset, len, e),
        }
    }

    /// A GET that failed with `e` because the object was rewritten since its header was
    /// read under this pin (a pinned generation not found, an ETag that no longer matches):
    /// the error that says so.
    fn changed(&self, url: &Path, offset: u64, len: u64, e: &object_store::Error) -> Option<Error> {
        let why = match (e, &self.generation, &self.etag) {
            (object_store::Error::NotFound { .. }, Some(g), _) => {
                format!("its header was read at generation {g}, which is gone")
            }
            (object_store::Error::Precondition { .. }, _, Some(etag)) => {
                format!("its header was read at ETag {etag}, which no longer matches")
            }
            _ => return None,
        };
        Some(changed("get", url, offset, len, &why))
    }
}

struct Remote {
    store: Arc<dyn ObjectStore>,
    source: Source,
}

impl Remote {
    fn url_of(&self, key: &str) -> PathBuf {
        self.source.url_of(key)
    }

    async fn open_prefix(&self, prefix: &str) -> Result<Checkpoint> {
        let url = self.url_of(prefix);
        let location = location(&url, prefix.trim_end_matches('/'))?;
        let listing = self
            .store
            .list_with_delimiter(Some(&location))
            .await
            .map_err(|e| request_error("list", &url, 0, 0, e))?;
        let mut shards = Vec::new();
        let mut indexes = Vec::new();
        for object in listing.objects {
            let key = object.location.to_string();
            let name = key.rsplit('/').next().unwrap_or_default().to_owned();
            if name.ends_with(".safetensors.index.json") {
                indexes.push((name != INDEX_FILE_NAME, key));
            } else if name.ends_with(".safetensors") {
                shards.push(key);
            }
        }
        indexes.sort();
        shards.sort();
        match indexes.as_slice() {
            [] => {}
            [(_, index)] | [(false, index), ..] => {
                // The listed shards' headers are read while the index is: the shards it names
                // are nearly always those (one more GET each for any it names that were not
                // listed; a listed one it does not name costs one GET, its result unused).
                // An index that cannot be read fails the open at once, its shards' reads
                // dropped.
                let (read, listed) = (self.read_index(index), self.headers(&shards));
                let (read, listed) = match future::select(Box::pin(read), Box::pin(listed)).await {
                    Either::Left((read, listed)) => (read?, listed.await),
                    Either::Right((listed, read)) => (read.await?, listed),
                };
                let mut listed: HashMap<_, _> = shards.iter().zip(listed).collect();
                let (url, read) = read;
                return self.open_index_with(index, &url, read, |key| listed.remove(key)).await;
            }
            _ => {
                let candidates = indexes.into_iter().map(|(_, k)| k).collect();
                return Err(FormatError::new(&url, ErrorKind::AmbiguousIndex { candidates }).into());
            }
        }
        if shards.is_empty() {
            return Err(FormatError::new(&url, ErrorKind::NoCheckpoint).into());
        }
        let headers = self.headers(&shards).await;
        let headers = shards
            .iter()
            .zip(headers)
            .map(|(key, header)| Ok((self.url_of(key), header?)))
            .collect::<Vec<Result<_>>>();
        let (headers, pins): (Vec<_>, Vec<_>) = headers
            .into_iter()
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .map(|(url, (header, pin))| ((url, header), pin))
            .unzip();
        Ok(pinned(Checkpoint::from_headers(headers)?, pins))
    }

    /// `not_found`, for object `key` that is not there; when `key/` is a prefix that holds a
    /// checkpoint (what was meant, without its trailing slash), an error that says so.
    async fn did_you_mean(&self, key: &str, not_found: Error) -> Error {
        let folder = format!("{key}/");
        let Ok(prefix) = ObjectPath::parse(&folder) else { return not_found };
        let Ok(listing) = self.store.list_with_delimiter(Some(&prefix)).await else {
            return not_found;
        };
        let checkpoint = listing.objects.iter().any(|o| {
            let name = o.location.filename().unwrap_or_default();
            name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json")
        });
        if !checkpoint {
            return not_found;
        }
        let url = self.url_of(key);
        let why = format!(
            "there is no object '{key}', but the prefix {} holds a checkpoint: write the \
             source with its trailing '/'",
            self.url_of(&folder).display()
        );
        Error::Io {
            op: "head",
            path: url,
            offset: 0,
            len: 0,
            source: io::Error::new(io::ErrorKind::NotFound, why),
        }
    }

    /// The headers of objects `keys`, read at once ([`HEADER_READS_MAX`] in flight), in order.
    async fn headers(&self, keys: &[String]) -> Vec<Result<(Header, Pin)>> {
        futures::stream::iter(keys)
            .map(|key| self.header(key))
            .buffered(HEADER_READS_MAX)
            .collect()
            .await
    }

    async fn open_index(&self, key: &str) -> Result<Checkpoint> {
        let (url, index) = self.read_index(key).await?;
        self.open_index_with(key, &url, index, |_| None).await
    }

    /// The index at `key` (and its URL), parsed: one ranged GET of at most
    /// [`MAX_INDEX_BYTES`] and one byte, whose answer also gives the object's size (a larger
    /// index is refused unread). Where that GET fails (an empty object, a store that will not
    /// answer a range past the end with part of it, any error), a HEAD and a GET, which name
    /// what is wrong.
    async fn read_index(&self, key: &str) -> Result<(PathBuf, gantry_format::Index)> {
        let url = self.url_of(key);
        let location = location(&url, key)?;
        let too_large = |size: u64| {
            let message = format!("larger than the cap of {MAX_INDEX_BYTES} bytes");
            (size > MAX_INDEX_BYTES)
                .then(|| FormatError::new(&url, ErrorKind::BadIndex { message }))
        };
        let capped = GetOptions {
            range: Some(GetRange::Bounded(0..MAX_INDEX_BYTES + 1)),
            ..Default::default()
        };
        let bytes = match self.store.get_opts(&location, capped).await {
            Ok(answer) => {
                let size = answer.meta.size;
                if let Some(e) = too_large(size) {
                    return Err(e.into());
                }
                let bytes =
                    answer.bytes().await.map_err(|e| request_error("get", &url, 0, size, e))?;
                exact(&url, 0, size, bytes)?
            }
            Err(e) if is_final(&e) => return Err(request_error("get", &url, 0, 0, e)),
            Err(_) => {
                let meta = self
                    .store
                    .head(&location)
                    .await
                    .map_err(|e| request_error("head", &url, 0, 0, e))?;
                if let Some(e) = too_large(meta.size) {
                    return Err(e.into());
                }
                self.store
                    .get(&location)
                    .await
                    .map_err(|e| request_error("get", &url, 0, meta.size, e))?
                    .bytes()
                    .await
                    .map_err(|e| request_error("get", &url, 0, meta.size, e))?
            }
        };
        let index = parse_index(&url, &bytes)?;
        Ok((url, index))
    }

    /// The checkpoint of `index` (object `key`, at `url`): its shards' headers, each from
    /// `prefetched` when it has the shard's key, else read now.
    async fn open_index_with(
        &self,
        key: &str,
        url: &Path,
        index: gantry_format::Index,
        mut prefetched: impl FnMut(&String) -> Option<Result<(Header, Pin)>>,
    ) -> Result<Checkpoint> {
        let base = key.rsplit_once('/').map_or("", |(dir, _)| dir);
        let keys: Vec<String> = index
            .shards
            .iter()
            .map(|shard| if base.is_empty() { shard.clone() } else { format!("{base}/{shard}") })
            .collect();
        let mut results: Vec<_> = keys.iter().map(&mut prefetched).collect();
        let missing: Vec<String> = keys
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        let mut read = self.headers(&missing).await.into_iter();
        for result in results.iter_mut().filter(|r| r.is_none()) {
            *result = read.next();
        }
        let mut headers = Vec::with_capacity(keys.len());
        let mut pins = Vec::with_capacity(keys.len());
        for (position, (key, result)) in keys.iter().zip(results).enumerate() {
            match result.unwrap_or_else(|| Err(Error::Internal(format!("{key}: not read")))) {
                Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    return Err(index.missing_shard(url, position).into());
                }
                Err(e) => return Err(e),
                Ok((header, pin)) => {
                    headers.push((self.url_of(key), header));
                    pins.push(pin);
                }
            }
        }
        Ok(pinned(Checkpoint::from_headers(headers)?.with_index(index)?, pins))
    }

    /// The validated header of object `key` and the version it was read at: one GET of its
    /// first [`HEADER_GUESS_BYTES`], whose answer also gives the object's size and ETag (and
    /// generation), then, for a longer header, one more GET of the rest pinned to that
    /// version. Where that first GET fails (an empty object, a store that will not answer a
    /// range past the end with part of it, any error), the object is read as before: its size
    /// from a HEAD, then the 8-byte length and the header, which name what is wrong.
    async fn header(&self, key: &str) -> Result<(Header, Pin)> {
        let url = self.url_of(key);
        let location = location(&url, key)?;
        let guess = GetOptions {
            range: Some(GetRange::Bounded(0..HEADER_GUESS_BYTES)),
            ..Default::default()
        };
        let first = match self.store.get_opts(&location, guess).await {
            Ok(first) => first,
            Err(e) if is_final(&e) => return Err(request_error("get", &url, 0, 0, e)),
            Err(_) => return self.header_after_head(&url, &location).await,
        };
        let (size, pin) = (first.meta.size, Pin::of(self.source.provider, &first.meta));
        if size < PREFIX_BYTES {
            return Err(FormatError::new(&url, ErrorKind::TooSmall { file_len: size }).into());
        }
        let asked = HEADER_GUESS_BYTES.min(size);
        let head = first.bytes().await.map_err(|e| pin.error(&url, 0, asked, e))?;
        let head = exact(&url, 0, asked, head)?;
        let header_len = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let header_len = check_prefix(&url, header_len, size)?;
        let end = PREFIX_BYTES + header_len;
        let header = if end <= head.len() as u64 {
            head.slice(PREFIX_BYTES as usize..end as usize)
        } else {
            let have = head.len() as u64;
            let rest = self.range(&location, &url, have, end - have, &pin).await?;
            [&head[PREFIX_BYTES as usize..], &rest[..]].concat().into()
        };
        Ok((parse_header(&url, &header, size)?, pin))
    }

    /// [`Self::header`] the long way: the object's size from a HEAD, then two ranged GETs
    /// pinned to the version it showed.
    async fn header_after_head(&self, url: &Path, location: &ObjectPath) -> Result<(Header, Pin)> {
        let meta =
            self.store.head(location).await.map_err(|e| request_error("head", url, 0, 0, e))?;
        let size = meta.size;
        if size < PREFIX_BYTES {
            return Err(FormatError::new(url, ErrorKind::TooSmall { file_len: size }).into());
        }
        let pin = Pin::of(self.source.provider, &meta);
        let prefix = self.range(location, url, 0, PREFIX_BYTES, &pin).await?;
        let header_len = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
        let header_len = check_prefix(url, header_len, size)?;
        let header = self.range(location, url, PREFIX_BYTES, header_len, &pin).await?;
        Ok((parse_header(url, &header, size)?, pin))
    }

    async fn range(
        &self,
        location: &ObjectPath,
        url: &Path,
        offset: u64,
        len: u64,
        pin: &Pin,
    ) -> Result<bytes::Bytes> {
        if len == 0 {
            return Ok(bytes::Bytes::new());
        }
        let bytes = self
            .store
            .get_opts(location, pin.get(offset..offset + len))
            .await
            .map_err(|e| pin.error(url, offset, len, e))?
            .bytes()
            .await
            .map_err(|e| pin.error(url, offset, len, e))?;
        exact(url, offset, len, bytes)
    }
}

/// `bytes`, the body of a GET of `len` bytes at `offset` of object `url`, when it has exactly
/// that many: fewer is [`Error::Truncated`], more an error (the client checks the answer's
/// range, not its body's length).
fn exact(url: &Path, offset: u64, len: u64, bytes: bytes::Bytes) -> Result<bytes::Bytes> {
    let got = bytes.len() as u64;
    if got < len {
        let path = url.to_path_buf();
        return Err(Error::Truncated { path, offset: offset + got, expected_len: offset + len });
    }
    if got > len {
        return Err(Error::Io {
            op: "get",
            path: url.to_path_buf(),
            offset,
            len,
            source: io::Error::other(format!("the server sent {got} bytes for a range of {len}")),
        });
    }
    Ok(bytes)
}

/// Whether a failed GET of an object's first bytes already says all a HEAD would (it is not
/// there, or not ours to read, or changed): anything else (an object too short for the range,
/// a store that answers a range otherwise) is read again the long way, which names it.
fn is_final(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    matches!(
        e,
        E::NotFound { .. }
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::Precondition { .. }
    )
}

/// An object opened for a load: its size and ETag as its header's read (or a HEAD before the
/// load) saw them.
#[derive(Debug, Clone)]
pub struct ObjectFile {
    /// `s3://bucket/key` (`gs://`, `az://`, ...), for errors.
    pub path: PathBuf,
    store: Arc<dyn ObjectStore>,
    location: ObjectPath,
    /// Bytes.
    pub size: u64,
    /// The ETag every part is conditioned on.
    pub etag: Option<String>,
    /// The generation every part is pinned to (Google Cloud Storage).
    pub generation: Option<String>,
    /// Where its bucket lives, for the name of its copy in a cache directory.
    pub origin: super::cache::Origin,
    /// The local copy being written as the parts arrive ([`super::cache`]), if any.
    pub cache: Option<Arc<super::cache::Writer>>,
    /// Whether its client may carry several GETs on one connection ([`client::Client`]):
    /// then a part's buffers are bound before its GET is issued ([`Binder`]).
    multiplexed: bool,
}

impl ObjectFile {
    /// The object's key.
    pub fn key(&self) -> &str {
        self.location.as_ref()
    }

    /// A copy of this handle that writes no cache copy.
    pub fn without_cache(&self) -> Self {
        Self { cache: None, ..self.clone() }
    }

    /// Whether a HEAD now shows the ETag (and generation) and size the load saw.
    pub fn unchanged(&self) -> std::result::Result<bool, String> {
        let meta = block_on(&self.path, self.store.head(&self.location))
            .map_err(|e| e.to_string())?
            .map_err(|e| request_error("head", &self.path, 0, 0, e).to_string())?;
        let generation_same = self.generation.is_none() || meta.version == self.generation;
        Ok(meta.e_tag == self.etag && meta.size == self.size && generation_same)
    }

    fn pin(&self) -> Pin {
        Pin { etag: self.etag.clone(), generation: self.generation.clone() }
    }

    /// What names this version of the object in a cache directory (`None`: no version).
    pub fn cache_identity(&self) -> Option<super::cache::Identity> {
        let (etag, generation) = (self.etag.as_deref(), self.generation.as_deref());
        super::cache::Identity::new(&self.origin, self.key(), etag, generation, self.size)
    }

    /// Fills `buf` with the object's bytes from `offset` (GETs conditioned on the version
    /// the load saw), blocking this thread: how a cache copy's failed extent is replaced.
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let job = Job { extent: 0, file: FileId(0), offset, len: buf.len() as u64, target: None };
        let target = crate::engine::read::RawTarget { ptr: buf.as_mut_ptr(), len: buf.len() };
        let file = self.without_cache();
        let dests = &mut [Dest::Target(target)];
        let times = &mut Times::default();
        let landed = &mut |_: usize, _: &mut Dest| {};
        let get = PartGet { file: &file, part: &[job], fault: None, net: None };
        runtime()?.block_on(fetch_into(get, dests, None, times, landed))
    }
}

/// Each file of `checkpoint` (in its order) with the version its header was read at.
fn pinned(mut checkpoint: Checkpoint, pins: Vec<Pin>) -> Checkpoint {
    for (file, pin) in checkpoint.files.iter_mut().zip(pins) {
        file.version = pin.version();
    }
    checkpoint
}

/// Opens objects `infos` for a load: each must still be the version (size, ETag and
/// generation) whose header was read, or its data would not be what the header describes.
/// With `head`, or where no version was read (a store that gives no ETag), a HEAD says so
/// before the load, all in flight at once (one round trip for the lot, not one per file): a
/// cache needs it, to trust a copy of a version the store may have replaced. Without, every
/// GET of the load is conditioned on the version read (`If-Match`, the generation), so a
/// rewrite since fails the GET that meets it, naming the object, and the round trip is saved.
/// One result per info, in order.
pub fn open_for_load(
    infos: &[&gantry_format::FileInfo],
    options: &Options,
    head: bool,
) -> Vec<Result<ObjectFile>> {
    let sources: Vec<Result<Source>> = infos.iter().map(|info| parse(&info.path)).collect();
    // A HEAD where a cache will trust what it shows, or where the version read pins nothing.
    let asks: Vec<bool> = infos
        .iter()
        .zip(&sources)
        .map(|(info, source)| {
            let binds = |s: &Source| Pin::of_version(s.provider, info.version.as_deref()).binds();
            head || !source.as_ref().is_ok_and(binds)
        })
        .collect();
    let paths: Vec<&Path> =
        infos.iter().zip(&asks).filter(|(_, &ask)| ask).map(|(i, _)| i.path.as_path()).collect();
    let mut heads = match heads(&paths, options) {
        Ok(heads) => heads.into_iter(),
        // No runtime: the same error for each.
        Err(e) => {
            let message = e.to_string();
            return infos.iter().map(|_| Err(Error::Internal(message.clone()))).collect();
        }
    };
    let opened =
        |((info, source), ask): ((&&gantry_format::FileInfo, Result<Source>), bool)| match ask {
            true => match heads.next() {
                Some(head) => still_the_same(info, head?),
                None => Err(Error::Internal("a HEAD went missing".into())),
            },
            false => as_read(info, source?, options),
        };
    infos.iter().zip(sources).zip(asks).map(opened).collect()
}

/// Object `info` (at `source`, its parsed URL) as its header's read saw it (its size and
/// version), asking the store nothing.
fn as_read(
    info: &gantry_format::FileInfo,
    source: Source,
    options: &Options,
) -> Result<ObjectFile> {
    let path = info.path.as_path();
    let client = client::client(&source, options)?;
    let location = location(path, &source.key)?;
    let Pin { etag, generation } = Pin::of_version(source.provider, info.version.as_deref());
    Ok(ObjectFile {
        path: path.to_path_buf(),
        store: client.store,
        location,
        size: info.file_len,
        etag,
        generation,
        origin: client.cache_name,
        cache: None,
        multiplexed: client.multiplexed,
    })
}

/// Objects `paths` as HEADs show them now, all in flight at once ([`HEADER_READS_MAX`]), in
/// order; a panic inside the client (a backstop) fails its object, named. An error only when
/// there is no runtime to run them on.
fn heads(paths: &[&Path], options: &Options) -> Result<Vec<Result<ObjectFile>>> {
    let Some(first) = paths.first() else { return Ok(Vec::new()) };
    let heads = futures::stream::iter(paths)
        .map(|&path| async move {
            let opened = std::panic::AssertUnwindSafe(head(path, options)).catch_unwind();
            opened.await.unwrap_or_else(|p| Err(panicked(path, p.as_ref())))
        })
        .buffered(HEADER_READS_MAX)
        .collect::<Vec<_>>();
    block_on(first, heads)
}

/// `object` as a HEAD showed it, when it is the version whose header `info` holds.
fn still_the_same(info: &gantry_format::FileInfo, object: ObjectFile) -> Result<ObjectFile> {
    let (path, file_len) = (info.path.as_path(), info.file_len);
    let now = object.pin().version();
    if info.version.is_some() && now != info.version {
        let why = format!(
            "its version is {} now, its header was read at {}",
            now.as_deref().unwrap_or("none"),
            info.version.as_deref().unwrap_or("none")
        );
        return Err(changed("head", path, 0, 0, &why));
    }
    if object.size != file_len {
        return Err(Error::Io {
            op: "head",
            path: path.to_path_buf(),
            offset: 0,
            len: 0,
            source: io::Error::other(format!(
                "the object is {} bytes now, its header was read from {file_len} bytes: it changed",
                object.size
            )),
        });
    }
    Ok(object)
}

/// Fetches `jobs` (by `Job::file` into `files`) into their targets or leased staging
/// buffers, as many ranged GETs in flight, each covering as many consecutive extents of its
/// object, as `net` says from what the GETs measure ([`tune`]), sending each finished extent
/// (or the first error) to `tx`. Returns when every job is done, on the first error, when
/// `cancel` is set or the pool closes.
pub fn run(
    files: &crate::engine::read::ReaderFiles<'_, ObjectFile>,
    jobs: &[Job],
    pool: Option<&Arc<Pool>>,
    net: &Arc<tune::Net>,
    cancel: &AtomicBool,
    fault: Option<Arc<dyn FaultInjector>>,
    tx: &Sender<Result<Message>>,
) {
    let runtime = match runtime() {
        Ok(r) => r,
        Err(e) => {
            let _ = tx.send(Err(e));
            return;
        }
    };
    let failed = Arc::new(AtomicBool::new(false));
    let trace = crate::trace::current();
    let lanes = trace.clone().map(|t| crate::trace::Lanes::new(t, "object GETs"));
    let next = tune::successors(jobs);
    let mut taken = vec![false; jobs.len()];
    let (bind_tx, bind_rx) = std::sync::mpsc::channel();
    let binder = Binder(bind_tx);
    std::thread::scope(|scope| {
        // The staging thread, where any part lands in staging.
        if let Some(pool) = pool.filter(|_| jobs.iter().any(|j| j.target.is_none())) {
            let trace = trace.clone();
            let binding = move || {
                let _in = crate::trace::enter(trace.as_ref(), "object staging");
                staging_thread(pool, bind_rx)
            };
            if let Err(e) =
                std::thread::Builder::new().name("gantry-bind".into()).spawn_scoped(scope, binding)
            {
                let what = "starting the object reader's staging thread";
                let _ = tx.send(Err(Error::Resource { what, source: e }));
                return;
            }
        }
        runtime.block_on(async {
            let mut in_flight = tokio::task::JoinSet::new();
            let stop = || cancel.load(Ordering::Relaxed) || failed.load(Ordering::Relaxed);
            for first in 0..jobs.len() {
                if taken[first] {
                    continue;
                }
                let mut choice = net.target();
                while in_flight.len() >= choice.gets && !stop() {
                    let _ = tokio::time::timeout(Duration::from_millis(50), in_flight.join_next())
                        .await;
                    choice = net.target();
                }
                if stop() {
                    break;
                }
                // This extent and the next ones of its object not yet taken, one GET for all.
                // An extent that does not land in place gets its staging buffer from the
                // staging thread as one comes free ([`Binder`]), not before its GET is issued;
                // a part never asks for more buffers than the pool has (it would wait for
                // buffers only its own bytes could free): the part ends there instead.
                let (mut part, mut dests, mut at, mut staged) = (Vec::new(), Vec::new(), first, 0);
                loop {
                    let dest = match jobs[at].target {
                        Some(target) => Some(Dest::Target(target)),
                        None => {
                            let pool = pool.expect("staged object jobs need a pool");
                            staged += 1;
                            (staged <= pool.count()).then_some(Dest::Unbound)
                        }
                    };
                    let Some(dest) = dest else { break };
                    taken[at] = true;
                    part.push(jobs[at]);
                    dests.push(dest);
                    match next[at].filter(|&n| part.len() < choice.extents && !taken[n]) {
                        Some(n) => at = n,
                        None => break,
                    }
                }
                if part.is_empty() {
                    break; // a pool of no buffers
                }
                let file = files.get(part[0].file).clone();
                let (tx, failed, lanes) = (tx.clone(), Arc::clone(&failed), lanes.clone());
                let (fault, net) = (fault.clone(), Arc::clone(net));
                let unbound = dests.iter().filter(|d| matches!(d, Dest::Unbound)).count();
                let buffers = (unbound > 0).then(|| binder.ask(unbound));
                // The GET's lifetime, for the climb, runs from here to its last byte: waits
                // for buffers and retries included.
                let ticket = net.issue();
                in_flight.spawn(async move {
                    let span = lanes.as_ref().map(|l| (l.begin(), Instant::now()));
                    let mut times = Times::default();
                    // Each extent goes to the consumer as soon as its bytes are in: its
                    // staging buffer turns over (and its tensors are ready) without waiting
                    // for the rest of the part. A panic inside the client (a backstop: its
                    // settings were checked) fails the load with an error rather than losing
                    // the part.
                    let send = &mut |m| drop(tx.send(Ok(m)));
                    let get = PartGet {
                        file: &file,
                        part: &part,
                        fault: fault.as_deref(),
                        net: Some(&net),
                    };
                    let fetched = fetch(get, dests, buffers, &mut times, send);
                    let caught = std::panic::AssertUnwindSafe(fetched).catch_unwind();
                    let fetched = caught
                        .await
                        .unwrap_or_else(|panic| Err(panicked(&file.path, panic.as_ref())));
                    let whole = Job { len: part.iter().map(|j| j.len).sum(), ..part[0] };
                    if let (Some(lanes), Some((span, issued))) = (&lanes, span) {
                        traced_get(lanes, span, issued, times, &file, whole);
                    }
                    match fetched {
                        Ok(()) => net.landed(ticket, whole.len),
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            let _ = tx.send(Err(e));
                        }
                    }
                });
            }
            // Wait for the GETs in flight; once the load failed or was cancelled, abort them (a
            // task is dropped at an await, never in the middle of a copy) rather than wait out
            // their retries.
            while !in_flight.is_empty() {
                if stop() {
                    in_flight.abort_all();
                }
                let _ =
                    tokio::time::timeout(Duration::from_millis(50), in_flight.join_next()).await;
            }
        });
        drop(binder); // the staging thread ends once no GET can ask it for buffers
    });
}

/// Binds staging buffers to parts, apart from their GETs: a part's GET is issued at once and
/// its buffers come as they are free, so a GET waits for its first byte and for buffers at
/// the same time, and one answered before its buffers are free waits with its body in the
/// socket. The buffers go to parts in the order they were issued, each part's all at once
/// (a part never holds some while it waits for the rest) and as soon as they are free,
/// whether the part's GET has answered or not: an extent of a file always has its buffers
/// before the file's later ones, which the consumer may hold until it has (the hashing
/// threads hash each file in order), and one GET slow to answer holds up no other part.
/// Far from the store the ring then keeps several times the GETs streaming it would if each
/// GET took its buffers before it was issued (and waited for its first byte with them).
///
/// Over HTTP/2 (a client with `http1_only` off or `http2_only` on) the GETs share a
/// connection whose window an unread answer holds, so there each GET waits for its buffers
/// before it is issued. A GET's wait for buffers counts against the client's timeout (300 s,
/// or the `timeout` option): one that waits past it breaks and is resumed (one of its
/// [`PART_ATTEMPTS`]). The body's rate is measured from the binding, so bytes already in the
/// socket count as taking no time: a rate a little high for parts of a few MiB.
struct Binder(std::sync::mpsc::Sender<(usize, Buffers)>);

/// Where a part's staging buffers go once bound.
type Buffers = tokio::sync::oneshot::Sender<Vec<Lease>>;

impl Binder {
    /// Asks for `n` buffers of the pool, after the parts that asked before: they come
    /// through the receiver, which closes without them once the pool has closed (the load
    /// failed or stopped).
    fn ask(&self, n: usize) -> tokio::sync::oneshot::Receiver<Vec<Lease>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = self.0.send((n, tx)); // the staging thread ended: `rx` closes
        rx
    }
}

/// The staging thread: answers each request for buffers from `pool` in turn, blocking until
/// they are free; ends when the pool closes (the requests left get no answer) or every
/// [`Binder`] is gone.
fn staging_thread(pool: &Arc<Pool>, requests: std::sync::mpsc::Receiver<(usize, Buffers)>) {
    for (n, answer) in requests {
        let Some(leases) = (0..n).map(|_| pool.acquire()).collect::<Option<Vec<_>>>() else {
            return;
        };
        let _ = answer.send(leases); // a GET aborted since: the leases go back
    }
}

/// When a part's GET answered and when its staging buffers were bound, and the bytes of the
/// extents it handed on.
#[derive(Debug, Default, Clone, Copy)]
struct Times {
    /// The first answer's headers: the time to first byte.
    answered: Option<Instant>,
    /// The part's buffers bound (the body streams from then on).
    bound: Option<Instant>,
    /// Bytes of the extents handed on to the consumer: all of the part's once it succeeded,
    /// those before the failure where it failed.
    handed: u64,
}

/// Records one GET (the bytes it handed on) on a lane of the load's trace, with
/// `ttfb_us` (from issuing it to its answer), `staging_wait_us` (from there until its
/// staging buffers were bound) and `transfer_us` (from there to its last byte) when it was
/// answered.
fn traced_get(
    lanes: &crate::trace::Lanes,
    get: crate::trace::LaneSpan,
    issued: Instant,
    times: Times,
    file: &ObjectFile,
    job: Job,
) {
    let args = crate::trace::Args::new().str("reader", "object").str("volume", "object storage");
    let mut args = args.str("file", file.path.display().to_string()).u64("offset", job.offset);
    if let Some(answered) = times.answered {
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let bound = times.bound.unwrap_or(answered);
        args = args.u64("ttfb_us", micros(answered.duration_since(issued)));
        args = args.u64("staging_wait_us", micros(bound.duration_since(answered)));
        args = args.u64("transfer_us", micros(bound.elapsed()));
    }
    lanes.end(get, "read", "read", args.u64("bytes", times.handed));
}

/// Attempts at one part: the client retries each request; this also resumes a body that
/// broke off mid-way.
const PART_ATTEMPTS: u32 = 4;

/// One GET's part: consecutive extents of one object (one GET for them all), and what sees
/// its reads.
#[derive(Clone, Copy)]
struct PartGet<'a> {
    file: &'a ObjectFile,
    part: &'a [Job],
    /// Rewrites each chunk's read result (fault injection: the tests').
    fault: Option<&'a dyn FaultInjector>,
    /// Where each request's time to first byte and body rate go (none: not measured).
    net: Option<&'a tune::Net>,
}

/// Where a part lands.
enum Dest {
    /// A staging buffer, handed to the consumer with the bytes.
    Staging(Lease),
    /// A staging buffer still to come ([`Binder`]), awaited once the GET has answered.
    Unbound,
    /// The extent's destination itself.
    Target(crate::engine::read::RawTarget),
    /// Handed on: the extent's bytes are in and its message has gone.
    Handed,
}

/// Fetches one part (`get`) into `dests` (one for each of its extents),
/// and gives `send` each extent's message as soon as the body has gone past it, in order, the
/// last one once the body has ended without error (a part that fails after some have gone
/// returns the error, and the rest never go). When the object's cache copy
/// wants the bytes, each extent is copied to it from where it landed before its message goes
/// (the body's own buffers are never held: see [`super::cache::Writer::write`]); with its disk
/// behind the store, the copy fetches them again after the load: the GET never waits for the
/// cache.
async fn fetch(
    get: PartGet<'_>,
    mut dests: Vec<Dest>,
    buffers: Option<tokio::sync::oneshot::Receiver<Vec<Lease>>>,
    times: &mut Times,
    send: &mut (dyn FnMut(Message) + Send),
) -> Result<()> {
    let mut handed = 0;
    let mut landed = |i: usize, dest: &mut Dest| {
        let job = &get.part[i];
        if let Some(cache) = get.file.cache.as_ref().filter(|c| c.wants_bytes()) {
            cache.write(job.offset, &[&*landing(dest, job)]);
        }
        send(match std::mem::replace(dest, Dest::Handed) {
            Dest::Staging(lease) => Message::Staged { extent: job.extent, lease },
            Dest::Target(_) => Message::Direct { extent: job.extent },
            Dest::Unbound | Dest::Handed => {
                unreachable!("fetch_into hands on each extent once, bound")
            }
        });
        handed += job.len;
    };
    let fetched = fetch_into(get, &mut dests, buffers, times, &mut landed).await;
    times.handed = handed;
    fetched
}

/// The bytes extent `job` lands in.
fn landing<'a>(dest: &'a mut Dest, job: &Job) -> &'a mut [u8] {
    match dest {
        Dest::Staging(lease) => &mut lease.as_mut_slice()[..job.len as usize],
        Dest::Unbound => unreachable!("a part's buffers are bound before its body lands"),
        Dest::Handed => unreachable!("an extent is handed on once its bytes are all in"),
        // SAFETY: the target is this extent's alone (Sink::direct_target) or a buffer
        // borrowed for the call (ObjectFile::read_into), exactly its length, and outlives
        // the fetch.
        Dest::Target(t) => unsafe { std::slice::from_raw_parts_mut(t.ptr, t.len) },
    }
}

/// Fills `dests` with the part `get` (one for each of its extents), resuming a body that broke
/// off. The part's [`Dest::Unbound`] buffers come from `buffers`
/// ([`Binder`]), awaited once the first GET has answered (its headers checked). Each chunk is
/// a read result of the extent it lands in, through the part's `fault` and [`take_chunk`]. Each
/// request's time to first byte and body rate (from its buffers' binding) go to its `net`; `times` gets
/// when the first answer came and when the buffers were bound (the trace's). `landed` gets
/// each extent (its index in `part`), in order, once the body has gone past it, and the last
/// once the body has ended without error ([`Progress`]); the extents it has had are not
/// touched again (a body resumed starts after them).
async fn fetch_into(
    get: PartGet<'_>,
    dests: &mut [Dest],
    mut buffers: Option<tokio::sync::oneshot::Receiver<Vec<Lease>>>,
    times: &mut Times,
    landed: &mut (dyn FnMut(usize, &mut Dest) + Send),
) -> Result<()> {
    let PartGet { file, part, net, .. } = get;
    assert!(!part.is_empty() && part.len() == dests.len());
    let mut progress = Progress::new(part);
    let (offset, len) = (part[0].offset, progress.len);
    if len == 0 {
        bind(dests, buffers).await?;
        progress.finish(dests, landed);
        return Ok(());
    }
    // The first answer; then the buffers, for its body. Over HTTP/2 the buffers come first:
    // an answer left unread there holds the connection's window, which the GETs that have
    // their buffers share.
    if file.multiplexed {
        bind(dests, buffers.take()).await?;
    }
    let mut answer = Some(get_checked(file, offset, 0, len).await?);
    times.answered = answer.as_ref().map(|a| a.answered);
    bind(dests, buffers).await?;
    let bound = Instant::now();
    times.bound = Some(bound);
    let mut attempt = 0;
    while progress.filled < len {
        let start = progress.filled;
        attempt += 1;
        let Answered { result, pin, asked, answered } = match answer.take() {
            Some(a) => a,
            None => get_checked(file, offset, start, len).await?,
        };
        // The body streams from its answer, or from its buffers' binding where it waited.
        let streams = bound.max(answered);
        let mut body = result.into_stream();
        let mut broke = None;
        while let Some(chunk) = body.next().await {
            let bytes = match chunk {
                Ok(bytes) => bytes,
                Err(e) => {
                    broke = Some(e);
                    break;
                }
            };
            progress.take(get, dests, bytes, landed)?;
        }
        let filled = progress.filled;
        if let Some(net) = net.filter(|_| filled > start) {
            let ttfb_s = (answered - asked).as_secs_f64();
            net.record(ttfb_s, filled - start, streams.elapsed().as_secs_f64());
        }
        match broke {
            Some(e) if attempt >= PART_ATTEMPTS => {
                return Err(pin.error(&file.path, offset + filled, len - filled, e))
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(100 << attempt)).await,
            None if filled < len => {
                return Err(Error::Truncated {
                    path: file.path.clone(),
                    offset: offset + filled,
                    expected_len: file.size,
                })
            }
            None => {}
        }
    }
    progress.finish(dests, landed);
    Ok(())
}

/// How far a part's body has come.
#[derive(Debug)]
struct Progress {
    /// Bytes of the part, and the index of its last extent with bytes (0 where none has).
    len: u64,
    last: usize,
    /// Bytes of the part filled.
    filled: u64,
    /// The extent being filled (an index in the part), and its bytes filled.
    at: usize,
    in_extent: u64,
    /// The extents before this one have been handed on.
    handed: usize,
}

impl Progress {
    /// Nothing yet of `part`.
    fn new(part: &[Job]) -> Self {
        let len = part.iter().map(|j| j.len).sum();
        let last = part.iter().rposition(|j| j.len > 0).unwrap_or(0);
        Progress { len, last, filled: 0, at: 0, in_extent: 0, handed: 0 }
    }

    /// Takes the body's next chunk `bytes` into the extents of `get`'s part it covers (split
    /// at their boundaries, each piece through its `fault` and [`take_chunk`]), then hands each
    /// extent the body has gone past, in order, to `landed` (where a piece fails, those
    /// before it, then the error). The part's last extent with
    /// bytes (and any after it) goes on in [`Progress::finish`], once the body has ended
    /// without error: a body with more bytes than asked for fails before the part is done.
    fn take(
        &mut self,
        get: PartGet<'_>,
        dests: &mut [Dest],
        mut bytes: bytes::Bytes,
        landed: &mut (dyn FnMut(usize, &mut Dest) + Send),
    ) -> Result<()> {
        let PartGet { file, part, fault, .. } = get;
        let len = self.len;
        if self.filled + bytes.len() as u64 > len {
            return Err(Error::Io {
                op: "get",
                path: file.path.clone(),
                offset: part[0].offset + self.filled,
                len: len - self.filled,
                source: io::Error::other("the server sent more bytes than asked for"),
            });
        }
        while !bytes.is_empty() {
            let job = part[self.at];
            let n = bytes.len().min((job.len - self.in_extent) as usize);
            if n > 0 {
                let buf = landing(&mut dests[self.at], &job);
                let taken = take_chunk(file, job, fault, self.in_extent, bytes.split_to(n), buf);
                let now = match taken {
                    Ok(now) => now,
                    Err(e) => {
                        // The extents before this one are whole: they go on as they would
                        // had the chunk ended there.
                        self.hand(self.at.min(self.last), dests, landed);
                        return Err(e);
                    }
                };
                self.filled += now - self.in_extent;
                self.in_extent = now;
            }
            // Whole (or empty): on to the next extent; the bytes left belong to it (the part's
            // last extent is never whole with bytes left: they were checked above).
            if self.in_extent == job.len && self.at + 1 < part.len() {
                (self.at, self.in_extent) = (self.at + 1, 0);
            }
        }
        // Not the last extent with bytes, even once it is whole: the body may still fail.
        self.hand(self.at.min(self.last), dests, landed);
        Ok(())
    }

    /// Hands the extents not yet handed on, once the body has brought the whole part.
    fn finish(&mut self, dests: &mut [Dest], landed: &mut (dyn FnMut(usize, &mut Dest) + Send)) {
        self.hand(dests.len(), dests, landed);
    }

    /// Hands extents on to `landed`, in order, up to (not including) `end`.
    fn hand(
        &mut self,
        end: usize,
        dests: &mut [Dest],
        landed: &mut (dyn FnMut(usize, &mut Dest) + Send),
    ) {
        while self.handed < end {
            landed(self.handed, &mut dests[self.handed]);
            self.handed += 1;
        }
    }
}

/// Puts the leases `buffers` brings (when it brings any: [`Binder`]) in place of `dests`'
/// [`Dest::Unbound`] buffers; [`Error::Cancelled`] when it closes without them (the pool
/// closed: the load has failed or stopped).
async fn bind(
    dests: &mut [Dest],
    buffers: Option<tokio::sync::oneshot::Receiver<Vec<Lease>>>,
) -> Result<()> {
    let Some(buffers) = buffers else { return Ok(()) };
    let mut leases = buffers.await.map_err(|_| Error::Cancelled)?;
    for dest in dests.iter_mut().filter(|d| matches!(d, Dest::Unbound)) {
        *dest = Dest::Staging(leases.pop().ok_or(Error::Cancelled)?);
    }
    Ok(())
}

/// A ranged GET's answer, its headers checked against the version the load saw.
struct Answered {
    result: object_store::GetResult,
    pin: Pin,
    /// When it was asked and answered (its time to first byte).
    asked: Instant,
    answered: Instant,
}

/// GETs bytes `start..len` of the part at `offset` of `file` (conditioned on its version) and
/// checks the answer's ETag and size.
async fn get_checked(file: &ObjectFile, offset: u64, start: u64, len: u64) -> Result<Answered> {
    let pin = file.pin();
    let asked = Instant::now();
    let result =
        match file.store.get_opts(&file.location, pin.get(offset + start..offset + len)).await {
            Ok(r) => r,
            Err(e) => return Err(pin.error(&file.path, offset + start, len - start, e)),
        };
    pin.check(&file.path, offset + start, len - start, file.size, &result.meta)?;
    Ok(Answered { result, pin, asked, answered: Instant::now() })
}

/// Takes body chunk `bytes` of part `job` into `buf` (which holds the part's first `filled`
/// bytes, and room for the chunk), as read results through `fault` and
/// [`complete`]: a short result takes that much and offers the rest of the chunk as the next
/// read, a retry offers it again. Returns the bytes now filled.
fn take_chunk(
    file: &ObjectFile,
    job: Job,
    fault: Option<&dyn FaultInjector>,
    mut filled: u64,
    bytes: bytes::Bytes,
    buf: &mut [u8],
) -> Result<u64> {
    let failed = Failed { op: "get", path: &file.path, file_len: file.size };
    let mut taken = 0usize;
    while taken < bytes.len() {
        let rest = (bytes.len() - taken) as u64;
        let mut result = rest as i64;
        if let Some(fault) = fault {
            result = fault.rewrite(job.file.0, job.offset + filled, rest, result);
        }
        let valid = match complete(result, filled, job.len) {
            Completion::Done => filled + rest,
            Completion::Continue { valid } => valid.min(filled + rest),
            Completion::Retry => continue,
            other => return Err(failed.error(job.offset, filled, job.len - filled, other)),
        };
        let n = (valid - filled) as usize;
        buf[filled as usize..valid as usize].copy_from_slice(&bytes[taken..taken + n]);
        (filled, taken) = (valid, taken + n);
    }
    Ok(filled)
}

/// Largest `SHA256SUMS` object read.
const SUMS_BYTES_MAX: u64 = integrity::SUMS_BYTES_MAX;

/// The digests known for `objects` (see `known_digest`), looked up all at once (one or two
/// round trips for the lot, not per object), in order.
pub fn known_digests(objects: &[&ObjectFile]) -> Vec<Result<std::result::Result<Known, String>>> {
    let Some(first) = objects.first() else { return Vec::new() };
    let lookups = futures::stream::iter(objects)
        .map(|object| async move {
            // A panic inside the client (caught): no digest, and why.
            let caught = std::panic::AssertUnwindSafe(known_digest(object)).catch_unwind().await;
            caught
                .unwrap_or_else(|panic| Ok(Err(panicked(&object.path, panic.as_ref()).to_string())))
        })
        .buffered(HEADER_READS_MAX)
        .collect::<Vec<_>>();
    block_on(&first.path, lookups)
        .unwrap_or_else(|e| objects.iter().map(|_| Ok(Err(e.to_string()))).collect())
}

/// The digest known for `object`: its `sha256` metadata, else its line in a `SHA256SUMS`
/// object beside it; else what was looked for and why nothing was found. A `SHA256SUMS` that
/// is larger than [`integrity::SUMS_BYTES_MAX`] or malformed is an error naming it.
async fn known_digest(object: &ObjectFile) -> Result<std::result::Result<Known, String>> {
    let key = "sha256";
    let pin = object.pin();
    let result = object.store.get_opts(&object.location, pin.get(0..1)).await;
    let result = match result {
        Ok(result) => result,
        // The object changed since its header was read: the load's error, not a missing digest.
        Err(e) => match pin.changed(&object.path, 0, 1, &e) {
            Some(changed) => return Err(changed),
            None => return Ok(Err(request_error("get", &object.path, 0, 1, e).to_string())),
        },
    };
    pin.check(&object.path, 0, 1, object.size, &result.meta)?;
    let meta = result.attributes.get(&Attribute::Metadata(key.into()));
    if let Some(digest) = meta.and_then(|v| integrity::from_hex(v.as_ref())) {
        let source = format!("its object metadata '{key}'");
        return Ok(Ok(Known { digest, source }));
    }
    let text = object.location.as_ref();
    let (dir, name) = text.rsplit_once('/').unwrap_or(("", text));
    let sums_key =
        if dir.is_empty() { SUMS_FILE_NAME.to_owned() } else { format!("{dir}/{SUMS_FILE_NAME}") };
    let sums_url = object.path.with_file_name(SUMS_FILE_NAME);
    let sums = match location(&sums_url, &sums_key) {
        Ok(sums) => sums,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let none = || format!("no '{key}' object metadata, no {SUMS_FILE_NAME} entry beside it");
    let range = Some(GetRange::Bounded(0..SUMS_BYTES_MAX + 1));
    let text = match object.store.get_opts(&sums, GetOptions { range, ..Default::default() }).await
    {
        Ok(r) => r.bytes().await.map_err(|e| request_error("get", &sums_url, 0, 0, e)),
        Err(object_store::Error::NotFound { .. }) => return Ok(Err(none())),
        Err(e) => Err(request_error("get", &sums_url, 0, 0, e)),
    };
    let text = match text {
        Ok(text) => text,
        Err(e) => return Ok(Err(format!("{}; {e}", none()))),
    };
    let bad = |message| Error::Sha256 { path: sums_url.clone(), message };
    if text.len() as u64 > SUMS_BYTES_MAX {
        return Err(bad(format!("more than {SUMS_BYTES_MAX} bytes: not read as a checksum list")));
    }
    let listed = integrity::sums::parse(&text).map_err(bad)?;
    let source = sums_url.display().to_string();
    Ok(listed.get(name.as_bytes()).map(|digest| Known { digest, source }).ok_or_else(none))
}

/// Fetches every object of `paths` whole with ranged GETs, each body drained and dropped (no
/// staging ring, no copies to destinations); the bytes fetched. What the store and the network
/// give: the benchmarks' ceiling ([`crate::tools::baseline::object_ceiling`]) times it. The
/// GETs follow the load's rule ([`tune`]): parts of `config`'s size until GETs have answered,
/// then as many in flight and as large as the measured time to first byte and per-connection
/// rate ask, within `config`'s concurrency, with no staging ring to bound the bytes in
/// flight (a caller's part size, when given, is every GET's).
pub fn fetch_whole(paths: &[&Path], config: &crate::Config) -> Result<u64> {
    let values = config.values();
    let (part, concurrency) = (config.object_part() as u64, values.object_concurrency);
    let mut net = tune::Net::new(part, concurrency, usize::MAX);
    if config.object.part_bytes.is_some() {
        net = net.fixed_parts();
    }
    let net = Arc::new(net);
    let first = paths.first().map_or(Path::new(""), |p| *p);
    let files = heads(paths, &config.object.options)?.into_iter().collect::<Result<Vec<_>>>()?;
    let bytes: u64 = files.iter().map(|f| f.size).sum();
    block_on(first, async {
        let mut in_flight = tokio::task::JoinSet::new();
        let mut first_error = None;
        // Once a GET has failed, no more are issued: the ceiling fails with its error.
        'files: for file in files {
            let file = Arc::new(file);
            let mut offset = 0;
            while offset < file.size {
                let mut choice = net.target();
                while in_flight.len() >= choice.gets.max(1) {
                    if let Some(Err(e)) = in_flight.join_next().await.map(joined) {
                        first_error.get_or_insert(e);
                    }
                    choice = net.target();
                }
                while let Some(r) = in_flight.try_join_next() {
                    if let Err(e) = joined(r) {
                        first_error.get_or_insert(e);
                    }
                }
                if first_error.is_some() {
                    break 'files;
                }
                let len = (part * choice.extents as u64).min(file.size - offset);
                let (file, net) = (Arc::clone(&file), Arc::clone(&net));
                let ticket = net.issue();
                in_flight.spawn(async move {
                    drain(&file, offset, len, &net).await?;
                    net.landed(ticket, len);
                    Ok(())
                });
                offset += len;
            }
        }
        while let Some(r) = in_flight.join_next().await {
            if let Err(e) = joined(r) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    })??;
    Ok(bytes)
}

/// One GET of the ceiling ([`fetch_whole`]): `len` bytes of `file` from `offset`, its body
/// counted and dropped, its time to first byte and rate recorded in `net`.
async fn drain(file: &ObjectFile, offset: u64, len: u64, net: &tune::Net) -> Result<()> {
    let options =
        GetOptions { range: Some(GetRange::Bounded(offset..offset + len)), ..Default::default() };
    let asked = Instant::now();
    let result = file
        .store
        .get_opts(&file.location, options)
        .await
        .map_err(|e| request_error("get", &file.path, offset, len, e))?;
    let answered = Instant::now();
    let mut body = result.into_stream();
    let mut n = 0u64;
    while let Some(chunk) = body.next().await {
        n += chunk.map_err(|e| request_error("get", &file.path, offset, len, e))?.len() as u64;
    }
    net.record((answered - asked).as_secs_f64(), n, answered.elapsed().as_secs_f64());
    if n < len {
        return Err(Error::Truncated {
            path: file.path.clone(),
            offset: offset + n,
            expected_len: file.size,
        });
    }
    Ok(())
}

/// A finished task's result; a task that panicked (inside the client) is an error.
fn joined(r: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    r.unwrap_or_else(|e| {
        let what = if e.is_panic() { "panicked" } else { "was cancelled" };
        Err(Error::Internal(format!("an object-storage request {what}: {e}")))
    })
}

/// Object `path` as a HEAD shows it now: its size and ETag, whatever its size.
async fn head(path: &Path, options: &Options) -> Result<ObjectFile> {
    let source = parse(path)?;
    let client = client::client(&source, options)?;
    let location = location(path, &source.key)?;
    let meta =
        client.store.head(&location).await.map_err(|e| request_error("head", path, 0, 0, e))?;
    let Pin { etag, generation } = Pin::of(source.provider, &meta);
    Ok(ObjectFile {
        path: path.to_path_buf(),
        store: client.store,
        location,
        size: meta.size,
        etag,
        generation,
        origin: client.cache_name,
        cache: None,
        multiplexed: client.multiplexed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Halves every read result (a short read the GET must continue), in every extent.
    struct Short;
    impl FaultInjector for Short {
        fn rewrite(&self, _: usize, _: u64, _: u64, result: i64) -> i64 {
            if result > 1 {
                result / 2
            } else {
                result
            }
        }
    }

    /// An object of `data` in memory, as a load opens it.
    fn memory_object(data: &[u8]) -> ObjectFile {
        let store = Arc::new(object_store::memory::InMemory::new());
        let location = ObjectPath::from("m/x.safetensors");
        let put = store.put(&location, data.to_vec().into());
        block_on(Path::new("s3://b/"), put).unwrap().unwrap();
        let origin = super::super::cache::Origin {
            provider: "s3",
            endpoint: String::new(),
            account: String::new(),
            bucket: "b".into(),
        };
        ObjectFile {
            path: "s3://b/m/x.safetensors".into(),
            store,
            location,
            size: data.len() as u64,
            etag: None,
            generation: None,
            origin,
            cache: None,
            multiplexed: false,
        }
    }

    /// Consecutive extents of `lens` bytes from `offset`, and a zeroed buffer for each.
    fn extents(offset: u64, lens: &[u64]) -> (Vec<Job>, Vec<Vec<u8>>) {
        let mut at = offset;
        let part = lens.iter().enumerate().map(|(extent, &len)| {
            at += len;
            Job { extent, file: FileId(0), offset: at - len, len, target: None }
        });
        (part.collect(), lens.iter().map(|&n| vec![0; n as usize]).collect())
    }

    fn targets(bufs: &mut [Vec<u8>]) -> Vec<Dest> {
        let target =
            |b: &mut Vec<u8>| crate::engine::read::RawTarget { ptr: b.as_mut_ptr(), len: b.len() };
        bufs.iter_mut().map(|b| Dest::Target(target(b))).collect()
    }

    /// What `fetch` does with an extent handed on, checked first against `data`, the
    /// object: the extent's bytes must all be in; its index goes to `handed`.
    fn checked_hand<'a>(
        data: &'a [u8],
        part: &'a [Job],
        handed: &'a mut Vec<usize>,
    ) -> impl FnMut(usize, &mut Dest) + Send + 'a {
        move |i, dest| {
            let job = part[i];
            let want = &data[job.offset as usize..(job.offset + job.len) as usize];
            assert!(landing(dest, &job) == want, "extent {i} handed before its bytes");
            assert!(matches!(std::mem::replace(dest, Dest::Handed), Dest::Target(_)));
            handed.push(i);
        }
    }

    /// One GET covering consecutive extents fills each extent's own destination with its
    /// bytes, splitting the body's chunks at the extents' boundaries, through short reads,
    /// and hands each extent on once, in order, with its bytes all in.
    #[test]
    fn one_get_fills_consecutive_extents() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let file = memory_object(&data);
        let (part, mut bufs) = extents(1000, &[0, 1000, 0, 4096, 1, 2903, 0]);
        for fault in [None, Some(&Short as &dyn FaultInjector)] {
            bufs.iter_mut().for_each(|b| b.fill(0));
            let mut dests = targets(&mut bufs);
            let (mut times, net, mut handed) = (Times::default(), tune::Net::default(), vec![]);
            let mut landed = checked_hand(&data, &part, &mut handed);
            let get = PartGet { file: &file, part: &part, fault, net: Some(&net) };
            let fetched = fetch_into(get, &mut dests, None, &mut times, &mut landed);
            runtime().unwrap().block_on(fetched).unwrap();
            drop((dests, landed));
            assert_eq!(handed, (0..part.len()).collect::<Vec<_>>());
            for (job, buf) in part.iter().zip(&bufs) {
                let want = &data[job.offset as usize..(job.offset + job.len) as usize];
                assert!(buf[..] == want[..], "extent {} differs", job.extent);
            }
            assert!(times.answered.is_some() && net.report().is_some());
        }
        // A part past the object's end is an error naming the object and where it ends.
        let (beyond, mut buf) = extents(9_000, &[2_000]);
        let (mut dests, mut times) = (targets(&mut buf), Times::default());
        let landed = &mut |i: usize, _: &mut Dest| panic!("extent {i} of a failed GET handed on");
        let get = PartGet { file: &file, part: &beyond, fault: None, net: None };
        let fetched = fetch_into(get, &mut dests, None, &mut times, landed);
        let e = runtime().unwrap().block_on(fetched).unwrap_err().to_string();
        assert!(e.contains("s3://b/m/x.safetensors") && e.contains("offset 10000"), "{e}");
    }

    /// A part's extents go on as soon as the body has gone past each one, not when the part
    /// ends (a staging buffer turns over, a tensor is ready), and its last one once the body
    /// has ended: body chunks of every size (empty ones among them) against a plain slice of
    /// the object; more bytes than the part asked for fail it before its last extent goes.
    #[test]
    fn extents_go_on_as_their_bytes_come() {
        let data: Vec<u8> = (0..12_000u32).map(|i| (i * 13 % 241) as u8).collect();
        let file = memory_object(&data);
        let lens = [0, 1500u64, 0, 0, 4000, 1, 2499, 0];
        let len: u64 = lens.iter().sum();
        // The last extent with bytes: the one the body's end hands on.
        let last = lens.iter().rposition(|&n| n > 0).unwrap();
        for chunk in [1usize, 7, 1499, 1500, 1501, 4096, len as usize] {
            let (part, mut bufs) = extents(500, &lens);
            let get = PartGet { file: &file, part: &part, fault: None, net: None };
            let mut dests = targets(&mut bufs);
            let (mut progress, mut handed) = (Progress::new(&part), Vec::new());
            let body = &data[500..500 + len as usize];
            let empty = bytes::Bytes::new();
            let chunks = std::iter::once(&[][..]).chain(body.chunks(chunk).flat_map(|c| [c, &[]]));
            for piece in chunks {
                let mut landed = checked_hand(&data, &part, &mut handed);
                let bytes = if piece.is_empty() {
                    empty.clone()
                } else {
                    bytes::Bytes::copy_from_slice(piece)
                };
                progress.take(get, &mut dests, bytes, &mut landed).unwrap();
                drop(landed);
                // Every extent with bytes that the body has gone past is handed on, the
                // last only at the body's end; none the body has not brought whole.
                let end = 500 + progress.filled;
                for (i, job) in part.iter().enumerate() {
                    let is_handed = handed.contains(&i);
                    if job.len > 0 && job.offset + job.len <= end && i != last {
                        assert!(is_handed, "chunks of {chunk}: extent {i} held");
                    }
                    if job.offset + job.len > end || i >= last {
                        assert!(!is_handed, "chunks of {chunk}: extent {i} early");
                    }
                }
            }
            assert!(handed.iter().copied().eq(0..last), "chunks of {chunk}: {handed:?}");
            // Bytes past the part fail it, and hand nothing more on.
            let more = bytes::Bytes::from_static(b"x");
            let landed =
                &mut |i: usize, _: &mut Dest| panic!("extent {i} handed on after an error");
            let e = progress.take(get, &mut dests, more, landed).unwrap_err();
            let e = e.to_string();
            assert!(e.contains("more bytes than asked") && e.contains("x.safetensors"), "{e}");
            // The body's end hands on the rest, once.
            progress.finish(&mut dests, &mut checked_hand(&data, &part, &mut handed));
            assert_eq!(handed, (0..part.len()).collect::<Vec<_>>(), "chunks of {chunk}");
            progress.finish(&mut dests, &mut |i: usize, _: &mut Dest| panic!("extent {i} twice"));
        }
    }

    /// A GET that fails part-way counts the bytes of the extents it handed on before the
    /// failure (its trace span's), one that succeeds all of its part's.
    #[test]
    fn a_get_counts_the_bytes_it_handed_on() {
        /// Fails every read from `0` on.
        struct Breaks(u64);
        impl FaultInjector for Breaks {
            fn rewrite(&self, _: usize, offset: u64, _: u64, result: i64) -> i64 {
                if offset >= self.0 {
                    -i64::from(libc::EIO)
                } else {
                    result
                }
            }
        }
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 11 % 239) as u8).collect();
        let file = memory_object(&data);
        let lens = [1000, 0, 4096, 2903];
        for (fault, handed) in [(None, 7999), (Some(Breaks(2000)), 1000), (Some(Breaks(0)), 0)] {
            let (part, mut bufs) = extents(1000, &lens);
            let (net, mut times, mut sent) = (tune::Net::default(), Times::default(), vec![]);
            let send = &mut |m: Message| sent.push(m);
            let fault = fault.as_ref().map(|f| f as &dyn FaultInjector);
            let get = PartGet { file: &file, part: &part, fault, net: Some(&net) };
            let fetched = fetch(get, targets(&mut bufs), None, &mut times, send);
            let fetched = runtime().unwrap().block_on(fetched);
            assert_eq!(fetched.is_ok(), fault.is_none(), "{fetched:?}");
            assert_eq!(times.handed, handed, "{fetched:?}");
            let sent_bytes: u64 = sent
                .iter()
                .map(|m| match m {
                    Message::Direct { extent } => part[*extent].len,
                    other => panic!("{other:?}"),
                })
                .sum();
            assert_eq!(sent_bytes, handed);
        }
    }

    #[test]
    fn a_body_must_be_the_range_asked_for() {
        let url = Path::new("s3://b/x.safetensors");
        let body = |n: usize| bytes::Bytes::from(vec![7u8; n]);
        assert_eq!(exact(url, 100, 8, body(8)).unwrap().len(), 8);
        let short = exact(url, 100, 8, body(5)).unwrap_err();
        assert!(
            matches!(short, Error::Truncated { offset: 105, expected_len: 108, .. }),
            "{short}"
        );
        let long = exact(url, 100, 8, body(9)).unwrap_err().to_string();
        assert!(
            long.contains("s3://b/x.safetensors") && long.contains("9 bytes for a range of 8"),
            "{long}"
        );
    }

    /// A load that skips its HEAD pins its GETs to the version its header's read kept: the
    /// same pin, on every store (an ETag with `#` in it included).
    #[test]
    fn a_pin_comes_back_from_its_version() {
        let pin = |etag: Option<&str>, generation: Option<&str>| Pin {
            etag: etag.map(str::to_owned),
            generation: generation.map(str::to_owned),
        };
        let cases = [
            (Provider::S3, pin(Some("\"abc\""), None)),
            (Provider::S3, pin(Some("\"a#b\""), None)),
            (Provider::Azure, pin(Some("0x8DB"), None)),
            (Provider::Gcs, pin(Some("CJ+x"), Some("1700000000000000"))),
            (Provider::Gcs, pin(Some("a#b"), Some("17"))),
            (Provider::Gcs, pin(None, Some("17"))),
            (Provider::Gcs, pin(Some("CJ+x"), None)),
            (Provider::Gcs, pin(Some("a#b"), None)),
            (Provider::S3, pin(None, None)),
        ];
        for (provider, want) in cases {
            let version = want.version();
            assert_eq!(Pin::of_version(provider, version.as_deref()), want, "{version:?}");
        }
        // Only a pin that a rewrite fails lets a load skip its HEAD.
        let binds = |v: Option<&str>| Pin::of_version(Provider::S3, v).binds();
        assert!(binds(Some("\"abc\"")) && Pin::of_version(Provider::Gcs, Some("#17")).binds());
        for v in [None, Some(""), Some("*"), Some("\"a\", \"b\"")] {
            assert!(!binds(v), "{v:?}");
        }
    }

    #[test]
    fn keys_are_addressed_as_they_are() {
        let url = Path::new("s3://b/");
        for key in
            ["caf\u{e9}/x", "a~b", "layer[1]", "two words", "a+b", "100%", "x#1", "why?", "%41", ""]
        {
            assert_eq!(location(url, key).unwrap().as_ref(), key);
        }
        for key in ["a//b", "/a", "a/./b", "a/../b", "..", "a\nb"] {
            let e = location(url, key).unwrap_err().to_string();
            assert!(e.contains(&key.escape_debug().to_string()) && e.contains("s3://b/"), "{e}");
        }
    }
}
