//! A live source from C (tests/capi/serve.c): `gantry_serve_start`/`publish`/`version`/`close`
//! and loads from `unix:///path` through the ordinary load calls, checked against bytes the
//! C client computes from the formulas this test wrote the checkpoints with.

use std::path::Path;
use std::process::Command;

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
