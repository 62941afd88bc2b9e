//! Admission control against a real daemon and real VMs: a fork over
//! --max-sandboxes, a fork whose children cannot fit in the host's memory,
//! and snapshot writes under --min-free-mib or over --max-snapshot-bytes
//! are refused with 429 and the numbers, and nothing is created; sandboxes
//! that ask for no memory limit get the default one.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use forkd_integration::{Daemon, Options, vmms_under};
use serde_json::{Value, json};

/// POSTs `body`; asserts 429 and returns the message.
async fn refused(d: &Daemon, path: &str, body: Value) -> String {
    let r = d.post(path, body.clone()).send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, 429, "POST {path} {body}: {text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["code"], "RESOURCE_EXHAUSTED", "{text}");
    eprintln!("refused as expected: {}", v["error"]);
    v["error"].as_str().unwrap().to_string()
}

/// Nothing of a sandbox exists: none listed, no VMM, no work dir, no
/// ledger row.
async fn no_sandboxes(d: &Daemon) {
    assert!(list(d).await.is_empty(), "{:?}", list(d).await);
    assert!(vmms_under(&d.data_dir.join("sandboxes")).is_empty(), "a VMM was started");
    assert!(entries(&d.data_dir.join("sandboxes")).is_empty(), "a work dir was made");
    assert!(ledger(&d.data_dir).is_empty(), "ledger: {:?}", ledger(&d.data_dir));
}

/// `forkd_admission_refused_total` for `reason`, from GET /metrics.
async fn refusals(d: &Daemon, reason: &str) -> u64 {
    let text = d.get("/metrics").send().await.unwrap().text().await.unwrap();
    let label = format!("reason=\"{reason}\"");
    text.lines()
        .find(|l| l.starts_with("forkd_admission_refused_total{") && l.contains(&label))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or_else(|| panic!("no refusal count for {reason} in\n{text}"))
}

fn mem_available_mib() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kib / 1024
}

fn has_memory_cgroup() -> bool {
    cgroup_roots().iter().any(|r| {
        r.ends_with("memory")
            || std::fs::read_to_string(r.join("cgroup.controllers")).unwrap_or_default().contains("memory")
    })
}

fn snapshot_files(data_dir: &Path) -> Vec<String> {
    let mut out = entries(&data_dir.join("snapshots"));
    out.extend(entries(&data_dir.join("staging")));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forks_over_the_sandbox_count_or_host_memory_are_refused() {
    let _serial = serial().await;
    let before = forkd_cgroups();
    let d = Daemon::start(Options { extra_args: vec!["--max-sandboxes".into(), "2".into()], ..Default::default() });
    let r = d.post("/v1/snapshots", json!({ "tag": "m", "image": "minimal" })).send().await.unwrap();
    assert_eq!(r.status(), 202, "accepted: the snapshot is being written");
    wait_ready(&d, "m").await;

    let e = refused(&d, "/v1/sandboxes", json!({ "snapshot_tag": "m", "n": 3 })).await;
    assert!(e.contains("3 asked, 0 live and 0 starting, at most 2 (--max-sandboxes)"), "{e}");
    no_sandboxes(&d).await;

    // Two children that each may take all the memory the host has.
    let avail = mem_available_mib();
    let e = refused(&d, "/v1/sandboxes", json!({ "snapshot_tag": "m", "n": 2, "memory_limit_mib": avail })).await;
    assert!(e.contains("not enough host memory: 2 children need"), "{e}");
    assert!(e.contains(&format!("(2 × {avail} MiB")), "{e}");
    assert!(e.contains("MiB is available"), "{e}");
    no_sandboxes(&d).await;

    // No limit asked: the default one (guest RAM 256 MiB + 64 MiB).
    let kid = &fork_with(&d, "m", 1, json!({})).await[0];
    let id = kid["id"].as_str().unwrap().to_string();
    if has_memory_cgroup() {
        assert_eq!(kid["memory_limit_mib"], 320, "{kid}");
        let limit: u64 = cgroup_file(&id, "memory", "memory.limit_in_bytes")
            .or_else(|| cgroup_file(&id, "memory", "memory.max"))
            .expect("memory limit file")
            .trim()
            .parse()
            .unwrap();
        assert_eq!(limit, 320 << 20);
    }
    let e = refused(&d, "/v1/sandboxes", json!({ "snapshot_tag": "m", "n": 2 })).await;
    assert!(e.contains("2 asked, 1 live and 0 starting, at most 2"), "{e}");
    assert_eq!(list(&d).await.len(), 1);
    fork(&d, "m", 1).await;
    let e = refused(&d, "/v1/sandboxes", json!({ "snapshot_tag": "m", "n": 1 })).await;
    assert!(e.contains("1 asked, 2 live"), "{e}");

    // Killed sandboxes free their places.
    let r = d.post("/v1/sandboxes/delete", json!({ "all": true })).send().await.unwrap();
    assert_eq!(r.status(), 200);
    fork(&d, "m", 2).await;
    d.post("/v1/sandboxes/delete", json!({ "all": true })).send().await.unwrap();

    // The limit holds across requests: of two concurrent forks of 2, one
    // is admitted and the other refused, whichever comes first.
    let two = || async {
        let r = d.post("/v1/sandboxes", json!({ "snapshot_tag": "m", "n": 2 })).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.text().await.unwrap())
    };
    let (a, b) = tokio::join!(two(), two());
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(statuses, [201, 429], "{a:?} {b:?}");
    let refusal = if a.0 == 429 { &a.1 } else { &b.1 };
    assert!(refusal.contains("at most 2 (--max-sandboxes)"), "{refusal}");
    assert_eq!(list(&d).await.len(), 2);
    d.post("/v1/sandboxes/delete", json!({ "all": true })).send().await.unwrap();
    assert_eq!(refusals(&d, "max_sandboxes").await, 4);
    assert_eq!(refusals(&d, "memory").await, 1);
    assert_eq!(refusals(&d, "disk_free").await, 0);
    let left = settled_leaks(&d.data_dir, &before, Duration::from_secs(10)).await;
    assert!(left.is_empty(), "leaks: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_writes_under_the_disk_floor_or_over_the_quota_are_refused() {
    let _serial = serial().await;
    let before = forkd_cgroups();
    // One data dir for three daemons with different flags.
    let keep = tempfile::Builder::new().prefix("forkd-it-adm-").tempdir_in("/tmp").unwrap();
    let moved = keep.path().to_path_buf();
    // A snapshot made while there is room.
    let d = Daemon::start(Options { data_dir: Some(moved.clone()), ..Default::default() });
    let r = d.post("/v1/snapshots", json!({ "tag": "m", "image": "minimal" })).send().await.unwrap();
    assert_eq!(r.status(), 202, "accepted: the snapshot is being written");
    wait_ready(&d, "m").await;
    drop(d);

    // Now the floor is far above what any disk has.
    let d = Daemon::start(Options {
        data_dir: Some(moved.clone()),
        extra_args: vec!["--min-free-mib".into(), "1000000000".into(), "--max-sandboxes".into(), "1000".into()],
        ..Default::default()
    });
    let files = snapshot_files(&moved);
    let e = refused(&d, "/v1/snapshots", json!({ "tag": "n", "image": "minimal" })).await;
    assert!(e.contains("not enough disk space for snapshot \"n\""), "{e}");
    assert!(
        e.contains("MiB free, 256 MiB estimated for it, and 1000000000 MiB must stay free (--min-free-mib)"),
        "{e}"
    );
    let r = d.get("/v1/snapshots/n/info").send().await.unwrap();
    assert_eq!(r.status(), 404, "a refused snapshot is not recorded");
    let e = refused(&d, "/v1/snapshots/m/compact", json!({ "to": "flat" })).await;
    assert!(e.contains("compacting \"m\" into \"flat\""), "{e}");
    let e = refused(&d, "/v1/snapshots/m/derive", json!({ "tag": "der", "exec": ["true"] })).await;
    assert!(e.contains("deriving \"der\" from \"m\""), "{e}");
    no_sandboxes(&d).await;
    let id = fork(&d, "m", 1).await.remove(0);
    let e = refused(&d, &format!("/v1/sandboxes/{id}/branch"), json!({ "tag": "b", "mode": "diff" })).await;
    assert!(e.contains("not enough disk space for branch \"b\""), "{e}");
    let e = refused(&d, &format!("/v1/sandboxes/{id}/branch"), json!({ "tag": "b", "mode": "full" })).await;
    assert!(e.contains("256 MiB estimated"), "{e}");
    assert_eq!(snapshot_files(&moved), files, "nothing was written to the snapshot store");
    let snaps: Value = d.get("/v1/snapshots").send().await.unwrap().json().await.unwrap();
    assert_eq!(snaps.to_string().matches("\"tag\"").count(), 1, "{snaps}");
    assert_eq!(sh(&d, &id, "echo alive").await["stdout"], "alive\n", "the branch source keeps running");
    d.post("/v1/sandboxes/delete", json!({ "all": true })).send().await.unwrap();
    assert_eq!(refusals(&d, "disk_free").await, 5);

    // More children than the host's memory holds (each 256 MiB + 64 MiB).
    let avail = mem_available_mib();
    if avail / 320 < 1000 {
        let e = refused(&d, "/v1/sandboxes", json!({ "snapshot_tag": "m", "n": 1000 })).await;
        assert!(e.contains("1000 children need 320000 MiB (1000 × 320 MiB"), "{e}");
        no_sandboxes(&d).await;
    }
    drop(d);

    // A quota smaller than the snapshot already stored.
    let d = Daemon::start(Options {
        data_dir: Some(moved.clone()),
        extra_args: vec!["--max-snapshot-bytes".into(), "1048576".into()],
        ..Default::default()
    });
    let e = refused(&d, "/v1/snapshots/m/compact", json!({ "to": "flat" })).await;
    assert!(e.contains("snapshot store quota exceeded by compacting \"m\" into \"flat\""), "{e}");
    assert!(e.contains("bytes estimated for it > 1048576 bytes (--max-snapshot-bytes)"), "{e}");
    assert_eq!(snapshot_files(&moved), files);
    assert_eq!(refusals(&d, "snapshot_quota").await, 1);
    let left = settled_leaks(&moved, &before, Duration::from_secs(10)).await;
    assert!(left.is_empty(), "leaks: {left:?}");
}
