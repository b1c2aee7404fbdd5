//! Loads that span several volumes, and page-cache probes as a user who does not own the
//! weights. Both need root to set up (loop devices and mounts; files owned by another user)
//! and fail without it, naming what to do, unless `GANTRY_SKIP_ROOT_TESTS=1`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use gantry::{Checkpoint, Config, Dtype, Loader, PathChoice, ReaderKind};

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("{cmd} could not be started ({e}): install it (apt-get install util-linux e2fsprogs mount)")
    });
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// ext4 volumes on loop devices over image files in `root` (on the disk), read by the loop
/// driver with direct I/O: each read reaches the disk and stays in flight long enough for
/// `/sys/block/loopN/inflight` to show it (loops over memory answer too fast to be seen
/// reliably on two cores). Mounted at `root/v0`, `root/v1`...; unmounted and detached on drop.
struct Volumes {
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
    images: Vec<PathBuf>,
}

impl Volumes {
    fn new(root: &Path, count: usize, mib: usize) -> Self {
        let mut v = Volumes { mounts: Vec::new(), loops: Vec::new(), images: Vec::new() };
        for i in 0..count {
            let image = root.join(format!("volume-{i}.img"));
            std::fs::File::create(&image).unwrap().set_len((mib as u64) << 20).unwrap();
            v.images.push(image.clone());
            run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
            let dev =
                run("losetup", &["--find", "--show", "--direct-io=on", image.to_str().unwrap()]);
            v.loops.push(dev.clone());
            let mount = root.join(format!("v{i}"));
            std::fs::create_dir_all(&mount).unwrap();
            run("mount", &[&dev, mount.to_str().unwrap()]);
            v.mounts.push(mount);
        }
        v
    }

    /// `/sys/block/loopN/inflight` of each volume.
    fn inflight_paths(&self) -> Vec<PathBuf> {
        self.loops
            .iter()
            .map(|d| {
                Path::new("/sys/block").join(Path::new(d).file_name().unwrap()).join("inflight")
            })
            .collect()
    }
}

impl Drop for Volumes {
    fn drop(&mut self) {
        for m in &self.mounts {
            let _ = Command::new("umount").arg(m).status();
        }
        for l in &self.loops {
            let _ = Command::new("losetup").args(["-d", l]).status();
        }
        for i in &self.images {
            let _ = std::fs::remove_file(i);
        }
    }
}

/// Writes one shard of `tensors` tensors of `elems` bf16 each into each mount, and an index
/// naming them, in `root`; returns the index's path.
fn write_sharded(root: &Path, mounts: &[PathBuf], tensors: usize, elems: usize) -> PathBuf {
    let mut weight_map = serde_json::Map::new();
    for (s, mount) in mounts.iter().enumerate() {
        let file = mount.join("shard.safetensors");
        let prefix = format!("s{s}.");
        common::write_file_named(
            &file,
            &vec![(Dtype::BF16, vec![elems]); tensors],
            7 + s as u64,
            &prefix,
        );
        let rel = format!("{}/shard.safetensors", mount.file_name().unwrap().to_str().unwrap());
        for i in 0..tensors {
            weight_map.insert(format!("{prefix}t{i:05}"), rel.clone().into());
        }
        let f = std::fs::File::open(&file).unwrap();
        f.sync_all().unwrap();
        gantry::io::probe::evict(&f).unwrap();
    }
    let index = root.join("model.safetensors.index.json");
    let json = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(&index, serde_json::to_vec(&json).unwrap()).unwrap();
    index
}

#[test]
fn every_volume_is_read_at_once() {
    if !common::root_or_skip("loading from several loop volumes") {
        return;
    }
    let dir = common::scratch();
    let volumes = Volumes::new(dir.path(), 4, 96);
    let index = write_sharded(dir.path(), &volumes.mounts, 32, 1 << 20); // 64 MiB a shard
                                                                         // Small reads and a shallow queue: a reader that went file by file would have at most
                                                                         // two volumes busy at once (at a file boundary).
    let config = Config::default().path(PathChoice::Direct).chunk_bytes(1 << 20).queue_depth(4);
    let loader = Loader::new(config).unwrap();
    let checkpoint = Checkpoint::open(&index).unwrap();
    let done = AtomicBool::new(false);
    let inflight = volumes.inflight_paths();
    let busy_now = || {
        let reading = |p: &PathBuf| {
            let text = std::fs::read_to_string(p).unwrap();
            text.split_whitespace().next().is_some_and(|reads| reads != "0")
        };
        inflight.iter().filter(|p| reading(p)).count()
    };
    // Sampled by a thread of its own and, in case the scheduler keeps that thread off the
    // cores during a short load, each time a tensor lands (on the loading thread).
    let (model, most_busy) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut most = 0;
            while !done.load(Ordering::Relaxed) {
                most = most.max(busy_now());
                std::thread::sleep(Duration::from_micros(20));
            }
            most
        });
        let mut most_on_landing = 0;
        let model = loader.load_with(
            checkpoint,
            |_| true,
            |_| most_on_landing = most_on_landing.max(busy_now()),
        );
        done.store(true, Ordering::Relaxed);
        (model.unwrap(), sampler.join().unwrap().max(most_on_landing))
    });
    common::assert_matches_reference(&model, 4 * 32);
    let report = model.report();
    for f in &report.files {
        assert_eq!(f.reader, Some(ReaderKind::Direct), "{f:?}");
        assert!(f.reason.contains("of 4 volume(s) read side by side"), "{}", f.reason);
    }
    assert!(most_busy >= 3, "at most {most_busy} of 4 volumes had reads in flight at once");
}

/// The child half of `cold_and_hot_files_as_a_user_who_does_not_own_them`: loads the file
/// named by `GANTRY_PROBE_CHILD` and prints its reader and facts.
#[test]
fn probe_child() {
    let Ok(path) = std::env::var("GANTRY_PROBE_CHILD") else { return };
    let model = Loader::new(Config::default()).unwrap().load(&path).unwrap();
    let f = &model.report().files[0];
    println!("READER={}", f.reader.map_or("none", |r| r.name()));
    println!("FACTS={}", f.facts);
}

#[test]
fn cold_and_hot_files_as_a_user_who_does_not_own_them() {
    use std::os::unix::fs::PermissionsExt;
    if !common::root_or_skip("reading as another user") {
        return;
    }
    // Under the system's temporary directory, which every user may enter.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.path().join("probe-child");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = dir.path().join("m.safetensors");
    common::write_file(&file, &[(Dtype::F32, vec![8 << 20])], 3); // 32 MiB
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o444)).unwrap();
    let f = std::fs::File::open(&file).unwrap();
    f.sync_all().unwrap();
    let child = || {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&exe)
            .args(["--exact", "probe_child", "--nocapture", "--test-threads=1"])
            .env("GANTRY_PROBE_CHILD", &file)
            .output()
            .expect("setpriv (util-linux) could not be started: apt-get install util-linux");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "child failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let field = |key: &str| {
            let value = text.lines().find_map(|l| l.split(key).nth(1));
            value.unwrap_or_else(|| panic!("no {key} in {text}")).to_owned()
        };
        (field("READER="), field("FACTS="))
    };
    gantry::io::probe::evict(&f).unwrap();
    let (reader, facts) = child();
    assert_eq!(reader, "direct", "cold file as another user: {facts}");
    gantry::baseline::warm(&[file.as_path()]).unwrap();
    let (reader, facts) = child();
    assert_eq!(reader, "buffered", "hot file as another user: {facts}");
}

/// A blkio cgroup (cgroup v1) whose reads from one block device are capped at `bps`; the
/// calling thread joins it (threads it spawns afterwards inherit it) and leaves on drop.
struct Throttle {
    dir: PathBuf,
}

impl Throttle {
    fn join(device: &str, bps: u64) -> Self {
        let root = Path::new("/sys/fs/cgroup/blkio");
        assert!(
            root.join("tasks").exists(),
            "no cgroup v1 blkio hierarchy at {}: this test throttles a loop volume with \
             blkio.throttle.read_bps_device (mount -t cgroup -o blkio cgroup {0})",
            root.display()
        );
        let dir = root.join(format!("gantry-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let name = Path::new(device).file_name().unwrap();
        let dev = std::fs::read_to_string(Path::new("/sys/block").join(name).join("dev")).unwrap();
        std::fs::write(dir.join("blkio.throttle.read_bps_device"), format!("{} {bps}", dev.trim()))
            .unwrap();
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        std::fs::write(dir.join("tasks"), tid.to_string()).unwrap();
        Throttle { dir }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let _ = std::fs::write("/sys/fs/cgroup/blkio/tasks", tid.to_string());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A cold load from a volume that serves 24 MB/s is bound by storage, and the verdict says so
/// from the load's own timeline (reads in flight while nothing downstream waits).
#[test]
fn a_cold_load_from_a_throttled_volume_is_bound_by_storage() {
    if !common::root_or_skip("throttling a loop volume (blkio cgroup)") {
        return;
    }
    let dir = common::scratch();
    let volumes = Volumes::new(dir.path(), 1, 96);
    let index = write_sharded(dir.path(), &volumes.mounts, 8, 2 << 20); // 32 MiB
    let trace = dir.path().join("throttled.json");
    let config = Config::default().path(PathChoice::Direct).trace(&trace);
    let loader = Loader::new(config).unwrap();
    let model = {
        let _throttle = Throttle::join(&volumes.loops[0], 24 << 20);
        loader.load(&index).unwrap()
    };
    common::assert_matches_reference(&model, 8);
    assert_eq!(model.report().files[0].reader, Some(ReaderKind::Direct));
    let verdict = model.report().bound_by.clone().expect("a traced load has a verdict");
    assert_eq!(verdict.bound, gantry::trace::Bound::Storage, "{verdict}");
    assert!(std::fs::metadata(&trace).unwrap().len() > 0);
}
