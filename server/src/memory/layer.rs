//! Diff layers: the pages a branch wrote, over its parent's memory.
//!
//! ```text
//! "FKDIFF01" | page size u32 LE | page count u64 LE | page numbers u64 LE × count | pages
//! ```
//! Written to a staging file and renamed; its sha256 is taken while it is
//! written. Materializing a layer = a copy of the parent's flat memory file
//! (a reflink where the filesystem can) with the layer's pages written over.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::dirty::PAGE;

const MAGIC: &[u8; 8] = b"FKDIFF01";

/// Writes a layer holding `pages` (page numbers) whose contents are
/// `data` (pages in the same order). Returns its "sha256:" digest.
pub fn write_layer(path: &Path, pages: &[u64], data: &[u8]) -> std::io::Result<String> {
    assert_eq!(data.len() as u64, pages.len() as u64 * PAGE);
    let f = File::create(path)?;
    let mut h = Sha256::new();
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let mut put = |b: &[u8], w: &mut BufWriter<File>| -> std::io::Result<()> {
        h.update(b);
        w.write_all(b)
    };
    put(&encode_head(pages), &mut w)?;
    put(data, &mut w)?;
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// The header and page index of a layer naming `pages`: everything that
/// comes before the pages themselves.
pub fn encode_head(pages: &[u64]) -> Vec<u8> {
    let mut head = Vec::with_capacity(HEAD as usize + pages.len() * 8);
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&(PAGE as u32).to_le_bytes());
    head.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    for p in pages {
        head.extend_from_slice(&p.to_le_bytes());
    }
    head
}

/// Runs of consecutive page numbers in `pages` (ascending), each at most
/// `max` pages long, as (first page, pages in the run): what can be read or
/// written in one call.
pub fn runs(pages: &[u64], max: usize) -> impl Iterator<Item = (u64, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = *pages.get(i)?;
        let mut n = 1;
        while i + n < pages.len() && n < max && pages[i + n] == first + n as u64 {
            n += 1;
        }
        i += n;
        Some((first, n))
    })
}

/// Bytes of a layer naming `count` pages.
pub fn encoded_len(count: u64) -> u64 {
    HEAD + count * (8 + PAGE)
}

/// Size of the fixed header: magic, page size, page count.
pub const HEAD: u64 = 20;
/// Most pages a layer may name: 1 TiB of guest memory. A count above it is
/// corruption, whatever the file's length says.
pub const MAX_PAGES: u64 = (1 << 40) / PAGE;

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// Reads a layer's page index; returns (pages, offset of the first page).
pub fn read_index(path: &Path) -> std::io::Result<(Vec<u64>, u64)> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    read_index_from(&mut f, len)
}

/// Reads the header and page index from `r`, a layer of `len` bytes.
///
/// The file is not trusted: the count must match `len` exactly before
/// anything is allocated (so the index buffer is never larger than the file),
/// every page offset must be representable, and page numbers must strictly
/// increase, as the writer emits them (so a page is never written twice).
pub fn read_index_from<R: Read>(r: &mut R, len: u64) -> std::io::Result<(Vec<u64>, u64)> {
    let mut head = [0u8; HEAD as usize];
    r.read_exact(&mut head)?;
    let (magic, rest) = head.split_at(8);
    let (page, count) = rest.split_at(4);
    if magic != MAGIC {
        return Err(invalid("not a forkd diff layer".into()));
    }
    let page = u32::from_le_bytes([page[0], page[1], page[2], page[3]]) as u64;
    if page != PAGE {
        return Err(invalid(format!("unexpected page size {page}")));
    }
    let mut c = [0u8; 8];
    c.copy_from_slice(count);
    let count = u64::from_le_bytes(c);
    if count > MAX_PAGES {
        return Err(invalid(format!("layer claims {count} pages")));
    }
    let data_off = count.checked_mul(8).and_then(|i| i.checked_add(HEAD));
    let expected = count.checked_mul(8 + PAGE).and_then(|b| b.checked_add(HEAD));
    let (Some(data_off), Some(expected)) = (data_off, expected) else {
        return Err(invalid(format!("layer claims {count} pages")));
    };
    if expected != len {
        return Err(invalid(format!("layer size {len} does not match its index of {count} pages")));
    }
    let idx_len = usize::try_from(count * 8).map_err(|_| invalid(format!("layer claims {count} pages")))?;
    let mut idx = vec![0u8; idx_len];
    r.read_exact(&mut idx)?;
    let mut pages = Vec::with_capacity(idx_len / 8);
    for c in idx.chunks_exact(8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        let p = u64::from_le_bytes(b);
        if p.checked_mul(PAGE).is_none_or(|o| o.checked_add(PAGE).is_none()) {
            return Err(invalid(format!("page {p} is beyond any memory")));
        }
        if pages.last().is_some_and(|&last| p <= last) {
            return Err(invalid(format!("page {p} out of order in the layer index")));
        }
        pages.push(p);
    }
    Ok((pages, data_off))
}

/// Copies `src` to `dst`: a reflink (FICLONE) where the filesystem shares
/// extents, else a sparse copy that skips holes.
pub fn clone_or_copy(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let s = File::open(src)?;
    let d = File::create(dst)?;
    // SAFETY: FICLONE takes the source fd; failure leaves dst empty.
    const FICLONE: libc::c_ulong = 0x4004_9409;
    if unsafe { libc::ioctl(d.as_raw_fd(), FICLONE as _, s.as_raw_fd()) } == 0 {
        return Ok(());
    }
    let len = s.metadata()?.len();
    d.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = s.read_at(&mut buf, off)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            d.write_all_at(&buf[..n], off)?;
        }
        off += n as u64;
    }
    d.sync_all()
}

/// Writes the layer's pages over `flat` (a copy of the parent's memory).
/// A page beyond the end of `flat` is an error, not a write that grows it:
/// a layer only ever overwrites its parent's pages.
pub fn apply(layer: &Path, flat: &Path) -> std::io::Result<()> {
    let mut l = File::open(layer)?;
    let len = l.metadata()?.len();
    let (pages, data_off) = read_index_from(&mut l, len)?;
    let f = std::fs::OpenOptions::new().write(true).open(flat)?;
    let flat_pages = f.metadata()?.len() / PAGE;
    if let Some(&last) = pages.last()
        && last >= flat_pages
    {
        return Err(invalid(format!("layer page {last} is beyond the {flat_pages}-page parent")));
    }
    // Runs of consecutive pages are copied together (up to RUN pages).
    const RUN: usize = 256;
    let mut buf = vec![0u8; RUN * PAGE as usize];
    let mut off = data_off;
    for (first, n) in runs(&pages, RUN) {
        let bytes = &mut buf[..n * PAGE as usize];
        l.read_exact_at(bytes, off)?;
        // In range: checked against the parent's size above.
        f.write_all_at(bytes, first * PAGE)?;
        off += n as u64 * PAGE;
    }
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_round_trip_and_materialize() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("parent");
        std::fs::write(&parent, vec![1u8; (8 * PAGE) as usize]).unwrap();
        let pages = vec![2u64, 5];
        let mut data = vec![9u8; PAGE as usize];
        data.extend(vec![8u8; PAGE as usize]);
        let layer = dir.path().join("layer");
        let digest = write_layer(&layer, &pages, &data).unwrap();
        assert!(digest.starts_with("sha256:"));
        assert_eq!(crate::memory::digest::sha256_file(&layer).unwrap(), digest);
        assert_eq!(read_index(&layer).unwrap().0, pages);
        let flat = dir.path().join("flat");
        clone_or_copy(&parent, &flat).unwrap();
        apply(&layer, &flat).unwrap();
        let got = std::fs::read(&flat).unwrap();
        assert_eq!(got[(2 * PAGE) as usize], 9);
        assert_eq!(got[(5 * PAGE) as usize], 8);
        assert_eq!(got[(3 * PAGE) as usize], 1);
        assert_eq!(std::fs::read(&parent).unwrap()[(2 * PAGE) as usize], 1, "parent untouched");
    }

    #[test]
    fn truncated_layer_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        write_layer(&layer, &[1], &vec![0u8; PAGE as usize]).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&layer).unwrap();
        f.set_len(100).unwrap();
        assert!(read_index(&layer).is_err());
    }

    fn header(count: u64) -> Vec<u8> {
        [MAGIC.as_slice(), &(PAGE as u32).to_le_bytes(), &count.to_le_bytes()].concat()
    }

    #[test]
    fn counts_that_do_not_fit_the_file_are_rejected_before_allocating() {
        for count in [u64::MAX, u64::MAX / 8, u64::MAX / (8 + PAGE), u64::MAX / (8 + PAGE) + 1, MAX_PAGES + 1, 1] {
            let b = header(count);
            let err = read_index_from(&mut &b[..], b.len() as u64).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "count {count}");
        }
    }

    #[test]
    fn bad_page_numbers_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        let data = vec![0u8; 2 * PAGE as usize];
        for pages in [[3u64, 3], [4, 2], [0, u64::MAX / PAGE]] {
            write_layer(&layer, &pages, &data).unwrap();
            assert!(read_index(&layer).is_err(), "{pages:?}");
        }
    }

    #[test]
    fn a_page_beyond_the_parent_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        write_layer(&layer, &[1, 8], &vec![5u8; 2 * PAGE as usize]).unwrap();
        let flat = dir.path().join("flat");
        std::fs::write(&flat, vec![0u8; (8 * PAGE) as usize]).unwrap();
        assert!(apply(&layer, &flat).is_err());
        let after = std::fs::read(&flat).unwrap();
        assert_eq!(after.len() as u64, 8 * PAGE);
        assert!(after.iter().all(|&b| b == 0), "nothing written before the check");
    }
}
