//! The guest side of `pids_limit`: a pids cgroup inside the guest.
//!
//! A pids limit on the host only bounds the VMM's threads; processes inside
//! the guest are invisible there. So the agent mounts cgroup2 in the guest,
//! creates one cgroup for everything it starts (exec'd commands and the warm
//! runtime) and sets its pids.max. The agent itself stays outside, so it can
//! always start the next command and kill a runaway one. Only PID 1 does
//! this: an agent run on a development host never touches the host's
//! cgroups.

use crate::log;
use std::io;
use std::path::Path;
use std::sync::Mutex;

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The cgroup of every process the agent starts.
pub const EXEC_GROUP: &str = "/sys/fs/cgroup/forkd-exec";

/// `cgroup.procs` of the exec cgroup once it is set up.
static PROCS: Mutex<Option<String>> = Mutex::new(None);

/// The limit and runtime pid last applied; None until the group exists.
static APPLIED: Mutex<Option<(u32, i32)>> = Mutex::new(None);

/// Where new processes are to be placed (None: stay where the agent is).
pub fn exec_procs() -> Option<String> {
    PROCS.lock().ok().and_then(|g| g.clone())
}

/// Applies `max` (0 = no limit) to the exec cgroup, creating it on first
/// use, and moves `extra_pid` (the warm runtime) into it.
pub fn apply_pids_max(max: u32, extra_pid: i32) -> io::Result<()> {
    if std::process::id() != 1 {
        if max > 0 {
            log::info("pids limit ignored: not running as PID 1");
        }
        return Ok(());
    }
    // What this agent last applied (its memory, so a restored child knows
    // what its template did): nothing to do when it is asked again — every
    // cgroup file touched costs milliseconds on a freshly restored emulated
    // CPU, on the spawn path.
    let wanted = (max, extra_pid);
    match APPLIED.lock().ok().and_then(|g| *g) {
        Some(last) if last == wanted => return Ok(()),
        None if max == 0 => return Ok(()),
        _ => {}
    }
    let exists = Path::new(EXEC_GROUP).is_dir();
    if max == 0 && !exists {
        return Ok(());
    }
    if !exists {
        if !Path::new(CGROUP_ROOT).join("cgroup.controllers").exists() {
            crate::sys::mount(
                "cgroup2",
                CGROUP_ROOT,
                "cgroup2",
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                "",
            )?;
        }
        std::fs::write(Path::new(CGROUP_ROOT).join("cgroup.subtree_control"), "+pids")?;
        match std::fs::create_dir(EXEC_GROUP) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    let value = if max > 0 { max.to_string() } else { "max".to_string() };
    std::fs::write(Path::new(EXEC_GROUP).join("pids.max"), value)?;
    let procs = format!("{EXEC_GROUP}/cgroup.procs");
    if extra_pid > 0
        && let Err(e) = std::fs::write(&procs, extra_pid.to_string())
    {
        log::error(&format!("moving the runtime (pid {extra_pid}) into {EXEC_GROUP}: {e}"));
    }
    if let Ok(mut g) = PROCS.lock() {
        *g = Some(procs);
    }
    if let Ok(mut g) = APPLIED.lock() {
        *g = Some(wanted);
    }
    log::info(&format!("pids.max {max} for started processes"));
    Ok(())
}
