//! Chaos cycles against a real daemon: fork, exec, branch and kill, each
//! call cut off by its client at a random moment now and then, and the
//! daemon SIGKILLed mid-operation now and then and started again on the
//! same data dir. After every cycle the host must agree with the daemon
//! (every VMM is a listed sandbox, every listed running sandbox has its VMM
//! and answers exec, no tag stays busy); at the end nothing forkd-owned is
//! left. The integration test runs a bounded number of cycles; the bench
//! (`forkd-chaos-bench`) runs a thousand and prints the figures.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::*;
use crate::{Daemon, Options, vmms_under};

/// How many cycles, how often calls are cut off and the daemon killed.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    pub cycles: usize,
    /// Stop starting cycles after this long.
    pub budget: Duration,
    /// A call is cut off by its client in one cycle of this many.
    pub cut_one_in: u64,
    /// The daemon is SIGKILLed during an operation in one cycle of this many.
    pub crash_one_in: u64,
    pub seed: u64,
    /// Image of the snapshot children are forked from.
    pub image: String,
}

impl Default for ChaosConfig {
    fn default() -> Self {
        ChaosConfig {
            cycles: 40,
            budget: Duration::from_secs(300),
            cut_one_in: 2,
            crash_one_in: 8,
            seed: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1),
            image: "minimal".into(),
        }
    }
}

/// What a run did and found.
#[derive(Debug, Default)]
pub struct ChaosReport {
    pub cycles: usize,
    pub ops: BTreeMap<&'static str, usize>,
    pub cut_off: usize,
    pub crashes: usize,
    /// Invariant violations seen after a cycle.
    pub problems: Vec<String>,
    /// What was left on the host at the end.
    pub leaks: Vec<String>,
    pub elapsed: Duration,
    /// Longest restart-and-adopt, from the new process to the first answer.
    pub slowest_restart: Duration,
}

const OPS: [&str; 4] = ["fork", "exec", "branch", "kill"];

fn running_pids(listed: &[Value]) -> BTreeSet<u32> {
    listed.iter().filter(|s| s["status"] == "running").filter_map(|s| s["pid"].as_u64()).map(|p| p as u32).collect()
}

/// Waits until no operation runs in the daemon.
pub async fn idle(d: &Daemon, wait: Duration) -> Result<(), String> {
    let deadline = Instant::now() + wait;
    loop {
        let m = d.get("/metrics").send().await.map_err(|e| e.to_string())?.text().await.map_err(|e| e.to_string())?;
        let n = m
            .lines()
            .find(|l| l.starts_with("forkd_operations_in_flight"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .ok_or("no forkd_operations_in_flight in /metrics")?;
        if n == 0.0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{n} operations still in flight after {wait:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The invariants that must hold whenever nothing is in flight.
pub async fn check(d: &Daemon, data: &Path) -> Vec<String> {
    let mut problems = vec![];
    if let Err(e) = idle(d, Duration::from_secs(120)).await {
        problems.push(e);
    }
    // A VMM that is exiting may linger for a moment: agree within a few polls.
    let mut last = (BTreeSet::new(), BTreeSet::new());
    for _ in 0..25 {
        let listed = list(d).await;
        let vmms: BTreeSet<u32> = vmms_under(data).into_iter().collect();
        last = (running_pids(&listed), vmms);
        if last.0 == last.1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if last.0 != last.1 {
        problems.push(format!("listed running {:?} but VMMs {:?}", last.0, last.1));
    }
    for s in list(d).await.iter().filter(|s| s["status"] == "running") {
        let id = s["id"].as_str().unwrap_or_default();
        let (code, body) = sh_status(&d.http(), &d.http_url(), id, "true", 30).await;
        if code != 200 || body["exit_code"] != 0 {
            problems.push(format!("{id} is listed running but exec answered {code} {body}"));
        }
    }
    let snaps: Value = d.get("/v1/snapshots").send().await.unwrap().json().await.unwrap_or(Value::Null);
    for s in snaps.as_array().into_iter().flatten() {
        let tag = s["tag"].as_str().unwrap_or_default();
        if s["status"] == "writing" || s["status"] == "deleting" {
            problems.push(format!("snapshot {tag} is still {} with nothing in flight", s["status"]));
        }
        if tag.starts_with("k-") {
            let r = d.delete(&format!("/v1/snapshots/{tag}?force=true")).send().await.unwrap();
            if !matches!(r.status().as_u16(), 200 | 404) {
                problems.push(format!("snapshot {tag} cannot be deleted: {}", r.text().await.unwrap_or_default()));
            }
        }
    }
    problems
}

fn restart(old: Daemon, data: &Path) -> Daemon {
    // The killed daemon's Drop would kill the VMs it left: they must live on.
    std::mem::forget(old);
    Daemon::start(Options { data_dir: Some(data.to_path_buf()), ..Default::default() })
}

/// One operation over REST; `cut` drops the call after that long.
async fn operate(
    client: reqwest::Client,
    base: String,
    op: &'static str,
    target: Option<String>,
    cut: Option<Duration>,
    n: u32,
    tag: String,
) {
    let send = |rb: reqwest::RequestBuilder| {
        let rb = match cut {
            Some(t) => rb.timeout(t),
            None => rb.timeout(Duration::from_secs(300)),
        };
        async move {
            if let Ok(r) = rb.send().await {
                let _ = r.bytes().await;
            }
        }
    };
    match (op, target) {
        ("exec", Some(id)) => {
            send(
                client
                    .post(format!("{base}/v1/sandboxes/{id}/exec"))
                    .json(&json!({ "args": ["sh", "-c", "echo hi; sleep 0.2"] })),
            )
            .await
        }
        ("branch", Some(id)) => {
            let mode = if n.is_multiple_of(2) { "full" } else { "diff" };
            send(client.post(format!("{base}/v1/sandboxes/{id}/branch")).json(&json!({ "tag": tag, "mode": mode })))
                .await
        }
        ("kill", Some(id)) => send(client.delete(format!("{base}/v1/sandboxes/{id}"))).await,
        _ => send(client.post(format!("{base}/v1/sandboxes")).json(&json!({ "snapshot_tag": "base", "n": n }))).await,
    }
}

/// Runs the cycles on a fresh data dir under /tmp and reports.
pub async fn run(cfg: &ChaosConfig, log: impl Fn(&str)) -> ChaosReport {
    let started = Instant::now();
    let mut report = ChaosReport::default();
    let cgroups_before = forkd_cgroups();
    let netns_before = forkd_netns();
    let tmp = tempfile::Builder::new().prefix("forkd-chaos-").tempdir_in("/tmp").expect("temp data dir");
    let data: PathBuf = tmp.path().to_path_buf();
    let mut rng = Lcg(cfg.seed);
    let mut d = Daemon::start(Options { data_dir: Some(data.clone()), ..Default::default() });
    post_ok(&d, "/v1/snapshots", json!({ "tag": "base", "image": cfg.image })).await;
    wait_ready(&d, "base").await;

    while report.cycles < cfg.cycles && started.elapsed() < cfg.budget {
        let c = report.cycles;
        let live: Vec<String> = list(&d)
            .await
            .iter()
            .filter(|s| s["status"] == "running")
            .filter_map(|s| s["id"].as_str().map(str::to_string))
            .collect();
        let op = if live.is_empty() { "fork" } else { OPS[rng.below(OPS.len() as u64) as usize] };
        let target = (!live.is_empty()).then(|| live[rng.below(live.len() as u64) as usize].clone());
        let typical = match op {
            "branch" => 2000,
            "fork" => 600,
            "exec" => 400,
            _ => 100,
        };
        let cut = (rng.below(cfg.cut_one_in) == 0).then(|| Duration::from_millis(1 + rng.below(typical)));
        let crash = rng.below(cfg.crash_one_in) == 0;
        let n = 1 + rng.below(2) as u32;
        *report.ops.entry(op).or_default() += 1;
        report.cut_off += cut.is_some() as usize;
        let call = tokio::spawn(operate(d.http(), d.http_url(), op, target, cut, n, format!("k-{c}")));
        if crash {
            tokio::time::sleep(Duration::from_millis(rng.below(typical))).await;
            d.crash();
            let _ = tokio::time::timeout(Duration::from_secs(30), call).await;
            let t = Instant::now();
            d = restart(d, &data);
            let _ = list(&d).await;
            report.slowest_restart = report.slowest_restart.max(t.elapsed());
            report.crashes += 1;
        } else {
            let _ = tokio::time::timeout(Duration::from_secs(300), call).await;
        }
        report.cycles += 1;
        let found = check(&d, &data).await;
        if !found.is_empty() || c % 50 == 0 {
            log(&format!(
                "cycle {}: {op}{}{}, {} listed, problems: {found:?}",
                report.cycles,
                if cut.is_some() { " cut off" } else { "" },
                if crash { " + daemon killed" } else { "" },
                list(&d).await.len()
            ));
        }
        report.problems.extend(found.into_iter().map(|p| format!("cycle {}: {p}", report.cycles)));
        // Keep the host small: a few sandboxes carry over.
        let listed = list(&d).await;
        if listed.len() > 5 {
            let extra: Vec<&str> = listed[..listed.len() - 3].iter().filter_map(|s| s["id"].as_str()).collect();
            let _ = d.post("/v1/sandboxes/delete", json!({ "ids": extra })).send().await;
        }
    }

    let _ = d.post("/v1/sandboxes/delete", json!({ "all": true })).send().await;
    let snaps: Value = d.get("/v1/snapshots").send().await.unwrap().json().await.unwrap_or(Value::Null);
    for s in snaps.as_array().into_iter().flatten() {
        let tag = s["tag"].as_str().unwrap_or_default();
        let _ = d.delete(&format!("/v1/snapshots/{tag}?cascade=true")).send().await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        report.leaks = leaks_since(&data, &cgroups_before, &netns_before);
        // The snapshot store itself is not a leak; everything else is.
        if report.leaks.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    report.elapsed = started.elapsed();
    drop(d);
    report
}

/// Forks `n` sandboxes (in batches), SIGKILLs the daemon and starts it
/// again; returns how long the new daemon took to list all `n` running,
/// and how long forking them took.
pub async fn adopt(n: u32, image: &str) -> Result<(Duration, Duration), String> {
    let tmp = tempfile::Builder::new().prefix("forkd-adopt-").tempdir_in("/tmp").map_err(|e| e.to_string())?;
    let data = tmp.path().to_path_buf();
    let mut d = Daemon::start(Options { data_dir: Some(data.clone()), ..Default::default() });
    // Small children so a hundred fit the host's memory check.
    post_ok(&d, "/v1/snapshots", json!({ "tag": "base", "image": image, "mem_mib": 128 })).await;
    wait_ready(&d, "base").await;
    let t = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(10);
        fork_with(&d, "base", k, json!({ "memory_limit_mib": 192 })).await;
        left -= k;
    }
    let forked = t.elapsed();
    let before: BTreeSet<String> = list(&d).await.iter().filter_map(|s| s["id"].as_str().map(str::to_string)).collect();
    d.crash();
    let t = Instant::now();
    d = restart(d, &data);
    let after = list(&d).await;
    let adopted = t.elapsed();
    let running: BTreeSet<String> = after
        .iter()
        .filter(|s| s["status"] == "running")
        .filter_map(|s| s["id"].as_str().map(str::to_string))
        .collect();
    let result = if running == before && before.len() == n as usize {
        Ok((adopted, forked))
    } else {
        Err(format!("{} of {} adopted running", running.intersection(&before).count(), before.len()))
    };
    let _ = d.post("/v1/sandboxes/delete", json!({ "all": true })).send().await;
    drop(d);
    result
}
