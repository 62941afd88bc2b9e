//! The part of confinement that runs in the forked child: raw system calls
//! only, no allocation, every failure reported (a VMM that cannot be
//! confined must not start).

use std::ffi::CStr;

use super::{Confine, Op};

pub(super) fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

const CAP_V3: u32 = 0x2008_0522;
const LAST_CAP: libc::c_ulong = 63;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Empties the bounding, inheritable and ambient sets and sets
/// no_new_privs. Dropping from the bounding set needs CAP_SETPCAP; without
/// it the set stays as it was (the uid change below is what empties the
/// permitted and effective sets then).
pub(super) unsafe fn drop_capabilities() {
    unsafe {
        for cap in 0..=LAST_CAP {
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
        }
        let mut hdr = CapHeader { version: CAP_V3, pid: 0 };
        let mut data = [CapData::default(); 2];
        if libc::syscall(libc::SYS_capget, &mut hdr as *mut CapHeader, data.as_mut_ptr()) == 0 {
            data[0].inheritable = 0;
            data[1].inheritable = 0;
            libc::syscall(libc::SYS_capset, &hdr as *const CapHeader, data.as_ptr());
        }
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0);
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    }
}

unsafe fn mount(
    src: Option<&CStr>,
    dst: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> std::io::Result<()> {
    let p = |c: Option<&CStr>| c.map(|c| c.as_ptr()).unwrap_or(std::ptr::null());
    unsafe { check(libc::mount(p(src), dst.as_ptr(), p(fstype), flags, p(data).cast())) }
}

pub(super) unsafe fn confine(c: &Confine) -> std::io::Result<()> {
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        // Nothing mounted here propagates back to the host.
        mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
        mount(
            Some(c"forkd-jail"),
            &c.root,
            Some(c"tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some(c"mode=0755,size=1m,nr_inodes=4096"),
        )?;
        for op in &c.ops {
            match op {
                Op::Mkdir(p) => {
                    if libc::mkdir(p.as_ptr(), 0o755) < 0 && *libc::__errno_location() != libc::EEXIST {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Op::Touch(p) => {
                    let fd = libc::open(p.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o600);
                    check(fd)?;
                    libc::close(fd);
                }
                Op::Symlink { target, link } => check(libc::symlink(target.as_ptr(), link.as_ptr()))?,
                Op::Bind { src, dst, read_only, device, recursive } => {
                    let rec = if *recursive { libc::MS_REC } else { 0 };
                    mount(Some(src), dst, None, libc::MS_BIND | rec, None)?;
                    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID;
                    if !*device {
                        flags |= libc::MS_NODEV;
                    }
                    if *read_only {
                        flags |= libc::MS_RDONLY;
                    }
                    mount(None, dst, None, flags, None)?;
                }
            }
        }
        // The tmpfs becomes `/`; the host's tree is detached and gone.
        check(libc::chdir(c.root.as_ptr()))?;
        check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int)?;
        check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
        check(libc::chdir(c"/".as_ptr()))?;
        mount(
            None,
            c"/",
            None,
            libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        )?;
        drop_capabilities();
        check(libc::setgroups(c.groups.len(), c.groups.as_ptr()))?;
        check(libc::setresgid(c.gid, c.gid, c.gid))?;
        // Leaving uid 0 clears the permitted and effective sets.
        check(libc::setresuid(c.uid, c.uid, c.uid))?;
        Ok(())
    }
}
