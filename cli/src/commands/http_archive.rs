//! Snapshot archives moved by plain HTTP: `forkd push TAG URL` packs into a
//! temporary file and uploads it with one PUT (what presigned object-store
//! URLs take), `forkd pull URL` downloads into a temporary file and unpacks
//! it. The daemon checks every digest on import, so nothing fetched becomes
//! a snapshot unverified.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forkd_api::names::Tag;
use forkd_api::v1::ExportSnapshotRequest;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use super::transfer::{bar, pack_to, report_unpacked, unpack_file};
use crate::client::Conn;
use crate::exit::{AUTH, CliError, FAILURE, NOT_FOUND, UNREACHABLE};
use crate::output::{emit, emit_json};

/// Most bytes of an error answer's body quoted in a message.
const ERROR_BODY: usize = 2048;

/// A file under the temporary directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(what: &str) -> Self {
        let nonce: u64 = rand::random();
        TempFile(std::env::temp_dir().join(format!("forkd-{what}-{}-{nonce:016x}.tar.zst", std::process::id())))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The URL without its query: presigned URLs carry their credentials there.
fn shown(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

fn client() -> Result<reqwest::Client, CliError> {
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| CliError::new(FAILURE, format!("HTTP client: {e}")))
}

fn transport_error(url: &str, e: reqwest::Error) -> CliError {
    let code = if e.is_connect() || e.is_timeout() { UNREACHABLE } else { FAILURE };
    CliError::new(code, format!("{}: {}", shown(url), crate::exit::error_chain(&e)))
}

/// An unsuccessful answer as an error, quoting the start of its body.
async fn refused(url: &str, what: &str, mut resp: reqwest::Response) -> CliError {
    let status = resp.status();
    let mut body = Vec::new();
    while body.len() < ERROR_BODY {
        match resp.chunk().await {
            Ok(Some(c)) => body.extend_from_slice(&c[..c.len().min(ERROR_BODY - body.len())]),
            _ => break,
        }
    }
    let code = match status.as_u16() {
        404 => NOT_FOUND,
        401 | 403 => AUTH,
        _ => FAILURE,
    };
    let text = String::from_utf8_lossy(&body);
    let text = text.trim();
    let detail = if text.is_empty() { String::new() } else { format!(": {text}") };
    CliError::new(code, format!("{what} {}: HTTP {status}{detail}", shown(url)))
}

pub async fn push(conn: &Conn, req: ExportSnapshotRequest, url: &str, as_json: bool) -> anyhow::Result<u8> {
    let tag = req.tag.clone();
    let started = Instant::now();
    let tmp = TempFile::new("push");
    let packed = pack_to(conn, req, &tmp.0).await?;
    let file =
        tokio::fs::File::open(&tmp.0).await.map_err(|e| CliError::new(FAILURE, format!("{}: {e}", tmp.0.display())))?;
    let progress = bar(format!("uploading {tag}"), Some(packed.bytes));
    let counter = progress.clone();
    let body = tokio_util::io::ReaderStream::new(file).inspect(move |chunk| {
        if let (Some(b), Ok(c)) = (&counter, chunk) {
            b.inc(c.len() as u64);
        }
    });
    // One PUT with its length: object stores refuse chunked uploads.
    let resp = client()?
        .put(url)
        .header(reqwest::header::CONTENT_LENGTH, packed.bytes)
        .header(reqwest::header::CONTENT_TYPE, "application/zstd")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await;
    if let Some(b) = progress {
        b.finish_and_clear();
    }
    let resp = resp.map_err(|e| transport_error(url, e))?;
    if !resp.status().is_success() {
        return Err(refused(url, "upload to", resp).await.into());
    }
    let secs = started.elapsed().as_secs_f64();
    if as_json {
        emit_json(&serde_json::json!({
            "tag": tag,
            "url": shown(url),
            "bytes": packed.bytes,
            "sha256": packed.sha256,
            "http_status": resp.status().as_u16(),
            "seconds": secs,
        }))?;
    } else {
        emit(&format!(
            "pushed {tag} to {} ({:.1} MiB, {}, {:.1}s)\n",
            shown(url),
            packed.bytes as f64 / (1 << 20) as f64,
            packed.sha256,
            secs
        ))?;
    }
    Ok(0)
}

pub async fn pull(conn: &Conn, url: &str, as_tag: Option<&Tag>, force: bool, as_json: bool) -> anyhow::Result<u8> {
    let started = Instant::now();
    let tmp = TempFile::new("pull");
    let len = download(url, &tmp.0).await?;
    let (snap, notes, _) = unpack_file(conn, &tmp.0, as_tag, force).await?;
    report_unpacked(&snap, &notes, shown(url), len, started.elapsed().as_secs_f64(), as_json)
}

/// Fetches `url` into `to`; answers its length.
async fn download(url: &str, to: &Path) -> Result<u64, CliError> {
    let mut resp = client()?.get(url).send().await.map_err(|e| transport_error(url, e))?;
    if !resp.status().is_success() {
        return Err(refused(url, "download of", resp).await);
    }
    let mut out =
        tokio::fs::File::create(to).await.map_err(|e| CliError::new(FAILURE, format!("{}: {e}", to.display())))?;
    // Read before the body: the length reqwest reports shrinks as it is read.
    let announced = resp.content_length();
    let progress = bar(format!("downloading {}", shown(url)), announced);
    let mut bytes = 0u64;
    let result = async {
        while let Some(chunk) = resp.chunk().await.map_err(|e| transport_error(url, e))? {
            out.write_all(&chunk).await.map_err(|e| CliError::new(FAILURE, format!("{}: {e}", to.display())))?;
            bytes += chunk.len() as u64;
            if let Some(b) = &progress {
                b.set_position(bytes);
            }
        }
        out.flush().await.map_err(|e| CliError::new(FAILURE, format!("{}: {e}", to.display())))
    }
    .await;
    if let Some(b) = progress {
        b.finish_and_clear();
    }
    result?;
    if let Some(expected) = announced.filter(|n| *n != bytes) {
        return Err(CliError::new(FAILURE, format!("{}: got {bytes} of {expected} bytes", shown(url))));
    }
    Ok(bytes)
}
