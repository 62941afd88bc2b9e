//! The non-zero pages of a flat memory file: what `mem.pages` keeps.
//! Holes are skipped without reading them (`SEEK_DATA`/`SEEK_HOLE`); data
//! extents are read in large chunks and every page that is all zeros is
//! left out too.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::memory::dirty::PAGE;

/// Bytes read at a time while scanning.
const CHUNK: usize = 1 << 20;

/// The data extents of `f` (offset, length), by SEEK_DATA/SEEK_HOLE; the
/// whole file when the filesystem cannot say.
fn extents(f: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = vec![];
    let mut pos = 0i64;
    while (pos as u64) < len {
        // SAFETY: lseek on an open descriptor; it only moves the offset.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return vec![(0, len)];
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole.min(len as i64) };
        if end > data {
            out.push((data as u64, (end - data) as u64));
        }
        pos = end.max(data + 1);
    }
    out
}

fn is_zero(page: &[u8]) -> bool {
    // Word-wise: the compiler vectorizes this loop.
    let (head, words, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Page numbers (ascending) of the pages of `f` (`len` bytes, a whole
/// number of pages) that hold anything but zeros.
pub fn nonzero_pages(f: &File, len: u64) -> std::io::Result<Vec<u64>> {
    let mut pages = vec![];
    let mut buf = vec![0u8; CHUNK];
    for (start, n) in extents(f, len) {
        // Extents are block-aligned; round out to whole pages.
        let first = start / PAGE * PAGE;
        let end = (start + n).div_ceil(PAGE) * PAGE;
        let mut off = first;
        while off < end.min(len) {
            let want = ((end.min(len) - off) as usize).min(CHUNK);
            let got = f.read_at(&mut buf[..want], off)?;
            if got == 0 {
                break;
            }
            for (i, page) in buf[..got].chunks(PAGE as usize).enumerate() {
                if !is_zero(page) {
                    pages.push(off / PAGE + i as u64);
                }
            }
            off += got as u64;
        }
    }
    pages.dedup();
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_and_zero_pages_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mem");
        let f = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&p).unwrap();
        let len = 4096 * PAGE;
        f.set_len(len).unwrap();
        f.write_all_at(&[1u8; PAGE as usize], 3 * PAGE).unwrap();
        f.write_all_at(&[0u8; PAGE as usize], 10 * PAGE).unwrap(); // written zeros
        let mut last = vec![0u8; PAGE as usize];
        last[PAGE as usize - 1] = 7;
        f.write_all_at(&last, 4095 * PAGE).unwrap();
        f.write_all_at(&[2u8; 3 * PAGE as usize], 2000 * PAGE).unwrap();
        assert_eq!(nonzero_pages(&f, len).unwrap(), vec![3, 2000, 2001, 2002, 4095]);
        let empty = dir.path().join("empty");
        let e = File::create(&empty).unwrap();
        e.set_len(len).unwrap();
        assert!(nonzero_pages(&File::open(&empty).unwrap(), len).unwrap().is_empty());
    }
}
