//! The wire of a live source: `SOCK_SEQPACKET` Unix sockets (one message per `send`, its
//! boundaries kept, descriptors passed beside it with `SCM_RIGHTS`) carrying small JSON
//! objects, and the sealed memfds the bytes live in.
//!
//! Every receive is bounded: at most [`MESSAGE_BYTES_MAX`] bytes and a stated number of
//! descriptors per message (a longer message or more descriptors is an error, never a larger
//! buffer), and every wait has the socket's timeout (`SO_RCVTIMEO`, `SO_SNDTIMEO`; a connect
//! waits under the send timeout). Received descriptors are owned at once (`OwnedFd`, close on
//! exec), so an error anywhere after closes them. This module is where pointers go to the
//! kernel: `recvmsg`/`sendmsg` control buffers, socket addresses, `fcntl` seals.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::cuda::IpcHandle;

/// The protocol version a client sends in `HELLO` and a server answers in `LEASE`.
pub const PROTOCOL_VERSION: u64 = 1;

/// Largest message either side sends or accepts, in bytes.
pub const MESSAGE_BYTES_MAX: usize = 64 << 10;

/// Descriptors per `FILES` message: below the kernel's `SCM_MAX_FD` (253).
pub const FDS_PER_MESSAGE: usize = 200;

/// Most files one publication holds.
pub const FILES_MAX: usize = 65_536;

/// Largest table (file list and digests) a client reads, in bytes.
pub const TABLE_BYTES_MAX: u64 = 256 << 20;

/// Longest file name in a publication, in bytes.
pub const NAME_BYTES_MAX: usize = 255;

/// The seals a client demands on every memfd: no write, no growth, no shrinking, and no
/// removing those seals. With them the bytes cannot change while anyone holds the descriptor.
pub const SEALS: libc::c_int =
    libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;

/// What one receive got.
#[derive(Debug)]
pub enum Received {
    /// The peer closed the connection.
    Closed,
    /// One message and the descriptors that came with it.
    Message {
        /// The message's bytes.
        bytes: Vec<u8>,
        /// The descriptors, owned.
        fds: Vec<OwnedFd>,
    },
}

/// A `SOCK_SEQPACKET` Unix socket, close on exec.
pub fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the descriptor it returns is owned right away.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `path` as a Unix socket address; an error when it does not fit one (107 bytes).
fn address(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a socket path is at most {} bytes without NUL, this one is {}",
                addr.sun_path.len() - 1,
                bytes.len()
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// Connects `fd` to the socket at `path` (waits at most the send timeout set on `fd`).
pub fn connect(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let (addr, len) = address(path)?;
    loop {
        // SAFETY: `addr` is a valid sockaddr_un of `len` bytes for the duration of the call.
        let rc = unsafe {
            libc::connect(fd.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len)
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Binds `fd` to `path` and listens.
pub fn bind_listen(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let (addr, len) = address(path)?;
    // SAFETY: as in `connect`.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain system call on a descriptor we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the receive and send timeouts of `fd` (`None`: wait without end).
pub fn set_timeouts(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<()> {
    let t = timeout.unwrap_or_default();
    let tv = libc::timeval {
        tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    for option in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: `tv` is a valid timeval of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The user id of the process at the other end of `fd`.
pub fn peer_uid(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: ucred is plain old data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Sends one message of at most [`MESSAGE_BYTES_MAX`] bytes with `fds` beside it.
pub fn send(fd: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    assert!(bytes.len() <= MESSAGE_BYTES_MAX && fds.len() <= FDS_PER_MESSAGE + 1);
    let raw: Vec<libc::c_int> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let data_len = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov =
        libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // SAFETY: msghdr is plain old data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds CMSG_SPACE(data_len) bytes, 8-byte aligned, so the
        // first header and its data of `data_len` bytes fit in it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(data_len as u32) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                data_len,
            );
        }
    }
    loop {
        // SAFETY: `msg` points at `iov`, `bytes` and `control`, all alive for the call.
        let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives one message with at most `fds_max` descriptors (waits at most the receive
/// timeout set on `fd`). A longer message or more descriptors is an `InvalidData` error.
pub fn recv(fd: BorrowedFd<'_>, fds_max: usize) -> io::Result<Received> {
    let mut bytes = vec![0u8; MESSAGE_BYTES_MAX];
    let data_len = fds_max.max(1) * std::mem::size_of::<libc::c_int>();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: bytes.as_mut_ptr().cast(), iov_len: bytes.len() };
    // SAFETY: msghdr is plain old data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` (over `bytes`) and `control`, alive for the call.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let fds = take_fds(&msg);
    let bad = |what: String| Err(io::Error::new(io::ErrorKind::InvalidData, what));
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return bad(format!("a message came with more than {fds_max} descriptors"));
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return bad(format!("a message is longer than {MESSAGE_BYTES_MAX} bytes"));
    }
    if n == 0 && fds.is_empty() {
        return Ok(Received::Closed);
    }
    bytes.truncate(n);
    Ok(Received::Message { bytes, fds })
}

/// The descriptors of every `SCM_RIGHTS` header of a received `msg`, owned.
fn take_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled by recvmsg; the CMSG macros walk its control buffer within
    // `msg_controllen`, and each descriptor read is one the kernel installed for us.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..payload / std::mem::size_of::<libc::c_int>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    fds
}

/// A new memfd called `name`, close on exec, that takes seals.
pub fn memfd(name: &str) -> io::Result<File> {
    let name = std::ffi::CString::new(format!("gantry:{name}").replace('\0', "?"))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `name` is a NUL-terminated string alive for the call.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Adds [`SEALS`] to `file` (fails with `EBUSY` while a writable shared mapping of it exists).
pub fn seal(file: &File) -> io::Result<()> {
    // SAFETY: plain fcntl on a descriptor we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Checks that `file` carries every one of [`SEALS`] and is `len` bytes long: then its bytes
/// are the ones announced and cannot change. The error says what is missing.
pub fn check_sealed(file: &File, len: u64) -> Result<(), String> {
    // SAFETY: plain fcntl on a descriptor we own.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        let e = io::Error::last_os_error();
        return Err(format!("not a sealable memfd ({e})"));
    }
    if seals & SEALS != SEALS {
        return Err(format!(
            "not sealed against change (seals {seals:#x}, every one of {SEALS:#x} is required): \
             the server could change its bytes under the reader"
        ));
    }
    let actual = file.metadata().map_err(|e| format!("fstat failed: {e}"))?.len();
    if actual != len {
        return Err(format!("is {actual} bytes, announced as {len}"));
    }
    Ok(())
}

/// Longest PCI bus id accepted from a server.
const BUS_ID_MAX: usize = 64;

/// What a reader was handed of a version's device residency.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceShare {
    /// The server's GPU, by PCI bus id.
    pub bus_id: String,
    /// Per file (in the lease's file order): the handle of its data section, if it has data.
    pub handles: Vec<Option<IpcHandle>>,
}

impl DeviceShare {
    /// Adds the `DEVICE` message `message` (files `first..first + count` of `files`).
    pub(crate) fn take(
        share: &mut Option<Self>,
        message: &Map<String, Value>,
        files: usize,
    ) -> Result<(), String> {
        let first = message.get("first").and_then(Value::as_u64).ok_or("no 'first'")? as usize;
        let handles = message.get("handles").and_then(Value::as_array).ok_or("no 'handles'")?;
        let count = message.get("count").and_then(Value::as_u64).ok_or("no 'count'")? as usize;
        let bus_id = message.get("bus_id").and_then(Value::as_str).ok_or("no 'bus_id'")?;
        let had = share.as_ref().map_or(0, |s| s.handles.len());
        if first != had || count != handles.len() || count == 0 || had + count > files {
            return Err(format!(
                "handles {first}..{} of {files} after {had}",
                first.saturating_add(count)
            ));
        }
        if bus_id.is_empty()
            || bus_id.len() > BUS_ID_MAX
            || !bus_id.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err("a bus id of 1 to 64 printable characters is required".to_owned());
        }
        let share =
            share.get_or_insert_with(|| Self { bus_id: bus_id.to_owned(), handles: Vec::new() });
        if share.bus_id != bus_id {
            return Err("the bus id changed between messages".to_owned());
        }
        for h in handles {
            share.handles.push(match h {
                Value::Null => None,
                Value::String(hex) => {
                    Some(IpcHandle::from_hex(hex).ok_or("a handle that is not 128 hex digits")?)
                }
                _ => return Err("a handle that is neither null nor a string".to_owned()),
            });
        }
        Ok(())
    }
}
