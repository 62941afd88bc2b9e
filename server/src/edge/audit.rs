//! The audit log and request metrics: one JSON line per request, written when
//! the response body ends (so streaming calls are logged with their final
//! gRPC status and full latency).

use std::io::Write;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http::header;
use http_body::Frame;

use super::metrics::Metrics;
use super::rest::transcode::RpcName;

/// Where audit lines go: a file opened for appending, reopened at the same
/// path by [`AuditLog::reopen`] (on SIGHUP) so logrotate can rename it away.
/// Each line is written whole under one lock, and the swap takes the same
/// lock, so every line lands once, in the old file or the new one.
pub struct AuditLog {
    path: std::path::PathBuf,
    out: Mutex<Box<dyn Write + Send>>,
}

fn open_append(path: &std::path::Path) -> std::io::Result<Box<dyn Write + Send>> {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    Ok(Box::new(std::io::LineWriter::new(f)))
}

impl AuditLog {
    pub fn open(path: &std::path::Path) -> std::io::Result<Self> {
        Ok(Self { path: path.to_path_buf(), out: Mutex::new(open_append(path)?) })
    }

    /// Closes the file and opens the path again (creating it), after a
    /// rotation renamed the old one. On failure the old file stays in use.
    pub fn reopen(&self) -> std::io::Result<()> {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = out.flush();
        *out = open_append(&self.path)?;
        Ok(())
    }

    fn write(&self, line: &serde_json::Value) {
        let mut s = serde_json::to_vec(line).unwrap_or_default();
        s.push(b'\n');
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = out.write_all(&s);
    }
}

/// The peer of a connection, attached to each request by the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

#[derive(Clone)]
pub struct Observe {
    pub audit: Option<Arc<AuditLog>>,
    pub metrics: Arc<Metrics>,
}

struct Record {
    observe: Observe,
    started: Instant,
    method: String,
    path: String,
    rpc: String,
    grpc: bool,
    http_status: u16,
    grpc_status: Option<i32>,
    user_agent: String,
    peer: String,
}

impl Drop for Record {
    fn drop(&mut self) {
        let latency_us = self.started.elapsed().as_micros() as u64;
        let code = if self.grpc { self.grpc_status.unwrap_or(0) } else { -1 };
        self.observe.metrics.record_request(
            &self.rpc,
            if self.grpc { "grpc" } else { "rest" },
            if self.grpc { code.to_string() } else { self.http_status.to_string() },
            latency_us as f64 / 1e6,
        );
        if let Some(a) = &self.observe.audit {
            let ts = time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            a.write(&serde_json::json!({
                "ts": ts,
                "protocol": if self.grpc { "grpc" } else { "rest" },
                "method": self.method,
                "path": self.path,
                "rpc": self.rpc,
                "status": if self.grpc { code as i64 } else { self.http_status as i64 },
                "http_status": self.http_status,
                "latency_us": latency_us,
                "user_agent": self.user_agent,
                "peer": self.peer,
            }));
        }
    }
}

/// Middleware: times the request and logs it once its body is done.
pub async fn observe(State(o): State<Observe>, req: Request, next: Next) -> Response {
    let grpc = super::auth::is_grpc(&req);
    let path = req.uri().path().to_string();
    let mut rec = Record {
        observe: o,
        started: Instant::now(),
        method: req.method().to_string(),
        rpc: if grpc { path.trim_start_matches('/').replace('/', ".") } else { String::new() },
        path,
        grpc,
        http_status: 0,
        grpc_status: None,
        user_agent: req.headers().get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("").to_string(),
        peer: req.extensions().get::<Peer>().map(|p| p.0.to_string()).unwrap_or_default(),
    };
    let resp = next.run(req).await;
    rec.http_status = resp.status().as_u16();
    if let Some(r) = resp.extensions().get::<RpcName>() {
        rec.rpc = r.0.clone();
    }
    if rec.rpc.is_empty() {
        rec.rpc = rec.path.clone();
    }
    if let Some(s) = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()?.parse().ok()) {
        rec.grpc_status = Some(s);
    }
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, Body::new(ObservedBody { inner: body, record: rec }))
}

/// Passes the body through, noting the gRPC status from the trailers; the
/// record is written when the body is dropped.
struct ObservedBody {
    inner: Body,
    record: Record,
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(t) = frame.trailers_ref()
            && let Some(s) = t.get("grpc-status").and_then(|v| v.to_str().ok()?.parse().ok())
        {
            this.record.grpc_status = Some(s);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopen_after_a_rename_loses_and_repeats_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        for i in 0..3 {
            log.write(&serde_json::json!({ "n": i }));
        }
        let rotated = dir.path().join("audit.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        // Until the reopen, lines still go to the renamed file.
        log.write(&serde_json::json!({ "n": 3 }));
        log.reopen().unwrap();
        for i in 4..6 {
            log.write(&serde_json::json!({ "n": i }));
        }
        let read = |p: &std::path::Path| -> Vec<i64> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["n"].as_i64().unwrap())
                .collect()
        };
        assert_eq!(read(&rotated), vec![0, 1, 2, 3]);
        assert_eq!(read(&path), vec![4, 5]);
    }
}
