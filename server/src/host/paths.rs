//! Host paths that come from requests. A client may name a file only under
//! a root the operator configured (the volume root); it is opened with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`
//! from a descriptor of that root, so neither `..`, nor a symlink anywhere
//! on the way, nor a path swapped after a check can lead outside it. The VMM
//! is then handed the opened descriptor, never the path.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("{path} is not under {root}")]
    Outside { path: String, root: String },
    #[error("{0} must be absolute and must not contain '..', NUL or ','")]
    Malformed(String),
    #[error("{path}: {why} (symlinks are not followed under {root})")]
    Open { path: String, root: String, why: String },
    #[error("{0} is not a regular file")]
    NotRegular(String),
}

/// `struct open_how` of openat2(2) (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// A directory of the host that request paths must stay under.
#[derive(Debug, Clone)]
pub struct Root {
    path: PathBuf,
}

impl Root {
    /// `path` must exist; it is canonicalised once, at start.
    pub fn new(path: &Path) -> std::io::Result<Self> {
        Ok(Root { path: std::fs::canonicalize(path)? })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The part of `path` under this root, checked lexically (`..`, NUL,
    /// ',' refused: ',' would split a QEMU option).
    pub fn relative<'a>(&self, path: &'a Path) -> Result<&'a Path, PathError> {
        let text = path.as_os_str().as_bytes();
        if !path.is_absolute()
            || text.contains(&0)
            || text.contains(&b',')
            || path.components().any(|c| matches!(c, Component::ParentDir))
        {
            return Err(PathError::Malformed(path.display().to_string()));
        }
        let rel = path.strip_prefix(&self.path).map_err(|_| PathError::Outside {
            path: path.display().to_string(),
            root: self.path.display().to_string(),
        })?;
        if rel.as_os_str().is_empty() {
            return Err(PathError::NotRegular(path.display().to_string()));
        }
        Ok(rel)
    }

    /// Opens the regular file `path` (absolute, under this root) for
    /// reading, or reading and writing.
    pub fn open_file(&self, path: &Path, write: bool) -> Result<OwnedFd, PathError> {
        let rel = self.relative(path)?;
        let err = |why: String| PathError::Open {
            path: path.display().to_string(),
            root: self.path.display().to_string(),
            why,
        };
        let root = std::fs::File::open(&self.path).map_err(|e| err(e.to_string()))?;
        let c_rel =
            CString::new(rel.as_os_str().as_bytes()).map_err(|_| PathError::Malformed(path.display().to_string()))?;
        let access = if write { libc::O_RDWR } else { libc::O_RDONLY };
        let how = OpenHow {
            flags: (access | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK) as u64,
            mode: 0,
            resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
        };
        // SAFETY: plain system call on valid pointers; the result is checked.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root.as_raw_fd(),
                c_rel.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            let why = match e.raw_os_error() {
                Some(libc::ELOOP) => "a symlink is on the way".to_string(),
                Some(libc::EXDEV) => "escapes the root".to_string(),
                _ => e.to_string(),
            };
            return Err(err(why));
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let meta = std::fs::File::from(fd.try_clone().map_err(|e| err(e.to_string()))?)
            .metadata()
            .map_err(|e| err(e.to_string()))?;
        if !meta.is_file() {
            return Err(PathError::NotRegular(path.display().to_string()));
        }
        // Blocking mode back on: QEMU expects ordinary file semantics.
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
        Ok(fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_only_regular_files_beneath_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path()).unwrap();
        let base = root.path().to_path_buf();
        std::fs::write(base.join("ok.img"), b"x").unwrap();
        std::fs::create_dir(base.join("sub")).unwrap();
        std::fs::write(base.join("sub/deep.img"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", base.join("link")).unwrap();
        std::os::unix::fs::symlink(base.join("sub"), base.join("dirlink")).unwrap();

        assert!(root.open_file(&base.join("ok.img"), true).is_ok());
        assert!(root.open_file(&base.join("sub/deep.img"), false).is_ok());
        for (p, want) in [
            (base.join("link"), "symlink"),
            (base.join("dirlink/deep.img"), "symlink"),
            (base.join("sub"), "regular"),
            (PathBuf::from("/etc/passwd"), "not under"),
            (base.join("sub/../ok.img"), "'..'"),
            (base.join("a,b"), "','"),
            (PathBuf::from("relative"), "absolute"),
            (base.join("missing"), "No such file"),
        ] {
            let e = root.open_file(&p, false).unwrap_err().to_string();
            assert!(e.contains(want), "{}: {e}", p.display());
        }
        // A device node is never a volume.
        let devroot = Root::new(Path::new("/dev")).unwrap();
        assert!(matches!(devroot.open_file(Path::new("/dev/null"), false), Err(PathError::NotRegular(_))));
    }
}
