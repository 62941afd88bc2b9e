//! Leases on host resources. A resource an operation creates (a work dir,
//! a network namespace, a VMM process, the sandbox's store row) is held as
//! a [`Lease`] from the moment it exists: its ledger row was written before
//! it was created, and until the operation succeeds and *commits* the lease
//! — its record now owns the resource — dropping the lease on any path (an
//! error, a panic, a future dropped half-way) queues the resource for
//! release. The runtime drains the queue right after a failed operation and
//! on every reconciler pass, so no hand-written rollback is needed and
//! nothing is left behind.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::runtime::Runtime;
use crate::host::net::SandboxNet;
use crate::vmm::process;

/// A resource that may need releasing.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    /// A VMM process (pid and start time; ledger kind `vmm`).
    Vmm { pid: u32, start: u64 },
    /// The sandbox's row in the store.
    SandboxRow(String),
    /// A sandbox's network namespace, links and slot (ledger kind `netns`).
    Net(SandboxNet),
    /// A VM work dir (ledger kind `workdir`).
    WorkDir(PathBuf),
    /// A snapshot's row while it is being written.
    SnapshotRow(String),
    /// A snapshot being written (ledger kind `staging`).
    Staging(PathBuf),
}

impl Resource {
    /// Release order: the process first (it holds the others), its record,
    /// then what it used.
    fn rank(&self) -> u8 {
        match self {
            Resource::Vmm { .. } => 0,
            Resource::SandboxRow(_) => 1,
            Resource::Net(_) => 2,
            Resource::WorkDir(_) => 3,
            Resource::SnapshotRow(_) => 4,
            Resource::Staging(_) => 5,
        }
    }
}

/// Resources whose leases were dropped without a commit.
#[derive(Default)]
pub struct CleanupQueue {
    dropped: Mutex<Vec<Resource>>,
}

impl CleanupQueue {
    fn push(&self, r: Resource) {
        self.dropped.lock().unwrap_or_else(|p| p.into_inner()).push(r);
    }

    fn take(&self) -> Vec<Resource> {
        let mut v = std::mem::take(&mut *self.dropped.lock().unwrap_or_else(|p| p.into_inner()));
        v.sort_by_key(Resource::rank);
        v
    }

    pub fn len(&self) -> usize {
        self.dropped.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One held resource: released unless committed.
#[must_use = "a lease dropped at once releases its resource"]
pub struct Lease {
    queue: Arc<CleanupQueue>,
    resource: Option<Resource>,
}

impl Lease {
    pub fn new(queue: &Arc<CleanupQueue>, resource: Resource) -> Self {
        Lease { queue: queue.clone(), resource: Some(resource) }
    }

    /// The operation succeeded: its record owns the resource now.
    pub fn commit(mut self) {
        self.resource = None;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(r) = self.resource.take() {
            tracing::debug!(resource = ?r, "lease dropped without commit; queued for release");
            self.queue.push(r);
        }
    }
}

impl Runtime {
    /// A lease on `resource`, released unless committed.
    pub(crate) fn lease(&self, resource: Resource) -> Lease {
        Lease::new(&self.cleanup, resource)
    }

    /// Releases every resource whose lease was dropped without a commit.
    pub(crate) async fn release_dropped(&self) -> usize {
        let queued = self.cleanup.take();
        let n = queued.len();
        for r in queued {
            match r {
                Resource::Vmm { pid, start } => {
                    process::kill(pid, start, Duration::from_secs(5)).await;
                    let _ = self.store.ledger_remove("vmm", &process::ledger_key(pid, start));
                }
                Resource::SandboxRow(id) => {
                    let _ = self.store.delete_sandbox(&id);
                }
                Resource::Net(n) => self.net_teardown(&n).await,
                Resource::WorkDir(dir) => self.remove_workdir(&crate::vmm::VmDir(dir)),
                Resource::SnapshotRow(tag) => {
                    // Only a record still being written: never a finished one.
                    if let Ok(Some(r)) = self.store.get_snapshot(&tag)
                        && r.status == super::store::SnapshotStatus::Writing
                    {
                        let _ = self.store.delete_snapshot(&tag);
                    }
                }
                Resource::Staging(dir) => {
                    if self.layout.remove_dir(&dir).is_ok() {
                        let _ = self.store.ledger_remove("staging", &dir.display().to_string());
                    }
                }
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_leases_are_queued_in_release_order_and_committed_ones_are_not() {
        let q = Arc::new(CleanupQueue::default());
        {
            let _dir = Lease::new(&q, Resource::WorkDir("/x".into()));
            let _row = Lease::new(&q, Resource::SandboxRow("sb-1".into()));
            let kept = Lease::new(&q, Resource::WorkDir("/kept".into()));
            let _vmm = Lease::new(&q, Resource::Vmm { pid: 7, start: 1 });
            kept.commit();
        }
        assert_eq!(
            q.take(),
            vec![
                Resource::Vmm { pid: 7, start: 1 },
                Resource::SandboxRow("sb-1".into()),
                Resource::WorkDir("/x".into())
            ]
        );
        assert!(q.is_empty());
    }

    #[test]
    fn a_panic_releases_too() {
        let q = Arc::new(CleanupQueue::default());
        let q2 = q.clone();
        let r = std::panic::catch_unwind(move || {
            let _l = Lease::new(&q2, Resource::WorkDir("/p".into()));
            panic!("mid-operation");
        });
        assert!(r.is_err());
        assert_eq!(q.len(), 1);
    }
}
