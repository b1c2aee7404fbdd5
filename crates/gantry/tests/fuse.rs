//! Loads through a real FUSE mount: rclone (`rclone mount`) serving a local directory. The
//! bytes must equal the files read directly, and the per-file facts must name the file system
//! and what serves it. Needs root, `/dev/fuse`, `rclone` and `fusermount` (`apt-get install
//! -y rclone fuse3`); fails naming them when missing, unless `GANTRY_SKIP_FUSE_TESTS=1`.

mod common;
#[path = "common/tools.rs"]
mod tools;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gantry::{Config, Loader, PathChoice, ReaderKind};

const SKIP: &str = "GANTRY_SKIP_FUSE_TESTS";
const PROVIDE: &str = "apt-get install -y rclone fuse3";

/// Whether the FUSE test can run here: `false` (with a line) only when `SKIP` is set; panics
/// naming what is missing otherwise.
fn fuse_or_skip() -> bool {
    if tools::skipped(SKIP) {
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    assert!(unsafe { libc::geteuid() } == 0, "mounting FUSE needs root (or {SKIP}=1 to skip)");
    assert!(Path::new("/dev/fuse").exists(), "no /dev/fuse here (or {SKIP}=1 to skip)");
    for exe in ["rclone", "fusermount"] {
        let found = Command::new(exe).arg("--version").output().is_ok();
        assert!(found, "`{exe}` is not on PATH: `{PROVIDE}` (or {SKIP}=1 to skip)");
    }
    true
}

/// `rclone mount SOURCE POINT --read-only`, unmounted and stopped on drop.
struct RcloneMount {
    point: PathBuf,
    child: Child,
}

impl RcloneMount {
    fn new(source: &Path, point: &Path) -> Self {
        std::fs::create_dir_all(point).unwrap();
        let child = Command::new("rclone")
            .arg("mount")
            .args([source, point])
            .args(["--read-only", "--config", "/dev/null"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("rclone mount could not be started ({e}): `{PROVIDE}`"));
        let mut mount = RcloneMount { point: point.to_owned(), child };
        let started = Instant::now();
        let line = format!(" {} ", point.display());
        loop {
            let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            if table.lines().any(|l| l.contains(&line) && l.contains(" fuse.rclone ")) {
                return mount;
            }
            if let Ok(Some(status)) = mount.child.try_wait() {
                let mut err = String::new();
                use std::io::Read;
                mount.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                panic!("rclone mount exited ({status}): {err}");
            }
            assert!(started.elapsed() < Duration::from_secs(30), "rclone mount: not mounted");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RcloneMount {
    fn drop(&mut self) {
        // Lazily: a file the test process still holds open (a registered io_uring file)
        // would keep a plain unmount busy.
        let _ = Command::new("fusermount").arg("-uz").arg(&self.point).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_checkpoint_through_an_rclone_mount_is_bit_exact_and_named() {
    if !fuse_or_skip() {
        return;
    }
    let dir = common::scratch();
    let source = dir.path().join("weights");
    std::fs::create_dir_all(&source).unwrap();
    let local = common::small_llama(&source, 25);
    let mount = RcloneMount::new(&source, &dir.path().join("mnt"));
    for path in [PathChoice::Auto, PathChoice::Buffered, PathChoice::Direct] {
        let loader = Loader::new(Config::default().path(path)).unwrap();
        let model = loader.load(&mount.point).unwrap();
        common::assert_matches_local(&model, &local);
        let report = model.report();
        assert_eq!(report.files.len(), 2, "{path:?}");
        for f in &report.files {
            let facts = format!("FUSE (fuse.rclone from {})", source.display());
            assert!(f.facts.contains(&facts), "{path:?}: {}", f.facts);
            let file = source.join(f.path.file_name().unwrap());
            let advice = format!("re-serves the local file {}", file.display());
            assert!(f.reason.contains(&advice), "{path:?}: {}", f.reason);
            if path == PathChoice::Auto && f.reader == Some(ReaderKind::Direct) {
                // A FUSE mount gets large requests whatever its 4 KiB reads take.
                let large = f.reason.contains("on FUSE") && f.reason.contains("65536 KiB reads");
                assert!(large, "{}", f.reason);
            }
        }
    }
}
