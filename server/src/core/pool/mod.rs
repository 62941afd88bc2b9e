//! Pools: VMM processes started ahead of time for one snapshot, each waiting
//! for its device state. A spawn that takes one only loads the state,
//! resumes and re-inits the child, so the process start (the largest fixed
//! cost of a spawn) is off its path.
//!
//! A pooled VMM is an ordinary future sandbox as far as the host is
//! concerned: its id, work dir, cgroup and process are in the ledger under
//! that id, and the reconciler counts it as owned. It waits in the cgroup
//! `forkd/<id>` with the default limits of a sandbox of its size. It has no sandbox record, so after
//! a daemon restart it is reaped as an orphan. Only children with the
//! snapshot's own disks and no network of their own are served from a pool
//! (a pooled process has its devices fixed already).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use forkd_api::names::{SandboxId, Tag};
use futures::StreamExt;

use super::runtime::Runtime;
use super::{Error, Result, ids};
use crate::host::cgroup;
use crate::vmm::{PendingVm, VmDir, VmSpec, process};

/// Most pooled VMMs kept for one snapshot.
pub const MAX_PER_SNAPSHOT: usize = 64;

/// A pre-started VMM and the sandbox id it will serve as.
pub struct Pooled {
    pub id: SandboxId,
    pub dir: VmDir,
    pub spec: VmSpec,
    pub vm: Box<dyn PendingVm>,
}

/// Pre-started VMMs by snapshot tag.
#[derive(Default)]
pub struct Pools {
    by_tag: Mutex<HashMap<String, Vec<Pooled>>>,
    /// Starts in progress by tag, counted against the target.
    filling: Mutex<HashMap<String, usize>>,
    /// Ids being started into the pool or taken out of it and not yet
    /// registered as spawning: owned all the same.
    in_transit: Mutex<HashSet<String>>,
}

impl Pools {
    /// Takes up to `n` VMMs started with exactly `spec`.
    pub fn take(&self, tag: &str, spec: &VmSpec, n: usize) -> Vec<Pooled> {
        let mut map = self.by_tag.lock().unwrap();
        let Some(list) = map.get_mut(tag) else { return vec![] };
        let mut out = vec![];
        let mut i = 0;
        let mut transit = self.in_transit.lock().unwrap();
        while i < list.len() && out.len() < n {
            if list[i].spec == *spec {
                let p = list.swap_remove(i);
                transit.insert(p.id.to_string());
                out.push(p);
            } else {
                i += 1;
            }
        }
        out
    }

    /// A taken VMM's spawn has registered its id.
    pub fn arrived(&self, id: &SandboxId) {
        self.in_transit.lock().unwrap().remove(id.as_str());
    }

    /// Ids of every pooled VMM (they are owned: see reconcile).
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.by_tag.lock().unwrap().values().flatten().map(|p| p.id.to_string()).collect();
        ids.extend(self.in_transit.lock().unwrap().iter().cloned());
        ids
    }

    /// Pooled VMMs per snapshot tag.
    pub fn sizes(&self) -> HashMap<String, usize> {
        self.by_tag.lock().unwrap().iter().map(|(t, v)| (t.clone(), v.len())).collect()
    }

    fn drain_tag(&self, tag: &str) -> Vec<Pooled> {
        self.by_tag.lock().unwrap().remove(tag).unwrap_or_default()
    }

    fn drain_all(&self) -> Vec<Pooled> {
        self.by_tag.lock().unwrap().drain().flat_map(|(_, v)| v).collect()
    }
}

impl Runtime {
    /// Tops the pool of `tag` up to `target` waiting VMMs (at most
    /// MAX_PER_SNAPSHOT), starting them `spawn_concurrency` at a time.
    /// Returns how many were started.
    pub async fn fill_pool(self: &Arc<Self>, tag: &Tag, target: usize) -> Result<usize> {
        let snap = self.get_snapshot(tag)?;
        let spec = snap.vm_spec()?;
        let target = target.min(MAX_PER_SNAPSHOT);
        let missing = {
            let have = self.pools.sizes().get(tag.as_str()).copied().unwrap_or(0);
            let mut filling = self.pools.filling.lock().unwrap();
            let busy = filling.entry(tag.to_string()).or_default();
            let missing = target.saturating_sub(have + *busy);
            *busy += missing;
            missing
        };
        let results: Vec<Result<()>> = futures::stream::iter(0..missing)
            .map(|_| self.start_pooled(tag, &spec))
            .buffer_unordered(self.config.admission.spawn_concurrency.max(1))
            .collect()
            .await;
        if let Some(n) = self.pools.filling.lock().unwrap().get_mut(tag.as_str()) {
            *n -= missing;
        }
        let started = results.iter().filter(|r| r.is_ok()).count();
        if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
            tracing::warn!(tag = %tag, started, "filling the pool: {e}");
        }
        Ok(started)
    }

    async fn start_pooled(self: &Arc<Self>, tag: &Tag, spec: &VmSpec) -> Result<()> {
        let _permit = self.admission.spawn_permit().await;
        let id = ids::new_sandbox_id();
        self.pools.in_transit.lock().unwrap().insert(id.to_string());
        let r = self.start_pooled_as(tag, spec, id.clone()).await;
        self.pools.arrived(&id);
        r
    }

    async fn start_pooled_as(self: &Arc<Self>, tag: &Tag, spec: &VmSpec, id: SandboxId) -> Result<()> {
        let dir = VmDir(self.layout.sandbox_dir(&id));
        self.create_workdir(&id, &dir)?;
        // A waiting VMM is confined like a sandbox of its size: the fork
        // that takes it re-applies its own limits to the same cgroup.
        let memory_mib = self.admission.default_memory_limit_mib(spec.mem_mib);
        let cgroup = match self.helper_cgroup(cgroup::sandbox_name(id.as_str()), id.as_str(), memory_mib) {
            Ok(c) => c,
            Err(e) => {
                self.remove_workdir(&dir);
                return Err(e);
            }
        };
        let vm = match self.backend.prestart(spec, &dir).await {
            Ok(vm) => vm,
            Err(e) => {
                self.remove_limits(id.as_str());
                self.remove_workdir(&dir);
                return Err(e.into());
            }
        };
        let key = process::ledger_key(vm.pid(), vm.start_time());
        self.store.ledger_add("vmm", &key, id.as_str())?;
        let pooled = Pooled { id, dir, spec: spec.clone(), vm };
        if let Some(name) = &cgroup
            && let Err(e) = self.enter_cgroup(name, pooled.vm.pid())
        {
            self.discard_pooled(pooled).await;
            return Err(e);
        }
        // The snapshot may have started going away meanwhile. Checked and
        // pushed under the pool's lock: a deletion marks the tag busy before
        // it drains the pool under that lock, so either it sees this VMM or
        // this check sees the deletion.
        let refused = {
            let mut pools = self.pools.by_tag.lock().unwrap();
            let going =
                self.busy_tags.contains(tag.as_str()) || !matches!(self.store.get_snapshot(tag.as_str()), Ok(Some(_)));
            if going {
                Some(pooled)
            } else {
                pools.entry(tag.to_string()).or_default().push(pooled);
                None
            }
        };
        match refused {
            None => Ok(()),
            Some(p) => {
                self.discard_pooled(p).await;
                Err(Error::FailedPrecondition(format!("snapshot {:?} is being deleted", tag.as_str())))
            }
        }
    }

    /// Kills a pooled VMM and removes its traces.
    pub(crate) async fn discard_pooled(&self, p: Pooled) {
        let key = process::ledger_key(p.vm.pid(), p.vm.start_time());
        p.vm.kill().await;
        let _ = self.store.ledger_remove("vmm", &key);
        self.remove_limits(p.id.as_str());
        self.remove_workdir(&p.dir);
    }

    /// Pooled VMMs per snapshot tag.
    pub fn pool_sizes(&self) -> HashMap<String, usize> {
        self.pools.sizes()
    }

    /// Empties the pool of `tag` (before its snapshot goes).
    pub(crate) async fn drain_pool(&self, tag: &str) -> usize {
        self.discard_all(self.pools.drain_tag(tag)).await
    }

    /// Empties every pool (on shutdown: pooled VMMs serve no one after it).
    pub async fn drain_pools(&self) -> usize {
        self.discard_all(self.pools.drain_all()).await
    }

    async fn discard_all(&self, doomed: Vec<Pooled>) -> usize {
        let n = doomed.len();
        futures::future::join_all(doomed.into_iter().map(|p| self.discard_pooled(p))).await;
        n
    }
}
