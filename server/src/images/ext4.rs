//! Writing a staged root tree as the ext4 file a guest boots from, with
//! `mke2fs -d` (e2fsprogs), sized from the tree, the same way
//! scripts/build-guest.sh makes the built-in images.

use std::collections::HashSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::ImageError;

const BLOCK: u64 = 4096;
/// Bytes of one inode (mke2fs's default for ext4).
const INODE_SIZE: u64 = 256;
/// Room for the file system's own metadata (group descriptors, bitmaps,
/// lost+found, the root).
const OVERHEAD: u64 = 32 << 20;
/// Symlink targets shorter than this live in the inode.
const FAST_SYMLINK: u64 = 60;

/// Writes the tree at `root` as an ext4 image at `out` (replacing it), and
/// answers the image's size in bytes. Owners, modes, symlinks, hard links,
/// device nodes, mtimes and xattrs are kept (`mke2fs -d` copies them); the
/// root directory is owned by 0:0. The file system has no journal (it is
/// mounted read-only by the guest), 0 reserved blocks, and room for the
/// tree's data and inodes plus a fifth and 32 MiB, rounded to 4 MiB. It is
/// written to a temporary name beside `out` and renamed into place.
///
/// [`ImageError::Precondition`] when mke2fs is not installed.
pub fn make_ext4(root: &Path, out: &Path) -> Result<u64, ImageError> {
    let mke2fs = tool("mke2fs")?;
    let usage = measure(root)?;
    let inodes = usage.inodes + usage.inodes / 4 + 1024;
    let data = usage.blocks * BLOCK;
    let size = (data + data / 5 + inodes * INODE_SIZE + OVERHEAD).div_ceil(4 << 20) * (4 << 20);

    let name = out.file_name().ok_or_else(|| ImageError::Invalid(format!("{}: not a file name", out.display())))?;
    let tmp = out.with_file_name(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = Command::new(&mke2fs)
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0"])
        .arg("-N")
        .arg(inodes.to_string())
        .args(["-O", "^has_journal,^resize_inode", "-E", "root_owner=0:0,lazy_itable_init=0", "-d"])
        .arg(root)
        .arg(&tmp)
        .arg(format!("{}k", size / 1024))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    let failed = |e: ImageError| {
        let _ = std::fs::remove_file(&tmp);
        e
    };
    let output = result.map_err(|e| failed(ImageError::io(format!("run {}", mke2fs.display()), e)))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let msg = format!("mke2fs ({}) failed: {stderr}", output.status);
        let e = if stderr.contains("No space left") {
            ImageError::Precondition(msg)
        } else {
            ImageError::io("write ext4 image", std::io::Error::other(msg))
        };
        return Err(failed(e));
    }
    std::fs::rename(&tmp, out).map_err(|e| failed(ImageError::io(format!("rename to {}", out.display()), e)))?;
    let len = std::fs::metadata(out).map_err(|e| ImageError::io(format!("stat {}", out.display()), e))?.len();
    Ok(len)
}

/// Unpacks the ext4 image at `image` into the directory `dest` (made if
/// missing), with `debugfs -R "rdump / DEST"`: directories, files and
/// symlinks with their owners, permission bits and mtimes. What rdump does
/// not carry is lost: hard links become copies, and xattrs and the setuid
/// and setgid bits are not kept (chown after chmod clears them). For a base
/// tree to build on, not for a faithful copy.
pub fn unpack_ext4(image: &Path, dest: &Path) -> Result<(), ImageError> {
    let debugfs = tool("debugfs")?;
    std::fs::create_dir_all(dest).map_err(|e| ImageError::io(format!("create {}", dest.display()), e))?;
    let dest_text = dest
        .to_str()
        .filter(|d| !d.contains('"') && !d.contains('\n'))
        .ok_or_else(|| ImageError::Precondition(format!("{}: a path debugfs cannot be given", dest.display())))?;
    let output = Command::new(&debugfs)
        .arg("-R")
        .arg(format!("rdump / \"{dest_text}\""))
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| ImageError::io(format!("run {}", debugfs.display()), e))?;
    // debugfs answers 0 even when a request fails: its complaints are on
    // stderr after the version banner.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let complaints: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty()).collect();
    if !output.status.success() || !complaints.is_empty() {
        return Err(ImageError::io(
            format!("unpack {}", image.display()),
            std::io::Error::other(format!("debugfs rdump: {}", complaints.join("; "))),
        ));
    }
    // The file system's own lost+found is not part of the tree.
    let _ = std::fs::remove_dir(dest.join("lost+found"));
    Ok(())
}

/// The e2fsprogs tool `name`; Precondition when it is not installed.
fn tool(name: &str) -> Result<PathBuf, ImageError> {
    find_tool(name).ok_or_else(|| {
        ImageError::Precondition(format!(
            "{name} is not installed (e2fsprogs): image root file systems cannot be written"
        ))
    })
}

/// `name` on PATH or in the sbin directories (which a daemon's PATH may
/// lack).
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0))
}

#[derive(Debug, Default)]
struct Usage {
    /// 4 KiB blocks of content: files (each hard-linked one once),
    /// directories, long symlink targets, xattrs that leave the inode.
    blocks: u64,
    inodes: u64,
}

/// What the tree at `root` takes, walked without following symlinks.
fn measure(root: &Path) -> Result<Usage, ImageError> {
    let mut usage = Usage::default();
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    let meta = std::fs::symlink_metadata(root).map_err(|e| ImageError::io(format!("stat {}", root.display()), e))?;
    if !meta.is_dir() {
        return Err(ImageError::Invalid(format!("{} is not a directory", root.display())));
    }
    usage.inodes += 1;
    usage.blocks += meta.len().div_ceil(BLOCK).max(1);
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| ImageError::io(format!("read {}", dir.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| ImageError::io(format!("read {}", dir.display()), e))?;
            let path = entry.path();
            let meta =
                std::fs::symlink_metadata(&path).map_err(|e| ImageError::io(format!("stat {}", path.display()), e))?;
            if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
                // Another name of an inode already counted.
                continue;
            }
            usage.inodes += 1;
            let ft = meta.file_type();
            if ft.is_dir() {
                usage.blocks += meta.len().div_ceil(BLOCK).max(1);
                stack.push(path.clone());
            } else if ft.is_file() {
                // Plus one block in 256 for the extent tree of a big file.
                let b = meta.len().div_ceil(BLOCK);
                usage.blocks += b + b / 256;
            } else if ft.is_symlink() && meta.len() >= FAST_SYMLINK {
                usage.blocks += 1;
            }
            if has_xattrs(&path) {
                usage.blocks += 1;
            }
        }
    }
    Ok(usage)
}

/// Whether `path` (not followed) has xattrs, which may need a block.
fn has_xattrs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: a NUL-terminated path and a null buffer of size 0 (a size
    // query); the result is checked.
    let n = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    n > 0
}

#[cfg(test)]
#[path = "tests/ext4.rs"]
mod tests;
