//! Helpers shared by the tests and the chaos bench: baking, forking, exec
//! over REST, and what the host holds (VMMs, cgroups, work dirs, network
//! namespaces, the ledger).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Daemon, vmms_under};
use serde_json::{Value, json};

pub async fn wait_ready(d: &Daemon, tag: &str) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let info: Value = d.get(&format!("/v1/snapshots/{tag}/info")).send().await.unwrap().json().await.unwrap();
        match info["status"].as_str().unwrap() {
            "ready" => return,
            "writing" => {}
            other => panic!("snapshot {tag} is {other}: {}", info["status_reason"]),
        }
        assert!(Instant::now() < deadline, "snapshot {tag} not ready in time");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Bakes a python snapshot and waits until it is ready.
pub async fn bake(d: &Daemon, tag: &str) {
    let r = d.post("/v1/snapshots", json!({ "tag": tag, "image": "python" })).send().await.unwrap();
    assert!(matches!(r.status().as_u16(), 201 | 202), "bake {tag}: {}", r.status());
    wait_ready(d, tag).await;
}

/// POSTs `body` to `path`; panics unless it succeeded (200, or 201/202 for
/// a create), showing the answer.
pub async fn post_ok(d: &Daemon, path: &str, body: Value) -> Value {
    let r = d.post(path, body).send().await.unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert!(status.is_success(), "POST {path}: {status} {v}");
    v
}

/// Branches sandbox `id` into snapshot `tag` (`mode` "diff" or "full");
/// panics unless 200.
pub async fn branch(d: &Daemon, id: &str, tag: &str, mode: &str) -> Value {
    post_ok(d, &format!("/v1/sandboxes/{id}/branch"), json!({ "tag": tag, "mode": mode })).await
}

/// Evaluates `code` in the sandbox's interpreter; panics unless it ran.
pub async fn eval(d: &Daemon, id: &str, code: &str) -> String {
    let v = post_ok(d, &format!("/v1/sandboxes/{id}/eval"), json!({ "code": code })).await;
    assert_eq!(v["exit_code"], 0, "eval {code:?} in {id}: {v}");
    v["result"].as_str().unwrap().to_string()
}

/// Runs the CLI against `d`: (exit code, stdout, stderr).
pub fn cli_output(d: &Daemon, args: &[&str]) -> (i32, String, String) {
    let out = d.cli().args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Forks `n` children with extra request fields; panics unless 200.
pub async fn fork_with(d: &Daemon, tag: &str, n: u32, extra: Value) -> Vec<Value> {
    let mut body = json!({ "snapshot_tag": tag, "n": n });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    let r = d.post("/v1/sandboxes", body).send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, 201, "fork {n} from {tag}: {text}");
    serde_json::from_str::<Value>(&text).unwrap().as_array().unwrap().clone()
}

pub async fn fork(d: &Daemon, tag: &str, n: u32) -> Vec<String> {
    fork_with(d, tag, n, json!({})).await.iter().map(|s| s["id"].as_str().unwrap().to_string()).collect()
}

/// Runs `sh -c script` in `id`; returns the status code and the body.
pub async fn sh_status(
    client: &reqwest::Client,
    base: &str,
    id: &str,
    script: &str,
    timeout_secs: u32,
) -> (u16, Value) {
    let r = client
        .post(format!("{base}/v1/sandboxes/{id}/exec"))
        .json(&json!({ "args": ["sh", "-c", script], "timeout_secs": timeout_secs }))
        .send()
        .await;
    match r {
        Ok(r) => {
            let s = r.status().as_u16();
            (s, r.json().await.unwrap_or(Value::Null))
        }
        Err(e) => (0, json!({ "transport": e.to_string() })),
    }
}

pub async fn sh(d: &Daemon, id: &str, script: &str) -> Value {
    let (s, v) = sh_status(&d.http(), &d.http_url(), id, script, 60).await;
    assert_eq!(s, 200, "exec {script:?} in {id}: {v}");
    v
}

pub async fn list(d: &Daemon) -> Vec<Value> {
    let v: Value = d.get("/v1/sandboxes").send().await.unwrap().json().await.unwrap();
    v.as_array().unwrap().clone()
}

/// Mount points of the cgroup hierarchies holding `forkd/` (v1 memory, cpu,
/// pids, or the v2 unified one when it has the controllers).
pub fn cgroup_roots() -> Vec<PathBuf> {
    let unified = Path::new("/sys/fs/cgroup/unified");
    let v2_ctrl = std::fs::read_to_string(unified.join("cgroup.controllers")).unwrap_or_default();
    if ["memory", "cpu", "pids"].iter().all(|c| v2_ctrl.split_whitespace().any(|h| h == *c)) {
        return vec![unified.to_path_buf()];
    }
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        return vec![PathBuf::from("/sys/fs/cgroup")];
    }
    ["memory", "cpu", "pids"].iter().map(|c| PathBuf::from("/sys/fs/cgroup").join(c)).filter(|p| p.is_dir()).collect()
}

/// Every `forkd/<name>` cgroup on the host, any hierarchy.
pub fn forkd_cgroups() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for r in cgroup_roots() {
        if let Ok(rd) = std::fs::read_dir(r.join("forkd")) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    out.insert(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
    }
    out
}

/// A control file of `forkd/<id>` in the hierarchy of `controller`.
pub fn cgroup_file(id: &str, controller: &str, file: &str) -> Option<String> {
    let roots = cgroup_roots();
    let root = if roots.len() == 1 { roots[0].clone() } else { roots.into_iter().find(|r| r.ends_with(controller))? };
    std::fs::read_to_string(root.join("forkd").join(id).join(file)).ok()
}

/// The capability names of the shipped systemd unit's
/// CapabilityBoundingSet, as `setpriv --bounding-set` wants them
/// (`-all,+net_admin,…`).
pub fn unit_bounding_set() -> String {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/forkd-server.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    let caps: Vec<String> = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets a bounding set")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert!(!caps.is_empty());
    format!("-all,{}", caps.join(","))
}

/// Processes in `forkd/<name>` (any hierarchy).
pub fn cgroup_procs(name: &str) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    for r in cgroup_roots() {
        if let Ok(s) = std::fs::read_to_string(r.join("forkd").join(name).join("cgroup.procs")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    out
}

/// Named network namespaces of sandboxes (`forkd-*` in /run/netns).
pub fn forkd_netns() -> BTreeSet<String> {
    entries(Path::new("/run/netns")).into_iter().filter(|n| n.starts_with("forkd-")).collect()
}

/// The `forkd-*` namespaces the host had before this test process started
/// its first daemon: another daemon's, never a leak of these tests.
pub fn netns_before_tests() -> &'static BTreeSet<String> {
    static BEFORE: std::sync::OnceLock<BTreeSet<String>> = std::sync::OnceLock::new();
    BEFORE.get_or_init(forkd_netns)
}

/// Entries of a directory (names), empty if it does not exist.
pub fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Rows of the daemon's ledger (kind, key, owner), read from its SQLite store.
pub fn ledger(data_dir: &Path) -> Vec<(String, String, String)> {
    let c =
        rusqlite::Connection::open_with_flags(data_dir.join("forkd.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open the state store");
    let mut st = c.prepare("SELECT kind, key, owner FROM ledger").unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().map(Result::unwrap).collect()
}

/// Everything forkd-owned that is still on the host for this data dir,
/// plus `forkd/*` cgroups created since `cgroups_before` that hold no
/// process of another data dir. Empty when nothing leaked.
pub fn leaks(data_dir: &Path, cgroups_before: &BTreeSet<String>) -> Vec<String> {
    leaks_since(data_dir, cgroups_before, &BTreeSet::new())
}

/// `leaks`, also counting `forkd-*` network namespaces not in `netns_before`.
pub fn leaks_since(data_dir: &Path, cgroups_before: &BTreeSet<String>, netns_before: &BTreeSet<String>) -> Vec<String> {
    let mut out = vec![];
    for p in vmms_under(data_dir) {
        out.push(format!("VMM process {p}"));
    }
    for (sub, what) in [("sandboxes", "work dir"), ("staging", "staging dir")] {
        for e in entries(&data_dir.join(sub)) {
            out.push(format!("{what} {sub}/{e}"));
        }
    }
    let ours = data_dir.display().to_string();
    for cg in forkd_cgroups().difference(cgroups_before) {
        let procs = cgroup_procs(cg);
        let foreign = procs.iter().any(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            !String::from_utf8_lossy(&cmd).contains(&ours)
        });
        if !foreign {
            out.push(format!("cgroup forkd/{cg} ({} processes)", procs.len()));
        }
    }
    for ns in forkd_netns().difference(netns_before) {
        if !netns_before_tests().contains(ns) {
            out.push(format!("network namespace {ns}"));
        }
    }
    for (kind, key, owner) in ledger(data_dir) {
        out.push(format!("ledger {kind} {key} (owner {owner})"));
    }
    out
}

/// `leaks`, polled for up to `wait` so that transient state (another
/// daemon's spawn in flight, a process still exiting) settles; prints what
/// was seen at first.
pub async fn settled_leaks(data_dir: &Path, cgroups_before: &BTreeSet<String>, wait: Duration) -> Vec<String> {
    let deadline = Instant::now() + wait;
    let mut first = true;
    loop {
        let l = leaks(data_dir, cgroups_before);
        if l.is_empty() || Instant::now() >= deadline {
            return l;
        }
        if first {
            eprintln!("not settled yet: {l:?}");
            first = false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Sorted latency percentile.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A small deterministic generator (no extra dependency); seed printed by tests.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Serialises the VM-heavy tests of one test binary: they would otherwise
/// share two cores and see each other's cgroups.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}
