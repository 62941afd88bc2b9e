//! `forkd bench`: forkd's spawn path measured next to bare VMM restores of
//! the same snapshot on the same host, in one run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use forkd_api::v1 as api;
use forkd_server::agent::AgentClient;
use forkd_server::vmm::qemu::QemuBackend;
use forkd_server::vmm::{Backend, VmDir, VmProcess, VmSpec, process};
use futures::stream::{self, StreamExt};
use serde_json::json;

use super::bench_plot::Series;
use crate::args::BenchArgs;
use crate::client::Conn;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The 99th percentile (nearest rank) of `v`; 0 when empty.
fn p99(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len().max(1)) - 1).copied().unwrap_or(0.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Where a child's PSS goes, averaged over children, in MiB.
#[derive(Default, Clone, Copy)]
struct PssSplit {
    guest_shared: f64,
    guest_private: f64,
    tcg_code: f64,
    vmm: f64,
    ksm: f64,
}

impl PssSplit {
    fn of(pids: &[u32]) -> PssSplit {
        let parts: Vec<process::PssParts> = pids.iter().filter_map(|&p| process::pss_parts(p)).collect();
        let n = parts.len().max(1) as f64 * 1048576.0;
        let avg = |f: fn(&process::PssParts) -> u64| parts.iter().map(f).sum::<u64>() as f64 / n;
        PssSplit {
            guest_shared: avg(|p| p.guest_shared),
            guest_private: avg(|p| p.guest_private),
            tcg_code: avg(|p| p.tcg_code),
            vmm: avg(|p| p.vmm),
            ksm: avg(|p| p.ksm),
        }
    }

    const ROWS: [&'static str; 6] = [
        "guest memory shared with the snapshot",
        "guest pages the child wrote (its own)",
        "TCG translated code (none under KVM)",
        "the VMM's own (QEMU code, heap, devices)",
        "total",
        "of which KSM merged",
    ];

    fn row(&self, i: usize) -> f64 {
        match i {
            0 => self.guest_shared,
            1 => self.guest_private,
            2 => self.tcg_code,
            3 => self.vmm,
            4 => self.guest_shared + self.guest_private + self.tcg_code + self.vmm,
            _ => self.ksm,
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "guest_shared_mib": self.guest_shared, "guest_private_mib": self.guest_private,
            "tcg_code_mib": self.tcg_code, "vmm_mib": self.vmm, "ksm_mib": self.ksm,
        })
    }
}

/// The median CPU time, in ms, the VMMs `pids` used so far (all threads:
/// QEMU's start, the state load, and the guest's run and its translation
/// under TCG).
fn cpu_ms_per_child(pids: &[u32]) -> [f64; 2] {
    let split: Vec<(u64, u64)> = pids.iter().filter_map(|&p| process::cpu_split_ns(p)).collect();
    [median(split.iter().map(|s| s.0 as f64 / 1e6).collect()), median(split.iter().map(|s| s.1 as f64 / 1e6).collect())]
}

/// Longest wait for KSM to scan the children before their memory is read.
const KSM_WAIT: Duration = Duration::from_secs(120);

/// When KSM runs, waits until it has scanned everything twice (a page is
/// merged on the scan after the one that saw it unchanged), so that the
/// PSS read next shows its effect. False when it does not run.
async fn settle_ksm() -> bool {
    let scans = || std::fs::read_to_string("/sys/kernel/mm/ksm/full_scans").ok()?.trim().parse::<u64>().ok();
    let (Some((true, _)), Some(start)) = (ksm_state(), scans()) else { return false };
    let deadline = Instant::now() + KSM_WAIT;
    while scans().is_some_and(|n| n < start + 2) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    true
}

/// KSM's state on this host: (running, pages shared now).
fn ksm_state() -> Option<(bool, u64)> {
    let read = |f: &str| std::fs::read_to_string(format!("/sys/kernel/mm/ksm/{f}")).ok()?.trim().parse::<u64>().ok();
    Some((read("run")? == 1, read("pages_sharing")?))
}

struct FanOut {
    n: u32,
    forkd_ms: f64,
    cleanup_ms: f64,
    pss_mib: f64,
    bare_ms: Option<f64>,
    /// Median of the rounds' forkd / bare ratios.
    ratio: Option<f64>,
    /// The same fan-out taken from a hot pool (None past the largest pool,
    /// or when the host refused a pool that size).
    pooled_ms: Option<f64>,
    bare_pss_mib: Option<f64>,
}

pub async fn run(conn: &Conn, a: BenchArgs, json_out: bool) -> anyhow::Result<u8> {
    let version = conn.call(conn.system().get_version(api::GetVersionRequest {})).await?;
    let snap = conn.call(conn.snapshots().get_snapshot(api::GetSnapshotRequest { tag: a.tag.to_string() })).await?;
    if snap.status != "ready" {
        bail!("snapshot {} is {}, not ready", snap.tag, snap.status);
    }
    let mut sb = conn.sandboxes();
    let progress = |msg: &str| {
        if !json_out {
            eprintln!("bench: {msg}");
        }
    };

    // spawn(1) and the exec round trip.
    progress("spawn(1)");
    let t = Instant::now();
    let one = conn
        .call(sb.create_sandboxes(api::CreateSandboxesRequest {
            snapshot_tag: a.tag.to_string(),
            n: Some(1),
            ..Default::default()
        }))
        .await?
        .sandboxes;
    let spawn1 = ms(t.elapsed());
    let id = one[0].id.clone();
    progress("exec round trips");
    let mut execs = vec![];
    for _ in 0..=a.execs {
        let req = api::ExecRequest { id: id.clone(), args: vec!["true".into()], ..Default::default() };
        let t = Instant::now();
        conn.call(sb.exec(req)).await?;
        execs.push(ms(t.elapsed()));
    }
    // The first exec in a fresh child pays for cold code paths.
    let first_exec = execs.remove(0);
    let t = Instant::now();
    conn.call(sb.delete_sandbox(api::DeleteSandboxRequest { id: id.clone() })).await?;
    let cleanup1 = ms(t.elapsed());

    // spawn(1) served from a hot pool, next to a bare pre-started restore.
    progress("spawn(1) from a hot pool");
    let mut pooled = vec![];
    for _ in 0..POOL_ROUNDS {
        let (t, kids) = from_pool(conn, &a.tag, 1).await?;
        pooled.push(t);
        delete_all(conn, &kids).await?;
    }
    let pooled_ms = median(pooled.clone());
    let pool_n = a.fanout.first().copied().unwrap_or(10);
    progress(&format!("fan-out {pool_n} from a hot pool"));
    let (pool_fanout_ms, kids) = from_pool(conn, &a.tag, pool_n).await?;
    let pool_phases = Phases::of(&kids);
    let pool_spawns: Vec<f64> = kids.iter().map(|k| k.spawn_ms).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pool_pss: u64 = kids.iter().filter_map(|k| process::pss_bytes(k.pid)).sum();
    let pool_split = PssSplit::of(&kids.iter().map(|k| k.pid).collect::<Vec<_>>());
    delete_all(conn, &kids).await?;
    let pool_pss_mib = pool_pss as f64 / pool_n as f64 / 1048576.0;
    progress("exec round trips while a pool refills");
    let refill_samples = exec_under_refill(conn, &a.tag).await?;
    let refill = refill_samples.as_ref().map(|(rest, busy)| (p99(rest), p99(busy), busy.len()));
    let bare_pooled_ms = if a.no_bare {
        None
    } else {
        progress("spawn(1) as a bare pre-started restore");
        Some(bare_pooled(&version.data_dir, a.tag.as_ref(), &snap.accel).await?)
    };

    let mut rows = vec![];
    let mut cold_phases = None;
    let mut cold_spawns = vec![];
    let mut bare_phases = None;
    let mut cold_split = None;
    let mut cold_cpu = None;
    let mut bare_cpu = None;
    let mut bare_split = None;
    for &n in &a.fanout {
        // Rounds alternate forkd and bare so that both see the same host;
        // the first round's children give the phases and the memory split.
        let (mut forkd_ms, mut bare_ms, mut ratios) = (vec![], vec![], vec![]);
        let (mut cleanup_ms, mut pss_mib, mut bare_pss_mib) = (vec![], vec![], vec![]);
        for round in 0..a.rounds {
            let of = if a.rounds > 1 { format!(" (round {} of {})", round + 1, a.rounds) } else { String::new() };
            progress(&format!("fan-out {n} through forkd{of}"));
            let t = Instant::now();
            let kids = conn
                .call(sb.create_sandboxes(api::CreateSandboxesRequest {
                    snapshot_tag: a.tag.to_string(),
                    n: Some(n),
                    ..Default::default()
                }))
                .await?
                .sandboxes;
            forkd_ms.push(ms(t.elapsed()));
            let first = round == 0 && n == pool_n;
            if first {
                cold_cpu = Some(cpu_ms_per_child(&kids.iter().map(|k| k.pid).collect::<Vec<_>>()));
                cold_phases = Some(Phases::of(&kids));
                cold_spawns = kids.iter().map(|k| k.spawn_ms).collect();
            }
            // Let the children settle before measuring what they cost at rest.
            tokio::time::sleep(Duration::from_secs(1)).await;
            if first && settle_ksm().await {
                progress("waited for KSM to scan the children twice");
            }
            let pss: u64 = kids.iter().filter_map(|k| process::pss_bytes(k.pid)).sum();
            pss_mib.push(pss as f64 / n as f64 / 1048576.0);
            if first {
                cold_split = Some(PssSplit::of(&kids.iter().map(|k| k.pid).collect::<Vec<_>>()));
            }
            let t = Instant::now();
            conn.call(sb.delete_sandboxes(api::DeleteSandboxesRequest {
                ids: kids.iter().map(|k| k.id.clone()).collect(),
                ..Default::default()
            }))
            .await?;
            cleanup_ms.push(ms(t.elapsed()));
            if !a.no_bare {
                progress(&format!("fan-out {n} as bare restores{of}"));
                let bare = bare_fanout(&version.data_dir, a.tag.as_ref(), n, a.bare_concurrency, &snap.accel).await?;
                if first {
                    bare_cpu = Some(bare.cpu_ms);
                    bare_phases = Some(bare.phases);
                    bare_split = Some(bare.pss);
                }
                ratios.push(forkd_ms[forkd_ms.len() - 1] / bare.ms);
                bare_ms.push(bare.ms);
                bare_pss_mib.push(bare.pss_mib);
            }
        }
        let pooled_ms = if n == pool_n {
            Some(pool_fanout_ms)
        } else if n as usize <= forkd_server::core::pool::MAX_PER_SNAPSHOT {
            progress(&format!("fan-out {n} from a hot pool"));
            match from_pool(conn, &a.tag, n).await {
                Ok((t, kids)) => {
                    delete_all(conn, &kids).await?;
                    Some(t)
                }
                Err(e) => {
                    progress(&format!("fan-out {n} from a hot pool: {e:#}"));
                    None
                }
            }
        } else {
            None
        };
        let some_median = |v: Vec<f64>| (!v.is_empty()).then(|| median(v));
        rows.push(FanOut {
            pooled_ms,
            n,
            forkd_ms: median(forkd_ms),
            cleanup_ms: median(cleanup_ms),
            pss_mib: median(pss_mib),
            bare_ms: some_median(bare_ms),
            ratio: some_median(ratios),
            bare_pss_mib: some_median(bare_pss_mib),
        });
    }

    if let Some(path) = &a.plot {
        let mut series = vec![
            Series { name: format!("spawn, cold fan-out {pool_n}, per child"), ms: cold_spawns },
            Series { name: format!("spawn, fan-out {pool_n} from a hot pool, per child"), ms: pool_spawns },
            Series { name: "spawn(1) from a hot pool".into(), ms: pooled },
            Series { name: "exec `true`".into(), ms: execs.clone() },
        ];
        if let Some((_, busy)) = &refill_samples {
            series.push(Series { name: "exec `true` while a pool refills".into(), ms: busy.clone() });
        }
        let title = format!("forkd bench: snapshot {} ({}, {})", a.tag, snap.backend, snap.accel);
        super::bench_plot::draw(path, &title, &series)?;
        progress(&format!("plot written to {}", path.display()));
    }
    if json_out {
        let out = json!({
            "snapshot": a.tag.to_string(),
            "accel": snap.accel,
            "spawn1_ms": spawn1,
            "exec_first_ms": first_exec,
            "exec_median_ms": median(execs.clone()),
            "cleanup1_ms": cleanup1,
            "pooled_spawn1_ms": pooled_ms,
            "bare_pooled_ms": bare_pooled_ms,
            "pool_fanout": { "n": pool_n, "forkd_ms": pool_fanout_ms, "pss_mib_per_child": pool_pss_mib },
            "phases": {
                "cold": cold_phases.as_ref().map(Phases::json),
                "pooled": pool_phases.json(),
                "bare": bare_phases.map(|b| json!({ "restore_ms": b[0], "resume_ms": b[1], "first_answer_ms": b[2] })),
                "vmm_cpu_ms_per_child": {
                    "cold": cold_cpu.map(|c| json!({ "vcpu": c[0], "other": c[1] })),
                    "bare": bare_cpu.map(|c| json!({ "vcpu": c[0], "other": c[1] })),
                },
            },
            "pss_split": {
                "n": pool_n,
                "cold": cold_split.as_ref().map(PssSplit::json),
                "pooled": pool_split.json(),
                "bare": bare_split.as_ref().map(PssSplit::json),
            },
            "ksm": ksm_state().map(|(on, sharing)| json!({ "running": on, "pages_sharing": sharing })),
            "exec_p99_at_rest_ms": refill.as_ref().map(|r| r.0),
            "exec_p99_during_refill_ms": refill.as_ref().map(|r| r.1),
            "execs_during_refill": refill.as_ref().map(|r| r.2),
            "fanout": rows.iter().map(|r| json!({
                "n": r.n, "forkd_ms": r.forkd_ms, "bare_ms": r.bare_ms,
                "ratio": r.ratio, "rounds": a.rounds,
                "pooled_ms": r.pooled_ms, "pooled_ratio": r.pooled_ms.zip(r.bare_ms).map(|(p, b)| p / b),
                "cleanup_ms": r.cleanup_ms, "pss_mib_per_child": r.pss_mib,
                "bare_pss_mib_per_child": r.bare_pss_mib,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec!["step", "ms"]);
    t.add_row(vec!["spawn(1), to answering".to_string(), format!("{spawn1:.1}")]);
    t.add_row(vec!["exec `true`, first".to_string(), format!("{first_exec:.1}")]);
    t.add_row(vec![format!("exec `true`, median of {}", a.execs), format!("{:.1}", median(execs))]);
    t.add_row(vec!["cleanup(1)".to_string(), format!("{cleanup1:.1}")]);
    t.add_row(vec![format!("spawn(1) from a pool, median of {POOL_ROUNDS}"), format!("{pooled_ms:.1}")]);
    if let Some(b) = bare_pooled_ms {
        t.add_row(vec![format!("bare pre-started restore, median of {POOL_ROUNDS}"), format!("{b:.1}")]);
        t.add_row(vec!["pooled ratio".to_string(), format!("{:.2}", pooled_ms / b)]);
    }
    t.add_row(vec![format!("fan-out {pool_n} from a hot pool"), format!("{pool_fanout_ms:.1}")]);
    if let Some(b) = rows.iter().find(|r| r.n == pool_n).and_then(|r| r.bare_ms) {
        t.add_row(vec![format!("pooled fan-out {pool_n} ratio to bare"), format!("{:.2}", pool_fanout_ms / b)]);
    }
    t.add_row(vec![format!("PSS per pooled child (fan-out {pool_n}), MiB"), format!("{pool_pss_mib:.1}")]);
    match &refill {
        Some((rest, busy, n)) => {
            t.add_row(vec![format!("exec p99 at rest, {REFILL_EXECS} round trips"), format!("{rest:.1}")]);
            t.add_row(vec![
                format!("exec p99 while a pool of {REFILL_POOL} refills, {n} round trips"),
                format!("{busy:.1}"),
            ]);
            t.add_row(vec!["refill p99 ratio".to_string(), format!("{:.2}", busy / rest)]);
        }
        None => {
            t.add_row(vec!["exec p99 while a pool refills".to_string(), "- (SetPool needs an admin)".into()]);
        }
    }
    println!("snapshot {} ({}, {})\n{t}", a.tag, snap.backend, snap.accel);
    let mut f = Table::new();
    f.load_preset(UTF8_FULL_CONDENSED);
    let rounds = if a.rounds > 1 { format!(", median of {}", a.rounds) } else { String::new() };
    f.set_header(vec![
        "fan-out".to_string(),
        format!("forkd ms{rounds}"),
        format!("bare ms{rounds}"),
        "ratio".into(),
        "from a pool ms".into(),
        "pool ratio".into(),
        "cleanup ms".into(),
        "PSS/child MiB".into(),
        "bare PSS/child MiB".into(),
    ]);
    for r in &rows {
        f.add_row(vec![
            r.n.to_string(),
            format!("{:.0}", r.forkd_ms),
            r.bare_ms.map(|b| format!("{b:.0}")).unwrap_or("-".into()),
            r.ratio.map(|q| format!("{q:.2}")).unwrap_or("-".into()),
            r.pooled_ms.map(|p| format!("{p:.0}")).unwrap_or("-".into()),
            r.pooled_ms.zip(r.bare_ms).map(|(p, b)| format!("{:.2}", p / b)).unwrap_or("-".into()),
            format!("{:.0}", r.cleanup_ms),
            format!("{:.1}", r.pss_mib),
            r.bare_pss_mib.map(|p| format!("{p:.1}")).unwrap_or("-".into()),
        ]);
    }
    println!("{f}");
    let mut m = Table::new();
    m.load_preset(UTF8_FULL_CONDENSED);
    m.set_header(vec![
        format!("PSS per child, MiB (fan-out {pool_n})"),
        "cold".into(),
        "hot pool".into(),
        "bare".into(),
    ]);
    let cell = |s: Option<&PssSplit>, i: usize| s.map(|s| format!("{:.1}", s.row(i))).unwrap_or("-".into());
    for (i, name) in PssSplit::ROWS.iter().enumerate() {
        m.add_row(vec![
            name.to_string(),
            cell(cold_split.as_ref(), i),
            cell(Some(&pool_split), i),
            cell(bare_split.as_ref(), i),
        ]);
    }
    println!("{m}");
    if let (Some(c), Some(b)) = (&cold_split, &bare_split) {
        println!(
            "PSS per cold child / bare: {:.2} in all, {:.2} without TCG code (what a KVM host has)",
            c.row(4) / b.row(4),
            (c.row(4) - c.tcg_code) / (b.row(4) - b.tcg_code)
        );
    }
    match ksm_state() {
        Some((true, sharing)) => {
            println!("KSM: running ({sharing} pages shared host-wide); the split above was read after two full scans")
        }
        Some((false, _)) => println!("KSM: off (echo 1 > /sys/kernel/mm/ksm/run to merge identical guest pages)"),
        None => println!("KSM: not available on this kernel"),
    }
    if a.phases {
        let mut p = Table::new();
        p.load_preset(UTF8_FULL_CONDENSED);
        p.set_header(vec![
            format!("spawn phase, median ms (fan-out {pool_n})"),
            "cold".into(),
            "hot pool".into(),
            "bare".into(),
        ]);
        let cold = cold_phases.unwrap_or_default();
        // A bare restore has no prepare step and no record; its first
        // answer is a ping where forkd's is the identity re-init.
        let bare = |i: usize| match (bare_phases, i) {
            (Some(b), 1..=3) => format!("{:.1}", b[i - 1]),
            (Some(_), _) => "-".into(),
            (None, _) => "".into(),
        };
        for (i, name) in Phases::NAMES.iter().enumerate() {
            p.add_row(vec![
                name.to_string(),
                format!("{:.1}", cold.steps[i]),
                format!("{:.1}", pool_phases.steps[i]),
                bare(i),
            ]);
            if i == 3 {
                // Inside the re-init: the guest's own steps; the rest of
                // the phase is the channel and the guest waking up.
                for (j, step) in Phases::GUEST.iter().enumerate() {
                    p.add_row(vec![
                        format!("  in the guest: {step}"),
                        format!("{:.1}", cold.guest[j]),
                        format!("{:.1}", pool_phases.guest[j]),
                        "-".into(),
                    ]);
                }
            }
        }
        for (i, what) in ["VMM CPU per child until ready: vCPU", "VMM CPU per child until ready: QEMU's other threads"]
            .iter()
            .enumerate()
        {
            p.add_row(vec![
                what.to_string(),
                cold_cpu.map(|c| format!("{:.1}", c[i])).unwrap_or("-".into()),
                "-".into(),
                bare_cpu.map(|c| format!("{:.1}", c[i])).unwrap_or("-".into()),
            ]);
        }
        println!("{p}");
    }
    Ok(0)
}

/// Median time of each spawn phase over a fork's children, from their
/// records (each phase's own share, not cumulative).
#[derive(Default)]
struct Phases {
    steps: [f64; 5],
    /// Inside the re-init, the guest's own steps (clock, entropy,
    /// hostname, reseed, network, pids).
    guest: [f64; 6],
}

impl Phases {
    const NAMES: [&'static str; 5] = [
        "prepare (cgroup, network)",
        "restore (VMM and state; none when pooled)",
        "limits, connect and resume",
        "identity re-init (one round trip)",
        "volume mounts and record",
    ];

    const GUEST: [&'static str; 6] = ["clock", "entropy", "hostname", "reseed", "network", "pids"];

    fn of(kids: &[api::Sandbox]) -> Phases {
        let mut cols: [Vec<f64>; 5] = Default::default();
        let mut guest: [Vec<f64>; 6] = Default::default();
        for k in kids {
            let p = k.spawn_phases.unwrap_or_default();
            let marks = [0.0, p.prepared_ms, p.restored_ms, p.resumed_ms, p.reinit_ms, k.spawn_ms];
            for (i, col) in cols.iter_mut().enumerate() {
                col.push((marks[i + 1] - marks[i]).max(0.0));
            }
            let g = p.guest_steps.unwrap_or_default();
            let steps = [g.clock_ms, g.entropy_ms, g.hostname_ms, g.reseed_ms, g.network_ms, g.pids_ms];
            for (col, v) in guest.iter_mut().zip(steps) {
                col.push(v);
            }
        }
        Phases { steps: cols.map(median), guest: guest.map(median) }
    }

    fn json(&self) -> serde_json::Value {
        let guest: serde_json::Map<String, serde_json::Value> =
            Self::GUEST.iter().zip(self.guest).map(|(n, v)| (format!("{n}_ms"), json!(v))).collect();
        json!({
            "prepare_ms": self.steps[0], "restore_ms": self.steps[1], "resume_ms": self.steps[2],
            "reinit_ms": self.steps[3], "answer_ms": self.steps[4], "guest_steps": guest,
        })
    }
}

const POOL_ROUNDS: usize = 5;
const POOL_SETTLE: Duration = Duration::from_secs(1);
/// Longest wait for a pool to fill.
const POOL_FILL: Duration = Duration::from_secs(600);

/// The pool of `tag` (empty when it has none).
async fn pool_of(conn: &Conn, tag: &str) -> anyhow::Result<api::Pool> {
    let pools = conn.call(conn.snapshots().list_pools(api::ListPoolsRequest {})).await?.pools;
    Ok(pools.into_iter().find(|p| p.tag == tag).unwrap_or_default())
}

async fn delete_all(conn: &Conn, kids: &[api::Sandbox]) -> anyhow::Result<()> {
    let ids = kids.iter().map(|k| k.id.clone()).collect();
    conn.call(conn.sandboxes().delete_sandboxes(api::DeleteSandboxesRequest { ids, ..Default::default() })).await?;
    Ok(())
}

/// Times a fork of `n` taken from a hot pool: a prewarmed fork of `n` fills
/// the pool, its children go, and the timed fork waits until all `n` are
/// ready. Returns the ms and the children.
async fn from_pool(conn: &Conn, tag: &forkd_api::names::Tag, n: u32) -> anyhow::Result<(f64, Vec<api::Sandbox>)> {
    let mut sb = conn.sandboxes();
    let warm =
        api::CreateSandboxesRequest { snapshot_tag: tag.to_string(), n: Some(n), prewarm: true, ..Default::default() };
    let kids = conn.call(sb.create_sandboxes(warm)).await?.sandboxes;
    delete_all(conn, &kids).await?;
    let deadline = Instant::now() + POOL_FILL;
    while pool_of(conn, tag.as_str()).await?.ready < n {
        if Instant::now() > deadline {
            bail!("the pool of {tag} did not reach {n} children in {POOL_FILL:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let the last child's fill finish settling before timing.
    tokio::time::sleep(POOL_SETTLE).await;
    let req = api::CreateSandboxesRequest { snapshot_tag: tag.to_string(), n: Some(n), ..Default::default() };
    let t = Instant::now();
    let kids = conn.call(sb.create_sandboxes(req)).await?.sandboxes;
    Ok((ms(t.elapsed()), kids))
}

/// `rounds` exec round trips of `true` in sandbox `id`, in ms.
async fn exec_times(conn: &Conn, id: &str, rounds: u32) -> anyhow::Result<Vec<f64>> {
    let mut sb = conn.sandboxes();
    let mut out = vec![];
    for _ in 0..rounds.max(1) {
        let req = api::ExecRequest { id: id.to_string(), args: vec!["true".into()], ..Default::default() };
        let t = Instant::now();
        conn.call(sb.exec(req)).await?;
        out.push(ms(t.elapsed()));
    }
    Ok(out)
}

/// Exec round trips timed for the refill comparison, at rest.
const REFILL_EXECS: u32 = 100;
/// Children the refill makes.
const REFILL_POOL: u32 = 4;

/// Exec round trips of one child at rest, then while a pool of REFILL_POOL
/// refills (timed until the pool is full), in ms. SetPool is for admins:
/// None when refused.
async fn exec_under_refill(conn: &Conn, tag: &forkd_api::names::Tag) -> anyhow::Result<Option<(Vec<f64>, Vec<f64>)>> {
    let mut sb = conn.sandboxes();
    let req = api::CreateSandboxesRequest { snapshot_tag: tag.to_string(), n: Some(1), ..Default::default() };
    let kid = conn.call(sb.create_sandboxes(req)).await?.sandboxes;
    let id = kid[0].id.clone();
    let result = async {
        exec_times(conn, &id, 10).await?; // warm the child's exec path
        let rest = exec_times(conn, &id, REFILL_EXECS).await?;
        let set = api::SetPoolRequest { tag: tag.to_string(), target: REFILL_POOL, ..Default::default() };
        match conn.call(conn.snapshots().set_pool(set)).await {
            Ok(_) => {}
            Err(e) if e.code == crate::exit::AUTH => return anyhow::Ok(None),
            Err(e) => return Err(e.into()),
        }
        let deadline = Instant::now() + POOL_FILL;
        let mut busy = vec![];
        loop {
            busy.extend(exec_times(conn, &id, 10).await?);
            let pool = pool_of(conn, tag.as_str()).await?;
            let full = pool.ready >= REFILL_POOL && pool.filling == 0;
            if full || Instant::now() > deadline {
                break;
            }
        }
        anyhow::Ok(Some((rest, busy)))
    }
    .await;
    let _ = conn
        .call(conn.snapshots().set_pool(api::SetPoolRequest { tag: tag.to_string(), target: 0, ..Default::default() }))
        .await;
    delete_all(conn, &kid).await?;
    result
}

/// The snapshot's VM configuration, read from its files.
fn snapshot_spec(data_dir: &str, tag: &str) -> anyhow::Result<(VmSpec, PathBuf)> {
    let snap_dir = PathBuf::from(data_dir).join("snapshots").join(tag);
    let spec: VmSpec = serde_json::from_slice(
        &std::fs::read(snap_dir.join("vm.json"))
            .with_context(|| format!("read {}/vm.json (run bench on the daemon's host)", snap_dir.display()))?,
    )?;
    Ok((spec, snap_dir.join("state")))
}

fn backend_for(accel: &str) -> anyhow::Result<QemuBackend> {
    let qemu = QemuBackend::find_binary().context("qemu-system-x86_64 not on PATH")?;
    let accel = if accel == "kvm" { forkd_server::vmm::Accel::Kvm } else { forkd_server::vmm::Accel::Tcg };
    Ok(QemuBackend::new(qemu, accel))
}

/// What a bare restore does after loading state: open the agent's channel,
/// resume the vCPUs, and wait for the agent's first answer. Returns the
/// instants at which the vCPUs ran and the agent answered.
async fn resume_and_ping(vm: &mut VmProcess, dir: &VmDir) -> anyhow::Result<(Instant, Instant)> {
    let agent = AgentClient::connect(&dir.agent_socket(), Duration::from_secs(10)).await?;
    vm.control.resume().await?;
    let resumed = Instant::now();
    agent.ping(Duration::from_secs(30)).await?;
    Ok((resumed, Instant::now()))
}

/// A bare pre-started restore, timed from "load state" to the first ping
/// answer (median of POOL_ROUNDS); the process start is not counted.
async fn bare_pooled(data_dir: &str, tag: &str, accel: &str) -> anyhow::Result<f64> {
    let (spec, state) = snapshot_spec(data_dir, tag)?;
    let backend = backend_for(accel)?;
    let root = tempfile_dir()?;
    let mut times = vec![];
    let mut result = Ok(());
    for i in 0..POOL_ROUNDS {
        let dir = VmDir(root.join(format!("pool{i}")));
        std::fs::create_dir_all(dir.path())?;
        let waiting = backend.prestart(&spec, &dir, &Default::default(), &Default::default()).await?;
        tokio::time::sleep(POOL_SETTLE).await;
        let t = Instant::now();
        let mut vm = match waiting.load(&state).await {
            Ok(vm) => vm,
            Err(e) => {
                result = Err(anyhow::Error::from(e).context("bare pre-started restore"));
                break;
            }
        };
        let answered = resume_and_ping(&mut vm, &dir).await;
        times.push(ms(t.elapsed()));
        process::kill_and_reap(vm.pid, vm.start_time, vm.child.take()).await;
        if let Err(e) = answered {
            result = Err(e.context("bare pre-started restore"));
            break;
        }
    }
    let _ = std::fs::remove_dir_all(&root);
    result.map(|_| median(times))
}

/// One bare fan-out: its time, PSS per child, and the median of each
/// child's phases (restore, connect and resume, first answer).
struct BareFanOut {
    ms: f64,
    /// CPU each VMM used until its agent answered, median: vCPU threads,
    /// then the others.
    cpu_ms: [f64; 2],
    pss_mib: f64,
    pss: PssSplit,
    phases: [f64; 3],
}

/// Restores `n` children of the snapshot straight from its files with the
/// QEMU backend (no daemon, no identity re-init) and times until every agent
/// answers a ping.
async fn bare_fanout(data_dir: &str, tag: &str, n: u32, concurrency: usize, accel: &str) -> anyhow::Result<BareFanOut> {
    type Restored = (u32, u64, Option<tokio::process::Child>, [f64; 3]);
    let (spec, state) = snapshot_spec(data_dir, tag)?;
    let backend = backend_for(accel)?;
    let root = tempfile_dir()?;
    let t = Instant::now();
    let results: Vec<anyhow::Result<Restored>> = stream::iter(0..n)
        .map(|i| {
            let dir = VmDir(root.join(format!("vm{i}")));
            let (backend, spec, state) = (&backend, &spec, &state);
            async move {
                let started = Instant::now();
                std::fs::create_dir_all(dir.path())?;
                let mut vm = backend
                    .restore(spec, state, &dir, &forkd_server::vmm::NetAttach::Isolated, &Default::default())
                    .await?;
                let restored = Instant::now();
                let (resumed, answered) = resume_and_ping(&mut vm, &dir).await?;
                let phases = [ms(restored - started), ms(resumed - restored), ms(answered - resumed)];
                Ok((vm.pid, vm.start_time, vm.child.take(), phases))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let elapsed = ms(t.elapsed());
    let pids: Vec<u32> = results.iter().filter_map(|r| r.as_ref().ok().map(|r| r.0)).collect();
    let cpu_ms = cpu_ms_per_child(&pids);
    tokio::time::sleep(Duration::from_secs(1)).await;
    settle_ksm().await;
    let mut pss = 0u64;
    let mut first_err = None;
    let mut procs = vec![];
    let mut phases: [Vec<f64>; 3] = Default::default();
    for r in results {
        match r {
            Ok((pid, start, child, p)) => {
                pss += process::pss_bytes(pid).unwrap_or(0);
                procs.push((pid, start, child));
                for (col, v) in phases.iter_mut().zip(p) {
                    col.push(v);
                }
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let split = PssSplit::of(&procs.iter().map(|p| p.0).collect::<Vec<_>>());
    for (pid, start, child) in procs {
        process::kill_and_reap(pid, start, child).await;
    }
    let _ = std::fs::remove_dir_all(&root);
    if let Some(e) = first_err {
        return Err(e.context("bare restore"));
    }
    Ok(BareFanOut {
        ms: elapsed,
        cpu_ms,
        pss_mib: pss as f64 / n as f64 / 1048576.0,
        pss: split,
        phases: phases.map(median),
    })
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let p = std::env::temp_dir().join(format!("forkd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&p)?;
    Ok(p)
}
