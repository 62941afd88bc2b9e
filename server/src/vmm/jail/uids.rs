//! The pool of unprivileged uids that VMM processes run as: one uid per live
//! VMM, so a compromised QEMU cannot signal, trace or read the files of any
//! other VM. A uid is leased before its process starts, bound to the
//! process once it exists, and free again when that process is gone (found
//! lazily on the next lease, so no kill path has to remember to return it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::vmm::process;

/// A range of uids reserved for VMMs, and the group they all run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub base: u32,
    pub count: u32,
    pub gid: u32,
}

impl UidRange {
    pub fn contains(&self, uid: u32) -> bool {
        uid >= self.base && uid - self.base < self.count
    }
}

#[derive(Debug, thiserror::Error)]
#[error("all {0} VMM uids are in use (raise --vmm-uid-count)")]
pub struct Exhausted(pub u32);

/// Who holds a uid: a process not started yet, or a live process.
#[derive(Debug, Clone, Copy)]
enum Holder {
    Starting,
    Process { pid: u32, start_time: u64 },
}

#[derive(Debug)]
pub struct Uids {
    range: UidRange,
    held: Mutex<HashMap<u32, Holder>>,
}

impl Uids {
    pub fn new(range: UidRange) -> Arc<Self> {
        Arc::new(Self { range, held: Mutex::new(HashMap::new()) })
    }

    pub fn range(&self) -> UidRange {
        self.range
    }

    /// Takes a free uid. Uids whose process has exited are reclaimed first.
    pub fn lease(self: &Arc<Self>) -> Result<UidLease, Exhausted> {
        let mut held = self.held.lock().unwrap();
        held.retain(|_, h| match *h {
            Holder::Starting => true,
            Holder::Process { pid, start_time } => process::is_alive(pid, start_time),
        });
        // Start after the highest uid in use: a uid just freed is not
        // handed straight to the next VM (its files may still be going).
        let first = held.keys().max().map(|u| u + 1 - self.range.base).unwrap_or(0);
        for i in 0..self.range.count {
            let uid = self.range.base + (first + i) % self.range.count;
            if let std::collections::hash_map::Entry::Vacant(e) = held.entry(uid) {
                e.insert(Holder::Starting);
                return Ok(UidLease { uid, gid: self.range.gid, uids: self.clone(), bound: false });
            }
        }
        Err(Exhausted(self.range.count))
    }

    /// Marks `uid` as held by a VMM started by an earlier daemon.
    pub fn adopt(&self, uid: u32, pid: u32, start_time: u64) {
        if self.range.contains(uid) {
            self.held.lock().unwrap().insert(uid, Holder::Process { pid, start_time });
        }
    }

    pub fn in_use(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

/// A uid reserved for a VMM about to start. Dropped without `bind`, the uid
/// is free again.
#[derive(Debug)]
pub struct UidLease {
    pub uid: u32,
    pub gid: u32,
    uids: Arc<Uids>,
    bound: bool,
}

impl UidLease {
    /// The process now runs as this uid; it stays held while it lives.
    pub fn bind(mut self, pid: u32, start_time: u64) {
        self.uids.held.lock().unwrap().insert(self.uid, Holder::Process { pid, start_time });
        self.bound = true;
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        if !self.bound {
            self.uids.held.lock().unwrap().remove(&self.uid);
        }
    }
}

/// The real uid of a process (from /proc/PID/status).
pub fn uid_of(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_distinct_and_returned_when_dropped() {
        let uids = Uids::new(UidRange { base: 1000, count: 2, gid: 1000 });
        let a = uids.lease().unwrap();
        let b = uids.lease().unwrap();
        assert_ne!(a.uid, b.uid);
        assert!(uids.lease().is_err(), "only two uids");
        drop(a);
        let c = uids.lease().unwrap();
        assert!(uids.range().contains(c.uid));
    }

    #[test]
    fn a_bound_uid_is_freed_when_its_process_is_gone() {
        let uids = Uids::new(UidRange { base: 5000, count: 1, gid: 5000 });
        let me = std::process::id();
        let st = process::start_time(me).unwrap();
        uids.lease().unwrap().bind(me, st);
        assert!(uids.lease().is_err(), "held by a live process");
        uids.adopt(5000, me, st + 1); // a process that no longer exists
        assert!(uids.lease().is_ok());
    }
}
