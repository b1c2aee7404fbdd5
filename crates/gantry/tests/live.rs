//! Live sources (`unix:///path`): a server in this process, readers against the checkpoint
//! files read with std and the `safetensors` crate, and fake servers that break the protocol.

mod common;

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use gantry::live::{protocol, Lease, Server, ServerOptions};
use gantry::{Checkpoint, Config, Dtype, Loader};

fn checkpoint(dir: &Path, seed: u64) -> Checkpoint {
    let spec = gantry::synth::SynthSpec {
        vocab: 64,
        hidden: 64,
        intermediate: 224,
        kv: 16,
        layers: 2,
        shards: 2,
    };
    gantry::synth::write_checkpoint(dir, &spec, seed).unwrap();
    Checkpoint::open(dir).unwrap()
}

fn url(socket: &Path) -> String {
    format!("unix://{}", socket.display())
}

/// Every tensor of `model` equals its bytes in the local checkpoint `local`, read with std.
fn assert_same_as(model: &gantry::HostModel, local: &Checkpoint) {
    assert_eq!(model.tensors().count(), local.tensors.len());
    for l in &local.tensors {
        let t = model.tensor(&l.name).expect("tensor loaded");
        assert!(t.bytes == reference(local, l).as_slice(), "tensor {} differs", l.name);
    }
}

/// Waits (at most 10 s) until `held` is what the server holds.
fn wait_held(server: &Server, held: impl Fn(&[(String, usize)]) -> bool) -> Vec<(String, usize)> {
    for _ in 0..200 {
        let now = server.held();
        if held(&now) {
            return now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    server.held()
}

#[test]
fn a_served_checkpoint_loads_bit_exact_and_its_memfds_are_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let local = checkpoint(&dir.path().join("m"), 1);
    let socket = dir.path().join("s");
    let server = Server::start(&socket, &ServerOptions::default()).unwrap();
    let version = server.publish(dir.path().join("m"), &Config::default()).unwrap();
    let loader = Loader::new(Config::default()).unwrap();
    let model = loader.load(url(&socket)).unwrap();
    assert_same_as(&model, &local);
    assert_eq!(model.report().version.as_deref(), Some(version.as_str()));
    let reason = &model.report().files[0].reason;
    assert!(reason.starts_with("live (shared memory)"), "{reason}");
    // Each memfd is its file byte for byte, header included.
    let lease = Lease::acquire(&url(&socket)).unwrap();
    for info in &local.files {
        let name = info.path.file_name().unwrap().to_str().unwrap();
        let file = lease.file(name).expect("file in the lease");
        let mut bytes = vec![0u8; info.file_len as usize];
        file.read_exact_at(&mut bytes, 0).unwrap();
        assert!(bytes == std::fs::read(&info.path).unwrap(), "{name} differs");
        // The memfd cannot be written, by this process or any other.
        assert!(file.write_at(b"x", 0).is_err(), "a sealed memfd took a write");
    }
    assert_eq!(
        gantry::live::verify(&gantry::open(url(&socket)).unwrap()).unwrap(),
        local.tensors.len()
    );
}

#[test]
fn published_tensors_read_back_by_the_safetensors_crate() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s");
    let server = Server::start(&socket, &ServerOptions::default()).unwrap();
    let a: Vec<u8> = (0..24u8).collect();
    let b: Vec<u8> = (0..6).map(|i| 200 - i).collect();
    let shape_a = [2u64, 3];
    let shape_b = [3u64];
    let tensors =
        vec![("w", Dtype::F32, &shape_a[..], &a[..]), ("b", Dtype::BF16, &shape_b[..], &b[..])];
    server.publish_tensors(tensors).unwrap();
    let lease = Lease::acquire(&url(&socket)).unwrap();
    let file = lease.file("model.safetensors").unwrap();
    let mut bytes = vec![0u8; file.metadata().unwrap().len() as usize];
    file.read_exact_at(&mut bytes, 0).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let w = parsed.tensor("w").unwrap();
    assert_eq!(
        (w.dtype(), w.shape(), w.data()),
        (safetensors::Dtype::F32, &[2usize, 3][..], &a[..])
    );
    let bt = parsed.tensor("b").unwrap();
    assert_eq!(
        (bt.dtype(), bt.shape(), bt.data()),
        (safetensors::Dtype::BF16, &[3usize][..], &b[..])
    );
    let model = Loader::new(Config::default()).unwrap().load(url(&socket)).unwrap();
    assert_eq!(model.tensor("w").unwrap().bytes, &a[..]);
    assert_eq!(model.tensor("b").unwrap().bytes, &b[..]);
    // A size that does not match the shape is refused, naming the tensor.
    let short = [0u8; 5];
    let err =
        server.publish_tensors(vec![("bad", Dtype::F32, &shape_b[..], &short[..])]).unwrap_err();
    assert!(err.to_string().contains("'bad'"), "{err}");
}

#[test]
fn an_update_leaves_a_readers_version_whole_and_the_next_reader_gets_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let old = checkpoint(&dir.path().join("old"), 1);
    let new = checkpoint(&dir.path().join("new"), 2);
    let socket = dir.path().join("s");
    let server = Server::start(&socket, &ServerOptions::default()).unwrap();
    let v1 = server.publish(dir.path().join("old"), &Config::default()).unwrap();
    let loader = Loader::new(Config::default()).unwrap();
    // This process's lease (the registry's) on v1, and its checkpoint.
    let c1 = gantry::open(url(&socket)).unwrap();
    let v2 = server.publish(dir.path().join("new"), &Config::default()).unwrap();
    assert_ne!(v1, v2);
    let held = wait_held(&server, |h| h.len() == 2);
    assert_eq!(held, vec![(v1.clone(), 1), (v2.clone(), 0)]);
    // The reader of v1 still loads v1, whole.
    let m1 = loader.load_with(c1.clone(), |_| true, |_| {}).unwrap();
    assert_same_as(&m1, &old);
    assert_eq!(m1.report().version.as_deref(), Some(v1.as_str()));
    // The next open gets v2, and releases v1, which the server then frees.
    let m2 = loader.load(url(&socket)).unwrap();
    assert_same_as(&m2, &new);
    assert_eq!(m2.report().version.as_deref(), Some(v2.as_str()));
    let held = wait_held(&server, |h| h.len() == 1);
    assert_eq!(held, vec![(v2.clone(), 1)]);
    // A checkpoint of the version no longer held fails, naming it: no bytes of two versions.
    let err = loader.load_with(c1, |_| true, |_| {}).unwrap_err().to_string();
    assert!(err.contains(&v1) && err.contains("open the source again"), "{err}");
    assert!(gantry::live::release(&url(&socket)));
    assert_eq!(wait_held(&server, |h| h == [(v2.clone(), 0)]), vec![(v2, 0)]);
}

#[test]
fn a_lease_keeps_its_bytes_after_the_server_closes() {
    let dir = tempfile::tempdir().unwrap();
    let local = checkpoint(&dir.path().join("m"), 3);
    let socket = dir.path().join("s");
    let server = Server::start(&socket, &ServerOptions::default()).unwrap();
    server.publish(dir.path().join("m"), &Config::default()).unwrap();
    let checkpoint = gantry::open(url(&socket)).unwrap();
    server.close();
    assert!(std::fs::symlink_metadata(&socket).is_err(), "socket file left after close");
    let model =
        Loader::new(Config::default()).unwrap().load_with(checkpoint, |_| true, |_| {}).unwrap();
    assert_same_as(&model, &local);
    let err = Lease::acquire(&url(&socket)).unwrap_err().to_string();
    assert!(err.contains("no server"), "{err}");
}

#[test]
fn the_socket_path_is_refused_when_served_linked_or_not_a_socket_and_replaced_when_stale() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s");
    let first = Server::start(&socket, &ServerOptions::default()).unwrap();
    let err = Server::start(&socket, &ServerOptions::default()).unwrap_err().to_string();
    assert!(err.contains("another live server answers"), "{err}");
    drop(first);
    // A stale socket: bound, and nobody listening any more.
    let stale = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    drop(stale);
    assert!(std::fs::symlink_metadata(&socket).is_ok());
    let second = Server::start(&socket, &ServerOptions::default()).unwrap();
    second.publish_tensors(vec![("x", Dtype::U8, &[1u64][..], &[7u8][..])]).unwrap();
    assert_eq!(Lease::acquire(&url(&socket)).unwrap().checkpoint().tensors.len(), 1);
    drop(second);
    // A symbolic link and a regular file are left alone.
    let target = dir.path().join("target");
    std::fs::write(&target, b"keep").unwrap();
    std::os::unix::fs::symlink(&target, &socket).unwrap();
    let err = Server::start(&socket, &ServerOptions::default()).unwrap_err().to_string();
    assert!(err.contains("symbolic link"), "{err}");
    assert!(std::fs::symlink_metadata(&socket).unwrap().file_type().is_symlink());
    std::fs::remove_file(&socket).unwrap();
    std::fs::write(&socket, b"data").unwrap();
    let err = Server::start(&socket, &ServerOptions::default()).unwrap_err().to_string();
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&socket).unwrap(), b"data");
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
}

/// What another user may put at the socket path while a server runs (a file, a link to the
/// server's own socket moved away, another socket) is left in place when the server closes,
/// and so is the server's socket where it was moved; nothing of the server's is left behind.
#[test]
fn a_file_swapped_in_at_the_socket_path_is_left_at_close() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s");
    let moved = dir.path().join("moved");
    let entries = || {
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    // A regular file.
    let server = Server::start(&socket, &ServerOptions::default()).unwrap();
    std::fs::rename(&socket, &moved).unwrap();
    std::fs::write(&socket, b"theirs").unwrap();
    server.close();
    assert_eq!(std::fs::read(&socket).unwrap(), b"theirs");
    assert!(std::fs::symlink_metadata(&moved).unwrap().file_type().is_socket());
    assert_eq!(entries(), ["moved", "s"]);
    std::fs::remove_file(&socket).unwrap();
    std::fs::remove_file(&moved).unwrap();
    // A symbolic link to the server's own socket: the link is not the socket.
    let server = Server::start(&socket, &ServerOptions::default()).unwrap();
    std::fs::rename(&socket, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &socket).unwrap();
    drop(server);
    assert!(std::fs::symlink_metadata(&socket).unwrap().file_type().is_symlink());
    assert!(std::fs::symlink_metadata(&moved).unwrap().file_type().is_socket());
    assert_eq!(entries(), ["moved", "s"]);
    std::fs::remove_file(&socket).unwrap();
    std::fs::remove_file(&moved).unwrap();
    // Another socket, bound where the server's was.
    let server = Server::start(&socket, &ServerOptions::default()).unwrap();
    std::fs::remove_file(&socket).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let inode =
        |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::symlink_metadata(p).unwrap());
    let bound = inode(&socket);
    server.close();
    assert_eq!(inode(&socket), bound, "the other socket was replaced");
    let client = std::os::unix::net::UnixStream::connect(&socket);
    assert!(client.is_ok(), "the other socket no longer answers: {client:?}");
    drop(other);
    assert_eq!(entries(), ["s"]);
}

/// One user holds at most `max_connections_per_user` connections: the next ones are refused
/// with an error that says so (the uid and the cap), take no slot, and a slot frees when its
/// connection closes. A cap out of range is refused at start.
#[test]
fn connections_are_capped_per_user_and_a_closed_one_frees_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s");
    for bad in [0, gantry::live::server::CONNECTIONS_MAX + 1] {
        let options = ServerOptions { max_connections_per_user: bad, ..Default::default() };
        let err = Server::start(&socket, &options).unwrap_err().to_string();
        assert!(err.contains(&format!("max_connections_per_user {bad}")), "{err}");
        assert!(std::fs::symlink_metadata(&socket).is_err(), "a refused start bound its socket");
    }
    let options = ServerOptions { max_connections_per_user: 3, ..Default::default() };
    let server = Server::start(&socket, &options).unwrap();
    server.publish_tensors(vec![("x", Dtype::U8, &[1u64][..], &[7u8][..])]).unwrap();
    let u = url(&socket);
    let acquire = || Lease::acquire_with(&u, Duration::from_secs(10));
    let mut held: Vec<Lease> = (0..3).map(|_| acquire().unwrap()).collect();
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    for _ in 0..3 {
        let err = acquire().unwrap_err().to_string();
        assert!(
            err.contains(&format!("the server refused: too many connections from uid {me}"))
                && err.contains("at most 3 per user")
                && err.contains(&u),
            "{err}"
        );
    }
    assert_eq!(wait_held(&server, |h| h.iter().map(|(_, n)| n).sum::<usize>() == 3).len(), 1);
    drop(held.pop());
    // The server sees the close on its own thread: wait until it has (at most 10 s).
    let mut again = acquire();
    for _ in 0..200 {
        if again.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        again = acquire();
    }
    let again = again.expect("a closed connection's slot was not freed");
    assert_eq!(again.checkpoint().tensors.len(), 1);
    assert!(acquire().is_err(), "a fourth connection while three are held");
    drop(held);
    drop(again);
    server.close();
}

#[test]
fn the_socket_has_its_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    for mode in [0o600, 0o660] {
        let socket = dir.path().join(format!("s{mode:o}"));
        let server = Server::start(&socket, &ServerOptions { mode, ..Default::default() }).unwrap();
        let meta = std::fs::symlink_metadata(&socket).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, mode);
        drop(server);
    }
}

// ---- fake servers that break the rules ----

/// A listening socket at `dir/fake` whose first connection is handed to `script` after its
/// HELLO; returns the source string.
fn fake_server(
    dir: &Path,
    script: impl FnOnce(OwnedFd) + Send + 'static,
) -> (String, std::thread::JoinHandle<()>) {
    let path = dir.join("fake");
    let listener = protocol::socket().unwrap();
    protocol::bind_listen(listener.as_fd(), &path).unwrap();
    let handle = std::thread::spawn(move || {
        // SAFETY: accept on a listening socket we own; the result is owned at once.
        let raw = unsafe {
            libc::accept(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut())
        };
        assert!(raw >= 0);
        // SAFETY: a fresh descriptor.
        let c = unsafe { OwnedFd::from_raw_fd(raw) };
        protocol::set_timeouts(c.as_fd(), Some(Duration::from_secs(10))).unwrap();
        let _hello = protocol::recv(c.as_fd(), 0).unwrap();
        script(c);
    });
    (url(&path), handle)
}

fn sealed(bytes: &[u8], seal: bool) -> std::fs::File {
    let f = protocol::memfd("test").unwrap();
    f.write_all_at(bytes, 0).unwrap();
    if seal {
        protocol::seal(&f).unwrap();
    }
    f
}

fn send_json(c: &OwnedFd, value: serde_json::Value, fds: &[std::os::fd::BorrowedFd<'_>]) {
    protocol::send(c.as_fd(), value.to_string().as_bytes(), fds).unwrap();
}

/// One safetensors file written by the `safetensors` crate, and its digest table.
fn one_file(dir: &Path) -> (Vec<u8>, Checkpoint) {
    let path = dir.join("one.safetensors");
    write_file(&path, &[(Dtype::F32, vec![4, 4]), (Dtype::U8, vec![10])], 5);
    (std::fs::read(&path).unwrap(), Checkpoint::open(&path).unwrap())
}

/// A lease as a correct server sends it, with `file` as its one file announced as `len`.
fn lease(c: &OwnedFd, file: &std::fs::File, len: u64, digests: serde_json::Value) {
    let table =
        serde_json::json!({"files": [{"name": "one.safetensors", "len": len}], "digests": digests});
    let text = table.to_string();
    let t = sealed(text.as_bytes(), true);
    let m = serde_json::json!({"type": "lease", "protocol": 1, "version": "9-fake", "residency": "host",
        "files": 1, "tensors": 2, "table_len": text.len()});
    send_json(c, m, &[t.as_fd()]);
    send_json(c, serde_json::json!({"type": "files", "first": 0, "count": 1}), &[file.as_fd()]);
}

fn digests_of(bytes: &[u8], local: &Checkpoint) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for t in &local.tensors {
        let d = xxhash_rust::xxh3::xxh3_64(&bytes[t.offset as usize..(t.offset + t.len) as usize]);
        map.insert(t.name.clone(), format!("{d:016x}").into());
    }
    serde_json::Value::Object(map)
}

/// The lease holder of `another_user_keeps_at_most_two_old_versions`: run as another user,
/// takes a lease on `GANTRY_HOLD_URL` for each line read, prints `HELD <version>` or
/// `REFUSED <error>`, and keeps every lease until its standard input closes.
#[test]
fn hold_child() {
    let Ok(url) = std::env::var("GANTRY_HOLD_URL") else { return };
    let mut held = Vec::new();
    for _ in std::io::stdin().lines().map_while(Result::ok) {
        match Lease::acquire_with(&url, Duration::from_secs(10)) {
            Ok(lease) => {
                println!("HELD {}", lease.version());
                held.push(lease);
            }
            Err(e) => println!("REFUSED {e}"),
        }
    }
}

/// Another user the socket's mode lets in may keep at most `OLD_VERSIONS_PER_USER` (2)
/// superseded publications alive with its leases: past that it is refused a new lease until it
/// lets the old ones go (each is a whole publication in memory); the server's own user is not
/// limited.
#[test]
fn another_user_keeps_at_most_two_old_versions() {
    use std::io::{BufRead, Write};
    if std::env::var_os("GANTRY_SKIP_ROOT_TESTS").is_some() {
        eprintln!(
            "skipped: GANTRY_SKIP_ROOT_TESTS is set (this test runs a reader as another user)"
        );
        return;
    }
    assert_eq!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "this test runs a reader as another user with setpriv: run it as root, or set \
         GANTRY_SKIP_ROOT_TESTS=1 to skip it"
    );
    assert_eq!(gantry::live::server::OLD_VERSIONS_PER_USER, 2);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .unwrap();
    let socket = dir.path().join("s");
    let options = ServerOptions { mode: 0o666, ..ServerOptions::default() };
    let server = Server::start(&socket, &options).unwrap();
    let publish = |k: u8| server.publish_tensors(vec![("x", Dtype::U8, &[1u64][..], &[k][..])]);
    let mut versions = vec![publish(1).unwrap()];
    let mut child = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "hold_child", "--nocapture", "--test-threads=1"])
        .env("GANTRY_HOLD_URL", url(&socket))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux) runs the reader as another user");
    let mut to = child.stdin.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            // The harness prints `test hold_child ... ` before the first line, unended.
            for key in ["HELD ", "REFUSED "] {
                if let Some((_, rest)) = line.split_once(key) {
                    let _ = tx.send(format!("{key}{rest}"));
                }
            }
        }
    });
    let mut acquire = || {
        writeln!(to, "acquire").unwrap();
        rx.recv_timeout(Duration::from_secs(30)).expect("the reader answers")
    };
    assert_eq!(acquire(), format!("HELD {}", versions[0]));
    versions.push(publish(2).unwrap());
    assert_eq!(acquire(), format!("HELD {}", versions[1]));
    versions.push(publish(3).unwrap());
    let refused = acquire();
    assert!(
        refused.starts_with("REFUSED")
            && refused.contains("uid 65534 holds leases on 2 older versions"),
        "{refused}"
    );
    // The two old versions stay for their leases, and the current one.
    assert_eq!(wait_held(&server, |h| h.len() == 3).len(), 3, "{:?}", server.held());
    // The server's own user is not limited.
    let u = url(&socket);
    let mine: Vec<Lease> =
        (0..3).map(|_| Lease::acquire_with(&u, Duration::from_secs(10)).unwrap()).collect();
    drop(mine);
    drop(to); // the reader lets its leases go: the old versions are freed
    assert!(child.wait().unwrap().success());
    assert_eq!(wait_held(&server, |h| h.len() == 1).len(), 1, "{:?}", server.held());
    server.close();
}

fn acquire_error(url: &str) -> String {
    with_deadline(Duration::from_secs(20), {
        let url = url.to_owned();
        move || Lease::acquire_with(&url, Duration::from_secs(2)).unwrap_err().to_string()
    })
}

#[test]
fn a_fake_server_speaking_garbage_or_nothing_gives_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (u, h) =
        fake_server(dir.path(), |c| protocol::send(c.as_fd(), b"\xff{not json", &[]).unwrap());
    assert!(acquire_error(&u).contains("not JSON"));
    h.join().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (u, h) = fake_server(dir.path(), drop);
    let err = acquire_error(&u);
    assert!(err.contains("closed the connection during LEASE"), "{err}");
    h.join().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (u, h) = fake_server(dir.path(), |c| {
        std::thread::sleep(Duration::from_secs(4));
        drop(c);
    });
    let err = acquire_error(&u);
    assert!(err.contains("did not answer within"), "{err}");
    h.join().unwrap();
    // Oversized: one message past the cap.
    let dir = tempfile::tempdir().unwrap();
    let (u, h) = fake_server(dir.path(), |c| {
        let big = vec![b' '; protocol::MESSAGE_BYTES_MAX + 10];
        // SAFETY: a valid buffer of its length.
        let n = unsafe { libc::send(c.as_raw_fd(), big.as_ptr().cast(), big.len(), 0) };
        assert_eq!(n as usize, big.len());
        std::thread::sleep(Duration::from_millis(500));
    });
    let err = acquire_error(&u);
    assert!(err.contains("longer than"), "{err}");
    h.join().unwrap();
    // A lease of another protocol, and one with a hostile file name.
    let dir = tempfile::tempdir().unwrap();
    let (u, h) = fake_server(dir.path(), |c| {
        send_json(&c, serde_json::json!({"type": "lease", "protocol": 99}), &[]);
    });
    assert!(acquire_error(&u).contains("protocol Some(99)"));
    h.join().unwrap();
}

#[test]
fn a_fake_server_with_unsealed_or_wrongly_sized_memfds_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let (bytes, local) = one_file(work.path());
    let len = bytes.len() as u64;
    for (seal, announced, expect) in [
        (false, len, "not sealed"),
        (true, len + 8, "announced as"),
        (true, len - 8, "announced as"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let digests = digests_of(&bytes, &local);
        let file = sealed(&bytes, seal);
        let (u, h) = fake_server(dir.path(), move |c| {
            lease(&c, &file, announced, digests);
            std::thread::sleep(Duration::from_millis(500));
        });
        let err = acquire_error(&u);
        assert!(err.contains(expect), "{expect}: {err}");
        h.join().unwrap();
    }
    // More descriptors than files announced.
    let dir = tempfile::tempdir().unwrap();
    let digests = digests_of(&bytes, &local);
    let (u, h) = fake_server(dir.path(), move |c| {
        let file = sealed(&bytes, true);
        let table = serde_json::json!({"files": [{"name": "one.safetensors", "len": len}], "digests": digests});
        let text = table.to_string();
        let t = sealed(text.as_bytes(), true);
        let m = serde_json::json!({"type": "lease", "protocol": 1, "version": "1-x", "residency": "host",
            "files": 1, "tensors": 2, "table_len": text.len()});
        send_json(&c, m, &[t.as_fd()]);
        send_json(
            &c,
            serde_json::json!({"type": "files", "first": 0, "count": 2}),
            &[file.as_fd(), file.as_fd()],
        );
        std::thread::sleep(Duration::from_millis(500));
    });
    let err = acquire_error(&u);
    assert!(err.contains("FILES"), "{err}");
    h.join().unwrap();
}

#[test]
fn a_digest_mismatch_fails_naming_the_tensor() {
    let work = tempfile::tempdir().unwrap();
    let (bytes, local) = one_file(work.path());
    let len = bytes.len() as u64;
    let mut digests = digests_of(&bytes, &local);
    let good = digests.clone();
    digests["t00001"] = "0123456789abcdef".into();
    let dir = tempfile::tempdir().unwrap();
    let (u, h) = {
        let bytes = bytes.clone();
        fake_server(dir.path(), move |c| {
            lease(&c, &sealed(&bytes, true), len, digests);
            let _ = protocol::recv(c.as_fd(), 0); // until the reader lets go
        })
    };
    let checkpoint = gantry::open(&u).unwrap();
    // The load itself is whole and right; the check against the table names the tensor.
    let model = Loader::new(Config::default())
        .unwrap()
        .load_with(checkpoint.clone(), |_| true, |_| {})
        .unwrap();
    for t in &local.tensors {
        assert!(model.tensor(&t.name).unwrap().bytes == reference(&local, t).as_slice());
    }
    let err = gantry::live::verify(&checkpoint).unwrap_err().to_string();
    assert!(err.contains("tensor 't00001'") && err.contains("9-fake"), "{err}");
    assert!(gantry::live::release(&u));
    h.join().unwrap();
    // The same file with the right table verifies.
    let dir = tempfile::tempdir().unwrap();
    let (u, h) = fake_server(dir.path(), move |c| {
        lease(&c, &sealed(&bytes, true), len, good);
        let _ = protocol::recv(c.as_fd(), 0);
    });
    assert_eq!(gantry::live::verify(&gantry::open(&u).unwrap()).unwrap(), 2);
    assert!(gantry::live::release(&u));
    h.join().unwrap();
}

#[test]
fn no_server_and_bad_urls_are_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing: PathBuf = dir.path().join("nobody");
    let err = gantry::open(url(&missing)).unwrap_err().to_string();
    assert!(err.contains("no server"), "{err}");
    let err = gantry::open("unix://relative/path").unwrap_err().to_string();
    assert!(err.contains("not a live source"), "{err}");
}

/// A lease that announces device residency (`host+device`) then sends `extra` as its DEVICE
/// messages.
fn device_lease(
    dir: &Path,
    extra: Vec<serde_json::Value>,
) -> (String, std::thread::JoinHandle<()>, Vec<u8>) {
    let (bytes, local) = one_file(dir);
    let digests = digests_of(&bytes, &local);
    let file = sealed(&bytes, true);
    let len = bytes.len() as u64;
    let (u, h) = fake_server(dir, move |c| {
        let table = serde_json::json!({"files": [{"name": "one.safetensors", "len": len}], "digests": digests});
        let text = table.to_string();
        let t = sealed(text.as_bytes(), true);
        let m = serde_json::json!({"type": "lease", "protocol": 1, "version": "3-dev", "residency": "host+device",
            "files": 1, "tensors": 2, "table_len": text.len()});
        send_json(&c, m, &[t.as_fd()]);
        send_json(
            &c,
            serde_json::json!({"type": "files", "first": 0, "count": 1}),
            &[file.as_fd()],
        );
        for m in extra {
            send_json(&c, m, &[]);
        }
        // Hold the lease until the reader lets go.
        let _ = protocol::recv(c.as_fd(), 0);
    });
    (u, h, bytes)
}

/// Device residency is handed after the files; a bad `DEVICE` message (or none) is a clean
/// error, and a good one is kept with the lease, whose host bytes still load (no GPU needed).
#[test]
fn device_handles_are_checked_and_a_host_load_ignores_them() {
    let handle = "ab".repeat(64);
    let device = |first: u64, handles: serde_json::Value, bus: &str| {
        let count = handles.as_array().map_or(0, Vec::len);
        serde_json::json!({"type": "device", "first": first, "count": count, "bus_id": bus, "handles": handles})
    };
    for (bad, expect) in [
        (vec![], "waiting for DEVICE"),
        (vec![device(1, serde_json::json!([handle]), "0000:1A:00.0")], "DEVICE: handles 1..2"),
        (vec![device(0, serde_json::json!(["12"]), "0000:1A:00.0")], "128 hex digits"),
        (vec![device(0, serde_json::json!([handle]), "")], "bus id"),
        (vec![serde_json::json!({"type": "files"})], "expected DEVICE"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (u, h, _) = device_lease(dir.path(), bad);
        let err = acquire_error(&u);
        assert!(err.contains(expect), "{expect}: {err}");
        h.join().unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let (u, h, bytes) =
        device_lease(dir.path(), vec![device(0, serde_json::json!([handle]), "0000:1A:00.0")]);
    let lease = Lease::acquire_with(&u, Duration::from_secs(5)).unwrap();
    let share = lease.device().expect("the device share");
    assert_eq!(share.bus_id, "0000:1A:00.0");
    assert_eq!(share.handles.len(), 1);
    assert_eq!(share.handles[0].map(|h| h.to_hex()), Some("ab".repeat(64)));
    drop(lease);
    h.join().unwrap();
    // Loaded to the host, such a source reads its memfds.
    let dir = tempfile::tempdir().unwrap();
    let (u, h, _) =
        device_lease(dir.path(), vec![device(0, serde_json::json!([handle]), "0000:1A:00.0")]);
    let model = Loader::new(Config::default()).unwrap().load(&u).unwrap();
    let reference = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for t in model.tensors() {
        assert_eq!(t.bytes, reference.tensor(&t.entry.name).unwrap().data(), "{}", t.entry.name);
    }
    assert_eq!(model.report().files[0].reader, Some(gantry::ReaderKind::Buffered));
    gantry::live::release(&u);
    drop(model);
    h.join().unwrap();
}

/// The server half of the GPU trials: serves `GANTRY_SERVE_CHILD` (a checkpoint path) with
/// device residency on cuda:0 at `GANTRY_SERVE_SOCKET`, prints `READY` and serves until its
/// standard input closes. (CUDA IPC does not open a handle in the process that exported it,
/// so the server is another process.)
#[test]
fn serve_child() {
    let (Ok(path), Ok(socket)) =
        (std::env::var("GANTRY_SERVE_CHILD"), std::env::var("GANTRY_SERVE_SOCKET"))
    else {
        return;
    };
    let options = ServerOptions { device: Some(0), ..ServerOptions::default() };
    let server = Server::start(&socket, &options).unwrap();
    let version = server.publish(&path, &Config::default()).unwrap();
    println!("READY {version}");
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut rest);
    server.close();
}

/// A server process with device residency on cuda:0, until dropped.
struct DeviceServer {
    child: std::process::Child,
    url: String,
    version: String,
}

impl DeviceServer {
    fn start(checkpoint: &Path, dir: &Path) -> Self {
        use std::io::BufRead;
        let socket = dir.join("device.sock");
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "serve_child", "--nocapture", "--test-threads=1"])
            .env("GANTRY_SERVE_CHILD", checkpoint)
            .env("GANTRY_SERVE_SOCKET", &socket)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                // The test harness prints `test serve_child ... ` before the line, unended.
                if let Some((_, v)) = line.split_once("READY ") {
                    let _ = tx.send(v.to_owned());
                }
            }
        });
        let version = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(v) => v,
            Err(_) => {
                let _ = child.kill();
                panic!("the server child printed no READY line within 60 s");
            }
        };
        DeviceServer { child, url: url(&socket), version }
    }
}

impl Drop for DeviceServer {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("the server child did not end within 20 s of its stdin closing: killed");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GPU trial: a load to the server's own GPU copies from its device memory (CUDA IPC), bit
/// exact against the files, into gantry's allocations and into the caller's own.
#[test]
fn a_load_to_the_servers_gpu_copies_from_its_device_memory() {
    let Some(gpu) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model");
    std::fs::create_dir(&path).unwrap();
    let local = small_llama(&path, 11);
    let server = DeviceServer::start(&path, dir.path());
    let loader = Loader::new(Config::default()).unwrap();
    let checkpoint = gantry::open(&server.url).unwrap();
    let model = loader.load_to_device_with(checkpoint.clone(), &gpu, |_| true, |_| {}).unwrap();
    assert_eq!(model.report().version.as_deref(), Some(server.version.as_str()));
    for f in &model.report().files {
        assert_eq!(
            f.reader,
            Some(gantry::ReaderKind::Device),
            "{}: {}",
            f.path.display(),
            f.reason
        );
    }
    let by_name: std::collections::HashMap<_, _> =
        local.tensors.iter().map(|t| (t.name.clone(), t)).collect();
    for t in model.tensors() {
        let expected = reference(&local, by_name[&t.entry.name]);
        assert_eq!(model.copy_to_host(&t).unwrap(), expected, "{}", t.entry.name);
    }
    // Into the caller's own memory (every other tensor), through the same copies.
    let buffers: Vec<_> = checkpoint
        .tensors
        .iter()
        .map(|t| gpu.alloc(t.len.max(1) as usize, &t.name).unwrap())
        .collect();
    let mut landed = Vec::new();
    let report = loader
        .load_into_device(
            &checkpoint,
            &gpu,
            |t| {
                let i = checkpoint.tensors.iter().position(|x| x.name == t.name).unwrap();
                (i % 2 == 0).then(|| buffers[i].ptr())
            },
            |ready| landed.push(ready.index),
        )
        .unwrap();
    assert_eq!(landed.len(), checkpoint.tensors.len().div_ceil(2));
    assert!(report.files.iter().any(|f| f.reader == Some(gantry::ReaderKind::Device)));
    for &i in &landed {
        let t = &checkpoint.tensors[i];
        let got = gpu.copy_to_host(buffers[i].ptr(), t.len as usize).unwrap();
        assert_eq!(got, reference(&local, by_name[&t.name]), "{}", t.name);
    }
    // Shared: the tensors alias the server's memory, nothing is copied, and the model's lease
    // keeps that version whatever happens to the registry's.
    let sharing = Loader::new(Config::default().share_live(true)).unwrap();
    let shared = sharing.load_to_device(&server.url, &gpu).unwrap();
    assert!(shared.is_shared());
    assert_eq!(shared.device_bytes(), 0);
    assert_eq!(shared.report().read_bytes, 0);
    gantry::live::release(&server.url);
    for t in shared.tensors() {
        let expected = reference(&local, by_name[&t.entry.name]);
        assert_eq!(shared.copy_to_host(&t).unwrap(), expected, "{}", t.entry.name);
    }
    assert!(sharing.reload_device(&mut { shared }).is_err(), "a shared model is not reloaded");
}

/// The child half of `a_server_out_of_descriptors_waits_instead_of_spinning`: a server whose
/// process can open no descriptor more, a connection queued on it, and the CPU time the
/// process spent in the next second, printed as `CPU <seconds>`.
#[test]
fn accept_failing_child() {
    let Ok(socket) = std::env::var("GANTRY_ACCEPT_CHILD") else { return };
    let server = Server::start(&socket, &ServerOptions::default()).unwrap();
    server.publish_tensors(vec![("x", Dtype::U8, &[1u64][..], &[7u8][..])]).unwrap();
    let client = protocol::socket().unwrap();
    // The lowest free descriptor becomes the limit: accept4 then fails with EMFILE.
    // SAFETY: plain system calls on descriptors this process owns.
    unsafe {
        let free = libc::dup(0);
        assert!(free > 0);
        libc::close(free);
        let limit = libc::rlimit { rlim_cur: free as libc::rlim_t, rlim_max: libc::RLIM_INFINITY };
        let mut old = std::mem::zeroed::<libc::rlimit>();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut old);
        let limit = libc::rlimit { rlim_max: old.rlim_max, ..limit };
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    protocol::connect(client.as_fd(), Path::new(&socket)).unwrap();
    let cpu = || {
        // SAFETY: rusage is plain old data, filled by the call.
        let mut u = unsafe { std::mem::zeroed::<libc::rusage>() };
        // SAFETY: a valid out pointer.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
        let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        s(u.ru_utime) + s(u.ru_stime)
    };
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu();
    std::thread::sleep(Duration::from_secs(1));
    println!("CPU {:.3}", cpu() - before);
    drop(client);
    server.close();
}

/// A server that cannot accept (no descriptor left) waits for one to free up, instead of
/// spinning a core on a connection that stays queued.
#[test]
fn a_server_out_of_descriptors_waits_instead_of_spinning() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "accept_failing_child", "--nocapture", "--test-threads=1"])
        .env("GANTRY_ACCEPT_CHILD", dir.path().join("s"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let cpu: f64 = text
        .split_once("CPU ")
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no CPU line: {text}"));
    assert!(cpu < 0.3, "the server used {cpu} s of CPU in 1 s while it could not accept");
}
