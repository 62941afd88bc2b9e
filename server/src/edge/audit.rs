//! The audit log and request metrics: one JSON line per request, written when
//! the response body ends (so streaming calls are logged with their final
//! gRPC status and full latency). What a client controls is bounded: paths
//! and user agents are clipped, metric labels come only from known RPCs,
//! and lines for refused (unauthenticated) requests are rate-limited, the
//! suppressed ones counted in the next line written.

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
    refused: Mutex<RefusedBudget>,
}

/// Most audit lines per second for refused requests, and the burst allowed.
const REFUSED_LINES_PER_SEC: f64 = 10.0;
const REFUSED_LINES_BURST: f64 = 100.0;
/// Longest path or user agent kept in an audit line.
const MAX_LOGGED_TEXT: usize = 256;

/// A token bucket for lines about refused requests.
struct RefusedBudget {
    tokens: f64,
    at: Instant,
    suppressed: u64,
}

impl RefusedBudget {
    fn new() -> Self {
        RefusedBudget { tokens: REFUSED_LINES_BURST, at: Instant::now(), suppressed: 0 }
    }

    /// Whether a line may be written now.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * REFUSED_LINES_PER_SEC;
        self.tokens = (self.tokens + refill).min(REFUSED_LINES_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

fn clip(s: &str) -> String {
    if s.len() <= MAX_LOGGED_TEXT {
        return s.to_string();
    }
    let mut end = MAX_LOGGED_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn open_append(path: &std::path::Path) -> std::io::Result<Box<dyn Write + Send>> {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    Ok(Box::new(std::io::LineWriter::new(f)))
}

impl AuditLog {
    pub fn open(path: &std::path::Path) -> std::io::Result<Self> {
        Ok(Self {
            path: path.to_path_buf(),
            out: Mutex::new(open_append(path)?),
            refused: Mutex::new(RefusedBudget::new()),
        })
    }

    /// Closes the file and opens the path again (creating it), after a
    /// rotation renamed the old one. On failure the old file stays in use.
    pub fn reopen(&self) -> std::io::Result<()> {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = out.flush();
        *out = open_append(&self.path)?;
        Ok(())
    }

    /// Writes the line of a request; `refused` lines share a rate limit.
    fn write_request(&self, mut line: serde_json::Value, refused: bool) {
        let suppressed = {
            let mut b = self.refused.lock().unwrap_or_else(|p| p.into_inner());
            if refused && !b.take() {
                return;
            }
            std::mem::take(&mut b.suppressed)
        };
        if suppressed > 0 {
            line["suppressed_refused_lines"] = suppressed.into();
        }
        self.write(&line);
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
    /// Whether `rpc` names an RPC or endpoint of ours (a metric label).
    known: bool,
    grpc: bool,
    http_status: u16,
    grpc_status: Option<i32>,
    user_agent: String,
    peer: String,
    /// Who made the request ("" when no token was accepted).
    principal: String,
    /// What it named (`sandbox sb-…`, `snapshot py`, …), as the services noted it.
    resource: Arc<std::sync::Mutex<String>>,
}

tokio::task_local! {
    /// The resource the request being served acts on, noted by the services.
    static ACTED_ON: Arc<std::sync::Mutex<String>>;
}

/// Notes, for the audit line of the request being served, the resource it
/// acts on. Outside a request (tests, background work) it does nothing.
pub fn acted_on(what: impl Into<String>) {
    let what = what.into();
    let _ = ACTED_ON.try_with(|r| {
        let mut r = r.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_empty() {
            *r = clip(&what);
        }
    });
}

impl Drop for Record {
    fn drop(&mut self) {
        let latency_us = self.started.elapsed().as_micros() as u64;
        let code = if self.grpc { self.grpc_status.unwrap_or(0) } else { -1 };
        self.observe.metrics.record_request(
            if self.known { &self.rpc } else { "unknown" },
            if self.grpc { "grpc" } else { "rest" },
            if self.grpc { code.to_string() } else { self.http_status.to_string() },
            latency_us as f64 / 1e6,
        );
        if let Some(a) = &self.observe.audit {
            let ts = time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            let refused = matches!(self.http_status, 401 | 403 | 421) || matches!(code, 7 | 16);
            a.write_request(
                serde_json::json!({
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
                "principal": self.principal,
                "resource": *self.resource.lock().unwrap_or_else(|p| p.into_inner()),
                }),
                refused,
            );
        }
    }
}

/// Middleware: times the request and logs it once its body is done.
pub async fn observe(State(o): State<Observe>, req: Request, next: Next) -> Response {
    let grpc = super::auth::is_grpc(&req);
    let path = clip(req.uri().path());
    let mut rec = Record {
        observe: o,
        started: Instant::now(),
        method: req.method().to_string(),
        rpc: if grpc { path.trim_start_matches('/').replace('/', ".") } else { String::new() },
        path,
        known: false,
        grpc,
        http_status: 0,
        grpc_status: None,
        user_agent: clip(req.headers().get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("")),
        peer: req.extensions().get::<Peer>().map(|p| p.0.to_string()).unwrap_or_default(),
        principal: String::new(),
        resource: Default::default(),
    };
    let resp = ACTED_ON.scope(rec.resource.clone(), next.run(req)).await;
    rec.http_status = resp.status().as_u16();
    if let Some(p) = resp.extensions().get::<super::auth::AuditPrincipal>() {
        rec.principal = p.0.clone();
    }
    if let Some(r) = resp.extensions().get::<RpcName>() {
        rec.rpc = r.0.clone();
        rec.known = true;
    } else if rec.grpc {
        rec.known = rec.observe.metrics.is_known_grpc(&rec.rpc);
    }
    if rec.rpc.is_empty() {
        rec.rpc = rec.path.clone();
        rec.known = matches!(rec.path.as_str(), "/healthz" | "/metrics");
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

    #[test]
    fn refused_requests_cannot_flood_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        for i in 0..10_000 {
            log.write_request(serde_json::json!({ "n": i }), true);
        }
        log.write_request(serde_json::json!({ "n": "ok" }), false);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert!(lines.len() <= REFUSED_LINES_BURST as usize + 20, "{} lines", lines.len());
        let last = lines.last().unwrap();
        assert_eq!(last["n"], "ok", "accepted requests are always logged");
        let suppressed: u64 = lines.iter().filter_map(|l| l["suppressed_refused_lines"].as_u64()).sum();
        assert_eq!(suppressed as usize + lines.len(), 10_001, "every suppressed line is counted");
    }

    #[test]
    fn long_client_text_is_clipped() {
        assert_eq!(clip("abc"), "abc");
        let long = "é".repeat(400);
        let c = clip(&long);
        assert!(c.len() <= MAX_LOGGED_TEXT + 3 && c.ends_with('…'));
    }
}
