//! A host-side check of the confinement a VMM really gets on this host:
//! QEMU is started jailed exactly as the daemon starts it (its own uid from
//! the range, no capabilities, `no_new_privs`, its own mount namespace,
//! QEMU's seccomp sandbox) but with no machine to run, and what the kernel
//! then reports for that process is read back before it is stopped.
//! `forkd doctor` shows the result, so an operator learns what the host can
//! achieve, not only what a running daemon claims.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{JailConfig, Needs, Plan, UidRange, Uids};
use crate::vmm::qemu::args::SANDBOX;

/// How long QEMU gets to apply its seccomp filter.
const SETTLE: Duration = Duration::from_secs(5);

/// What the kernel reports for a jailed QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub uid: u32,
    pub cap_eff: u64,
    pub cap_prm: u64,
    pub cap_bnd: u64,
    /// 2 = a seccomp filter is in force.
    pub seccomp: u8,
    pub no_new_privs: bool,
    /// Its mount namespace is not the caller's; None when the caller may
    /// not inspect it (no CAP_SYS_PTRACE over another uid).
    pub own_mount_ns: Option<bool>,
    /// Host paths that must not exist inside the jail but do.
    pub visible_secrets: Vec<PathBuf>,
}

impl Observed {
    /// Every property the daemon's VMMs must have.
    pub fn confined(&self) -> bool {
        self.uid != 0
            && self.cap_eff == 0
            && self.cap_prm == 0
            && self.cap_bnd == 0
            && self.seccomp == 2
            && self.no_new_privs
            && self.own_mount_ns == Some(true)
            && self.visible_secrets.is_empty()
    }

    /// One line for people.
    pub fn describe(&self) -> String {
        format!(
            "uid {}, CapEff {:#x}, CapPrm {:#x}, CapBnd {:#x}, seccomp {}, no_new_privs {}, own mount ns {}{}",
            self.uid,
            self.cap_eff,
            self.cap_prm,
            self.cap_bnd,
            self.seccomp,
            self.no_new_privs as u8,
            match self.own_mount_ns {
                Some(own) => own.to_string(),
                None => "unknown (not inspectable)".into(),
            },
            if self.visible_secrets.is_empty() { String::new() } else { format!(", sees {:?}", self.visible_secrets) }
        )
    }
}

/// Parses the fields of /proc/PID/status that confinement is about.
pub fn parse_status(text: &str) -> Option<(u32, u64, u64, u64, u8, bool)> {
    let field = |key: &str| text.lines().find_map(|l| l.strip_prefix(key)).map(str::trim);
    let hex = |key: &str| field(key).and_then(|v| u64::from_str_radix(v, 16).ok());
    let uid = field("Uid:")?.split_whitespace().next()?.parse().ok()?;
    Some((
        uid,
        hex("CapEff:")?,
        hex("CapPrm:")?,
        hex("CapBnd:")?,
        field("Seccomp:")?.parse().ok()?,
        field("NoNewPrivs:").is_some_and(|v| v == "1"),
    ))
}

/// Starts `qemu` jailed under `cfg` (the last uid of its range, so no uid of
/// a running daemon's VMMs is likely to be shared), reads its status and
/// stops it. `secrets` are host paths that must not exist inside the jail.
/// Blocking; needs the privileges the daemon runs with.
pub fn run(qemu: &Path, cfg: &JailConfig, secrets: &[PathBuf]) -> Result<Observed, String> {
    let last = UidRange { base: cfg.uids.base + cfg.uids.count.saturating_sub(1), count: 1, gid: cfg.uids.gid };
    let uids = Uids::new(last);
    let lease = uids.lease().map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&cfg.mountpoint).map_err(|e| format!("{}: {e}", cfg.mountpoint.display()))?;
    let mut needs = Needs::default();
    let binary = std::fs::canonicalize(qemu).map_err(|e| format!("{}: {e}", qemu.display()))?;
    if !binary.starts_with("/usr") {
        needs.read_only(binary.clone());
    }
    let plan = Plan::confined(cfg, &lease, None, needs).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&binary);
    // QMP on its stdin: the probe can always stop it with `quit`, even when
    // the caller may not signal another uid (no CAP_KILL).
    cmd.args(["-machine", "none", "-nodefaults", "-display", "none", "-monitor", "none", "-serial", "none", "-S"])
        .args(["-qmp", "stdio", "-sandbox", SANDBOX])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: `Plan::enter` only makes raw system calls on data prepared
    // before the fork.
    unsafe {
        cmd.pre_exec(move || plan.enter());
    }
    let mut child = cmd.spawn().map_err(|e| format!("starting {} jailed: {e}", binary.display()))?;
    let pid = child.id();
    let deadline = Instant::now() + SETTLE;
    let observed = loop {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = (&mut e).take(4096).read_to_string(&mut err);
            }
            return Err(format!("the jailed QEMU exited at start ({status}): {}", err.trim()));
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        match parse_status(&status) {
            Some(s) if s.4 == 2 || Instant::now() > deadline => break s,
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    // Another uid's namespaces and root are readable only with
    // CAP_SYS_PTRACE; without it nothing about them is claimed.
    let ns = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/mnt")).ok();
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let (own_mount_ns, visible_secrets) = match (ns(pid), std::fs::read_link(&root)) {
        (Some(theirs), Ok(_)) => (
            Some(Some(theirs) != ns(std::process::id())),
            secrets.iter().filter(|s| root.join(s.strip_prefix("/").unwrap_or(s)).exists()).cloned().collect(),
        ),
        _ => (None, vec![]),
    };
    stop(&mut child)?;
    let (uid, cap_eff, cap_prm, cap_bnd, seccomp, no_new_privs) = observed;
    Ok(Observed { uid, cap_eff, cap_prm, cap_bnd, seccomp, no_new_privs, own_mount_ns, visible_secrets })
}

/// Stops the jailed QEMU: `quit` over QMP, then SIGKILL, each with a
/// bounded wait. An error when it is still running (it is named, so it can
/// be killed by hand).
fn stop(child: &mut std::process::Child) -> Result<(), String> {
    use std::io::Write;
    if let Some(mut qmp) = child.stdin.take() {
        let _ = qmp.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n");
    }
    let exited = |child: &mut std::process::Child| {
        let deadline = Instant::now() + SETTLE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    };
    if exited(child) {
        return Ok(());
    }
    let killed = child.kill();
    if exited(child) {
        return Ok(());
    }
    Err(format!(
        "the jailed QEMU (pid {}) did not quit and cannot be killed ({}): the daemon needs CAP_KILL",
        child.id(),
        killed.err().map(|e| e.to_string()).unwrap_or_default()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read() {
        let text = "Name:\tqemu\nUid:\t2000000001\t2000000001\t2000000001\t2000000001\n\
                    CapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapBnd:\t0000000000000000\n\
                    NoNewPrivs:\t1\nSeccomp:\t2\n";
        assert_eq!(parse_status(text), Some((2_000_000_001, 0, 0, 0, 2, true)));
        assert_eq!(parse_status("Uid:\t0\t0\t0\t0\n"), None, "fields missing");
        let o = Observed {
            uid: 5,
            cap_eff: 0,
            cap_prm: 0,
            cap_bnd: 0,
            seccomp: 2,
            no_new_privs: true,
            own_mount_ns: Some(true),
            visible_secrets: vec![],
        };
        assert!(o.confined());
        assert!(!Observed { seccomp: 0, ..o.clone() }.confined());
        assert!(!Observed { uid: 0, ..o.clone() }.confined());
        assert!(!Observed { own_mount_ns: None, ..o.clone() }.confined(), "unknown is not confined");
        assert!(!Observed { visible_secrets: vec!["/etc/shadow".into()], ..o }.confined());
    }
}
