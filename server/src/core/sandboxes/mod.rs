//! Sandboxes: forking children from a ready snapshot, giving each its own
//! identity, running work inside them, and killing them without leaving
//! anything behind.

pub mod metrics;

use super::leases::Resource;
use super::state::SandboxStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use forkd_agent_protocol::v1 as pb;
use forkd_api::names::{SandboxId, Tag};
use futures::stream::{self, StreamExt};
use tokio::sync::Mutex;

use super::runtime::Runtime;
use super::store::{SandboxRecord, SandboxSettings, SnapshotStatus};
use super::{Error, Result, deadline_unix, ids, now_unix, now_unix_ms};
use crate::agent::{AgentClient, ExecStream};
use crate::vmm::{VmControl, VmDir, VmProcess, process};

/// Most children one CreateSandboxes call may fork.
pub const MAX_CHILDREN: u32 = 1000;
pub(crate) const AGENT_CONNECT: Duration = Duration::from_secs(10);
pub(crate) const REINIT_TIMEOUT: Duration = Duration::from_secs(20);

/// A child's identity as the agent applies it: its id and hostname, fresh
/// host entropy (the guest reseeds its RNG and its interpreter from it),
/// the host's wall clock, its address and its pids limit.
pub(crate) fn identity(id: &SandboxId, net: Option<&crate::host::net::SandboxNet>, pids_max: u32) -> pb::ReinitRequest {
    let mut entropy = vec![0u8; 64];
    rand::fill(&mut entropy[..]);
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0);
    pb::ReinitRequest {
        sandbox_id: id.to_string(),
        hostname: id.to_string(),
        entropy,
        unix_nanos: now,
        network: net.map(|n| pb::NetworkConfig {
            interface: "eth0".into(),
            address_cidr: n.guest_cidr.clone(),
            gateway: n.gateway.clone(),
            nameservers: vec![],
        }),
        pids_max,
    }
}

/// A live child VM.
pub struct Sandbox {
    pub id: SandboxId,
    pub pid: u32,
    pub start_time: u64,
    pub dir: VmDir,
    pub record: std::sync::Mutex<SandboxRecord>,
    pub agent: AgentClient,
    pub control: Mutex<Box<dyn VmControl>>,
    /// Set once a kill was requested, so the exit watcher does not report
    /// an intentional kill as an unexpected exit.
    pub(crate) killing: AtomicBool,
    last_active_ms: AtomicI64,
}

impl Sandbox {
    pub fn snapshot(&self) -> SandboxRecord {
        self.record.lock().unwrap().clone()
    }

    pub(crate) fn touch(&self) {
        self.last_active_ms.store(now_unix_ms(), Ordering::Relaxed);
    }

    /// Unix second of the last request that used the sandbox.
    pub fn last_active(&self) -> i64 {
        self.last_active_ms() / 1000
    }

    /// Milliseconds resolution, so idle timeouts are not cut short by rounding.
    pub(crate) fn last_active_ms(&self) -> i64 {
        self.last_active_ms.load(Ordering::Relaxed)
    }

    /// The agent, if the sandbox is running.
    fn live_agent(&self) -> Result<&AgentClient> {
        self.ensure_running()?;
        self.touch();
        Ok(&self.agent)
    }

    /// Whether the sandbox holds a VMM (running or starting), and so counts
    /// against --max-sandboxes.
    pub(crate) fn counts_as_live(&self) -> bool {
        self.record.lock().unwrap().status.holds_vmm()
    }

    /// FAILED_PRECONDITION unless the sandbox is running.
    pub fn ensure_running(&self) -> Result<()> {
        let rec = self.record.lock().unwrap();
        if rec.status != SandboxStatus::Running {
            return Err(super::state::not_running(&rec));
        }
        Ok(())
    }
}

use super::volumes::claims::WORKSPACE_HOLDER;

/// Who holds a workspace's read-write volumes while it has no live sandbox.
pub(crate) fn workspace_holder(workspace: &str) -> String {
    format!("{WORKSPACE_HOLDER}{workspace}")
}

/// What every child of one CreateSandboxes call shares.
#[derive(Clone, Copy)]
struct SpawnPlan<'a> {
    tag: &'a str,
    spec: &'a crate::vmm::VmSpec,
    state: &'a std::path::Path,
    workspace: &'a str,
    owner: &'a str,
    mounts: &'a [super::volumes::Mount],
}

/// Validated arguments of CreateSandboxes.
pub struct CreateSandboxes {
    pub tag: Tag,
    pub n: u32,
    pub settings: SandboxSettings,
    /// The workspace that owns the children ("" for none).
    pub workspace: String,
    /// Afterwards, keep `n` VMMs of this snapshot started for later spawns.
    pub prewarm: bool,
    /// Who asked: its quota is checked.
    pub by: super::tenants::Principal,
    /// The principal the children belong to (the asker's own name, or
    /// the workspace's owner).
    pub owner: String,
}

/// Sandboxes reattached at once after a restart.
const ADOPT_CONCURRENCY: usize = 32;
/// How long a live sandbox's agent has to accept and answer after a
/// restart before the sandbox is taken for dead. Generous: a host running
/// a hundred VMs on two cores answers slowly, and a sandbox taken for dead
/// is killed.
const ADOPT_CONNECT: Duration = Duration::from_secs(10);
const ADOPT_PING: Duration = Duration::from_secs(20);

/// How many children one fork may ask for.
pub fn check_n(n: u32) -> Result<()> {
    if n == 0 || n > MAX_CHILDREN {
        return Err(Error::invalid("n", format!("{n} is outside 1..={MAX_CHILDREN}")));
    }
    Ok(())
}

impl Runtime {
    pub async fn create_sandboxes(self: &Arc<Self>, req: CreateSandboxes) -> Result<Vec<SandboxRecord>> {
        check_n(req.n)?;
        let snap = self.get_snapshot(&req.tag)?;
        if snap.status != SnapshotStatus::Ready {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {:?} is {}, only ready snapshots can be forked{}",
                snap.tag,
                snap.status.as_str(),
                if snap.status_reason.is_empty() { String::new() } else { format!(" ({})", snap.status_reason) }
            )));
        }
        if self.busy_tags.contains(snap.tag.as_str()) {
            return Err(Error::FailedPrecondition(format!("snapshot {:?} is being deleted", snap.tag)));
        }
        let mut spec = snap.vm_spec()?;
        let state = self.layout.snapshot_dir(&req.tag).join("state");
        let own = super::volumes::parse_stored(&req.settings.volumes);
        let plugged =
            super::volumes::plug(snap.tag.as_str(), &spec.drives, &super::volumes::parse_stored(&snap.volumes), &own)?;
        let rw = super::volumes::read_write_files(&plugged.volumes);
        if !rw.is_empty() && req.n > 1 {
            return Err(Error::FailedPrecondition(format!(
                "forking from {:?} with read-write volumes, which one sandbox at a time may use; fork n=1",
                snap.tag
            )));
        }
        // Admission (nothing is created before it): a default memory limit
        // for children that ask for none, then the daemon-wide sandbox
        // count and the host memory the children may take.
        let mut req = req;
        if req.settings.memory_limit_mib == 0 {
            req.settings.memory_limit_mib = self.admission.default_memory_limit_mib(snap.mem_mib);
        }
        let (admitted, _quota) = {
            let live = self.sandboxes.read().await;
            // Pooled children are children too; those this fork will take
            // are counted once, as asked for.
            let pooled_here = self.pools.ready(snap.tag.as_str()).min(req.n as usize);
            let running =
                live.values().filter(|s| s.counts_as_live()).count() + self.pools.count().saturating_sub(pooled_here);
            let held: Vec<super::tenants::Held> = live
                .values()
                .filter(|s| s.counts_as_live())
                .map(|s| s.snapshot())
                .filter(|r| r.owner == req.by.owner())
                .map(|r| super::tenants::Held { memory_limit_mib: r.settings.memory_limit_mib })
                .collect();
            // The tenant's quota first: a tenant over it learns nothing
            // about the host's load.
            let quota = self.tenant_quotas.admit(&req.by, &held, req.n, req.settings.memory_limit_mib)?;
            let cost = crate::host::admission::child_cost_bytes(req.settings.memory_limit_mib, snap.mem_mib);
            let admitted = self
                .admission
                .admit_children(running, req.n as usize, cost)
                .map_err(|e| Error::ResourceExhausted(format!("forking {} from {:?}: {e}", req.n, snap.tag)))?;
            (admitted, quota)
        };
        let reservation = format!("pending-{}", ids::nonce());
        // A workspace takes back the volumes it kept while suspended.
        let kept_by = (!req.workspace.is_empty()).then(|| workspace_holder(&req.workspace));
        self.reserve_rw_volumes(&rw, &reservation, kept_by.as_deref())?;
        spec.drives = plugged.drives.clone();
        let mut settings_with_volumes = req.settings.clone();
        settings_with_volumes.volumes = plugged.volumes.iter().map(|v| v.to_spec_string()).collect();
        let req = CreateSandboxes { settings: settings_with_volumes, ..req };
        let mounts = plugged.mounts;
        // Pooled VMMs have the snapshot's disks, and a network made ahead
        // of time when their pool is for "nat".
        let mut pooled = self.pools.take(snap.tag.as_str(), &spec, req.n as usize, req.settings.network == "nat");
        let from_pool = pooled.len();
        let slots: Vec<Option<super::pool::Pooled>> = (0..req.n).map(|_| pooled.pop()).collect();
        let plan = SpawnPlan {
            tag: snap.tag.as_str(),
            spec: &spec,
            state: &state,
            workspace: &req.workspace,
            owner: &req.owner,
            mounts: &mounts,
        };
        let results: Vec<Result<Arc<Sandbox>>> = stream::iter(slots)
            .map(|pooled| {
                let (plan, settings) = (&plan, req.settings.clone());
                async move { self.spawn_one(plan, settings, pooled).await }
            })
            .buffer_unordered(self.config.admission.spawn_concurrency.max(1))
            .collect()
            .await;
        let mut ok = vec![];
        let mut first_err = None;
        for r in results {
            match r {
                Ok(sb) => ok.push(sb),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            match &kept_by {
                Some(ws) => self.transfer_rw_volumes(&reservation, ws),
                None => self.release_rw_volumes(&reservation),
            }
            // All or nothing.
            for sb in ok {
                self.kill_sandbox(&sb).await;
            }
            return Err(match e {
                Error::Internal(m) => Error::Internal(format!("forking from {:?} failed: {m}", snap.tag)),
                other => other,
            });
        }
        if let Some(sb) = ok.first() {
            self.transfer_rw_volumes(&reservation, sb.id.as_str());
        }
        if from_pool > 0 {
            tracing::debug!(tag = %snap.tag, from_pool, n = req.n, "children served from the pool");
        }
        // A configured pool is topped up after every fork of its snapshot.
        self.refill_pool(&req.tag);
        if req.prewarm {
            self.fill_pool_in_background(&req.tag, req.n as usize, self.config.admission.spawn_concurrency, "prewarm");
        }
        let mut map = self.sandboxes.write().await;
        let mut out = vec![];
        for sb in ok {
            out.push(sb.snapshot());
            map.insert(sb.id.to_string(), sb);
        }
        // Listed now: no longer pending (released under the map's lock).
        drop(admitted);
        Ok(out)
    }

    /// Starts one child. Whatever it created before failing was held by
    /// leases (core::leases) and is released before the error is returned.
    async fn spawn_one(
        self: &Arc<Self>,
        plan: &SpawnPlan<'_>,
        settings: SandboxSettings,
        pooled: Option<super::pool::Pooled>,
    ) -> Result<Arc<Sandbox>> {
        let result = self.spawn_leased(plan, settings, pooled).await;
        if result.is_err() {
            self.release_dropped().await;
        }
        result
    }

    async fn spawn_leased(
        self: &Arc<Self>,
        plan: &SpawnPlan<'_>,
        settings: SandboxSettings,
        pooled: Option<super::pool::Pooled>,
    ) -> Result<Arc<Sandbox>> {
        let SpawnPlan { tag, spec, state, workspace, owner, mounts } = *plan;
        // Daemon-wide: concurrent forks share the VMM start permits.
        let _permit = self.admission.spawn_permit().await;
        let started = Instant::now();
        let id = pooled.as_ref().map(|p| p.id.clone()).unwrap_or_else(ids::new_sandbox_id);
        let dir = VmDir(self.layout.sandbox_dir(&id));
        let dir_key = dir.path().display().to_string();
        let spawning = match self.begin_spawn(&id, &settings) {
            Ok(s) => s,
            Err(e) => {
                if let Some(p) = pooled {
                    self.discard_pooled(p).await;
                    self.pools.arrived(&id);
                }
                return Err(e);
            }
        };
        self.pools.arrived(&id);
        if pooled.is_none() {
            self.create_workdir(&id, &dir)?;
        }
        // A pooled VMM's dir was made (and ledgered) by the pool.
        let dir_lease = self.lease(Resource::WorkDir(dir.path().to_path_buf()));
        if settings.network == "nat" && !spec.nic {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {tag:?} was made without a network device; bake a new snapshot to use network \"nat\""
            )));
        }
        let mut pooled = pooled;
        let net = match pooled.as_mut().and_then(|p| p.net.take()) {
            // Made with the pooled child, without egress: this fork's rules.
            Some(n) => match self.net_take(&n, &settings).await {
                Ok(()) => Some(n),
                Err(e) => {
                    if let Some(mut p) = pooled {
                        p.net = Some(n);
                        self.discard_pooled(p).await;
                    }
                    return Err(e);
                }
            },
            None => self.net_setup(&id, &settings).await?,
        };
        let net_lease = net.clone().map(|n| self.lease(Resource::Net(n)));
        let attach = match &net {
            Some(n) => crate::vmm::NetAttach::Tap { netns: crate::host::net::netns_path(&n.netns), tap: n.tap.clone() },
            None => crate::vmm::NetAttach::Isolated,
        };
        let prepared_ms = started.elapsed().as_secs_f64() * 1000.0;
        // A pooled child is restored, re-initialized once and waiting, its
        // agent connected: what is left is its identity (and to resume it
        // when it waits paused).
        let (vm, pooled_agent) = match pooled {
            Some(p) => (p.vm, Some((p.agent, p.paused))),
            None => (self.backend.restore(spec, state, &dir, &attach, &spawning.placement()).await?, None),
        };
        let vmm_lease = self.lease(Resource::Vmm { pid: vm.pid, start: vm.start_time });
        let mut phases = super::store::SpawnPhases {
            prepared_ms,
            restored_ms: started.elapsed().as_secs_f64() * 1000.0,
            pooled: pooled_agent.is_some(),
            ..Default::default()
        };
        let hostname = id.as_str().to_string();
        let expires_at_unix = deadline_unix(settings.ttl_secs);
        let record = SandboxRecord {
            id: id.clone(),
            snapshot_tag: Tag::parse(tag)?,
            pid: vm.pid,
            pid_start: vm.start_time,
            created_at_unix: now_unix(),
            status: SandboxStatus::Starting,
            status_reason: String::new(),
            hostname,
            settings,
            workspace: workspace.to_string(),
            spawn_ms: 0.0,
            workdir: dir_key.clone(),
            backend: self.backend.name().into(),
            accel: self.accel.accel.as_str().into(),
            expires_at_unix,
            net: net.clone(),
            drives: spec.drives.clone(),
            owner: owner.to_string(),
            branch_count: 0,
            spawn_phases: phases,
        };
        self.store.ledger_add("vmm", &process::ledger_key(vm.pid, vm.start_time), id.as_str())?;
        let row_lease = self.lease(Resource::SandboxRow(id.to_string()));
        self.store.put_sandbox(&record)?;
        let VmProcess { pid, start_time, control, child, .. } = vm;
        let pids_max = record.settings.pids_limit;
        let setup = async {
            spawning.attach(pid)?;
            let (agent, paused) = match pooled_agent {
                Some(a) => a,
                None => (AgentClient::connect(&dir.agent_socket(), AGENT_CONNECT).await?, true),
            };
            let mut control = control;
            // Queued before the vCPUs run: the agent's first read is its identity.
            let reinit = agent.send_reinit(identity(&id, net.as_ref(), pids_max), REINIT_TIMEOUT).await?;
            if paused {
                control.resume().await?;
            }
            phases.resumed_ms = started.elapsed().as_secs_f64() * 1000.0;
            let done = reinit.done(&agent).await?;
            phases.reinit_ms = started.elapsed().as_secs_f64() * 1000.0;
            phases.guest_steps =
                super::store::GuestSteps::from_micros(&done.step_micros, REINIT_TIMEOUT.as_secs_f64() * 1000.0);
            for m in mounts {
                agent
                    .mount(
                        pb::MountRequest {
                            device: m.device.clone(),
                            target: m.volume.guest.clone(),
                            fstype: "ext4".into(),
                            read_only: m.volume.read_only,
                            reprobe: m.reprobe,
                        },
                        REINIT_TIMEOUT,
                    )
                    .await?;
            }
            Ok::<_, Error>((agent, control))
        };
        let (agent, control) = match setup.await {
            Ok(v) => v,
            Err(e) => {
                // The leases kill the VMM and remove what it used; reap it here.
                process::kill_and_reap(pid, start_time, child).await;
                return Err(e);
            }
        };
        let mut record = record;
        record.status = SandboxStatus::Running;
        record.spawn_ms = started.elapsed().as_secs_f64() * 1000.0;
        record.spawn_phases = phases;
        self.store.put_sandbox(&record)?;
        // The record owns the VMM, its row, its network and its dir now.
        for lease in [Some(vmm_lease), Some(row_lease), net_lease, Some(dir_lease)].into_iter().flatten() {
            lease.commit();
        }
        tracing::debug!(id = %id, ?phases, total = record.spawn_ms, "spawn phases");
        spawning.finish();
        let sb = Arc::new(Sandbox {
            id: id.clone(),
            pid,
            start_time,
            dir,
            record: std::sync::Mutex::new(record),
            agent,
            control: Mutex::new(control),
            killing: AtomicBool::new(false),
            last_active_ms: AtomicI64::new(now_unix_ms()),
        });
        if let Some(child) = child {
            self.watch_exit(sb.clone(), child);
        }
        let rec = sb.snapshot();
        self.events.emit_for("created", &rec, "");
        self.events.emit_for("ready", &rec, "");
        Ok(sb)
    }

    /// Marks the sandbox exited with a reason when its VMM dies on its own.
    fn watch_exit(self: &Arc<Self>, sb: Arc<Sandbox>, mut child: tokio::process::Child) {
        let rt = self.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            if sb.killing.load(Ordering::SeqCst) {
                return;
            }
            let reason = match status {
                Ok(s) => format!("the VMM exited on its own ({s})"),
                Err(e) => format!("the VMM could not be waited for: {e}"),
            };
            let Some(rec) = rt.vmm_exited(&sb, reason) else { return };
            let reason = rec.status_reason.clone();
            if !rec.workspace.is_empty() {
                rt.workspace_lost_sandbox(&rec.workspace, &reason);
            }
        });
    }

    /// Records a VM's work dir in the ledger, then creates it.
    pub(crate) fn create_workdir(&self, id: &SandboxId, dir: &VmDir) -> Result<()> {
        let key = dir.path().display().to_string();
        self.store.ledger_add("workdir", &key, id.as_str())?;
        if let Err(e) = std::fs::create_dir_all(dir.path()) {
            let _ = self.store.ledger_remove("workdir", &key);
            return Err(Error::internal("create the VM's work dir", e));
        }
        Ok(())
    }

    pub(crate) fn remove_workdir(&self, dir: &VmDir) {
        let key = dir.path().display().to_string();
        if self.layout.remove_dir(dir.path()).is_ok() {
            let _ = self.store.ledger_remove("workdir", &key);
        }
    }

    /// Kills the VMM and removes every trace of the sandbox. Idempotent.
    async fn kill_sandbox(&self, sb: &Sandbox) {
        let volumes = super::volumes::parse_stored(&sb.snapshot().settings.volumes);
        if volumes.iter().any(|v| !v.read_only) && sb.ensure_running().is_ok() {
            // Flush the guest's writes to read-write volumes before the VM
            // goes; a guest that does not answer gets 6 s in all, never more.
            let sync = async {
                let req = pb::ExecRequest { args: vec!["sync".into()], timeout_ms: 5000, ..Default::default() };
                if let Ok(mut s) = sb.agent.exec(req).await {
                    while let Ok(Some(_)) = s.next().await {}
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(6), sync).await;
        }
        sb.killing.store(true, Ordering::SeqCst);
        // Persist the intent first: a daemon that dies from here on finds
        // the record `killing` and finishes the job when it starts again.
        let _ = self.transition(sb, SandboxStatus::Killing, "", None);
        process::kill(sb.pid, sb.start_time, Duration::from_secs(5)).await;
        let _ = self.store.ledger_remove("vmm", &process::ledger_key(sb.pid, sb.start_time));
        self.remove_limits(sb.id.as_str());
        if let Some(n) = sb.snapshot().net {
            self.net_teardown(&n).await;
        }
        self.remove_workdir(&sb.dir);
        let _ = self.store.delete_sandbox(sb.id.as_str());
        let rec = sb.snapshot();
        let ws = rec.workspace.clone();
        // A workspace's read-write volumes stay claimed while it is
        // suspended: its state snapshot has them mounted.
        match ws.as_str() {
            "" => self.release_rw_volumes(sb.id.as_str()),
            w => self.transfer_rw_volumes(sb.id.as_str(), &workspace_holder(w)),
        }
        self.events.emit_for("killed", &rec, "");
        if !ws.is_empty() {
            self.workspace_lost_sandbox(&ws, "it was killed");
        }
    }

    pub async fn sandbox(&self, id: &SandboxId) -> Result<Arc<Sandbox>> {
        self.sandboxes
            .read()
            .await
            .get(id.as_str())
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("sandbox {} not found", id.as_str())))
    }

    pub async fn sandboxes_of(&self, tag: &str) -> Vec<String> {
        let map = self.sandboxes.read().await;
        let mut ids: Vec<String> =
            map.values().filter(|s| s.record.lock().unwrap().snapshot_tag == tag).map(|s| s.id.to_string()).collect();
        ids.sort();
        ids
    }

    pub async fn list_sandboxes(&self, tag: Option<&str>) -> Vec<SandboxRecord> {
        let map = self.sandboxes.read().await;
        let mut out: Vec<SandboxRecord> =
            map.values().map(|s| s.snapshot()).filter(|r| tag.is_none_or(|t| r.snapshot_tag == t)).collect();
        out.sort_by(|a, b| (a.created_at_unix, &a.id).cmp(&(b.created_at_unix, &b.id)));
        out
    }

    /// Deletes the given sandboxes; unknown ids are skipped (idempotent).
    pub async fn delete_sandboxes(&self, ids: &[SandboxId], tag: Option<&Tag>, all: bool) -> Result<Vec<String>> {
        let victims: Vec<Arc<Sandbox>> = {
            let mut map = self.sandboxes.write().await;
            let keys: Vec<String> = map
                .iter()
                .filter(|(k, s)| {
                    all || ids.iter().any(|i| i.as_str() == k.as_str())
                        || tag.is_some_and(|t| s.record.lock().unwrap().snapshot_tag == t.as_str())
                })
                .map(|(k, _)| k.clone())
                .collect();
            keys.iter().filter_map(|k| map.remove(k)).collect()
        };
        let mut deleted: Vec<String> = stream::iter(victims)
            .map(|sb| async move {
                self.kill_sandbox(&sb).await;
                sb.id.to_string()
            })
            .buffer_unordered(16)
            .collect()
            .await;
        deleted.sort();
        Ok(deleted)
    }

    pub async fn exec(&self, id: &SandboxId, mut req: pb::ExecRequest) -> Result<ExecStream> {
        if req.args.is_empty() {
            return Err(Error::invalid("args", "must name a command"));
        }
        let sb = self.sandbox(id).await?;
        self.image_defaults(&sb, &mut req.env, &mut req.cwd, &mut req.user);
        Ok(sb.live_agent()?.exec(req).await?)
    }

    /// Fills what a command did not say from the sandbox's image config:
    /// its environment under the request's, its working dir and its user.
    pub fn image_defaults(
        &self,
        sb: &Sandbox,
        env: &mut std::collections::HashMap<String, String>,
        cwd: &mut String,
        user: &mut String,
    ) {
        let tag = sb.snapshot().snapshot_tag;
        let Ok(Some(snap)) = self.store.get_snapshot(tag.as_str()) else { return };
        if !crate::images::store::is_digest(&snap.image) {
            return;
        }
        let Some(config) = self.images.config(&snap.image) else { return };
        for kv in &config.env {
            if let Some((k, v)) = kv.split_once('=') {
                env.entry(k.to_string()).or_insert_with(|| v.to_string());
            }
        }
        if cwd.is_empty() {
            cwd.clone_from(&config.working_dir);
        }
        if user.is_empty() {
            user.clone_from(&config.user);
        }
    }

    pub async fn eval(&self, id: &SandboxId, code: String, timeout: Duration) -> Result<pb::EvalResult> {
        let sb = self.sandbox(id).await?;
        let r = sb
            .live_agent()?
            .eval(
                pb::EvalRequest { code, timeout_ms: timeout.as_millis() as u32, ..Default::default() },
                timeout + Duration::from_secs(5),
            )
            .await?;
        Ok(r)
    }

    pub async fn ping(&self, id: &SandboxId) -> Result<(pb::Pong, Duration)> {
        let sb = self.sandbox(id).await?;
        let t = Instant::now();
        let p = sb.live_agent()?.ping(Duration::from_secs(10)).await?;
        Ok((p, t.elapsed()))
    }

    /// The live agent of a sandbox (for file operations).
    pub async fn agent_of(&self, id: &SandboxId) -> Result<Arc<Sandbox>> {
        let sb = self.sandbox(id).await?;
        sb.live_agent()?;
        Ok(sb)
    }

    /// After a restart: reattach to VMMs that are still running, reap the
    /// records of those that are gone, remove work dirs nobody owns.
    pub(crate) async fn adopt_sandboxes(self: &Arc<Self>) -> Result<()> {
        let mut known: std::collections::HashSet<String> = std::collections::HashSet::new();
        let records = self.store.list_sandboxes()?;
        // Reattach to the live ones concurrently: with many VMs sharing the
        // host's cores each agent is slow to answer, and one at a time the
        // waits would add up.
        let mut attached: std::collections::HashMap<SandboxId, Result<Arc<Sandbox>>> = stream::iter(
            records.iter().filter(|r| r.status == SandboxStatus::Running && process::is_alive(r.pid, r.pid_start)),
        )
        .map(|rec| async move {
            let dir = VmDir(self.layout.sandbox_dir(&rec.id));
            (rec.id.clone(), self.adopt_one(rec, &rec.id, &dir).await)
        })
        .buffer_unordered(ADOPT_CONCURRENCY)
        .collect()
        .await;
        for rec in records {
            let id = rec.id.clone();
            let dir = VmDir(self.layout.sandbox_dir(&id));
            let adopted = attached.remove(&id).unwrap_or_else(|| Err(Error::Unavailable("not running".into())));
            match adopted {
                Ok(sb) => {
                    let rw = super::volumes::read_write_files(&super::volumes::parse_stored(&rec.settings.volumes));
                    let _ = self.reserve_rw_volumes(&rw, rec.id.as_str(), None);
                    known.insert(rec.id.to_string());
                    if let Some(n) = &rec.net {
                        self.net_adopt(n);
                    }
                    self.sandboxes.write().await.insert(rec.id.to_string(), sb);
                    tracing::info!(id = %rec.id, pid = rec.pid, "adopted sandbox");
                }
                Err(e) => {
                    tracing::info!(id = %rec.id, "reaping sandbox: {e}");
                    process::kill(rec.pid, rec.pid_start, Duration::from_secs(5)).await;
                    let _ = self.store.ledger_remove("vmm", &process::ledger_key(rec.pid, rec.pid_start));
                    self.remove_limits(rec.id.as_str());
                    if let Some(n) = &rec.net {
                        self.net_teardown(n).await;
                    }
                    self.remove_workdir(&dir);
                    if matches!(rec.status, SandboxStatus::Starting | SandboxStatus::Killing) {
                        // Never reported to anyone, or being deleted when the
                        // last daemon stopped: finish the delete and forget it.
                        let _ = self.store.delete_sandbox(rec.id.as_str());
                        if rec.status == SandboxStatus::Killing {
                            self.events.emit_for("killed", &rec, "");
                            if !rec.workspace.is_empty() {
                                self.workspace_lost_sandbox(&rec.workspace, "it was killed");
                            }
                        }
                        continue;
                    }
                    // A sandbox that ended while no daemon watched it stays
                    // listed with a terminal state and the reason, until deleted.
                    let mut dead = rec.clone();
                    if dead.status == SandboxStatus::Running {
                        dead.status = SandboxStatus::Exited;
                        dead.status_reason = format!("the VMM was gone when the daemon started ({e})");
                        if !dead.workspace.is_empty() {
                            self.workspace_lost_sandbox(&dead.workspace, &dead.status_reason);
                        }
                    }
                    dead.net = None;
                    let _ = self.store.put_sandbox(&dead);
                    known.insert(dead.id.to_string());
                    let sb = self.dead_sandbox(&dead, &id, &dir);
                    self.sandboxes.write().await.insert(dead.id.to_string(), sb);
                }
            }
        }
        // Ledgered VMMs that no sandbox record owns (a crash between spawn
        // and record): kill them.
        for entry in self.store.ledger_entries()? {
            if entry.kind == "vmm" && !known.contains(&entry.owner) {
                if let Some((pid, start)) = process::parse_ledger_key(&entry.key) {
                    process::kill(pid, start, Duration::from_secs(5)).await;
                }
                let _ = self.store.ledger_remove("vmm", &entry.key);
            }
        }
        if let Ok(rd) = std::fs::read_dir(self.layout.sandboxes_dir()) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !known.contains(&name) {
                    let _ = self.layout.remove_dir(&e.path());
                    let _ = self.store.ledger_remove("workdir", &e.path().display().to_string());
                }
            }
        }
        self.sweep_orphans(true).await;
        Ok(())
    }

    /// The entry of a sandbox whose VMM is gone: listed with its terminal
    /// state; every call to it fails with that state; delete removes it.
    fn dead_sandbox(&self, rec: &SandboxRecord, id: &SandboxId, dir: &VmDir) -> Arc<Sandbox> {
        Arc::new(Sandbox {
            id: id.clone(),
            pid: rec.pid,
            start_time: rec.pid_start,
            dir: dir.clone(),
            record: std::sync::Mutex::new(rec.clone()),
            agent: AgentClient::disconnected(),
            control: Mutex::new(Box::new(crate::vmm::GoneControl)),
            killing: AtomicBool::new(true),
            last_active_ms: AtomicI64::new(now_unix_ms()),
        })
    }

    async fn adopt_one(self: &Arc<Self>, rec: &SandboxRecord, id: &SandboxId, dir: &VmDir) -> Result<Arc<Sandbox>> {
        let vm = self.backend.attach(rec.pid, rec.pid_start, dir).await?;
        let agent = AgentClient::connect(&dir.agent_socket(), ADOPT_CONNECT).await?;
        agent.ping(ADOPT_PING).await?;
        Ok(Arc::new(Sandbox {
            id: id.clone(),
            pid: rec.pid,
            start_time: rec.pid_start,
            dir: dir.clone(),
            record: std::sync::Mutex::new(rec.clone()),
            agent,
            control: Mutex::new(vm.control),
            killing: AtomicBool::new(false),
            last_active_ms: AtomicI64::new(now_unix_ms()),
        }))
    }
}

impl Runtime {
    /// Claims read-write volume files for `holder` (volumes::claims).
    pub(crate) fn reserve_rw_volumes(
        &self,
        files: &[std::path::PathBuf],
        holder: &str,
        take_from: Option<&str>,
    ) -> Result<()> {
        self.volume_claims.reserve(files, holder, take_from)
    }

    fn transfer_rw_volumes(&self, from: &str, to: &str) {
        self.volume_claims.transfer(from, to)
    }

    pub(crate) fn release_rw_volumes(&self, holder: &str) {
        self.volume_claims.release(holder)
    }
}
