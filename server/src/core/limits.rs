//! Per-sandbox resource limits: validation, the life of each sandbox's
//! cgroup (ledgered before it is created, forgotten only after it is gone),
//! and the terminal reason of a VMM that died on its own (the out-of-memory
//! killer shows up as "oom: …").
//!
//! `memory_limit_mib` bounds the whole VMM process — the guest RAM the guest
//! has written (copy-on-write pages) plus QEMU's own memory — not the guest's
//! view of its RAM, which stays the snapshot's size. `cpu_quota` is in CPUs
//! (0.5 = half of one CPU per 100 ms period). `pids_limit` is enforced inside
//! the guest (the agent runs every exec'd process in a guest cgroup with that
//! pids.max); the host cgroup caps the VMM's own threads at the same number
//! plus headroom for QEMU's worker threads.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use forkd_api::names::SandboxId;

use super::runtime::Runtime;
use super::sandboxes::Sandbox;
use super::store::{SandboxRecord, SandboxSettings};
use super::{Error, Result};
use crate::host::cgroup::{self, Cgroups};

pub const MIN_MEMORY_MIB: u32 = 64;
pub const MAX_MEMORY_MIB: u32 = 1 << 20;
pub const MIN_CPU_QUOTA: f64 = 0.01;
pub const MAX_CPU_QUOTA: f64 = 64.0;
pub const MIN_PIDS: u32 = 8;
pub const MAX_PIDS: u32 = 4_194_304;
/// Threads the VMM may start on top of the guest's pids limit.
pub const VMM_THREAD_HEADROOM: u32 = 256;
/// How long removal waits for the last process of a cgroup to leave it.
const RMDIR_WAIT: Duration = Duration::from_secs(2);
/// Extra memory a snapshot bake gets over a sandbox's default limit: a boot
/// from scratch translates the guest's whole start-up path (TCG) and reads
/// its image through the page cache, which a restored child does not.
pub const BAKE_EXTRA_MIB: u32 = 256;
/// Prefix of the cgroups of snapshot bakes (`forkd/bake-<nonce>`).
pub const BAKE_CGROUP_PREFIX: &str = "bake-";

/// INVALID_ARGUMENT naming the field when a limit is out of range.
pub fn validate_limits(s: &SandboxSettings) -> Result<()> {
    let m = s.memory_limit_mib;
    if m != 0 && !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&m) {
        return Err(Error::invalid(
            "memory_limit_mib",
            format!("{m} is outside {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB} (0 = no limit)"),
        ));
    }
    let q = s.cpu_quota;
    if !q.is_finite() || (q != 0.0 && !(MIN_CPU_QUOTA..=MAX_CPU_QUOTA).contains(&q)) {
        return Err(Error::invalid(
            "cpu_quota",
            format!("{q} is outside {MIN_CPU_QUOTA}..={MAX_CPU_QUOTA} CPUs (0 = no limit)"),
        ));
    }
    let p = s.pids_limit;
    if p != 0 && !(MIN_PIDS..=MAX_PIDS).contains(&p) {
        return Err(Error::invalid("pids_limit", format!("{p} is outside {MIN_PIDS}..={MAX_PIDS} (0 = no limit)")));
    }
    Ok(())
}

fn wants_limits(s: &SandboxSettings) -> bool {
    s.memory_limit_mib > 0 || s.cpu_quota > 0.0 || s.pids_limit > 0
}

/// The host cgroup limits of a sandbox.
pub fn cgroup_limits(s: &SandboxSettings) -> cgroup::Limits {
    cgroup::Limits {
        memory_bytes: s.memory_limit_mib as u64 * 1024 * 1024,
        cpu_quota: s.cpu_quota,
        pids_max: if s.pids_limit > 0 { s.pids_limit.saturating_add(VMM_THREAD_HEADROOM) } else { 0 },
        background: false,
    }
}

/// Ids of sandboxes being spawned right now: their work dirs, cgroups and
/// VMMs exist before the sandbox is listed, and the reconciler must not take
/// them for orphans.
fn spawning() -> &'static Mutex<HashSet<String>> {
    static S: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    S.get_or_init(Default::default)
}

pub(crate) fn spawning_ids() -> HashSet<String> {
    spawning().lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Held while one sandbox is spawned. Unless `finish` is called, dropping
/// it (a failed or abandoned spawn) removes the sandbox's cgroup and
/// anything still running in it.
pub(crate) struct SpawnGuard<'a> {
    rt: &'a Runtime,
    id: String,
    settings: SandboxSettings,
    has_cgroup: bool,
    finished: bool,
}

impl SpawnGuard<'_> {
    /// Where the sandbox's VMM starts: already inside its cgroup.
    pub(crate) fn placement(&self) -> crate::vmm::Placement {
        let cgroup_procs = match Cgroups::host() {
            Some(cg) if self.has_cgroup => cg.procs_files(&cgroup::sandbox_name(&self.id)).unwrap_or_default(),
            _ => vec![],
        };
        crate::vmm::Placement { background: false, cgroup_procs }
    }

    /// Moves the freshly started (still paused) VMM into the sandbox's
    /// cgroup and checks it holds no capability.
    pub(crate) fn attach(&self, pid: u32) -> Result<()> {
        if self.has_cgroup
            && let Some(cg) = Cgroups::host()
            && let Err(e) = cg.add_pid(&cgroup::sandbox_name(&self.id), pid)
        {
            if wants_limits(&self.settings) {
                return Err(Error::internal("placing the VMM in its cgroup", e));
            }
            tracing::warn!(id = %self.id, "VMM runs outside its cgroup: {e}");
        }
        if let Some(eff) = crate::host::caps::effective_of(pid)
            && eff != 0
        {
            tracing::warn!(id = %self.id, pid, "VMM has capabilities {eff:#x}");
        }
        Ok(())
    }

    /// The sandbox exists now (listed or owned by a store record).
    pub(crate) fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for SpawnGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.rt.remove_limits(&self.id);
        }
        spawning().lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

impl Runtime {
    /// Marks `id` as being spawned and creates its cgroup with the limits.
    /// Without a usable cgroup hierarchy, limits are refused and a sandbox
    /// without limits runs unconfined (with a warning).
    pub(crate) fn begin_spawn(&self, id: &SandboxId, settings: &SandboxSettings) -> Result<SpawnGuard<'_>> {
        validate_limits(settings)?;
        spawning().lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string());
        let mut guard =
            SpawnGuard { rt: self, id: id.to_string(), settings: settings.clone(), has_cgroup: false, finished: false };
        let Some(cg) = Cgroups::host() else {
            if wants_limits(settings) {
                return Err(Error::FailedPrecondition(
                    "this host has no cgroup hierarchy for memory, cpu and pids: limits cannot be applied".into(),
                ));
            }
            return Ok(guard);
        };
        let missing: Vec<&str> = [
            (settings.memory_limit_mib > 0, "memory"),
            (settings.cpu_quota > 0.0, "cpu"),
            (settings.pids_limit > 0, "pids"),
        ]
        .into_iter()
        .filter(|(want, c)| *want && !cg.controllers().contains(c))
        .map(|(_, c)| c)
        .collect();
        if !missing.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "the host's {} has no {} controller: limits cannot be applied",
                cg.describe(),
                missing.join(", ")
            )));
        }
        let name = cgroup::sandbox_name(id.as_str());
        self.store.ledger_add("cgroup", &name, id.as_str())?;
        guard.has_cgroup = true;
        if let Err(e) = cg.create(&name, &cgroup_limits(settings)) {
            if wants_limits(settings) {
                return Err(Error::internal(&format!("creating cgroup {name}"), e));
            }
            tracing::warn!(%name, "sandbox runs without its cgroup: {e}");
        }
        Ok(guard)
    }

    /// A cgroup for a VMM that serves no sandbox yet: a pooled VMM waiting
    /// for its fork (`forkd/<id>`, which the fork then takes over with the
    /// sandbox's limits) or a snapshot bake (`forkd/bake-<nonce>`). It gets
    /// `memory_mib` (0 = no limit) and the VMM's thread headroom as its pids
    /// limit, and the lowest CPU weight when `background`; ledgered for
    /// `owner` before it exists. None when the host has no cgroup hierarchy
    /// (the VMM then runs as a sandbox without limits does); an error when it
    /// has one and the cgroup cannot be made.
    pub(crate) fn helper_cgroup(
        &self,
        name: String,
        owner: &str,
        memory_mib: u32,
        background: bool,
    ) -> Result<Option<String>> {
        let Some(cg) = Cgroups::host() else { return Ok(None) };
        self.store.ledger_add("cgroup", &name, owner)?;
        let limits = cgroup::Limits {
            memory_bytes: memory_mib as u64 * 1024 * 1024,
            cpu_quota: 0.0,
            pids_max: VMM_THREAD_HEADROOM,
            background,
        };
        if let Err(e) = cg.create(&name, &limits) {
            self.remove_cgroup(&name);
            return Err(Error::internal(&format!("creating cgroup {name}"), e));
        }
        Ok(Some(name))
    }

    /// Moves `pid` into the helper cgroup `name` (from `helper_cgroup`).
    pub(crate) fn enter_cgroup(&self, name: &str, pid: u32) -> Result<()> {
        match Cgroups::host() {
            Some(cg) => cg.add_pid(name, pid).map_err(|e| Error::internal(&format!("placing the VMM in {name}"), e)),
            None => Ok(()),
        }
    }

    /// Removes a sandbox's cgroup, killing whatever still runs in it, and
    /// forgets it in the ledger once it is gone. Idempotent.
    pub(crate) fn remove_limits(&self, id: &str) {
        self.remove_cgroup(&cgroup::sandbox_name(id));
    }

    /// Removes the cgroup `name` (a sandbox's or a helper's), killing
    /// whatever still runs in it, and forgets it in the ledger once it is
    /// gone. Idempotent.
    pub(crate) fn remove_cgroup(&self, name: &str) {
        let name = name.to_string();
        let gone = match Cgroups::host() {
            Some(cg) => {
                for pid in cg.procs(&name) {
                    tracing::info!(%name, pid, "killing a process left in the cgroup");
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                match super::blocking::run(|| cg.remove(&name, RMDIR_WAIT)) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(%name, "cgroup not removed yet (the reconciler retries): {e}");
                        false
                    }
                }
            }
            None => true,
        };
        if gone {
            let _ = self.store.ledger_remove("cgroup", &name);
        }
    }

    /// The VMM of `sb` died without being asked to: the sandbox ends
    /// "exited" with a reason (an OOM kill says so), its cgroup is removed.
    /// Only the first caller for a sandbox does anything and gets the
    /// updated record.
    pub(crate) fn vmm_exited(&self, sb: &Sandbox, why: String) -> Option<SandboxRecord> {
        let name = cgroup::sandbox_name(sb.id.as_str());
        let oom_kills = Cgroups::host().and_then(|cg| cg.oom_kills(&name)).unwrap_or(0);
        let reason = if oom_kills > 0 {
            format!(
                "oom: the VMM was killed by the out-of-memory killer at memory_limit_mib = {} \
                 (the limit covers guest RAM written and the VMM's own memory); {why}",
                sb.snapshot().settings.memory_limit_mib
            )
        } else {
            why
        };
        let rec = match self.transition(sb, super::state::SandboxStatus::Exited, reason, None) {
            Ok(Some(rec)) => rec,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(id = %sb.id, "recording the exit: {e}");
                sb.snapshot()
            }
        };
        tracing::info!(id = %rec.id, reason = %rec.status_reason, "sandbox exited");
        let _ = self.store.ledger_remove("vmm", &crate::vmm::process::ledger_key(sb.pid, sb.start_time));
        self.remove_limits(sb.id.as_str());
        if oom_kills > 0 {
            self.events.emit_for("oom", &rec, &rec.status_reason);
        }
        self.events.emit_for("exited", &rec, &rec.status_reason);
        Some(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(m: u32, q: f64, p: u32) -> SandboxSettings {
        SandboxSettings { memory_limit_mib: m, cpu_quota: q, pids_limit: p, ..Default::default() }
    }

    #[test]
    fn limits_are_validated_by_field() {
        assert!(validate_limits(&s(0, 0.0, 0)).is_ok());
        assert!(validate_limits(&s(64, 0.01, 8)).is_ok());
        assert!(validate_limits(&s(160, 64.0, 64)).is_ok());
        for (bad, field) in [
            (s(63, 0.0, 0), "memory_limit_mib"),
            (s(1, 0.0, 0), "memory_limit_mib"),
            (s(0, 0.001, 0), "cpu_quota"),
            (s(0, 65.0, 0), "cpu_quota"),
            (s(0, -1.0, 0), "cpu_quota"),
            (s(0, f64::NAN, 0), "cpu_quota"),
            (s(0, f64::INFINITY, 0), "cpu_quota"),
            (s(0, 0.0, 7), "pids_limit"),
            (s(0, 0.0, 1), "pids_limit"),
        ] {
            let e = validate_limits(&bad).unwrap_err();
            assert!(matches!(&e, Error::InvalidArgument(m) if m.contains(field)), "{e}");
        }
    }

    #[test]
    fn host_limits_leave_room_for_vmm_threads() {
        let l = cgroup_limits(&s(160, 0.5, 64));
        assert_eq!(l.memory_bytes, 160 << 20);
        assert_eq!(l.pids_max, 64 + VMM_THREAD_HEADROOM);
        assert_eq!(cgroup_limits(&s(0, 0.0, 0)).pids_max, 0);
    }
}
