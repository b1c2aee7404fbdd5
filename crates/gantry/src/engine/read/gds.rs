//! GPUDirect Storage: cuFile reads straight from the file into device memory, no staging copy.
//!
//! Whether that is real DMA from NVMe to the GPU or "compatibility mode" (cuFile doing POSIX
//! reads through its own bounce buffer, which is what gantry's pinned staging path does, only
//! slower) is decided from what the driver reports, not guessed: nvidia-fs loaded (its
//! version is non-zero) or PCI P2PDMA support for NVMe, and the file on an NVMe block device.
//! The schedule never picks compatibility mode on its own; forcing it is allowed, and reported.
//!
//! Reads are synchronous `cuFileRead` calls, several threads at a time, each straight into its
//! tensor's device memory. Large one-shot destinations are not `cuFileBufRegister`ed:
//! registering costs more than it saves for memory read once.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, OnceLock};

use gds_sys::{decode_io, decode_status, CuFile, IoReturn};

use gantry_format::FileId;

use super::fault::FaultInjector;
use super::{complete, Completion, Failed, Message, OpenFile, ReaderFiles};
use crate::cuda::CudaDevice;
use crate::error::{Error, Result};

/// What cuFile can do on this machine, probed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GdsFacts {
    /// Whether libcufile loads and its driver opens; `Err` says why not.
    pub available: Result<(), String>,
    /// nvidia-fs version (0.0 when the module is not loaded).
    pub nvfs_version: (u32, u32),
    /// The driver supports NVMe through PCI P2PDMA (no nvidia-fs needed).
    pub nvme_p2p: bool,
    /// `allow_compat_mode` is set (cufile.json or environment).
    pub compat_allowed: bool,
}

impl GdsFacts {
    /// True when cuFile can DMA from NVMe to the GPU for real on this machine (the file must
    /// also be on NVMe: see [`file_on_nvme`]).
    pub fn real(&self) -> bool {
        self.available.is_ok() && (self.nvfs_version.0 > 0 || self.nvme_p2p)
    }
}

struct Driver {
    cufile: CuFile,
    facts: GdsFacts,
}

fn driver() -> &'static Result<Driver, String> {
    static DRIVER: OnceLock<Result<Driver, String>> = OnceLock::new();
    DRIVER.get_or_init(|| {
        let cufile = CuFile::load()?;
        // SAFETY: entry point resolved from libcufile with its header signature.
        decode_status(unsafe { (cufile.driver_open)() }).map_err(|(code, _)| {
            format!("cuFileDriverOpen failed: {}", gds_sys::CuFileCode(code.0))
        })?;
        let mut props = gds_sys::CUfileDrvProps_t::default();
        // SAFETY: a valid out pointer of the header's layout.
        decode_status(unsafe { (cufile.driver_get_properties)(&mut props) })
            .map_err(|(code, _)| format!("cuFileDriverGetProperties failed: {code}"))?;
        let facts = GdsFacts {
            available: Ok(()),
            nvfs_version: (props.nvfs.major_version, props.nvfs.minor_version),
            nvme_p2p: props.nvfs.dstatusflags & (1 << gds_sys::CU_FILE_NVME_P2P_SUPPORTED) != 0,
            compat_allowed: props.nvfs.dcontrolflags & (1 << gds_sys::CU_FILE_ALLOW_COMPAT_MODE)
                != 0,
        };
        Ok(Driver { cufile, facts })
    })
}

/// Probes cuFile (once per process).
pub fn facts() -> GdsFacts {
    match driver() {
        Ok(d) => d.facts.clone(),
        Err(reason) => GdsFacts {
            available: Err(reason.clone()),
            nvfs_version: (0, 0),
            nvme_p2p: false,
            compat_allowed: false,
        },
    }
}

/// Whether `file` lives on an NVMe block device (sysfs name of its device or its parent).
pub fn file_on_nvme(file: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = file.metadata() else { return false };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let link = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}"));
    link.is_ok_and(|p| p.components().any(|c| c.as_os_str().to_string_lossy().starts_with("nvme")))
}

/// One cuFile read: `len` bytes at `file_offset` of file `file` into `device_base + device_offset`.
#[derive(Debug, Clone, Copy)]
pub struct GdsRead {
    /// Position of the extent in the plan; reported when its last read is done.
    pub extent: usize,
    /// The file, by its position in the checkpoint.
    pub file: FileId,
    /// Absolute file offset.
    pub file_offset: u64,
    /// Bytes.
    pub len: u64,
    /// Device address of the destination allocation's base (the tensor's first byte).
    pub device_base: u64,
    /// Offset from `device_base`.
    pub device_offset: u64,
    /// True for the last read of its extent.
    pub last_of_extent: bool,
}

/// Reads `reads` on `threads` threads with cuFile, reporting each extent as its last read
/// completes (reads of one extent go to one thread, in order).
pub fn run(
    files: &ReaderFiles<'_, OpenFile>,
    reads: &[Vec<GdsRead>],
    device: &Arc<CudaDevice>,
    threads: usize,
    cancel: &AtomicBool,
    fault: Option<&dyn FaultInjector>,
    tx: &Sender<Result<Message>>,
) {
    let driver = match driver() {
        Ok(d) => d,
        Err(reason) => {
            let _ = tx.send(Err(Error::Unavailable { what: "cuFile", reason: reason.clone() }));
            return;
        }
    };
    // cuFile checks descriptors against the GPU of the calling thread's context.
    if let Err(e) = device.bind() {
        let _ = tx.send(Err(e));
        return;
    }
    let handles = match register(&driver.cufile, files) {
        Ok(h) => h,
        Err(e) => {
            let _ = tx.send(Err(e));
            return;
        }
    };
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..threads.min(reads.len()) {
            let tx = tx.clone();
            let (next, handles) = (&next, &handles);
            scope.spawn(move || {
                if let Err(e) = device.bind() {
                    let _ = tx.send(Err(e));
                    return;
                }
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= reads.len() || cancel.load(Ordering::Relaxed) {
                        return;
                    }
                    for r in &reads[i] {
                        let message = read_one(&driver.cufile, files, handles, r, fault);
                        let failed = message.is_err();
                        // Only an extent's last read reports it; a failure is always reported.
                        if (failed || r.last_of_extent) && tx.send(message).is_err() {
                            return;
                        }
                        if failed {
                            return;
                        }
                    }
                }
            });
        }
    });
    for &h in &handles.0 {
        // SAFETY: registered above, every read on it has returned.
        unsafe { (driver.cufile.handle_deregister)(h) };
    }
}

/// cuFile handles of the files, deregistered by `run`.
struct Handles(Vec<gds_sys::CUfileHandle_t>);
// SAFETY: cuFile handles may be used from any thread.
unsafe impl Sync for Handles {}

fn register(cufile: &CuFile, files: &ReaderFiles<'_, OpenFile>) -> Result<Handles> {
    let mut handles = Vec::with_capacity(files.len());
    for (_, f) in files.iter() {
        let mut descr = gds_sys::CUfileDescr_t {
            type_: gds_sys::CU_FILE_HANDLE_TYPE_OPAQUE_FD,
            handle: gds_sys::CUfileDescrHandle { fd: f.file.as_raw_fd() },
            fs_ops: std::ptr::null(),
        };
        let mut handle = std::ptr::null_mut();
        // SAFETY: valid out pointer and descriptor; the fd outlives the handle (deregistered
        // before `files` is dropped).
        let status = unsafe { (cufile.handle_register)(&mut handle, &mut descr) };
        if let Err((code, _)) = decode_status(status) {
            for &h in &handles {
                // SAFETY: registered just above.
                unsafe { (cufile.handle_deregister)(h) };
            }
            return Err(Error::Unavailable {
                what: "cuFile",
                reason: format!(
                    "{}: cuFileHandleRegister failed: {code}{}",
                    f.path.display(),
                    udev_hint(&f.file)
                ),
            });
        }
        handles.push(handle);
    }
    Ok(Handles(handles))
}

/// Why cuFile may refuse a file on a machine without udev: it identifies the file system from
/// udev's database, which containers and some VMs do not have for their disks.
fn udev_hint(file: &std::fs::File) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(dev) = file.metadata().map(|m| m.dev()) else { return String::new() };
    let entry = format!("/run/udev/data/b{}:{}", libc::major(dev), libc::minor(dev));
    if std::path::Path::new(&entry).exists() {
        String::new()
    } else {
        format!(" ({entry} is missing: cuFile finds the file system through udev's database)")
    }
}

/// Reads `r` with `cuFileRead`, each result through the fault injector and [`complete`] as
/// every reader's are; a cuFile status (no errno) is an error of its own.
fn read_one(
    cufile: &CuFile,
    files: &ReaderFiles<'_, OpenFile>,
    handles: &Handles,
    r: &GdsRead,
    fault: Option<&dyn FaultInjector>,
) -> Result<Message> {
    let file = files.get(r.file);
    let failed = Failed { op: "cuFileRead", path: &file.path, file_len: file.file_len };
    let mut done = 0u64;
    while done < r.len {
        // SAFETY: the destination range lies inside the tensor's device memory (the plan's
        // steps are inside their tensors) and the context is current on this thread.
        let ret = unsafe {
            (cufile.read)(
                handles.0[files.position(r.file)],
                r.device_base as *mut std::ffi::c_void,
                (r.len - done) as usize,
                (r.file_offset + done) as libc::off_t,
                (r.device_offset + done) as libc::off_t,
            )
        };
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let mut result = match decode_io(ret, errno) {
            IoReturn::Bytes(n) => n as i64,
            // An errno of 0 would read as end of file: it is a failure all the same.
            IoReturn::Errno(e) => -i64::from(if e == 0 { libc::EIO } else { e }),
            IoReturn::CuFile(code) => {
                return Err(Error::CuFile {
                    op: "cuFileRead",
                    path: file.path.clone(),
                    offset: r.file_offset + done,
                    code: code.0,
                    message: code.to_string(),
                });
            }
        };
        if let Some(fault) = fault {
            result = fault.rewrite(r.file.0, r.file_offset + done, r.len - done, result);
        }
        match complete(result, done, r.len) {
            Completion::Done => done = r.len,
            Completion::Continue { valid } => done = valid,
            Completion::Retry => {}
            other => return Err(failed.error(r.file_offset, done, r.len - done, other)),
        }
    }
    Ok(Message::Landed { extent: r.extent })
}
