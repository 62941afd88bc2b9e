//! Who is asking: principals, their roles and quotas, and what each may see.
//!
//! Every authenticated request carries a [`Principal`]. An `admin` sees and
//! drives everything; a `tenant` sees only the records it owns (and the
//! snapshots an admin marked shared, which it may fork from). A record a
//! principal may not see answers exactly as a record that does not exist,
//! so a tenant learns nothing about another's sandboxes, workspaces or
//! snapshots. Records carry their owner's name; records written before
//! owners existed carry "" and are visible to admins only.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Deserialize;

use super::{Error, Result};

/// A principal's name: `[a-z0-9][a-z0-9_-]{0,63}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrincipalName(String);

impl PrincipalName {
    pub fn parse(s: &str) -> Result<Self> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !ok {
            return Err(Error::invalid("principal name", format!("{s:?} must match [a-z0-9][a-z0-9_-]{{0,63}}")));
        }
        Ok(Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for PrincipalName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, every owner's records included.
    Admin,
    /// Its own records, and forks from shared snapshots.
    Tenant,
}

/// Limits on what one tenant may hold at once (absent = no limit beyond
/// the daemon's own admission checks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Live sandboxes (workspaces' included).
    pub max_sandboxes: Option<u32>,
    /// The sum of its live sandboxes' memory limits, in MiB.
    pub max_memory_mib: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: PrincipalName,
    pub role: Role,
    pub quota: Quota,
}

impl Principal {
    /// The principal of the daemon's own token (and of every request under
    /// `--no-auth`).
    pub fn admin() -> Self {
        Principal { name: PrincipalName("admin".into()), role: Role::Admin, quota: Quota::default() }
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// What new records of this principal carry as their owner.
    pub fn owner(&self) -> String {
        self.name.0.clone()
    }

    /// Whether it may see and change a record owned by `owner`.
    pub fn owns(&self, owner: &str) -> bool {
        self.is_admin() || owner == self.name.0
    }

    /// Whether it may see (and fork from) a snapshot.
    pub fn may_use_snapshot(&self, owner: &str, shared: bool) -> bool {
        shared || self.owns(owner)
    }
}

/// A sandbox one tenant holds, as the quota counts it.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    pub memory_limit_mib: u32,
}

/// What tenants have asked for and not yet been given: children being
/// started count against their quota until they are listed.
#[derive(Default)]
pub struct TenantQuotas {
    pending: Mutex<HashMap<String, (u64, u64)>>,
}

/// Children admitted against a tenant's quota; released when dropped (the
/// children are then listed, or were never started).
pub struct QuotaReservation<'a> {
    quotas: &'a TenantQuotas,
    owner: String,
    children: u64,
    memory_mib: u64,
}

impl Drop for QuotaReservation<'_> {
    fn drop(&mut self) {
        let mut p = self.quotas.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = p.get_mut(&self.owner) {
            e.0 = e.0.saturating_sub(self.children);
            e.1 = e.1.saturating_sub(self.memory_mib);
            if *e == (0, 0) {
                p.remove(&self.owner);
            }
        }
    }
}

impl TenantQuotas {
    /// Admits `n` children of `memory_limit_mib` each for `who`, who holds
    /// `held` live sandboxes now (counted by the caller under the live
    /// map's lock). Admins and tenants without a quota always pass.
    pub fn admit(
        &self,
        who: &Principal,
        held: &[Held],
        n: u32,
        memory_limit_mib: u32,
    ) -> Result<Option<QuotaReservation<'_>>> {
        let q = who.quota;
        if who.is_admin() || (q.max_sandboxes.is_none() && q.max_memory_mib.is_none()) {
            return Ok(None);
        }
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let (pending_children, pending_mib) = p.get(who.name.as_str()).copied().unwrap_or((0, 0));
        let live = held.len() as u64;
        if let Some(max) = q.max_sandboxes
            && live + pending_children + n as u64 > max as u64
        {
            return Err(Error::ResourceExhausted(format!(
                "tenant {} quota: {n} sandboxes asked, {live} live and {pending_children} starting, at most {max}",
                who.name
            )));
        }
        let asked_mib = n as u64 * memory_limit_mib as u64;
        if let Some(max) = q.max_memory_mib {
            let live_mib: u64 = held.iter().map(|h| h.memory_limit_mib as u64).sum();
            if memory_limit_mib == 0 {
                return Err(Error::ResourceExhausted(format!(
                    "tenant {} has a memory quota ({max} MiB): its sandboxes need a memory_limit_mib",
                    who.name
                )));
            }
            if live_mib + pending_mib + asked_mib > max {
                return Err(Error::ResourceExhausted(format!(
                    "tenant {} quota: {asked_mib} MiB asked ({n} × {memory_limit_mib}), {} MiB held, at most {max} MiB",
                    who.name,
                    live_mib + pending_mib
                )));
            }
        }
        let e = p.entry(who.owner()).or_default();
        e.0 += n as u64;
        e.1 += asked_mib;
        Ok(Some(QuotaReservation { quotas: self, owner: who.owner(), children: n as u64, memory_mib: asked_mib }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str, quota: Quota) -> Principal {
        Principal { name: PrincipalName::parse(name).unwrap(), role: Role::Tenant, quota }
    }

    #[test]
    fn names_are_validated() {
        for ok in ["a", "team-1", "x_y", "0abc"] {
            PrincipalName::parse(ok).unwrap();
        }
        for bad in ["", "-a", "A", "a b", "a/b", &"a".repeat(65)] {
            assert!(PrincipalName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tenants_see_their_own_and_shared_snapshots_only() {
        let a = tenant("a", Quota::default());
        assert!(a.owns("a") && !a.owns("b") && !a.owns(""));
        assert!(a.may_use_snapshot("b", true) && !a.may_use_snapshot("b", false));
        let admin = Principal::admin();
        assert!(admin.owns("b") && admin.owns(""));
    }

    #[test]
    fn quotas_count_live_and_starting_children() {
        let q = TenantQuotas::default();
        let a = tenant("a", Quota { max_sandboxes: Some(3), max_memory_mib: Some(1000) });
        let held = [Held { memory_limit_mib: 300 }];
        let r1 = q.admit(&a, &held, 1, 300).unwrap().unwrap();
        // One live, one starting: a third fits, a fourth does not.
        let e = q.admit(&a, &held, 2, 100).err().unwrap();
        assert!(matches!(e, Error::ResourceExhausted(m) if m.contains("at most 3")));
        // Memory: 600 held or starting, 500 more is over 1000.
        let e = q.admit(&a, &held, 1, 500).err().unwrap();
        assert!(matches!(e, Error::ResourceExhausted(m) if m.contains("1000 MiB")));
        drop(r1);
        assert!(q.admit(&a, &held, 2, 300).unwrap().is_some());
        // Others and admins are not counted against a.
        let b = tenant("b", Quota { max_sandboxes: Some(1), max_memory_mib: None });
        assert!(q.admit(&b, &[], 1, 0).unwrap().is_some());
        assert!(q.admit(&Principal::admin(), &[], 100, 0).unwrap().is_none());
    }
}
