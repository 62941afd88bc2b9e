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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_keys_round_trip() {
        assert_eq!(parse_ledger_key(&ledger_key(42, 7)), Some((42, 7)));
        assert_eq!(parse_ledger_key("42"), None);
        assert_eq!(parse_ledger_key("x:7"), None);
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
