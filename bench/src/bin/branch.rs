//! forkd-branch-bench: what branching a running sandbox costs, and what a
//! chain of diff snapshots costs the children spawned from it.
//!
//! Starts a real `forkd-server` (real QEMU VMs) on loopback and measures:
//!
//! 1. **Pause window against dirty memory.** For each guest RAM size a base
//!    snapshot is baked. For each target dirty size and branch mode a fresh
//!    child is forked, made to write that many MiB (a `bytearray` with one
//!    write per 4 KiB page), and branched; the snapshot's `pause_ms` and
//!    `dirty_bytes` are recorded. Each cell is repeated `--reps` times, every
//!    time with a new child, and the median is compared with the target
//!    `5 ms + dirty MiB / 4`. A dirty size that cannot fit in the guest
//!    (more than a fresh child's MemAvailable less 24 MiB) is lowered to
//!    that, rounded down to 16 MiB, and the table says so. Every branch
//!    snapshot is deleted once measured.
//! 2. **Spawn latency against chain depth.** From the first RAM size's base
//!    snapshot a chain of diff branches is built (b1 from a child of base,
//!    b2 from a child of b1, b3 from a child of b2), b3 is compacted into a
//!    flat copy, and `POST /v1/sandboxes {n: 1}` is timed against each
//!    (round-robin over the tags, so load drifts hit every tag alike).
//!
//! The daemon binary is taken from the same target directory as this one:
//!
//! ```text
//! cargo build --release -p forkd-server -p forkd-bench -p forkd
//! target/release/forkd-branch-bench            # full run
//! target/release/forkd-branch-bench --quick    # one repetition, smoke run
//! ```
//!
//! To see the daemon's "branch pause window … stop_ms capture_ms save_ms
//! resume_ms" breakdown, start a daemon by hand with `--log info` and point
//! the bench at it with `--url` (the harness daemon logs at warn).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use comfy_table::{CellAlignment, Table, presets::UTF8_FULL_CONDENSED};
use forkd_integration::{Daemon, Options};
use serde::Serialize;
use serde_json::{Value, json};

/// Fixed part of the pause-window target, in ms.
const PAUSE_TARGET_BASE_MS: f64 = 5.0;
/// MiB of dirty memory per extra ms the pause window may take.
const PAUSE_TARGET_MIB_PER_MS: f64 = 4.0;
/// Depth-3 spawn may be at most this much slower than the flat copy.
const CHAIN_SPAWN_TARGET_RATIO: f64 = 1.05;
/// MiB of a fresh child's MemAvailable left alone when a requested dirty
/// size does not fit: the interpreter and the page cache need some.
const GUEST_HEADROOM_MIB: u32 = 24;

#[derive(Parser, Debug)]
#[command(
    name = "forkd-branch-bench",
    about = "Branch pause window against dirty memory, and spawn latency against diff-chain depth"
)]
struct Args {
    /// Guest RAM sizes (MiB), one base snapshot each.
    #[arg(long, value_delimiter = ',', default_value = "256,512")]
    ram: Vec<u32>,
    /// Target dirty sizes (MiB) written by the child before branching.
    #[arg(long, value_delimiter = ',', default_value = "0,16,64,256")]
    dirty: Vec<u32>,
    /// Branch modes to measure.
    #[arg(long, value_delimiter = ',', default_value = "diff,full")]
    modes: Vec<String>,
    /// Branches per (RAM, mode, dirty) cell, each from a fresh child.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Timed spawns per snapshot of the chain.
    #[arg(long, default_value_t = 5)]
    spawn_reps: usize,
    /// Untimed spawns per snapshot of the chain before the timed ones.
    #[arg(long, default_value_t = 1)]
    spawn_warmup: usize,
    /// MiB each link of the chain writes before it is branched.
    #[arg(long, default_value_t = 16)]
    chain_dirty: u32,
    /// One repetition everywhere, no warm-up: a smoke run.
    #[arg(long)]
    quick: bool,
    /// Skip part 1 (pause window).
    #[arg(long)]
    no_pause: bool,
    /// Skip part 2 (spawn against chain depth).
    #[arg(long)]
    no_chain: bool,
    /// Use this running daemon instead of starting one (e.g. one started by
    /// hand with `--log info` to see the pause breakdown). Tags get a
    /// per-run prefix and are deleted at the end.
    #[arg(long)]
    url: Option<String>,
    /// Bearer token for --url.
    #[arg(long, env = "FORKD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the results as JSON instead of tables.
    #[arg(long)]
    json: bool,
}

// ---------------------------------------------------------------- REST

async fn call(rb: reqwest::RequestBuilder, what: &str) -> anyhow::Result<Value> {
    let r = rb.send().await.with_context(|| what.to_string())?;
    let status = r.status();
    let body = r.text().await.with_context(|| what.to_string())?;
    if !status.is_success() {
        bail!("{what}: HTTP {status}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("{what}: not JSON: {body}"))
}

/// A REST endpoint: the daemon this bench started, or one given by `--url`.
struct Api {
    url: String,
    /// Prepended to every tag this run creates.
    prefix: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Api {
    fn new(url: String, token: Option<String>, prefix: String) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(900)).build()?;
        Ok(Api { url: url.trim_end_matches('/').to_string(), prefix, token, http })
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.header("authorization", format!("Bearer {t}")),
            None => rb,
        }
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.auth(self.http.get(format!("{}{path}", self.url)))
    }

    fn post(&self, path: &str, body: Value) -> reqwest::RequestBuilder {
        self.auth(self.http.post(format!("{}{path}", self.url)).json(&body))
    }

    fn delete(&self, path: &str) -> reqwest::RequestBuilder {
        self.auth(self.http.delete(format!("{}{path}", self.url)))
    }
}

async fn post(d: &Api, path: &str, body: Value) -> anyhow::Result<Value> {
    call(d.post(path, body), &format!("POST {path}")).await
}

async fn bake(d: &Api, tag: &str, mem_mib: u32) -> anyhow::Result<Value> {
    let snap =
        post(d, "/v1/snapshots", json!({ "tag": tag, "image": "python", "mem_mib": mem_mib, "wait": true })).await?;
    if snap["status"] != "ready" {
        bail!("snapshot {tag} is {}: {}", snap["status"], snap["status_reason"]);
    }
    Ok(snap)
}

/// Forks one child; returns (id, client-side ms, daemon-side spawn_ms).
async fn fork1(d: &Api, tag: &str) -> anyhow::Result<(String, f64, f64)> {
    let t = Instant::now();
    let v = post(d, "/v1/sandboxes", json!({ "snapshot_tag": tag, "n": 1 })).await?;
    let elapsed = ms(t.elapsed());
    let sb = &v[0];
    let id = sb["id"].as_str().with_context(|| format!("fork from {tag}: no id in {v}"))?.to_string();
    Ok((id, elapsed, sb["spawn_ms"].as_f64().unwrap_or(f64::NAN)))
}

async fn kill(d: &Api, id: &str) {
    let _ = d.delete(&format!("/v1/sandboxes/{id}")).send().await;
}

async fn drop_snapshot(d: &Api, tag: &str) {
    let _ = d.delete(&format!("/v1/snapshots/{tag}")).send().await;
}

/// Evaluates `code`; returns its result, failing on a guest-side error.
async fn eval(d: &Api, id: &str, code: &str) -> anyhow::Result<String> {
    let v = post(d, &format!("/v1/sandboxes/{id}/eval"), json!({ "code": code, "timeout_secs": 600 })).await?;
    if v["exit_code"] != 0 || v["error"].as_str().is_some_and(|e| !e.is_empty()) {
        bail!("eval in {id} failed: exit {} error {} stderr {}", v["exit_code"], v["error"], v["stderr"]);
    }
    Ok(v["result"].as_str().unwrap_or_default().to_string())
}

/// Python that dirties `mib` MiB of guest memory, one write per page, and
/// keeps it referenced (`_forkd_bench_dirty`) until the branch is taken.
fn dirty_code(mib: u32) -> String {
    format!(
        "import os\n_forkd_bench_dirty = bytearray({mib} << 20)\n\
         for i in range(0, len(_forkd_bench_dirty), 4096): _forkd_bench_dirty[i] = 1\n\
         len(_forkd_bench_dirty) >> 20"
    )
}

async fn branch(d: &Api, id: &str, tag: &str, mode: &str) -> anyhow::Result<Value> {
    post(d, &format!("/v1/sandboxes/{id}/branch"), json!({ "tag": tag, "mode": mode })).await
}

// ---------------------------------------------------------------- stats

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

fn mib(bytes: f64) -> f64 {
    bytes / 1048576.0
}

// ---------------------------------------------------------------- host load

#[derive(Serialize, Clone)]
struct Load {
    loadavg_1m: f64,
    loadavg_5m: f64,
    /// QEMU processes on the host that this bench's daemon did not start.
    foreign_vmms: usize,
}

fn load(our_dir: &std::path::Path) -> Load {
    let la = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = la.split_whitespace().map(|s| s.parse::<f64>().unwrap_or(f64::NAN));
    let ours = forkd_integration::vmms_under(our_dir);
    let mut all: usize = 0;
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let argv0 = cmd.split(|b| *b == 0).next().unwrap_or_default();
            if String::from_utf8_lossy(argv0).contains("qemu-system") {
                all += 1;
            }
        }
    }
    Load {
        loadavg_1m: it.next().unwrap_or(f64::NAN),
        loadavg_5m: it.next().unwrap_or(f64::NAN),
        foreign_vmms: all.saturating_sub(ours.len()),
    }
}

fn fmt_load(l: &Load) -> String {
    format!(
        "loadavg {:.2} (1m) {:.2} (5m), {} other VMM process(es) on the host",
        l.loadavg_1m, l.loadavg_5m, l.foreign_vmms
    )
}

// ---------------------------------------------------------------- part 1

#[derive(Serialize, Clone)]
struct BranchSample {
    pause_ms: f64,
    dirty_bytes: u64,
    /// Client-side time of the whole branch call (pause plus writing the
    /// snapshot after the source runs again).
    branch_call_ms: f64,
    /// How long the guest took to dirty its memory.
    write_ms: f64,
}

#[derive(Serialize)]
struct PauseCell {
    ram_mib: u32,
    mode: String,
    target_dirty_mib: u32,
    /// Set when the requested size could not fit in the guest.
    requested_dirty_mib: Option<u32>,
    /// MemAvailable in a fresh child of the base snapshot.
    guest_mem_available_mib: u32,
    samples: Vec<BranchSample>,
    errors: Vec<String>,
    measured_dirty_mib: f64,
    pause_ms_median: f64,
    pause_ms_min: f64,
    pause_ms_max: f64,
    branch_call_ms_median: f64,
    target_ms: f64,
    pass: Option<bool>,
}

async fn one_branch(d: &Api, base: &str, dirty_mib: u32, mode: &str, tag: &str) -> anyhow::Result<BranchSample> {
    let (id, _, _) = fork1(d, base).await?;
    let r = async {
        let t = Instant::now();
        let got = eval(d, &id, &dirty_code(dirty_mib)).await?;
        let write_ms = ms(t.elapsed());
        if got.trim() != dirty_mib.to_string() {
            bail!("the guest wrote {got} MiB, not {dirty_mib}");
        }
        let t = Instant::now();
        let snap = branch(d, &id, tag, mode).await?;
        let branch_call_ms = ms(t.elapsed());
        if snap["status"] != "ready" {
            bail!("branch {tag} is {}: {}", snap["status"], snap["status_reason"]);
        }
        Ok(BranchSample {
            pause_ms: snap["pause_ms"].as_f64().context("no pause_ms")?,
            dirty_bytes: snap["dirty_bytes"].as_u64().context("no dirty_bytes")?,
            branch_call_ms,
            write_ms,
        })
    }
    .await;
    kill(d, &id).await;
    drop_snapshot(d, tag).await;
    r
}

/// MemAvailable (MiB) inside a fresh child of `base`.
async fn mem_available_mib(d: &Api, base: &str) -> anyhow::Result<u32> {
    let (id, _, _) = fork1(d, base).await?;
    let r =
        eval(d, &id, "[int(l.split()[1]) // 1024 for l in open('/proc/meminfo') if l.startswith('MemAvailable:')][0]")
            .await;
    kill(d, &id).await;
    let v = r?;
    v.trim().parse().with_context(|| format!("MemAvailable: {v:?}"))
}

async fn pause_part(d: &Api, a: &Args, reps: usize) -> anyhow::Result<Vec<PauseCell>> {
    let mut cells = vec![];
    for &ram in &a.ram {
        let base = format!("{}ram{ram}", d.prefix);
        eprintln!("branch-bench: baking {base} (python, {ram} MiB)");
        let t = Instant::now();
        bake(d, &base, ram).await?;
        eprintln!("branch-bench: {base} ready in {:.1} s", t.elapsed().as_secs_f64());
        let avail = mem_available_mib(d, &base).await?;
        eprintln!("branch-bench: a fresh child of {base} has {avail} MiB MemAvailable");
        for mode in &a.modes {
            for &want in &a.dirty {
                let cap = avail.saturating_sub(GUEST_HEADROOM_MIB) / 16 * 16;
                let (target, requested) = if want > cap { (cap, Some(want)) } else { (want, None) };
                let mut samples = vec![];
                let mut errors = vec![];
                for rep in 0..reps {
                    let tag = format!("{}pb-{ram}-{mode}-{target}-{rep}", d.prefix);
                    match one_branch(d, &base, target, mode, &tag).await {
                        Ok(s) => {
                            eprintln!(
                                "branch-bench: {ram} MiB {mode} {target} MiB #{rep}: pause {:.2} ms, dirty {:.1} MiB, call {:.0} ms, write {:.0} ms",
                                s.pause_ms,
                                mib(s.dirty_bytes as f64),
                                s.branch_call_ms,
                                s.write_ms
                            );
                            samples.push(s);
                        }
                        Err(e) => {
                            eprintln!("branch-bench: {ram} MiB {mode} {target} MiB #{rep}: FAILED: {e:#}");
                            errors.push(format!("{e:#}"));
                        }
                    }
                }
                let pauses: Vec<f64> = samples.iter().map(|s| s.pause_ms).collect();
                let dirty: Vec<f64> = samples.iter().map(|s| mib(s.dirty_bytes as f64)).collect();
                let calls: Vec<f64> = samples.iter().map(|s| s.branch_call_ms).collect();
                let measured = median(&dirty);
                let target_ms = PAUSE_TARGET_BASE_MS + measured / PAUSE_TARGET_MIB_PER_MS;
                let med = median(&pauses);
                cells.push(PauseCell {
                    ram_mib: ram,
                    mode: mode.clone(),
                    target_dirty_mib: target,
                    requested_dirty_mib: requested,
                    guest_mem_available_mib: avail,
                    measured_dirty_mib: measured,
                    pause_ms_median: med,
                    pause_ms_min: min(&pauses),
                    pause_ms_max: max(&pauses),
                    branch_call_ms_median: median(&calls),
                    target_ms,
                    pass: if samples.is_empty() { None } else { Some(med <= target_ms) },
                    samples,
                    errors,
                });
            }
        }
    }
    Ok(cells)
}

// ---------------------------------------------------------------- part 2

#[derive(Serialize)]
struct ChainRow {
    label: String,
    tag: String,
    chain_depth: u64,
    kind: String,
    spawn_ms: Vec<f64>,
    daemon_spawn_ms: Vec<f64>,
    spawn_ms_median: f64,
    spawn_ms_min: f64,
    spawn_ms_max: f64,
    daemon_spawn_ms_median: f64,
    ratio_to_depth0: f64,
    ratio_to_compacted: f64,
    /// The child saw the state the chain link set.
    state_ok: bool,
}

#[derive(Serialize)]
struct ChainReport {
    base: String,
    link_dirty_mib: u32,
    warmup: usize,
    reps: usize,
    rows: Vec<ChainRow>,
    depth3_over_compacted: f64,
    depth3_over_depth0: f64,
    target_ratio: f64,
    pass: bool,
}

async fn chain_part(d: &Api, a: &Args, reps: usize, warmup: usize) -> anyhow::Result<ChainReport> {
    let ram = a.ram[0];
    let base = format!("{}ram{ram}", d.prefix);
    let exists = d.get(&format!("/v1/snapshots/{base}")).send().await?.status().is_success();
    if !exists {
        eprintln!("branch-bench: baking {base} (python, {ram} MiB)");
        bake(d, &base, ram).await?;
    }
    // (label, tag, expected value of `depth` in a child)
    let mut links: Vec<(String, String, u32)> = vec![("depth 0 (base)".into(), base.clone(), 0)];
    for k in 1..=3u32 {
        let parent = links.last().unwrap().1.clone();
        let tag = format!("{}chain-b{k}", d.prefix);
        eprintln!("branch-bench: building {tag} from a child of {parent}");
        let (id, _, _) = fork1(d, &parent).await?;
        let r = async {
            eval(d, &id, &dirty_code(a.chain_dirty)).await?;
            eval(d, &id, &format!("depth = {k}\ndepth")).await?;
            branch(d, &id, &tag, "diff").await
        }
        .await;
        kill(d, &id).await;
        let snap = r?;
        if snap["chain_depth"].as_u64() != Some(k as u64) {
            bail!("{tag} has chain_depth {}, expected {k}", snap["chain_depth"]);
        }
        links.push((format!("depth {k} (b{k})"), tag, k));
    }
    let b3 = links[3].1.clone();
    let flat_tag = format!("{b3}-flat");
    eprintln!("branch-bench: compacting {b3} into {flat_tag}");
    let flat = post(d, &format!("/v1/snapshots/{b3}/compact"), json!({ "to": flat_tag })).await?;
    if flat["chain_depth"].as_u64() != Some(0) {
        bail!("{flat_tag} has chain_depth {}", flat["chain_depth"]);
    }
    links.push(("b3 compacted".into(), flat_tag, 3));

    // Warm-up spawns (untimed; at least one, which checks the state).
    let mut state_ok = vec![true; links.len()];
    for (i, (_, tag, want)) in links.iter().enumerate() {
        for w in 0..warmup.max(1) {
            let (id, _, _) = fork1(d, tag).await?;
            if w == 0 {
                let code = "globals().get('depth', 0)";
                let got = eval(d, &id, code).await;
                state_ok[i] = matches!(&got, Ok(v) if v.trim() == want.to_string());
                if !state_ok[i] {
                    eprintln!("branch-bench: a child of {tag} has depth {got:?}, expected {want}");
                }
            }
            kill(d, &id).await;
        }
    }
    let mut client = vec![vec![]; links.len()];
    let mut daemon = vec![vec![]; links.len()];
    // Round-robin, starting one tag later every round, so neither load
    // drift nor the position in the round favours a tag.
    for rep in 0..reps {
        for j in 0..links.len() {
            let i = (j + rep) % links.len();
            let tag = &links[i].1;
            let (id, c, s) = fork1(d, tag).await?;
            kill(d, &id).await;
            eprintln!("branch-bench: spawn from {tag} #{rep}: {c:.1} ms (daemon {s:.1} ms)");
            client[i].push(c);
            daemon[i].push(s);
        }
    }
    let info = |tag: &str| {
        let tag = tag.to_string();
        async move { call(d.get(&format!("/v1/snapshots/{tag}")), "GET snapshot").await }
    };
    let depth0 = median(&client[0]);
    let compacted = median(&client[links.len() - 1]);
    let mut rows = vec![];
    for (i, (label, tag, _)) in links.iter().enumerate() {
        let v = info(tag).await?;
        let m = median(&client[i]);
        rows.push(ChainRow {
            label: label.clone(),
            tag: tag.clone(),
            chain_depth: v["chain_depth"].as_u64().unwrap_or(0),
            kind: v["kind"].as_str().unwrap_or_default().to_string(),
            spawn_ms_median: m,
            spawn_ms_min: min(&client[i]),
            spawn_ms_max: max(&client[i]),
            daemon_spawn_ms_median: median(&daemon[i]),
            ratio_to_depth0: m / depth0,
            ratio_to_compacted: m / compacted,
            spawn_ms: client[i].clone(),
            daemon_spawn_ms: daemon[i].clone(),
            state_ok: state_ok[i],
        });
    }
    let d3 = rows[3].spawn_ms_median;
    Ok(ChainReport {
        base,
        link_dirty_mib: a.chain_dirty,
        warmup: warmup.max(1),
        reps,
        depth3_over_compacted: d3 / compacted,
        depth3_over_depth0: d3 / depth0,
        target_ratio: CHAIN_SPAWN_TARGET_RATIO,
        pass: d3 / compacted <= CHAIN_SPAWN_TARGET_RATIO,
        rows,
    })
}

// ---------------------------------------------------------------- report

#[derive(Serialize)]
struct Report {
    server: String,
    client_profile: &'static str,
    backend: String,
    accel: String,
    accel_reason: String,
    reps: usize,
    load_start: Load,
    load_after_pause: Option<Load>,
    load_end: Load,
    pause_target: String,
    pause: Vec<PauseCell>,
    chain: Option<ChainReport>,
    elapsed_s: f64,
}

fn right(t: &mut Table, from: usize, to: usize) {
    for i in from..=to {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
}

fn print_tables(r: &Report) {
    println!(
        "forkd-branch-bench: {} / {} ({}), client+server {}",
        r.backend, r.accel, r.accel_reason, r.client_profile
    );
    println!("load at start: {}", fmt_load(&r.load_start));
    if !r.pause.is_empty() {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        t.set_header(vec![
            "RAM MiB",
            "mode",
            "target dirty MiB",
            "measured dirty MiB",
            "pause ms median",
            "min",
            "max",
            "target ms",
            "result",
            "branch call ms",
        ]);
        for c in &r.pause {
            let target = match c.requested_dirty_mib {
                Some(req) => format!("{} (asked {req})", c.target_dirty_mib),
                None => c.target_dirty_mib.to_string(),
            };
            let result = match c.pass {
                Some(true) => "pass".to_string(),
                Some(false) => "FAIL".to_string(),
                None => "no data".to_string(),
            };
            let result = if c.errors.is_empty() { result } else { format!("{result} ({} error(s))", c.errors.len()) };
            let f = |v: f64, p: usize| {
                if v.is_finite() { format!("{v:.p$}") } else { "-".into() }
            };
            t.add_row(vec![
                c.ram_mib.to_string(),
                c.mode.clone(),
                target,
                f(c.measured_dirty_mib, 1),
                f(c.pause_ms_median, 2),
                f(c.pause_ms_min, 2),
                f(c.pause_ms_max, 2),
                f(c.target_ms, 2),
                result,
                f(c.branch_call_ms_median, 0),
            ]);
        }
        right(&mut t, 2, 7);
        right(&mut t, 9, 9);
        println!(
            "\nPause window against dirty memory, {} branch(es) per cell, each from a fresh child (target: {})",
            r.reps, r.pause_target
        );
        println!("{t}");
        let mut noted = vec![];
        for c in &r.pause {
            if let Some(req) = c.requested_dirty_mib
                && !noted.contains(&c.ram_mib)
            {
                noted.push(c.ram_mib);
                println!(
                    "note: {req} MiB cannot be dirtied in a {} MiB guest (a fresh child has {} MiB \
                     MemAvailable); used {} MiB (MemAvailable - {GUEST_HEADROOM_MIB} MiB, rounded down to 16)",
                    c.ram_mib, c.guest_mem_available_mib, c.target_dirty_mib
                );
            }
        }
        for c in &r.pause {
            for e in &c.errors {
                println!("error: {} MiB {} {} MiB: {e}", c.ram_mib, c.mode, c.target_dirty_mib);
            }
        }
        if let Some(l) = &r.load_after_pause {
            println!("load after part 1: {}", fmt_load(l));
        }
    }
    if let Some(ch) = &r.chain {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        t.set_header(vec![
            "snapshot",
            "tag",
            "kind",
            "depth",
            "spawn ms median",
            "min",
            "max",
            "daemon spawn_ms median",
            "× depth 0",
            "× compacted",
            "state",
        ]);
        for row in &ch.rows {
            t.add_row(vec![
                row.label.clone(),
                row.tag.clone(),
                row.kind.clone(),
                row.chain_depth.to_string(),
                format!("{:.1}", row.spawn_ms_median),
                format!("{:.1}", row.spawn_ms_min),
                format!("{:.1}", row.spawn_ms_max),
                format!("{:.1}", row.daemon_spawn_ms_median),
                format!("{:.3}", row.ratio_to_depth0),
                format!("{:.3}", row.ratio_to_compacted),
                if row.state_ok { "ok" } else { "WRONG" }.to_string(),
            ]);
        }
        right(&mut t, 3, 9);
        println!(
            "\nSpawn (POST /v1/sandboxes n=1, to answering) against chain depth; base {}, {} MiB written per link, {} warm-up + {} timed spawns each, round-robin",
            ch.base, ch.link_dirty_mib, ch.warmup, ch.reps
        );
        println!("{t}");
        println!(
            "depth 3 / compacted = {:.3} (target ≤ {:.2}): {}; depth 3 / depth 0 = {:.3}",
            ch.depth3_over_compacted,
            ch.target_ratio,
            if ch.pass { "pass" } else { "FAIL" },
            ch.depth3_over_depth0
        );
    }
    println!("load at end: {}", fmt_load(&r.load_end));
    println!("elapsed {:.0} s", r.elapsed_s);
}

/// Kills this run's sandboxes and deletes its snapshots, children first.
async fn cleanup(d: &Api, a: &Args) {
    let mut bases: Vec<String> = a.ram.iter().map(|r| format!("{}ram{r}", d.prefix)).collect();
    bases.dedup();
    for tag in &bases {
        let _ = d.post("/v1/sandboxes/delete", json!({ "snapshot_tag": tag })).send().await;
    }
    let chain = format!("{}chain-b", d.prefix);
    for tag in [format!("{chain}3-flat"), format!("{chain}3"), format!("{chain}2"), format!("{chain}1")] {
        let _ = d.post("/v1/sandboxes/delete", json!({ "snapshot_tag": tag })).send().await;
        drop_snapshot(d, &tag).await;
    }
    for tag in &bases {
        drop_snapshot(d, tag).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.ram.is_empty() {
        bail!("--ram needs at least one size");
    }
    for m in &a.modes {
        if m != "diff" && m != "full" {
            bail!("--modes: {m:?} is neither diff nor full");
        }
    }
    let reps = if a.quick { 1 } else { a.reps.max(1) };
    let spawn_reps = if a.quick { 1 } else { a.spawn_reps.max(1) };
    let spawn_warmup = if a.quick { 0 } else { a.spawn_warmup };
    let started = Instant::now();
    let server = forkd_integration::bin_dir().join("forkd-server");
    let (daemon, api) = match &a.url {
        Some(url) => {
            let prefix = format!("bb{}-", std::process::id());
            (None, Api::new(url.clone(), a.token.clone(), prefix)?)
        }
        None => {
            if !server.exists() {
                bail!(
                    "{} is missing: build the daemon with the same profile as this binary first \
                     (`cargo build{} -p forkd-server`)",
                    server.display(),
                    if cfg!(debug_assertions) { "" } else { " --release" }
                );
            }
            let d = Daemon::start(Options::default());
            let api = Api::new(d.http_url(), None, String::new())?;
            (Some(d), api)
        }
    };
    let d = &api;
    let version = call(d.get("/version"), "GET /version").await?;
    let data_dir = std::path::PathBuf::from(version["data_dir"].as_str().unwrap_or_default());
    eprintln!(
        "branch-bench: daemon at {} ({} / {}), data dir {}",
        d.url,
        version["backend"],
        version["accel"],
        data_dir.display()
    );
    let load_start = load(&data_dir);
    eprintln!("branch-bench: {}", fmt_load(&load_start));

    let pause = if a.no_pause { vec![] } else { pause_part(d, &a, reps).await? };
    let load_after_pause = (!a.no_pause).then(|| load(&data_dir));
    let chain = if a.no_chain { None } else { Some(chain_part(d, &a, spawn_reps, spawn_warmup).await?) };
    let load_end = load(&data_dir);
    cleanup(d, &a).await;
    drop(daemon);
    let report = Report {
        server: match &a.url {
            Some(u) => u.clone(),
            None => server.display().to_string(),
        },
        client_profile: if cfg!(debug_assertions) { "debug" } else { "release" },
        backend: version["backend"].as_str().unwrap_or_default().to_string(),
        accel: version["accel"].as_str().unwrap_or_default().to_string(),
        accel_reason: version["accel_reason"].as_str().unwrap_or_default().to_string(),
        reps,
        load_start,
        load_after_pause,
        load_end,
        pause_target: format!(
            "median pause ≤ {PAUSE_TARGET_BASE_MS} ms + measured dirty MiB / {PAUSE_TARGET_MIB_PER_MS}"
        ),
        pause,
        chain,
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_tables(&report);
    }
    Ok(())
}
