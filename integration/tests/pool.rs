//! Hot pools (`prewarm`, `--pool TAG=N`): children restored, re-initialized
//! and paused ahead of time serve later spawns with a full identity
//! re-init; a configured pool is refilled after forks, at the lowest CPU
//! weight; the reconciler leaves them alone; deleting the snapshot, stopping
//! the daemon or a crash and restart leave none behind.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use common::{cgroup_file, cli_output, fork, fork_with, list, serial, sh, wait_ready};
use forkd_integration::support::forkd_cgroups;
use forkd_integration::{Daemon, Options, memory_cgroup_of, vmms_under};
use serde_json::json;

/// `forkd_pool_vmms` for `tag` from /metrics (0 when absent).
async fn pool_size(d: &Daemon, tag: &str) -> u64 {
    let text = d.get("/metrics").send().await.unwrap().text().await.unwrap();
    let label = format!("snapshot=\"{tag}\"");
    text.lines()
        .filter(|l| l.starts_with("forkd_pool_vmms") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

async fn wait_pool(d: &Daemon, tag: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let have = pool_size(d, tag).await;
        if have == want {
            return;
        }
        assert!(Instant::now() < deadline, "pool of {tag}: {have}, expected {want}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn sandbox_dirs(d: &Daemon) -> BTreeSet<String> {
    std::fs::read_dir(d.data_dir.join("sandboxes"))
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

async fn settle_vmms(d: &Daemon, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = vmms_under(&d.data_dir).len();
        if n == want || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_vmms_serve_spawns_and_never_leak() {
    let _serial = serial().await;
    let data = tempfile::Builder::new().prefix("forkd-pool-").tempdir_in("/tmp").unwrap();
    let opts = Options { data_dir: Some(data.path().to_path_buf()), ..Default::default() };
    let mut d = Daemon::start(opts.clone());
    d.post("/v1/snapshots", json!({ "tag": "p", "image": "minimal" })).send().await.unwrap();
    wait_ready(&d, "p").await;

    // A prewarmed fork leaves two VMMs waiting.
    let first: Vec<String> = fork_with(&d, "p", 2, json!({ "prewarm": true }))
        .await
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    wait_pool(&d, "p", 2).await;
    assert_eq!(settle_vmms(&d, 4).await, 4, "2 children + 2 pooled");
    let pooled: BTreeSet<String> = sandbox_dirs(&d).into_iter().filter(|n| !first.contains(n)).collect();
    assert_eq!(pooled.len(), 2, "{pooled:?}");
    // Every VMM, the pooled ones too, is in the cgroup of its own id.
    let cgroups: BTreeSet<String> = vmms_under(&d.data_dir).into_iter().map(memory_cgroup_of).collect();
    let want: BTreeSet<String> = sandbox_dirs(&d).iter().map(|n| format!("/forkd/{n}")).collect();
    assert_eq!(cgroups, want, "VMMs and their cgroups");

    // The reconciler (every 5 s) counts them as owned.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(pool_size(&d, "p").await, 2);
    assert_eq!(vmms_under(&d.data_dir).len(), 4);

    // The next fork is served from the pool, with a full re-init.
    let t = Instant::now();
    let next = fork(&d, "p", 3).await;
    eprintln!("fork 3 with 2 pooled took {:?}", t.elapsed());
    assert!(pooled.iter().all(|p| next.contains(p)), "pooled {pooled:?} not used by {next:?}");
    assert_eq!(pool_size(&d, "p").await, 0);
    let mut samples = HashSet::new();
    for id in first.iter().chain(&next) {
        let out = sh(&d, id, "hostname; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'").await;
        let text = out["stdout"].as_str().unwrap().to_string();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some(id.as_str()), "hostname of {id}");
        samples.insert(lines.next().unwrap().to_string());
    }
    assert_eq!(samples.len(), 5, "every child has its own entropy: {samples:?}");

    // Deleting the snapshot empties its pool; nothing is left.
    fork_with(&d, "p", 1, json!({ "prewarm": true })).await;
    wait_pool(&d, "p", 1).await;
    d.post("/v1/sandboxes/delete", json!({ "all": true })).send().await.unwrap();
    assert_eq!(settle_vmms(&d, 1).await, 1, "only the pooled VMM");
    let r = d.delete("/v1/snapshots/p").send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(settle_vmms(&d, 0).await, 0);
    assert_eq!(pool_size(&d, "p").await, 0);
    assert!(sandbox_dirs(&d).is_empty(), "{:?}", sandbox_dirs(&d));
    let left: Vec<String> = forkd_cgroups().into_iter().filter(|c| pooled.contains(c) || first.contains(c)).collect();
    assert!(left.is_empty(), "cgroups left behind: {left:?}");

    // A crash leaves a pooled VMM behind; the next daemon reaps it and
    // adopts the live sandbox.
    d.post("/v1/snapshots", json!({ "tag": "q", "image": "minimal" })).send().await.unwrap();
    wait_ready(&d, "q").await;
    let live = fork_with(&d, "q", 1, json!({ "prewarm": true })).await[0]["id"].as_str().unwrap().to_string();
    wait_pool(&d, "q", 1).await;
    let crashed_pool: Vec<String> = sandbox_dirs(&d).into_iter().filter(|n| *n != live).collect();
    assert_eq!(crashed_pool.len(), 1);
    assert!(forkd_cgroups().contains(&crashed_pool[0]), "the pooled VMM's cgroup");
    d.crash();
    assert_eq!(vmms_under(&d.data_dir).len(), 2);
    let mut d = Daemon::start(opts.clone());
    assert_eq!(settle_vmms(&d, 1).await, 1, "the pooled VMM is reaped");
    assert_eq!(sandbox_dirs(&d), BTreeSet::from([live.clone()]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while forkd_cgroups().contains(&crashed_pool[0]) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!forkd_cgroups().contains(&crashed_pool[0]), "the reaped pooled VMM's cgroup is gone");
    assert_eq!(sh(&d, &live, "hostname").await["stdout"], format!("{live}\n"));

    // A graceful stop drains the pool; the live sandbox stays for adoption.
    fork_with(&d, "q", 1, json!({ "prewarm": true })).await;
    wait_pool(&d, "q", 1).await;
    assert_eq!(vmms_under(&d.data_dir).len(), 3);
    d.stop();
    assert_eq!(vmms_under(&d.data_dir).len(), 2, "pooled VMM stopped with the daemon");
    let d = Daemon::start(opts);
    d.post("/v1/sandboxes/delete", json!({ "all": true })).send().await.unwrap();
    assert_eq!(settle_vmms(&d, 0).await, 0);
}

/// Whether sandbox `id`'s cgroup has the lowest CPU weight (cgroup v2
/// cpu.weight 1, v1 cpu.shares 2) rather than a sandbox's (100, 1024).
fn in_background(id: &str) -> bool {
    let read = |f: &str| cgroup_file(id, "cpu", f).map(|w| w.trim().to_string());
    match (read("cpu.weight"), read("cpu.shares")) {
        (Some(w), _) => {
            assert!(w == "1" || w == "100", "cpu.weight of {id}: {w}");
            w == "1"
        }
        (None, Some(s)) => {
            assert!(s == "2" || s == "1024", "cpu.shares of {id}: {s}");
            s == "2"
        }
        (None, None) => panic!("sandbox {id} has no cpu cgroup"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_pool_is_kept_full_listed_and_yields_the_cpu() {
    let _serial = serial().await;
    let opts = Options { extra_args: vec!["--pool".into(), "p=2".into()], ..Default::default() };
    let d = Daemon::start(opts);
    // The snapshot is made after the daemon started: its pool fills at its
    // first fork and is topped up after every fork.
    d.post("/v1/snapshots", json!({ "tag": "p", "image": "minimal" })).send().await.unwrap();
    wait_ready(&d, "p").await;
    let first = fork(&d, "p", 1).await;
    wait_pool(&d, "p", 2).await;
    let pooled: Vec<String> = sandbox_dirs(&d).into_iter().filter(|n| !first.contains(n)).collect();
    assert_eq!(pooled.len(), 2, "{pooled:?}");
    for id in &pooled {
        assert!(in_background(id), "a pooled child waits at the lowest CPU weight");
    }
    let pools: serde_json::Value = d.get("/v1/pools").send().await.unwrap().json().await.unwrap();
    assert_eq!(pools, json!([{ "tag": "p", "ready": 2, "filling": 0, "target": 2, "network": "none" }]));
    let (code, out, err) = cli_output(&d, &["pool", "ls", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap(), pools);
    assert_eq!(list(&d).await.len(), 1, "pooled children are not sandboxes of anyone's yet");

    // A fork of two takes both, at a sandbox's CPU weight; the pool refills.
    let next = fork(&d, "p", 2).await;
    assert!(pooled.iter().all(|p| next.contains(p)), "pooled {pooled:?} not used by {next:?}");
    for id in &next {
        assert!(!in_background(id), "a taken child has a sandbox's weight");
        assert_eq!(sh(&d, id, "hostname").await["stdout"], format!("{id}\n"));
    }
    wait_pool(&d, "p", 2).await;

    // Deleting the snapshot drains its pool; nothing is left.
    d.post("/v1/sandboxes/delete", json!({ "all": true })).send().await.unwrap();
    let r = d.delete("/v1/snapshots/p").send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(settle_vmms(&d, 0).await, 0);
    let pools: serde_json::Value = d.get("/v1/pools").send().await.unwrap().json().await.unwrap();
    assert_eq!(pools, json!([]), "the pool of a snapshot that is gone is not listed");
    assert!(sandbox_dirs(&d).is_empty(), "{:?}", sandbox_dirs(&d));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forkd_bench_reports_every_row_next_to_its_baseline() {
    let _serial = serial().await;
    let d = Daemon::start(Options::default());
    d.post("/v1/snapshots", json!({ "tag": "b", "image": "minimal" })).send().await.unwrap();
    wait_ready(&d, "b").await;
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("bench.png");
    let png_arg = png.display().to_string();
    let args = ["bench", "--tag", "b", "--fanout", "2", "--execs", "3", "--phases", "--plot", &png_arg];
    let (code, out, err) = cli_output(&d, &args);
    assert_eq!(code, 0, "{out}\n{err}");
    for row in [
        "spawn(1), to answering",
        "spawn(1) from a pool",
        "bare pre-started restore",
        "pooled ratio",
        "fan-out 2 from a hot pool",
        "pooled fan-out 2 ratio to bare",
        "from a pool ms",
        "exec p99 while a pool of 4 refills",
        "refill p99 ratio",
        "identity re-init (one round trip)",
        "in the guest: entropy",
        "guest pages the child wrote (its own)",
        "TCG translated code",
        "without TCG code",
        "KSM:",
    ] {
        assert!(out.contains(row), "no row {row:?} in\n{out}");
    }
    let image = std::fs::read(&png).unwrap();
    assert_eq!(&image[..4], b"\x89PNG", "--plot wrote a PNG");

    let (code, out, err) =
        cli_output(&d, &["bench", "--tag", "b", "--fanout", "2,3", "--execs", "3", "--rounds", "2", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for key in ["spawn1_ms", "pooled_spawn1_ms", "bare_pooled_ms", "exec_p99_at_rest_ms", "exec_p99_during_refill_ms"] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {v}");
    }
    assert!(v["pool_fanout"]["forkd_ms"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["phases"]["cold"]["restore_ms"].as_f64().unwrap() > 0.0, "{v}");
    let pooled_restore = v["phases"]["pooled"]["restore_ms"].as_f64().unwrap();
    assert!(pooled_restore < 1.0, "a pooled child is not restored on the fork's path: {v}");
    assert!(v["fanout"][0]["bare_ms"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["fanout"][0]["ratio"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["fanout"][0]["rounds"], 2, "{v}");
    // Every fan-out size is also taken from a hot pool (the second one by
    // a pool of its own size).
    for row in 0..2 {
        assert!(v["fanout"][row]["pooled_ms"].as_f64().unwrap() > 0.0, "{v}");
        assert!(v["fanout"][row]["pooled_ratio"].as_f64().unwrap() > 0.0, "{v}");
    }
    // Where the time and the memory go: the guest's own re-init steps
    // (the entropy step always runs), the bare restore's phases, and PSS
    // split between guest memory and the VMM's own.
    assert!(v["phases"]["cold"]["guest_steps"]["entropy_ms"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["phases"]["bare"]["first_answer_ms"].as_f64().unwrap() > 0.0, "{v}");
    for side in ["cold", "pooled", "bare"] {
        let split = &v["pss_split"][side];
        assert!(split["guest_shared_mib"].as_f64().unwrap() > 0.0, "{side}: {v}");
        assert!(split["vmm_mib"].as_f64().unwrap() > 0.0, "{side}: {v}");
    }
    let tcg_code = v["pss_split"]["cold"]["tcg_code_mib"].as_f64().unwrap();
    assert_eq!(tcg_code > 0.0, v["accel"] == "tcg", "translated code exactly under TCG: {v}");
    // The bench leaves no sandbox and no pool behind.
    assert!(list(&d).await.is_empty());
    let pools: serde_json::Value = d.get("/v1/pools").send().await.unwrap().json().await.unwrap();
    assert!(pools.as_array().unwrap().iter().all(|p| p["ready"] == 0), "{pools}");
    assert_eq!(settle_vmms(&d, 0).await, 0);
}
