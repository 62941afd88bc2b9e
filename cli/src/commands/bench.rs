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

struct FanOut {
    n: u32,
    forkd_ms: f64,
    cleanup_ms: f64,
    pss_mib: f64,
    bare_ms: Option<f64>,
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
    for &n in &a.fanout {
        progress(&format!("fan-out {n} through forkd"));
        let t = Instant::now();
        let kids = conn
            .call(sb.create_sandboxes(api::CreateSandboxesRequest {
                snapshot_tag: a.tag.to_string(),
                n: Some(n),
                ..Default::default()
            }))
            .await?
            .sandboxes;
        let forkd_ms = ms(t.elapsed());
        if n == pool_n {
            cold_phases = Some(Phases::of(&kids));
            cold_spawns = kids.iter().map(|k| k.spawn_ms).collect();
        }
        // Let the children settle before measuring what they cost at rest.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let pss: u64 = kids.iter().filter_map(|k| process::pss_bytes(k.pid)).sum();
        let t = Instant::now();
        conn.call(sb.delete_sandboxes(api::DeleteSandboxesRequest {
            ids: kids.iter().map(|k| k.id.clone()).collect(),
            ..Default::default()
        }))
        .await?;
        let cleanup_ms = ms(t.elapsed());
        let (bare_ms, bare_pss_mib) = if a.no_bare {
            (None, None)
        } else {
            progress(&format!("fan-out {n} as bare restores"));
            let (t, pss) = bare_fanout(&version.data_dir, a.tag.as_ref(), n, a.bare_concurrency, &snap.accel).await?;
            (Some(t), Some(pss))
        };
        rows.push(FanOut {
            n,
            forkd_ms,
            cleanup_ms,
            pss_mib: pss as f64 / n as f64 / 1048576.0,
            bare_ms,
            bare_pss_mib,
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
            },
            "exec_p99_at_rest_ms": refill.as_ref().map(|r| r.0),
            "exec_p99_during_refill_ms": refill.as_ref().map(|r| r.1),
            "execs_during_refill": refill.as_ref().map(|r| r.2),
            "fanout": rows.iter().map(|r| json!({
                "n": r.n, "forkd_ms": r.forkd_ms, "bare_ms": r.bare_ms,
                "ratio": r.bare_ms.map(|b| r.forkd_ms / b),
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
    f.set_header(vec!["fan-out", "forkd ms", "bare ms", "ratio", "cleanup ms", "PSS/child MiB", "bare PSS/child MiB"]);
    for r in &rows {
        f.add_row(vec![
            r.n.to_string(),
            format!("{:.0}", r.forkd_ms),
            r.bare_ms.map(|b| format!("{b:.0}")).unwrap_or("-".into()),
            r.bare_ms.map(|b| format!("{:.2}", r.forkd_ms / b)).unwrap_or("-".into()),
            format!("{:.0}", r.cleanup_ms),
            format!("{:.1}", r.pss_mib),
            r.bare_pss_mib.map(|p| format!("{p:.1}")).unwrap_or("-".into()),
        ]);
    }
    println!("{f}");
    if a.phases {
        let mut p = Table::new();
        p.load_preset(UTF8_FULL_CONDENSED);
        p.set_header(vec![format!("spawn phase, median ms (fan-out {pool_n})"), "cold".into(), "hot pool".into()]);
        let cold = cold_phases.unwrap_or_default();
        for (i, name) in Phases::NAMES.iter().enumerate() {
            p.add_row(vec![name.to_string(), format!("{:.1}", cold.steps[i]), format!("{:.1}", pool_phases.steps[i])]);
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
}

impl Phases {
    const NAMES: [&'static str; 5] = [
        "prepare (cgroup, network)",
        "restore (VMM and state; none when pooled)",
        "limits, connect and resume",
        "identity re-init (one round trip)",
        "volume mounts and record",
    ];

    fn of(kids: &[api::Sandbox]) -> Phases {
        let mut cols: [Vec<f64>; 5] = Default::default();
        for k in kids {
            let p = k.spawn_phases.unwrap_or_default();
            let marks = [0.0, p.prepared_ms, p.restored_ms, p.resumed_ms, p.reinit_ms, k.spawn_ms];
            for (i, col) in cols.iter_mut().enumerate() {
                col.push((marks[i + 1] - marks[i]).max(0.0));
            }
        }
        Phases { steps: cols.map(median) }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "prepare_ms": self.steps[0], "restore_ms": self.steps[1], "resume_ms": self.steps[2],
            "reinit_ms": self.steps[3], "answer_ms": self.steps[4],
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
        let set = api::SetPoolRequest { tag: tag.to_string(), target: REFILL_POOL };
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
    let _ = conn.call(conn.snapshots().set_pool(api::SetPoolRequest { tag: tag.to_string(), target: 0 })).await;
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
/// resume the vCPUs, and wait for the agent's first answer.
async fn resume_and_ping(vm: &mut VmProcess, dir: &VmDir) -> anyhow::Result<()> {
    let agent = AgentClient::connect(&dir.agent_socket(), Duration::from_secs(10)).await?;
    vm.control.resume().await?;
    agent.ping(Duration::from_secs(30)).await?;
    Ok(())
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
        let waiting = backend.prestart(&spec, &dir, false).await?;
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

/// Restores `n` children of the snapshot straight from its files with the
/// QEMU backend (no daemon, no identity re-init) and times until every agent
/// answers a ping. Returns (ms, PSS MiB per child).
async fn bare_fanout(data_dir: &str, tag: &str, n: u32, concurrency: usize, accel: &str) -> anyhow::Result<(f64, f64)> {
    let (spec, state) = snapshot_spec(data_dir, tag)?;
    let backend = backend_for(accel)?;
    let root = tempfile_dir()?;
    let t = Instant::now();
    let results: Vec<anyhow::Result<(u32, u64, Option<tokio::process::Child>)>> = stream::iter(0..n)
        .map(|i| {
            let dir = VmDir(root.join(format!("vm{i}")));
            let (backend, spec, state) = (&backend, &spec, &state);
            async move {
                std::fs::create_dir_all(dir.path())?;
                let mut vm = backend.restore(spec, state, &dir, &forkd_server::vmm::NetAttach::Isolated).await?;
                resume_and_ping(&mut vm, &dir).await?;
                Ok((vm.pid, vm.start_time, vm.child.take()))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let elapsed = ms(t.elapsed());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut pss = 0u64;
    let mut first_err = None;
    let mut procs = vec![];
    for r in results {
        match r {
            Ok((pid, start, child)) => {
                pss += process::pss_bytes(pid).unwrap_or(0);
                procs.push((pid, start, child));
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    for (pid, start, child) in procs {
        process::kill_and_reap(pid, start, child).await;
    }
    let _ = std::fs::remove_dir_all(&root);
    if let Some(e) = first_err {
        return Err(e.context("bare restore"));
    }
    Ok((elapsed, pss as f64 / n as f64 / 1048576.0))
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let p = std::env::temp_dir().join(format!("forkd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&p)?;
    Ok(p)
}
