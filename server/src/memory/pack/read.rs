//! Reading an archive into a staging directory, trusting nothing: the
//! manifest first (bounded, validated), then each entry checked against it
//! before a byte of it is written, digests checked as the bytes arrive, and
//! memory checked as it is expanded. Only as many bytes as the manifest
//! declares are ever decompressed, so a small archive cannot expand into a
//! large one (a zip bomb stops at the first byte over).

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use async_compression::tokio::bufread::ZstdDecoder;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};

use super::PackError;
use super::manifest::{FileEntry, FileKind, MANIFEST_PATH, MAX_MANIFEST_BYTES, Manifest};
use super::tarball::{self, BLOCK};
use crate::core::store::SnapshotRecord;
use crate::memory::dirty::PAGE;
use crate::memory::layer;

/// Bytes copied at a time.
const CHUNK: usize = 1 << 20;
/// Bytes of expanded memory written between two writeback kicks.
const WRITEBACK_EVERY: u64 = 32 << 20;

async fn read_block<R: AsyncRead + Unpin>(r: &mut R) -> Result<[u8; BLOCK], PackError> {
    let mut b = [0u8; BLOCK];
    r.read_exact(&mut b).await.map_err(|e| truncated_or(e, "the archive ends inside a header"))?;
    Ok(b)
}

fn truncated_or(e: std::io::Error, what: &str) -> PackError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => PackError::invalid(what),
        // zstd frame errors surface as "other" I/O errors from the decoder.
        std::io::ErrorKind::Other | std::io::ErrorKind::InvalidData => {
            PackError::invalid(format!("not a zstd-compressed archive or corrupt: {e}"))
        }
        _ => PackError::Io(e),
    }
}

async fn skip<R: AsyncRead + Unpin>(r: &mut R, n: usize) -> Result<(), PackError> {
    let mut pad = [0u8; BLOCK];
    r.read_exact(&mut pad[..n]).await.map_err(|e| truncated_or(e, "the archive ends inside padding"))?;
    Ok(())
}

/// An archive being read: its manifest is known (and valid); its files
/// have not been read yet.
pub struct Archive<R: AsyncRead + Unpin> {
    r: ZstdDecoder<BufReader<R>>,
    pub manifest: Manifest,
}

/// Opens the archive on `input` and reads and validates its manifest.
pub async fn open<R: AsyncRead + Unpin + Send>(input: R) -> Result<Archive<R>, PackError> {
    let mut r = ZstdDecoder::new(BufReader::with_capacity(CHUNK, input));
    let first = read_block(&mut r).await?;
    let (path, size) = tarball::parse(&first)?.ok_or_else(|| PackError::invalid("the archive is empty"))?;
    if path != MANIFEST_PATH {
        return Err(PackError::invalid(format!("the first entry is {path:?}, not {MANIFEST_PATH}")));
    }
    if size > MAX_MANIFEST_BYTES {
        return Err(PackError::invalid(format!("manifest.json is {size} bytes (at most {MAX_MANIFEST_BYTES})")));
    }
    let mut text = vec![0u8; size as usize];
    r.read_exact(&mut text).await.map_err(|e| truncated_or(e, "the archive ends inside manifest.json"))?;
    skip(&mut r, tarball::padding(size)).await?;
    let manifest = Manifest::parse(&text)?;
    Ok(Archive { r, manifest })
}

impl<R: AsyncRead + Unpin + Send> Archive<R> {
    /// Reads every file into `dir` (an empty directory), each at its
    /// archive path beneath it, checking each against the manifest.
    pub async fn read_files(mut self, dir: &Path) -> Result<Manifest, PackError> {
        let r = &mut self.r;
        let manifest = self.manifest;
        let mut expected: HashMap<&str, (&FileEntry, &SnapshotRecord)> =
            manifest.files_with_records().map(|(f, r)| (f.path.as_str(), (f, r))).collect();
        let mut seen = std::collections::HashSet::new();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let block = read_block(r).await?;
            let Some((path, size)) = tarball::parse(&block)? else { break };
            if seen.contains(&path) {
                return Err(PackError::invalid(format!("entry {path:?} appears twice")));
            }
            let Some((entry, record)) = expected.remove(path.as_str()) else {
                return Err(PackError::invalid(format!("entry {path:?} is not in the manifest")));
            };
            if size != entry.size {
                return Err(PackError::invalid(format!(
                    "entry {path:?} is {size} bytes; the manifest says {}",
                    entry.size
                )));
            }
            seen.insert(path.clone());
            if entry.kind == FileKind::Pages {
                expand_pages(r, entry, record, dir).await?;
            } else {
                copy_entry(r, entry, dir, &mut buf).await?;
            }
            skip(r, tarball::padding(size)).await?;
        }
        if let Some(missing) = manifest.files().find(|f| !seen.contains(&f.path)) {
            return Err(PackError::invalid(format!("entry {:?} named by the manifest is missing", missing.path)));
        }
        Ok(manifest)
    }
}

/// Copies exactly `entry.size` bytes from `r` into `dir/<entry.path>` (a
/// new file), checking the digest of what it holds.
async fn copy_entry<R: AsyncRead + Unpin>(
    r: &mut R,
    entry: &FileEntry,
    dir: &Path,
    buf: &mut [u8],
) -> Result<(), PackError> {
    let path = &entry.path;
    let target = dir.join(path);
    if let Some(parent) = target.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    let mut out = tokio::fs::OpenOptions::new().write(true).create_new(true).open(&target).await?;
    let mut h = Sha256::new();
    let mut left = entry.size;
    while left > 0 {
        let n = (left as usize).min(buf.len());
        r.read_exact(&mut buf[..n]).await.map_err(|e| truncated_or(e, &format!("the archive ends inside {path:?}")))?;
        h.update(&buf[..n]);
        out.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    out.flush().await?;
    let got = format!("sha256:{}", hex::encode(h.finalize()));
    if got != entry.sha256 {
        return Err(PackError::invalid(format!("{path:?} has digest {got}; the manifest says {}", entry.sha256)));
    }
    Ok(())
}

/// Reads one file of `record` stored alone as a zstd stream (a remote's
/// blob) into `dir/<entry.path>`: exactly the size the manifest states (not
/// a byte more is decompressed) and the digest it states. Memory pages are
/// expanded into the record's memory as they arrive (`expand_pages`).
pub async fn read_blob<R: AsyncRead + Unpin + Send>(
    input: R,
    entry: &FileEntry,
    record: &SnapshotRecord,
    dir: &Path,
) -> Result<(), PackError> {
    let mut r = ZstdDecoder::new(BufReader::with_capacity(CHUNK, input));
    if entry.kind == FileKind::Pages {
        expand_pages(&mut r, entry, record, dir).await?;
    } else {
        let mut buf = vec![0u8; CHUNK];
        copy_entry(&mut r, entry, dir, &mut buf).await?;
    }
    let mut one = [0u8; 1];
    match r.read(&mut one).await {
        Ok(0) => Ok(()),
        Ok(_) => Err(PackError::invalid(format!("{:?} holds more than the {} bytes stated", entry.path, entry.size))),
        Err(e) => Err(truncated_or(e, "the blob ends early")),
    }
}

/// Expands a memory's pages (`mem.pages`, the diff-layer encoding over
/// zeros) from `r` straight into `<dir>/<snapshot>/mem`, a sparse file of
/// the record's memory size: the index is checked (ascending, inside the
/// memory), each run of pages is written where it belongs, and the whole
/// memory — zeros between the pages included — is hashed in order and must
/// equal the record's memory digest. Writing and hashing run on blocking
/// threads of their own while this task decompresses the next run, and the
/// file is synced before it counts as read.
async fn expand_pages<R: AsyncRead + Unpin>(
    r: &mut R,
    entry: &FileEntry,
    record: &SnapshotRecord,
    dir: &Path,
) -> Result<(), PackError> {
    let (path, mem_bytes, digest) = (&entry.path, record.mem_bytes(), &record.memory_digest);
    let ends = |e| truncated_or(e, &format!("the archive ends inside {path:?}"));
    let mut head = vec![0u8; layer::HEAD as usize];
    r.read_exact(&mut head).await.map_err(ends)?;
    let count = u64::from_le_bytes(head[12..20].try_into().expect("8 bytes"));
    let mem_pages = mem_bytes / PAGE;
    if count > mem_pages || layer::encoded_len(count) != entry.size {
        return Err(PackError::invalid(format!("{path:?} names {count} pages in {} bytes", entry.size)));
    }
    head.resize(head.len() + count as usize * 8, 0);
    r.read_exact(&mut head[layer::HEAD as usize..]).await.map_err(ends)?;
    let (pages, _) = layer::read_index_from(&mut head.as_slice(), entry.size)
        .map_err(|e| PackError::invalid(format!("{path:?}: {e}")))?;
    if pages.last().is_some_and(|&p| p >= mem_pages) {
        return Err(PackError::invalid(format!("{path:?} has a page beyond its {mem_bytes}-byte memory")));
    }
    drop(head);
    let mem = dir.join(path).with_file_name("mem");
    if let Some(parent) = mem.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&mem)?;
    file.set_len(mem_bytes)?;
    // Runs of consecutive pages, in order, go to the writer as they arrive.
    // Writing (a copy into the page cache) and hashing each cost about as
    // much as decompressing: they run on two threads of their own.
    let (to_disk, mut disk_rx) = tokio::sync::mpsc::channel::<(u64, Bytes)>(4);
    let (to_hash, mut hash_rx) = tokio::sync::mpsc::channel::<(u64, Bytes)>(4);
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        // Writeback starts behind the writes, so the closing fsync finds
        // little left to do.
        let mut unsynced = 0u64;
        let mut from = 0u64;
        while let Some((at, data)) = disk_rx.blocking_recv() {
            file.write_all_at(&data, at)?;
            unsynced += data.len() as u64;
            if unsynced >= WRITEBACK_EVERY {
                let end = at + data.len() as u64;
                // SAFETY: an advisory call on an open descriptor; errors
                // surface at the fsync below.
                unsafe {
                    libc::sync_file_range(
                        file.as_raw_fd(),
                        from as i64,
                        (end - from) as i64,
                        libc::SYNC_FILE_RANGE_WRITE,
                    )
                };
                from = end;
                unsynced = 0;
            }
        }
        file.sync_all()
    });
    let hasher = tokio::task::spawn_blocking(move || -> String {
        let zeros = vec![0u8; CHUNK];
        let mut h = Sha256::new();
        // Bytes of the memory hashed so far; the gaps between runs are zeros.
        let mut hashed = 0u64;
        let zeros_until = |h: &mut Sha256, hashed: &mut u64, end: u64| {
            while *hashed < end {
                let n = ((end - *hashed) as usize).min(CHUNK);
                h.update(&zeros[..n]);
                *hashed += n as u64;
            }
        };
        while let Some((at, data)) = hash_rx.blocking_recv() {
            zeros_until(&mut h, &mut hashed, at);
            h.update(&data);
            hashed += data.len() as u64;
        }
        zeros_until(&mut h, &mut hashed, mem_bytes);
        format!("sha256:{}", hex::encode(h.finalize()))
    });
    let mut sent = Ok(());
    for (first, n) in layer::runs(&pages, CHUNK / PAGE as usize) {
        let mut data = vec![0u8; n * PAGE as usize];
        if let Err(e) = r.read_exact(&mut data).await {
            sent = Err(ends(e));
            break;
        }
        let data = Bytes::from(data);
        let at = first * PAGE;
        if to_hash.send((at, data.clone())).await.is_err() || to_disk.send((at, data)).await.is_err() {
            break; // the writer failed; its error says why
        }
    }
    drop((to_disk, to_hash));
    let written = writer.await.map_err(|e| std::io::Error::other(e.to_string()))?;
    let got = hasher.await.map_err(|e| std::io::Error::other(e.to_string()))?;
    sent?;
    written?;
    if &got != digest {
        return Err(PackError::invalid(format!(
            "the memory of snapshot in {path:?} has digest {got}; the manifest says {digest}"
        )));
    }
    Ok(())
}

/// Expands the memory of every snapshot read into `dir` (blocking): a root's
/// pages over zeros, a layer over the memory before it (`outside_parent`:
/// the memory of the snapshot a layer-only archive requires). Flat memory
/// was expanded and checked as it was read. Leaves `snapshots/<tag>/mem`
/// (and `layer`) beside each `state`.
pub fn expand(dir: &Path, manifest: &Manifest, outside_parent: Option<&Path>) -> Result<(), PackError> {
    let mut parent: Option<PathBuf> = outside_parent.map(Path::to_path_buf);
    for e in &manifest.snapshots {
        let r = &e.record;
        let snap = dir.join("snapshots").join(r.tag.as_str());
        let mem = snap.join("mem");
        let body = &e.files[1];
        match body.kind {
            FileKind::Pages => {
                // Expanded and verified as it was read (expand_pages).
                if !mem.is_file() {
                    return Err(PackError::invalid(format!("{:?} was not read", body.path)));
                }
            }
            FileKind::Layer => {
                let Some(p) = &parent else {
                    return Err(PackError::invalid(format!("{:?} has no memory to apply to", body.path)));
                };
                layer::clone_or_copy(p, &mem)?;
                if std::fs::metadata(&mem)?.len() != r.mem_bytes() {
                    return Err(PackError::invalid(format!(
                        "snapshot {:?} has {} MiB but its parent's memory differs in size",
                        r.tag.as_str(),
                        r.mem_mib
                    )));
                }
                layer::apply(&dir.join(&body.path), &mem)
                    .map_err(|e| PackError::invalid(format!("{:?}: {e}", body.path)))?;
            }
            FileKind::State => unreachable!("validated: the second file is memory"),
        }
        // A layer was checked as it arrived (its digest is the snapshot's
        // memory digest) and its parent before it; flat memory was checked
        // as it was expanded.
        parent = Some(mem);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::memory::digest;
    use crate::memory::pack::pages::nonzero_pages;
    use crate::memory::pack::write::{Body, write_body};

    /// A record of a 4 MiB memory with a few pages of data (a sparse file),
    /// and those pages encoded and compressed as a blob.
    async fn memory_blob(dir: &Path) -> (SnapshotRecord, Vec<u8>, FileEntry) {
        let len = 1024 * PAGE;
        let p = dir.join("src-mem");
        let f = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&p).unwrap();
        f.set_len(len).unwrap();
        f.write_all_at(&[7u8; 3 * PAGE as usize], 10 * PAGE).unwrap();
        f.write_all_at(&[9u8; PAGE as usize], 1023 * PAGE).unwrap();
        let pages = nonzero_pages(&f, len).unwrap();
        assert_eq!(pages, vec![10, 11, 12, 1023]);
        let digest = digest::sha256_file(&p).unwrap();
        let body = Body::Pages { file: f, pages };
        let entry = FileEntry {
            path: "snapshots/t/mem.pages".into(),
            kind: FileKind::Pages,
            size: body.size(),
            sha256: digest.clone(),
        };
        let mut blob = vec![];
        write_body(&mut blob, body).await.unwrap();
        let record: SnapshotRecord = serde_json::from_value(serde_json::json!({
            "tag": "t", "status": "ready", "image": "minimal", "vcpus": 1, "mem_mib": 4, "kind": "base",
            "created_at_unix": 0, "backend": "qemu", "accel": "tcg", "memory_digest": digest,
        }))
        .unwrap();
        (record, blob, entry)
    }

    #[tokio::test]
    async fn pages_expand_into_the_memory_they_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let (record, blob, entry) = memory_blob(dir.path()).await;
        let out = dir.path().join("out");
        read_blob(blob.as_slice(), &entry, &record, &out).await.unwrap();
        let mem = out.join("snapshots/t/mem");
        assert_eq!(std::fs::read(&mem).unwrap(), std::fs::read(dir.path().join("src-mem")).unwrap());
        assert!(!out.join("snapshots/t/mem.pages").exists(), "no pages file is left");
    }

    #[tokio::test]
    async fn a_wrong_digest_a_short_blob_or_a_page_outside_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (record, blob, entry) = memory_blob(dir.path()).await;
        let other = SnapshotRecord { memory_digest: format!("sha256:{}", "0".repeat(64)), ..record.clone() };
        let e = read_blob(blob.as_slice(), &entry, &other, &dir.path().join("a")).await.unwrap_err();
        assert!(e.to_string().contains("has digest"), "{e}");
        let e = read_blob(&blob[..blob.len() / 2], &entry, &record, &dir.path().join("b")).await.unwrap_err();
        assert!(matches!(e, PackError::Invalid(_)), "{e}");
        // The same pages in a memory too small to hold page 1023.
        let small = SnapshotRecord { mem_mib: 2, ..record.clone() };
        let e = read_blob(blob.as_slice(), &entry, &small, &dir.path().join("c")).await.unwrap_err();
        assert!(e.to_string().contains("page"), "{e}");
    }
}
