//! The daemon's one port: gRPC (HTTP/2, `application/grpc*`) and REST
//! (HTTP/1.1 or HTTP/2, JSON) side by side, optionally behind TLS, with the
//! same auth, audit and metrics layers in front of both.

pub mod audit;
pub mod auth;
pub mod conn;
pub mod host_check;
pub mod metrics;
pub mod principals;
pub mod proxy;
pub mod rate_limit;
pub mod rest;
pub mod terminal;
pub mod tls;
pub mod token_file;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::response::IntoResponse;
use axum::routing::get;
use forkd_api::v1::{
    image_service_server::ImageServiceServer, sandbox_service_server::SandboxServiceServer,
    snapshot_service_server::SnapshotServiceServer, system_service_server::SystemServiceServer,
    workspace_service_server::WorkspaceServiceServer,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::api::Services;

/// How the edge is configured.
pub struct EdgeConfig {
    /// Tokens and their principals; `None` under `--no-auth`.
    pub principals: Option<Arc<principals::Principals>>,
    pub audit: Option<Arc<audit::AuditLog>>,
    pub max_body: usize,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Names the `Host` header may carry besides the bind address and loopback.
    pub allowed_hosts: Arc<host_check::AllowedHosts>,
    /// Requests a second per principal (`--rate-limit`), if limited.
    pub rate_limit: Option<Arc<rate_limit::RateLimiter>>,
    /// Origins whose pages may call the daemon (`--cors-origin`); none by default.
    pub cors_origins: Vec<http::HeaderValue>,
    pub limits: conn::ConnLimits,
    /// `--proxy-domain`: `{port}-{id}.DOMAIN` reaches a guest port.
    pub proxy_domain: Option<String>,
    /// `--sandbox-metrics`: sandboxes reported with a label in /metrics.
    pub sandbox_metrics: usize,
}

/// Largest gRPC message accepted (file chunks, packed snapshots).
const MAX_GRPC_MESSAGE: usize = 16 * 1024 * 1024;

/// The gRPC services, reflection and health as one router.
pub async fn grpc_router(services: Services) -> anyhow::Result<Router> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<SandboxServiceServer<Services>>().await;
    health_reporter.set_serving::<SnapshotServiceServer<Services>>().await;
    health_reporter.set_serving::<WorkspaceServiceServer<Services>>().await;
    health_reporter.set_serving::<SystemServiceServer<Services>>().await;
    health_reporter.set_serving::<ImageServiceServer<Services>>().await;
    // Keep the reporter alive for the life of the process.
    std::mem::forget(health_reporter);
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(forkd_api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(forkd_api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let routes = tonic::service::Routes::new(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(SnapshotServiceServer::new(services.clone()).max_decoding_message_size(MAX_GRPC_MESSAGE))
        .add_service(SandboxServiceServer::new(services.clone()).max_decoding_message_size(MAX_GRPC_MESSAGE))
        .add_service(WorkspaceServiceServer::new(services.clone()))
        .add_service(ImageServiceServer::new(services.clone()).max_decoding_message_size(MAX_GRPC_MESSAGE))
        .add_service(SystemServiceServer::new(services));
    Ok(routes.prepare().into_axum_router())
}

/// The whole application: dispatch by content type, behind the layers.
pub async fn app(services: Services, cfg: &EdgeConfig) -> anyhow::Result<Router> {
    let rt = services.rt.clone();
    let term_services = services.clone();
    let e2b = crate::e2b::E2b::new(services.clone());
    let e2b_sandbox = e2b.clone();
    let proxy_services = services.clone();
    let proxy_domain = cfg.proxy_domain.clone();
    let grpc = grpc_router(services).await?;
    let transcoder = Arc::new(rest::Transcoder::new(grpc.clone(), cfg.max_body)?);
    let metrics = Arc::new(metrics::Metrics::new(rt, cfg.sandbox_metrics)?);
    let m2 = metrics.clone();
    let rest_router = Router::new()
        .route("/healthz", get(|| async { axum::Json(serde_json::json!({ "ok": true })) }))
        .route(
            "/metrics",
            get(move || {
                let m = m2.clone();
                async move { ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], m.render()).into_response() }
            }),
        )
        .route(
            terminal::ROUTE,
            get(move |path, query, req: Request| terminal::handle(term_services.clone(), path, query, req)),
        )
        .nest("/e2b", crate::e2b::control::router(e2b))
        .fallback(move |req: Request| {
            let t = transcoder.clone();
            async move { t.handle(req).await }
        });
    let dispatch = tower::service_fn(move |req: Request| {
        let grpc = grpc.clone();
        let rest = rest_router.clone();
        let e2b = e2b_sandbox.clone();
        let proxy = proxy::target(&req, proxy_domain.as_deref()).map(|t| (t, proxy_services.clone()));
        async move {
            if let Some((target, services)) = proxy {
                Ok(proxy::handle(services, target, req).await)
            } else if crate::e2b::is_sandbox_traffic(&req) {
                Ok(crate::e2b::handle(e2b, req).await)
            } else if auth::is_grpc(&req) {
                grpc.oneshot(req).await
            } else {
                rest.oneshot(req).await
            }
        }
    });
    let observe = audit::Observe { audit: cfg.audit.clone(), metrics };
    let mut router = Router::new()
        .fallback_service(dispatch)
        .layer(axum::middleware::from_fn_with_state(cfg.rate_limit.clone(), rate_limit::limit))
        .layer(axum::middleware::from_fn_with_state(cfg.principals.clone(), auth::require_token))
        // The host check runs before auth: a rebinding page learns nothing,
        // not even whether a token would be needed.
        .layer(axum::middleware::from_fn_with_state(cfg.allowed_hosts.clone(), host_check::require_known_host));
    // No CORS headers unless the operator names origins: a web page cannot
    // read any answer. Preflights are answered here, before auth.
    if !cfg.cors_origins.is_empty() {
        router = router.layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(cfg.cors_origins.clone())
                .allow_methods([http::Method::GET, http::Method::POST, http::Method::PUT, http::Method::DELETE])
                .allow_headers([http::header::AUTHORIZATION, http::header::CONTENT_TYPE, http::header::ACCEPT]),
        );
    }
    Ok(router.layer(axum::middleware::from_fn_with_state(observe, audit::observe)))
}

/// Accepts connections until `shutdown` resolves, within `limits`: at
/// most `max_connections` open (more are closed at once), a deadline on a
/// new connection's first byte, its TLS handshake and its request headers,
/// and HTTP/2 keep-alive and stream limits.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: conn::ConnLimits,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let over_limit = Arc::new(conn::RateLimitedWarning::new(std::time::Duration::from_secs(10)));
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if let Some(n) = over_limit.hit() {
                tracing::warn!(
                    max = limits.max_connections,
                    refused_so_far = n,
                    "connection limit reached; closing new connections (--max-connections)"
                );
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(audit::Peer(peer));
                let app = app.clone();
                async move { app.oneshot(req.map(Body::new)).await }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
            builder
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(limits.keepalive)
                .keep_alive_timeout(limits.header_timeout)
                .max_concurrent_streams(limits.max_streams);
            let result = match tls {
                Some(acc) => match tokio::time::timeout(limits.header_timeout, acc.accept(stream)).await {
                    Ok(Ok(s)) => {
                        builder
                            .serve_connection_with_upgrades(
                                TokioIo::new(conn::FirstByteDeadline::new(s, limits.header_timeout)),
                                svc,
                            )
                            .await
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "TLS handshake: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
                None => {
                    // With upgrades: the terminal route is a WebSocket.
                    builder
                        .serve_connection_with_upgrades(
                            TokioIo::new(conn::FirstByteDeadline::new(stream, limits.header_timeout)),
                            svc,
                        )
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, "connection: {e}");
            }
        });
    }
}

/// True for loopback addresses.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}
