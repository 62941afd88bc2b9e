//! Writing an archive: a blocking thread reads the files (already open, so a
//! snapshot deleted meanwhile cannot change what is sent) and emits tar
//! blocks into a bounded channel; the async side compresses them with zstd
//! and writes them out. A slow reader of the output slows the file reads;
//! nothing grows.

use std::fs::File;
use std::os::unix::fs::FileExt;

use async_compression::Level;
use async_compression::tokio::write::ZstdEncoder;
use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::PackError;
use super::manifest::MANIFEST_PATH;
use super::tarball;
use crate::memory::dirty::PAGE;
use crate::memory::layer;

/// Bytes per chunk handed from the reader thread to the compressor.
const CHUNK: usize = 1 << 20;
/// Chunks in flight between them.
const DEPTH: usize = 4;
/// zstd level: the `zstd` command's default.
pub const ZSTD_LEVEL: i32 = 3;

/// What one archive entry holds.
pub enum Body {
    /// A whole file of `len` bytes.
    File { file: File, len: u64 },
    /// The listed pages of a flat memory file, in the diff-layer encoding.
    Pages { file: File, pages: Vec<u64> },
}

impl Body {
    pub fn size(&self) -> u64 {
        match self {
            Body::File { len, .. } => *len,
            Body::Pages { pages, .. } => layer::encoded_len(pages.len() as u64),
        }
    }
}

pub struct Source {
    pub path: String,
    pub body: Body,
}

/// Writes the archive: `manifest` (its JSON), then `sources` in order.
/// Returns the uncompressed tar size.
pub async fn write<W: AsyncWrite + Unpin + Send>(
    out: W,
    manifest: Vec<u8>,
    sources: Vec<Source>,
) -> Result<u64, PackError> {
    compress(out, move |send| produce(&manifest, sources, send)).await
}

/// Writes one file's bytes alone, zstd-compressed: a blob of a remote.
/// Returns the uncompressed size.
pub async fn write_body<W: AsyncWrite + Unpin + Send>(out: W, body: Body) -> Result<u64, PackError> {
    compress(out, move |send| emit_body(&body, send).map(|_| ())).await
}

/// Hands one chunk to the compressor.
type Emit<'a> = &'a dyn Fn(Vec<u8>) -> std::io::Result<()>;

/// Runs `produce` on a blocking thread, compressing what it sends into
/// `out`. Returns the bytes it sent.
async fn compress<W, P>(out: W, produce: P) -> Result<u64, PackError>
where
    W: AsyncWrite + Unpin + Send,
    P: FnOnce(Emit<'_>) -> std::io::Result<()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(DEPTH);
    let reader = tokio::task::spawn_blocking(move || {
        let send = |b: Vec<u8>| {
            tx.blocking_send(Ok(Bytes::from(b)))
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the archive's reader went away"))
        };
        if let Err(e) = produce(&send) {
            let _ = tx.blocking_send(Err(e));
        }
    });
    let mut enc = ZstdEncoder::with_quality(out, Level::Precise(ZSTD_LEVEL));
    let mut total = 0u64;
    let result: Result<(), PackError> = async {
        while let Some(chunk) = rx.recv().await {
            let chunk = chunk?;
            enc.write_all(&chunk).await?;
            total += chunk.len() as u64;
        }
        enc.shutdown().await?;
        Ok(())
    }
    .await;
    // Closing the channel stops the reader if we stopped first.
    drop(rx);
    let _ = reader.await;
    result.map(|_| total)
}

/// Emits every block of the tar.
fn produce(manifest: &[u8], sources: Vec<Source>, send: Emit<'_>) -> std::io::Result<()> {
    let head = |path: &str, size: u64| {
        tarball::header(path, size).map(|h| h.to_vec()).map_err(|e| std::io::Error::other(e.to_string()))
    };
    let mut first = head(MANIFEST_PATH, manifest.len() as u64)?;
    first.extend_from_slice(manifest);
    first.resize(first.len() + tarball::padding(manifest.len() as u64), 0);
    send(first)?;
    for s in sources {
        let size = s.body.size();
        send(head(&s.path, size)?)?;
        let sent = emit_body(&s.body, send)?;
        debug_assert_eq!(sent, size);
        let pad = tarball::padding(size);
        if pad > 0 {
            send(vec![0u8; pad])?;
        }
    }
    send(tarball::END.to_vec())
}

/// Emits the bytes of one body; returns how many.
fn emit_body(body: &Body, send: Emit<'_>) -> std::io::Result<u64> {
    let mut sent = 0u64;
    match body {
        Body::File { file, len } => {
            let mut off = 0u64;
            while off < *len {
                let want = ((*len - off) as usize).min(CHUNK);
                let mut buf = vec![0u8; want];
                file.read_exact_at(&mut buf, off)?;
                off += want as u64;
                sent += want as u64;
                send(buf)?;
            }
        }
        Body::Pages { file, pages } => {
            let head = layer::encode_head(pages);
            sent += head.len() as u64;
            send(head)?;
            // Runs of consecutive pages are read together.
            let mut buf = Vec::with_capacity(CHUNK);
            for (first, n) in layer::runs(pages, CHUNK / PAGE as usize) {
                let at = buf.len();
                buf.resize(at + n * PAGE as usize, 0);
                file.read_exact_at(&mut buf[at..], first * PAGE)?;
                if buf.len() >= CHUNK {
                    sent += buf.len() as u64;
                    send(std::mem::replace(&mut buf, Vec::with_capacity(CHUNK)))?;
                }
            }
            if !buf.is_empty() {
                sent += buf.len() as u64;
                send(buf)?;
            }
        }
    }
    Ok(sent)
}
