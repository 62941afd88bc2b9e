//! The runtime ties the store, the VMM backend, the guest assets and the live
//! sandboxes together. The API layer holds one `Arc<Runtime>`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::RwLock;

use super::events::Events;
use super::sandboxes::Sandbox;
use super::store::Store;
use super::{Error, Result};
use crate::memory::Layout;
use crate::vmm::Backend;
use crate::vmm::accel::AccelDecision;

/// The guest kernel, initramfs and images produced by scripts/build-guest.sh.
#[derive(Debug, Clone)]
pub struct GuestAssets {
    pub dir: PathBuf,
}

/// How a named image is run.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInfo {
    pub path: PathBuf,
    pub runtime: String,
    pub warm: String,
    /// What a snapshot records as its image: the built-in name, or the
    /// store image's digest (stable when names move).
    pub record_name: String,
}

impl GuestAssets {
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initramfs.img")
    }

    /// Resolves `image` to a file of the daemon's image store and the
    /// runtime it carries. Only store names are accepted: a request never
    /// names a host path.
    pub fn image(&self, image: &str) -> Result<ImageInfo> {
        if image.is_empty() {
            return Err(Error::invalid("image", "must not be empty (use \"python\" or \"minimal\")"));
        }
        if image.starts_with('/') {
            return Err(Error::invalid(
                "image",
                format!("{image:?}: images are named from the image store (see `forkd image ls`), never by host path"),
            ));
        }
        let (runtime, warm) = match image {
            "python" => ("python", "numpy"),
            "minimal" => ("none", ""),
            _ => {
                return Err(Error::NotFound(format!(
                    "image {image:?} is not in the image store (built in: \"python\", \"minimal\"; see `forkd image ls`)"
                )));
            }
        };
        let path = self.dir.join("images").join(format!("{image}.ext4"));
        if !path.is_file() {
            return Err(Error::FailedPrecondition(format!(
                "image {image:?} is not built: {} is missing (run scripts/build-guest.sh)",
                path.display()
            )));
        }
        Ok(ImageInfo { path, runtime: runtime.into(), warm: warm.into(), record_name: image.to_string() })
    }

    pub fn check(&self) -> Result<()> {
        for f in [self.kernel(), self.initrd()] {
            if !f.is_file() {
                return Err(Error::FailedPrecondition(format!(
                    "guest asset {} is missing (run scripts/build-guest.sh)",
                    f.display()
                )));
            }
        }
        Ok(())
    }
}

/// Tunables of the runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Daemon-wide admission: VMM starts at once, live sandboxes, host
    /// memory and disk floors, default memory limit.
    pub admission: crate::host::admission::AdmissionConfig,
    /// The operator's egress deny-list for network "nat" (on top of the
    /// built-in entries and the host's own addresses, see core::network).
    pub egress_deny: Vec<crate::host::net::AllowRule>,
    /// Host TSC frequency passed to the guest kernel (kHz).
    pub tsc_khz: u64,
    /// Branches allowed in flight at once (more → RESOURCE_EXHAUSTED).
    pub branch_concurrency: usize,
    /// Spare volume slots baked into every new snapshot, so its children
    /// can be given volumes of their own.
    pub volume_slots: usize,
    /// Volume files come only from under this directory.
    pub volume_root: crate::host::paths::Root,
    /// Whether VMMs are confined (reported by GetVersion and doctor).
    pub vmm_jail: bool,
    /// Largest `max_output_bytes` a unary exec may ask for.
    pub max_exec_output_bytes: u64,
    /// Where snapshots are pushed to and pulled from (`--remote`).
    pub remote: Option<Arc<crate::remote::Remote>>,
    /// Whether a fork of a tag that is not here pulls it from the remote.
    pub pull_missing: bool,
    /// Pooled children wait paused (no CPU; a slower take) rather than
    /// running idle (see core::pool).
    pub pool_paused: bool,
}

pub struct Runtime {
    pub layout: Layout,
    pub store: Store,
    pub backend: Arc<dyn Backend>,
    pub accel: AccelDecision,
    pub guest: GuestAssets,
    pub config: RuntimeConfig,
    pub events: Events,
    pub(crate) sandboxes: RwLock<HashMap<String, Arc<Sandbox>>>,
    /// Snapshot tags with a deletion in progress.
    pub(crate) busy_tags: super::snapshots::busy::BusyTags,
    live_count_cache: std::sync::atomic::AtomicUsize,
    /// Branches allowed in flight at once.
    pub(crate) branch_slots: Arc<tokio::sync::Semaphore>,
    /// Admission control (host::admission), shared by every request.
    pub admission: crate::host::admission::Admission,
    /// Children being started, counted against their tenant's quota.
    pub(crate) tenant_quotas: super::tenants::TenantQuotas,
    /// Resources whose leases were dropped without a commit (core::leases).
    pub(crate) cleanup: Arc<super::leases::CleanupQueue>,
    /// VMMs started ahead of time, by snapshot.
    pub(crate) pools: super::pool::Pools,
    /// Read-write volume files → the sandbox or workspace holding them.
    pub(crate) volume_claims: super::volumes::claims::VolumeClaims,
    /// Network slots (host::net) in use.
    pub(crate) net_slots: super::network::slots::NetSlots,
    /// Serialises operations on one workspace.
    pub(crate) workspace_locks: super::workspaces::locks::WorkspaceLocks,
    /// Pulls in progress, so forks of one missing tag share a pull.
    pub(crate) pulls: super::snapshots::remote::PullFlights,
    /// The image store (built-in images live in the guest assets).
    pub images: Arc<crate::images::manage::Images>,
    /// Links that share a guest port without a token.
    pub port_shares: super::ports::Shares,
}

impl Runtime {
    /// An image by name or digest: a built-in one of the guest assets, or
    /// one of the image store.
    pub fn resolve_image(&self, image: &str) -> Result<ImageInfo> {
        if matches!(image, "python" | "minimal") || image.is_empty() || image.starts_with('/') {
            return self.guest.image(image);
        }
        // A name that could never be stored is a bad request, not a miss.
        if !image.starts_with("sha256:")
            && let Err(e) = crate::images::store::check_name(image)
        {
            return Err(Error::invalid("image", e));
        }
        let Some((rec, _)) = self.images.store.get(image) else {
            return self.guest.image(image);
        };
        let path = self.images.store.rootfs(&rec.digest);
        Ok(ImageInfo {
            path,
            runtime: if rec.runtime.is_empty() { "none".into() } else { rec.runtime.clone() },
            warm: String::new(),
            record_name: rec.digest,
        })
    }

    /// Snapshots whose image is `digest`.
    pub fn snapshots_using_image(&self, digest: &str) -> Vec<String> {
        self.store
            .list_snapshots()
            .map(|l| l.into_iter().filter(|s| s.image == digest).map(|s| s.tag.as_str().to_string()).collect())
            .unwrap_or_default()
    }

    pub async fn open(
        data_dir: PathBuf,
        guest: GuestAssets,
        backend: Arc<dyn Backend>,
        accel: AccelDecision,
        config: RuntimeConfig,
    ) -> Result<Arc<Self>> {
        let layout = Layout::new(data_dir);
        layout.create().map_err(|e| Error::internal(&format!("create data dir {}", layout.root().display()), e))?;
        let store = Store::open(&layout.db())?;
        let cache = std::env::var_os("FORKD_CACHE_DIR").map(PathBuf::from).unwrap_or_else(|| "/var/cache/forkd".into());
        let images = crate::images::manage::Images::new(layout.root(), cache, guest.dir.clone());
        let rt = Arc::new(Runtime {
            port_shares: Default::default(),
            images,
            layout,
            store,
            backend,
            accel,
            guest,
            events: Events::default(),
            sandboxes: RwLock::new(HashMap::new()),
            busy_tags: Default::default(),
            live_count_cache: Default::default(),
            workspace_locks: Default::default(),
            pulls: Default::default(),
            net_slots: Default::default(),
            volume_claims: Default::default(),
            pools: Default::default(),
            branch_slots: Arc::new(tokio::sync::Semaphore::new(config.branch_concurrency.max(1))),
            admission: crate::host::admission::Admission::new(config.admission.clone()),
            tenant_quotas: Default::default(),
            cleanup: Default::default(),
            config,
        });
        rt.recover().await?;
        rt.clone().start_lifecycle();
        rt.start_reconciler();
        Ok(rt)
    }

    /// Brings the store and the host back in agreement after a (re)start:
    /// snapshots caught mid-write are failed and their staging removed, live
    /// VMMs are adopted, dead ones reaped, unknown work dirs removed.
    async fn recover(self: &Arc<Self>) -> Result<()> {
        for mut snap in self.store.list_snapshots()? {
            if snap.status == super::store::SnapshotStatus::Writing {
                snap.status = super::store::SnapshotStatus::Failed;
                snap.status_reason = "the daemon stopped while the snapshot was being written".into();
                self.store.update_snapshot(&snap)?;
            }
        }
        if let Ok(rd) = std::fs::read_dir(self.layout.staging_dir()) {
            for e in rd.flatten() {
                let _ = self.layout.remove_dir(&e.path());
            }
        }
        if let Ok(rd) = std::fs::read_dir(self.layout.trash_dir()) {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        self.adopt_sandboxes().await?;
        self.reclaim_workspace_volumes()
    }

    pub fn snapshot_count(&self) -> usize {
        self.store.list_snapshots().map(|v| v.len()).unwrap_or(0)
    }

    pub async fn live_sandbox_count(&self) -> usize {
        self.sandboxes.read().await.len()
    }

    /// The live sandbox count without waiting (for metric callbacks, which
    /// cannot await): the last known value while the map is being changed.
    /// Host figures of at most `cap` sandboxes (by id), for labelled
    /// metrics; empty while the sandbox map is busy.
    pub fn sandbox_samples_now(&self, cap: usize) -> Vec<(String, super::sandboxes::metrics::HostSample)> {
        let Ok(m) = self.sandboxes.try_read() else { return vec![] };
        let mut ids: Vec<&String> = m.keys().collect();
        ids.sort();
        ids.into_iter().take(cap).filter_map(|id| Some((id.clone(), m.get(id)?.host_sample()))).collect()
    }

    pub fn live_sandbox_count_now(&self) -> usize {
        use std::sync::atomic::Ordering;
        match self.sandboxes.try_read() {
            Ok(m) => {
                self.live_count_cache.store(m.len(), Ordering::Relaxed);
                m.len()
            }
            Err(_) => self.live_count_cache.load(Ordering::Relaxed),
        }
    }
}
