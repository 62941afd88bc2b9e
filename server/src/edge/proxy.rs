//! The port proxy: HTTP and WebSocket requests to a server inside a
//! sandbox, carried over its agent channel (agent::ports), so it works
//! whether or not the sandbox has a network device.
//!
//! Three ways in:
//! - `/v1/sandboxes/{id}/ports/{port}/{path}`: authenticated and
//!   tenant-scoped like every route; the daemon's credentials are not
//!   passed on to the guest.
//! - `/v1/shared/{token}/{path}`: a port shared with SharePort; the token
//!   is the credential, so no other is needed (or removed).
//! - `Host: {port}-{id}.{domain}` with `--proxy-domain`: the whole path is
//!   the guest's (for apps that need to live at `/`); authenticated.
//!
//! Each request gets its own connection to the guest port (HTTP/1.1), and
//! an upgrade (WebSocket) answered 101 joins the two connections.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use hyper_util::rt::TokioIo;
use tonic::Code;

use super::rest::codes;
use crate::api::Services;
use crate::core::ports::{GuestPort, OpenError};
use crate::core::tenants::Principal;

/// Where a proxied request goes.
#[derive(Debug, PartialEq)]
pub enum Target {
    /// By sandbox id and port; `prefix` is what the guest does not see.
    Sandbox { id: String, port: String, prefix: String, rest: String },
    /// By share token.
    Shared { token: String, prefix: String, rest: String },
}

/// The sandbox route's prefix.
const SANDBOXES: &str = "/v1/sandboxes/";
/// The share route's prefix.
pub const SHARED: &str = "/v1/shared/";

/// Headers that hold the daemon's credentials (never passed to a guest).
const CREDENTIALS: &[&str] = &["authorization", "x-api-key", "x-access-token", "e2b-traffic-access-token"];
/// Hop-by-hop headers (RFC 9110 §7.6.1), not forwarded either way.
const HOP_BY_HOP: &[&str] =
    &["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"];

/// The proxy target a request names, if it is proxy traffic. `domain`:
/// the `--proxy-domain`, if any.
pub fn target(req: &Request, domain: Option<&str>) -> Option<Target> {
    let path = req.uri().path();
    if let Some(domain) = domain
        && let Some(host) = host_of(req)
        && let Some(label) = host.strip_suffix(domain).and_then(|h| h.strip_suffix('.'))
        && let Some((port, id)) = label.split_once('-')
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
    {
        return Some(Target::Sandbox {
            id: id.to_string(),
            port: port.to_string(),
            prefix: String::new(),
            rest: path_and_query(req, path),
        });
    }
    if let Some(after) = path.strip_prefix(SHARED) {
        let (token, rest) = after.split_once('/').map(|(t, r)| (t, format!("/{r}"))).unwrap_or((after, String::new()));
        return Some(Target::Shared {
            token: token.to_string(),
            prefix: format!("{SHARED}{token}"),
            rest: path_and_query(req, &rest),
        });
    }
    let after = path.strip_prefix(SANDBOXES)?;
    let (id, after) = after.split_once('/')?;
    let after = after.strip_prefix("ports/")?;
    let (port, rest) = after.split_once('/').map(|(p, r)| (p, format!("/{r}"))).unwrap_or((after, String::new()));
    Some(Target::Sandbox {
        id: id.to_string(),
        port: port.to_string(),
        prefix: format!("{SANDBOXES}{id}/ports/{port}"),
        rest: path_and_query(req, &rest),
    })
}

/// A `--proxy-domain` value, lower-cased, checked as a DNS name.
pub fn check_domain(d: &str) -> Result<String, String> {
    let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if ok { Ok(d) } else { Err(format!("{d:?} is not a DNS name (e.g. preview.example.com)")) }
}

fn host_of(req: &Request) -> Option<String> {
    let h = req.uri().host().map(str::to_string).or_else(|| {
        let v = req.headers().get(header::HOST)?.to_str().ok()?;
        Some(v.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())).map_or(v, |(h, _)| h).into())
    })?;
    Some(h.trim_end_matches('.').to_ascii_lowercase())
}

/// `rest` with the request's query, "" when `rest` is empty (the bare prefix).
fn path_and_query(req: &Request, rest: &str) -> String {
    if rest.is_empty() {
        return String::new();
    }
    match req.uri().query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    }
}

fn error(status: StatusCode, code: Code, msg: impl AsRef<str>) -> Response {
    (status, axum::Json(codes::error_body(code, msg.as_ref()))).into_response()
}

/// Serves one proxied request.
pub async fn handle(services: Services, target: Target, req: Request) -> Response {
    let (id, port, prefix, rest, strip_credentials) = match target {
        Target::Sandbox { id, port, prefix, rest } => {
            let principal =
                req.extensions().get::<Arc<Principal>>().cloned().unwrap_or_else(|| Arc::new(Principal::admin()));
            let id = match services.own_sandbox(&principal, &id).await {
                Ok(id) => id,
                Err(s) => return codes::status_response(&s),
            };
            let port = match GuestPort::parse("port", &port) {
                Ok(p) => p,
                Err(e) => return codes::status_response(&e.into()),
            };
            (id, port, prefix, rest, true)
        }
        Target::Shared { token, prefix, rest } => match services.rt.port_shares.lookup(&token) {
            Some(share) => (share.sandbox, share.port, prefix, rest, false),
            None => return error(StatusCode::NOT_FOUND, Code::NotFound, "no such shared port (the link was removed?)"),
        },
    };
    // The bare prefix: send browsers to the directory form, so relative
    // links in the guest's pages resolve beneath it.
    if rest.is_empty() && !prefix.is_empty() {
        let mut r = StatusCode::PERMANENT_REDIRECT.into_response();
        let to = match req.uri().query() {
            Some(q) => format!("{prefix}/?{q}"),
            None => format!("{prefix}/"),
        };
        if let Ok(v) = HeaderValue::from_str(&to) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        return r;
    }
    let rest = if rest.is_empty() { "/".to_string() } else { rest };
    let io = match services.rt.open_port(&id, port).await {
        Ok(io) => io,
        Err(OpenError::NotListening(m)) => {
            return error(StatusCode::BAD_GATEWAY, Code::Unavailable, format!("sandbox {id}: {m}"));
        }
        Err(OpenError::Other(e)) => return codes::status_response(&e.into()),
    };
    forward(io, port, &prefix, &rest, strip_credentials, req).await
}

/// Sends the request over `io` and streams the answer back.
async fn forward(
    io: tokio::io::DuplexStream,
    port: GuestPort,
    prefix: &str,
    rest: &str,
    strip_credentials: bool,
    mut req: Request,
) -> Response {
    let (mut sender, conn) = match hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(io)).await {
        Ok(x) => x,
        Err(e) => return error(StatusCode::BAD_GATEWAY, Code::Unavailable, format!("port {}: {e}", port.get())),
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let upgrade = wants_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let original_host = parts.headers.get(header::HOST).cloned();
    let scheme = if parts.uri.scheme_str() == Some("https") { "https" } else { "http" };
    parts.uri = match rest.parse() {
        Ok(u) => u,
        Err(_) => return error(StatusCode::BAD_REQUEST, Code::InvalidArgument, "bad request path"),
    };
    parts.version = http::Version::HTTP_11;
    clean_headers(&mut parts.headers, upgrade);
    if strip_credentials {
        for h in CREDENTIALS {
            parts.headers.remove(*h);
        }
    }
    // Dev servers commonly accept only local names.
    if let Ok(v) = HeaderValue::from_str(&format!("localhost:{}", port.get())) {
        parts.headers.insert(header::HOST, v);
    }
    if let Some(h) = original_host {
        parts.headers.insert(HeaderName::from_static("x-forwarded-host"), h);
    }
    parts.headers.insert(HeaderName::from_static("x-forwarded-proto"), HeaderValue::from_static(scheme));
    if !prefix.is_empty()
        && let Ok(v) = HeaderValue::from_str(prefix)
    {
        parts.headers.insert(HeaderName::from_static("x-forwarded-prefix"), v);
    }
    tracing::debug!(port = port.get(), upgrade, "proxying");
    let mut resp = match sender.send_request(http::Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => {
            return error(StatusCode::BAD_GATEWAY, Code::Unavailable, format!("port {}: no answer: {e}", port.get()));
        }
    };
    tracing::debug!(status = %resp.status(), "proxied answer");
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return error(StatusCode::BAD_GATEWAY, Code::Unavailable, "the guest switched protocols unasked");
        };
        let guest_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(c), Ok(g)) = (client_upgrade.await, guest_upgrade.await) {
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(g)).await;
            }
        });
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    let (mut parts, body) = resp.into_parts();
    clean_headers(&mut parts.headers, false);
    Response::from_parts(parts, Body::new(body))
}

fn wants_upgrade(h: &HeaderMap) -> bool {
    h.get(header::UPGRADE).is_some()
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// Removes hop-by-hop headers (and those `Connection` names); an upgrade
/// keeps `Connection: upgrade` and `Upgrade`.
fn clean_headers(h: &mut HeaderMap, upgrade: bool) {
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .filter(|t| !t.is_empty() && t != "upgrade")
        .collect();
    let upgrade_to = h.get(header::UPGRADE).cloned();
    for n in named {
        h.remove(n.as_str());
    }
    for n in HOP_BY_HOP {
        h.remove(*n);
    }
    if upgrade && let Some(u) = upgrade_to {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, u);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, host: &str) -> Request {
        http::Request::builder().uri(uri).header("host", host).body(Body::empty()).unwrap()
    }

    #[test]
    fn targets_are_parsed_from_paths_and_host_names() {
        let t = target(&req("/v1/sandboxes/sb-abc/ports/8000/a/b?x=1", "localhost:7070"), None).unwrap();
        assert_eq!(
            t,
            Target::Sandbox {
                id: "sb-abc".into(),
                port: "8000".into(),
                prefix: "/v1/sandboxes/sb-abc/ports/8000".into(),
                rest: "/a/b?x=1".into(),
            }
        );
        let t = target(&req("/v1/sandboxes/sb-abc/ports/8000", "h"), None).unwrap();
        assert!(matches!(t, Target::Sandbox { rest, .. } if rest.is_empty()));
        assert!(target(&req("/v1/sandboxes/sb-abc/exec", "h"), None).is_none());
        assert!(target(&req("/v1/sandboxes", "h"), None).is_none());
        let t = target(&req("/v1/shared/TOKEN/x", "h"), None).unwrap();
        assert!(matches!(t, Target::Shared { token, rest, .. } if token == "TOKEN" && rest == "/x"));
        let t = target(&req("/index.html?q", "8000-sb-abc.preview.example.com:7070"), Some("preview.example.com"));
        assert_eq!(
            t,
            Some(Target::Sandbox {
                id: "sb-abc".into(),
                port: "8000".into(),
                prefix: String::new(),
                rest: "/index.html?q".into()
            })
        );
        assert!(target(&req("/", "preview.example.com"), Some("preview.example.com")).is_none());
        assert!(target(&req("/", "x-sb-abc.preview.example.com"), Some("preview.example.com")).is_none());
    }

    #[test]
    fn hop_by_hop_and_named_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("accept", "*/*".parse().unwrap());
        clean_headers(&mut h, false);
        assert!(h.get("x-secret").is_none() && h.get("keep-alive").is_none() && h.get("connection").is_none());
        assert!(h.get("accept").is_some());
        let mut h = HeaderMap::new();
        h.insert("connection", "Upgrade".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        assert!(wants_upgrade(&h));
        clean_headers(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
    }
}
