//! The reconciler: at start (after adoption) and every few seconds it
//! compares what the daemon owns with what the host has.
//!
//! - A listed sandbox whose VMM is gone (pid + start time no longer alive)
//!   and that nobody killed ends "exited" with a reason.
//! - Anything forkd-named that no sandbox owns is removed: VMM processes
//!   whose sockets live under `<data>/sandboxes/`, work dirs there, ledger
//!   entries of sandboxes that no longer exist, and `forkd/*` cgroups (at
//!   start-up also the cgroups of snapshot bakes, `forkd/bake-*`).
//!
//! A sandbox is owned while it is listed, while it is being spawned, or
//! while the store holds a record for it that is past "starting". Host state
//! is read before ownership, so a resource created during a pass is always
//! seen as owned. Cgroups of other daemons on the same host (other data
//! dirs) are left alone: an unknown cgroup is only removed when it holds a
//! VMM of this data dir, or when it has been empty for two minutes.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use forkd_api::names::SandboxId;

use super::limits::spawning_ids;
use super::runtime::Runtime;
use crate::host::cgroup::{self, Cgroups};
use crate::host::procs;
use crate::vmm::process;

/// How often the reconciler runs.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// An empty `forkd/*` cgroup nobody here knows is removed after this long.
const STRAY_CGROUP_AGE: Duration = Duration::from_secs(120);

static ORPHANS_REAPED: AtomicU64 = AtomicU64::new(0);

/// Orphaned resources removed since the daemon started (all kinds).
pub fn orphans_reaped_total() -> u64 {
    ORPHANS_REAPED.load(Ordering::Relaxed)
}

fn reaped(kind: &str, what: &str) {
    ORPHANS_REAPED.fetch_add(1, Ordering::Relaxed);
    tracing::info!(kind, what, "reaped an orphan");
}

impl Runtime {
    /// Starts the periodic pass; it stops when the runtime is dropped.
    pub(crate) fn start_reconciler(self: &Arc<Self>) {
        match Cgroups::host() {
            Some(cg) => {
                tracing::info!("sandbox cgroups: {} (controllers {})", cg.describe(), cg.controllers().join(","))
            }
            None => tracing::warn!("no cgroup hierarchy found: sandboxes cannot have limits"),
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(INTERVAL).await;
                let Some(rt) = weak.upgrade() else { break };
                rt.reconcile_once().await;
            }
        });
    }

    /// One pass: dead VMMs of listed sandboxes, then orphans.
    pub async fn reconcile_once(self: &Arc<Self>) {
        // Leases dropped without a commit (an operation that panicked).
        let released = self.release_dropped().await;
        if released > 0 {
            tracing::info!(released, "released resources of abandoned leases");
        }
        let listed: Vec<_> = self.sandboxes.read().await.values().cloned().collect();
        for sb in listed {
            if sb.killing.load(Ordering::SeqCst) {
                continue;
            }
            let running = sb.record.lock().unwrap().status == super::state::SandboxStatus::Running;
            if running
                && !process::is_alive(sb.pid, sb.start_time)
                && let Some(rec) = self.vmm_exited(&sb, "the VMM process disappeared (found by the reconciler)".into())
                && !rec.workspace.is_empty()
            {
                self.workspace_lost_sandbox(&rec.workspace, &rec.status_reason);
            }
        }
        self.sweep_orphans(false).await;
    }

    /// Ids of every sandbox this daemon owns right now.
    async fn owned_ids(&self) -> HashSet<String> {
        let mut owned: HashSet<String> = self.sandboxes.read().await.keys().cloned().collect();
        owned.extend(spawning_ids());
        owned.extend(self.pools.ids());
        if let Ok(recs) = self.store.list_sandboxes() {
            owned.extend(
                recs.into_iter()
                    .filter(|r| r.status != super::state::SandboxStatus::Starting)
                    .map(|r| r.id.to_string()),
            );
        }
        owned
    }

    /// Removes forkd-named resources nobody owns. `startup`: also VMMs of
    /// snapshots being written (no snapshot is being written before the
    /// daemon serves) and the ledger's staging entries. Returns the number
    /// of resources removed.
    pub(crate) async fn sweep_orphans(&self, startup: bool) -> usize {
        let before = orphans_reaped_total();
        let sandboxes_dir = self.layout.sandboxes_dir();
        let staging_dir = self.layout.staging_dir();
        // Host state first, ownership second (see the module docs).
        let vmms = procs::qemu_processes();
        let dirs: Vec<String> = std::fs::read_dir(&sandboxes_dir)
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let cg = Cgroups::host();
        let cgroups = cg.map(|c| c.children(cgroup::PARENT)).unwrap_or_default();
        let ledger = self.store.ledger_entries().unwrap_or_default();
        let records = self.store.list_sandboxes().unwrap_or_default();
        let owned = self.owned_ids().await;

        // VMMs of this data dir that no sandbox owns.
        for p in &vmms {
            let orphan = match procs::child_dir_named(&p.cmdline, &sandboxes_dir) {
                Some(id) => !owned.contains(&id),
                None => startup && p.cmdline.contains(&format!("{}/", staging_dir.display())),
            };
            if orphan {
                process::kill(p.pid, p.start_time, Duration::from_secs(5)).await;
                reaped("vmm", &format!("pid {}", p.pid));
            }
        }

        // Ledger entries of sandboxes that no longer exist.
        for e in &ledger {
            // Cgroups of snapshot bakes: none is baking before the daemon
            // serves, so at start-up every one left is an orphan.
            if e.kind == "cgroup" && is_bake_cgroup(&e.key) {
                if startup {
                    self.remove_cgroup(&e.key);
                    reaped("cgroup", &e.key);
                }
                continue;
            }
            let Ok(id) = SandboxId::parse(&e.owner) else {
                if startup && e.kind == "staging" && under(Path::new(&e.key), &staging_dir) {
                    let _ = self.layout.remove_dir(Path::new(&e.key));
                    let _ = self.store.ledger_remove(&e.kind, &e.key);
                    reaped("staging", &e.key);
                }
                continue;
            };
            if owned.contains(id.as_str()) {
                continue;
            }
            match e.kind.as_str() {
                "vmm" => {
                    if let Some((pid, start)) = process::parse_ledger_key(&e.key) {
                        process::kill(pid, start, Duration::from_secs(5)).await;
                    }
                    let _ = self.store.ledger_remove("vmm", &e.key);
                    reaped("vmm", &e.key);
                }
                "workdir" => {
                    let dir = self.layout.sandbox_dir(&id);
                    if Path::new(&e.key) == dir && self.layout.remove_dir(&dir).is_ok() {
                        let _ = self.store.ledger_remove("workdir", &e.key);
                        reaped("workdir", &e.key);
                    }
                }
                "cgroup" if e.key == cgroup::sandbox_name(id.as_str()) => {
                    self.remove_limits(id.as_str());
                    reaped("cgroup", &e.key);
                }
                "netns" if e.key == crate::host::net::netns_name(&id) => {
                    let recorded = records.iter().find(|r| r.id == id.as_str()).and_then(|r| r.net.clone());
                    match recorded {
                        Some(n) => self.net_teardown(&n).await,
                        None => {
                            let link = crate::host::net::host_link_name(&id);
                            let ns = e.key.clone();
                            let _ = tokio::task::spawn_blocking(move || crate::host::net::teardown(&ns, &link)).await;
                            let _ = self.store.ledger_remove("netns", &e.key);
                        }
                    }
                    reaped("netns", &e.key);
                }
                _ => {}
            }
        }

        // Records of spawns that were abandoned half-way.
        if !startup {
            for r in records
                .iter()
                .filter(|r| r.status == super::state::SandboxStatus::Starting && !owned.contains(r.id.as_str()))
            {
                process::kill(r.pid, r.pid_start, Duration::from_secs(5)).await;
                let _ = self.store.ledger_remove("vmm", &process::ledger_key(r.pid, r.pid_start));
                let _ = self.store.delete_sandbox(r.id.as_str());
                reaped("record", r.id.as_str());
            }
        }

        // Work dirs nobody owns.
        for name in dirs.iter().filter(|n| !owned.contains(*n)) {
            let path = sandboxes_dir.join(name);
            if path.exists() && self.layout.remove_dir(&path).is_ok() {
                let _ = self.store.ledger_remove("workdir", &path.display().to_string());
                reaped("workdir", &path.display().to_string());
            }
        }

        // forkd/* cgroups nobody here owns.
        if let Some(cg) = cg {
            let ledgered: HashSet<&str> =
                ledger.iter().filter(|e| e.kind == "cgroup").map(|e| e.key.as_str()).collect();
            for name in &cgroups {
                let id = name.strip_prefix(&format!("{}/", cgroup::PARENT)).unwrap_or_default();
                if owned.contains(id) || ledgered.contains(name.as_str()) {
                    continue;
                }
                let pids = cg.procs(name);
                let ours: Vec<u32> = pids
                    .iter()
                    .copied()
                    .filter(|pid| {
                        vmms.iter()
                            .any(|v| v.pid == *pid && procs::child_dir_named(&v.cmdline, &sandboxes_dir).is_some())
                    })
                    .collect();
                let remove = if pids.is_empty() {
                    cg.age(name).is_some_and(|a| a >= STRAY_CGROUP_AGE)
                } else {
                    !ours.is_empty() && ours.len() == pids.len()
                };
                if !remove {
                    continue;
                }
                for pid in ours {
                    if let Some(start) = process::start_time(pid) {
                        process::kill(pid, start, Duration::from_secs(5)).await;
                    }
                }
                if cg.remove(name, Duration::from_secs(2)).is_ok() {
                    reaped("cgroup", name);
                }
            }
        }
        (orphans_reaped_total() - before) as usize
    }

    /// Sandboxes by status, for the `forkd_sandboxes{state}` gauge. Never
    /// waits: while the map is being changed the last counts are returned.
    pub fn sandbox_states_now(&self) -> Vec<(String, u64)> {
        static LAST: OnceLock<Mutex<Vec<(String, u64)>>> = OnceLock::new();
        let last = LAST.get_or_init(Default::default);
        match self.sandboxes.try_read() {
            Ok(map) => {
                let mut counts: std::collections::BTreeMap<String, u64> =
                    ["starting", "running", "exited"].iter().map(|s| (s.to_string(), 0)).collect();
                for sb in map.values() {
                    *counts.entry(sb.record.lock().unwrap().status.as_str().to_string()).or_default() += 1;
                }
                let v: Vec<(String, u64)> = counts.into_iter().collect();
                *last.lock().unwrap_or_else(|p| p.into_inner()) = v.clone();
                v
            }
            Err(_) => last.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

fn under(p: &Path, dir: &Path) -> bool {
    p.starts_with(dir) && !p.components().any(|c| matches!(c, std::path::Component::ParentDir))
}

/// A snapshot bake's cgroup (`forkd/bake-<nonce>`).
fn is_bake_cgroup(name: &str) -> bool {
    name.strip_prefix(cgroup::PARENT)
        .and_then(|r| r.strip_prefix('/'))
        .is_some_and(|r| r.starts_with(super::limits::BAKE_CGROUP_PREFIX))
}

#[cfg(test)]
mod tests {
    use super::is_bake_cgroup;

    #[test]
    fn bake_cgroups_are_told_from_sandbox_cgroups() {
        assert!(is_bake_cgroup("forkd/bake-a1b2c3d4"));
        assert!(!is_bake_cgroup("forkd/sb-a1b2c3d4"));
        assert!(!is_bake_cgroup("other/bake-a1b2c3d4"));
        assert!(!is_bake_cgroup("forkdbake-x"));
    }
}
