//! A live source from C (tests/capi/serve.c): `gantry_serve_start`/`publish`/`version`/`close`
//! and loads from `unix:///path` through the ordinary load calls, checked against bytes the
//! C client computes from the formulas this test wrote the checkpoints with; and a server that
//! keeps its versions on a GPU (`options.device`, tests/capi/serve_device.c): a clean status
//! without one, and with one (a GPU trial, required under `GANTRY_REQUIRE_GPU=1`) a reader in
//! another process loading from the server's device copy.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[path = "../../gantry/tests/common/tools.rs"]
mod tools;

mod ffi;
use ffi::{compile, lib_dir, manifest};

/// A checkpoint of "w" (BF16 [32, 64], byte i = `w(i)`) and "b" (F32 [5], byte i = i + `b0`),
/// written with the safetensors crate.
fn write(path: &Path, w: impl Fn(u32) -> u8, b0: u8) {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let a: Vec<u8> = (0..4096u32).map(w).collect();
    let b: Vec<u8> = (0..20u8).map(|i| i + b0).collect();
    let views = vec![
        ("w", TensorView::new(Dtype::BF16, vec![32, 64], &a).unwrap()),
        ("b", TensorView::new(Dtype::F32, vec![5], &b).unwrap()),
    ];
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn c_client_serves_publishes_and_loads_a_live_source() {
    let Some(cc) = tools::require_compiler("cc") else { return };
    let dir = tempfile::tempdir().unwrap();
    let (first, second) =
        (dir.path().join("first.safetensors"), dir.path().join("second.safetensors"));
    write(&first, |i| (i * 7 + 3) as u8, 0);
    write(&second, |i| (i * 5 + 1) as u8, 100);
    let exe = dir.path().join("serve");
    compile(&cc, "-std=c11", &manifest().join("../../tests/capi/serve.c"), &exe);
    let socket = dir.path().join("weights.sock");
    let out = Command::new(&exe)
        .args([&first, &second, &socket])
        .env("LD_LIBRARY_PATH", lib_dir())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "serve.c:\n{text}");
    assert!(text.contains("serve: ok"), "serve.c:\n{text}");
    assert!(!socket.exists(), "gantry_serve_close left the socket file");
}

/// Says why a test did not run; a failure under `GANTRY_REQUIRE_GPU=1`.
fn skip(why: &str) {
    assert!(
        std::env::var("GANTRY_REQUIRE_GPU").as_deref() != Ok("1"),
        "GANTRY_REQUIRE_GPU=1 but: {why}"
    );
    println!("skipped: {why}");
}

/// tests/capi/serve_device.c, compiled once per test binary; `None` when C tests are skipped.
fn device_client() -> Option<&'static Path> {
    static EXE: OnceLock<Option<(tempfile::TempDir, PathBuf)>> = OnceLock::new();
    EXE.get_or_init(|| {
        let cc = tools::require_compiler("cc")?;
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("serve_device");
        let source = manifest().join("../../tests/capi/serve_device.c");
        ffi::compile_with(&cc, "-std=c11", &source, &exe, &["-ldl"]);
        Some((dir, exe))
    })
    .as_ref()
    .map(|(_, exe)| exe.as_path())
}

/// The output of a finished client run, stdout then stderr.
fn text_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// `device = "cuda:0"`: without a GPU, a clean status and message and nothing bound (no
/// crash); with one, a server that serves (its host load checked byte by byte).
#[test]
fn c_client_serving_on_cuda0_is_a_clean_status_without_a_gpu() {
    let Some(exe) = device_client() else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("first.safetensors");
    write(&file, |i| (i * 7 + 3) as u8, 0);
    let socket = dir.path().join("weights.sock");
    let out = Command::new(exe)
        .arg("start")
        .args([&file, &socket])
        .env("LD_LIBRARY_PATH", lib_dir())
        .output()
        .unwrap();
    let text = text_of(&out);
    println!("{text}");
    assert!(out.status.success() && text.contains("serve_device start: ok"), "{text}");
    assert!(!socket.exists(), "the socket file was left");
}

/// GPU trial: a C server keeps its version on cuda:0 (`device = "cuda:0"`), and a C reader in
/// another process (CUDA IPC does not map a handle in the process that exported it) loads onto
/// GPU 0 from that copy, every byte checked against the formulas the file was written with.
#[test]
fn c_client_loads_from_a_c_server_on_a_gpu() {
    use std::io::{BufRead, BufReader};
    let Some(exe) = device_client() else { return };
    if let Err(e) = engine::CudaDevice::open(0) {
        return skip(&format!("no GPU: {e}"));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("first.safetensors");
    write(&file, |i| (i * 7 + 3) as u8, 0);
    let socket = dir.path().join("weights.sock");
    let mut server = Command::new(exe)
        .arg("serve")
        .args([&file, &socket])
        .env("LD_LIBRARY_PATH", lib_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = server.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let ready = rx.recv_timeout(Duration::from_secs(60));
    if ready.as_deref() != Ok("READY") {
        let _ = server.kill();
        let _ = server.wait();
        panic!("the C server did not say READY within 60 s: {ready:?}");
    }
    let url = format!("unix://{}", socket.display());
    let out = Command::new(exe).args(["load", &url]).env("LD_LIBRARY_PATH", lib_dir()).output();
    drop(server.stdin.take()); // the server ends when its standard input closes
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = server.kill();
            let _ = server.wait();
            panic!("the C server did not end within 30 s of its standard input closing");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = out.unwrap();
    let text = text_of(&out);
    println!("{text}");
    assert!(out.status.success() && text.contains("serve_device load: ok"), "{text}");
    assert!(status.success(), "the C server failed: {status}");
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).as_deref(), Ok("serve_device serve: ok"));
    assert!(!socket.exists(), "gantry_serve_close left the socket file");
}
