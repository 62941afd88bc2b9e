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
    put(MAGIC, &mut w)?;
    put(&(PAGE as u32).to_le_bytes(), &mut w)?;
    put(&(pages.len() as u64).to_le_bytes(), &mut w)?;
    let mut idx = Vec::with_capacity(pages.len() * 8);
    for p in pages {
        idx.extend_from_slice(&p.to_le_bytes());
    }
    put(&idx, &mut w)?;
    put(data, &mut w)?;
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Reads a layer's page index; returns (pages, offset of the first page).
pub fn read_index(path: &Path) -> std::io::Result<(Vec<u64>, u64)> {
    let mut f = File::open(path)?;
    let mut head = [0u8; 20];
    f.read_exact(&mut head)?;
    if &head[..8] != MAGIC {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a forkd diff layer"));
    }
    let page = u32::from_le_bytes(head[8..12].try_into().unwrap()) as u64;
    if page != PAGE {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "unexpected page size"));
    }
    let count = u64::from_le_bytes(head[12..20].try_into().unwrap());
    let meta_len = f.metadata()?.len();
    if 20 + count.saturating_mul(8 + PAGE) != meta_len {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "layer size does not match its index"));
    }
    let mut idx = vec![0u8; (count * 8) as usize];
    f.read_exact(&mut idx)?;
    let pages = idx.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    Ok((pages, 20 + count * 8))
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
pub fn apply(layer: &Path, flat: &Path) -> std::io::Result<()> {
    let (pages, data_off) = read_index(layer)?;
    let l = File::open(layer)?;
    let f = std::fs::OpenOptions::new().write(true).open(flat)?;
    let mut buf = vec![0u8; PAGE as usize];
    for (i, p) in pages.iter().enumerate() {
        l.read_exact_at(&mut buf, data_off + i as u64 * PAGE)?;
        f.write_all_at(&buf, p * PAGE)?;
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
}
