//! The C ABI says per file whether SHA-256 was checked (tests/capi/sha256.c): a file listed in
//! `SHA256SUMS` is `GANTRY_SHA256_VERIFIED`, one not listed `GANTRY_SHA256_UNVERIFIED`, both
//! with the digest `sha256sum` gives; `require_sha256=1` fails on the unlisted one, naming it.

use std::path::Path;
use std::process::Command;

#[path = "../../gantry/tests/common/tools.rs"]
mod tools;

mod ffi;
use ffi::{compile, lib_dir, manifest};

fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().expect("sha256sum (coreutils)");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
}

#[test]
fn c_client_reads_each_files_sha256_check() {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let Some(cc) = tools::require_compiler("cc") else { return };
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<_> = ["a.safetensors", "b.safetensors"].map(|n| dir.path().join(n)).into();
    for (i, path) in paths.iter().enumerate() {
        let data: Vec<u8> = (0..4096u32).map(|j| (j * 7 + i as u32) as u8).collect();
        let views = vec![(format!("w{i}"), TensorView::new(Dtype::U8, vec![4096], &data).unwrap())];
        safetensors::serialize_to_file(views, None, path).unwrap();
    }
    let out = Command::new("sha256sum").arg("a.safetensors").current_dir(dir.path()).output();
    std::fs::write(dir.path().join("SHA256SUMS"), out.unwrap().stdout).unwrap();
    let exe = dir.path().join("sha256");
    compile(&cc, "-std=c11", &manifest().join("../../tests/capi/sha256.c"), &exe);
    let out = Command::new(&exe)
        .arg(dir.path())
        .args([&paths[0].display().to_string(), &sha256sum(&paths[0])])
        .args([&paths[1].display().to_string(), &sha256sum(&paths[1])])
        .env("LD_LIBRARY_PATH", lib_dir())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sha256.c:\n{text}");
    assert!(text.contains("sha256: ok"), "sha256.c:\n{text}");
}
