//! envd's HTTP routes: `GET /files` (download), `POST /files` (upload as
//! multipart — each part named `file`, its filename the destination path —
//! or as a raw body, gzip allowed, with the path in the query) and
//! `GET /health`. Uploads go through the agent's staged writes, so a file
//! appears whole or not at all. Errors are JSON `{"code", "message"}`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use forkd_agent_protocol::v1 as pb;
use futures::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::sync::mpsc;
use tonic::{Code, Status};

use super::filesystem::path;
use super::process::Target;
use super::sandboxes;
use crate::api::sandbox::MAX_FILE_BYTES;
use crate::core::Error;
use crate::core::sandboxes::Sandbox;

const CHUNK: usize = 1 << 20;
const FILE_OP: Duration = Duration::from_secs(30);

/// An envd HTTP error as the SDKs read it.
pub fn error(s: &Status) -> Response {
    let status = match s.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::INSUFFICIENT_STORAGE,
        Code::Unavailable => StatusCode::BAD_GATEWAY,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let body = serde_json::json!({ "code": status.as_u16(), "message": s.message() });
    let mut r = Response::new(Body::from(serde_json::to_vec(&body).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// `GET /health`: 204 while the sandbox runs, 502 otherwise.
pub async fn health(t: Target<'_>) -> Response {
    match sandboxes::live(t.services, t.principal, t.sandbox).await {
        Ok(_) => {
            let mut r = Response::new(Body::empty());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        Err(s) => error(&s),
    }
}

fn query(uri: &http::Uri) -> Vec<(String, String)> {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()).into_owned().collect()
}

fn param(q: &[(String, String)], name: &str) -> Option<String> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

/// `GET /files?path=…`: the file's bytes, streamed.
pub async fn download(t: Target<'_>, uri: &http::Uri) -> Result<Response, Status> {
    let q = query(uri);
    let p = path(&param(&q, "path").unwrap_or_default())?;
    let (sb, _) = sandboxes::live(t.services, t.principal, t.sandbox).await?;
    let st = sb.agent.stat(p.clone(), FILE_OP).await.map_err(Error::from)?;
    if st.is_dir {
        return Err(Status::invalid_argument(format!("{p} is a directory")));
    }
    if st.size > MAX_FILE_BYTES {
        return Err(Status::resource_exhausted(format!("{p} is larger than {MAX_FILE_BYTES} bytes")));
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let mut offset = 0u64;
        loop {
            let req = pb::ReadFileRequest { path: p.clone(), offset, length: CHUNK as u32 };
            match sb.agent.read_file(req, FILE_OP).await {
                Ok(d) => {
                    offset += d.data.len() as u64;
                    let eof = d.eof || d.data.is_empty();
                    if !d.data.is_empty() && tx.send(Ok(Bytes::from(d.data))).await.is_err() {
                        return;
                    }
                    if eof || offset > MAX_FILE_BYTES {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            }
        }
    });
    let mut r = Response::new(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    Ok(r)
}

/// One file being written through the agent's staging file.
struct Upload {
    sb: Arc<Sandbox>,
    path: String,
    id: String,
    offset: u64,
    pending: Vec<u8>,
    started: bool,
}

impl Upload {
    fn new(sb: Arc<Sandbox>, path: String) -> Upload {
        Upload { sb, path, id: crate::core::ids::nonce(), offset: 0, pending: vec![], started: false }
    }

    async fn write(&mut self, last: bool) -> Result<(), Status> {
        let data = std::mem::take(&mut self.pending);
        let len = data.len() as u64;
        let req = pb::WriteFileRequest {
            path: self.path.clone(),
            offset: self.offset,
            data,
            first: !self.started,
            last,
            mode: 0o644,
            upload_id: self.id.clone(),
        };
        self.sb.agent.write_file(req, FILE_OP).await.map_err(Error::from)?;
        self.started = true;
        self.offset += len;
        Ok(())
    }

    async fn push(&mut self, chunk: &[u8]) -> Result<(), Status> {
        if self.offset + (self.pending.len() + chunk.len()) as u64 > MAX_FILE_BYTES {
            return Err(Status::resource_exhausted(format!("{} exceeds {MAX_FILE_BYTES} bytes", self.path)));
        }
        self.pending.extend_from_slice(chunk);
        while self.pending.len() >= CHUNK {
            let rest = self.pending.split_off(CHUNK);
            self.write(false).await?;
            self.pending = rest;
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<serde_json::Value, Status> {
        self.write(true).await?;
        let st = self.sb.agent.stat(self.path.clone(), FILE_OP).await.map_err(Error::from)?;
        Ok(serde_json::json!({ "name": st.name, "type": "file", "path": st.path }))
    }
}

/// Copies a body stream into an upload.
async fn pour<S, E>(up: &mut Upload, mut body: S) -> Result<(), Status>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Status::invalid_argument(format!("reading the upload: {e}")))?;
        up.push(&chunk).await?;
    }
    Ok(())
}

/// `POST /files`: writes one file (raw body) or several (multipart) and
/// answers with what was written.
pub async fn upload(t: Target<'_>, uri: &http::Uri, headers: &HeaderMap, body: Body) -> Result<Response, Status> {
    let q = query(uri);
    let path_param = param(&q, "path").filter(|p| !p.is_empty());
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let (sb, _) = sandboxes::live(t.services, t.principal, t.sandbox).await?;
    let mut written = vec![];
    if ct.to_ascii_lowercase().starts_with("multipart/form-data") {
        let boundary = multer::parse_boundary(&ct).map_err(|e| Status::invalid_argument(format!("multipart: {e}")))?;
        let mut form = multer::Multipart::new(body.into_data_stream(), boundary);
        while let Some(mut field) =
            form.next_field().await.map_err(|e| Status::invalid_argument(format!("multipart: {e}")))?
        {
            if field.name() != Some("file") {
                continue;
            }
            // With one file the path is in the query; with several, each
            // part's filename is its destination.
            let dest = match (&path_param, field.file_name()) {
                (Some(p), _) if written.is_empty() => p.clone(),
                (_, Some(f)) if !f.is_empty() => f.to_string(),
                _ => return Err(Status::invalid_argument("a file part names no destination path")),
            };
            let mut up = Upload::new(sb.clone(), path(&dest)?);
            while let Some(chunk) =
                field.chunk().await.map_err(|e| Status::invalid_argument(format!("multipart: {e}")))?
            {
                up.push(&chunk).await?;
            }
            written.push(up.finish().await?);
        }
        if written.is_empty() {
            return Err(Status::invalid_argument("the form has no part named \"file\""));
        }
    } else {
        let dest = path_param.ok_or_else(|| Status::invalid_argument("path is required in the query"))?;
        let mut up = Upload::new(sb.clone(), path(&dest)?);
        let gzip = headers
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
        if gzip {
            let reader = tokio_util::io::StreamReader::new(
                body.into_data_stream().map(|r| r.map_err(|e| std::io::Error::other(e.to_string()))),
            );
            let decoded = async_compression::tokio::bufread::GzipDecoder::new(reader);
            pour(&mut up, tokio_util::io::ReaderStream::new(decoded)).await?;
        } else {
            pour(&mut up, body.into_data_stream()).await?;
        }
        written.push(up.finish().await?);
    }
    let mut r = Response::new(Body::from(serde_json::to_vec(&written).unwrap_or_default()));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(r)
}
