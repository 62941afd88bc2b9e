//! Nothing leaks, nothing escapes: the daemon is SIGKILLed at random
//! moments while it forks, execs and kills, and restarted on the same data
//! dir. After every restart each VMM process belongs to a sandbox the daemon
//! lists and each listed sandbox answers exec; after `kill --all` nothing
//! forkd-owned is left (VMM processes, work dirs and sockets, staging dirs,
//! cgroups, ledger rows). Also: 20 live sandboxes survive a daemon crash and
//! take a concurrent exec load.
//!
//! Bounded: a fixed number of cycles under a time budget, loopback only.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use forkd_integration::{Daemon, Options, vmms_under};
use futures::stream::{self, StreamExt};
use serde_json::{Value, json};

const CHAOS_CYCLES: usize = 10;
const CHAOS_BUDGET: Duration = Duration::from_secs(240);

fn restart(old: Daemon, data: &Path) -> Daemon {
    // The crashed daemon's Drop would kill the VMs it left: they must live on.
    std::mem::forget(old);
    Daemon::start(Options { data_dir: Some(data.to_path_buf()), ..Default::default() })
}

/// The daemon's `forkd_orphans_reaped_total`.
async fn orphans_reaped(d: &Daemon) -> u64 {
    let m = d.get("/metrics").send().await.unwrap().text().await.unwrap();
    m.lines()
        .find(|l| l.starts_with("forkd_orphans_reaped_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// Every VMM under the data dir belongs to a listed sandbox, and every
/// listed running sandbox answers exec. Returns the problems found.
async fn check_invariants(d: &Daemon, data: &Path) -> Vec<String> {
    let mut problems = vec![];
    let listed = list(d).await;
    let pids: HashSet<u32> = listed.iter().filter_map(|s| s["pid"].as_u64()).map(|p| p as u32).collect();
    for p in vmms_under(data) {
        if !pids.contains(&p) {
            problems.push(format!("VMM {p} belongs to no listed sandbox"));
        }
    }
    let client = d.http();
    let base = d.http_url();
    // A sandbox whose VMM ended while no daemon ran (a kill interrupted by
    // the crash) is listed as exited with its reason, and refuses exec.
    let mut live = vec![];
    for s in &listed {
        match s["status"].as_str().unwrap_or("") {
            "running" => live.push(s.clone()),
            "exited" if !s["status_reason"].as_str().unwrap_or("").is_empty() => {
                let id = s["id"].as_str().unwrap();
                let (code, _) = sh_status(&d.http(), &d.http_url(), id, "echo ok", 30).await;
                if code != 409 {
                    problems.push(format!("exited sandbox {id} answered exec with {code}, not 409"));
                }
            }
            other => problems.push(format!("{} is {other:?} without a reason", s["id"])),
        }
    }
    let results: Vec<(String, String, u16, Value)> = stream::iter(live)
        .map(|s| {
            let (client, base) = (client.clone(), base.clone());
            async move {
                let id = s["id"].as_str().unwrap().to_string();
                let status = s["status"].as_str().unwrap_or("").to_string();
                let (code, body) = sh_status(&client, &base, &id, "echo ok", 30).await;
                (id, status, code, body)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for (id, status, code, body) in results {
        if status != "running" || code != 200 || body["stdout"] != "ok\n" {
            problems.push(format!("{id} ({status}) did not answer exec: {code} {body}"));
        }
    }
    problems
}

fn cli_kill_all(d: &Daemon) {
    let out = d.cli().args(["kill", "--all"]).output().expect("run forkd kill --all");
    assert!(out.status.success(), "forkd kill --all: {}", String::from_utf8_lossy(&out.stderr));
}

fn temp_data(prefix: &str) -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp").unwrap();
    let p = t.path().to_path_buf();
    (t, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_crash_restart_cycles_leak_nothing() {
    let _serial = serial().await;
    let cgroups_before = forkd_cgroups();
    let (_tmp, data) = temp_data("forkd-chaos-");
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        ^ std::process::id() as u64;
    let mut rng = Lcg(seed);
    eprintln!("chaos seed {seed}");
    let started = Instant::now();
    let mut d = Daemon::start(Options { data_dir: Some(data.clone()), ..Default::default() });
    bake(&d, "py").await;

    let mut cycles = 0;
    let mut problems: Vec<String> = vec![];
    let mut in_flight_kinds = vec![];
    let mut reaped_total = 0;
    while cycles < CHAOS_CYCLES && started.elapsed() < CHAOS_BUDGET {
        // Ordinary work: fork a few, exec in them, kill one.
        let ids = fork(&d, "py", 2 + rng.below(2) as u32).await;
        for id in &ids {
            assert_eq!(sh(&d, id, "echo hi").await["stdout"], "hi\n");
        }
        let victim = &ids[rng.below(ids.len() as u64) as usize];
        assert_eq!(d.delete(&format!("/v1/sandboxes/{victim}")).send().await.unwrap().status(), 200);

        // Crash while something is in flight.
        let listed: Vec<String> = list(&d).await.iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
        let (client, base) = (d.http(), d.http_url());
        // Each kind of operation is in flight at a crash in turn; the moment is random.
        let kind = (cycles % 3) as u64;
        let target = listed.get(rng.below(listed.len().max(1) as u64) as usize).cloned();
        in_flight_kinds.push(["fork", "kill", "exec"][kind as usize]);
        let op = tokio::spawn(async move {
            match (kind, target) {
                (1, Some(id)) => {
                    let _ = client.delete(format!("{base}/v1/sandboxes/{id}")).send().await;
                }
                (2, Some(id)) => {
                    let _ = sh_status(&client, &base, &id, "sleep 1; echo late", 30).await;
                }
                _ => {
                    let _ = client
                        .post(format!("{base}/v1/sandboxes"))
                        .json(&json!({ "snapshot_tag": "py", "n": 3 }))
                        .send()
                        .await;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(rng.below(400))).await;
        d.crash();
        let _ = tokio::time::timeout(Duration::from_secs(30), op).await;
        d = restart(d, &data);
        cycles += 1;

        let found = check_invariants(&d, &data).await;
        let reaped = orphans_reaped(&d).await;
        reaped_total += reaped;
        eprintln!(
            "cycle {cycles}: {} listed, {} VMMs, in flight: {}, orphans reaped at restart: {reaped}, problems: {found:?}",
            list(&d).await.len(),
            vmms_under(&data).len(),
            in_flight_kinds.last().unwrap()
        );
        problems.extend(found.into_iter().map(|p| format!("cycle {cycles}: {p}")));
        // A few sandboxes at most survive into the next cycle.
        let listed = list(&d).await;
        if listed.len() > 6 {
            let extra: Vec<String> =
                listed[..listed.len() - 4].iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
            let r = d.post("/v1/sandboxes/delete", json!({ "ids": extra })).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
    }

    // The reconciler's work shows in the metrics.
    let metrics = d.get("/metrics").send().await.unwrap().text().await.unwrap();
    let orphan_line = metrics.lines().find(|l| l.starts_with("forkd_orphans_reaped_total")).map(str::to_string);
    let state_line =
        metrics.lines().find(|l| l.starts_with("forkd_sandboxes{") && l.contains("running")).map(str::to_string);
    eprintln!("metrics: {orphan_line:?} {state_line:?}");
    assert!(orphan_line.is_some() && state_line.is_some(), "metrics missing");

    cli_kill_all(&d);
    assert!(list(&d).await.is_empty());
    let leaked = settled_leaks(&data, &cgroups_before, Duration::from_secs(15)).await;
    eprintln!(
        "chaos: {cycles} cycles in {:?}, in-flight ops at the crashes: {in_flight_kinds:?}, orphans reaped: {reaped_total}, invariant problems: {}, leaks found: {}",
        started.elapsed(),
        problems.len(),
        leaked.len()
    );
    assert!(cycles >= 3, "only {cycles} cycles ran in the budget");
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(leaked.is_empty(), "leaked: {leaked:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_live_sandboxes_survive_a_crash_and_take_load() {
    let _serial = serial().await;
    let cgroups_before = forkd_cgroups();
    let (_tmp, data) = temp_data("forkd-restart-");
    let mut d = Daemon::start(Options { data_dir: Some(data.clone()), ..Default::default() });
    bake(&d, "py").await;
    let t = Instant::now();
    let mut ids = fork(&d, "py", 10).await;
    ids.extend(fork(&d, "py", 10).await);
    eprintln!("forked 20 in {:?}", t.elapsed());
    assert_eq!(ids.len(), 20);
    let before: BTreeSet<String> = ids.iter().cloned().collect();
    let pids_before: BTreeSet<u32> = list(&d).await.iter().map(|s| s["pid"].as_u64().unwrap() as u32).collect();

    d.crash();
    assert_eq!(vmms_under(&data).len(), 20, "the VMs outlive the daemon");
    let t = Instant::now();
    d = restart(d, &data);
    eprintln!("restarted and adopted in {:?}", t.elapsed());
    let listed = list(&d).await;
    let after: BTreeSet<String> = listed.iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(after, before, "all 20 adopted");
    let pids_after: BTreeSet<u32> = listed.iter().map(|s| s["pid"].as_u64().unwrap() as u32).collect();
    assert_eq!(pids_after, pids_before, "the same VMM processes");
    let problems = check_invariants(&d, &data).await;
    assert!(problems.is_empty(), "{problems:#?}");
    let on_host: BTreeSet<u32> = vmms_under(&data).into_iter().collect();
    assert_eq!(on_host, pids_after, "no VMM outside the list");
    // Adopted sandboxes keep their cgroups.
    for id in &ids {
        assert!(!cgroup_procs(id).is_empty(), "forkd/{id} still holds its VMM");
    }

    // Load: 25 execs per sandbox, 50 at once.
    let mut auth = reqwest::header::HeaderMap::new();
    auth.insert(reqwest::header::AUTHORIZATION, d.bearer().expect("the daemon's token").parse().unwrap());
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).default_headers(auth).build().unwrap();
    let base = d.http_url();
    let jobs: Vec<(String, usize)> = (0..25).flat_map(|i| ids.iter().map(move |id| (id.clone(), i))).collect();
    let total = jobs.len();
    let t = Instant::now();
    let results: Vec<(Duration, Result<(), String>)> = stream::iter(jobs)
        .map(|(id, i)| {
            let (client, base) = (client.clone(), base.clone());
            async move {
                let t = Instant::now();
                let (code, body) = sh_status(&client, &base, &id, &format!("echo {i}"), 60).await;
                let ok = code == 200 && body["exit_code"] == 0 && body["stdout"] == format!("{i}\n");
                (t.elapsed(), if ok { Ok(()) } else { Err(format!("{id} #{i}: {code} {body}")) })
            }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    let wall = t.elapsed();
    let errors: Vec<&String> = results.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    let mut lat: Vec<Duration> = results.iter().map(|(l, _)| *l).collect();
    lat.sort();
    eprintln!(
        "load: {total} execs over {} sandboxes, concurrency 50, {} errors, {:.1} execs/s; latency p50 {:?} p90 {:?} p99 {:?} max {:?}",
        ids.len(),
        errors.len(),
        total as f64 / wall.as_secs_f64(),
        percentile(&lat, 0.50),
        percentile(&lat, 0.90),
        percentile(&lat, 0.99),
        lat.last().unwrap()
    );
    assert!(total >= 500);
    assert!(errors.is_empty(), "{} errors, first: {:?}", errors.len(), errors.first());

    // An adopted VMM that dies (no exit watcher: the reconciler finds it)
    // ends "exited" with a reason, and its cgroup goes.
    let victim = listed.iter().find(|s| s["id"] == ids[0]).unwrap();
    let pid = victim["pid"].as_u64().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t = Instant::now();
    let got = loop {
        let v: Value = d.get(&format!("/v1/sandboxes/{}", ids[0])).send().await.unwrap().json().await.unwrap();
        if v["status"] == "exited" {
            break v;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "still {} after its VMM died", v["status"]);
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("adopted VMM death noticed in {:?}: {}", t.elapsed(), got["status_reason"]);
    assert!(got["status_reason"].as_str().unwrap().contains("VMM"), "{got}");
    assert!(cgroup_procs(&ids[0]).is_empty() && !forkd_cgroups().contains(&ids[0]));

    // A VMM that dies while no daemon runs: after the restart its sandbox is
    // listed as exited with the reason, refuses work, and deletes cleanly.
    let gone = ids[1].clone();
    let gone_pid = listed.iter().find(|s| s["id"] == gone.as_str()).unwrap()["pid"].as_u64().unwrap() as i32;
    d.crash();
    unsafe { libc::kill(gone_pid, libc::SIGKILL) };
    d = restart(d, &data);
    let v: Value = d.get(&format!("/v1/sandboxes/{gone}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["status"], "exited", "{v}");
    assert!(v["status_reason"].as_str().unwrap().contains("gone when the daemon started"), "{v}");
    let (code, _) = sh_status(&d.http(), &d.http_url(), &gone, "echo ok", 30).await;
    assert_eq!(code, 409, "exec on a sandbox that exited");
    assert_eq!(d.delete(&format!("/v1/sandboxes/{gone}")).send().await.unwrap().status(), 200);
    assert_eq!(d.get(&format!("/v1/sandboxes/{gone}")).send().await.unwrap().status(), 404);

    cli_kill_all(&d);
    let leaked = settled_leaks(&data, &cgroups_before, Duration::from_secs(15)).await;
    assert!(leaked.is_empty(), "leaked: {leaked:#?}");
}

/// The bounded CI subset of `forkd-chaos-bench`: fork, exec, branch and
/// kill with calls cut off by their client and the daemon killed at random
/// moments; the host agrees with the daemon after every cycle and nothing
/// is left at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_with_cut_off_calls_and_daemon_kills_leaks_nothing() {
    let _serial = serial().await;
    let cfg = forkd_integration::chaos::ChaosConfig {
        cycles: 100,
        budget: Duration::from_secs(300),
        cut_one_in: 2,
        crash_one_in: 6,
        ..Default::default()
    };
    eprintln!("chaos seed {}", cfg.seed);
    let r = forkd_integration::chaos::run(&cfg, |l| eprintln!("{l}")).await;
    eprintln!(
        "chaos: {} cycles in {:?}, ops {:?}, {} cut off, {} daemon kills, slowest restart {:?}",
        r.cycles, r.elapsed, r.ops, r.cut_off, r.crashes, r.slowest_restart
    );
    assert!(r.cycles >= 40, "only {} cycles ran in the budget", r.cycles);
    assert!(r.cut_off > 0 && r.crashes > 0, "the run cut nothing off or killed nothing: {r:?}");
    assert!(r.problems.is_empty(), "{:#?}", r.problems);
    assert!(r.leaks.is_empty(), "leaked: {:#?}", r.leaks);
}

/// A daemon killed with many live sandboxes adopts every one on restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_adopts_a_hundred_live_sandboxes() {
    let _serial = serial().await;
    let (adopted, forked) = forkd_integration::chaos::adopt(100, "minimal").await.unwrap();
    eprintln!("100 sandboxes forked in {forked:?}; adopted after SIGKILL in {adopted:?}");
}
