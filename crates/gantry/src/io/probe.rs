//! Facts about this machine and each file, probed once: io_uring availability, `O_DIRECT`
//! support and alignment, the memlock limit, page-cache residency. Each probe returns the
//! reason when something is missing, so the schedule can log it and say why it chose a path.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::OnceLock;

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
            match io_uring::IoUring::new(2) {
                Ok(_) => Ok(()),
                Err(e) => Err(format!(
                    "io_uring_setup failed: {e} (seccomp, or kernel.io_uring_disabled)"
                )),
            }
        })
        .clone()
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
    let align = dio_alignment(&file).max(4096);
    Ok((file, align))
}

/// The file system's direct-I/O alignment from `statx(STATX_DIOALIGN)`, or 4096.
fn dio_alignment(file: &File) -> u64 {
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
        u64::from(stx.stx_dio_offset_align.max(stx.stx_dio_mem_align)).max(1)
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

/// Fraction of `[offset, offset + len)` of `file` resident in the page cache, from
/// `cachestat(2)` (Linux 6.5+) or `mincore(2)`; `None` if neither answers.
pub fn resident_fraction(file: &File, offset: u64, len: u64) -> Option<f64> {
    if len == 0 {
        return Some(1.0);
    }
    cachestat(file, offset, len).or_else(|| mincore(file, offset, len))
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
