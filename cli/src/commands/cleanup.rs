//! `forkd cleanup`: finds forkd resources that no live VMM owns — work dirs
//! (and the sockets in them) and staging dirs under the data dir, `forkd/*`
//! cgroups, `forkd-*` network namespaces — and, with `--yes`, removes them.
//!
//! A VMM is live when a `qemu-system-*` process names the resource (its
//! command line mentions the dir, it sits in the cgroup, or it runs in the
//! namespace). When the daemon answers, every sandbox it lists and every
//! snapshot it is writing are kept as well, whatever the host shows.

use std::collections::HashSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use forkd_api::v1::{ListSandboxesRequest, ListSnapshotsRequest};
use forkd_server::host::cgroup::{self, Cgroups};
use forkd_server::host::procs::{self, VmmProc};
use serde_json::json;

use crate::args::{CleanupArgs, GlobalArgs};
use crate::client::Conn;
use crate::exit::{FAILURE, OK};
use crate::output::{emit, emit_json, table};

#[derive(Debug, Clone, PartialEq)]
pub struct Orphan {
    /// "workdir", "staging", "cgroup" or "netns".
    pub kind: &'static str,
    /// Path, cgroup name or namespace name.
    pub name: String,
    pub detail: String,
}

/// What the daemon says it owns, when it answers.
#[derive(Debug, Default)]
pub struct DaemonView {
    pub reachable: bool,
    pub sandboxes: HashSet<String>,
    /// Tags of snapshots being written.
    pub writing: HashSet<String>,
    pub error: String,
}

async fn daemon_view(global: &GlobalArgs) -> DaemonView {
    let mut g = global.clone();
    g.rpc_timeout = Some(g.rpc_timeout.unwrap_or(Duration::from_secs(10)));
    let conn = match Conn::connect(&g).await {
        Ok(c) => c,
        Err(e) => return DaemonView { error: e.message, ..Default::default() },
    };
    let sbs = conn.call(conn.sandboxes().list_sandboxes(ListSandboxesRequest::default())).await;
    let snaps = conn.call(conn.snapshots().list_snapshots(ListSnapshotsRequest::default())).await;
    match (sbs, snaps) {
        (Ok(s), Ok(t)) => DaemonView {
            reachable: true,
            sandboxes: s.sandboxes.into_iter().map(|s| s.id).collect(),
            writing: t.snapshots.into_iter().filter(|s| s.status == "writing").map(|s| s.tag).collect(),
            error: String::new(),
        },
        (Err(e), _) | (_, Err(e)) => DaemonView { error: e.message, ..Default::default() },
    }
}

fn sockets_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().map(|t| t.is_socket()).unwrap_or(false))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn mentions(vmms: &[VmmProc], dir: &Path) -> bool {
    let needle = format!("{}/", dir.display());
    vmms.iter().any(|v| v.cmdline.contains(&needle))
}

/// Network namespace inode of a process.
fn net_ns_inode(pid: u32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    let s = link.to_string_lossy();
    s.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// Everything forkd-named on the host that nothing owns.
pub fn find_orphans(data_dir: &Path, view: &DaemonView) -> Vec<Orphan> {
    let vmms = procs::qemu_processes();
    let mut out = vec![];
    let sandboxes = data_dir.join("sandboxes");
    if let Ok(rd) = std::fs::read_dir(&sandboxes) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            if view.sandboxes.contains(&name) || mentions(&vmms, &path) {
                continue;
            }
            let socks = sockets_in(&path);
            out.push(Orphan {
                kind: "workdir",
                name: path.display().to_string(),
                detail: if socks.is_empty() {
                    "no VMM".into()
                } else {
                    format!("no VMM; sockets {}", socks.join(", "))
                },
            });
        }
    }
    let staging = data_dir.join("staging");
    if let Ok(rd) = std::fs::read_dir(&staging) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let tag = name.rsplit_once('.').map(|(t, _)| t).unwrap_or(&name);
            if view.writing.contains(tag) || mentions(&vmms, &e.path()) {
                continue;
            }
            out.push(Orphan {
                kind: "staging",
                name: e.path().display().to_string(),
                detail: "no snapshot being written".into(),
            });
        }
    }
    if let Some(cg) = Cgroups::host() {
        for name in cg.children(cgroup::PARENT) {
            let id = name.rsplit('/').next().unwrap_or_default();
            if view.sandboxes.contains(id) {
                continue;
            }
            let pids = cg.procs(&name);
            if pids.is_empty() {
                out.push(Orphan { kind: "cgroup", name, detail: "empty".into() });
            }
        }
    }
    let inodes: HashSet<u64> = vmms.iter().filter_map(|v| net_ns_inode(v.pid)).collect();
    for ns in forkd_server::host::net::list_forkd_netns() {
        let id = format!("sb-{}", ns.trim_start_matches("forkd-"));
        if view.sandboxes.contains(&id) {
            continue;
        }
        let ino = std::fs::metadata(forkd_server::host::net::netns_path(&ns)).map(|m| m.ino()).ok();
        if ino.is_some_and(|i| inodes.contains(&i)) {
            continue;
        }
        out.push(Orphan { kind: "netns", name: ns, detail: "no VMM inside".into() });
    }
    out
}

fn remove(o: &Orphan) -> Result<(), String> {
    match o.kind {
        "workdir" | "staging" => std::fs::remove_dir_all(&o.name).map_err(|e| e.to_string()),
        "cgroup" => Cgroups::host()
            .ok_or("no cgroup hierarchy")?
            .remove(&o.name, Duration::from_secs(2))
            .map_err(|e| e.to_string()),
        "netns" => {
            let out =
                std::process::Command::new("ip").args(["netns", "del", &o.name]).output().map_err(|e| e.to_string())?;
            if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).trim().to_string()) }
        }
        other => Err(format!("unknown kind {other}")),
    }
}

pub async fn run(global: &GlobalArgs, a: CleanupArgs) -> anyhow::Result<u8> {
    let data_dir = std::fs::canonicalize(&a.data_dir).unwrap_or_else(|_| PathBuf::from(&a.data_dir));
    let view = daemon_view(global).await;
    let orphans = find_orphans(&data_dir, &view);
    let mut failures = vec![];
    let mut removed = 0;
    if a.yes {
        for o in &orphans {
            match remove(o) {
                Ok(()) => removed += 1,
                Err(e) => failures.push(format!("{} {}: {e}", o.kind, o.name)),
            }
        }
    }
    if global.json {
        emit_json(&json!({
            "data_dir": data_dir.display().to_string(),
            "daemon_reachable": view.reachable,
            "daemon_error": view.error,
            "dry_run": !a.yes,
            "orphans": orphans.iter().map(|o| json!({ "kind": o.kind, "name": o.name, "detail": o.detail })).collect::<Vec<_>>(),
            "removed": removed,
            "failures": failures,
        }))?;
    } else {
        let mut text = String::new();
        if !view.reachable {
            text.push_str(&format!(
                "note: the daemon did not answer ({}); only live VMM processes protect resources\n",
                view.error
            ));
        }
        if orphans.is_empty() {
            text.push_str(&format!(
                "nothing to clean up under {} or in forkd cgroups and namespaces\n",
                data_dir.display()
            ));
        } else {
            text.push_str(&table(
                &["KIND", "NAME", "DETAIL"],
                orphans.iter().map(|o| vec![o.kind.to_string(), o.name.clone(), o.detail.clone()]),
            ));
            if a.yes {
                text.push_str(&format!("removed {removed} of {}\n", orphans.len()));
            } else {
                text.push_str(&format!(
                    "{} orphaned; dry run, nothing removed (pass --yes to remove)\n",
                    orphans.len()
                ));
            }
        }
        for f in &failures {
            text.push_str(&format!("failed: {f}\n"));
        }
        emit(&text)?;
    }
    Ok(if failures.is_empty() { OK } else { FAILURE })
}
