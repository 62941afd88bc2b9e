//! Network slots: each `nat` sandbox gets one (its addresses and link names
//! derive from it); a slot is free again once its network is torn down.

use std::collections::BTreeSet;
use std::sync::Mutex;

use crate::core::{Error, Result};
use crate::host::net;

#[derive(Default)]
pub struct NetSlots {
    used: Mutex<BTreeSet<u32>>,
}

impl NetSlots {
    /// The lowest free slot, now taken.
    pub fn take(&self) -> Result<u32> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let slot = (0..net::MAX_SLOTS)
            .find(|s| !used.contains(s))
            .ok_or_else(|| Error::ResourceExhausted("no free network slot".into()))?;
        used.insert(slot);
        Ok(slot)
    }

    pub fn free(&self, slot: u32) {
        self.used.lock().unwrap_or_else(|p| p.into_inner()).remove(&slot);
    }

    /// Marks a slot taken by a sandbox adopted after a restart.
    pub fn mark(&self, slot: u32) {
        self.used.lock().unwrap_or_else(|p| p.into_inner()).insert(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_lowest_first() {
        let s = NetSlots::default();
        s.mark(0);
        assert_eq!(s.take().unwrap(), 1);
        assert_eq!(s.take().unwrap(), 2);
        s.free(1);
        assert_eq!(s.take().unwrap(), 1);
    }
}
