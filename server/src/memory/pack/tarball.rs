//! The tar side of an archive: 512-byte ustar headers for regular files
//! (built and parsed with the `tar` crate's header type), padding, and the
//! end-of-archive marker. Data is streamed by the callers.
//!
//! Parsing is strict: only regular-file entries with a valid checksum and a
//! relative, normal path are accepted; links, devices, directories, FIFOs,
//! PAX/GNU extension headers and sparse entries are refused by type.

use tar::{EntryType, Header};

use super::PackError;

pub const BLOCK: usize = 512;

/// Header of a regular file `path` of `size` bytes (mode 0644, owner 0,
/// time 0: archives of the same snapshot are byte-identical).
pub fn header(path: &str, size: u64) -> Result<[u8; BLOCK], PackError> {
    let mut h = Header::new_ustar();
    h.set_path(path).map_err(|e| PackError::invalid(format!("entry name {path:?}: {e}")))?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(EntryType::Regular);
    h.set_cksum();
    Ok(*h.as_bytes())
}

/// Zero bytes that pad an entry of `size` bytes to a whole block.
pub fn padding(size: u64) -> usize {
    (BLOCK - (size % BLOCK as u64) as usize) % BLOCK
}

/// The end of an archive: two zero blocks.
pub const END: [u8; 2 * BLOCK] = [0; 2 * BLOCK];

/// One parsed header: a regular file's path and size; None for a zero
/// block (the end of the archive).
pub fn parse(block: &[u8; BLOCK]) -> Result<Option<(String, u64)>, PackError> {
    if block.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let h = Header::from_byte_slice(block);
    let stored = h.cksum().map_err(|_| PackError::invalid("a header's checksum field is not a number"))?;
    let computed: u32 =
        block.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { b' ' as u32 } else { b as u32 }).sum();
    if stored != computed {
        return Err(PackError::invalid("a header's checksum does not match (corrupt or not a tar)"));
    }
    let path =
        String::from_utf8(h.path_bytes().into_owned()).map_err(|_| PackError::invalid("an entry name is not UTF-8"))?;
    let kind = h.entry_type();
    let what = match kind {
        EntryType::Regular => None,
        EntryType::Symlink => Some("a symbolic link"),
        EntryType::Link => Some("a hard link"),
        EntryType::Char | EntryType::Block => Some("a device"),
        EntryType::Directory => Some("a directory"),
        EntryType::Fifo => Some("a FIFO"),
        EntryType::GNUSparse => Some("a sparse entry"),
        EntryType::XHeader | EntryType::XGlobalHeader | EntryType::GNULongName | EntryType::GNULongLink => {
            Some("an extension header")
        }
        _ => Some("of an unknown type"),
    };
    if let Some(what) = what {
        return Err(PackError::invalid(format!("entry {path:?} is {what}; only regular files are allowed")));
    }
    check_path(&path)?;
    let size = h.entry_size().map_err(|_| PackError::invalid(format!("entry {path:?} has a malformed size")))?;
    Ok(Some((path, size)))
}

/// A relative path of normal components ("a/b"), nothing else.
pub fn check_path(path: &str) -> Result<(), PackError> {
    if path.starts_with('/') {
        return Err(PackError::invalid(format!("entry {path:?} has an absolute path")));
    }
    if path.is_empty() || path.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(PackError::invalid(format!("entry {path:?} is not a plain relative path")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_large_sizes_fit() {
        for size in [0u64, 1, 511, 512, 8 << 30, (8 << 30) + 1, 1 << 40] {
            let h = header("snapshots/t/mem.pages", size).unwrap();
            assert_eq!(parse(&h).unwrap(), Some(("snapshots/t/mem.pages".to_string(), size)));
        }
        assert_eq!(parse(&[0u8; BLOCK]).unwrap(), None);
        assert_eq!(padding(0), 0);
        assert_eq!(padding(1), 511);
        assert_eq!(padding(512), 0);
    }

    #[test]
    fn anything_but_a_plain_regular_file_is_refused() {
        let mut h = Header::new_ustar();
        h.set_path("a/b").unwrap();
        h.set_size(0);
        for t in [EntryType::Symlink, EntryType::Link, EntryType::Char, EntryType::Block, EntryType::Directory] {
            h.set_entry_type(t);
            h.set_cksum();
            assert!(parse(h.as_bytes()).is_err(), "{t:?}");
        }
        for bad in ["/etc/passwd", "../x", "a/../b", "a//b", "./a", ""] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
        let mut h = header("a/b", 3).unwrap();
        h[0] ^= 1;
        assert!(parse(&h).is_err(), "checksum");
    }
}
