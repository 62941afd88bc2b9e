//! One blob up or down. Up: the file is read on a blocking thread, zstd
//! compresses it, and `object_store`'s buffered writer sends it as one PUT
//! or, past its buffer, as a multipart upload with a few parts in flight
//! (completed only at the end, aborted on failure). Down: the object is
//! streamed through the zstd decoder into a staging file, bounded by the
//! size the manifest states and checked against its digest.

use std::path::Path as FsPath;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use object_store::buffered::BufWriter;
use tokio::io::{AsyncReadExt, AsyncWrite};

use super::{Remote, RemoteError};
use crate::core::store::SnapshotRecord;
use crate::memory::pack::manifest::FileEntry;
use crate::memory::pack::write::Body;
use crate::memory::pack::{self, PackError};

/// Bytes buffered before an upload turns multipart, and the size of each part.
const PART: usize = 8 << 20;
/// Parts of one upload in flight at once.
const PARTS_IN_FLIGHT: usize = 4;

/// The error kind a failed download surfaces as through the decoder.
const TRANSFER_FAILED: std::io::ErrorKind = std::io::ErrorKind::ConnectionAborted;

/// Counts the bytes that pass into the writer it wraps.
struct Counted<W> {
    inner: W,
    n: Arc<AtomicU64>,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Counted<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.n.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Remote {
    /// Uploads `body` as the blob named `sha256`. Returns the bytes sent
    /// (compressed).
    pub async fn put_blob(&self, sha256: &str, body: Body) -> Result<u64, RemoteError> {
        let key = Self::blob_key(sha256)?;
        let writer = BufWriter::with_capacity(self.store.clone(), key, PART).with_max_concurrency(PARTS_IN_FLIGHT);
        let sent = Arc::new(AtomicU64::new(0));
        let mut out = Counted { inner: writer, n: sent.clone() };
        // `write_body` shuts the writer down, which completes the upload.
        match pack::write::write_body(&mut out, body).await {
            Ok(_) => Ok(sent.load(Ordering::Relaxed)),
            Err(e) => {
                // Nothing half-uploaded stays behind (a multipart upload is
                // aborted; a single PUT was never sent).
                let _ = out.inner.abort().await;
                Err(match e {
                    PackError::Io(e) => RemoteError::Io(e),
                    PackError::Invalid(m) => RemoteError::Invalid(m),
                })
            }
        }
    }

    /// Downloads the blob of `entry`, a file of `record`, into
    /// `dir/<entry.path>` (memory pages: expanded into the record's memory).
    pub async fn get_blob(&self, entry: &FileEntry, record: &SnapshotRecord, dir: &FsPath) -> Result<(), RemoteError> {
        let key = Self::blob_key(&entry.sha256)?;
        let got = match self.store.get(&key).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(RemoteError::Invalid(format!(
                    "a manifest naming blob {} ({}), which is missing",
                    entry.sha256, entry.path
                )));
            }
            Err(e) => return Err(e.into()),
        };
        // zstd never makes data much larger: an object far bigger than its
        // contents could be is refused before it is read.
        let bound = entry.size + entry.size / 64 + (1 << 20);
        if got.meta.size > bound {
            return Err(RemoteError::Invalid(format!(
                "blob {} of {} bytes for a file of {}",
                entry.sha256, got.meta.size, entry.size
            )));
        }
        // The store's failures mid-body (after its own retries) are told
        // apart from what the decoder finds wrong with the bytes.
        let stream = got.into_stream().map_err(|e| std::io::Error::new(TRANSFER_FAILED, e));
        let input = tokio_util::io::StreamReader::new(stream).take(bound);
        pack::read::read_blob(input, entry, record, dir).await.map_err(|e| match e {
            PackError::Invalid(m) => RemoteError::Invalid(format!("blob {}: {m}", entry.sha256)),
            PackError::Io(e) if e.kind() == TRANSFER_FAILED => RemoteError::Transfer(format!(
                "blob {}: {}",
                entry.sha256,
                e.into_inner().map(|i| i.to_string()).unwrap_or_default()
            )),
            PackError::Io(e) => RemoteError::Io(e),
        })
    }
}
