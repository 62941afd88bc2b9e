//! Capabilities. The daemon keeps only the capabilities it uses and drops
//! every other one from its permitted, effective, inheritable, ambient and
//! bounding sets at start. VMM processes get none at all (see vmm::jail:
//! their own uid, empty sets, no_new_privs).

use ::caps::{CapSet, Capability, CapsHashSet};

/// What the daemon keeps, and why.
pub const KEEP: &[(Capability, &str)] = &[
    (Capability::CAP_CHOWN, "files in the data dir whatever their owner"),
    (Capability::CAP_DAC_OVERRIDE, "files in the data dir whatever their mode"),
    (Capability::CAP_DAC_READ_SEARCH, "reading guest assets and snapshots"),
    (Capability::CAP_FOWNER, "renaming and removing snapshot and work dirs"),
    (Capability::CAP_KILL, "signalling VMMs, including adopted ones"),
    (Capability::CAP_SETPCAP, "emptying each VMM's bounding set before exec"),
    (Capability::CAP_SETUID, "running each VMM as its own unprivileged uid"),
    (Capability::CAP_SETGID, "running each VMM in the VMM group"),
    (Capability::CAP_NET_ADMIN, "network namespaces, taps and firewall rules"),
    (Capability::CAP_NET_RAW, "iptables when nftables is absent"),
    (Capability::CAP_NET_BIND_SERVICE, "--bind to a port below 1024"),
    (Capability::CAP_SYS_ADMIN, "mounts, setns into network namespaces, cgroups"),
    (Capability::CAP_SYS_PTRACE, "reading a VMM's memory to branch it (process_vm_readv)"),
    (Capability::CAP_SYS_RESOURCE, "raising limits for many VMMs"),
    (Capability::CAP_IPC_LOCK, "locked and huge-page guest memory"),
    (Capability::CAP_SETFCAP, "mapping root into the user namespaces of image builds"),
];

/// The outcome of dropping capabilities at start.
#[derive(Debug, Clone, Default)]
pub struct CapsReport {
    /// Capabilities still permitted and effective.
    pub kept: Vec<String>,
    /// Capabilities that were permitted and are gone now.
    pub dropped: Vec<String>,
    /// Set when the sets could not be changed (the daemon goes on).
    pub error: Option<String>,
}

impl CapsReport {
    pub fn summary(&self) -> String {
        if let Some(e) = &self.error {
            return format!("capabilities unchanged: {e}");
        }
        if self.kept.is_empty() && self.dropped.is_empty() {
            return "no capabilities (unprivileged)".into();
        }
        format!("kept {} capabilities: {}; dropped {}", self.kept.len(), self.kept.join(","), self.dropped.len())
    }
}

fn names(set: &CapsHashSet) -> Vec<String> {
    let mut v: Vec<String> = set.iter().map(|c| c.to_string()).collect();
    v.sort();
    v
}

/// Drops every capability not in `KEEP`. Capability sets belong to a
/// thread: call this before the async runtime starts any thread.
pub fn drop_daemon_caps() -> CapsReport {
    let mut report = CapsReport::default();
    let permitted = match ::caps::read(None, CapSet::Permitted) {
        Ok(p) => p,
        Err(e) => {
            report.error = Some(format!("reading the permitted set: {e}"));
            return report;
        }
    };
    let keep: CapsHashSet = KEEP.iter().map(|(c, _)| *c).filter(|c| permitted.contains(c)).collect();
    let result = (|| -> Result<(), ::caps::errors::CapsError> {
        // Bounding first: dropping from it needs CAP_SETPCAP, still held.
        let bounding = ::caps::read(None, CapSet::Bounding).unwrap_or_default();
        for cap in bounding.iter().filter(|c| !keep.contains(c)) {
            ::caps::drop(None, CapSet::Bounding, *cap)?;
        }
        ::caps::clear(None, CapSet::Inheritable)?;
        if ::caps::runtime::ambient_set_supported().is_ok() {
            ::caps::clear(None, CapSet::Ambient)?;
        }
        ::caps::set(None, CapSet::Effective, &keep)?;
        ::caps::set(None, CapSet::Permitted, &keep)?;
        Ok(())
    })();
    if let Err(e) = result {
        report.error = Some(e.to_string());
    }
    let now = ::caps::read(None, CapSet::Permitted).unwrap_or_default();
    report.kept = names(&now);
    report.dropped = names(&permitted.difference(&now).copied().collect());
    report
}

/// A process's effective capability mask (from /proc/PID/status).
pub fn effective_of(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_list_is_unique() {
        let set: std::collections::HashSet<_> = KEEP.iter().map(|(c, _)| *c).collect();
        assert_eq!(set.len(), KEEP.len());
    }

    #[test]
    fn a_child_after_pre_exec_has_no_capabilities() {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args(["-c", "grep -E '^Cap(Eff|Prm|Bnd|Inh|Amb)' /proc/self/status"]);
        let plan = crate::vmm::jail::Plan::unconfined(None, Default::default()).unwrap();
        unsafe {
            cmd.pre_exec(move || plan.enter());
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        for l in text.lines() {
            let v = l.split_whitespace().nth(1).unwrap();
            let is_bnd = l.starts_with("CapBnd");
            let privileged = effective_of(std::process::id()).unwrap_or(0) & (1 << 8) != 0; // CAP_SETPCAP
            if !is_bnd || privileged {
                assert_eq!(u64::from_str_radix(v, 16).unwrap(), 0, "{l}");
            }
        }
    }
}
