//! Facts about this machine and each file, probed once: io_uring availability, `O_DIRECT`
//! support and alignment, the memlock limit, page-cache residency, the file system under a
//! file. Each probe returns the reason when something is missing, so the schedule can log it
//! and say why it chose a path.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::plan::mount::{self, FileSystem, FsKind};
use crate::plan::profile::{DiskKind, VolumeFacts};

/// Whether io_uring can be used by this process; `Err` holds the reason. Probed once.
pub fn io_uring() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
                if v.trim() == "2" {
                    return Err("kernel.io_uring_disabled is 2".to_owned());
                }
            }
            io_uring::IoUring::new(2).map(drop).map_err(|e| uring_setup_reason(&e))
        })
        .clone()
}

/// Why `io_uring_setup` failed, from its errno: kernels before 5.12 charge the rings to
/// `RLIMIT_MEMLOCK` and fail with `ENOMEM` when it is too small; `EPERM` and `ENOSYS` come
/// from seccomp or `kernel.io_uring_disabled`.
fn uring_setup_reason(e: &std::io::Error) -> String {
    let why = match e.raw_os_error() {
        Some(libc::ENOMEM) => {
            "memlock limit too small for the rings: raise RLIMIT_MEMLOCK (ulimit -l)"
        }
        Some(libc::EPERM | libc::ENOSYS) => "seccomp, or kernel.io_uring_disabled",
        _ => "seccomp, kernel.io_uring_disabled, or a memlock limit too small for the rings",
    };
    format!("io_uring_setup failed: {e} ({why})")
}

/// Opens `path` with `O_DIRECT` and returns it with the alignment its file system asks for
/// (at least 4096); `Err` says why direct I/O cannot be used.
pub fn open_direct(path: &Path) -> Result<(File, u64), String> {
    let file = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).map_err(
        |e| match e.raw_os_error() {
            Some(libc::EINVAL) => "its file system does not support O_DIRECT".to_owned(),
            _ => format!("open with O_DIRECT failed: {e}"),
        },
    )?;
    let align = dio_alignment(&file);
    Ok((file, align))
}

/// The alignment direct I/O on `file` keeps: its file system's from `statx(STATX_DIOALIGN)`,
/// at least 4096 (4096 where the kernel does not say).
pub(crate) fn dio_alignment(file: &File) -> u64 {
    // SAFETY: statx is plain data; zeroed is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, empty path with AT_EMPTY_PATH, and a valid out pointer.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 {
        u64::from(stx.stx_dio_offset_align.max(stx.stx_dio_mem_align)).max(4096)
    } else {
        4096
    }
}

/// Soft `RLIMIT_MEMLOCK` in bytes (`u64::MAX` for unlimited) and whether the process may
/// exceed it anyway (`CAP_IPC_LOCK`).
pub fn memlock() -> (u64, bool) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid out pointer.
    let limit = if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0 {
        if lim.rlim_cur == libc::RLIM_INFINITY {
            u64::MAX
        } else {
            lim.rlim_cur
        }
    } else {
        0
    };
    (limit, has_cap_ipc_lock())
}

fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("CapEff:"))?;
            u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Fraction of `[offset, offset + len)` of `file` resident in the page cache (see
/// [`residency`]); `None` if no probe answers.
pub fn resident_fraction(file: &File, offset: u64, len: u64) -> Option<f64> {
    residency(file, offset, len).map(|(fraction, _)| fraction)
}

/// Fraction of `[offset, offset + len)` of `file` resident in the page cache, and the probe
/// that answered; `None` if none does.
///
/// `cachestat(2)` (Linux 6.5+) counts exactly, but newer kernels refuse it (`EPERM`) for a
/// file the caller neither owns nor may write, and `mincore(2)` on such a file reports every
/// page resident whatever the truth (both close a side channel). That is the usual
/// deployment: a service user reading read-only weights. So `mincore` is asked only where it
/// tells the truth (the caller owns the file or is root), and otherwise reads of one byte
/// with `RWF_NOWAIT` at pages spread over the range answer: the kernel serves them only from
/// the page cache and starts no I/O for them (`EAGAIN` when a page is not there).
pub fn residency(file: &File, offset: u64, len: u64) -> Option<(f64, &'static str)> {
    if len == 0 {
        return Some((1.0, "empty range"));
    }
    if let Some(f) = cachestat(file, offset, len) {
        return Some((f, "cachestat"));
    }
    if mincore_is_truthful(file) {
        if let Some(f) = mincore(file, offset, len) {
            return Some((f, "mincore"));
        }
    }
    nowait_sample(file, offset, len).map(|f| (f, "RWF_NOWAIT sample"))
}

/// Whether `mincore` reports the truth for mappings of `file`: the kernel answers for files
/// the caller owns (or has `CAP_FOWNER` over, as root has) or could open for writing; for the
/// rest it reports every page resident.
fn mincore_is_truthful(file: &File) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = file.metadata() else { return false };
    // SAFETY: geteuid and getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let mode = meta.permissions().mode();
    uid == 0 || meta.uid() == uid || (meta.gid() == gid && mode & 0o020 != 0) || mode & 0o002 != 0
}

/// Pages of a range sampled by [`nowait_sample`].
pub const NOWAIT_SAMPLES: u64 = 64;

/// Fraction of [`NOWAIT_SAMPLES`] pages spread evenly over the range that a one-byte
/// `preadv2(RWF_NOWAIT)` reads from the page cache; `None` where the kernel or file system
/// does not support the flag. A page the kernel would start readahead from answers `EAGAIN`
/// too, so a hot file can read a little under 100%.
pub fn nowait_sample(file: &File, offset: u64, len: u64) -> Option<f64> {
    let page = page_size();
    let first = offset / page;
    let pages = (offset + len).div_ceil(page) - first;
    let samples = NOWAIT_SAMPLES.min(pages);
    let mut byte = 0u8;
    let mut hits = 0u64;
    for i in 0..samples {
        let at = ((first + pages * i / samples) * page).max(offset);
        let iov = libc::iovec { iov_base: (&raw mut byte).cast(), iov_len: 1 };
        // SAFETY: one iovec over a live byte; a plain read of an open file.
        let rc = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at as i64, libc::RWF_NOWAIT) };
        if rc >= 0 {
            hits += 1;
            continue;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN) => {}
            _ => return None, // EOPNOTSUPP, EINVAL: the flag is not supported here
        }
    }
    Some(hits as f64 / samples as f64)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

fn cachestat(file: &File, offset: u64, len: u64) -> Option<f64> {
    const SYS_CACHESTAT: libc::c_long = 451; // the same number on every architecture
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    let page = page_size();
    let begin = offset - offset % page;
    let range = Range { off: begin, len: offset + len - begin };
    let mut stat = Stat::default();
    // SAFETY: valid fd and pointers to properly laid-out structs; flags must be 0.
    let rc = unsafe { libc::syscall(SYS_CACHESTAT, file.as_raw_fd(), &range, &mut stat, 0) };
    if rc != 0 {
        return None;
    }
    let pages = range.len.div_ceil(page);
    Some((stat.nr_cache as f64 / pages as f64).min(1.0))
}

fn mincore(file: &File, offset: u64, len: u64) -> Option<f64> {
    let page = page_size();
    let begin = offset - offset % page;
    let map_len = (offset + len - begin) as usize;
    // SAFETY: a read-only shared mapping of a file we hold open; unmapped below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            begin as i64,
        )
    };
    if addr == libc::MAP_FAILED {
        return None;
    }
    let mut vec = vec![0u8; map_len.div_ceil(page as usize)];
    // SAFETY: addr/map_len is the mapping above and vec has one byte per page.
    let rc = unsafe { libc::mincore(addr, map_len, vec.as_mut_ptr()) };
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(addr, map_len) };
    (rc == 0).then(|| vec.iter().filter(|&&b| b & 1 != 0).count() as f64 / vec.len() as f64)
}

/// The block device under `file` and how fast it answers: its kind from sysfs, and the
/// median of a few 4 KiB reads through `direct` (the file opened with `O_DIRECT`) spread over
/// `[offset, offset + len)`. Measured once per device per process.
pub fn volume(direct: &File, offset: u64, len: u64) -> VolumeFacts {
    static SEEN: OnceLock<parking_lot::Mutex<HashMap<u64, VolumeFacts>>> = OnceLock::new();
    let dev = direct.metadata().map(|m| m.dev()).unwrap_or(u64::MAX);
    let seen = SEEN.get_or_init(Default::default);
    if let Some(facts) = seen.lock().get(&dev) {
        return facts.clone();
    }
    let (device, mut kind) = disk(dev);
    // A FUSE, NFS or Lustre mount has no block device of its own: named by its type.
    let fs = file_system(direct, Path::new(""));
    if fs.kind.is_remote() {
        kind = DiskKind::Mount(fs.mount.map_or_else(|| fs.kind.name().to_owned(), |m| m.fstype));
    }
    let facts = VolumeFacts { device, kind, latency_s: read_latency(direct, offset, len) };
    seen.lock().insert(dev, facts.clone());
    facts
}

/// Name and kind of the whole disk holding device number `dev`, from sysfs; a device with no
/// block device behind it (a network or FUSE file system) is named by its number.
pub fn disk(dev: u64) -> (String, DiskKind) {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let Ok(mut dir) = std::fs::canonicalize(&sys) else {
        return (format!("{major}:{minor}"), DiskKind::Other("unknown".to_owned()));
    };
    if dir.join("partition").exists() {
        dir.pop();
    }
    let name = dir.file_name().map_or("unknown".to_owned(), |n| n.to_string_lossy().into_owned());
    let read = |p: &str| std::fs::read_to_string(dir.join(p)).map(|s| s.trim().to_owned());
    let driver = std::fs::read_link(dir.join("device/driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let model = read("device/model").unwrap_or_default();
    (name.clone(), disk_kind(&name, &driver, &model))
}

/// A disk's kind from its sysfs name, driver and model.
pub(crate) fn disk_kind(name: &str, driver: &str, model: &str) -> DiskKind {
    if model.contains("Elastic Block Store") || name.starts_with("xvd") {
        DiskKind::Ebs
    } else if name.starts_with("nvme") {
        DiskKind::Nvme
    } else if driver == "virtio_blk" || name.starts_with("vd") {
        DiskKind::Virtio
    } else {
        let base = name.trim_end_matches(|c: char| c.is_ascii_digit()).trim_end_matches('-');
        DiskKind::Other(if base.is_empty() { name.to_owned() } else { base.to_owned() })
    }
}

/// Median time of eight 4 KiB reads at queue depth 1, spread over the range.
fn read_latency(direct: &File, offset: u64, len: u64) -> Option<f64> {
    use std::os::unix::fs::FileExt;
    const N: u64 = 8;
    // A page of its own: aligned as O_DIRECT asks.
    let mut buf = crate::cuda::HostBuffer::new(4096).ok()?;
    let mut times = Vec::with_capacity(N as usize);
    for i in 0..N {
        let at = (offset + len / N * i) / 4096 * 4096;
        let start = std::time::Instant::now();
        if direct.read_at(&mut buf, at).is_ok_and(|n| n > 0) {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    times.get(times.len() / 2).copied()
}

/// The file system under `file` (at `path`): its kind from `fstatfs`, its mount from
/// `/proc/self/mountinfo` (by the file's device number), and for a FUSE mount what serves it
/// (an rclone remote's type from rclone's config file). Each probe that fails leaves its part
/// out; none is an error.
pub fn file_system(file: &File, path: &Path) -> FileSystem {
    // SAFETY: statfs is plain data; zeroed is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and a valid out pointer.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    let kind = if rc == 0 { FsKind::of_magic(st.f_type as u64) } else { FsKind::Other };
    let mount = file.metadata().ok().and_then(|m| {
        let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        mount::mount_of(&text, libc::major(m.dev()), libc::minor(m.dev()))
    });
    let behind = match (&mount, kind) {
        (Some(m), FsKind::Fuse) => {
            let full = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
            full.strip_prefix(&m.point).ok().and_then(|rel| mount::behind(m, rel, rclone_type))
        }
        _ => None,
    };
    FileSystem { kind, mount, behind }
}

/// An rclone remote's backend type: `RCLONE_CONFIG_<NAME>_TYPE`, else `type` in its section
/// of rclone's config file (`RCLONE_CONFIG`, else `~/.config/rclone/rclone.conf`), read with
/// a cap.
fn rclone_type(remote: &str) -> Option<String> {
    use std::io::Read;
    let var = format!("RCLONE_CONFIG_{}_TYPE", remote.to_ascii_uppercase().replace('-', "_"));
    if let Ok(t) = std::env::var(var) {
        return Some(t);
    }
    let config = std::env::var_os("RCLONE_CONFIG").map(PathBuf::from).or_else(|| {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
        Some(base.join("rclone/rclone.conf"))
    })?;
    let mut text = String::new();
    File::open(config).ok()?.take(1 << 20).read_to_string(&mut text).ok()?;
    mount::rclone_config_type(&text, remote)
}

/// Asks the kernel to drop `file`'s pages from the page cache (no root needed). Pages that
/// are dirty or mapped elsewhere may stay.
pub fn evict(file: &File) -> std::io::Result<()> {
    // SAFETY: plain advice on a valid fd.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_kinds() {
        let cases = [
            ("nvme1n1", "", "Amazon Elastic Block Store", DiskKind::Ebs),
            ("xvdf", "", "", DiskKind::Ebs),
            ("nvme0n1", "", "Amazon EC2 NVMe Instance Storage", DiskKind::Nvme),
            ("nvme0n1", "", "SAMSUNG MZQL23T8HCLS-00A07", DiskKind::Nvme),
            ("vda", "virtio_blk", "", DiskKind::Virtio),
            ("vdb", "", "", DiskKind::Virtio),
            ("loop3", "", "", DiskKind::Other("loop".into())),
            ("dm-0", "", "", DiskKind::Other("dm".into())),
            ("sda", "sd", "QEMU HARDDISK", DiskKind::Other("sda".into())),
        ];
        for (name, driver, model, want) in cases {
            assert_eq!(disk_kind(name, driver, model), want, "{name} {driver} {model}");
        }
    }

    #[test]
    fn uring_setup_enomem_is_blamed_on_memlock() {
        let reason = uring_setup_reason(&std::io::Error::from_raw_os_error(libc::ENOMEM));
        assert!(reason.contains("RLIMIT_MEMLOCK") && !reason.contains("seccomp"), "{reason}");
        let reason = uring_setup_reason(&std::io::Error::from_raw_os_error(libc::EPERM));
        assert!(reason.contains("seccomp"), "{reason}");
    }
}
