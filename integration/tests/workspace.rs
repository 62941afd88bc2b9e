//! Workspaces: suspend, survive a daemon crash, resume with everything kept;
//! TTLs; the lifecycle event stream.

mod common;

use std::time::{Duration, Instant};

use common::{eval, post_ok, wait_ready};
use forkd_api::v1 as api;
use forkd_integration::{Daemon, Options, vmms_under};
use serde_json::{Value, json};

async fn sh(d: &Daemon, id: &str, script: &str) -> Value {
    post_ok(d, &format!("/v1/sandboxes/{id}/exec"), json!({ "args": ["sh", "-c", script] })).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_survives_suspend_crash_and_resume() {
    let dir = tempfile::Builder::new().prefix("forkd-ws-").tempdir_in("/tmp").unwrap();
    let opts = Options { data_dir: Some(dir.path().to_path_buf()), ..Default::default() };
    let mut d = Daemon::start(opts.clone());
    post_ok(&d, "/v1/snapshots", json!({ "tag": "src", "image": "python" })).await;
    wait_ready(&d, "src").await;
    let src_digest =
        d.get("/v1/snapshots/src/info").send().await.unwrap().json::<Value>().await.unwrap()["memory_digest"].clone();

    // The event stream, watched from before the workspace exists.
    let mut events = d
        .sandboxes()
        .await
        .watch_events(api::WatchEventsRequest { workspace: "dev".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();

    let ws = post_ok(
        &d,
        "/v1/workspaces",
        json!({ "name": "dev", "snapshot_tag": "src", "memory_limit_mib": 300, "labels": { "team": "evals" } }),
    )
    .await;
    assert_eq!(ws["status"], "running");
    assert_eq!(ws["memory_limit_mib"], 300);
    let id = ws["live_sandbox_id"].as_str().unwrap().to_string();
    let sb: Value = d.get(&format!("/v1/sandboxes/{id}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(sb["workspace"], "dev");
    assert_eq!(sb["memory_limit_mib"], 300);

    sh(&d, &id, "echo kept > /root/work.txt").await;
    eval(&d, &id, "counter = 99").await;

    // Busy state for the timing: a few MiB written.
    eval(&d, &id, "import os\nscratch = bytearray(os.urandom(16 << 20))").await;
    let t = Instant::now();
    let s = post_ok(&d, "/v1/workspaces/dev/suspend", json!({})).await;
    eprintln!("suspend (16 MiB dirty) took {:?}", t.elapsed());
    assert_eq!(s["status"], "suspended");
    assert_eq!(s["live_sandbox_id"], "");
    let state = s["state_tag"].as_str().unwrap().to_string();
    assert!(!state.is_empty());
    assert_eq!(d.get(&format!("/v1/sandboxes/{id}")).send().await.unwrap().status(), 404);

    // The stream saw the lifecycle in order. Read before the crash: events
    // still in flight when the daemon is killed are lost with it.
    let mut kinds = vec![];
    while kinds.len() < 4
        && let Ok(Some(Ok(ev))) =
            tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut events)).await
    {
        kinds.push(ev.kind);
    }
    assert_eq!(kinds, vec!["created", "ready", "killed", "suspended"], "events of the first daemon");

    // Crash the daemon and start a new one on the same data dir.
    d.crash();
    assert!(vmms_under(dir.path()).is_empty(), "a suspended workspace runs no VM");
    let d = Daemon::start(opts);
    let ws: Value = d.get("/v1/workspaces/dev").send().await.unwrap().json().await.unwrap();
    assert_eq!(ws["status"], "suspended");
    assert_eq!(ws["state_tag"], state.as_str());

    let t = Instant::now();
    let r = post_ok(&d, "/v1/workspaces/dev/resume", json!({})).await;
    eprintln!("resume took {:?}", t.elapsed());
    assert_eq!(r["status"], "running");
    let id2 = r["live_sandbox_id"].as_str().unwrap().to_string();
    assert_ne!(id2, id);
    assert_eq!(sh(&d, &id2, "cat /root/work.txt").await["stdout"], "kept\n");
    assert_eq!(eval(&d, &id2, "counter").await, "99");
    let sb: Value = d.get(&format!("/v1/sandboxes/{id2}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(sb["memory_limit_mib"], 300, "settings survive suspend, restart and resume");
    assert_eq!(sb["labels"]["team"], "evals");
    assert_eq!(sb["workspace"], "dev");

    // An idle suspend/resume cycle, timed; the old state is collected.
    let t = Instant::now();
    let s2 = post_ok(&d, "/v1/workspaces/dev/suspend", json!({})).await;
    eprintln!("suspend (idle) took {:?}", t.elapsed());
    assert_ne!(s2["state_tag"], state.as_str());
    assert_eq!(
        d.get(&format!("/v1/snapshots/{state}/info")).send().await.unwrap().status(),
        404,
        "superseded state is removed"
    );
    let t = Instant::now();
    let r2 = post_ok(&d, "/v1/workspaces/dev/resume", json!({})).await;
    eprintln!("resume (idle) took {:?}", t.elapsed());
    let id3 = r2["live_sandbox_id"].as_str().unwrap().to_string();
    assert_eq!(eval(&d, &id3, "counter").await, "99");

    // Bad input and state conflicts.
    assert_eq!(d.post("/v1/workspaces/dev/resume", json!({})).send().await.unwrap().status(), 409);
    assert_eq!(
        d.post("/v1/workspaces", json!({ "name": "dev", "snapshot_tag": "src" })).send().await.unwrap().status(),
        409
    );
    assert_eq!(
        d.post("/v1/workspaces", json!({ "name": "a/b", "snapshot_tag": "src" })).send().await.unwrap().status(),
        400
    );
    assert_eq!(d.get("/v1/workspaces/nope").send().await.unwrap().status(), 404);

    // Delete removes the sandbox and the state, never the source.
    let del: Value = d.delete("/v1/workspaces/dev").send().await.unwrap().json().await.unwrap();
    assert_eq!(del["deleted_snapshots"].as_array().unwrap().len(), 1, "{del}");
    assert_eq!(d.get("/v1/workspaces/dev").send().await.unwrap().status(), 404);
    let src: Value = d.get("/v1/snapshots/src/info").send().await.unwrap().json().await.unwrap();
    assert_eq!(src["status"], "ready");
    assert_eq!(src["memory_digest"], src_digest, "the source snapshot never changes");
    assert!(vmms_under(dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_kills_sandboxes_and_suspends_workspaces() {
    let d = Daemon::start(Options::default());
    post_ok(&d, "/v1/snapshots", json!({ "tag": "t", "image": "minimal" })).await;
    wait_ready(&d, "t").await;
    let mut events = d.sandboxes().await.watch_events(api::WatchEventsRequest::default()).await.unwrap().into_inner();

    // Each deadline is measured from just before its own request: the
    // daemon counts a TTL from when the sandbox exists, which is later, so
    // nothing may end before `started + ttl`.
    let sid_started = Instant::now();
    let kids = post_ok(&d, "/v1/sandboxes", json!({ "snapshot_tag": "t", "n": 1, "ttl_secs": 3 })).await;
    let sid = kids[0]["id"].as_str().unwrap().to_string();
    assert!(kids[0]["expires_at_unix"].as_i64().unwrap() > 0);
    let ws_started = Instant::now();
    let ws = post_ok(&d, "/v1/workspaces", json!({ "name": "short", "snapshot_tag": "t", "ttl_secs": 4 })).await;
    let wid = ws["live_sandbox_id"].as_str().unwrap().to_string();
    let idle_started = Instant::now();
    let idle = post_ok(&d, "/v1/sandboxes", json!({ "snapshot_tag": "t", "n": 1, "idle_timeout_secs": 3 })).await;
    let iid = idle[0]["id"].as_str().unwrap().to_string();
    let renewed = post_ok(&d, "/v1/sandboxes", json!({ "snapshot_tag": "t", "n": 1, "ttl_secs": 3 })).await;
    let rid = renewed[0]["id"].as_str().unwrap().to_string();

    // Renew at once: it was made after `sid` with the same TTL, so it must
    // outlive `sid` only because of the renewal.
    let r = post_ok(&d, &format!("/v1/sandboxes/{rid}/renew"), json!({ "ttl_secs": 30 })).await;
    assert!(r["expires_at_unix"].as_i64().unwrap() >= renewed[0]["expires_at_unix"].as_i64().unwrap() + 25, "{r}");

    let mut sandbox_gone_at = None;
    let mut ws_suspended_at = None;
    let mut idle_gone_at = None;
    while sid_started.elapsed() < Duration::from_secs(30)
        && (sandbox_gone_at.is_none() || ws_suspended_at.is_none() || idle_gone_at.is_none())
    {
        if sandbox_gone_at.is_none() && d.get(&format!("/v1/sandboxes/{sid}")).send().await.unwrap().status() == 404 {
            sandbox_gone_at = Some(sid_started.elapsed());
        }
        if idle_gone_at.is_none() && d.get(&format!("/v1/sandboxes/{iid}")).send().await.unwrap().status() == 404 {
            idle_gone_at = Some(idle_started.elapsed());
        }
        let w: Value = d.get("/v1/workspaces/short").send().await.unwrap().json().await.unwrap();
        if ws_suspended_at.is_none() && w["status"] == "suspended" {
            ws_suspended_at = Some(ws_started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, w, i) = (
        sandbox_gone_at.expect("ttl sandbox killed"),
        ws_suspended_at.expect("ttl workspace suspended"),
        idle_gone_at.expect("idle sandbox killed"),
    );
    eprintln!("ttl 3 s → killed at {s:?}; workspace ttl 4 s → suspended at {w:?}; idle 3 s → killed at {i:?}");
    // Never early; late only by the rounding to whole seconds, the 0.5 s
    // policy tick, the spawn itself and the kill or suspend.
    assert!(s >= Duration::from_secs(3) && s <= Duration::from_secs(12), "{s:?}");
    assert!(w >= Duration::from_secs(4) && w <= Duration::from_secs(16), "{w:?}");
    assert!(i >= Duration::from_secs(3) && i <= Duration::from_secs(12), "{i:?}");
    assert_eq!(
        d.get(&format!("/v1/sandboxes/{rid}")).send().await.unwrap().status(),
        200,
        "the renewed sandbox lives on"
    );
    assert_eq!(d.get(&format!("/v1/sandboxes/{wid}")).send().await.unwrap().status(), 404);

    let mut seen = vec![];
    while let Ok(Some(Ok(ev))) =
        tokio::time::timeout(Duration::from_millis(200), futures::StreamExt::next(&mut events)).await
    {
        seen.push((ev.kind, ev.sandbox_id, ev.workspace));
    }
    let for_sid: Vec<&str> = seen.iter().filter(|e| e.1 == sid).map(|e| e.0.as_str()).collect();
    assert_eq!(for_sid, vec!["created", "ready", "ttl_expired", "killed"]);
    let for_ws: Vec<&str> = seen.iter().filter(|e| e.2 == "short").map(|e| e.0.as_str()).collect();
    assert_eq!(for_ws, vec!["created", "ready", "ttl_expired", "killed", "suspended"]);
    d.post("/v1/sandboxes/delete", json!({ "all": true })).send().await.unwrap();
}
