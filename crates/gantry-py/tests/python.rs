//! Runs the Python tests (`tests/test_gantry.py`) against the extension built from this
//! source: the test builds it (in a target directory of its own, since the outer cargo holds
//! the main one), lays the package out as an install would, and runs `python3 -m unittest`.
//! With pytest, numpy and safetensors installed (`.ci/run` installs them) every host test
//! runs; without them those that need them say so. torch and a GPU are used when present, and
//! required under `GANTRY_REQUIRE_GPU=1`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the extension and returns a directory holding the `gantry` package.
fn package() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let target = tmp.join("ffi-target");
    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "gantry-py", "--target-dir"])
        .arg(&target)
        .current_dir(manifest())
        .status()
        .expect("cargo");
    assert!(status.success(), "building the extension failed");
    let site = tmp.join("py-site");
    let pkg = site.join("gantry");
    let _ = std::fs::remove_dir_all(&site);
    std::fs::create_dir_all(&pkg).unwrap();
    for entry in std::fs::read_dir(manifest().join("python/gantry")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, pkg.join(path.file_name().unwrap())).unwrap();
    }
    copy(&target.join("debug/lib_gantry.so"), &pkg.join("_gantry.abi3.so"));
    site
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
}

#[test]
fn python_package() {
    let site = package();
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    // pytest where it is installed (CI), else the standard library's runner.
    let has_pytest =
        Command::new(&python).args(["-c", "import pytest"]).status().is_ok_and(|s| s.success());
    let args: &[&str] = if has_pytest {
        &["-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", "test_gantry.py"]
    } else {
        &["-m", "unittest", "-v", "test_gantry"]
    };
    let status = Command::new(&python)
        .args(args)
        .current_dir(manifest().join("tests"))
        .env("PYTHONPATH", &site)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .status()
        .unwrap_or_else(|e| panic!("{python}: {e}"));
    assert!(status.success(), "the Python tests failed (output above)");
}
