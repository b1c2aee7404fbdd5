//! The reader's side of a live source: one connection, one lease.
//!
//! The server is not trusted beyond what is checked here: it must be this user or root
//! (`SO_PEERCRED`); every message is bounded and parsed strictly (unknown types, missing or
//! out-of-range fields are errors naming the stage); every memfd must carry all four seals and
//! be exactly its announced length, so that nobody can change, grow or shrink its bytes while
//! the lease holds it; every header is parsed by the same parser as a file's; every tensor must
//! have a digest and every digest a tensor. Every wait has the lease's timeout.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gantry_format::Checkpoint;
use serde_json::{Map, Value};

use super::protocol::{self, DeviceShare, Received, FDS_PER_MESSAGE, FILES_MAX, PROTOCOL_VERSION};
use crate::error::{Error, Result};

/// How long a reader waits for the server at each step, unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest version id accepted, in bytes.
const VERSION_BYTES_MAX: usize = 128;

/// A lease on one version of a live source: its files as sealed memfds, its checkpoint table
/// and its digests. The server keeps that version's memory while the lease lives; dropping it
/// closes the connection, which ends the lease.
#[derive(Debug)]
pub struct Lease {
    url: String,
    version: String,
    checkpoint: Checkpoint,
    files: Vec<(String, File)>,
    digests: HashMap<String, u64>,
    device: Option<DeviceShare>,
    _connection: OwnedFd,
}

impl Lease {
    /// Connects to the server at `url` (`unix:///path/to/socket`) and takes a lease on its
    /// current version, waiting at most [`DEFAULT_TIMEOUT`] at each step.
    pub fn acquire(url: &str) -> Result<Self> {
        Self::acquire_with(url, DEFAULT_TIMEOUT)
    }

    /// [`Lease::acquire`], waiting at most `timeout` at each step.
    pub fn acquire_with(url: &str, timeout: Duration) -> Result<Self> {
        let socket = super::socket_of(url)?;
        let url = super::url_of(&socket);
        let fail = |message: String| Error::Live { url: url.clone(), message };
        let fd = protocol::socket().map_err(|e| fail(format!("socket: {e}")))?;
        protocol::set_timeouts(fd.as_fd(), Some(timeout))
            .map_err(|e| fail(format!("setting timeouts: {e}")))?;
        protocol::connect(fd.as_fd(), &socket).map_err(|e| fail(connect_error(&e, timeout)))?;
        let uid = protocol::peer_uid(fd.as_fd()).map_err(|e| fail(format!("SO_PEERCRED: {e}")))?;
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        if uid != me && uid != 0 {
            return Err(fail(format!(
                "the server runs as user {uid}, not this user ({me}) or root: not trusted"
            )));
        }
        let hello = serde_json::json!({"type": "hello", "protocol": PROTOCOL_VERSION, "residency": "host+device"});
        if let Err(e) = protocol::send(fd.as_fd(), hello.to_string().as_bytes(), &[]) {
            return Err(fail(hello_error(&fd, &e, timeout)));
        }
        let (lease, mut fds) = receive(&fd, 1, "LEASE", timeout).map_err(&fail)?;
        let announced = Announced::parse(&lease).map_err(|m| fail(format!("LEASE: {m}")))?;
        if fds.len() != 1 {
            return Err(fail(format!("LEASE came with {} descriptors, not 1", fds.len())));
        }
        let table = File::from(fds.remove(0));
        let table = read_table(&table, announced.table_len, announced.files)
            .map_err(|m| fail(format!("the table: {m}")))?;
        let fds = receive_files(&fd, announced.files, timeout).map_err(&fail)?;
        let mut device = None;
        while announced.device
            && device.as_ref().map_or(0, |d: &DeviceShare| d.handles.len()) < announced.files
        {
            let (message, _) = receive(&fd, 0, "DEVICE", timeout).map_err(&fail)?;
            DeviceShare::take(&mut device, &message, announced.files)
                .map_err(|m| fail(format!("DEVICE: {m}")))?;
        }
        let mut headers = Vec::with_capacity(fds.len());
        let mut files = Vec::with_capacity(fds.len());
        for ((name, len), fd) in table.files.into_iter().zip(fds) {
            let file = File::from(fd);
            protocol::check_sealed(&file, len).map_err(|m| fail(format!("file '{name}': {m}")))?;
            let path = PathBuf::from(format!("{url}#{name}"));
            headers.push((path.clone(), read_header(&path, &file, len)?));
            files.push((name, file));
        }
        let mut checkpoint = Checkpoint::from_headers(headers)?;
        for info in &mut checkpoint.files {
            info.version = Some(announced.version.clone());
        }
        check_digests(&checkpoint, &table.digests).map_err(&fail)?;
        Ok(Lease {
            url,
            version: announced.version,
            checkpoint,
            files,
            digests: table.digests,
            device,
            _connection: fd,
        })
    }

    /// The source, `unix:///path`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The version this lease holds.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The version's tensor table; its files' paths are `unix:///path#NAME`.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// The sealed memfd of the file called `name`.
    pub fn file(&self, name: &str) -> Option<&File> {
        self.files.iter().find(|(n, _)| n == name).map(|(_, f)| f)
    }

    /// What the server handed of the version's device memory (a server that keeps it on a GPU).
    pub fn device(&self) -> Option<&DeviceShare> {
        self.device.as_ref()
    }

    /// The XXH3-64 digest the server published for tensor `name`.
    pub fn digest(&self, name: &str) -> Option<u64> {
        self.digests.get(name).copied()
    }
}

/// What a `LEASE` message announces.
struct Announced {
    version: String,
    files: usize,
    table_len: u64,
    /// Whether `DEVICE` messages follow the files.
    device: bool,
}

impl Announced {
    fn parse(message: &Map<String, Value>) -> Result<Self, String> {
        let protocol = message.get("protocol").and_then(Value::as_u64);
        if protocol != Some(PROTOCOL_VERSION) {
            return Err(format!("protocol {protocol:?}, this reader speaks {PROTOCOL_VERSION}"));
        }
        let device = match message.get("residency").and_then(Value::as_str) {
            Some("host") => false,
            Some("host+device") => true,
            other => return Err(format!("residency {other:?}: host or host+device expected")),
        };
        let version = message.get("version").and_then(Value::as_str).unwrap_or_default();
        let printable = version.bytes().all(|b| b.is_ascii_graphic());
        if version.is_empty() || version.len() > VERSION_BYTES_MAX || !printable {
            return Err(format!(
                "a version id of 1 to {VERSION_BYTES_MAX} printable characters is required"
            ));
        }
        let files = message.get("files").and_then(Value::as_u64).unwrap_or(0);
        if files == 0 || files > FILES_MAX as u64 {
            return Err(format!("{files} files (1 to {FILES_MAX})"));
        }
        let table_len = message.get("table_len").and_then(Value::as_u64).unwrap_or(0);
        if table_len == 0 || table_len > protocol::TABLE_BYTES_MAX {
            return Err(format!(
                "a table of {table_len} bytes (1 to {})",
                protocol::TABLE_BYTES_MAX
            ));
        }
        Ok(Self { version: version.to_owned(), files: files as usize, table_len, device })
    }
}

/// The file list and digests of a publication.
struct Table {
    files: Vec<(String, u64)>,
    digests: HashMap<String, u64>,
}

/// Reads and checks the sealed table of `len` bytes listing `count` files.
fn read_table(table: &File, len: u64, count: usize) -> Result<Table, String> {
    protocol::check_sealed(table, len)?;
    let mut bytes = vec![0u8; len as usize];
    table.read_exact_at(&mut bytes, 0).map_err(|e| format!("read failed: {e}"))?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| format!("not JSON: {e}"))?;
    let list = value.get("files").and_then(Value::as_array).ok_or("no 'files' list")?;
    if list.len() != count {
        return Err(format!("{} files listed, {count} announced", list.len()));
    }
    let mut names = HashSet::new();
    let mut files = Vec::with_capacity(count);
    for entry in list {
        let name = entry.get("name").and_then(Value::as_str).unwrap_or_default();
        let len = entry.get("len").and_then(Value::as_u64).ok_or("a file without a 'len'")?;
        check_name(name)?;
        if !names.insert(name) {
            return Err(format!("file '{name}' listed twice"));
        }
        files.push((name.to_owned(), len));
    }
    let listed = value.get("digests").and_then(Value::as_object).ok_or("no 'digests' map")?;
    let mut digests = HashMap::with_capacity(listed.len());
    for (name, hex) in listed {
        let hex = hex.as_str().unwrap_or_default();
        let digest = (hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u64::from_str_radix(hex, 16).ok())
            .flatten()
            .ok_or_else(|| format!("digest of '{}' is not 16 hex digits", name.escape_debug()))?;
        digests.insert(name.clone(), digest);
    }
    Ok(Table { files, digests })
}

/// A file name of a publication: 1 to 255 bytes, no `/`, `#` or NUL, not `.` or `..`.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    let bad = name.is_empty()
        || name.len() > protocol::NAME_BYTES_MAX
        || name.contains(['/', '#', '\0'])
        || name == "."
        || name == "..";
    match bad {
        true => Err(format!(
            "file name '{}' is not 1 to {} bytes without '/', '#' or NUL",
            name.escape_debug(),
            protocol::NAME_BYTES_MAX
        )),
        false => Ok(()),
    }
}

/// Every tensor has a digest, and every digest a tensor.
fn check_digests(checkpoint: &Checkpoint, digests: &HashMap<String, u64>) -> Result<(), String> {
    if let Some(t) = checkpoint.tensors.iter().find(|t| !digests.contains_key(&t.name)) {
        return Err(format!("no digest for tensor '{}'", t.name.escape_debug()));
    }
    if digests.len() != checkpoint.tensors.len() {
        return Err(format!("{} digests for {} tensors", digests.len(), checkpoint.tensors.len()));
    }
    Ok(())
}

/// The header of the sealed memfd `file` of `len` bytes, parsed as a file's would be.
fn read_header(path: &Path, file: &File, len: u64) -> Result<gantry_format::Header> {
    let io = |op, source| Error::Io { op, path: path.to_owned(), offset: 0, len, source };
    let mut prefix = [0u8; 8];
    if len < 8 {
        return Err(gantry_format::FormatError::new(
            path,
            gantry_format::ErrorKind::TooSmall { file_len: len },
        )
        .into());
    }
    file.read_exact_at(&mut prefix, 0).map_err(|e| io("read header length", e))?;
    let header_len = gantry_format::check_prefix(path, u64::from_le_bytes(prefix), len)?;
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8).map_err(|e| io("read header", e))?;
    Ok(gantry_format::parse_header(path, &header, len)?)
}

/// Receives one message of type-checked JSON with at most `fds_max` descriptors.
fn receive(
    fd: &OwnedFd,
    fds_max: usize,
    stage: &str,
    timeout: Duration,
) -> Result<(Map<String, Value>, Vec<OwnedFd>), String> {
    let received = match protocol::recv(fd.as_fd(), fds_max) {
        // A server that closes with a message of ours unread (it refused the connection before
        // reading HELLO) resets the connection, and the kernel reports the reset before the
        // messages the server sent first: its reason (`ERROR`) may still be queued.
        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {
            match protocol::recv(fd.as_fd(), fds_max) {
                Ok(message @ Received::Message { .. }) => Ok(message),
                _ => Err(e),
            }
        }
        other => other,
    };
    let (bytes, fds) = match received {
        Ok(Received::Message { bytes, fds }) => (bytes, fds),
        Ok(Received::Closed) => {
            return Err(format!("the server closed the connection during {stage}"))
        }
        Err(e) => return Err(wire_error(&format!("waiting for {stage}"), &e, timeout)),
    };
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{stage}: the server sent a message that is not JSON ({e})"))?;
    let Value::Object(message) = value else {
        return Err(format!("{stage}: the server sent a message that is not a JSON object"));
    };
    let kind = message.get("type").and_then(Value::as_str).unwrap_or_default();
    if kind == "error" {
        let text = message.get("message").and_then(Value::as_str).unwrap_or_default();
        return Err(format!("the server refused: {}", text.escape_debug()));
    }
    if !kind.eq_ignore_ascii_case(stage) {
        return Err(format!("expected {stage}, the server sent '{}'", kind.escape_debug()));
    }
    Ok((message, fds))
}

/// The `FILES` messages: `count` memfds in order, at most [`FDS_PER_MESSAGE`] per message.
fn receive_files(fd: &OwnedFd, count: usize, timeout: Duration) -> Result<Vec<OwnedFd>, String> {
    let mut all = Vec::with_capacity(count);
    while all.len() < count {
        let (message, fds) = receive(fd, FDS_PER_MESSAGE, "FILES", timeout)?;
        let first = message.get("first").and_then(Value::as_u64);
        let n = message.get("count").and_then(Value::as_u64).unwrap_or(0) as usize;
        if first != Some(all.len() as u64) || n != fds.len() || n == 0 || all.len() + n > count {
            return Err(format!(
                "FILES: first {first:?}, count {n}, {} descriptors, after {} of {count} files",
                fds.len(),
                all.len()
            ));
        }
        all.extend(fds);
    }
    Ok(all)
}

fn connect_error(e: &std::io::Error, timeout: Duration) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "no server answers (connection refused)".to_owned(),
        Some(libc::ENOENT) => "no server (no socket there)".to_owned(),
        Some(libc::EACCES) => {
            "permission denied: the socket's mode does not let this user connect".to_owned()
        }
        _ => wire_error("connecting", e, timeout),
    }
}

/// Why sending `HELLO` failed with `e`. A server that refuses a connection as soon as it
/// accepts it (too many connections) sends `ERROR` and closes, which can happen before the
/// reader's `HELLO` goes out: the send then fails, and the server's reason is still queued.
fn hello_error(fd: &OwnedFd, e: &std::io::Error, timeout: Duration) -> String {
    let closed = matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET));
    let refused = match closed {
        true => receive(fd, 0, "LEASE", timeout).err(),
        false => None,
    };
    match refused {
        Some(message) if message.starts_with("the server refused") => message,
        _ => wire_error("sending HELLO", e, timeout),
    }
}

fn wire_error(stage: &str, e: &std::io::Error, timeout: Duration) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("{stage}: the server did not answer within {:.1} s", timeout.as_secs_f64())
        }
        _ => format!("{stage}: {e}"),
    }
}
