//! VMM confinement, in the manner of Firecracker's jailer. Each VMM process
//! runs as its own unprivileged uid (see `uids`), with every capability set
//! empty and `no_new_privs`, inside a mount namespace whose root is an empty
//! tmpfs holding only what that VM needs: the system's `/usr` (QEMU and its
//! libraries, read-only), a few device nodes, the guest kernel, initramfs
//! and image (read-only), its memory file, and its own work dir. Every file
//! keeps its host path inside the jail, so the VMM's command line is the
//! same confined or not. Volumes are handed over as open file descriptors
//! (QEMU `-add-fd`), never as paths. QEMU's own seccomp sandbox is switched
//! on by the command line (see qemu::args).
//!
//! A `Plan` is computed in the daemon (all allocation happens there); the
//! forked child only walks it with raw system calls (`enter`), because
//! between fork and exec in a multi-threaded process nothing may allocate.

mod enter;
pub mod netns;
pub mod probe;
pub mod uids;

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub use uids::{UidLease, UidRange, Uids};

/// How VMMs are confined.
#[derive(Debug, Clone)]
pub struct JailConfig {
    /// Off only by explicit operator choice (`--vmm-jail off`).
    pub enabled: bool,
    pub uids: UidRange,
    /// An empty directory the jail root is mounted on (inside each VMM's own
    /// mount namespace, so one directory serves every VMM).
    pub mountpoint: PathBuf,
}

/// One host path made visible inside the jail, at the same path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    pub writable: bool,
}

/// Most descriptors one VMM is handed.
pub const MAX_PASSED_FDS: usize = 64;

/// What a VMM process needs from the host.
#[derive(Debug, Default)]
pub struct Needs {
    /// Files and directories, bound read-only unless `writable`.
    pub binds: Vec<Bind>,
    /// Device nodes (`/dev/null` …), bound as they are.
    pub devices: Vec<PathBuf>,
    /// Descriptors the VMM inherits, under their own numbers (only the
    /// child's copies lose close-on-exec, so no other process gets them).
    pub fds: Vec<OwnedFd>,
}

impl Needs {
    pub fn read_only(&mut self, p: impl Into<PathBuf>) {
        self.binds.push(Bind { path: p.into(), writable: false });
    }
    pub fn writable(&mut self, p: impl Into<PathBuf>) {
        self.binds.push(Bind { path: p.into(), writable: true });
    }
    /// Passes `fd` and returns the number the VMM sees it as.
    pub fn pass(&mut self, fd: OwnedFd) -> RawFd {
        let n = fd.as_raw_fd();
        self.fds.push(fd);
        n
    }
}

/// One step of building the jail, with every path already a C string.
#[derive(Debug)]
enum Op {
    Mkdir(CString),
    Touch(CString),
    Symlink { target: CString, link: CString },
    Bind { src: CString, dst: CString, read_only: bool, device: bool, recursive: bool },
}

/// Everything the forked child does before it execs the VMM.
#[derive(Debug)]
pub struct Plan {
    netns: Option<OwnedFd>,
    fds: Vec<OwnedFd>,
    /// None: no mount namespace, uid change or capability drop beyond the
    /// bounding set (`--vmm-jail off`).
    confine: Option<Confine>,
}

#[derive(Debug)]
struct Confine {
    root: CString,
    ops: Vec<Op>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail path {0}: {1}")]
    Path(String, String),
    #[error("{0}")]
    Uids(#[from] uids::Exhausted),
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::Path(p.display().to_string(), "contains NUL".into()))
}

/// The top-level system paths a dynamically linked QEMU needs: `/usr` and
/// the merged-`/usr` links (or directories) beside it.
const SYSTEM: &[&str] = &["/usr", "/lib", "/lib64", "/bin", "/sbin"];
/// Device nodes every VMM may use.
const DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"];

fn check_fd_count(needs: &Needs) -> Result<(), JailError> {
    if needs.fds.len() > MAX_PASSED_FDS {
        return Err(JailError::Path(
            "descriptors".into(),
            format!("{} passed, at most {MAX_PASSED_FDS}", needs.fds.len()),
        ));
    }
    Ok(())
}

impl Plan {
    /// A plan that only enters `netns` and passes `fds` (no confinement).
    pub fn unconfined(netns: Option<OwnedFd>, needs: Needs) -> Result<Self, JailError> {
        check_fd_count(&needs)?;
        Ok(Plan { netns, fds: needs.fds, confine: None })
    }

    /// A full jail for a VMM running as `lease`'s uid.
    pub fn confined(
        cfg: &JailConfig,
        lease: &UidLease,
        netns: Option<OwnedFd>,
        mut needs: Needs,
    ) -> Result<Self, JailError> {
        check_fd_count(&needs)?;
        let root = cfg.mountpoint.clone();
        let mut ops = Vec::new();
        let mut made: std::collections::BTreeSet<PathBuf> = Default::default();
        let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
        let mkdirs = |ops: &mut Vec<Op>, made: &mut std::collections::BTreeSet<PathBuf>, p: &Path| {
            let mut acc = PathBuf::from("/");
            for c in p.components().skip(1) {
                acc.push(c);
                if made.insert(acc.clone()) {
                    ops.push(Op::Mkdir(cstr(&inside(&acc))?));
                }
            }
            Ok::<(), JailError>(())
        };
        for s in SYSTEM {
            let p = Path::new(s);
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(p).map_err(|e| JailError::Path(s.to_string(), e.to_string()))?;
                    ops.push(Op::Symlink { target: cstr(&target)?, link: cstr(&inside(p))? });
                }
                Ok(m) if m.is_dir() => {
                    mkdirs(&mut ops, &mut made, p)?;
                    ops.push(Op::Bind {
                        src: cstr(p)?,
                        dst: cstr(&inside(p))?,
                        read_only: true,
                        device: false,
                        recursive: true,
                    });
                }
                _ => {}
            }
        }
        mkdirs(&mut ops, &mut made, Path::new("/dev"))?;
        needs.devices.extend(DEVICES.iter().map(PathBuf::from));
        let mut seen = std::collections::HashSet::new();
        for d in &needs.devices {
            if !seen.insert(d.clone()) || !d.exists() {
                continue;
            }
            if let Some(parent) = d.parent() {
                mkdirs(&mut ops, &mut made, parent)?;
            }
            ops.push(Op::Touch(cstr(&inside(d))?));
            ops.push(Op::Bind {
                src: cstr(d)?,
                dst: cstr(&inside(d))?,
                read_only: false,
                device: true,
                recursive: false,
            });
        }
        // Writable binds last: a read-only bind of a parent directory must
        // not hide them.
        needs.binds.sort_by_key(|b| b.writable);
        for b in &needs.binds {
            if !b.path.is_absolute() {
                return Err(JailError::Path(b.path.display().to_string(), "must be absolute".into()));
            }
            let meta =
                std::fs::metadata(&b.path).map_err(|e| JailError::Path(b.path.display().to_string(), e.to_string()))?;
            if let Some(parent) = b.path.parent() {
                mkdirs(&mut ops, &mut made, parent)?;
            }
            if meta.is_dir() {
                mkdirs(&mut ops, &mut made, &b.path)?;
            } else if made.insert(b.path.clone()) {
                ops.push(Op::Touch(cstr(&inside(&b.path))?));
            }
            ops.push(Op::Bind {
                src: cstr(&b.path)?,
                dst: cstr(&inside(&b.path))?,
                read_only: !b.writable,
                device: false,
                recursive: false,
            });
        }
        // /dev/kvm is group-owned (kvm): the VMM keeps that one group.
        let mut groups = vec![];
        if needs.devices.iter().any(|d| d == Path::new("/dev/kvm"))
            && let Ok(m) = std::fs::metadata("/dev/kvm")
        {
            use std::os::unix::fs::MetadataExt;
            groups.push(m.gid());
        }
        Ok(Plan {
            netns,
            fds: needs.fds,
            confine: Some(Confine { root: cstr(&root)?, ops, uid: lease.uid, gid: lease.gid, groups }),
        })
    }

    /// Runs in the forked child, just before exec.
    ///
    /// # Safety
    /// Call only between fork and exec: it uses raw system calls and
    /// allocates nothing.
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        unsafe {
            if let Some(ns) = &self.netns {
                enter::check(libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET))?;
            }
            for f in &self.fds {
                enter::check(libc::fcntl(f.as_raw_fd(), libc::F_SETFD, 0))?;
            }
            match &self.confine {
                Some(c) => enter::confine(c),
                None => {
                    enter::drop_capabilities();
                    Ok(())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
