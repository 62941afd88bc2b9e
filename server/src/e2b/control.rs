//! E2B's control API (the REST shape its SDKs call at `E2B_API_URL`),
//! mounted under `/e2b`: create, connect (resuming a paused sandbox), get,
//! list (metadata and state filters, `x-next-token` paging), kill, set
//! timeout, pause, fork and snapshots. Errors are JSON `{"code": <HTTP
//! status>, "message"}`, which is what the SDKs parse.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Extension;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use axum::routing::{delete, get, post};
use forkd_api::names::{SandboxId, Tag};
use forkd_api::v1::{self as api, sandbox_service_server::SandboxService};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::Status;

use super::E2b;
use super::sandboxes::{self, ENVD_VERSION};
use crate::core::Error;
use crate::core::state::{ExpiryAction, WorkspaceStatus};
use crate::core::store::{SandboxSettings, WorkspaceRecord};
use crate::core::tenants::Principal;
use crate::core::workspaces::WorkspaceOptions;

/// What E2B gives a sandbox created without a timeout.
const DEFAULT_TIMEOUT: u32 = 300;
const MAX_TIMEOUT: u32 = 30 * 24 * 3600;
const MAX_METADATA: usize = 64;
const MAX_ENV: usize = 256;
const MAX_FORKS: u32 = 20;
const PAGE: usize = 100;

type P = Extension<Arc<Principal>>;

pub fn router(state: Arc<E2b>) -> Router {
    Router::new()
        .route("/v2/sandboxes", post(create).get(list))
        .route("/sandboxes", post(create).get(list))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/resume", post(connect))
        .route("/sandboxes/{id}", get(info).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/fork", post(fork))
        .route("/sandboxes/{id}/snapshots", post(snapshot))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .route(
            "/sandboxes/{id}/network",
            axum::routing::put(|| async {
                fail(&Status::unimplemented("forkd's E2B sandboxes have no network device to configure"))
            }),
        )
        .route("/snapshots", get(list_snapshots))
        .route("/templates/{id}", delete(delete_snapshot))
        .fallback(|| async { fail(&Status::not_found("no such E2B API route")) })
        .with_state(state)
}

/// An error as the SDKs read it.
pub fn fail(s: &Status) -> Response {
    let status = crate::edge::rest::codes::http_status(s.code());
    let mut r = error_response(status, s.message());
    // A refusal is final: the Python SDK would retry a 429 or 503.
    r.headers_mut().insert("should-retry", HeaderValue::from_static("false"));
    r
}

/// E2B's error body, `{"code": <HTTP status>, "message"}`.
pub(super) fn error_response(status: StatusCode, message: &str) -> Response {
    json_response(status, &json!({ "code": status.as_u16(), "message": message }))
}

pub(super) fn json_response(status: StatusCode, v: &Value) -> Response {
    let mut r = Response::new(Body::from(serde_json::to_vec(v).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn no_content() -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

fn respond(r: Result<Response, Status>) -> Response {
    r.unwrap_or_else(|s| fail(&s))
}

/// A JSON request body; an empty one is the type's default.
pub(super) fn parse<T: for<'de> Deserialize<'de> + Default>(body: &Bytes) -> Result<T, Status> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(T::default());
    }
    parse_json(body)
}

/// A JSON request body that must be there.
pub(super) fn parse_json<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, Status> {
    serde_json::from_slice(body).map_err(|e| Status::invalid_argument(format!("request body: {e}")))
}

/// The token the caller presented: handed back as the envd access token,
/// so the SDK's sandbox traffic authenticates as the same principal.
fn presented_token(h: &HeaderMap) -> Option<String> {
    h.get("x-api-key")
        .or_else(|| h.get(header::AUTHORIZATION))
        .and_then(|v| v.to_str().ok())
        .map(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).unwrap_or(v).trim().to_string())
        .filter(|v| !v.is_empty())
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

/// The create/connect answer.
fn sandbox_json(ws: &WorkspaceRecord, token: &Option<String>) -> Value {
    let mut v = json!({
        "sandboxID": ws.name.as_str(),
        "templateID": ws.source_snapshot_tag.as_str(),
        "alias": ws.source_snapshot_tag.as_str(),
        "clientID": "forkd",
        "envdVersion": ENVD_VERSION,
        "domain": Value::Null,
    });
    if let Some(t) = token {
        v["envdAccessToken"] = json!(t);
        v["trafficAccessToken"] = json!(t);
    }
    v
}

impl E2b {
    /// When the sandbox's time runs out (unix seconds).
    async fn end_at(&self, ws: &WorkspaceRecord) -> i64 {
        let now = crate::core::now_unix();
        let budget = ws.settings.ttl_secs as i64;
        if ws.status == WorkspaceStatus::Running
            && let Ok(id) = SandboxId::parse(&ws.live_sandbox_id)
            && let Ok(sb) = self.services.rt.sandbox(&id).await
        {
            let rec = sb.snapshot();
            return if rec.expires_at_unix > 0 { rec.expires_at_unix } else { now + budget };
        }
        now + (budget - ws.ttl_used_secs as i64).max(0)
    }

    async fn detail(&self, ws: &WorkspaceRecord, token: &Option<String>) -> Value {
        let (cpus, mem) = self
            .services
            .rt
            .get_snapshot(&ws.source_snapshot_tag)
            .map(|s| (s.vcpus.max(1), s.mem_mib))
            .unwrap_or((1, 0));
        let mut v = sandbox_json(ws, token);
        let state = if ws.status == WorkspaceStatus::Running { "running" } else { "paused" };
        let on_timeout = if ws.on_expiry == ExpiryAction::Suspend { "pause" } else { "kill" };
        v["startedAt"] = json!(rfc3339(ws.created_at_unix));
        v["endAt"] = json!(rfc3339(self.end_at(ws).await));
        v["cpuCount"] = json!(cpus);
        v["memoryMB"] = json!(mem);
        v["diskSizeMB"] = json!(0);
        v["state"] = json!(state);
        v["metadata"] = json!(ws.metadata);
        v["lifecycle"] = json!({ "autoResume": false, "onTimeout": on_timeout });
        v
    }
}

#[derive(Deserialize, Default)]
struct CreateBody {
    #[serde(rename = "templateID", default)]
    template_id: Option<String>,
    #[serde(default)]
    timeout: Option<u32>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(rename = "envVars", default)]
    env_vars: Option<BTreeMap<String, String>>,
    #[serde(rename = "autoPause", default)]
    auto_pause: Option<bool>,
}

fn check_timeout(t: Option<u32>) -> Result<u32, Status> {
    match t {
        None => Ok(DEFAULT_TIMEOUT),
        Some(t) if (1..=MAX_TIMEOUT).contains(&t) => Ok(t),
        Some(t) => Err(Status::invalid_argument(format!("timeout {t} s is not 1 s–{MAX_TIMEOUT} s (30 days)"))),
    }
}

fn check_metadata(m: &BTreeMap<String, String>) -> Result<(), Status> {
    if m.len() > MAX_METADATA {
        return Err(Status::invalid_argument(format!("metadata has {} keys; at most {MAX_METADATA}", m.len())));
    }
    for (k, v) in m {
        if k.is_empty() || k.len() > 256 || v.len() > 1024 {
            return Err(Status::invalid_argument(format!(
                "metadata {k:?}: keys are 1–256 bytes and values at most 1024"
            )));
        }
    }
    Ok(())
}

fn check_env(m: &BTreeMap<String, String>) -> Result<(), Status> {
    if m.len() > MAX_ENV {
        return Err(Status::invalid_argument(format!("envVars has {} entries; at most {MAX_ENV}", m.len())));
    }
    for (k, v) in m {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') || k.len() > 256 || v.len() > 32768 {
            return Err(Status::invalid_argument(format!("envVars: bad variable {k:?}")));
        }
    }
    Ok(())
}

/// Starts a workspace from `template` for `p`.
async fn start(
    e: &E2b,
    p: &Principal,
    template: &str,
    timeout: u32,
    opts: WorkspaceOptions,
) -> Result<WorkspaceRecord, Status> {
    let tag = Tag::parse(template).map_err(|_| Status::not_found(format!("template {template:?} not found")))?;
    e.services.usable_snapshot(p, &tag).map_err(|_| Status::not_found(format!("template {template:?} not found")))?;
    let settings = SandboxSettings { network: "none".into(), ttl_secs: timeout, ..Default::default() };
    let name = sandboxes::new_id();
    let by = p.clone();
    let rec = e
        .services
        .owned("create E2B sandbox", |rt| async move { rt.create_workspace_with(name, tag, settings, by, opts).await })
        .await?;
    Ok(rec)
}

async fn create(State(e): State<Arc<E2b>>, Extension(p): P, headers: HeaderMap, body: Bytes) -> Response {
    respond(
        async {
            let b: CreateBody = parse(&body)?;
            let timeout = check_timeout(b.timeout)?;
            let metadata = b.metadata.unwrap_or_default();
            let env = b.env_vars.unwrap_or_default();
            check_metadata(&metadata)?;
            check_env(&env)?;
            let template = b.template_id.unwrap_or_else(|| "base".into());
            let on_expiry = if b.auto_pause.unwrap_or(false) { ExpiryAction::Suspend } else { ExpiryAction::Delete };
            let opts = WorkspaceOptions { on_expiry, metadata, env, owns_source: false };
            let ws = start(&e, &p, &template, timeout, opts).await?;
            Ok(json_response(StatusCode::CREATED, &sandbox_json(&ws, &presented_token(&headers))))
        }
        .await,
    )
}

#[derive(Deserialize, Default)]
struct ConnectBody {
    #[serde(default)]
    timeout: Option<u32>,
}

async fn connect(
    State(e): State<Arc<E2b>>,
    Extension(p): P,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    respond(
        async {
            let b: ConnectBody = parse(&body)?;
            let ws = sandboxes::workspace(&e.services, &p, &id)?;
            let name = ws.name.clone();
            let resumed = ws.status != WorkspaceStatus::Running;
            if resumed {
                let by = (*p).clone();
                let n = name.clone();
                e.services.owned("resume E2B sandbox", |rt| async move { rt.resume_workspace(&n, by).await }).await?;
            }
            // Resuming starts a fresh timeout; connecting to a running sandbox
            // only ever extends it.
            let ws = match (resumed, b.timeout) {
                (true, t) => e.services.rt.set_workspace_timeout(&name, check_timeout(t)?).await?,
                (false, Some(t)) => {
                    let t = check_timeout(Some(t))?;
                    let current = sandboxes::workspace(&e.services, &p, &id)?;
                    if e.end_at(&current).await < crate::core::now_unix() + t as i64 {
                        e.services.rt.set_workspace_timeout(&name, t).await?
                    } else {
                        current
                    }
                }
                (false, None) => sandboxes::workspace(&e.services, &p, &id)?,
            };
            let status = if resumed { StatusCode::CREATED } else { StatusCode::OK };
            Ok(json_response(status, &sandbox_json(&ws, &presented_token(&headers))))
        }
        .await,
    )
}

async fn info(State(e): State<Arc<E2b>>, Extension(p): P, Path(id): Path<String>, headers: HeaderMap) -> Response {
    respond(
        async {
            let ws = sandboxes::workspace(&e.services, &p, &id)?;
            Ok(json_response(StatusCode::OK, &e.detail(&ws, &presented_token(&headers)).await))
        }
        .await,
    )
}

/// `metadata` arrives encoded twice over (the SDKs encode each key and
/// value, join them as a query string, and that is encoded again as one
/// parameter).
fn metadata_filter(raw: &str) -> BTreeMap<String, String> {
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    form_urlencoded::parse(raw.as_bytes()).map(|(k, v)| (decode(&k), decode(&v))).collect()
}

async fn list(State(e): State<Arc<E2b>>, Extension(p): P, RawQuery(q): RawQuery, headers: HeaderMap) -> Response {
    respond(
        async {
            let q: Vec<(String, String)> =
                form_urlencoded::parse(q.unwrap_or_default().as_bytes()).into_owned().collect();
            let get = |n: &str| q.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
            let want = get("metadata").map(|m| metadata_filter(&m)).unwrap_or_default();
            let states: Vec<String> = get("state")
                .map(|s| s.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect())
                .unwrap_or_else(|| vec!["running".into(), "paused".into()]);
            let template = get("template");
            let limit = match get("limit") {
                None => PAGE,
                Some(l) => l
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=PAGE).contains(n))
                    .ok_or_else(|| Status::invalid_argument(format!("limit {l:?} is not 1–{PAGE}")))?,
            };
            let after = get("nextToken").unwrap_or_default();
            let mut all: Vec<WorkspaceRecord> = e
                .services
                .rt
                .list_workspaces()?
                .into_iter()
                .filter(|w| p.owns(&w.owner))
                .filter(|w| {
                    let state = if w.status == WorkspaceStatus::Running { "running" } else { "paused" };
                    states.iter().any(|s| s == state)
                })
                .filter(|w| want.iter().all(|(k, v)| w.metadata.get(k) == Some(v)))
                .filter(|w| template.as_ref().is_none_or(|t| w.source_snapshot_tag.as_str() == t))
                .filter(|w| after.is_empty() || w.name.as_str() > after.as_str())
                .collect();
            all.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
            let more = all.len() > limit;
            all.truncate(limit);
            let token = presented_token(&headers);
            let mut items = vec![];
            for w in &all {
                items.push(e.detail(w, &token).await);
            }
            let mut r = json_response(StatusCode::OK, &Value::Array(items));
            if more && let Some(last) = all.last() {
                r.headers_mut()
                    .insert("x-next-token", HeaderValue::from_str(last.name.as_str()).expect("names are ASCII"));
            }
            Ok(r)
        }
        .await,
    )
}

async fn kill(State(e): State<Arc<E2b>>, Extension(p): P, Path(id): Path<String>) -> Response {
    respond(
        async {
            let ws = sandboxes::workspace(&e.services, &p, &id)?;
            let name = ws.name.clone();
            e.services.owned("kill E2B sandbox", |rt| async move { rt.delete_workspace(&name).await }).await?;
            e.contexts.forget(&id);
            Ok(no_content())
        }
        .await,
    )
}

#[derive(Deserialize, Default)]
struct TimeoutBody {
    timeout: Option<u32>,
}

async fn set_timeout(State(e): State<Arc<E2b>>, Extension(p): P, Path(id): Path<String>, body: Bytes) -> Response {
    respond(
        async {
            let b: TimeoutBody = parse(&body)?;
            let t = b.timeout.ok_or_else(|| Status::invalid_argument("timeout is required"))?;
            let ws = sandboxes::workspace(&e.services, &p, &id)?;
            e.services.rt.set_workspace_timeout(&ws.name, check_timeout(Some(t))?).await?;
            Ok(no_content())
        }
        .await,
    )
}

async fn pause(State(e): State<Arc<E2b>>, Extension(p): P, Path(id): Path<String>) -> Response {
    respond(
        async {
            let ws = sandboxes::workspace(&e.services, &p, &id)?;
            if ws.status != WorkspaceStatus::Running {
                return Err(Status::already_exists(format!("sandbox {id} is already paused")));
            }
            let name = ws.name.clone();
            e.services.owned("pause E2B sandbox", |rt| async move { rt.suspend_workspace(&name).await }).await?;
            Ok(no_content())
        }
        .await,
    )
}

/// Branches a running sandbox into a snapshot tag (the caller's own).
async fn branch(e: &E2b, p: &Arc<Principal>, ws: &WorkspaceRecord, tag: &str) -> Result<String, Status> {
    if ws.status != WorkspaceStatus::Running {
        return Err(Status::failed_precondition(format!("sandbox {} is paused; connect to it first", ws.name)));
    }
    let mut req = tonic::Request::new(api::BranchRequest {
        id: ws.live_sandbox_id.clone(),
        tag: tag.to_string(),
        ..Default::default()
    });
    req.extensions_mut().insert(p.clone());
    let snap = e.services.branch(req).await?.into_inner();
    Ok(snap.tag)
}

#[derive(Deserialize, Default)]
struct ForkBody {
    timeout: Option<u32>,
    count: Option<u32>,
}

async fn fork(
    State(e): State<Arc<E2b>>,
    Extension(p): P,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    respond(
        async {
            let b: ForkBody = parse(&body)?;
            let count = b.count.unwrap_or(1);
            if !(1..=MAX_FORKS).contains(&count) {
                return Err(Status::invalid_argument(format!("count {count} is not 1–{MAX_FORKS}")));
            }
            let timeout = check_timeout(b.timeout)?;
            let ws = sandboxes::workspace(&e.services, &p, &id)?;
            let tag = branch(&e, &p, &ws, &format!("e2b-fork-{}", crate::core::ids::random_name(12))).await?;
            let token = presented_token(&headers);
            let mut out = vec![];
            for _ in 0..count {
                let opts = WorkspaceOptions {
                    on_expiry: ws.on_expiry,
                    metadata: ws.metadata.clone(),
                    env: ws.env.clone(),
                    owns_source: true,
                };
                match start(&e, &p, &tag, timeout, opts).await {
                    Ok(child) => out.push(json!({ "sandbox": sandbox_json(&child, &token) })),
                    Err(s) => out.push(json!({ "error": {
                        "code": crate::edge::rest::codes::http_status(s.code()).as_u16(),
                        "message": s.message(),
                    }})),
                }
            }
            Ok(json_response(StatusCode::CREATED, &Value::Array(out)))
        }
        .await,
    )
}

#[derive(Deserialize, Default)]
struct SnapshotBody {
    name: Option<String>,
}

async fn snapshot(State(e): State<Arc<E2b>>, Extension(p): P, Path(id): Path<String>, body: Bytes) -> Response {
    respond(
        async {
            let b: SnapshotBody = parse(&body)?;
            let tag = match b.name {
                Some(n) => Tag::parse(&n).map_err(Error::from)?.to_string(),
                None => format!("e2b-snap-{}", crate::core::ids::random_name(12)),
            };
            let ws = sandboxes::workspace(&e.services, &p, &id)?;
            let tag = branch(&e, &p, &ws, &tag).await?;
            Ok(json_response(StatusCode::CREATED, &json!({ "snapshotID": tag, "names": [tag] })))
        }
        .await,
    )
}

async fn list_snapshots(State(e): State<Arc<E2b>>, Extension(p): P) -> Response {
    respond(
        async {
            let snaps: Vec<Value> = e
                .services
                .rt
                .list_snapshot_views()
                .await?
                .into_iter()
                .filter(|v| p.owns(&v.record.owner) && !v.record.tag.as_str().starts_with("ws-"))
                .map(|v| json!({ "snapshotID": v.record.tag.as_str(), "names": [v.record.tag.as_str()] }))
                .collect();
            Ok(json_response(StatusCode::OK, &Value::Array(snaps)))
        }
        .await,
    )
}

async fn delete_snapshot(State(e): State<Arc<E2b>>, Extension(p): P, Path(id): Path<String>) -> Response {
    respond(
        async {
            let tag = Tag::parse(&id).map_err(|_| Status::not_found(format!("snapshot {id:?} not found")))?;
            let rec = e
                .services
                .rt
                .get_snapshot(&tag)
                .map_err(|_| Status::not_found(format!("snapshot {id:?} not found")))?;
            if !p.owns(&rec.owner) {
                return Err(Status::not_found(format!("snapshot {id:?} not found")));
            }
            e.services
                .owned("delete snapshot", |rt| async move { rt.delete_snapshot(&tag, false, false).await })
                .await?;
            Ok(no_content())
        }
        .await,
    )
}

async fn metrics(State(e): State<Arc<E2b>>, Extension(p): P, Path(id): Path<String>) -> Response {
    respond(
        async {
            let ws = sandboxes::workspace(&e.services, &p, &id)?;
            // A paused sandbox has no samples.
            if ws.status != WorkspaceStatus::Running {
                return Ok(json_response(StatusCode::OK, &json!([])));
            }
            let (sb, _) = sandboxes::live(&e.services, &p, &id).await?;
            let cpus = e.services.rt.get_snapshot(&ws.source_snapshot_tag).map(|s| s.vcpus.max(1)).unwrap_or(1);
            let one = super::metrics::sample(&sb, cpus).await?;
            Ok(json_response(StatusCode::OK, &json!([one])))
        }
        .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_filters_decode_as_the_sdks_encode() {
        // {"k": "v w", "a/b": "c&d"} after the query parameter's own decoding.
        let m = metadata_filter("k=v%2520w&a%2Fb=c%2526d");
        assert_eq!(m.get("k").map(String::as_str), Some("v w"));
        assert_eq!(m.get("a/b").map(String::as_str), Some("c&d"));
    }

    #[test]
    fn timeouts_are_bounded() {
        assert_eq!(check_timeout(None).unwrap(), DEFAULT_TIMEOUT);
        assert!(check_timeout(Some(0)).is_err());
        assert!(check_timeout(Some(MAX_TIMEOUT + 1)).is_err());
        let mut env = BTreeMap::new();
        env.insert("A=B".to_string(), "x".to_string());
        assert!(check_env(&env).is_err());
    }
}
