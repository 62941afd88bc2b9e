//! Host processes: identity (pid + start time, so a reused pid is never
//! mistaken for our VMM) and termination.

use std::time::Duration;

/// The process's start time in clock ticks since boot (field 22 of
/// /proc/PID/stat), or None if it does not exist.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// True while `pid` is the same process that started at `start`, and not a zombie.
pub fn is_alive(pid: u32, start: u64) -> bool {
    if start_time(pid) != Some(start) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rfind(')').and_then(|i| stat[i + 2..].chars().next()).is_some_and(|state| state != 'Z' && state != 'X')
        }
        Err(_) => false,
    }
}

/// SIGKILLs the process if it is still the one identified by `start`, then
/// waits (up to `wait`) for it to disappear.
pub async fn kill(pid: u32, start: u64, wait: Duration) -> bool {
    if !is_alive(pid, start) {
        return true;
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline {
        if !is_alive(pid, start) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    !is_alive(pid, start)
}

/// Kills the process (see `kill`) and, when this daemon started it, reaps it.
pub async fn kill_and_reap(pid: u32, start: u64, child: Option<tokio::process::Child>) {
    kill(pid, start, Duration::from_secs(5)).await;
    if let Some(mut c) = child {
        let _ = c.wait().await;
    }
}

/// The ledger key of a VMM process: `<pid>:<start time>`.
pub fn ledger_key(pid: u32, start: u64) -> String {
    format!("{pid}:{start}")
}

/// Reads back a `ledger_key`.
pub fn parse_ledger_key(key: &str) -> Option<(u32, u64)> {
    let (pid, start) = key.split_once(':')?;
    Some((pid.parse().ok()?, start.parse().ok()?))
}

/// Proportional set size of a process in bytes (from smaps_rollup).
pub fn pss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// CPU time a process has used so far, all its threads, in nanoseconds
/// (from /proc/PID/task/*/schedstat); None when it is gone.
pub fn cpu_ns(pid: u32) -> Option<u64> {
    cpu_split_ns(pid).map(|(vcpu, rest)| vcpu + rest)
}

/// `cpu_ns` split between a VMM's vCPU threads (QEMU names them "CPU
/// N/TCG" or "CPU N/KVM": the guest running, and under TCG its
/// translation) and every other thread.
pub fn cpu_split_ns(pid: u32) -> Option<(u64, u64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let (mut vcpu, mut rest) = (0u64, 0u64);
    for t in tasks.flatten() {
        let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) else { continue };
        let ns = s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.starts_with("CPU ") { vcpu += ns } else { rest += ns }
    }
    Some((vcpu, rest))
}

/// Where a VMM's proportional set size goes, in bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct PssParts {
    /// Guest memory still shared with the snapshot's memory file.
    pub guest_shared: u64,
    /// Guest pages this child wrote (copied on write) and has alone: pages
    /// KSM merged count as shared.
    pub guest_private: u64,
    /// The VMM's own memory: QEMU's code, heap and device state.
    pub vmm: u64,
    /// Under TCG, the translated-code buffer (QEMU's one anonymous
    /// writable and executable mapping); 0 under KVM.
    pub tcg_code: u64,
    /// Of the child's memory, what KSM merged with identical pages.
    pub ksm: u64,
}

/// Splits a VMM's PSS between guest memory (the mapping of its memory file,
/// named `…/mem`) and the VMM's own, from /proc/PID/smaps.
pub fn pss_parts(pid: u32) -> Option<PssParts> {
    parse_pss_parts(&std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?)
}

fn parse_pss_parts(smaps: &str) -> Option<PssParts> {
    let kb = |v: &str| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|k| k * 1024);
    let mut parts = PssParts::default();
    #[derive(PartialEq)]
    enum Kind {
        Guest,
        Code,
        Vmm,
    }
    let mut kind = Kind::Vmm;
    let mut seen = false;
    for line in smaps.lines() {
        // A mapping's header: "start-end perms offset dev inode [path]".
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            let perms = fields.next().unwrap_or("");
            let path = fields.nth(3).unwrap_or("");
            kind = if path.ends_with("/mem") {
                Kind::Guest
            } else if path.is_empty() && perms.starts_with("rwx") {
                Kind::Code
            } else {
                Kind::Vmm
            };
            continue;
        }
        let Some((key, value)) = line.split_once(':') else { continue };
        match (key, &kind) {
            ("Pss", Kind::Guest) => {
                parts.guest_shared += kb(value)?;
                seen = true;
            }
            ("Anonymous", Kind::Guest) => {
                let private = kb(value)?;
                parts.guest_private += private;
                parts.guest_shared = parts.guest_shared.saturating_sub(private);
            }
            ("Pss", Kind::Code) => parts.tcg_code += kb(value)?,
            ("Pss", Kind::Vmm) => parts.vmm += kb(value)?,
            ("KSM", kind) => {
                // Merged pages are shared again: counted with the snapshot's.
                let merged = kb(value)?;
                parts.ksm += merged;
                if *kind == Kind::Guest {
                    let merged = merged.min(parts.guest_private);
                    parts.guest_private -= merged;
                    parts.guest_shared += merged;
                }
            }
            _ => {}
        }
    }
    seen.then_some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pss_splits_guest_memory_from_the_vmm() {
        let smaps = "\
55d0-55e0 r-xp 00000000 fe:00 1 /usr/bin/qemu-system-x86_64
Pss:                 100 kB
Anonymous:             0 kB
KSM:                   0 kB
7f00-7f10 rw-p 00000000 fe:00 2 /var/lib/forkd/snapshots/py/mem
Pss:                5000 kB
Anonymous:          1200 kB
KSM:                 300 kB
7f20-7f30 rw-p 00000000 00:00 0
Pss:                 700 kB
Anonymous:           700 kB
KSM:                   0 kB
7f40-7f50 rwxp 00000000 00:00 0
Pss:                2000 kB
Anonymous:          2000 kB
";
        let p = parse_pss_parts(smaps).unwrap();
        // 1200 KiB written, 300 of them merged by KSM.
        assert_eq!(p.guest_shared, 4100 * 1024);
        assert_eq!(p.guest_private, 900 * 1024);
        assert_eq!(p.vmm, 800 * 1024);
        assert_eq!(p.tcg_code, 2000 * 1024);
        assert_eq!(p.ksm, 300 * 1024);
        assert_eq!(parse_pss_parts("7f00-7f10 r--p 0 0:0 0 /lib/x.so\nPss: 4 kB\n"), None);
    }

    #[test]
    fn ledger_keys_round_trip() {
        assert_eq!(parse_ledger_key(&ledger_key(42, 7)), Some((42, 7)));
        assert_eq!(parse_ledger_key("42"), None);
        assert_eq!(parse_ledger_key("x:7"), None);
    }

    #[test]
    fn own_cpu_time_is_counted() {
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(20) {}
        assert!(cpu_ns(std::process::id()).unwrap() >= 10_000_000);
        assert_eq!(cpu_ns(u32::MAX), None);
    }

    #[test]
    fn own_process_is_alive() {
        let pid = std::process::id();
        let st = start_time(pid).expect("own start time");
        assert!(is_alive(pid, st));
        assert!(!is_alive(pid, st + 1));
        assert!(pss_bytes(pid).unwrap() > 0);
    }
}
