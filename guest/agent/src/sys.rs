//! Thin, checked wrappers over the libc calls the agent needs. Everything
//! returns `io::Result` so callers can map errno values onto protocol errors.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

pub fn cstr<S: AsRef<OsStr>>(s: S) -> io::Result<CString> {
    CString::new(s.as_ref().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "string contains a NUL byte"))
}

pub fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

pub fn check_isize(ret: isize) -> io::Result<usize> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret as usize) }
}

/// A pipe whose both ends are close-on-exec: `(read, write)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

pub fn open(path: &str, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let p = cstr(path)?;
    let fd = check(unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// read(2), retrying on EINTR.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match check_isize(n) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            r => return r,
        }
    }
}

/// Writes all of `data` to a possibly non-blocking fd, waiting for POLLOUT
/// until `deadline`.
pub fn write_all(fd: RawFd, mut data: &[u8], deadline: Option<Instant>) -> io::Result<()> {
    while !data.is_empty() {
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n >= 0 {
            data = &data[n as usize..];
            continue;
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => {
                let wait = match deadline {
                    Some(d) => {
                        let left = d.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out"));
                        }
                        left
                    }
                    None => Duration::from_secs(3600),
                };
                poll_one(fd, libc::POLLOUT, Some(wait))?;
            }
            _ => return Err(err),
        }
    }
    Ok(())
}

/// Polls a set of fds; returns the number ready (0 on timeout). EINTR counts as
/// a timeout-free wakeup with nothing ready.
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = match timeout {
        None => -1,
        // Rounded up, so a short wait never becomes a busy zero-timeout poll.
        Some(d) => (d.as_micros().div_ceil(1000)).min(i32::MAX as u128) as i32,
    };
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n as usize)
}

pub fn poll_one(fd: RawFd, events: libc::c_short, timeout: Option<Duration>) -> io::Result<libc::c_short> {
    let mut p = [libc::pollfd { fd, events, revents: 0 }];
    poll(&mut p, timeout)?;
    Ok(p[0].revents)
}

pub fn mkdir_p(path: &str, mode: libc::mode_t) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(mode).create(path)
}

pub fn mount(src: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> io::Result<()> {
    let (s, t, f, d) = (cstr(src)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    let fptr = if fstype.is_empty() { std::ptr::null() } else { f.as_ptr() };
    let dptr = if data.is_empty() { std::ptr::null() } else { d.as_ptr().cast() };
    check(unsafe { libc::mount(s.as_ptr(), t.as_ptr(), fptr, flags, dptr) }).map(|_| ())
}

pub fn clock(id: libc::clockid_t) -> libc::timespec {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts
}

pub fn timespec_nanos(ts: &libc::timespec) -> i128 {
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// Fills `buf` from the kernel CRNG.
pub fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        let n = unsafe { libc::getrandom(buf[off..].as_mut_ptr().cast(), buf.len() - off, 0) };
        match check_isize(n) {
            Ok(n) => off += n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// True when fd `fd` is open in this process.
pub fn fd_is_open(fd: RawFd) -> bool {
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Makes sure fds 0, 1 and 2 exist (pointing at /dev/null when they did not),
/// so no later pipe or file lands on a standard stream number.
pub fn ensure_std_fds() {
    for fd in 0..3 {
        if !fd_is_open(fd)
            && let Ok(null) = open("/dev/null", libc::O_RDWR, 0)
        {
            if null.as_raw_fd() != fd {
                unsafe { libc::dup2(null.as_raw_fd(), fd) };
            } else {
                // Keep it: it already sits on the wanted number.
                std::mem::forget(null);
            }
        }
    }
}
