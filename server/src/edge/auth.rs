//! Bearer-token authentication, the same for gRPC and REST. Health probes
//! (`/healthz`, `grpc.health.v1`) are the only endpoints open without a token.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::{HeaderValue, StatusCode, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::principals::Principals;
use super::rest::codes;
use crate::core::tenants::Principal;

/// Shortest token accepted.
pub const MIN_TOKEN_BYTES: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TokenError {
    #[error("the token is empty")]
    Empty,
    #[error("the token is shorter than {MIN_TOKEN_BYTES} bytes")]
    TooShort,
    #[error("the token looks like a placeholder ({0:?}); generate one, e.g. `head -c 32 /dev/urandom | base64`")]
    Placeholder(String),
}

/// The daemon's token, kept only as a digest so comparisons take the same
/// time whatever the length of the presented token.
#[derive(Clone)]
pub struct Token {
    digest: [u8; 32],
}

impl Token {
    /// Validates a token read from `--token-file` (surrounding whitespace is ignored).
    pub fn parse(raw: &str) -> Result<Self, TokenError> {
        let t = raw.trim();
        if t.is_empty() {
            return Err(TokenError::Empty);
        }
        let lower = t.to_ascii_lowercase();
        let placeholders =
            ["changeme", "change-me", "placeholder", "secret", "password", "token", "example", "replace"];
        let one_char = t.bytes().all(|b| b == t.as_bytes()[0]);
        if one_char || placeholders.iter().any(|p| lower.contains(p)) {
            return Err(TokenError::Placeholder(t.chars().take(12).collect()));
        }
        if t.len() < MIN_TOKEN_BYTES {
            return Err(TokenError::TooShort);
        }
        Ok(Self { digest: Sha256::digest(t.as_bytes()).into() })
    }

    pub fn matches(&self, presented: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        d.ct_eq(&self.digest).into()
    }
}

/// The principal a request was made as, for the audit log (a response
/// extension: the audit layer sits outside authentication).
#[derive(Clone, Debug)]
pub struct AuditPrincipal(pub String);

/// Where E2B's SDKs put the key (server/src/e2b).
const E2B_TOKEN_HEADERS: &[&str] = &["x-api-key", "x-access-token", "e2b-traffic-access-token"];

pub fn is_grpc(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

fn is_open(path: &str) -> bool {
    // A shared port's token is its own credential (edge::proxy).
    path == "/healthz" || path.starts_with("/grpc.health.v1.Health/") || path.starts_with(super::proxy::SHARED)
}

/// Middleware: rejects requests without a known bearer token, and hands
/// the token's principal to the services (a request extension). Without
/// authentication (`--no-auth`) every request is the admin.
pub async fn require_token(
    State(principals): State<Option<Arc<Principals>>>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(principals) = principals else {
        req.extensions_mut().insert(Arc::new(Principal::admin()));
        let mut resp = next.run(req).await;
        resp.extensions_mut().insert(AuditPrincipal("admin (--no-auth)".into()));
        return resp;
    };
    if is_open(req.uri().path()) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            // The scheme name is case-insensitive (RFC 7235).
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(rest)
        })
        // E2B's SDKs send the key as `X-API-Key` to the control API and as
        // `X-Access-Token` (or, from the code interpreter,
        // `E2B-Traffic-Access-Token`) with sandbox traffic; their
        // `Authorization` names a user in the sandbox, not a credential.
        .or_else(|| E2B_TOKEN_HEADERS.iter().find_map(|h| req.headers().get(*h).and_then(|v| v.to_str().ok())));
    match presented.and_then(|p| principals.find(p.trim())) {
        Some(principal) => {
            let name = AuditPrincipal(principal.name.to_string());
            req.extensions_mut().insert(principal);
            let mut resp = next.run(req).await;
            resp.extensions_mut().insert(name);
            resp
        }
        None => {
            let msg = if presented.is_some() {
                "invalid bearer token"
            } else {
                "missing bearer token (authorization: Bearer <token>)"
            };
            if is_grpc(&req) {
                tonic::Status::unauthenticated(msg).into_http::<Body>()
            } else {
                // E2B's SDKs parse their own error shape.
                let e2b = req.uri().path().starts_with("/e2b/") || crate::e2b::is_sandbox_traffic(&req);
                let body = if e2b {
                    serde_json::json!({ "code": 401, "message": msg })
                } else {
                    codes::error_body(tonic::Code::Unauthenticated, msg)
                };
                let mut r = Response::new(Body::from(serde_json::to_vec(&body).unwrap_or_default()));
                *r.status_mut() = StatusCode::UNAUTHORIZED;
                r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                r
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_tokens_are_refused() {
        assert_eq!(Token::parse("  ").err(), Some(TokenError::Empty));
        assert_eq!(Token::parse("abc123").err(), Some(TokenError::TooShort));
        assert!(matches!(Token::parse("changeme-changeme-123"), Err(TokenError::Placeholder(_))));
        assert!(matches!(Token::parse(&"a".repeat(40)), Err(TokenError::Placeholder(_))));
    }

    #[test]
    fn matching_is_exact() {
        let t = Token::parse("q3U9vZ1xL0pT7sWm\n").unwrap();
        assert!(t.matches("q3U9vZ1xL0pT7sWm"));
        assert!(!t.matches("q3U9vZ1xL0pT7sW"));
        assert!(!t.matches(""));
    }
}
