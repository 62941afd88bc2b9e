//! forkd-edge-bench: what the daemon's edge costs per request.
//!
//! Starts two real `forkd-server` processes on loopback, one with a bearer
//! token and an audit log and one without either, and times the trivial
//! `SystemService.GetVersion` RPC through each: over gRPC (one tonic channel,
//! sequential calls) and over REST (`GET /version`, one keep-alive HTTP/1.1
//! connection). The difference between the "+auth+audit" and "bare" rows is
//! what the token check and the audit line cost. REST against gRPC compares
//! whole round trips, client included: the REST path transcodes into the
//! same in-process gRPC service, but its HTTP/1.1 client is lighter than an
//! HTTP/2 gRPC client.
//!
//! The daemon binary is taken from the same target directory as this one, so
//! build it with the same profile first:
//!
//! ```text
//! cargo build --release -p forkd-server
//! cargo run --release -p forkd-bench --bin forkd-edge-bench -- --n 5000
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use comfy_table::{CellAlignment, Table, presets::UTF8_FULL_CONDENSED};
use forkd_api::v1::GetVersionRequest;
use forkd_bench::{Summary, summarize};
use forkd_integration::{Daemon, Options, TEST_TOKEN};
use serde::Serialize;

/// The gRPC p50 the edge is meant to stay under.
const GRPC_P50_TARGET_US: f64 = 100.0;

#[derive(Parser, Debug)]
#[command(
    name = "forkd-edge-bench",
    about = "Latency of a trivial RPC through forkd's edge (auth, audit, dispatch), gRPC and REST"
)]
struct Args {
    /// Measured calls per configuration.
    #[arg(long, default_value_t = 5000)]
    n: usize,
    /// Unmeasured calls first, per configuration.
    #[arg(long, default_value_t = 500)]
    warmup: usize,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    name: &'static str,
    protocol: &'static str,
    auth_and_audit: bool,
    #[serde(flatten)]
    summary: Summary,
}

#[derive(Serialize)]
struct Report {
    rpc: &'static str,
    n: usize,
    warmup: usize,
    client_profile: &'static str,
    server: String,
    results: Vec<Row>,
    audit_lines: usize,
    audit_lines_expected: usize,
    grpc_p50_target_us: f64,
    grpc_p50_target_met: bool,
}

/// Keeps every daemon away from VMs: no KVM boot probe at start-up, and no
/// usable VMM even if something asked for one.
fn no_vm_args() -> Vec<String> {
    ["--accel", "tcg", "--qemu", "/bin/false"].iter().map(|s| s.to_string()).collect()
}

async fn bench_grpc(d: &Daemon, warmup: usize, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut client = d.system().await;
    let first = client.get_version(GetVersionRequest {}).await.context("gRPC GetVersion")?.into_inner();
    if first.api != "v1" {
        bail!("unexpected GetVersion answer: {first:?}");
    }
    for _ in 0..warmup {
        client.get_version(GetVersionRequest {}).await?;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = client.get_version(GetVersionRequest {}).await?;
        out.push(t.elapsed());
        std::hint::black_box(r);
    }
    Ok(out)
}

async fn bench_rest(d: &Daemon, warmup: usize, n: usize) -> anyhow::Result<Vec<Duration>> {
    // One client, so one keep-alive connection for every call.
    let client = reqwest::Client::builder().pool_max_idle_per_host(1).build()?;
    let url = format!("{}/version", d.http_url());
    let bearer = d.bearer();
    let call = || {
        let mut rb = client.get(&url);
        if let Some(b) = &bearer {
            rb = rb.header("authorization", b);
        }
        async move {
            let r = rb.send().await?;
            let status = r.status();
            let body = r.bytes().await?;
            if status != 200 {
                bail!("GET /version: {status}: {}", String::from_utf8_lossy(&body));
            }
            Ok::<_, anyhow::Error>(body)
        }
    };
    let first: serde_json::Value = serde_json::from_slice(&call().await?)?;
    if first["api"] != "v1" {
        bail!("unexpected /version answer: {first}");
    }
    for _ in 0..warmup {
        call().await?;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let body = call().await?;
        out.push(t.elapsed());
        std::hint::black_box(body);
    }
    Ok(out)
}

fn count_lines(p: &Path) -> anyhow::Result<usize> {
    Ok(std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?.lines().count())
}

fn fmt_us(v: f64) -> String {
    format!("{v:.1}")
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.n == 0 {
        bail!("--n must be at least 1");
    }
    let server = forkd_integration::bin_dir().join("forkd-server");
    if !server.exists() {
        bail!(
            "{} is missing: build the daemon with the same profile as this binary first \
             (`cargo build{} -p forkd-server`)",
            server.display(),
            if cfg!(debug_assertions) { "" } else { " --release" }
        );
    }

    let tmp = tempfile::Builder::new().prefix("forkd-edge-bench-").tempdir_in("/tmp")?;
    let audit = tmp.path().join("audit.jsonl");
    let mut guarded = Daemon::start(Options {
        token: Some(TEST_TOKEN.into()),
        audit_log: Some(audit.clone()),
        extra_args: no_vm_args(),
        ..Default::default()
    });
    let bare = Daemon::start(Options { extra_args: no_vm_args(), ..Default::default() });
    if !args.json {
        eprintln!(
            "forkd-edge-bench: {} measured + {} warm-up calls per row; daemons at {} (token+audit) and {} (bare)",
            args.n, args.warmup, guarded.addr, bare.addr
        );
    }

    let mut results = vec![];
    let runs: [(&'static str, &'static str, bool); 4] = [
        ("gRPC + auth + audit", "grpc", true),
        ("gRPC bare", "grpc", false),
        ("REST + auth + audit", "rest", true),
        ("REST bare", "rest", false),
    ];
    for (name, protocol, guarded_run) in runs {
        let d = if guarded_run { &guarded } else { &bare };
        let mut samples = match protocol {
            "grpc" => bench_grpc(d, args.warmup, args.n).await,
            _ => bench_rest(d, args.warmup, args.n).await,
        }
        .with_context(|| name.to_string())?;
        results.push(Row { name, protocol, auth_and_audit: guarded_run, summary: summarize(&mut samples) });
    }

    // Every call through the guarded daemon (plus the one check call per
    // protocol) must have left exactly one audit line.
    guarded.stop();
    let audit_lines = count_lines(&audit)?;
    let audit_lines_expected = 2 * (1 + args.warmup + args.n);

    let grpc_p50 = results[0].summary.p50_us;
    let report = Report {
        rpc: "forkd.v1.SystemService.GetVersion",
        n: args.n,
        warmup: args.warmup,
        client_profile: if cfg!(debug_assertions) { "debug" } else { "release" },
        server: server.display().to_string(),
        results,
        audit_lines,
        audit_lines_expected,
        grpc_p50_target_us: GRPC_P50_TARGET_US,
        grpc_p50_target_met: grpc_p50 <= GRPC_P50_TARGET_US,
    };

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        t.set_header(vec!["GetVersion via", "n", "p50 µs", "p90 µs", "p99 µs", "mean µs", "max µs"]);
        for r in &report.results {
            let s = &r.summary;
            t.add_row(vec![
                r.name.to_string(),
                s.n.to_string(),
                fmt_us(s.p50_us),
                fmt_us(s.p90_us),
                fmt_us(s.p99_us),
                fmt_us(s.mean_us),
                fmt_us(s.max_us),
            ]);
        }
        for i in 1..=6 {
            if let Some(c) = t.column_mut(i) {
                c.set_cell_alignment(CellAlignment::Right);
            }
        }
        println!("{t}");
        let over = |a: usize, b: usize| report.results[a].summary.p50_us - report.results[b].summary.p50_us;
        println!(
            "auth+audit overhead at p50: gRPC {:+.1} µs, REST {:+.1} µs; REST minus gRPC at p50 (bare, client included): {:+.1} µs",
            over(0, 1),
            over(2, 3),
            over(3, 1)
        );
        println!(
            "gRPC+auth+audit p50 {:.1} µs: target ≤ {GRPC_P50_TARGET_US} µs {}",
            grpc_p50,
            if report.grpc_p50_target_met { "met" } else { "NOT met" }
        );
        println!(
            "audit lines: {} (expected {}); client and server built {}",
            report.audit_lines, report.audit_lines_expected, report.client_profile
        );
    }
    if report.audit_lines != report.audit_lines_expected {
        bail!("the audit log has {} lines, expected {}", report.audit_lines, report.audit_lines_expected);
    }
    Ok(())
}
