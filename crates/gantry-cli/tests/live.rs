//! `gantry serve` and `unix://` sources through the binary: loads and inspects against the
//! checkpoint files read with the `safetensors` crate, the socket's rules, signals, and a
//! server killed mid-load. Every run has a deadline, so a hang fails the test.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The CLI under test: GANTRY_TEST_BIN where the test binary runs away from its build (a
/// GPU machine), else the one cargo built.
fn gantry_bin() -> std::ffi::OsString {
    std::env::var_os("GANTRY_TEST_BIN").unwrap_or(env!("CARGO_BIN_EXE_gantry").into())
}

#[path = "common/deadline.rs"]
mod deadline;
use deadline::run_with_deadline as run;

fn gantry(args: &[&str]) -> Output {
    let mut cmd = Command::new(gantry_bin());
    cmd.args(args);
    run(cmd)
}

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn error_line(out: &Output) -> String {
    assert!(!out.status.success(), "must fail: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8(out.stderr.clone()).unwrap();
    assert!(err.starts_with("error: ") && err.lines().count() == 1, "{err:?}");
    err
}

/// A small sharded checkpoint in `dir`.
fn checkpoint(dir: &Path) -> String {
    let out = gantry(&["synth", dir.to_str().unwrap(), "--size-gib", "0.002"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dir.to_str().unwrap().to_owned()
}

/// Per tensor, the XXH3-64 of its bytes in the files, read by the `safetensors` crate.
fn reference_xxh3(dir: &Path) -> Vec<(String, String)> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in parsed.tensors() {
            all.push((name, format!("{:016x}", xxhash_rust::xxh3::xxh3_64(view.data()))));
        }
    }
    all.sort();
    all
}

/// A `gantry serve` child and the version its ready line announces.
struct Serving {
    child: Child,
    version: String,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(source: &str, socket: &Path, extra: &[&str]) -> Serving {
    serve_on("cpu", source, socket, extra)
}

/// [`serve`] with `--device device`.
fn serve_on(device: &str, source: &str, socket: &Path, extra: &[&str]) -> Serving {
    let mut child = Command::new(gantry_bin())
        .args(["serve", source, "--device", device, "--socket", socket.to_str().unwrap()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(60)).expect("serve printed no ready line");
    let url = format!("unix://{}", socket.display());
    // On a GPU the line ends " (and on cuda:N)".
    assert!(line.starts_with("serving ") && line.contains(&format!(" on {url}")), "{line:?}");
    let version = line.split(", version ").nth(1).unwrap().split(' ').next().unwrap().to_owned();
    Serving { child, version }
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: kill on the id of a child we started and have not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "serve did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_then_load_and_inspect_bit_exact_with_the_version_and_a_clean_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let source = checkpoint(&dir.path().join("m"));
    let socket = dir.path().join("s");
    let url = format!("unix://{}", socket.display());
    let mut server = serve(&source, &socket, &[]);
    let loaded = gantry(&["load", &url, "--json", "--checksum", "xxh3"]);
    let json: Value = serde_json::from_str(&stdout(&loaded)).unwrap();
    assert_eq!(json["version"], server.version.as_str());
    let got = checksums(&loaded);
    assert_eq!(got, reference_xxh3(&dir.path().join("m")));
    let out = stdout(&gantry(&["inspect", &url, "--json"]));
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["version"], server.version.as_str());
    assert_eq!(json["tensors"].as_array().unwrap().len(), got.len());
    let out = stdout(&gantry(&["load", &url, "--verify", "--explain"]));
    assert!(out.contains("verified against its digests"), "{out}");
    assert!(out.contains("live (shared memory)"), "{out}");
    assert!(out.contains(&format!("version {}", server.version)), "{out}");
    // A second server on the same socket is refused.
    let err = error_line(&gantry(&["serve", &source, "--socket", socket.to_str().unwrap()]));
    assert!(err.contains("another live server answers"), "{err}");
    signal(&server.child, libc::SIGTERM);
    assert!(wait_exit(&mut server.child).success());
    assert!(std::fs::symlink_metadata(&socket).is_err(), "socket file left after SIGTERM");
    let err = error_line(&gantry(&["load", &url]));
    assert!(err.contains("no server"), "{err}");
}

#[test]
fn a_server_killed_mid_load_ends_the_load_correct_or_cleanly_and_its_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let source = checkpoint(&dir.path().join("m"));
    let socket = dir.path().join("s");
    let url = format!("unix://{}", socket.display());
    let expected = reference_xxh3(&dir.path().join("m"));
    for delay_ms in [0u64, 5, 20, 50] {
        let mut server = serve(&source, &socket, &[]);
        let load = Command::new(gantry_bin())
            .args(["load", &url, "--json", "--checksum", "xxh3"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        signal(&server.child, libc::SIGKILL);
        let _ = wait_exit(&mut server.child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut load = load;
        while load.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the load hangs after the server was killed");
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = load.wait_with_output().unwrap();
        if out.status.success() {
            assert_eq!(checksums(&out), expected, "a load that succeeded delivered other bytes");
        } else {
            let err = error_line(&out);
            assert!(err.contains("unix://"), "{err}");
        }
        // The killed server left its socket file: stale, and the next serve replaces it.
        assert!(std::fs::symlink_metadata(&socket).is_ok());
    }
}

#[test]
fn a_symlink_at_the_socket_path_is_refused_and_a_bad_mode_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let source = checkpoint(&dir.path().join("m"));
    let target = dir.path().join("target");
    std::fs::write(&target, b"keep").unwrap();
    let socket = dir.path().join("s");
    std::os::unix::fs::symlink(&target, &socket).unwrap();
    let err = error_line(&gantry(&["serve", &source, "--socket", socket.to_str().unwrap()]));
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    let out = gantry(&["serve", &source, "--socket", "/tmp/x", "--socket-mode", "999"]);
    assert_eq!(out.status.code(), Some(2));
}

/// `--max-connections-per-user N`: while this user holds N connections, a load is refused with
/// an error naming the uid and the cap; once one closes, loads work again. Out of range is a
/// usage error.
#[test]
fn serve_caps_connections_per_user() {
    let dir = tempfile::tempdir().unwrap();
    let source = checkpoint(&dir.path().join("m"));
    let socket = dir.path().join("s");
    let url = format!("unix://{}", socket.display());
    for bad in ["0", "1025", "x"] {
        let out =
            gantry(&["serve", &source, "--socket", "/tmp/x", "--max-connections-per-user", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
    }
    let _server = serve(&source, &socket, &["--max-connections-per-user", "1"]);
    let held = gantry::live::Lease::acquire(&url).unwrap();
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let err = error_line(&gantry(&["load", &url]));
    assert!(
        err.contains(&format!("the server refused: too many connections from uid {me}"))
            && err.contains("at most 1 per user"),
        "{err}"
    );
    drop(held);
    // The server sees the close on its own thread: wait until a load gets through (at most
    // 30 s), then check what it loaded.
    let deadline = Instant::now() + Duration::from_secs(30);
    let out = loop {
        let out = gantry(&["load", &url, "--json", "--checksum", "xxh3"]);
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(checksums(&out), reference_xxh3(&dir.path().join("m")));
}

#[test]
fn the_default_socket_mode_keeps_other_users_out() {
    if std::env::var_os("GANTRY_SKIP_ROOT_TESTS").is_some() {
        eprintln!("skipped: GANTRY_SKIP_ROOT_TESTS is set (this test runs as another user)");
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: not root (setpriv needs root to run as another user)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .unwrap();
    let source = checkpoint(&dir.path().join("m"));
    let as_nobody = |url: &str| {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(gantry_bin());
        cmd.args(["inspect", url]);
        run(cmd)
    };
    let private = dir.path().join("private");
    let _server = serve(&source, &private, &[]);
    let err = error_line(&as_nobody(&format!("unix://{}", private.display())));
    assert!(err.contains("permission denied"), "{err}");
    // The same user is let in where the mode allows it (root's server is trusted).
    let open = dir.path().join("open");
    let _open = serve(&source, &open, &["--socket-mode", "0666"]);
    let out = as_nobody(&format!("unix://{}", open.display()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// GPU 0, or `None` after saying why not (a failure under `GANTRY_REQUIRE_GPU=1`).
fn gpu() -> Option<std::sync::Arc<gantry::CudaDevice>> {
    match gantry::CudaDevice::open(0) {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            assert!(
                std::env::var("GANTRY_REQUIRE_GPU").as_deref() != Ok("1"),
                "GANTRY_REQUIRE_GPU=1 but: {e}"
            );
            eprintln!("skipped: no GPU: {e}");
            None
        }
    }
}

/// The (name, XXH3-64) lines of a `load --json --checksum xxh3`, sorted.
fn checksums(out: &Output) -> Vec<(String, String)> {
    let json: Value = serde_json::from_str(&stdout(out)).unwrap();
    let mut got: Vec<(String, String)> = json["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap().to_owned(), t["xxh3"].as_str().unwrap().to_owned()))
        .collect();
    got.sort();
    got
}

/// GPU trial: `load --verify` of a load that copies from the server's device memory hashes the
/// bytes that landed on the GPU (read back), not the server's host memory. A byte of the
/// server's device copy changed through CUDA IPC (same user, so this process is handed the
/// handles) fails such a load, naming the tensor and the socket, and an aliasing load too;
/// a host load, which reads the memfds, still verifies.
#[test]
fn verify_hashes_what_a_device_copy_load_landed() {
    let Some(gpu) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let source = checkpoint(&dir.path().join("m"));
    let socket = dir.path().join("s");
    let url = format!("unix://{}", socket.display());
    let _server = serve_on("cuda:0", &source, &socket, &[]);
    let out = stdout(&gantry(&["load", &url, "--device", "cuda:0", "--verify", "--explain"]));
    assert!(out.contains("verified against its digests"), "{out}");
    assert!(out.contains("device-to-device copies"), "not copied from the device: {out}");
    let out = gantry(&["load", &url, "--device", "cuda:0", "--json", "--checksum", "xxh3"]);
    assert_eq!(checksums(&out), reference_xxh3(&dir.path().join("m")));
    // The first tensor of the first file, one byte changed in the server's device copy.
    let lease = gantry::live::Lease::acquire(&url).unwrap();
    let checkpoint = lease.checkpoint();
    let data_offset = checkpoint.files[0].header.data_offset;
    let changed = checkpoint
        .tensors
        .iter()
        .find(|t| t.file.0 == 0 && t.offset == data_offset && t.len > 0)
        .expect("a tensor at the start of the first file's data")
        .name
        .clone();
    let share = lease.device().expect("the server keeps its version on the GPU");
    let handle = share.handles[0].expect("the first file's handle");
    let len = checkpoint.files[0].header.data_len as usize;
    let mapped = gpu.import(&handle, len, "the server's first file").unwrap();
    let byte = gpu.copy_to_host(mapped.ptr(), 1).unwrap()[0];
    gpu.copy_from_host(mapped.ptr(), &[byte ^ 0xff]).unwrap();
    drop(mapped);
    drop(lease);
    for extra in [&[][..], &["--share-live"][..]] {
        let mut args = vec!["load", &url, "--device", "cuda:0", "--verify"];
        args.extend_from_slice(extra);
        let err = error_line(&gantry(&args));
        assert!(
            err.contains(&format!("tensor '{changed}'")) && err.contains(&url),
            "{extra:?}: {err}"
        );
    }
    let out = stdout(&gantry(&["load", &url, "--device", "cpu", "--verify"]));
    assert!(out.contains("verified against its digests"), "{out}");
}
