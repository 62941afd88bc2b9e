//! Finding and copying the pages a VM wrote since it was restored. VMM
//! agnostic: the VM's RAM is a private mapping of the snapshot's memory file,
//! so a page that is present in the VMM process but no longer backed by the
//! file (pagemap bit 61 clear) — or swapped out (bit 62) — is a page the
//! guest (or the VMM) wrote.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const PAGE: u64 = 4096;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("no mapping of {0} in the VMM process")]
    NoMapping(String),
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
    #[error("short copy from the VMM: {got} of {want} bytes")]
    ShortCopy { got: usize, want: usize },
}

/// The VMM's mapping of the memory file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mapping {
    pub start: u64,
    pub len: u64,
    /// Offset into the file where the mapping starts.
    pub file_offset: u64,
}

/// Finds the mapping of `file` in /proc/PID/maps (the largest, if several).
pub fn find_mapping(pid: u32, file: &Path) -> Result<Mapping, DirtyError> {
    let maps = File::open(format!("/proc/{pid}/maps")).map_err(|e| DirtyError::Io("open maps", e))?;
    let want = file.display().to_string();
    let mut best: Option<Mapping> = None;
    for line in BufReader::new(maps).lines() {
        let line = line.map_err(|e| DirtyError::Io("read maps", e))?;
        // start-end perms offset dev inode path
        let mut it = line.splitn(6, ' ');
        let (Some(range), Some(_perms), Some(off), Some(_dev), Some(_inode), Some(path)) =
            (it.next(), it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        if path.trim_start() != want {
            continue;
        }
        let Some((s, e)) = range.split_once('-') else { continue };
        let (Ok(s), Ok(e), Ok(off)) =
            (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16), u64::from_str_radix(off, 16))
        else {
            continue;
        };
        let m = Mapping { start: s, len: e - s, file_offset: off };
        if best.is_none_or(|b| m.len > b.len) {
            best = Some(m);
        }
    }
    best.ok_or(DirtyError::NoMapping(want))
}

/// Page numbers (relative to the file) that the process has written.
pub fn dirty_pages(pid: u32, m: &Mapping) -> Result<Vec<u64>, DirtyError> {
    PagemapReader::new(pid, m)?.dirty_pages()
}

/// Reads one mapping's pagemap entries. The file is opened and the buffer
/// allocated and touched up front, so a read inside a pause does no setup.
pub struct PagemapReader {
    file: File,
    raw: Vec<u8>,
    start_page: u64,
    base: u64,
}

impl PagemapReader {
    pub fn new(pid: u32, m: &Mapping) -> Result<Self, DirtyError> {
        let file = File::open(format!("/proc/{pid}/pagemap")).map_err(|e| DirtyError::Io("open pagemap", e))?;
        let pages = (m.len / PAGE) as usize;
        // vec![1; n] writes every byte, faulting the buffer in now.
        let raw = vec![1u8; pages * 8];
        Ok(Self { file, raw, start_page: m.start / PAGE, base: m.file_offset / PAGE })
    }

    pub fn dirty_pages(&mut self) -> Result<Vec<u64>, DirtyError> {
        let mut done = 0;
        while done < self.raw.len() {
            let n = self
                .file
                .read_at(&mut self.raw[done..], self.start_page * 8 + done as u64)
                .map_err(|e| DirtyError::Io("read pagemap", e))?;
            if n == 0 {
                break;
            }
            done += n;
        }
        let base = self.base;
        Ok(self.raw[..done]
            .chunks_exact(8)
            .enumerate()
            .filter_map(|(i, c)| {
                let e = u64::from_le_bytes(c.try_into().unwrap());
                let written = (e & PM_PRESENT != 0 && e & PM_FILE == 0) || e & PM_SWAPPED != 0;
                written.then_some(base + i as u64)
            })
            .collect())
    }
}

/// Consecutive page runs: (first page, count).
pub fn runs(pages: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = vec![];
    for &p in pages {
        match out.last_mut() {
            Some((s, n)) if *s + *n == p => *n += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

/// A buffer allocated and faulted in *before* the VM is paused, so the copy
/// inside the pause never waits for the kernel to find memory.
pub struct CaptureBuffer {
    ptr: *mut u8,
    len: usize,
}

unsafe impl Send for CaptureBuffer {}

impl CaptureBuffer {
    pub fn new(len: usize) -> Result<Self, DirtyError> {
        let len = len.max(PAGE as usize);
        // SAFETY: an anonymous private mapping; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DirtyError::Io("allocate capture buffer", std::io::Error::last_os_error()));
        }
        Ok(Self { ptr: ptr as *mut u8, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self, len: usize) -> &[u8] {
        // SAFETY: ptr is valid for self.len bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr, len.min(self.len)) }
    }

    /// Copies the given page runs out of process `pid` (whose mapping of
    /// the file is `m`) into the buffer, in order. Returns bytes copied.
    pub fn copy_from(&mut self, pid: u32, m: &Mapping, runs: &[(u64, u64)]) -> Result<usize, DirtyError> {
        let total: u64 = runs.iter().map(|(_, n)| n * PAGE).sum();
        if total as usize > self.len {
            return Err(DirtyError::Io(
                "capture buffer",
                std::io::Error::other(format!("{total} dirty bytes exceed the {}-byte buffer", self.len)),
            ));
        }
        let base = m.file_offset / PAGE;
        let mut local = vec![];
        let mut remote = vec![];
        let mut off = 0usize;
        for &(p, n) in runs {
            let bytes = (n * PAGE) as usize;
            local.push(libc::iovec { iov_base: unsafe { self.ptr.add(off) } as *mut _, iov_len: bytes });
            remote.push(libc::iovec { iov_base: (m.start + (p - base) * PAGE) as *mut _, iov_len: bytes });
            off += bytes;
        }
        let mut copied = 0usize;
        // process_vm_readv takes at most IOV_MAX (1024) vectors per call.
        for (l, r) in local.chunks(1024).zip(remote.chunks(1024)) {
            let want: usize = l.iter().map(|v| v.iov_len).sum();
            // SAFETY: local iovecs point into our buffer; remote ones are
            // read by the kernel with ptrace rights checked.
            let n = unsafe {
                libc::process_vm_readv(pid as libc::pid_t, l.as_ptr(), l.len() as _, r.as_ptr(), r.len() as _, 0)
            };
            if n < 0 {
                return Err(DirtyError::Io("process_vm_readv", std::io::Error::last_os_error()));
            }
            if n as usize != want {
                return Err(DirtyError::ShortCopy { got: n as usize, want });
            }
            copied += n as usize;
        }
        Ok(copied)
    }
}

impl Drop for CaptureBuffer {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe {
            libc::munmap(self.ptr as *mut _, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsRawFd;

    #[test]
    fn runs_group_consecutive_pages() {
        assert_eq!(runs(&[1, 2, 3, 7, 9, 10]), vec![(1, 3), (7, 1), (9, 2)]);
        assert!(runs(&[]).is_empty());
    }

    /// Maps a file privately in this process, writes some pages, and checks
    /// that exactly those are found and copied.
    #[test]
    fn finds_and_copies_written_pages_of_a_private_file_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let f = File::create(&path).unwrap();
        f.set_len(64 * PAGE).unwrap();
        f.write_all_at(&vec![7u8; (64 * PAGE) as usize], 0).unwrap();
        let f = File::open(&path).unwrap();
        // SAFETY: private read-write mapping of our own temp file.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                (64 * PAGE) as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        } as *mut u8;
        assert_ne!(p as *mut libc::c_void, libc::MAP_FAILED);
        unsafe {
            // Read a page (file-backed, not dirty) and write three.
            let _ = std::ptr::read_volatile(p.add((2 * PAGE) as usize));
            for pg in [5u64, 6, 40] {
                *p.add((pg * PAGE) as usize) = pg as u8;
            }
        }
        let canon = std::fs::canonicalize(&path).unwrap();
        let m = find_mapping(std::process::id(), &canon).unwrap();
        assert_eq!(m.len, 64 * PAGE);
        let pages = dirty_pages(std::process::id(), &m).unwrap();
        assert_eq!(pages, vec![5, 6, 40]);
        let r = runs(&pages);
        let mut buf = CaptureBuffer::new((3 * PAGE) as usize).unwrap();
        let n = buf.copy_from(std::process::id(), &m, &r).unwrap();
        assert_eq!(n, (3 * PAGE) as usize);
        let s = buf.as_slice(n);
        assert_eq!(s[0], 5);
        assert_eq!(s[PAGE as usize], 6);
        assert_eq!(s[2 * PAGE as usize], 40);
        assert_eq!(s[1], 7);
        unsafe { libc::munmap(p as *mut _, (64 * PAGE) as usize) };
    }
}
