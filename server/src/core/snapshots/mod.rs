//! Snapshots: booting and warming a base snapshot, reading chain information,
//! and deleting (with dependents and live children taken into account).

pub mod branch;
pub mod busy;
pub mod remote;
pub mod transfer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use forkd_api::names::Tag;

use super::runtime::{ImageInfo, Runtime};
use super::store::{SnapshotRecord, SnapshotStatus};
use super::{Error, Result, ids, now_unix};
use crate::agent::AgentClient;
use crate::memory::{digest, layout};
use crate::vmm::{VmDir, VmSpec, process};

pub(crate) const MIB: u64 = 1 << 20;

/// Kernel command line flags that make a microVM boot fast and reliably
/// under TCG (see QEMU-NOTES.md): quiet console, a fixed TSC frequency, and
/// slow initcalls skipped.
const BASE_CMDLINE: &str = "console=ttyS0 quiet tsc=reliable no_timer_check nowatchdog \
cryptomgr.notests audit=0 \
initcall_blacklist=jent_mod_init,load_system_certificate_list,bpf_tcp_ca_kfunc_init,\
bpf_dummy_struct_ops_init,init_encrypted,crypto_kdf108_init";

pub fn kernel_cmdline(tsc_khz: u64, image: &ImageInfo) -> String {
    let mut s = format!("{BASE_CMDLINE} tsc_early_khz={tsc_khz} forkd.runtime={}", image.runtime);
    if !image.warm.is_empty() {
        s.push_str(&format!(" forkd.warm={}", image.warm));
    }
    s
}

/// Validated arguments of CreateSnapshot.
pub struct CreateSnapshot {
    pub tag: Tag,
    pub image: String,
    pub vcpus: u32,
    pub mem_mib: u32,
    pub warm_timeout: Duration,
    /// Least time from boot before the snapshot is taken (the reference's
    /// boot_wait_secs): userspace warms up at least this long.
    pub min_warm: Duration,
    pub warm_eval: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub volumes: Vec<super::volumes::VolumeSpec>,
    /// The principal it will belong to.
    pub owner: String,
}

/// What GetSnapshot reports beyond the stored record.
pub struct SnapshotView {
    pub record: SnapshotRecord,
    pub ancestors: Vec<String>,
    pub dependents: Vec<String>,
    pub live_sandboxes: u32,
    /// Where its files are, and what they hold.
    pub files: SnapshotFiles,
    /// Ready, with every ancestor ready: children can be forked now.
    pub bootable: bool,
}

/// A snapshot's directory and the sizes of its parts.
#[derive(Debug, Clone, Default)]
pub struct SnapshotFiles {
    pub dir: String,
    /// The saved device and CPU state.
    pub vmstate_bytes: u64,
}

impl Runtime {
    /// Marks a snapshot shared (every tenant may fork from it) or private.
    pub fn share_snapshot(&self, tag: &Tag, shared: bool) -> Result<SnapshotRecord> {
        let mut rec = self.get_snapshot(tag)?;
        rec.shared = shared;
        self.store.update_snapshot(&rec)?;
        Ok(rec)
    }

    pub async fn create_snapshot(self: &Arc<Self>, req: CreateSnapshot) -> Result<SnapshotRecord> {
        if !(1..=64).contains(&req.vcpus) {
            return Err(Error::invalid("vcpus", format!("{} is outside 1..=64", req.vcpus)));
        }
        if !(64..=65536).contains(&req.mem_mib) {
            return Err(Error::invalid("mem_mib", format!("{} is outside 64..=65536", req.mem_mib)));
        }
        self.guest.check()?;
        let image = self.resolve_image(&req.image)?;
        if !req.warm_eval.is_empty() && image.runtime == "none" {
            return Err(Error::FailedPrecondition(format!(
                "image {:?} has no python3, so its snapshots have no warm interpreter to run warm_eval in \
                 (build one with python: forkd image build NAME --from IMAGE --apt python3)",
                req.image
            )));
        }
        self.admit_snapshot_write(&format!("snapshot {:?}", req.tag.as_str()), req.mem_mib as u64 * MIB)?;
        let final_dir = self.layout.snapshot_dir(&req.tag);
        let staging = self.layout.staging_for(&req.tag, &ids::nonce());
        let spec = VmSpec {
            kernel: self.guest.kernel(),
            initrd: self.guest.initrd(),
            cmdline: kernel_cmdline(self.config.tsc_khz, &image),
            rootfs: image.path.clone(),
            mem_mib: req.mem_mib,
            vcpus: req.vcpus,
            accel: self.accel.accel,
            mem_file: final_dir.join("mem"),
            drives: super::volumes::snapshot_drives(
                &req.volumes,
                self.config.volume_slots,
                &self.layout.volume_slot_placeholder(),
            ),
            nic: true,
        };
        let rec = SnapshotRecord {
            tag: req.tag.clone(),
            status: SnapshotStatus::Writing,
            status_reason: String::new(),
            image: image.record_name.clone(),
            vcpus: req.vcpus,
            mem_mib: req.mem_mib,
            kind: "base".into(),
            parent_tag: None,
            created_at_unix: now_unix(),
            memory_digest: String::new(),
            state_digest: String::new(),
            parent_memory_digest: String::new(),
            branched_from: String::new(),
            pause_ms: 0.0,
            dirty_bytes: 0,
            diff_ms: 0.0,
            backend: self.backend.name().into(),
            accel: self.accel.accel.as_str().into(),
            volumes: req.volumes.iter().map(|v| v.to_spec_string()).collect(),
            labels: req.labels.clone(),
            warm_ms: 0.0,
            runtime: if image.runtime == "none" { String::new() } else { image.runtime.clone() },
            physical_size_bytes: 0,
            vm: Some(spec.clone()),
            owner: req.owner.clone(),
            shared: false,
        };
        if final_dir.exists() {
            return Err(Error::AlreadyExists(format!("snapshot {:?} already exists on disk", rec.tag)));
        }
        self.store.insert_snapshot(&rec)?;
        self.store.ledger_add("staging", &staging.display().to_string(), rec.tag.as_str())?;
        let rt = self.clone();
        let mut bg = rec.clone();
        tokio::spawn(async move {
            let outcome = rt.bake(&mut bg, spec, &staging, &req).await;
            if let Err(e) = outcome {
                tracing::warn!(tag = %bg.tag, "snapshot failed: {e}");
                let _ = rt.layout.remove_dir(&staging);
                bg.status = SnapshotStatus::Failed;
                bg.status_reason = e.to_string();
            }
            let _ = rt.store.ledger_remove("staging", &staging.display().to_string());
            if let Err(e) = rt.store.update_snapshot(&bg) {
                tracing::error!(tag = %bg.tag, "recording snapshot outcome: {e}");
            }
            rt.events.emit_ws(
                if bg.status == SnapshotStatus::Ready { "snapshot_ready" } else { "snapshot_failed" },
                "",
                "",
                bg.tag.as_str(),
                &bg.owner,
                &bg.status_reason,
            );
        });
        Ok(rec)
    }

    /// Boots the parent in `staging`, waits for its runtime, saves it, and
    /// renames the staging dir into the store.
    async fn bake(
        &self,
        rec: &mut SnapshotRecord,
        spec: VmSpec,
        staging: &std::path::Path,
        req: &CreateSnapshot,
    ) -> Result<()> {
        std::fs::create_dir_all(staging).map_err(|e| Error::internal("create staging dir", e))?;
        let mem = staging.join("mem");
        let f = std::fs::File::create(&mem).map_err(|e| Error::internal("create memory file", e))?;
        f.set_len(spec.mem_mib as u64 * 1024 * 1024).map_err(|e| Error::internal("size memory file", e))?;
        drop(f);
        let boot_spec = VmSpec { mem_file: mem.clone(), ..spec.clone() };
        let dir = VmDir(staging.join("vm"));
        std::fs::create_dir_all(dir.path()).map_err(|e| Error::internal("create vm dir", e))?;
        // The booting parent runs in a cgroup of its own, with room for a
        // boot from scratch over a sandbox's default limit.
        let memory_mib = match self.admission.default_memory_limit_mib(spec.mem_mib) {
            0 => 0,
            m => m.saturating_add(super::limits::BAKE_EXTRA_MIB),
        };
        let cgroup_name =
            crate::host::cgroup::sandbox_name(&format!("{}{}", super::limits::BAKE_CGROUP_PREFIX, ids::nonce()));
        let cgroup = self.helper_cgroup(cgroup_name, rec.tag.as_str(), memory_mib, false)?;
        let result = self.bake_in(rec, &boot_spec, &dir, staging, req, cgroup.as_deref()).await;
        if let Some(name) = &cgroup {
            self.remove_cgroup(name);
        }
        result?;
        let _ = std::fs::remove_dir_all(dir.path());
        let (mem_d, state_d) = tokio::task::spawn_blocking({
            let mem = mem.clone();
            let state = staging.join("state");
            move || Ok::<_, std::io::Error>((digest::sha256_file(&mem)?, digest::sha256_file(&state)?))
        })
        .await
        .map_err(|e| Error::internal("digest", e))?
        .map_err(|e| Error::internal("digest", e))?;
        rec.memory_digest = mem_d;
        rec.state_digest = state_d;
        write_vm_json(staging, &spec)?;
        rec.physical_size_bytes = layout::disk_usage(staging);
        let final_dir = spec.mem_file.parent().expect("snapshot dir").to_path_buf();
        std::fs::rename(staging, &final_dir).map_err(|e| Error::internal("rename snapshot into place", e))?;
        rec.status = SnapshotStatus::Ready;
        Ok(())
    }

    /// Boots the parent (in `cgroup`), waits for its runtime and warm-up,
    /// and saves its device state into `staging`; the VMM is gone on return.
    async fn bake_in(
        &self,
        rec: &mut SnapshotRecord,
        boot_spec: &VmSpec,
        dir: &VmDir,
        staging: &std::path::Path,
        req: &CreateSnapshot,
        cgroup: Option<&str>,
    ) -> Result<()> {
        let started = Instant::now();
        let mut vm = self.backend.boot(boot_spec, dir).await?;
        self.store.ledger_add("vmm", &process::ledger_key(vm.pid, vm.start_time), rec.tag.as_str())?;
        let result: Result<()> = async {
            if let Some(name) = cgroup {
                self.enter_cgroup(name, vm.pid)?;
            }
            let agent = AgentClient::connect(&dir.agent_socket(), Duration::from_secs(10)).await?;
            let deadline = Instant::now() + req.warm_timeout;
            loop {
                if let Some(child) = vm.child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    let console = std::fs::read_to_string(dir.console_log()).unwrap_or_default();
                    let tail: String = console
                        .lines()
                        .rev()
                        .take(10)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n");
                    return Err(Error::Internal(format!("the VM exited during warm-up ({status}); console: {tail}")));
                }
                match agent.ping(Duration::from_millis(500)).await {
                    Ok(p) if p.runtime_ready || rec.runtime.is_empty() => break,
                    _ => {}
                }
                if Instant::now() > deadline {
                    return Err(Error::DeadlineExceeded(format!(
                        "the guest runtime was not ready after {} s",
                        req.warm_timeout.as_secs()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if !req.warm_eval.is_empty() {
                let r = agent
                    .eval(
                        forkd_agent_protocol::v1::EvalRequest {
                            code: req.warm_eval.clone(),
                            timeout_ms: 0,
                            ..Default::default()
                        },
                        req.warm_timeout,
                    )
                    .await?;
                if r.exit_code != 0 {
                    return Err(Error::InvalidArgument(format!("warm_eval failed: {}", r.error)));
                }
            }
            if let Some(left) = req.min_warm.checked_sub(started.elapsed()) {
                tokio::time::sleep(left).await;
            }
            rec.warm_ms = started.elapsed().as_secs_f64() * 1000.0;
            vm.control.pause().await?;
            vm.control.save_state(&staging.join("state")).await?;
            Ok(())
        }
        .await;
        process::kill_and_reap(vm.pid, vm.start_time, vm.child.take()).await;
        let _ = self.store.ledger_remove("vmm", &process::ledger_key(vm.pid, vm.start_time));
        result
    }

    /// RESOURCE_EXHAUSTED, before anything is written, when a snapshot
    /// write of about `estimate` bytes would take the data dir's filesystem
    /// under --min-free-mib or the store over --max-snapshot-bytes.
    pub(crate) fn admit_snapshot_write(&self, what: &str, estimate: u64) -> Result<()> {
        let root = self.layout.root();
        self.admission.admit_disk(what, root, estimate, || {
            layout::disk_usage(&self.layout.snapshots_dir()) + layout::disk_usage(&self.layout.staging_dir())
        })?;
        Ok(())
    }

    pub fn get_snapshot(&self, tag: &Tag) -> Result<SnapshotRecord> {
        self.store
            .get_snapshot(tag.as_str())?
            .ok_or_else(|| Error::NotFound(format!("snapshot {:?} not found", tag.as_str())))
    }

    pub async fn snapshot_view(&self, tag: &Tag) -> Result<SnapshotView> {
        self.view_of(self.get_snapshot(tag)?).await
    }

    /// A record with its chain, dependents and live children.
    pub async fn view_of(&self, record: SnapshotRecord) -> Result<SnapshotView> {
        let mut ancestors = vec![];
        let mut cur = record.parent_tag.as_ref().map(|t| t.to_string());
        while let Some(p) = cur {
            if ancestors.contains(&p) || ancestors.len() > 1024 {
                break;
            }
            ancestors.push(p.clone());
            cur = self.store.get_snapshot(&p)?.and_then(|r| r.parent_tag.map(|t| t.to_string()));
        }
        ancestors.reverse();
        let dependents = self.store.snapshot_children(record.tag.as_str())?;
        let live_sandboxes = self.sandboxes_of(record.tag.as_str()).await.len() as u32;
        let ready = |r: &SnapshotRecord| r.status == SnapshotStatus::Ready;
        let bootable =
            ready(&record) && ancestors.iter().all(|a| matches!(self.store.get_snapshot(a), Ok(Some(r)) if ready(&r)));
        let dir = self.layout.snapshot_dir(&record.tag);
        let size = |name: &str| std::fs::metadata(dir.join(name)).map(|m| m.len()).unwrap_or(0);
        let files = SnapshotFiles { vmstate_bytes: size("state"), dir: dir.display().to_string() };
        Ok(SnapshotView { record, ancestors, dependents, live_sandboxes, files, bootable })
    }

    pub async fn list_snapshot_views(&self) -> Result<Vec<SnapshotView>> {
        let mut out = vec![];
        for rec in self.store.list_snapshots()? {
            out.push(self.view_of(rec).await?);
        }
        Ok(out)
    }

    /// Deletes a snapshot; returns (deleted tags, orphaned tags).
    pub async fn delete_snapshot(&self, tag: &Tag, cascade: bool, force: bool) -> Result<(Vec<String>, Vec<String>)> {
        if cascade && force {
            return Err(Error::InvalidArgument(
                "invalid cascade/force: choose one of cascade (delete dependents) and force (orphan them)".into(),
            ));
        }
        let rec = self.get_snapshot(tag)?;
        if rec.status == SnapshotStatus::Writing {
            return Err(Error::FailedPrecondition(format!("snapshot {:?} is still being written", rec.tag)));
        }
        let _busy = self
            .busy_tags
            .take(rec.tag.as_str())
            .ok_or_else(|| Error::FailedPrecondition(format!("snapshot {:?} is being deleted", rec.tag)))?;
        self.delete_snapshot_locked(&rec, cascade, force).await
    }

    async fn delete_snapshot_locked(
        &self,
        rec: &SnapshotRecord,
        cascade: bool,
        force: bool,
    ) -> Result<(Vec<String>, Vec<String>)> {
        // The subtree in post-order (children before parents).
        let mut order = vec![];
        let mut stack = vec![(rec.tag.to_string(), false)];
        while let Some((t, expanded)) = stack.pop() {
            if expanded {
                order.push(t);
                continue;
            }
            stack.push((t.clone(), true));
            for c in self.store.snapshot_children(&t)? {
                stack.push((c, false));
            }
        }
        let dependents = self.store.snapshot_children(rec.tag.as_str())?;
        if !dependents.is_empty() && !cascade && !force {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {:?} has dependents: {}; pass cascade=true to delete them or force=true to orphan them",
                rec.tag,
                dependents.join(", ")
            )));
        }
        let doomed: Vec<String> = if cascade { order } else { vec![rec.tag.to_string()] };
        if !force {
            for t in &doomed {
                let users = self.sandboxes_of(t).await;
                if !users.is_empty() {
                    return Err(Error::FailedPrecondition(format!(
                        "snapshot {t:?} is used by {} live sandbox(es): {}; kill them first or pass force=true",
                        users.len(),
                        users.join(", ")
                    )));
                }
            }
        }
        let mut orphaned = vec![];
        if !cascade {
            for d in dependents {
                if let Some(mut child) = self.store.get_snapshot(&d)? {
                    child.status = SnapshotStatus::Failed;
                    child.status_reason = format!("parent snapshot {:?} was deleted", rec.tag);
                    self.store.update_snapshot(&child)?;
                    orphaned.push(d);
                }
            }
        }
        for t in &doomed {
            let tag = Tag::parse(t)?;
            self.drain_pool(t).await;
            if let Some(mut r) = self.store.get_snapshot(t)? {
                r.status = SnapshotStatus::Deleting;
                self.store.update_snapshot(&r)?;
            }
            self.layout
                .remove_dir(&self.layout.snapshot_dir(&tag))
                .map_err(|e| Error::internal("remove snapshot files", e))?;
            self.store.delete_snapshot(t)?;
        }
        Ok((doomed, orphaned))
    }
}

/// Writes the VM configuration next to the snapshot's files, so tools on the
/// host (benchmarks, export) can restore it without the daemon's store.
pub fn write_vm_json(dir: &std::path::Path, spec: &VmSpec) -> Result<()> {
    let text = serde_json::to_vec_pretty(spec).map_err(|e| Error::internal("encode vm.json", e))?;
    std::fs::write(dir.join("vm.json"), text).map_err(|e| Error::internal("write vm.json", e))
}
