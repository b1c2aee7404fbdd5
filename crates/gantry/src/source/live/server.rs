//! The serving side of a live source: a socket, the publications, and one thread per lease.
//!
//! Binding is careful about what is at the socket path already, and closing removes the socket
//! file only while it is the one this server bound, never another user's file put in its place
//! (`live::socket_file`).
//!
//! A connection is a lease: `HELLO` within the hello timeout, then `LEASE` and `FILES` with
//! the current version's memfds; the lease ends when the reader closes the connection or sends
//! `RELEASE`, and the version is freed once it is neither current nor leased (`live::book`).
//! Waiting for that end has no timeout (a lease lasts as long as the reader wants it), but it
//! costs one parked thread, and connections are capped: [`CONNECTIONS_MAX`] in all, and
//! [`ServerOptions::max_connections_per_user`] per user (the peer's uid from `SO_PEERCRED`),
//! so that one user the socket's mode lets in cannot hold every connection and shut the others
//! out. A connection over either cap is sent `ERROR` saying which, and closed; a connection's
//! slot frees when it closes (however its thread ends).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{json, Value};

use super::book::Book;
use super::device::Residency;
use super::protocol::{self, Received, FDS_PER_MESSAGE, PROTOCOL_VERSION};
use super::publish::{self, Publication, TensorBytes};
use super::socket_file::{self, Removed, SocketFile};
use crate::config::Config;
use crate::cuda::CudaDevice;
use crate::error::{Error, Result};

/// Most connections served at once; more are told so and closed.
pub const CONNECTIONS_MAX: usize = 1024;

/// Most connections one user may hold at once unless told otherwise: a quarter of
/// [`CONNECTIONS_MAX`], so that a user who takes all of theirs leaves the rest to others.
pub const CONNECTIONS_PER_USER_DEFAULT: usize = CONNECTIONS_MAX / 4;

/// Versions older than the current one that one user other than the server's own (and root)
/// may keep alive with its leases: each is a whole publication held in memory, so a reader
/// that keeps connections open across republishing is refused a new lease past this, until
/// it lets the old ones go.
pub const OLD_VERSIONS_PER_USER: usize = 2;

/// How a server binds and waits.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The socket file's mode (default 0600: only this user may connect).
    pub mode: u32,
    /// How long a new connection may take to send `HELLO`.
    pub hello_timeout: Duration,
    /// A GPU (`cuda:N`) that keeps a copy of every publication's data for readers on this
    /// host to copy from or alias over CUDA IPC, beside the host memory (default: none).
    pub device: Option<u32>,
    /// Most connections (leases) one user may hold at once, 1 to [`CONNECTIONS_MAX`]
    /// (default [`CONNECTIONS_PER_USER_DEFAULT`]; with a `mode` that lets no other user in,
    /// the default is [`CONNECTIONS_MAX`]: a cap per user would protect nobody). A process
    /// that opens a source again holds two for a moment (the new lease is taken before the
    /// old one ends).
    pub max_connections_per_user: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            mode: 0o600,
            hello_timeout: Duration::from_secs(10),
            device: None,
            max_connections_per_user: CONNECTIONS_PER_USER_DEFAULT,
        }
    }
}

/// A live source being served; see the module docs.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    url: String,
    socket: SocketFile,
    /// The accept thread; it hands the listening socket back when it ends, so that the
    /// socket file's inode stays this server's until the file is removed.
    accept: Option<JoinHandle<OwnedFd>>,
    device: Option<Arc<CudaDevice>>,
}

/// One publication with its version id, as leases hand it out; its device copies (when the
/// server keeps them) are freed with it, after its host memory's last lease.
#[derive(Debug)]
struct Published {
    version: String,
    // Field order: the device copies go before the memfds they were made from.
    device: Option<Residency>,
    publication: Publication,
}

#[derive(Debug)]
struct Shared {
    book: Mutex<Book<Arc<Published>>>,
    stop: AtomicBool,
    /// Open connections: in all, and per user.
    connections: Mutex<Connections>,
    per_user_max: usize,
}

#[derive(Debug, Default)]
struct Connections {
    total: usize,
    per_user: HashMap<u32, usize>,
    /// Per user, the versions its leases hold (one entry per lease).
    leases: HashMap<u32, Vec<u64>>,
}

/// Distinct versions among `held` other than `current`: the old publications a user keeps
/// in memory.
fn old_versions(held: &[u64], current: u64) -> usize {
    let mut old: Vec<u64> = held.iter().copied().filter(|&v| v != current).collect();
    old.sort_unstable();
    old.dedup();
    old.len()
}

/// One connection's place in [`Shared::connections`], given back on drop: when its lease
/// ends, and also when its thread could not start or panicked.
struct Slot {
    shared: Arc<Shared>,
    uid: u32,
}

impl Slot {
    /// A place for a connection of user `uid`, or the refusal to send when a cap is reached.
    fn take(shared: &Arc<Shared>, uid: u32) -> Result<Self, String> {
        let mut c = shared.connections.lock();
        if c.total >= CONNECTIONS_MAX {
            return Err(format!("{CONNECTIONS_MAX} connections already: try again later"));
        }
        let mine = c.per_user.entry(uid).or_insert(0);
        if *mine >= shared.per_user_max {
            return Err(format!(
                "too many connections from uid {uid}: at most {} per user; try again when one \
                 of them closes",
                shared.per_user_max
            ));
        }
        *mine += 1;
        c.total += 1;
        Ok(Self { shared: Arc::clone(shared), uid })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.shared.connections.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(mine) = c.per_user.get_mut(&self.uid) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                c.per_user.remove(&self.uid);
            }
        }
    }
}

impl Server {
    /// Binds the socket at `path` (see the module docs) and starts accepting; nothing is
    /// served until the first [`Server::publish`].
    pub fn start(path: impl AsRef<Path>, options: &ServerOptions) -> Result<Self> {
        let path = std::path::absolute(path.as_ref()).map_err(|e| Error::Config(e.to_string()))?;
        let url = super::url_of(&path);
        let fail = |message: String| Error::Live { url: url.clone(), message };
        // At the default mode (this user alone, and root) a cap per user protects nobody: the
        // default cap then is the total.
        let per_user_max = match options.max_connections_per_user {
            CONNECTIONS_PER_USER_DEFAULT if options.mode & 0o077 == 0 => CONNECTIONS_MAX,
            n => n,
        };
        if !(1..=CONNECTIONS_MAX).contains(&per_user_max) {
            return Err(Error::Config(format!(
                "{url}: max_connections_per_user {per_user_max}: 1 to {CONNECTIONS_MAX}"
            )));
        }
        // The GPU first: a server that cannot keep what it was asked to fails before binding.
        let device = options.device.map(CudaDevice::open).transpose()?;
        let stale = socket_file::check_path(&path).map_err(&fail)?;
        let (listener, socket) = socket_file::bind(&path, options.mode, stale).map_err(&fail)?;
        let shared = Arc::new(Shared {
            book: Mutex::default(),
            stop: AtomicBool::new(false),
            connections: Mutex::default(),
            per_user_max,
        });
        let accept = {
            let (shared, hello) = (Arc::clone(&shared), options.hello_timeout);
            std::thread::Builder::new()
                .name("gantry-serve".into())
                .spawn(move || {
                    accept_loop(&listener, &shared, hello);
                    listener
                })
                .map_err(|e| fail(format!("starting the accept thread: {e}")))?
        };
        Ok(Self { shared, url, socket, accept: Some(accept), device })
    }

    /// The source string readers use: `unix:///path`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Loads the checkpoint at `source` (any source gantry reads) with `config` and makes it
    /// the current version; returns its version id.
    pub fn publish(&self, source: impl AsRef<Path>, config: &Config) -> Result<String> {
        self.install(publish::from_source(source.as_ref(), config)?)
    }

    /// Publishes `tensors` (name, dtype, shape, bytes) as one `model.safetensors` and makes
    /// it the current version; returns its version id.
    pub fn publish_tensors<'a>(
        &self,
        tensors: impl IntoIterator<Item = TensorBytes<'a>>,
    ) -> Result<String> {
        self.install(publish::from_tensors(tensors)?)
    }

    /// The GPU that keeps a copy of each publication, if any.
    pub fn device(&self) -> Option<&Arc<CudaDevice>> {
        self.device.as_ref()
    }

    fn install(&self, publication: Publication) -> Result<String> {
        let device = match &self.device {
            Some(gpu) => Some(residency(gpu, &publication)?),
            None => None,
        };
        let mut book = self.shared.book.lock();
        let version = format!("{}-{:016x}", book.next_sequence(), publication.content);
        let published = Arc::new(Published { version: version.clone(), device, publication });
        let (_, freed) = book.publish(published);
        drop(book);
        for old in freed {
            log::info!("{}: version {} freed (no lease left)", self.url, old.version);
        }
        Ok(version)
    }

    /// The current version's id, tensor count and tensor bytes.
    pub fn current(&self) -> Option<(String, usize, u64)> {
        let book = self.shared.book.lock();
        book.current()
            .map(|(_, p)| (p.version.clone(), p.publication.tensors, p.publication.tensor_bytes))
    }

    /// The current version's id.
    pub fn version(&self) -> Option<String> {
        self.current().map(|(v, _, _)| v)
    }

    /// The versions held (current or leased) and their lease counts, oldest first.
    pub fn held(&self) -> Vec<(String, usize)> {
        let book = self.shared.book.lock();
        book.entries().map(|(_, p, leases)| (p.version.clone(), leases)).collect()
    }

    /// Stops accepting, removes the socket file (while it is still this server's), and
    /// frees every version no lease holds; leases in flight keep theirs until they end.
    pub fn close(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        // Held until the file is removed: while the socket is open its inode cannot be
        // reused by a file someone else puts at the path.
        let mut _listener = None;
        if let Some(accept) = self.accept.take() {
            match accept.join() {
                Ok(listener) => _listener = Some(listener),
                Err(_) => log::warn!("{}: the accept thread panicked", self.url),
            }
        }
        match self.socket.remove() {
            Ok(Removed::Ours) => {}
            Ok(Removed::Gone) => log::info!("{}: the socket file was gone already", self.url),
            Ok(Removed::Left(why)) => {
                log::info!("{}: the socket file is not this server's: {why}: left", self.url);
            }
            Err(e) => log::warn!("{}: removing the socket file: {e}", self.url),
        }
        let freed = self.shared.book.lock().retire();
        drop(freed);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.accept.is_some() {
            self.stop();
        }
    }
}

/// `publication`'s data sections copied to `gpu`.
fn residency(gpu: &Arc<CudaDevice>, publication: &Publication) -> Result<Residency> {
    let files: Vec<_> = (publication.files.iter().zip(&publication.data))
        .map(|((name, memfd, _), &(offset, len))| (name.as_str(), memfd, offset, len))
        .collect();
    Residency::build(gpu, &files)
}

/// Accepts until told to stop, one thread per connection.
fn accept_loop(listener: &OwnedFd, shared: &Arc<Shared>, hello: Duration) {
    let mut failing = false;
    while !shared.stop.load(Ordering::Acquire) {
        let mut poll = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut poll, 1, 100) } <= 0 {
            continue;
        }
        // SAFETY: plain system call; the descriptor it returns is owned right away.
        let raw = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if raw < 0 {
            let e = std::io::Error::last_os_error();
            let transient =
                matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::ECONNABORTED));
            if !transient {
                // Out of descriptors or memory: the connection stays queued and `poll` says
                // so again at once, so wait instead of spinning on a core until one frees up.
                if !failing {
                    log::warn!("accepting a connection: {e} (retrying every 100 ms)");
                }
                failing = true;
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        failing = false;
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let connection = unsafe { OwnedFd::from_raw_fd(raw) };
        let slot = match protocol::peer_uid(connection.as_fd()) {
            Ok(uid) => Slot::take(shared, uid),
            Err(e) => Err(format!("cannot tell which user connected (SO_PEERCRED: {e})")),
        };
        let slot = match slot {
            Ok(slot) => slot,
            Err(message) => {
                log::info!("a connection refused: {message}");
                // A refusal never holds up the accept loop: the reader has one second to
                // take it (a fresh connection's queue has room for it anyway).
                let _ = protocol::set_timeouts(connection.as_fd(), Some(Duration::from_secs(1)));
                refuse(&connection, &message);
                continue;
            }
        };
        let shared = Arc::clone(shared);
        let spawned = std::thread::Builder::new().name("gantry-lease".into()).spawn(move || {
            serve(&connection, &shared, hello, slot.uid);
            drop(slot);
        });
        if let Err(e) = spawned {
            log::warn!("a lease thread could not start: {e}");
        }
    }
}

/// Sends `ERROR` with `message` (cut to 1,000 characters, so it stays one small message).
fn refuse(connection: &OwnedFd, message: &str) {
    let message: String = message.chars().take(1000).collect();
    let text = json!({"type": "error", "message": message}).to_string();
    let _ = protocol::send(connection.as_fd(), text.as_bytes(), &[]);
}

/// One connection: `HELLO`, the lease, then waiting for its end.
fn serve(connection: &OwnedFd, shared: &Shared, hello: Duration, uid: u32) {
    if let Err(e) = protocol::set_timeouts(connection.as_fd(), Some(hello)) {
        log::warn!("a connection: setting timeouts: {e}");
        return;
    }
    let wants_device = match check_hello(connection) {
        Ok(wants) => wants && device_allowed(protocol::peer_uid(connection.as_fd()).ok()),
        Err(message) => {
            log::info!("a connection refused: {message}");
            refuse(connection, &message);
            return;
        }
    };
    let Some((v, published)) = shared.book.lock().acquire() else {
        refuse(connection, "nothing is published yet");
        return;
    };
    let held = {
        let mut c = shared.connections.lock();
        let mine = c.leases.entry(uid).or_default();
        let old = old_versions(mine, v);
        if old >= OLD_VERSIONS_PER_USER && !device_allowed(Some(uid)) {
            Err(format!(
                "uid {uid} holds leases on {old} older versions (at most \
                 {OLD_VERSIONS_PER_USER} per user): close the loads that hold them first"
            ))
        } else {
            mine.push(v);
            Ok(())
        }
    };
    match &held {
        Ok(()) => match send_lease(connection, &published, wants_device) {
            Err(e) => log::info!("a lease could not be sent: {e}"),
            Ok(()) => wait_for_end(connection),
        },
        Err(message) => {
            log::info!("a connection refused: {message}");
            refuse(connection, message);
        }
    }
    drop(published);
    if held.is_ok() {
        let mut c = shared.connections.lock();
        if let Some(mine) = c.leases.get_mut(&uid) {
            if let Some(k) = mine.iter().position(|&h| h == v) {
                mine.swap_remove(k);
            }
            if mine.is_empty() {
                c.leases.remove(&uid);
            }
        }
    }
    let freed = shared.book.lock().release(v);
    if let Some(old) = freed {
        log::info!("version {} freed (its last lease ended)", old.version);
    }
}

/// Whether a reader of user `peer` may have the device residency's CUDA IPC handles: only
/// this server's own user or root. A mapped handle is writable memory (CUDA IPC has no
/// read-only mapping), and what a reader writes there every later reader copies; the sealed
/// memfds are what another user the socket's mode lets in reads.
fn device_allowed(peer: Option<u32>) -> bool {
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    peer.is_some_and(|uid| uid == me || uid == 0)
}

/// Checks `HELLO`; whether the reader takes device residency too.
fn check_hello(connection: &OwnedFd) -> Result<bool, String> {
    let bytes = match protocol::recv(connection.as_fd(), 0) {
        Ok(Received::Message { bytes, fds }) if fds.is_empty() => bytes,
        Ok(Received::Message { .. }) => return Err("HELLO came with descriptors".into()),
        Ok(Received::Closed) => return Err("closed before HELLO".into()),
        Err(e) => return Err(format!("no HELLO: {e}")),
    };
    let hello: Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("HELLO is not JSON: {e}"))?;
    if hello.get("type").and_then(Value::as_str) != Some("hello") {
        return Err("the first message must be HELLO".into());
    }
    let protocol = hello.get("protocol").and_then(Value::as_u64);
    if protocol != Some(PROTOCOL_VERSION) {
        return Err(format!("protocol {protocol:?}: this server speaks {PROTOCOL_VERSION}"));
    }
    match hello.get("residency").and_then(Value::as_str) {
        None | Some("host") => Ok(false),
        Some("host+device") => Ok(true),
        Some(other) => {
            Err(format!("residency '{}': host or host+device is served", other.escape_debug()))
        }
    }
}

fn send_lease(
    connection: &OwnedFd,
    published: &Published,
    wants_device: bool,
) -> std::io::Result<()> {
    let p = &published.publication;
    let device = published.device.as_ref().filter(|_| wants_device);
    let lease = json!({
        "type": "lease",
        "protocol": PROTOCOL_VERSION,
        "version": published.version,
        "residency": if device.is_some() { "host+device" } else { "host" },
        "files": p.files.len(),
        "tensors": p.tensors,
        "table_len": p.table_len,
    });
    protocol::send(connection.as_fd(), lease.to_string().as_bytes(), &[p.table.as_fd()])?;
    for (chunk, first) in p.files.chunks(FDS_PER_MESSAGE).zip((0..).step_by(FDS_PER_MESSAGE)) {
        let message = json!({"type": "files", "first": first, "count": chunk.len()});
        let fds: Vec<_> = chunk.iter().map(|(_, f, _)| f.as_fd()).collect();
        protocol::send(connection.as_fd(), message.to_string().as_bytes(), &fds)?;
    }
    for message in device.map(Residency::messages).unwrap_or_default() {
        protocol::send(connection.as_fd(), message.to_string().as_bytes(), &[])?;
    }
    Ok(())
}

/// Waits without a timeout until the reader closes the connection or sends `RELEASE`.
fn wait_for_end(connection: &OwnedFd) {
    if protocol::set_timeouts(connection.as_fd(), None).is_err() {
        return;
    }
    loop {
        match protocol::recv(connection.as_fd(), 0) {
            Ok(Received::Message { bytes, .. }) => {
                let release = serde_json::from_slice::<Value>(&bytes)
                    .ok()
                    .is_some_and(|v| v.get("type").and_then(Value::as_str) == Some("release"));
                if release {
                    return;
                }
            }
            Ok(Received::Closed) | Err(_) => return,
        }
    }
}

/// SIGTERM and SIGINT, blocked in the calling thread (and so in every thread it starts after),
/// for [`TerminationSignals::wait`] to take: how a serving process ends cleanly instead of
/// being killed inside a lease.
pub struct TerminationSignals {
    set: libc::sigset_t,
}

impl std::fmt::Debug for TerminationSignals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TerminationSignals(SIGTERM, SIGINT)")
    }
}

impl TerminationSignals {
    /// Blocks SIGTERM and SIGINT in this thread; call it before starting any thread.
    pub fn block() -> Result<Self> {
        // SAFETY: sigset_t is plain old data, initialised by sigemptyset before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; the calls only change it and this thread's mask.
        let rc = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
        };
        if rc != 0 {
            let source = std::io::Error::from_raw_os_error(rc);
            return Err(Error::Resource { what: "blocking SIGTERM and SIGINT", source });
        }
        Ok(Self { set })
    }

    /// Waits for SIGTERM or SIGINT; returns its number.
    pub fn wait(&self) -> i32 {
        loop {
            let mut signal = 0;
            // SAFETY: `set` is a valid sigset_t and `signal` a valid place for the result.
            if unsafe { libc::sigwait(&self.set, &mut signal) } == 0 {
                return signal;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The old versions a user's leases keep: distinct, the current one not counted.
    #[test]
    fn old_versions_count_distinct_versions_but_the_current() {
        assert_eq!(old_versions(&[], 7), 0);
        assert_eq!(old_versions(&[7, 7, 7], 7), 0);
        assert_eq!(old_versions(&[3, 7, 3, 5], 7), 2);
        assert_eq!(old_versions(&[3, 5, 6], 7), 3);
    }

    /// Device handles go to this user and root only; another user, or one unknown, reads the
    /// sealed memfds.
    #[test]
    fn device_handles_go_to_this_user_and_root_only() {
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        assert!(device_allowed(Some(me)));
        assert!(device_allowed(Some(0)));
        assert!(!device_allowed(Some(if me == 65534 { 65533 } else { 65534 })));
        assert!(!device_allowed(None));
    }
}
