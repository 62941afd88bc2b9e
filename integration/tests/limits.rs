//! Per-sandbox limits inside real guests: a memory hog over the limit gets
//! the VMM OOM-killed and reported, a fork bomb is stopped by the pids
//! limit, a CPU quota lands in the cgroup, VMMs hold no capabilities, and
//! out-of-range limits are refused naming the field.

mod common;

use std::time::{Duration, Instant};

use common::*;
use forkd_api::v1 as api;
use forkd_integration::{Daemon, Options};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_pids_and_cpu_limits() {
    let _serial = serial();
    let before = forkd_cgroups();
    let d = Daemon::start(Options::default());
    bake(&d, "py").await;

    // Out-of-range limits: 400 naming the field, nothing created.
    for (body, field) in [
        (json!({ "memory_limit_mib": 63 }), "memory_limit_mib"),
        (json!({ "cpu_quota": 0.001 }), "cpu_quota"),
        (json!({ "cpu_quota": 65.0 }), "cpu_quota"),
        (json!({ "cpu_quota": -1.0 }), "cpu_quota"),
        (json!({ "pids_limit": 7 }), "pids_limit"),
    ] {
        let mut b = json!({ "snapshot_tag": "py", "n": 1 });
        for (k, v) in body.as_object().unwrap() {
            b[k] = v.clone();
        }
        let r = d.post("/v1/sandboxes", b.clone()).send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(status, 400, "{b}: {text}");
        assert!(text.contains(field), "{b}: {text}");
    }
    assert!(list(&d).await.is_empty());

    // --- OOM: 160 MiB for a 256 MiB guest, then ~200 MiB written inside.
    let kid = &fork_with(&d, "py", 1, json!({ "memory_limit_mib": 160 })).await[0];
    let id = kid["id"].as_str().unwrap().to_string();
    assert_eq!(kid["memory_limit_mib"], 160);
    let limit: u64 = cgroup_file(&id, "memory", "memory.limit_in_bytes")
        .or_else(|| cgroup_file(&id, "memory", "memory.max"))
        .expect("memory limit file")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(limit, 160 << 20);
    let pid = kid["pid"].as_u64().unwrap() as u32;
    assert!(cgroup_procs(&id).contains(&pid), "the VMM {pid} is in forkd/{id}");
    // VMMs run without any capability.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for set in ["CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"] {
        let line = status.lines().find(|l| l.starts_with(set)).unwrap();
        assert!(line.ends_with("0000000000000000"), "VMM {line}");
    }
    let mut events = d
        .sandboxes()
        .await
        .watch_events(api::WatchEventsRequest { sandbox_id: id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let t = Instant::now();
    let hog = "import time\nkeep = []\nfor i in range(20):\n    keep.append(b'\\x01' * (10 << 20))\n    print(i, flush=True)\ntime.sleep(30)\n";
    let (code, body) = sh_status(&d.http(), &d.http_url(), &id, &format!("python3 -c \"{hog}\""), 60).await;
    eprintln!("hog exec answered {code} after {:?}: {body}", t.elapsed());
    assert_ne!(code, 200, "the hog must not finish: {body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let got = loop {
        let v: Value = d.get(&format!("/v1/sandboxes/{id}")).send().await.unwrap().json().await.unwrap();
        if v["status"] == "exited" {
            break v;
        }
        assert!(Instant::now() < deadline, "sandbox still {} after the hog", v["status"]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let reason = got["status_reason"].as_str().unwrap();
    eprintln!("OOM reported after {:?}: {reason}", t.elapsed());
    assert!(reason.starts_with("oom"), "{reason}");
    let mut kinds = vec![];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !kinds.iter().any(|k| k == "oom") && Instant::now() < deadline {
        if let Ok(Ok(Some(ev))) = tokio::time::timeout(Duration::from_secs(2), events.message()).await {
            kinds.push(ev.kind.clone());
            if ev.kind == "oom" {
                assert!(ev.reason.starts_with("oom"), "{}", ev.reason);
            }
        }
    }
    assert!(kinds.iter().any(|k| k == "oom"), "events seen: {kinds:?}");
    assert!(!forkd_cgroups().contains(&id), "the exited sandbox's cgroup is removed");
    // Exec on an exited sandbox is refused with the reason.
    let (code, body) = sh_status(&d.http(), &d.http_url(), &id, "true", 10).await;
    assert_eq!(code, 409, "{body}");

    // --- Fork bomb under pids_limit 64.
    let kid = &fork_with(&d, "py", 1, json!({ "pids_limit": 64 })).await[0];
    let bid = kid["id"].as_str().unwrap().to_string();
    let t = Instant::now();
    let (code, body) =
        sh_status(&d.http(), &d.http_url(), &bid, "bomb() { bomb | bomb & }; bomb 2>/dev/null; sleep 30", 10).await;
    eprintln!("fork bomb ended after {:?}: timed_out={}", t.elapsed(), body["timed_out"]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["timed_out"], true, "{body}");
    let v = sh(
        &d,
        &bid,
        "cd /sys/fs/cgroup/forkd-exec && echo max=$(cat pids.max) peak=$(cat pids.peak 2>/dev/null || echo none) \
         refused=$(awk '/^max/ {print $2}' pids.events) now=$(cat pids.current)",
    )
    .await;
    let line = v["stdout"].as_str().unwrap().trim().to_string();
    eprintln!("guest pids cgroup after the bomb: {line}");
    let field =
        |k: &str| line.split_whitespace().find_map(|f| f.strip_prefix(&format!("{k}="))).unwrap_or("").to_string();
    assert_eq!(field("max"), "64");
    let refused: u64 = field("refused").parse().unwrap();
    assert!(refused > 0, "the limit refused forks: {line}");
    if let Ok(peak) = field("peak").parse::<u64>() {
        assert!(peak <= 64, "never more than the limit: {line}");
    }
    let now: u64 = field("now").parse().unwrap();
    assert!(now <= 3, "the bomb is gone: {line}");
    assert_eq!(sh(&d, &bid, "echo alive").await["stdout"], "alive\n");
    let host_pids: u64 = cgroup_file(&bid, "pids", "pids.max").unwrap().trim().parse().unwrap();
    assert!(host_pids >= 64, "host pids.max {host_pids}");

    // --- CPU quota.
    let kid = &fork_with(&d, "py", 1, json!({ "cpu_quota": 0.5 })).await[0];
    let cid = kid["id"].as_str().unwrap().to_string();
    let quota = cgroup_file(&cid, "cpu", "cpu.cfs_quota_us")
        .map(|q| q.trim().to_string())
        .or_else(|| cgroup_file(&cid, "cpu", "cpu.max").map(|m| m.split_whitespace().next().unwrap_or("").to_string()))
        .unwrap();
    assert_eq!(quota, "50000");
    assert_eq!(sh(&d, &cid, "echo ok").await["stdout"], "ok\n");

    // Killing removes every cgroup.
    let r = d.post("/v1/sandboxes/delete", json!({ "all": true })).send().await.unwrap();
    assert_eq!(r.status(), 200);
    for i in [&id, &bid, &cid] {
        assert!(!forkd_cgroups().contains(i), "forkd/{i} is gone");
    }
    let left = settled_leaks(&d.data_dir, &before, Duration::from_secs(10)).await;
    assert!(left.is_empty(), "leaks: {left:?}");
}
