//! Hot pools: children of one snapshot made ahead of time — restored,
//! re-initialized once (so the kernel and interpreter code a re-init runs
//! is already paged in and warm), then left waiting with their agent
//! connected. A fork that takes one gives it its identity in one agent
//! round trip: no process start, no state load, no connect.
//!
//! Pooled children wait running idle by default (`--pool-idle running`),
//! or paused. Measured here (QEMU TCG, python snapshot, 8 pooled): running
//! idle costs 0.74 % of a core per child and 68 MiB RSS, paused 0 % and
//! 63 MiB; but a paused child's take is slower (spawn(1) 25.8 ms against
//! 18.8 ms, a fan-out of 10 276 ms against 130 ms: its vCPUs must be resumed
//! and the re-init then runs slower), so running is the default and paused
//! the choice for hosts that want pools to cost no CPU. Either way the clock
//! is set by the re-init.
//!
//! A pooled child is an ordinary future sandbox as far as the host is
//! concerned: its id, work dir, cgroup and process are in the ledger under
//! that id, and the reconciler counts it as owned. It waits in the cgroup
//! `forkd/<id>` with the default limits of a sandbox of its size, and counts
//! against the daemon's sandbox limit. It has no sandbox record, so after a
//! daemon restart it is reaped as an orphan. Only children with the
//! snapshot's own disks are served from a pool (a pooled child has its
//! devices fixed already).
//!
//! A pool is for network "none" or for "nat" (`--pool TAG=N:nat`, SetPool's
//! `network`). A nat pool's children have their namespace, veth, tap and
//! address made ahead of time, with no egress at all while they wait; the
//! fork that takes one installs its own allow-list in one nftables
//! transaction.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use forkd_api::names::{SandboxId, Tag};
use futures::StreamExt;

use super::runtime::Runtime;
use super::sandboxes::{AGENT_CONNECT, REINIT_TIMEOUT, identity};
use super::{Error, Result, ids};
use crate::agent::AgentClient;
use crate::host::cgroup;
use crate::host::net::SandboxNet;
use crate::vmm::{VmDir, VmProcess, VmSpec, process};

/// Most pooled VMMs kept for one snapshot.
pub const MAX_PER_SNAPSHOT: usize = 64;

/// A hot child and the sandbox id it will serve as: restored, re-initialized
/// once and left running idle or paused, its agent connected.
pub struct Pooled {
    pub id: SandboxId,
    pub dir: VmDir,
    pub spec: VmSpec,
    pub vm: VmProcess,
    pub agent: AgentClient,
    pub paused: bool,
    /// A nat pool's network, made with the child (ledgered under its id).
    pub net: Option<SandboxNet>,
}

/// One snapshot's pool: children ready, children being made, and how many
/// it keeps (0: none configured).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolInfo {
    pub tag: String,
    pub ready: usize,
    pub filling: usize,
    pub target: usize,
    /// "nat" or "none": the network its children are made with.
    pub network: String,
}

/// Hot children by snapshot tag.
#[derive(Default)]
pub struct Pools {
    by_tag: Mutex<HashMap<String, Vec<Pooled>>>,
    /// Starts in progress by tag, counted against the target.
    filling: Mutex<HashMap<String, usize>>,
    /// How many children each configured pool keeps (--pool TAG=N): taken
    /// children are replaced in the background.
    targets: Mutex<HashMap<String, usize>>,
    /// Bumped when a pool is emptied or trimmed (taken under `by_tag`):
    /// children made for an earlier epoch are discarded, not pooled.
    epochs: Mutex<HashMap<String, u64>>,
    /// Ids being started into the pool or taken out of it and not yet
    /// registered as spawning: owned all the same.
    in_transit: Mutex<HashSet<String>>,
    /// Tags whose pool is for network "nat".
    nat: Mutex<HashSet<String>>,
}

impl Pools {
    /// Takes up to `n` VMMs started with exactly `spec`, with a network of
    /// their own or not (`nat`).
    pub fn take(&self, tag: &str, spec: &VmSpec, n: usize, nat: bool) -> Vec<Pooled> {
        let mut map = self.by_tag.lock().unwrap();
        let Some(list) = map.get_mut(tag) else { return vec![] };
        let mut out = vec![];
        let mut i = 0;
        let mut transit = self.in_transit.lock().unwrap();
        while i < list.len() && out.len() < n {
            if list[i].spec == *spec && list[i].net.is_some() == nat {
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

    /// Pooled children per snapshot tag.
    pub fn sizes(&self) -> HashMap<String, usize> {
        self.by_tag.lock().unwrap().iter().map(|(t, v)| (t.clone(), v.len())).collect()
    }

    /// Pooled children of `tag` ready to be taken.
    pub fn ready(&self, tag: &str) -> usize {
        self.by_tag.lock().unwrap().get(tag).map_or(0, Vec::len)
    }

    /// The pool of `tag` as ListPools and SetPool report it.
    fn info(&self, tag: &str) -> PoolInfo {
        PoolInfo {
            tag: tag.to_string(),
            ready: self.ready(tag),
            filling: self.filling.lock().unwrap().get(tag).copied().unwrap_or(0),
            target: self.target(tag),
            network: if self.is_nat(tag) { "nat" } else { "none" }.into(),
        }
    }

    /// Whether the pool of `tag` is for network "nat".
    pub fn is_nat(&self, tag: &str) -> bool {
        self.nat.lock().unwrap().contains(tag)
    }

    /// Makes the pool of `tag` one for `nat` or not; true when that changed
    /// (the children it has are then of the wrong kind).
    fn set_network(&self, tag: &str, nat: bool) -> bool {
        let mut set = self.nat.lock().unwrap();
        if nat { set.insert(tag.to_string()) } else { set.remove(tag) }
    }

    /// Pooled children of every snapshot, those on their way in or out too.
    pub fn count(&self) -> usize {
        self.by_tag.lock().unwrap().values().map(Vec::len).sum::<usize>() + self.in_transit.lock().unwrap().len()
    }

    /// Keeps `n` children of `tag` ready from now on.
    pub fn set_target(&self, tag: &str, n: usize) {
        self.targets.lock().unwrap().insert(tag.to_string(), n.min(MAX_PER_SNAPSHOT));
    }

    /// The configured size of `tag`'s pool (0: none configured).
    pub fn target(&self, tag: &str) -> usize {
        self.targets.lock().unwrap().get(tag).copied().unwrap_or(0)
    }

    /// Every pool that has children, is making some or has a target.
    pub fn list(&self) -> Vec<PoolInfo> {
        let mut tags: Vec<String> = self.by_tag.lock().unwrap().keys().cloned().collect();
        tags.extend(self.filling.lock().unwrap().keys().cloned());
        tags.extend(self.targets.lock().unwrap().keys().cloned());
        tags.sort();
        tags.dedup();
        tags.iter().map(|t| self.info(t)).filter(|p| p.ready + p.filling + p.target > 0).collect()
    }

    /// The epoch of `tag`'s pool.
    fn epoch(&self, tag: &str) -> u64 {
        self.epochs.lock().unwrap().get(tag).copied().unwrap_or(0)
    }

    fn next_epoch(&self, tag: &str) {
        *self.epochs.lock().unwrap().entry(tag.to_string()).or_default() += 1;
    }

    /// Takes the children of `tag` beyond the first `keep`; children being
    /// made now are not pooled when they are done.
    fn trim(&self, tag: &str, keep: usize) -> Vec<Pooled> {
        let mut map = self.by_tag.lock().unwrap();
        self.next_epoch(tag);
        map.get_mut(tag).map(|list| list.split_off(keep.min(list.len()))).unwrap_or_default()
    }

    fn drain_tag(&self, tag: &str) -> Vec<Pooled> {
        self.trim(tag, 0)
    }

    fn drain_all(&self) -> Vec<Pooled> {
        self.by_tag.lock().unwrap().drain().flat_map(|(_, v)| v).collect()
    }
}

impl Runtime {
    /// Tops the pool of `tag` up to `target` hot children (at most
    /// MAX_PER_SNAPSHOT), making them `concurrency` at a time. Returns how
    /// many were made.
    pub async fn fill_pool(self: &Arc<Self>, tag: &Tag, target: usize, concurrency: usize) -> Result<usize> {
        let snap = self.get_snapshot(tag)?;
        let spec = snap.vm_spec()?;
        let target = target.min(MAX_PER_SNAPSHOT);
        // Emptying the pool meanwhile ends this fill: children not started
        // yet are not made, those being made are not pooled.
        let epoch = self.pools.epoch(tag.as_str());
        let missing = {
            let have = self.pools.ready(tag.as_str());
            let mut filling = self.pools.filling.lock().unwrap();
            let busy = filling.entry(tag.to_string()).or_default();
            let missing = target.saturating_sub(have + *busy);
            *busy += missing;
            missing
        };
        let results: Vec<Result<()>> = futures::stream::iter(0..missing)
            .map(|_| self.start_pooled(tag, &spec, epoch))
            .buffer_unordered(concurrency.max(1))
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

    /// Sets the pool of the ready snapshot `tag` to `n` children (SetPool):
    /// fills it in the background as a refill does, or empties it for 0.
    pub async fn set_pool(self: &Arc<Self>, tag: &Tag, n: usize, network: &str) -> Result<PoolInfo> {
        let snap = self.get_snapshot(tag)?;
        if snap.status != super::store::SnapshotStatus::Ready {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {:?} is {}, only a ready snapshot has a pool",
                tag.as_str(),
                snap.status.as_str()
            )));
        }
        let nat = pool_network(network)?;
        if nat && !snap.vm_spec()?.nic {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {:?} was made without a network device: it cannot have a nat pool",
                tag.as_str()
            )));
        }
        self.pools.set_target(tag.as_str(), n);
        // Children of the other network kind serve no fork of this pool.
        let keep = if self.pools.set_network(tag.as_str(), nat) { 0 } else { n };
        self.discard_all(self.pools.trim(tag.as_str(), keep)).await;
        self.refill_pool(tag);
        Ok(self.pools.info(tag.as_str()))
    }

    /// Keeps `n` hot children of `tag` from now on (--pool TAG=N), filling
    /// the pool now in the background. A snapshot not there yet fills at
    /// its first fork.
    pub fn keep_pool(self: &Arc<Self>, tag: &Tag, n: usize, nat: bool) {
        self.pools.set_target(tag.as_str(), n);
        self.pools.set_network(tag.as_str(), nat);
        self.fill_pool_in_background(tag, n, self.config.admission.spawn_concurrency, "filling the pool");
    }

    /// Refills the configured pool of `tag` in the background, one child at
    /// a time so that forks and commands keep the host.
    pub fn refill_pool(self: &Arc<Self>, tag: &Tag) {
        let target = self.pools.target(tag.as_str());
        if target > 0 {
            self.fill_pool_in_background(tag, target, 1, "refilling the pool");
        }
    }

    /// `fill_pool` in a task of its own; `what` names it in the log.
    pub(crate) fn fill_pool_in_background(
        self: &Arc<Self>,
        tag: &Tag,
        n: usize,
        concurrency: usize,
        what: &'static str,
    ) {
        let (rt, tag) = (self.clone(), tag.clone());
        tokio::spawn(async move {
            match rt.fill_pool(&tag, n, concurrency).await {
                Ok(made) => tracing::debug!(tag = %tag, made, "{what}: done"),
                Err(e) => tracing::warn!(tag = %tag, "{what}: {e}"),
            }
        });
    }

    async fn start_pooled(self: &Arc<Self>, tag: &Tag, spec: &VmSpec, epoch: u64) -> Result<()> {
        let _permit = self.admission.spawn_permit().await;
        if self.pools.epoch(tag.as_str()) != epoch {
            return Err(Error::FailedPrecondition(format!("the pool of {:?} was emptied", tag.as_str())));
        }
        // A pooled child is a child: it counts against the daemon's limits.
        let live = self.sandboxes.read().await.values().filter(|s| s.counts_as_live()).count() + self.pools.count();
        let cost = crate::host::admission::child_cost_bytes(
            self.admission.default_memory_limit_mib(spec.mem_mib),
            spec.mem_mib,
        );
        let _admitted = self
            .admission
            .admit_children(live, 1, cost)
            .map_err(|e| Error::ResourceExhausted(format!("a pooled child of {:?}: {e}", tag.as_str())))?;
        let id = ids::new_sandbox_id();
        self.pools.in_transit.lock().unwrap().insert(id.to_string());
        let r = self.start_pooled_as(tag, spec, id.clone(), epoch).await;
        self.pools.arrived(&id);
        r
    }

    async fn start_pooled_as(self: &Arc<Self>, tag: &Tag, spec: &VmSpec, id: SandboxId, epoch: u64) -> Result<()> {
        let dir = VmDir(self.layout.sandbox_dir(&id));
        self.create_workdir(&id, &dir)?;
        // A waiting VMM is confined like a sandbox of its size: the fork
        // that takes it re-applies its own limits to the same cgroup.
        let memory_mib = self.admission.default_memory_limit_mib(spec.mem_mib);
        // It is made at the lowest CPU weight, so that a refill takes only
        // CPU that forks and commands leave; the fork that takes it gives it
        // a sandbox's weight with its limits.
        let cgroup = match self.helper_cgroup(cgroup::sandbox_name(id.as_str()), id.as_str(), memory_mib, true) {
            Ok(c) => c,
            Err(e) => {
                self.remove_workdir(&dir);
                return Err(e);
            }
        };
        // QEMU joins that cgroup before it executes. It also starts at nice
        // 19 — only where its cgroup has the cpu controller, in which its
        // nice value no longer matters once a fork takes it — so that a
        // failed join still leaves it in the background.
        let hosts = crate::host::cgroup::Cgroups::host();
        let place = crate::vmm::Placement {
            background: cgroup.is_some() && hosts.is_some_and(|c| c.controllers().contains(&"cpu")),
            cgroup_procs: match (&cgroup, hosts) {
                (Some(name), Some(cg)) => cg.procs_files(name).unwrap_or_default(),
                _ => vec![],
            },
        };
        // A nat pool's child gets its namespace now, with no egress until
        // a fork gives it its allow-list.
        let net = if self.pools.is_nat(tag.as_str()) {
            let made = if spec.nic {
                self.net_create(&id, vec![]).await
            } else {
                Err(Error::FailedPrecondition(format!(
                    "snapshot {:?} was made without a network device: it cannot have a nat pool",
                    tag.as_str()
                )))
            };
            match made {
                Ok(n) => Some(n),
                Err(e) => {
                    self.remove_limits(id.as_str());
                    self.remove_workdir(&dir);
                    return Err(e);
                }
            }
        } else {
            None
        };
        let attach = match &net {
            Some(n) => crate::vmm::NetAttach::Tap { netns: crate::host::net::netns_path(&n.netns), tap: n.tap.clone() },
            None => crate::vmm::NetAttach::Isolated,
        };
        let pending = match self.backend.prestart(spec, &dir, &attach, &place).await {
            Ok(vm) => vm,
            Err(e) => {
                if let Some(n) = &net {
                    self.net_teardown(n).await;
                }
                self.remove_limits(id.as_str());
                self.remove_workdir(&dir);
                return Err(e.into());
            }
        };
        let (pid, start) = (pending.pid(), pending.start_time());
        let key = process::ledger_key(pid, start);
        self.store.ledger_add("vmm", &key, id.as_str())?;
        if let Some(name) = &cgroup
            && let Err(e) = self.enter_cgroup(name, pid)
        {
            return Err(self.forget_pooled(&id, &dir, pid, start, net.as_ref(), e).await);
        }
        // Restored and re-initialized once, then left waiting (paused with
        // --pool-idle paused): the fork that takes it runs the re-init again
        // on code the child has already run.
        let state = self.layout.snapshot_dir(tag).join("state");
        let hot = async {
            let mut vm = pending.load(&state).await?;
            let agent = AgentClient::connect(&dir.agent_socket(), AGENT_CONNECT).await?;
            let reinit = agent.send_reinit(identity(&id, net.as_ref(), 0), REINIT_TIMEOUT).await?;
            vm.control.resume().await?;
            reinit.done(&agent).await?;
            if self.config.pool_paused {
                vm.control.pause().await?;
            }
            Ok::<_, Error>((vm, agent))
        };
        let (vm, agent) = match hot.await {
            Ok(v) => v,
            Err(e) => return Err(self.forget_pooled(&id, &dir, pid, start, net.as_ref(), e).await),
        };
        let paused = self.config.pool_paused;
        let pooled = Pooled { id: id.clone(), dir: dir.clone(), spec: spec.clone(), vm, agent, paused, net };
        // The snapshot may have started going away meanwhile. Checked and
        // pushed under the pool's lock: a deletion marks the tag busy before
        // it drains the pool under that lock, so either it sees this VMM or
        // this check sees the deletion.
        let refused = {
            let mut pools = self.pools.by_tag.lock().unwrap();
            let going = self.busy_tags.contains(tag.as_str())
                || !matches!(self.store.get_snapshot(tag.as_str()), Ok(Some(_)))
                || self.pools.epoch(tag.as_str()) != epoch;
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
                Err(Error::FailedPrecondition(format!(
                    "snapshot {:?} is being deleted or its pool was emptied",
                    tag.as_str()
                )))
            }
        }
    }

    /// Kills a child that failed on its way into the pool and removes its
    /// traces; answers why it failed.
    async fn forget_pooled(
        &self,
        id: &SandboxId,
        dir: &VmDir,
        pid: u32,
        start: u64,
        net: Option<&SandboxNet>,
        why: Error,
    ) -> Error {
        process::kill(pid, start, std::time::Duration::from_secs(5)).await;
        self.clear_pooled_traces(id, dir, pid, start, net).await;
        why
    }

    /// Kills a pooled child and removes its traces.
    pub(crate) async fn discard_pooled(&self, p: Pooled) {
        drop(p.agent);
        process::kill_and_reap(p.vm.pid, p.vm.start_time, p.vm.child).await;
        self.clear_pooled_traces(&p.id, &p.dir, p.vm.pid, p.vm.start_time, p.net.as_ref()).await;
    }

    /// What a pooled child leaves once its VMM is gone: its ledger row,
    /// cgroup, work dir and network.
    async fn clear_pooled_traces(&self, id: &SandboxId, dir: &VmDir, pid: u32, start: u64, net: Option<&SandboxNet>) {
        let _ = self.store.ledger_remove("vmm", &process::ledger_key(pid, start));
        self.remove_limits(id.as_str());
        self.remove_workdir(dir);
        if let Some(n) = net {
            self.net_teardown(n).await;
        }
    }

    /// Pooled children per snapshot tag.
    pub fn pool_sizes(&self) -> HashMap<String, usize> {
        self.pools.sizes()
    }

    /// Every pool that has children, is making some or has a target.
    pub fn pool_list(&self) -> Vec<PoolInfo> {
        self.pools.list()
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

/// Reads a pool's network: "" and "none" for children without a network of
/// their own, "nat" for children with one; anything else is refused.
pub fn pool_network(network: &str) -> Result<bool> {
    match network {
        "" | "none" => Ok(false),
        "nat" => Ok(true),
        other => Err(Error::invalid("network", format!("{other:?}: a pool is for \"none\" or \"nat\""))),
    }
}
