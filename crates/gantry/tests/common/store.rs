//! A SeaweedFS S3 server for tests (`weed`, found or fetched by `tools.rs`, which the including
//! test declares as a sibling module `tools`): started on loopback with free ports, a temporary data folder and one identity;
//! stopped (SIGTERM, then SIGKILL) when dropped. Shared by the engine's object-storage tests
//! and the C ABI's.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

pub const ACCESS_KEY: &str = "gantrytest";
pub const SECRET_KEY: &str = "gantry-test-secret-7f3a";
pub const BUCKET: &str = "weights";

/// A port nobody listens on now (and whose gRPC twin, +10000, is free too).
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if port < 55000 && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

pub struct Server {
    child: Child,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts a server; a start that dies at once (a port taken between the probe and the
    /// bind) is retried with new ports.
    pub fn start(weed: &Path) -> Server {
        for _ in 0..3 {
            if let Some(server) = Self::try_start(weed) {
                return server;
            }
        }
        panic!("SeaweedFS did not start in three attempts");
    }

    fn try_start(weed: &Path) -> Option<Server> {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("s3.json");
        std::fs::write(
            &config,
            format!(
                r#"{{"identities":[{{"name":"gantry","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
            ),
        )
        .unwrap();
        let [master, volume, filer, s3, iceberg, lance, metrics] = [(); 7].map(|()| free_port());
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let arg = |k: &str, v: u16| format!("-{k}={v}");
        let child = Command::new(weed)
            .args(["server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3"])
            .arg(format!("-dir={}", data.display()))
            .arg(format!("-s3.config={}", config.display()))
            .args([arg("master.port", master), arg("master.port.grpc", master + 10000)])
            .args([arg("volume.port", volume), arg("volume.port.grpc", volume + 10000)])
            .args([arg("filer.port", filer), arg("filer.port.grpc", filer + 10000)])
            .args([arg("s3.port", s3), arg("s3.port.grpc", s3 + 10000)])
            .args([arg("s3.port.iceberg", iceberg), arg("s3.port.lance", lance)])
            .args([arg("metricsPort", metrics), "-master.volumeSizeLimitMB=64".to_owned()])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("weed.log")).unwrap())
            .spawn()
            .expect("weed");
        let mut server = Server { child, endpoint: format!("http://127.0.0.1:{s3}"), _dir: dir };
        server.wait_ready().then_some(server)
    }

    /// Waits until the S3 gateway answers a signed request (a put), up to a minute; false if
    /// the server exited.
    fn wait_ready(&mut self) -> bool {
        let start = Instant::now();
        let ready = ObjectPath::from("ready");
        loop {
            let store = self.store(BUCKET);
            if runtime().block_on(store.put(&ready, PutPayload::from_static(b"ok"))).is_ok() {
                return true;
            }
            let log =
                std::fs::read_to_string(self._dir.path().join("weed.log")).unwrap_or_default();
            if self.child.try_wait().ok().flatten().is_some() {
                println!("SeaweedFS exited at start:\n{log}");
                return false;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "SeaweedFS did not come up:\n{log}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn store(&self, bucket: &str) -> impl ObjectStore {
        AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .build()
            .unwrap()
    }

    pub fn upload(&self, local: &Path, key: &str) {
        let bytes = std::fs::read(local).unwrap();
        runtime()
            .block_on(self.store(BUCKET).put(&ObjectPath::from(key), PutPayload::from(bytes)))
            .unwrap();
    }

    /// SIGTERM, then SIGKILL after a grace period (weed can take long to exit).
    pub fn stop(&mut self) {
        // SAFETY: a plain signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap())
}

/// The `weed` executable: `GANTRY_WEED`, else on `PATH`, else fetched into the tools folder;
/// `None` (with a line saying so) only under `GANTRY_SKIP_OBJECT_TESTS=1`. Panics with the
/// command that provides it when it cannot be had.
pub fn weed() -> Option<PathBuf> {
    use super::tools;
    if tools::skipped(tools::WEED.skip) {
        return None;
    }
    if let Some(p) = std::env::var_os("GANTRY_WEED") {
        return Some(PathBuf::from(p));
    }
    tools::require(&tools::WEED).map(|found| found.program)
}
