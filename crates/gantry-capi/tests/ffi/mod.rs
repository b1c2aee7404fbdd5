//! What the C ABI's test binaries share: libgantry built for them, and C and C++ clients
//! compiled against it with `-Wall -Wextra -Werror`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The C ABI crate's folder (its header, its C sources).
pub fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The directory holding libgantry.so and libgantry.a: `GANTRY_LIB_DIR` when set (a library
/// built beforehand, for test binaries run where there is no cargo), else built for these
/// tests: `cargo test` builds no `cdylib` for integration tests, so the tests build it, once,
/// in a target directory of their own (the outer cargo holds the lock on the main one).
pub fn lib_dir() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            if let Some(dir) = std::env::var_os("GANTRY_LIB_DIR") {
                return PathBuf::from(dir);
            }
            let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ffi-target");
            let status = Command::new(env!("CARGO"))
                .args(["build", "-p", "gantry-capi", "--target-dir"])
                .arg(&target)
                .current_dir(manifest())
                .status()
                .expect("cargo");
            assert!(status.success(), "building libgantry failed");
            target.join("debug")
        })
        .clone()
}

/// Compiles `source` with `-Wall -Wextra -Werror` against the header and libgantry.
pub fn compile(compiler: &Path, std: &str, source: &Path, out: &Path) {
    compile_with(compiler, std, source, out, &[]);
}

/// [`compile`], with `libs` (`-lpthread`...) linked after libgantry.
pub fn compile_with(compiler: &Path, std: &str, source: &Path, out: &Path, libs: &[&str]) {
    let include = manifest().join("include");
    let status = Command::new(compiler)
        .args([std, "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(out)
        .arg(source)
        .arg(format!("-I{}", include.display()))
        .arg(format!("-L{}", lib_dir().display()))
        .arg("-lgantry")
        .args(libs)
        .status()
        .unwrap_or_else(|e| panic!("{}: {e}", compiler.display()));
    assert!(status.success(), "{} {std} failed on {}", compiler.display(), source.display());
}
