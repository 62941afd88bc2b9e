//! Per-principal request rate limits (`--rate-limit`): a token bucket per
//! principal, refilled at the configured rate with a burst of twice that.
//! A principal over its rate gets RESOURCE_EXHAUSTED (429 with
//! `Retry-After`) and nothing runs. Health probes carry no principal and are
//! never limited. Principals are the configured ones, so the map is bounded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::{HeaderValue, StatusCode, header};

use super::rest::codes;
use crate::core::tenants::Principal;

/// Buckets by principal name.
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// `per_sec` requests a second for each principal, bursts of twice that.
    pub fn new(per_sec: u32) -> Self {
        RateLimiter { per_sec: per_sec as f64, burst: (per_sec as f64 * 2.0).max(1.0), buckets: Default::default() }
    }

    /// Whether `who` may make a request now; else the seconds to wait.
    pub fn take(&self, who: &str) -> Result<(), f64> {
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, at) = b.entry(who.to_string()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_sec).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err((1.0 - *tokens) / self.per_sec)
        }
    }
}

/// Middleware (inside authentication): refuses a principal over its rate.
pub async fn limit(State(limiter): State<Option<Arc<RateLimiter>>>, req: Request, next: Next) -> Response {
    let (Some(limiter), Some(p)) = (limiter, req.extensions().get::<Arc<Principal>>().cloned()) else {
        return next.run(req).await;
    };
    let Err(wait) = limiter.take(p.name.as_str()) else {
        return next.run(req).await;
    };
    let msg = format!("principal {} is over its request rate (--rate-limit); retry in {wait:.1} s", p.name);
    let retry = HeaderValue::from(wait.ceil().max(1.0) as u64);
    if super::auth::is_grpc(&req) {
        let mut r = tonic::Status::resource_exhausted(msg).into_http::<Body>();
        r.headers_mut().insert(header::RETRY_AFTER, retry);
        return r;
    }
    let mut r = Response::new(Body::from(
        serde_json::to_vec(&codes::error_body(tonic::Code::ResourceExhausted, &msg)).unwrap_or_default(),
    ));
    *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::RETRY_AFTER, retry);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_and_principals_apart() {
        let l = RateLimiter::new(5);
        for i in 0..10 {
            assert!(l.take("a").is_ok(), "request {i} of the burst");
        }
        let wait = l.take("a").unwrap_err();
        assert!(wait > 0.0 && wait <= 0.2 + 1e-9, "{wait}");
        assert!(l.take("b").is_ok(), "b has its own bucket");
        std::thread::sleep(std::time::Duration::from_millis(250));
        assert!(l.take("a").is_ok(), "refilled");
    }
}
