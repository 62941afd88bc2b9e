//! A client that goes away at a random moment abandons only its wait: the
//! operation it asked for finishes or rolls back inside the daemon. Each
//! round drops a real gRPC call after a random delay (the HTTP/2 stream is
//! reset, as a deadline or Ctrl-C would), then checks the host: every VMM
//! is a listed sandbox and every listed running sandbox has its VMM, no tag
//! is stuck busy, a branch source answers exec, and at the end nothing
//! leaked (work dirs, staging, cgroups, ledger rows).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use forkd_api::v1 as api;
use forkd_integration::{Daemon, Options, vmms_under};
use serde_json::json;

/// Rounds per operation: bounded so the whole file stays within minutes.
const ROUNDS: usize = 20;

/// A random delay within the time the call takes when left alone, so most
/// cuts land while it is working.
fn within(rng: &mut Lcg, typical: Duration) -> Duration {
    Duration::from_millis(rng.below(typical.as_millis() as u64 + 1))
}

/// How long a call takes when nobody cuts it off.
async fn timed<F: std::future::Future>(call: F) -> (Duration, F::Output) {
    let t0 = Instant::now();
    let out = call.await;
    (t0.elapsed(), out)
}

/// The pids of the sandboxes listed as running, and of the VMMs on the host.
async fn pids(d: &Daemon, data: &Path) -> (BTreeSet<u32>, BTreeSet<u32>) {
    let listed: BTreeSet<u32> = list(d)
        .await
        .iter()
        .filter(|s| s["status"] == "running")
        .filter_map(|s| s["pid"].as_u64())
        .map(|p| p as u32)
        .collect();
    (listed, vmms_under(data).into_iter().collect())
}

/// Waits until VMMs and listed running sandboxes agree on two polls in a
/// row (operations still finishing in the background settle first).
async fn settled(d: &Daemon, data: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut agreed = 0;
    loop {
        let (listed, vmms) = pids(d, data).await;
        if listed == vmms {
            agreed += 1;
            if agreed == 2 {
                return;
            }
        } else {
            agreed = 0;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: VMMs and listed sandboxes never agreed: listed {listed:?}, VMMs {vmms:?}"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
}

/// The sandbox answers exec: the branch that was cut off resumed it.
async fn answers(d: &Daemon, id: &str, what: &str) {
    // Whatever was cut off has finished (the branch resumed its source or
    // failed and resumed it); then the source answers within a second — a
    // liveness bound, not a speed target: a paused VM never answers.
    idle(d, what).await;
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(1), sh_status(&d.http(), &d.http_url(), id, "true", 5)).await;
    let (code, body) = r.unwrap_or_else(|_| panic!("{what}: source {id} did not answer exec within a second"));
    assert_eq!((code, body["exit_code"].as_i64()), (200, Some(0)), "{what}: {body} after {:?}", t0.elapsed());
}

/// Every ledger row belongs to a listed sandbox; no staging row is left
/// once nothing is in flight.
async fn ledger_is_live(d: &Daemon, data: &Path, what: &str) {
    idle(d, what).await;
    let listed: BTreeSet<String> = list(d).await.iter().filter_map(|s| s["id"].as_str().map(str::to_string)).collect();
    let stale: Vec<_> =
        ledger(data).into_iter().filter(|(kind, _, owner)| kind == "staging" || !listed.contains(owner)).collect();
    assert!(stale.is_empty(), "{what}: ledger rows of nothing live: {stale:?}");
}

/// Waits until no operation runs in the daemon (`forkd_operations_in_flight`).
async fn idle(d: &Daemon, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let m = d.get("/metrics").send().await.unwrap().text().await.unwrap();
        let n = m
            .lines()
            .find(|l| l.starts_with("forkd_operations_in_flight"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .expect("forkd_operations_in_flight in /metrics");
        if n == 0.0 {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {n} operations still in flight");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A workspace as REST shows it.
async fn workspace(d: &Daemon, name: &str) -> serde_json::Value {
    d.get(&format!("/v1/workspaces/{name}")).send().await.unwrap().json().await.unwrap()
}

/// Waits for the staging dir to empty (a cut-off write cleans up behind it).
async fn settled_staging(data: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if entries(&data.join("staging")).is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Drops `call` after `delay`; returns whether it finished first.
async fn cut_off<F: std::future::Future>(delay: Duration, call: F) -> bool {
    tokio::time::timeout(delay, call).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_cut_off_at_random_moments_finish_or_roll_back() {
    let _serial = serial().await;
    let cgroups_before = forkd_cgroups();
    let data = tempfile::Builder::new().prefix("forkd-cancel-").tempdir_in("/tmp").unwrap();
    let d = Daemon::start(Options { data_dir: Some(data.path().to_path_buf()), ..Default::default() });
    let data = data.path().to_path_buf();
    post_ok(&d, "/v1/snapshots", json!({ "tag": "m", "image": "minimal" })).await;
    wait_ready(&d, "m").await;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("cancel seed {seed}");
    let mut rng = Lcg(seed);
    let mut sb = d.sandboxes().await;
    let mut snaps = d.snapshots().await;
    let mut finished = std::collections::BTreeMap::<&str, usize>::new();

    // Fork n=4, cut off.
    let fork4 = || api::CreateSandboxesRequest { snapshot_tag: "m".into(), n: Some(4), ..Default::default() };
    let (fork_time, r) = timed(sb.create_sandboxes(fork4())).await;
    r.unwrap();
    post_ok(&d, "/v1/sandboxes/delete", json!({ "all": true })).await;
    for i in 0..ROUNDS {
        let delay = within(&mut rng, fork_time);
        let req = fork4();
        if cut_off(delay, sb.create_sandboxes(req)).await {
            *finished.entry("fork").or_default() += 1;
        }
        settled(&d, &data, &format!("fork round {i} ({delay:?})")).await;
        ledger_is_live(&d, &data, &format!("fork round {i}")).await;
        // Keep the host small: what a finished fork returned is deleted.
        if list(&d).await.len() > 8 {
            post_ok(&d, "/v1/sandboxes/delete", json!({ "all": true })).await;
        }
    }

    // Delete-all, cut off.
    fork(&d, "m", 2).await;
    let (delete_time, r) =
        timed(sb.delete_sandboxes(api::DeleteSandboxesRequest { all: true, ..Default::default() })).await;
    r.unwrap();
    for i in 0..ROUNDS {
        fork(&d, "m", 2).await;
        let delay = within(&mut rng, delete_time);
        let req = api::DeleteSandboxesRequest { all: true, ..Default::default() };
        if cut_off(delay, sb.delete_sandboxes(req)).await {
            *finished.entry("delete").or_default() += 1;
        }
        // The delete finishes in the background: nothing is half-deleted.
        settled(&d, &data, &format!("delete round {i} ({delay:?})")).await;
        ledger_is_live(&d, &data, &format!("delete round {i}")).await;
    }
    post_ok(&d, "/v1/sandboxes/delete", json!({ "all": true })).await;

    // Branch (full and diff, with dirty memory) and delete the snapshot, cut off.
    let source = fork(&d, "m", 1).await.remove(0);
    let full = api::BranchRequest { id: source.clone(), tag: "bt".into(), mode: "full".into(), ..Default::default() };
    let (branch_time, r) = timed(sb.branch(full)).await;
    r.unwrap();
    let (snap_delete_time, r) = timed(snaps.delete_snapshot(api::DeleteSnapshotRequest {
        tag: "bt".into(),
        force: true,
        ..Default::default()
    }))
    .await;
    r.unwrap();
    eprintln!(
        "uncut: fork {fork_time:?}, delete {delete_time:?}, branch {branch_time:?}, snapshot delete {snap_delete_time:?}"
    );
    for i in 0..ROUNDS {
        // Dirty memory for the diff to carry (tmpfs pages live in guest RAM).
        sh(
            &d,
            &source,
            "for t in /tmp /dev/shm /run; do head -c 4000000 /dev/urandom > $t/dirty 2>/dev/null && break; done; true",
        )
        .await;
        let mode = if i % 2 == 0 { "full" } else { "diff" };
        let tag = format!("b{i}");
        let delay = within(&mut rng, branch_time);
        let req = api::BranchRequest { id: source.clone(), tag: tag.clone(), mode: mode.into(), ..Default::default() };
        if cut_off(delay, sb.branch(req)).await {
            *finished.entry("branch").or_default() += 1;
        }
        answers(&d, &source, &format!("branch {mode} round {i} ({delay:?})")).await;
        // Wait for the branch to be written (or gone), then delete it, cut off.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let r = d.get(&format!("/v1/snapshots/{tag}/info")).send().await.unwrap();
            let gone = r.status() == 404;
            let v: serde_json::Value = r.json().await.unwrap();
            if gone || v["status"] != "writing" {
                break;
            }
            assert!(Instant::now() < deadline, "branch {tag} never finished writing");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let delay = within(&mut rng, snap_delete_time);
        let req = api::DeleteSnapshotRequest { tag: tag.clone(), force: true, ..Default::default() };
        if cut_off(delay, snaps.delete_snapshot(req)).await {
            *finished.entry("snapshot delete").or_default() += 1;
        }
        // No tag stays busy: the delete finished, or a new one succeeds.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = d.delete(&format!("/v1/snapshots/{tag}?force=true")).send().await.unwrap();
            let status = r.status().as_u16();
            let body = r.text().await.unwrap();
            if status == 200 || status == 404 {
                break;
            }
            assert!(Instant::now() < deadline, "snapshot {tag} stuck: {status} {body}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        settled(&d, &data, &format!("branch round {i}")).await;
        ledger_is_live(&d, &data, &format!("branch round {i}")).await;
    }
    post_ok(&d, "/v1/sandboxes/delete", json!({ "all": true })).await;

    // Compact, cut off: the copy is written whole or not at all, the tag is
    // never left busy, nothing stays in staging.
    let compact = |to: &str| api::CompactSnapshotRequest { tag: "m".into(), to: to.into() };
    let (compact_time, r) = timed(snaps.compact_snapshot(compact("c-probe"))).await;
    r.unwrap();
    assert_eq!(d.delete("/v1/snapshots/c-probe").send().await.unwrap().status(), 200);
    for i in 0..ROUNDS {
        let to = format!("c{i}");
        let delay = within(&mut rng, compact_time);
        if cut_off(delay, snaps.compact_snapshot(compact(&to))).await {
            *finished.entry("compact").or_default() += 1;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = d.get(&format!("/v1/snapshots/{to}/info")).send().await.unwrap();
            let status = r.status();
            let v: serde_json::Value = r.json().await.unwrap();
            if status == 404 {
                break;
            }
            if v["status"] == "ready" {
                // A finished copy forks like its source.
                let kid = fork(&d, &to, 1).await.remove(0);
                sh(&d, &kid, "true").await;
                post_ok(&d, "/v1/sandboxes/delete", json!({ "all": true })).await;
                assert_eq!(d.delete(&format!("/v1/snapshots/{to}")).send().await.unwrap().status(), 200);
                break;
            }
            assert!(Instant::now() < deadline, "compact {to} stuck: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(entries(&data.join("staging")).is_empty() || settled_staging(&data).await, "compact round {i}");
        settled(&d, &data, &format!("compact round {i}")).await;
        ledger_is_live(&d, &data, &format!("compact round {i}")).await;
    }

    // Workspace suspend, cut off: the workspace ends running or suspended,
    // never half-way, and resumes either way.
    let mut ws = d.workspaces().await;
    post_ok(&d, "/v1/workspaces", json!({ "name": "w", "snapshot_tag": "m" })).await;
    let suspend = || api::SuspendWorkspaceRequest { name: "w".into(), diff: None };
    let (suspend_time, r) = timed(ws.suspend_workspace(suspend())).await;
    r.unwrap();
    post_ok(&d, "/v1/workspaces/w/resume", json!({})).await;
    for i in 0..ROUNDS {
        let live = workspace(&d, "w").await["live_sandbox_id"].as_str().unwrap().to_string();
        sh(&d, &live, "echo round > /tmp/round").await;
        let delay = within(&mut rng, suspend_time);
        if cut_off(delay, ws.suspend_workspace(suspend())).await {
            *finished.entry("workspace suspend").or_default() += 1;
        }
        // The suspend finishes (or fails whole) in the background: wait for
        // the workspace to leave the live sandbox behind or keep it.
        idle(&d, &format!("workspace suspend round {i}")).await;
        let v = workspace(&d, "w").await;
        let listed = list(&d).await.iter().any(|s| s["id"] == live.as_str());
        let state = match v["status"].as_str().unwrap() {
            "suspended" if !listed => "suspended",
            "running" if listed && v["live_sandbox_id"] == live.as_str() => "running",
            _ => panic!("workspace half-way after round {i}: {v} (live sandbox listed: {listed})"),
        };
        if state == "suspended" {
            post_ok(&d, "/v1/workspaces/w/resume", json!({})).await;
        }
        let live = workspace(&d, "w").await["live_sandbox_id"].as_str().unwrap().to_string();
        assert_eq!(sh(&d, &live, "cat /tmp/round").await["stdout"], "round\n", "suspend round {i} ({state})");
        settled(&d, &data, &format!("workspace suspend round {i}")).await;
        ledger_is_live(&d, &data, &format!("workspace suspend round {i}")).await;
    }
    let r = d.delete("/v1/workspaces/w").send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    eprintln!("calls that answered before the cut: {finished:?} of {ROUNDS} each");

    post_ok(&d, "/v1/sandboxes/delete", json!({ "all": true })).await;
    let r = d.delete("/v1/snapshots/m").send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let leaked = settled_leaks(&data, &cgroups_before, Duration::from_secs(30)).await;
    assert!(leaked.is_empty(), "leaked: {leaked:?}");
}
