//! Object storage: checkpoints in S3 or an S3-compatible store, streamed into the staging ring
//! with ranged GETs, many in flight.
//!
//! A source `s3://bucket/key.safetensors` is one file; `s3://bucket/prefix/` is a checkpoint
//! folder (its `model.safetensors.index.json`, else its `*.safetensors`); a key ending in
//! `.json` is an index. Headers come from two small ranged GETs per file (the 8-byte length,
//! then the header). At load time every part is a ranged GET conditioned on the ETag seen
//! when the load opened the object, so an object rewritten during a load is an error, never a
//! mix of two versions; each part lands in a staging buffer of the ring and goes through the
//! same copy steps as a local read, so memory stays bounded by the ring.
//!
//! The client is the `object_store` crate's S3 client, configured from the standard AWS
//! environment (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_ALLOW_HTTP`, instance and container
//! credentials), path-style addressing, retries with backoff on 5xx and throttling. Its async
//! runtime stays inside this module. Errors name the object, never the credentials.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use gantry_format::{
    check_prefix, parse_header, parse_index, Checkpoint, ErrorKind, FormatError, Header,
    INDEX_FILE_NAME, MAX_INDEX_BYTES, PREFIX_BYTES,
};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt,
    RetryConfig,
};
use parking_lot::Mutex;

use super::uring::Job;
use super::Message;
use crate::error::{Error, Result};
use crate::integrity::{self, Known, SUMS_FILE_NAME};
use crate::staging::Pool;

/// URL scheme of object sources.
pub const SCHEME: &str = "s3://";

/// Whether `source` names an object (`s3://...`) rather than a local path.
pub fn is_url(source: &Path) -> bool {
    source.to_str().is_some_and(|s| s.starts_with(SCHEME))
}

/// `s3://bucket/key` as `(bucket, key)`; the key may be empty or end in `/` (a prefix).
fn split(url: &Path) -> Result<(String, String)> {
    let text = url.to_str().unwrap_or_default();
    let rest = text.strip_prefix(SCHEME).unwrap_or(text);
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(Error::Config(format!("'{text}' names no bucket (s3://bucket/key)")));
    }
    Ok((bucket.to_owned(), key.to_owned()))
}

fn url_of(bucket: &str, key: &str) -> PathBuf {
    PathBuf::from(format!("{SCHEME}{bucket}/{key}"))
}

/// The runtime the client's futures run on: a few threads, shared by every load.
fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> =
        OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            // The workers copy bodies into staging: enough of them to keep up with a fast
            // network, not so many that they crowd the load's other threads.
            let workers = std::thread::available_parallelism().map_or(4, |n| n.get().clamp(2, 8));
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name("gantry-object")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| Error::Resource {
            what: "starting the object-storage runtime",
            source: io::Error::other(e.clone()),
        })
}

/// Settings of the S3 client beyond the environment: `object_store` configuration keys
/// (`aws_endpoint_url`, `aws_region`, `aws_allow_http`, `aws_skip_signature`, ...) and values,
/// applied after the environment's.
pub type Options = [(String, String)];

/// The client's configuration key for option `key` (case-insensitive); an error naming it
/// when the client has no such key.
pub(crate) fn option_key(key: &str) -> Result<object_store::aws::AmazonS3ConfigKey> {
    key.to_ascii_lowercase().parse().map_err(|_| {
        Error::Config(format!(
            "unknown object-storage option '{key}' (aws_endpoint_url, aws_region, aws_allow_http, ...)"
        ))
    })
}

/// The client for `bucket` with `options`, made once per process from the environment.
fn client(bucket: &str, options: &Options) -> Result<Arc<AmazonS3>> {
    type Key = (String, Vec<(String, String)>);
    static CLIENTS: OnceLock<Mutex<HashMap<Key, Arc<AmazonS3>>>> = OnceLock::new();
    let clients = CLIENTS.get_or_init(Default::default);
    let key = (bucket.to_owned(), options.to_vec());
    if let Some(c) = clients.lock().get(&key) {
        return Ok(Arc::clone(c));
    }
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: 5,
        retry_timeout: Duration::from_secs(60),
    };
    let client_options = ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(10))
        .with_timeout(Duration::from_secs(300));
    // Client options first: the environment's (AWS_ALLOW_HTTP, proxies, ...) go into them.
    let mut builder = AmazonS3Builder::new().with_client_options(client_options);
    for (key, value) in std::env::vars() {
        if key.starts_with("AWS_") {
            if let Ok(key) = key.to_ascii_lowercase().parse() {
                builder = builder.with_config(key, value);
            }
        }
    }
    for (key, value) in options {
        builder = builder.with_config(option_key(key)?, value);
    }
    builder = builder.with_bucket_name(bucket).with_retry(retry);
    if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none()
    {
        builder = builder.with_region("us-east-1");
    }
    let store = builder.build().map_err(|e| Error::Config(format!("s3://{bucket}: {e}")))?;
    let store = Arc::new(store);
    clients.lock().insert(key, Arc::clone(&store));
    Ok(store)
}

/// The I/O error for a failed request on `url`: not-found and access-denied keep their kinds
/// (the C ABI and Python map them), the message is the client's, which never holds secrets.
fn request_error(
    op: &'static str,
    url: &Path,
    offset: u64,
    len: u64,
    e: object_store::Error,
) -> Error {
    let kind = match &e {
        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => io::ErrorKind::PermissionDenied,
        object_store::Error::Precondition { .. } => {
            return Error::Io {
                op,
                path: url.to_path_buf(),
                offset,
                len,
                source: io::Error::other(
                    "the object changed during the load (its ETag no longer matches)",
                ),
            }
        }
        _ => io::ErrorKind::Other,
    };
    Error::Io { op, path: url.to_path_buf(), offset, len, source: io::Error::new(kind, strip(&e)) }
}

/// The client's message, without anything that looks like a signature or a key.
fn strip(e: &object_store::Error) -> String {
    let text = e.to_string();
    text.split_whitespace()
        .map(|w| {
            let lower = w.to_ascii_lowercase();
            if lower.contains("signature=")
                || lower.contains("credential=")
                || lower.contains("x-amz-security-token")
            {
                "[redacted]"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Opens an object source and validates every header, reading no tensor data.
pub fn open_checkpoint(source: &Path, options: &Options) -> Result<Checkpoint> {
    let (bucket, key) = split(source)?;
    let store = client(&bucket, options)?;
    runtime()?.block_on(async {
        let remote = Remote { store, bucket };
        if key.is_empty() || key.ends_with('/') {
            remote.open_prefix(&key).await
        } else if key.ends_with(".json") {
            remote.open_index(&key).await
        } else {
            let header = remote.header(&key).await?;
            Ok(Checkpoint::from_headers(vec![(url_of(&remote.bucket, &key), header)])?)
        }
    })
}

struct Remote {
    store: Arc<AmazonS3>,
    bucket: String,
}

impl Remote {
    async fn open_prefix(&self, prefix: &str) -> Result<Checkpoint> {
        let url = url_of(&self.bucket, prefix);
        let location = ObjectPath::from(prefix.trim_end_matches('/'));
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
        match indexes.as_slice() {
            [] => {}
            [(_, index)] | [(false, index), ..] => return self.open_index(index).await,
            _ => {
                let candidates = indexes.into_iter().map(|(_, k)| k).collect();
                return Err(FormatError::new(&url, ErrorKind::AmbiguousIndex { candidates }).into());
            }
        }
        if shards.is_empty() {
            return Err(FormatError::new(&url, ErrorKind::NoCheckpoint).into());
        }
        shards.sort();
        let mut headers = Vec::with_capacity(shards.len());
        for key in shards {
            headers.push((url_of(&self.bucket, &key), self.header(&key).await?));
        }
        Ok(Checkpoint::from_headers(headers)?)
    }

    async fn open_index(&self, key: &str) -> Result<Checkpoint> {
        let url = url_of(&self.bucket, key);
        let location = ObjectPath::from(key);
        let meta =
            self.store.head(&location).await.map_err(|e| request_error("head", &url, 0, 0, e))?;
        if meta.size > MAX_INDEX_BYTES {
            let message = format!("larger than the cap of {MAX_INDEX_BYTES} bytes");
            return Err(FormatError::new(&url, ErrorKind::BadIndex { message }).into());
        }
        let bytes = self
            .store
            .get(&location)
            .await
            .map_err(|e| request_error("get", &url, 0, meta.size, e))?
            .bytes()
            .await
            .map_err(|e| request_error("get", &url, 0, meta.size, e))?;
        let index = parse_index(&url, &bytes)?;
        let base = key.rsplit_once('/').map_or("", |(dir, _)| dir);
        let mut headers = Vec::with_capacity(index.shards.len());
        for (position, shard) in index.shards.iter().enumerate() {
            let shard_key = if base.is_empty() { shard.clone() } else { format!("{base}/{shard}") };
            match self.header(&shard_key).await {
                Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    return Err(index.missing_shard(&url, position).into());
                }
                Err(e) => return Err(e),
                Ok(header) => headers.push((url_of(&self.bucket, &shard_key), header)),
            }
        }
        Ok(Checkpoint::from_headers(headers)?.with_index(index)?)
    }

    /// The validated header of object `key`: its size, then two ranged GETs.
    async fn header(&self, key: &str) -> Result<Header> {
        let url = url_of(&self.bucket, key);
        let location = ObjectPath::from(key);
        let meta =
            self.store.head(&location).await.map_err(|e| request_error("head", &url, 0, 0, e))?;
        let size = meta.size;
        if size < PREFIX_BYTES {
            return Err(FormatError::new(&url, ErrorKind::TooSmall { file_len: size }).into());
        }
        let prefix = self.range(&location, &url, 0, PREFIX_BYTES, meta.e_tag.clone()).await?;
        let header_len = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
        let header_len = check_prefix(&url, header_len, size)?;
        let header =
            self.range(&location, &url, PREFIX_BYTES, header_len, meta.e_tag.clone()).await?;
        Ok(parse_header(&url, &header, size)?)
    }

    async fn range(
        &self,
        location: &ObjectPath,
        url: &Path,
        offset: u64,
        len: u64,
        etag: Option<String>,
    ) -> Result<bytes::Bytes> {
        if len == 0 {
            return Ok(bytes::Bytes::new());
        }
        let options = GetOptions {
            range: Some(GetRange::Bounded(offset..offset + len)),
            if_match: etag,
            ..Default::default()
        };
        let bytes = self
            .store
            .get_opts(location, options)
            .await
            .map_err(|e| request_error("get", url, offset, len, e))?
            .bytes()
            .await
            .map_err(|e| request_error("get", url, offset, len, e))?;
        if (bytes.len() as u64) < len {
            return Err(Error::Truncated {
                path: url.to_path_buf(),
                offset: offset + bytes.len() as u64,
                expected_len: offset + len,
            });
        }
        Ok(bytes)
    }
}

/// An object opened for a load: its size and ETag as the load saw them.
#[derive(Debug, Clone)]
pub struct ObjectFile {
    /// `s3://bucket/key`, for errors.
    pub path: PathBuf,
    store: Arc<AmazonS3>,
    location: ObjectPath,
    /// Bytes.
    pub size: u64,
    /// The ETag every part is conditioned on.
    pub etag: Option<String>,
    /// Its bucket, and its key (`location`).
    pub bucket: String,
    /// The local copy being written as the parts arrive ([`super::cache`]), if any.
    pub cache: Option<Arc<super::cache::Writer>>,
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

    /// Whether a HEAD now shows the ETag and size the load saw.
    pub fn unchanged(&self) -> std::result::Result<bool, String> {
        let runtime = runtime().map_err(|e| e.to_string())?;
        let meta = runtime
            .block_on(self.store.head(&self.location))
            .map_err(|e| request_error("head", &self.path, 0, 0, e).to_string())?;
        Ok(meta.e_tag == self.etag && meta.size == self.size)
    }
}

/// Opens object `path` for a load whose header said it is `file_len` bytes.
pub fn open_for_load(path: &Path, file_len: u64, options: &Options) -> Result<ObjectFile> {
    let object = open_for_load_unchecked(path, options)?;
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

/// Fetches `jobs` (by `Job::file` into `files`) into leased staging buffers, `concurrency`
/// ranged GETs in flight, sending each finished extent (or the first error) to `tx`. Returns
/// when every job is done, on the first error, when `cancel` is set or the pool closes.
pub fn run(
    files: &[ObjectFile],
    jobs: &[Job],
    pool: Option<&Arc<Pool>>,
    concurrency: usize,
    cancel: &AtomicBool,
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
    runtime.block_on(async {
        let mut in_flight = tokio::task::JoinSet::new();
        let stop = || cancel.load(Ordering::Relaxed) || failed.load(Ordering::Relaxed);
        for &job in jobs {
            while in_flight.len() >= concurrency.max(1) && !stop() {
                let _ =
                    tokio::time::timeout(Duration::from_millis(50), in_flight.join_next()).await;
            }
            if stop() {
                break;
            }
            let dest = match job.target {
                Some(target) => Dest::Target(target),
                // Blocks this thread only: the GETs in flight run on the runtime's workers
                // and hand their buffers to the consumer, which returns them to the pool.
                None => match pool.expect("staged object jobs need a pool").acquire() {
                    Some(lease) => Dest::Staging(lease),
                    None => break,
                },
            };
            let file = files[job.file].clone();
            let (tx, failed) = (tx.clone(), Arc::clone(&failed));
            in_flight.spawn(async move {
                let message = fetch(&file, job, dest).await;
                if message.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                let _ = tx.send(message);
            });
        }
        // Wait for the GETs in flight; once the load failed or was cancelled, abort them (a
        // task is dropped at an await, never in the middle of a copy) rather than wait out
        // their retries.
        while !in_flight.is_empty() {
            if stop() {
                in_flight.abort_all();
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), in_flight.join_next()).await;
        }
    });
}

/// Attempts at one part: the client retries each request; this also resumes a body that
/// broke off mid-way.
const PART_ATTEMPTS: u32 = 4;

/// Where a part lands.
enum Dest {
    /// A staging buffer, handed to the consumer with the bytes.
    Staging(crate::staging::Lease),
    /// The extent's destination itself.
    Target(super::RawTarget),
}

async fn fetch(file: &ObjectFile, job: Job, mut dest: Dest) -> Result<Message> {
    let buf: &mut [u8] = match &mut dest {
        Dest::Staging(lease) => &mut lease.as_mut_slice()[..job.len as usize],
        // SAFETY: the target is this extent's alone (Sink::direct_target), exactly its
        // length, and outlives the load.
        Dest::Target(t) => unsafe { std::slice::from_raw_parts_mut(t.ptr, t.len) },
    };
    let mut filled = 0u64;
    let mut attempt = 0;
    while filled < job.len {
        attempt += 1;
        let start = job.offset + filled;
        let options = GetOptions {
            range: Some(GetRange::Bounded(start..job.offset + job.len)),
            if_match: file.etag.clone(),
            ..Default::default()
        };
        let result = match file.store.get_opts(&file.location, options).await {
            Ok(r) => r,
            Err(e) => return Err(request_error("get", &file.path, start, job.len - filled, e)),
        };
        let mut body = result.into_stream();
        let mut broke = None;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(bytes) => {
                    let end = filled as usize + bytes.len();
                    if end > buf.len() {
                        return Err(Error::Io {
                            op: "get",
                            path: file.path.clone(),
                            offset: job.offset,
                            len: job.len,
                            source: io::Error::other("the server sent more bytes than asked for"),
                        });
                    }
                    buf[filled as usize..end].copy_from_slice(&bytes);
                    filled = end as u64;
                }
                Err(e) => {
                    broke = Some(e);
                    break;
                }
            }
        }
        match broke {
            Some(e) if attempt >= PART_ATTEMPTS => {
                return Err(request_error(
                    "get",
                    &file.path,
                    job.offset + filled,
                    job.len - filled,
                    e,
                ))
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(100 << attempt)).await,
            None if filled < job.len => {
                return Err(Error::Truncated {
                    path: file.path.clone(),
                    offset: job.offset + filled,
                    expected_len: file.size,
                })
            }
            None => {}
        }
    }
    if let Some(cache) = &file.cache {
        cache.write_at(&buf[..job.len as usize], job.offset);
    }
    Ok(match dest {
        Dest::Staging(lease) => Message::Staged { extent: job.extent, lease },
        Dest::Target(_) => Message::Direct { extent: job.extent },
    })
}

/// Largest `SHA256SUMS` object read.
const SUMS_BYTES_MAX: u64 = 16 << 20;

/// The digest known for `object`: its `sha256` metadata, else its line in a `SHA256SUMS`
/// object beside it; else what was looked for and why nothing was found.
pub fn known_digest(object: &ObjectFile) -> std::result::Result<Known, String> {
    let runtime = runtime().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let key = "sha256";
        let options = GetOptions {
            range: Some(GetRange::Bounded(0..1)),
            if_match: object.etag.clone(),
            ..Default::default()
        };
        let result = object.store.get_opts(&object.location, options).await;
        let result = result.map_err(|e| request_error("get", &object.path, 0, 1, e).to_string())?;
        let meta = result.attributes.get(&Attribute::Metadata(key.into()));
        if let Some(digest) = meta.and_then(|v| integrity::from_hex(v.as_ref())) {
            let source = format!("its object metadata '{key}'");
            return Ok(Known { digest, source });
        }
        let text = object.location.as_ref();
        let (dir, name) = text.rsplit_once('/').unwrap_or(("", text));
        let sums_key = if dir.is_empty() {
            SUMS_FILE_NAME.to_owned()
        } else {
            format!("{dir}/{SUMS_FILE_NAME}")
        };
        let sums = ObjectPath::from(sums_key.as_str());
        let sums_url = object.path.with_file_name(SUMS_FILE_NAME);
        let none = || format!("no '{key}' object metadata, no {SUMS_FILE_NAME} entry beside it");
        let options =
            GetOptions { range: Some(GetRange::Bounded(0..SUMS_BYTES_MAX)), ..Default::default() };
        let text = match object.store.get_opts(&sums, options).await {
            Ok(r) => r.bytes().await.map_err(|e| request_error("get", &sums_url, 0, 0, e)),
            Err(object_store::Error::NotFound { .. }) => return Err(none()),
            Err(e) => Err(request_error("get", &sums_url, 0, 0, e)),
        };
        let text = text.map_err(|e| format!("{}; {e}", none()))?;
        let digest =
            integrity::parse_sums(&String::from_utf8_lossy(&text), name).ok_or_else(none)?;
        Ok(Known { digest, source: sums_url.display().to_string() })
    })
}

/// The object-storage ceiling: every object of `paths` fetched whole with ranged GETs of
/// `config`'s part size, `config`'s concurrency in flight, each body drained into a reused
/// buffer (no staging ring, no copies to destinations). What the store and the network give.
pub fn ceiling(paths: &[&Path], config: &crate::Config) -> Result<crate::baseline::Measured> {
    let values = config.values();
    let (part, concurrency) = (config.object_part() as u64, values.object_concurrency);
    let mut requests = Vec::new();
    for path in paths {
        let meta = open_for_load_unchecked(path, &config.object_options)?;
        let mut offset = 0;
        while offset < meta.size {
            let len = part.min(meta.size - offset);
            requests.push((meta.clone(), offset, len));
            offset += len;
        }
    }
    let bytes: u64 = requests.iter().map(|r| r.2).sum();
    let start = std::time::Instant::now();
    runtime()?.block_on(async {
        let mut in_flight = tokio::task::JoinSet::new();
        let mut first_error = None;
        for (file, offset, len) in requests {
            while in_flight.len() >= concurrency.max(1) {
                if let Some(Ok(Err(e))) = in_flight.join_next().await {
                    first_error.get_or_insert(e);
                }
            }
            in_flight.spawn(async move {
                let options = GetOptions {
                    range: Some(GetRange::Bounded(offset..offset + len)),
                    ..Default::default()
                };
                let result = file
                    .store
                    .get_opts(&file.location, options)
                    .await
                    .map_err(|e| request_error("get", &file.path, offset, len, e))?;
                let mut body = result.into_stream();
                let mut n = 0u64;
                while let Some(chunk) = body.next().await {
                    n += chunk.map_err(|e| request_error("get", &file.path, offset, len, e))?.len()
                        as u64;
                }
                if n < len {
                    return Err(Error::Truncated {
                        path: file.path.clone(),
                        offset: offset + n,
                        expected_len: file.size,
                    });
                }
                Ok(())
            });
        }
        while let Some(r) = in_flight.join_next().await {
            if let Ok(Err(e)) = r {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    })?;
    Ok(crate::baseline::Measured { bytes, seconds: start.elapsed().as_secs_f64() })
}

/// An object's size and ETag, whatever its size.
fn open_for_load_unchecked(path: &Path, options: &Options) -> Result<ObjectFile> {
    let (bucket, key) = split(path)?;
    let store = client(&bucket, options)?;
    let location = ObjectPath::from(key.as_str());
    let meta = runtime()?
        .block_on(store.head(&location))
        .map_err(|e| request_error("head", path, 0, 0, e))?;
    Ok(ObjectFile {
        path: path.to_path_buf(),
        store,
        location,
        size: meta.size,
        etag: meta.e_tag,
        bucket,
        cache: None,
    })
}
