//! E2B compatibility: E2B's SDKs (`e2b`, `e2b-code-interpreter`, the npm
//! `e2b`) drive forkd unchanged, configured with `E2B_API_URL` (forkd's
//! `/e2b`), `E2B_SANDBOX_URL` (forkd's address) and `E2B_API_KEY` (a forkd
//! token). The control API is E2B's REST shape under `/e2b` (control.rs);
//! sandbox traffic — E2B's in-sandbox daemon protocol, which the SDKs send
//! to one URL naming the sandbox in the `E2b-Sandbox-Id` header — is
//! recognised by that header on any path and served here over forkd's own
//! guest agent (process.rs, filesystem.rs, files.rs).

pub mod connect;
pub mod control;
pub mod files;
pub mod filesystem;
pub mod interpreter;
pub mod metrics;
pub mod process;
pub mod sandboxes;
pub mod watchers;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use base64::Engine;
use http::Method;
use tonic::Status;

use crate::api::Services;
use crate::core::tenants::Principal;

/// The header that marks sandbox traffic and names the sandbox.
pub const SANDBOX_ID: &str = "e2b-sandbox-id";
/// The header naming the port inside the sandbox the request is for.
pub const SANDBOX_PORT: &str = "e2b-sandbox-port";
/// envd's port: the process and filesystem services, files, health.
pub const ENVD_PORT: u16 = 49983;

/// State of the E2B layer.
pub struct E2b {
    pub services: Services,
    pub watchers: Arc<watchers::Watchers>,
    pub contexts: interpreter::Contexts,
}

impl E2b {
    pub fn new(services: Services) -> Arc<E2b> {
        Arc::new(E2b { services, watchers: Default::default(), contexts: Default::default() })
    }
}

/// Whether a request is sandbox traffic from an E2B SDK.
pub fn is_sandbox_traffic(req: &Request) -> bool {
    req.headers().contains_key(SANDBOX_ID)
}

/// The user an envd call runs as: `Authorization: Basic base64(user:)`.
fn basic_user(req: &Request) -> Result<String, Status> {
    let Some(v) = req.headers().get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return Ok(String::new());
    };
    let Some((scheme, rest)) = v.split_once(' ') else { return Ok(String::new()) };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(String::new());
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .map_err(|_| Status::invalid_argument("authorization: bad basic credentials"))?;
    let text = String::from_utf8(raw).map_err(|_| Status::invalid_argument("authorization: user is not UTF-8"))?;
    let user = text.split(':').next().unwrap_or("").to_string();
    let ok = user.len() <= 64 && user.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        return Err(Status::invalid_argument(format!("user {user:?} is not a valid user name")));
    }
    Ok(user)
}

/// Serves one request of sandbox traffic.
pub async fn handle(e: Arc<E2b>, req: Request) -> Response {
    let principal = req.extensions().get::<Arc<Principal>>().cloned().unwrap_or_else(|| Arc::new(Principal::admin()));
    let sandbox = req.headers().get(SANDBOX_ID).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let port = match req.headers().get(SANDBOX_PORT).and_then(|v| v.to_str().ok()) {
        None => ENVD_PORT,
        Some(p) => p.trim().parse::<u16>().unwrap_or(0),
    };
    let path = req.uri().path().to_string();
    let rpc = path
        .rsplit_once("/process.Process/")
        .map(|(_, m)| ("process", m.to_string()))
        .or_else(|| path.rsplit_once("/filesystem.Filesystem/").map(|(_, m)| ("filesystem", m.to_string())));
    if port == interpreter::PORT {
        let t =
            process::Target { services: &e.services, principal: &principal, sandbox: &sandbox, user: String::new() };
        let method = req.method().clone();
        let body = match axum::body::to_bytes(req.into_body(), (2 << 20) + 4096).await {
            Ok(b) => b,
            Err(_) => return files::error(&Status::invalid_argument("request body too large")),
        };
        return interpreter::handle(t, &e.contexts, &method, &path, body).await.unwrap_or_else(|s| files::error(&s));
    }
    if port != ENVD_PORT {
        let s = Status::unavailable(format!(
            "port {port} is not open: forkd serves E2B's sandbox daemon (port {ENVD_PORT}) and code \
             interpreter (port {}) only",
            interpreter::PORT
        ));
        return if rpc.is_some() { connect::error(None, &s) } else { files::error(&s) };
    }
    let user = match basic_user(&req) {
        Ok(u) => u,
        Err(s) => return if rpc.is_some() { connect::error(None, &s) } else { files::error(&s) },
    };
    let t = process::Target { services: &e.services, principal: &principal, sandbox: &sandbox, user };
    if let Some((service, method)) = rpc {
        let call = match connect::Call::from_headers(req.headers()) {
            Ok(c) => c,
            Err(s) => return connect::error(None, &s),
        };
        if req.method() != Method::POST {
            return connect::error(Some(&call), &Status::unimplemented("Connect calls are POSTs"));
        }
        if service == "process" && method == "StreamInput" {
            return process::stream_input(t, call, req.into_body()).await;
        }
        let body = match axum::body::to_bytes(req.into_body(), connect::MAX_MESSAGE + 5).await {
            Ok(b) => b,
            Err(_) => {
                let s = Status::resource_exhausted(format!("request exceeds {} bytes", connect::MAX_MESSAGE));
                return connect::error(Some(&call), &s);
            }
        };
        let r = match service {
            "process" => process::call(t, &method, call, &body).await,
            _ => filesystem::call(t, &e.watchers, &method, call, &body).await,
        };
        return r.unwrap_or_else(|s| connect::error(Some(&call), &s));
    }
    let method = req.method().clone();
    let r = if path.ends_with("/health") && method == Method::GET {
        return files::health(t).await;
    } else if path.ends_with("/files") && method == Method::GET {
        files::download(t, req.uri()).await
    } else if path.ends_with("/files") && method == Method::POST {
        let (parts, body): (_, Body) = req.into_parts();
        files::upload(t, &parts.uri, &parts.headers, body).await
    } else {
        Err(Status::not_found(format!("{method} {path} is not part of E2B's sandbox API")))
    };
    r.unwrap_or_else(|s| files::error(&s))
}
