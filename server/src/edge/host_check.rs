//! The `Host` (HTTP/1.1) or `:authority` (HTTP/2) a request names must be
//! this daemon: its bind address, a loopback name or address, or a name the
//! operator allowed with `--allowed-host`. A web page the user visits that
//! points its own name at 127.0.0.1 (DNS rebinding) is answered 421 and
//! reaches nothing.

use std::net::{IpAddr, SocketAddr};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::{HeaderValue, StatusCode, header};

use super::rest::codes;

/// Names and addresses requests may be addressed to.
#[derive(Debug, Clone)]
pub struct AllowedHosts {
    bind: SocketAddr,
    /// Lower-case names; `*.example.com` allows every subdomain; `*` allows all.
    names: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("--allowed-host {0:?}: expected a DNS name, `*.suffix` or `*` (no scheme, port or path)")]
pub struct BadAllowedHost(pub String);

impl AllowedHosts {
    pub fn new(bind: SocketAddr, allowed: &[String]) -> Result<Self, BadAllowedHost> {
        let mut names = vec![];
        for a in allowed {
            let raw = a.trim().to_ascii_lowercase();
            // One trailing dot (a fully qualified name) is allowed.
            let n = raw.strip_suffix('.').unwrap_or(&raw).to_string();
            let body = n.strip_prefix("*.").unwrap_or(&n);
            let valid = raw == "*"
                || (!body.is_empty()
                    && body.len() <= 253
                    && body.split('.').all(|l| {
                        !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    }));
            if !valid {
                return Err(BadAllowedHost(a.clone()));
            }
            names.push(n);
        }
        Ok(Self { bind, names })
    }

    /// Whether `authority` (a Host header value) names this daemon. The
    /// port is not compared: the connection already reached our port.
    pub fn allows(&self, authority: &str) -> bool {
        let host = strip_port(authority.trim()).trim_end_matches('.').to_ascii_lowercase();
        if host.is_empty() {
            return false;
        }
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            // An address names no one else: rebinding needs a name. When
            // bound to every address, any of ours may be used.
            return ip.is_loopback() || ip == self.bind.ip() || self.bind.ip().is_unspecified();
        }
        if host == "localhost" || host.ends_with(".localhost") {
            return true;
        }
        self.names
            .iter()
            .any(|n| n == "*" || *n == host || n.strip_prefix("*.").is_some_and(|s| host.ends_with(&format!(".{s}"))))
    }
}

fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.find(']').map_or(authority, |i| &authority[..=i]);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') => h,
        _ => authority,
    }
}

/// The authority a request names: HTTP/2's `:authority`, else `Host`.
fn authority(req: &Request) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_string());
    }
    req.headers().get(header::HOST).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Middleware: 421 (REST) or PERMISSION_DENIED (gRPC) for a foreign host.
/// A request naming no host at all cannot come from a browser and passes.
pub async fn require_known_host(
    State(allowed): State<std::sync::Arc<AllowedHosts>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(host) = authority(&req) else {
        return next.run(req).await;
    };
    if allowed.allows(&host) {
        return next.run(req).await;
    }
    let shown: String = host.chars().take(80).collect();
    let msg = format!(
        "host {shown:?} is not this daemon's; address it by its bind address or a loopback name, or start it with --allowed-host"
    );
    if super::auth::is_grpc(&req) {
        return tonic::Status::permission_denied(msg).into_http::<Body>();
    }
    let mut r = Response::new(Body::from(
        serde_json::to_vec(&codes::error_body(tonic::Code::PermissionDenied, &msg)).unwrap_or_default(),
    ));
    *r.status_mut() = StatusCode::MISDIRECTED_REQUEST;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(bind: &str, allowed: &[&str]) -> AllowedHosts {
        AllowedHosts::new(bind.parse().unwrap(), &allowed.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn loopback_names_and_the_bind_address_pass() {
        let h = hosts("127.0.0.1:8889", &[]);
        for ok in ["127.0.0.1:8889", "127.0.0.1", "localhost:8889", "LOCALHOST", "[::1]:8889", "localhost."] {
            assert!(h.allows(ok), "{ok}");
        }
        for bad in ["evil.example:8889", "10.0.0.5:8889", "", "127.0.0.1.evil.example", "forkd.svc"] {
            assert!(!h.allows(bad), "{bad}");
        }
    }

    #[test]
    fn configured_names_and_wildcards() {
        let h = hosts("0.0.0.0:8889", &["forkd.forkd.svc", "*.internal.example"]);
        assert!(h.allows("forkd.forkd.svc:8889"));
        assert!(h.allows("a.internal.example"));
        assert!(!h.allows("internal.example"));
        assert!(!h.allows("forkd.forkd.svc.evil.example"));
        assert!(h.allows("10.1.2.3:8889"), "any of our addresses when bound to all");
        assert!(hosts("127.0.0.1:1", &["*"]).allows("anything.example"));
    }

    #[test]
    fn malformed_allowed_hosts_are_refused() {
        for bad in ["http://x", "x:80", "a/b", "", "*.", "a..b"] {
            assert!(AllowedHosts::new("127.0.0.1:1".parse().unwrap(), &[bad.to_string()]).is_err(), "{bad}");
        }
    }
}
