//! The fork-correctness contract on every path a child can come from: cold
//! (restored for the fork), hot (taken from a pool, one that sat idle for
//! 30 s first) and branched (forked from a branch of a running child). Each
//! child has its own /dev/urandom, uuid4, `random` and numpy streams, its
//! own hostname (its id) and a clock within 1 s of the host's.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use forkd_integration::{Daemon, Options};
use serde_json::{Value, json};

fn host_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// One child's samples: urandom, uuid4, random.random(), numpy.random.
async fn samples(d: &Daemon, id: &str) -> [String; 4] {
    let out = sh(d, id, "hostname; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'").await;
    let text = out["stdout"].as_str().unwrap().to_string();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(id), "the hostname of {id} is its id");
    let urandom = lines.next().unwrap().to_string();
    let code = "import uuid, random, numpy\n\
                f'{uuid.uuid4()} {random.random()!r} {numpy.random.random()!r}'";
    let v = eval(d, id, code).await;
    let mut parts = v.trim_matches('\'').split(' ').map(str::to_string);
    let (u, r, n) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
    // The clock: read between two host readings, within 1 s of them.
    let before = host_now();
    let guest: f64 = eval(d, id, "import time\ntime.time()").await.parse().unwrap();
    let after = host_now();
    assert!(guest > before - 1.0 && guest < after + 1.0, "{id}: guest clock {guest}, host {before}..{after}");
    [urandom, u, r, n]
}

/// Checks a group of children and adds their samples to `seen`, which
/// must stay distinct across every group.
async fn check_group(d: &Daemon, what: &str, ids: &[String], seen: &mut [HashSet<String>; 4]) {
    for id in ids {
        for (set, sample) in seen.iter_mut().zip(samples(d, id).await) {
            assert!(set.insert(sample.clone()), "{what} child {id} repeats a sample: {sample}");
        }
    }
}

async fn pool_ready(d: &Daemon, tag: &str) -> u64 {
    let pools: Value = d.get("/v1/pools").send().await.unwrap().json().await.unwrap();
    pools.as_array().unwrap().iter().find(|p| p["tag"] == tag).map_or(0, |p| p["ready"].as_u64().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_child_is_its_own_machine_cold_hot_or_branched() {
    let _serial = serial().await;
    let d = Daemon::start(Options::default());
    bake(&d, "py").await;
    let mut seen: [HashSet<String>; 4] = Default::default();

    // Cold: restored for the fork; prewarm leaves ten hot children behind.
    let cold: Vec<String> = fork_with(&d, "py", 10, json!({ "prewarm": true }))
        .await
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    check_group(&d, "cold", &cold, &mut seen).await;
    let source = cold[0].clone();
    post_ok(&d, "/v1/sandboxes/delete", json!({ "ids": cold[1..] })).await;

    // Hot: the pool fills, sits idle for 30 s, then serves a fork of ten.
    let deadline = Instant::now() + Duration::from_secs(300);
    while pool_ready(&d, "py").await < 10 {
        assert!(Instant::now() < deadline, "the pool did not fill: {}", pool_ready(&d, "py").await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    let hot = fork(&d, "py", 10).await;
    assert_eq!(pool_ready(&d, "py").await, 0, "all ten came from the pool");
    check_group(&d, "hot", &hot, &mut seen).await;
    post_ok(&d, "/v1/sandboxes/delete", json!({ "ids": hot })).await;

    // Branched: children of a branch of a running child.
    branch(&d, &source, "py-b", "diff").await;
    let branched = fork(&d, "py-b", 10).await;
    check_group(&d, "branched", &branched, &mut seen).await;
    let ids: HashSet<&String> = cold.iter().chain(&hot).chain(&branched).collect();
    assert_eq!(ids.len(), 30, "thirty distinct sandbox ids");
    post_ok(&d, "/v1/sandboxes/delete", json!({ "all": true })).await;
}
