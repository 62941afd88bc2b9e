//! Network namespaces for VMMs. A VMM never needs the host's network: one
//! without a NIC backend, or with an isolated hub, runs in an empty
//! namespace (only a down loopback) that the daemon creates once; one whose
//! NIC is a tap gets that tap as an open descriptor, opened inside the
//! sandbox's namespace by a short-lived thread (a thread's namespace is its
//! own, and this one ends instead of switching back), and runs in that
//! namespace too.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Runs `f` on a fresh thread and returns its result (the thread's
/// namespace changes die with it).
fn on_own_thread<T: Send + 'static>(f: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> std::io::Result<T> {
    std::thread::Builder::new()
        .name("forkd-netns".into())
        .spawn(f)?
        .join()
        .map_err(|_| std::io::Error::other("namespace thread panicked"))?
}

fn check(rc: libc::c_int) -> std::io::Result<libc::c_int> {
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
}

/// Creates an empty network namespace and returns a descriptor that keeps
/// it alive.
pub fn empty() -> std::io::Result<OwnedFd> {
    on_own_thread(|| {
        // SAFETY: plain system calls on this thread only.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNET))?;
            let fd = check(libc::open(c"/proc/thread-self/ns/net".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC))?;
            Ok(OwnedFd::from_raw_fd(fd))
        }
    })
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Opens the persistent tap `name` inside the namespace at `netns`.
pub fn open_tap(netns: &Path, name: &str) -> std::io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad tap name {name:?}")));
    }
    let mut ifreq = [0u8; 40];
    ifreq[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
    let ns = std::fs::File::open(netns)?;
    on_own_thread(move || {
        // SAFETY: plain system calls on this thread only; `ifreq` outlives them.
        unsafe {
            check(libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET))?;
            let fd = check(libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC))?;
            let tap = OwnedFd::from_raw_fd(fd);
            check(libc::ioctl(tap.as_raw_fd(), TUNSETIFF, ifreq.as_ptr()))?;
            Ok(tap)
        }
    })
}

/// Opens a namespace file (for the VMM to enter before exec).
pub fn open(netns: &PathBuf) -> std::io::Result<OwnedFd> {
    Ok(std::fs::File::open(netns)?.into())
}
