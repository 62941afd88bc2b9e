//! Admission control: work the host cannot take is refused up front, with
//! RESOURCE_EXHAUSTED and the numbers behind the refusal, before a VMM is
//! started, a directory created or a row written — a refused request
//! changes nothing.
//!
//! What is admitted, daemon-wide (across requests, not per request):
//!
//! - **VMM starts**: one semaphore of `--spawn-concurrency` permits that
//!   every spawn and every pool start takes, so many small concurrent forks
//!   start no more VMMs at once than one big fork.
//! - **Live sandboxes**: at most `--max-sandboxes` running or starting
//!   sandboxes; children admitted but not yet listed count as well.
//! - **Host memory**: a fork of `n` children needs `n × cost`, where a
//!   child's cost is its memory limit, or guest RAM + [`VMM_OVERHEAD_MIB`]
//!   when it has none; it must fit in the memory the host has available
//!   now (`sysinfo`), less what children admitted but still starting were
//!   promised. Sandboxes get a memory limit by default
//!   (`--default-memory-limit-mib`, guest RAM + overhead unless set), so
//!   the cost is what the cgroup lets a child take.
//! - **Disk**: a snapshot, branch, compact or derive must leave
//!   `--min-free-mib` free on the data dir's filesystem after its estimated
//!   size, and keep the snapshot store within `--max-snapshot-bytes` when
//!   one is set.

use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What a VMM process costs on top of its guest RAM (QEMU's own heap,
/// device emulation, TCG's translation cache), used when a child has no
/// memory limit and as the headroom of the default limit.
pub const VMM_OVERHEAD_MIB: u64 = 64;

const MIB: u64 = 1 << 20;

/// A refusal: the host cannot take the work now (RESOURCE_EXHAUSTED).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    /// Which check refused (a [`REASONS`] entry), for the metrics.
    pub reason: &'static str,
    pub message: String,
}

/// What a refusal can be for, as `forkd_admission_refused_total{reason}`.
pub const REASONS: [&str; 4] = ["max_sandboxes", "memory", "disk_free", "snapshot_quota"];

fn refused(reason: &'static str, message: String) -> Refused {
    Refused { reason, message }
}

/// The operator's admission settings.
#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    /// VMM starts in flight at once, daemon-wide.
    pub spawn_concurrency: usize,
    /// Running or starting sandboxes at once, daemon-wide.
    pub max_sandboxes: usize,
    /// Memory limit given to sandboxes that ask for none: `None` = the
    /// snapshot's guest RAM + VMM_OVERHEAD_MIB, `Some(0)` = unlimited.
    pub default_memory_limit_mib: Option<u32>,
    /// Free space the data dir's filesystem keeps after a snapshot write.
    pub min_free_mib: u64,
    /// Most bytes the snapshot store (snapshots and staging) may hold.
    pub max_snapshot_bytes: Option<u64>,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            spawn_concurrency: 8,
            max_sandboxes: 256,
            default_memory_limit_mib: None,
            min_free_mib: 1024,
            max_snapshot_bytes: None,
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Pending {
    children: usize,
    memory_bytes: u64,
}

/// Daemon-wide admission state.
pub struct Admission {
    cfg: AdmissionConfig,
    spawn: Arc<Semaphore>,
    pending: Mutex<Pending>,
    /// Whether a default memory limit can be enforced (a memory cgroup
    /// controller exists); without one the default is "unlimited".
    memory_limits_work: bool,
    /// None where sysinfo cannot read the host's memory: no memory check.
    system: Mutex<Option<sysinfo::System>>,
    /// Refusals so far, by REASONS index.
    refusals: [std::sync::atomic::AtomicU64; 4],
}

/// Children admitted by one fork whose spawns have not finished yet; their
/// count and memory are released when it is dropped. Drop it while the
/// children are inserted in the live map (under its write lock), so that
/// the live count and the pending count never both miss or both hold them.
pub struct Reservation<'a> {
    adm: &'a Admission,
    taken: Pending,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut p = self.adm.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.children -= self.taken.children;
        p.memory_bytes -= self.taken.memory_bytes;
    }
}

/// What one child costs, in bytes: its memory limit, or guest RAM + the
/// VMM overhead when it has none.
pub fn child_cost_bytes(memory_limit_mib: u32, guest_mib: u32) -> u64 {
    if memory_limit_mib > 0 { memory_limit_mib as u64 * MIB } else { (guest_mib as u64 + VMM_OVERHEAD_MIB) * MIB }
}

fn mib(bytes: u64) -> u64 {
    bytes / MIB
}

/// The fork check on given numbers: `live` sandboxes running, `pending`
/// admitted and starting, `n` more asked for at `cost_each` bytes, with
/// `available` bytes of host memory.
pub fn check_children(
    max_sandboxes: usize,
    live: usize,
    pending: (usize, u64),
    n: usize,
    cost_each: u64,
    available: u64,
) -> Result<(), Refused> {
    let (pending_children, pending_bytes) = pending;
    if live + pending_children + n > max_sandboxes {
        return Err(refused(
            "max_sandboxes",
            format!(
                "too many sandboxes: {n} asked, {live} live and {pending_children} starting, at most {max_sandboxes} \
             (--max-sandboxes)"
            ),
        ));
    }
    let needed = cost_each.saturating_mul(n as u64);
    let free = available.saturating_sub(pending_bytes);
    if needed > free {
        return Err(refused(
            "memory",
            format!(
                "not enough host memory: {n} children need {} MiB ({n} × {} MiB, each child's memory_limit_mib, or guest \
             RAM + {VMM_OVERHEAD_MIB} MiB without one), {} MiB is available{}",
                mib(needed),
                mib(cost_each),
                mib(free),
                if pending_bytes > 0 {
                    format!(" ({} MiB of it is promised to sandboxes being started)", mib(pending_bytes))
                } else {
                    String::new()
                }
            ),
        ));
    }
    Ok(())
}

/// The disk check on given numbers: `free` bytes on the filesystem,
/// `floor_mib` to keep free, `used` bytes in the snapshot store against an
/// optional `quota`, and the `estimate` of what `what` writes.
pub fn check_disk(
    what: &str,
    free: u64,
    floor_mib: u64,
    used: u64,
    quota: Option<u64>,
    estimate: u64,
) -> Result<(), Refused> {
    let floor = floor_mib.saturating_mul(MIB);
    if free < floor.saturating_add(estimate) {
        return Err(refused(
            "disk_free",
            format!(
                "not enough disk space for {what}: {} MiB free, {} MiB estimated for it, and {floor_mib} MiB must stay \
             free (--min-free-mib)",
                mib(free),
                mib(estimate).max(1),
            ),
        ));
    }
    if let Some(q) = quota
        && used.saturating_add(estimate) > q
    {
        return Err(refused(
            "snapshot_quota",
            format!(
                "snapshot store quota exceeded by {what}: {used} bytes used + about {estimate} bytes estimated for it > \
             {q} bytes (--max-snapshot-bytes)"
            ),
        ));
    }
    Ok(())
}

/// Bytes available to unprivileged writers on the filesystem of `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok((s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
}

impl Admission {
    pub fn new(cfg: AdmissionConfig) -> Self {
        let memory_limits_work = super::cgroup::Cgroups::host().is_some_and(|cg| cg.controllers().contains(&"memory"));
        if !memory_limits_work && cfg.default_memory_limit_mib != Some(0) {
            tracing::warn!("no memory cgroup controller: sandboxes get no default memory limit");
        }
        Admission {
            spawn: Arc::new(Semaphore::new(cfg.spawn_concurrency.max(1))),
            pending: Mutex::new(Pending::default()),
            memory_limits_work,
            system: Mutex::new(
                sysinfo::System::new()
                    .inspect_err(|e| {
                        tracing::warn!("host memory cannot be read, forks are not checked against it: {e}")
                    })
                    .ok(),
            ),
            refusals: Default::default(),
            cfg,
        }
    }

    fn count<T>(&self, r: Result<T, Refused>) -> Result<T, Refused> {
        if let Err(e) = &r
            && let Some(i) = REASONS.iter().position(|k| *k == e.reason)
        {
            self.refusals[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    /// Refusals so far, by reason (every reason listed, zeros included).
    pub fn refusals(&self) -> Vec<(&'static str, u64)> {
        REASONS.iter().zip(&self.refusals).map(|(r, n)| (*r, n.load(std::sync::atomic::Ordering::Relaxed))).collect()
    }

    pub fn config(&self) -> &AdmissionConfig {
        &self.cfg
    }

    /// Waits for one of the daemon-wide VMM start permits.
    pub async fn spawn_permit(&self) -> OwnedSemaphorePermit {
        self.spawn.clone().acquire_owned().await.expect("the spawn semaphore is never closed")
    }

    /// The memory limit (MiB) of a sandbox of a `guest_mib` snapshot that
    /// asked for none; 0 = unlimited.
    pub fn default_memory_limit_mib(&self, guest_mib: u32) -> u32 {
        if !self.memory_limits_work {
            return 0;
        }
        match self.cfg.default_memory_limit_mib {
            Some(m) => m,
            None => (guest_mib as u64 + VMM_OVERHEAD_MIB).min(u32::MAX as u64) as u32,
        }
    }

    /// Host memory available now, in bytes (u64::MAX when unknown).
    pub fn available_memory(&self) -> u64 {
        let mut sys = self.system.lock().unwrap_or_else(|e| e.into_inner());
        match sys.as_mut() {
            Some(sys) => {
                sys.refresh_memory_specifics(sysinfo::MemoryRefreshKind::nothing().with_ram());
                sys.available_memory()
            }
            None => u64::MAX,
        }
    }

    /// Admits `n` children costing `cost_each` bytes each while `live`
    /// sandboxes run (counted by the caller under the live map's lock).
    pub fn admit_children(&self, live: usize, n: usize, cost_each: u64) -> Result<Reservation<'_>, Refused> {
        let available = self.available_memory();
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        self.count(check_children(
            self.cfg.max_sandboxes,
            live,
            (p.children, p.memory_bytes),
            n,
            cost_each,
            available,
        ))?;
        let taken = Pending { children: n, memory_bytes: cost_each.saturating_mul(n as u64) };
        p.children += taken.children;
        p.memory_bytes += taken.memory_bytes;
        Ok(Reservation { adm: self, taken })
    }

    /// Admits a snapshot write of about `estimate` bytes under `data_dir`,
    /// whose snapshot store takes `store_usage()` bytes (only asked when a
    /// quota is set: it walks the store).
    pub fn admit_disk(
        &self,
        what: &str,
        data_dir: &Path,
        estimate: u64,
        store_usage: impl FnOnce() -> u64,
    ) -> Result<(), Refused> {
        let free = free_bytes(data_dir)
            .map_err(|e| refused("disk_free", format!("cannot tell the free space of {}: {e}", data_dir.display())));
        let free = self.count(free)?;
        let used = if self.cfg.max_snapshot_bytes.is_some() { store_usage() } else { 0 };
        self.count(check_disk(what, free, self.cfg.min_free_mib, used, self.cfg.max_snapshot_bytes, estimate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn a_child_costs_its_limit_or_ram_plus_overhead() {
        assert_eq!(child_cost_bytes(160, 256), 160 * MIB);
        assert_eq!(child_cost_bytes(0, 256), 320 * MIB);
    }

    #[test]
    fn max_sandboxes_counts_live_and_starting() {
        assert!(check_children(4, 2, (1, 0), 1, MIB, GIB).is_ok());
        let e = check_children(4, 2, (1, 0), 2, MIB, GIB).unwrap_err().message;
        assert!(e.contains("2 asked, 2 live and 1 starting, at most 4"), "{e}");
        assert!(e.contains("--max-sandboxes"), "{e}");
    }

    #[test]
    fn memory_refusal_says_needed_and_available() {
        let each = child_cost_bytes(0, 256);
        assert!(check_children(100, 0, (0, 0), 3, each, GIB).is_ok());
        let e = check_children(100, 0, (0, 0), 4, each, GIB).unwrap_err().message;
        assert!(e.contains("4 children need 1280 MiB (4 × 320 MiB"), "{e}");
        assert!(e.contains("1024 MiB is available"), "{e}");
        // Memory promised to children still starting is not available.
        let e = check_children(100, 0, (2, 640 * MIB), 2, each, GIB).unwrap_err().message;
        assert!(e.contains("384 MiB is available (640 MiB of it is promised"), "{e}");
    }

    #[test]
    fn disk_refusal_says_free_floor_used_and_quota() {
        assert!(check_disk("x", 10 * GIB, 1024, 0, None, GIB).is_ok());
        let e = check_disk("snapshot \"a\"", 2 * GIB, 1024, 0, None, 1536 * MIB).unwrap_err().message;
        assert!(e.contains("2048 MiB free, 1536 MiB estimated"), "{e}");
        assert!(e.contains("1024 MiB must stay free (--min-free-mib)"), "{e}");
        let e = check_disk("x", 100 * GIB, 0, 900, Some(1000), 200).unwrap_err().message;
        assert!(e.contains("900 bytes used + about 200 bytes estimated for it > 1000 bytes"), "{e}");
        assert!(check_disk("x", 100 * GIB, 0, 800, Some(1000), 200).is_ok());
    }

    #[tokio::test]
    async fn reservations_are_released_and_starts_are_bounded() {
        let adm = Admission::new(AdmissionConfig { spawn_concurrency: 2, max_sandboxes: 3, ..Default::default() });
        let r = adm.admit_children(0, 2, 1).unwrap();
        assert!(adm.admit_children(0, 2, 1).is_err(), "2 starting + 2 > 3");
        drop(r);
        let _r = adm.admit_children(0, 3, 1).unwrap();
        assert!(adm.refusals().contains(&("max_sandboxes", 1)), "{:?}", adm.refusals());
        // The spawn semaphore is shared by everyone holding the Admission.
        let a = adm.spawn_permit().await;
        let _b = adm.spawn_permit().await;
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), adm.spawn_permit()).await.is_err());
        drop(a);
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), adm.spawn_permit()).await.is_ok());
    }

    #[test]
    fn free_space_is_read() {
        assert!(free_bytes(Path::new("/")).unwrap() > 0);
    }
}
