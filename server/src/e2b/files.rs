//! envd's HTTP routes: `GET /files` (download), `POST /files` (upload as
//! multipart — each part named `file`, its filename the destination path —
//! or as a raw body, gzip allowed, with the path in the query) and
//! `GET /health`. Uploads go through the agent's staged writes, so a file
//! appears whole or not at all. Errors are JSON `{"code", "message"}`.

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use forkd_agent_protocol::v1 as pb;
use futures::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tonic::{Code, Status};

use super::filesystem::path;
use super::process::Target;
use super::sandboxes;
use crate::api::guest_files::{self, FILE_OP_TIMEOUT, MAX_FILE_BYTES, Upload};
use crate::core::Error;

/// What the SDKs expect for each file written.
fn entry(st: pb::FileStat) -> serde_json::Value {
    serde_json::json!({ "name": st.name, "type": "file", "path": st.path })
}

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
    super::control::error_response(status, s.message())
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
    let st = sb.agent.stat(p.clone(), FILE_OP_TIMEOUT).await.map_err(Error::from)?;
    if st.is_dir {
        return Err(Status::invalid_argument(format!("{p} is a directory")));
    }
    if st.size > MAX_FILE_BYTES {
        return Err(Status::resource_exhausted(format!("{p} is larger than {MAX_FILE_BYTES} bytes")));
    }
    let chunks = guest_files::read_chunks(sb, p);
    let body = tokio_stream::wrappers::ReceiverStream::new(chunks)
        .map(|c| c.map(Bytes::from).map_err(|e| std::io::Error::other(e.to_string())));
    let mut r = Response::new(Body::from_stream(body));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    Ok(r)
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
            let mut up = Upload::new(sb.clone(), path(&dest)?, 0o644);
            while let Some(chunk) =
                field.chunk().await.map_err(|e| Status::invalid_argument(format!("multipart: {e}")))?
            {
                up.push(&chunk).await?;
            }
            written.push(entry(up.finish().await?));
        }
        if written.is_empty() {
            return Err(Status::invalid_argument("the form has no part named \"file\""));
        }
    } else {
        let dest = path_param.ok_or_else(|| Status::invalid_argument("path is required in the query"))?;
        let mut up = Upload::new(sb.clone(), path(&dest)?, 0o644);
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
        written.push(entry(up.finish().await?));
    }
    let mut r = Response::new(Body::from(serde_json::to_vec(&written).unwrap_or_default()));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(r)
}
