//! Tenants apart, over real REST and gRPC against real VMs: principals from
//! `--tokens-file` see and drive only what they own (anything else answers
//! exactly as a missing record does), fork from shared snapshots, hit their
//! quota with RESOURCE_EXHAUSTED, and are named in the audit log; the admin
//! sees everything.

mod common;

use std::time::Duration;

use common::*;
use forkd_api::v1 as api;
use forkd_integration::{Auth, Daemon, Options, TEST_TOKEN};
use serde_json::{Value, json};
use tonic::Code;

const TOKEN_A: &str = "q7Ww2eR5tY8uI1oP4aS6dF9gH3jK0lZx";
const TOKEN_B: &str = "m3Nb6Vc9Xz2Lk5Jh8Gf1Ds4Ap7Oi0UyT";

/// REST calls made with one principal's token.
struct As {
    c: reqwest::Client,
    base: String,
    token: &'static str,
}

impl As {
    fn new(d: &Daemon, token: &'static str) -> Self {
        As { c: reqwest::Client::new(), base: d.http_url(), token }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut rb = self.c.request(method, format!("{}{path}", self.base)).bearer_auth(self.token);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let s = r.status().as_u16();
        let text = r.text().await.unwrap();
        (s, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn delete(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::DELETE, path, None).await
    }

    async fn fork(&self, tag: &str, n: u32) -> Vec<String> {
        let (s, v) = self.post("/v1/sandboxes", json!({ "snapshot_tag": tag, "n": n })).await;
        assert_eq!(s, 201, "fork {tag}: {v}");
        v.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect()
    }

    async fn ids(&self, path: &str, key: &str) -> Vec<String> {
        let (s, v) = self.get(path).await;
        assert_eq!(s, 200, "{path}: {v}");
        v.as_array()
            .unwrap_or_else(|| panic!("{path}: {v}"))
            .iter()
            .map(|x| x[key].as_str().unwrap_or_else(|| panic!("{path}: {v}")).to_string())
            .collect()
    }
}

/// A 404 whose message is exactly the one a record that does not exist gets.
fn assert_hidden(what: &str, (status, body): (u16, Value), missing: &(u16, Value)) {
    assert_eq!(status, 404, "{what}: {body}");
    assert_eq!(body["code"], "NOT_FOUND", "{what}: {body}");
    assert_eq!(status, missing.0, "{what}");
}

fn same_message(found: &Value, missing: &Value, real: &str, fake: &str) -> bool {
    found["error"].as_str().unwrap().replace(real, fake) == missing["error"].as_str().unwrap()
}

fn tokens_file(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("tokens.toml");
    std::fs::write(
        &p,
        format!(
            "[[tokens]]\nname = \"team-a\"\nrole = \"tenant\"\ntoken = \"{TOKEN_A}\"\nmax_sandboxes = 2\n\n\
             [[tokens]]\nname = \"team-b\"\nrole = \"tenant\"\ntoken = \"{TOKEN_B}\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

async fn grpc(
    d: &Daemon,
    token: &str,
) -> api::sandbox_service_client::SandboxServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Auth>,
> {
    api::sandbox_service_client::SandboxServiceClient::with_interceptor(
        d.channel().await,
        Auth(Some(format!("Bearer {token}"))),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_and_drive_only_their_own() {
    let _serial = serial().await;
    let tmp = tempfile::tempdir_in("/tmp").unwrap();
    let audit = tmp.path().join("audit.jsonl");
    let d = Daemon::start(Options {
        token: Some(TEST_TOKEN.into()),
        audit_log: Some(audit.clone()),
        extra_args: vec!["--tokens-file".into(), tokens_file(tmp.path()).display().to_string()],
        ..Default::default()
    });
    let admin = As::new(&d, TEST_TOKEN);
    let a = As::new(&d, TOKEN_A);
    let b = As::new(&d, TOKEN_B);

    // The admin's snapshot is private until shared.
    post_ok(&d, "/v1/snapshots", json!({ "tag": "base", "image": "minimal" })).await;
    wait_ready(&d, "base").await;
    let missing_snap = a.get("/v1/snapshots/nosuch/info").await;
    assert_hidden("private snapshot", a.get("/v1/snapshots/base/info").await, &missing_snap);
    let (s, v) = a.post("/v1/sandboxes", json!({ "snapshot_tag": "base" })).await;
    assert_eq!(s, 404, "a fork from a private snapshot: {v}");
    assert!(a.ids("/v1/snapshots", "tag").await.is_empty());
    // Only an admin shares.
    let (s, v) = a.post("/v1/snapshots/base/share", json!({ "shared": true })).await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = admin.post("/v1/snapshots/base/share", json!({ "shared": true })).await;
    assert_eq!((s, v["shared"].as_bool()), (200, Some(true)), "{v}");
    let (s, v) = a.post("/v1/snapshots/base/share", json!({ "shared": false })).await;
    assert_eq!((s, v["code"].as_str()), (403, Some("PERMISSION_DENIED")), "{v}");
    let (s, v) = a.delete("/v1/snapshots/base").await;
    assert_eq!(s, 403, "a tenant cannot delete a shared snapshot: {v}");
    assert_eq!(a.ids("/v1/snapshots", "tag").await, vec!["base"]);

    // Each tenant forks from the shared snapshot.
    let sa = a.fork("base", 1).await.remove(0);
    let sb = b.fork("base", 1).await.remove(0);
    assert_eq!(a.ids("/v1/sandboxes", "id").await, vec![sa.clone()]);
    assert_eq!(b.ids("/v1/sandboxes", "id").await, vec![sb.clone()]);
    let all = admin.ids("/v1/sandboxes", "id").await;
    assert!(all.contains(&sa) && all.contains(&sb), "the admin sees both: {all:?}");
    let (_, v) = admin.get(&format!("/v1/sandboxes/{sa}")).await;
    assert_eq!(v["owner"], "team-a");

    // Everything a names of b's answers as a sandbox that does not exist.
    let fake = "sb-000000000000";
    let probes: Vec<(&str, reqwest::Method, String, Option<Value>)> = vec![
        ("get", reqwest::Method::GET, "/v1/sandboxes/{}".into(), None),
        ("exec", reqwest::Method::POST, "/v1/sandboxes/{}/exec".into(), Some(json!({ "args": ["true"] }))),
        ("eval", reqwest::Method::POST, "/v1/sandboxes/{}/eval".into(), Some(json!({ "code": "1" }))),
        ("ping", reqwest::Method::GET, "/v1/sandboxes/{}/ping".into(), None),
        ("branch", reqwest::Method::POST, "/v1/sandboxes/{}/branch".into(), Some(json!({ "tag": "stolen" }))),
        ("files", reqwest::Method::GET, "/v1/sandboxes/{}/files?path=/".into(), None),
        ("read", reqwest::Method::GET, "/v1/sandboxes/{}/files/content?path=/etc/hostname".into(), None),
        ("renew", reqwest::Method::POST, "/v1/sandboxes/{}/renew".into(), Some(json!({ "ttl_secs": 60 }))),
    ];
    for (what, method, path, body) in &probes {
        let missing = a.call(method.clone(), &path.replace("{}", fake), body.clone()).await;
        let found = a.call(method.clone(), &path.replace("{}", &sb), body.clone()).await;
        if missing.0 == 404 {
            assert_hidden(what, found.clone(), &missing);
            assert!(same_message(&found.1, &missing.1, &sb, fake), "{what}: {found:?} vs {missing:?}");
        } else {
            // A route this build answers before looking (e.g. 501): the
            // same answer for both is what matters.
            assert_eq!(found.0, missing.0, "{what}: {found:?} vs {missing:?}");
        }
    }
    let (s, v) = a.delete(&format!("/v1/sandboxes/{sb}")).await;
    assert_eq!(s, 404, "b's sandbox is not there for a, as a missing one: {v}");
    assert_eq!(b.ids("/v1/sandboxes", "id").await, vec![sb.clone()], "b's sandbox survived a's delete");
    let (s, v) = a.post("/v1/sandboxes/delete", json!({ "all": true })).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v.as_array().map(|x| x.len()).or(v["deleted"].as_array().map(|x| x.len())), Some(1), "{v}");
    assert_eq!(b.ids("/v1/sandboxes", "id").await, vec![sb.clone()], "a's delete-all left b's sandbox");
    assert!(a.ids("/v1/sandboxes", "id").await.is_empty());

    // gRPC agrees.
    let mut ga = grpc(&d, TOKEN_A).await;
    let e = ga.get_sandbox(api::GetSandboxRequest { id: sb.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = ga
        .exec(api::ExecRequest { id: sb.clone(), args: vec!["true".into()], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let listed = ga.list_sandboxes(api::ListSandboxesRequest::default()).await.unwrap().into_inner();
    assert!(listed.sandboxes.is_empty(), "{listed:?}");

    // b's private snapshot (a flat copy of the shared one) stays b's.
    let (s, v) = b.post("/v1/snapshots/base/compact", json!({ "to": "b-private" })).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["owner"], "team-b");
    let missing_snap = a.get("/v1/snapshots/nosuch/info").await;
    assert_hidden("b's snapshot", a.get("/v1/snapshots/b-private/info").await, &missing_snap);
    let (s, _) = a.post("/v1/sandboxes", json!({ "snapshot_tag": "b-private" })).await;
    assert_eq!(s, 404);
    let (s, _) = a.delete("/v1/snapshots/b-private").await;
    assert_eq!(s, 404);
    assert_eq!(a.ids("/v1/snapshots", "tag").await, vec!["base"]);
    let (_, v) = a.get("/v1/snapshots/base/info").await;
    assert_eq!(v["dependents"], json!([]), "a does not learn of b's snapshots through dependents: {v}");

    // Workspaces.
    let (s, v) = b.post("/v1/workspaces", json!({ "name": "wb", "snapshot_tag": "base" })).await;
    assert_eq!(s, 201, "{v}");
    let missing_ws = a.get("/v1/workspaces/nosuch").await;
    assert_hidden("b's workspace", a.get("/v1/workspaces/wb").await, &missing_ws);
    assert_hidden("suspend b's workspace", a.post("/v1/workspaces/wb/suspend", json!({})).await, &missing_ws);
    assert_hidden("delete b's workspace", a.delete("/v1/workspaces/wb").await, &missing_ws);
    assert!(a.ids("/v1/workspaces", "name").await.is_empty());
    assert_eq!(b.ids("/v1/workspaces", "name").await, vec!["wb"]);

    // Events: a watches while b and a fork; a hears only of its own.
    let mut ea = grpc(&d, TOKEN_A).await.watch_events(api::WatchEventsRequest::default()).await.unwrap().into_inner();
    let sb2 = b.fork("base", 1).await.remove(0);
    let sa2 = a.fork("base", 1).await.remove(0);
    let mut seen = vec![];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !seen.iter().any(|(k, id): &(String, String)| k == "ready" && *id == sa2) {
        let ev =
            tokio::time::timeout_at(deadline, ea.message()).await.expect("a's own events arrive").unwrap().unwrap();
        seen.push((ev.kind, ev.sandbox_id));
    }
    assert!(seen.iter().all(|(_, id)| *id == sa2), "a saw others' events: {seen:?} (b forked {sb2})");

    // Quota: a may hold two; one is live, two more are refused.
    let (s, v) = a.post("/v1/sandboxes", json!({ "snapshot_tag": "base", "n": 2 })).await;
    assert_eq!((s, v["code"].as_str()), (429, Some("RESOURCE_EXHAUSTED")), "{v}");
    assert!(v["error"].as_str().unwrap().contains("team-a"), "{v}");
    assert_eq!(a.ids("/v1/sandboxes", "id").await, vec![sa2.clone()], "the refusal changed nothing");
    a.fork("base", 1).await;
    // b has no quota.
    b.fork("base", 2).await;

    // The audit log names the principal and the resource.
    let text = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let hit = lines
        .iter()
        .find(|l| l["principal"] == "team-a" && l["resource"] == format!("sandbox {sb}") && l["http_status"] == 404)
        .unwrap_or_else(|| panic!("no audit line of a's probe of {sb}"));
    assert_eq!(hit["rpc"], "forkd.v1.SandboxService.GetSandbox");
    assert!(lines.iter().any(|l| l["principal"] == "admin" && l["resource"] == "snapshot base"));

    admin.post("/v1/sandboxes/delete", json!({ "all": true })).await;
    admin.delete("/v1/workspaces/wb").await;
}
