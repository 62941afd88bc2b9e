//! Process spawning and the single reaper.
//!
//! As PID 1 the agent inherits every orphan, so one thread calls
//! `waitpid(-1)` forever. Each spawned child registers an [`ExitSlot`] under
//! the same lock that the reaper takes before delivering a status, and the
//! registration happens before that lock is released after `fork`, so the
//! reaper can never consume a status before its owner is known. Statuses of
//! unregistered processes (orphans) are simply dropped.
//!
//! `std::process::Command` is not used: after a failed exec it waits for the
//! child itself, which would race with (and lose to) the reaper.

use crate::sys;
use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Where a child's exit status is delivered.
pub struct ExitSlot {
    status: Mutex<Option<i32>>,
    cv: Condvar,
    /// Written to (one byte) when the status arrives, so a poll loop wakes.
    wake: Option<OwnedFd>,
}

impl ExitSlot {
    fn deliver(&self, status: i32) {
        if let Ok(mut s) = self.status.lock() {
            *s = Some(status);
        }
        self.cv.notify_all();
        if let Some(w) = &self.wake {
            let _ = unsafe { libc::write(w.as_raw_fd(), b"x".as_ptr().cast(), 1) };
        }
    }

    pub fn try_status(&self) -> Option<i32> {
        self.status.lock().ok().and_then(|s| *s)
    }

    /// Waits for the status, up to `timeout` (forever when `None`).
    pub fn wait(&self, timeout: Option<Duration>) -> Option<i32> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut s = self.status.lock().ok()?;
        loop {
            if let Some(st) = *s {
                return Some(st);
            }
            match deadline {
                None => s = self.cv.wait(s).ok()?,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    s = self.cv.wait_timeout(s, left).ok()?.0;
                }
            }
        }
    }
}

#[derive(Default)]
struct Registry {
    waiters: HashMap<libc::pid_t, Arc<ExitSlot>>,
    /// Bumped on every spawn so the reaper, idle after ECHILD, notices.
    generation: u64,
}

struct Reaper {
    reg: Mutex<Registry>,
    spawned: Condvar,
}

fn reaper() -> &'static Reaper {
    static R: OnceLock<&'static Reaper> = OnceLock::new();
    R.get_or_init(|| {
        let r: &'static Reaper =
            Box::leak(Box::new(Reaper { reg: Mutex::new(Registry::default()), spawned: Condvar::new() }));
        std::thread::Builder::new()
            .name("reaper".into())
            .stack_size(64 * 1024)
            .spawn(move || reap_forever(r))
            .expect("start reaper thread");
        r
    })
}

/// Starts the reaper early (as PID 1 there may be orphans before any spawn).
pub fn start_reaper() {
    let _ = reaper();
}

fn reap_forever(r: &'static Reaper) {
    loop {
        let seen = r.reg.lock().map(|g| g.generation).unwrap_or(0);
        let mut status = 0;
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid > 0 {
            let slot = r.reg.lock().ok().and_then(|mut g| g.waiters.remove(&pid));
            if let Some(slot) = slot {
                slot.deliver(status);
            }
            continue;
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ECHILD) {
            // No children: sleep until the next spawn.
            if let Ok(mut g) = r.reg.lock() {
                while g.generation == seen {
                    match r.spawned.wait(g) {
                        Ok(ng) => g = ng,
                        Err(_) => return,
                    }
                }
            }
        }
        // EINTR: just retry.
    }
}

/// What to run. All strings are converted before `fork`, since the child may
/// only make async-signal-safe calls.
pub struct Spec {
    pub program: CString,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub cwd: Option<CString>,
    /// `(source fd, target fd)`: the child gets `source` duplicated onto
    /// `target`; everything else is close-on-exec.
    pub fds: Vec<(RawFd, RawFd)>,
    /// Put the child in a new process group (its pgid = its pid).
    pub new_group: bool,
    /// Start a new session instead (implies a new group) and make fd 0,
    /// a terminal, its controlling terminal.
    pub session_on_tty: bool,
    /// Switch to `(uid, gid)` (with no supplementary groups) before exec.
    pub ids: Option<(u32, u32)>,
}

pub struct Child {
    pub pid: libc::pid_t,
    pub exit: Arc<ExitSlot>,
}

/// Forks and execs `spec`. Returns once the exec succeeded; an exec failure
/// (e.g. ENOENT, or a bad cwd) comes back as the error.
pub fn spawn(spec: &Spec, wake: Option<OwnedFd>) -> io::Result<Child> {
    let r = reaper();
    let mut argv: Vec<*const libc::c_char> = spec.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = spec.envp.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    let cwd = spec.cwd.as_ref().map(|c| c.as_ptr());
    // Every started process goes into the guest's limit cgroup, if set up;
    // it moves itself there before exec, so nothing it forks escapes.
    let cgroup = match crate::limits::exec_procs() {
        Some(p) => Some(sys::open(&p, libc::O_WRONLY | libc::O_CLOEXEC, 0)?),
        None => None,
    };
    let cgroup_fd = cgroup.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1);
    let (err_r, err_w) = sys::pipe()?;
    let slot = Arc::new(ExitSlot { status: Mutex::new(None), cv: Condvar::new(), wake });

    let pid = {
        let mut g = r.reg.lock().map_err(|_| io::Error::other("reaper lock poisoned"))?;
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            unsafe { child_after_fork(spec, &argv, &envp, cwd, cgroup_fd, err_w.as_raw_fd()) };
        }
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        g.waiters.insert(pid, slot.clone());
        g.generation += 1;
        pid
    };
    r.spawned.notify_all();
    if spec.new_group && !spec.session_on_tty {
        // Also done by the child; doing it here closes the window in which a
        // kill of the group could miss it.
        unsafe { libc::setpgid(pid, pid) };
    }
    drop(err_w);
    let mut buf = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match sys::read(err_r.as_raw_fd(), &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(_) => break,
        }
    }
    if got == 4 {
        // The child reported an errno and exited; the reaper collects it.
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(buf)));
    }
    Ok(Child { pid, exit: slot })
}

/// Runs in the forked child: async-signal-safe calls only, no allocation.
unsafe fn child_after_fork(
    spec: &Spec,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    cwd: Option<*const libc::c_char>,
    cgroup_fd: RawFd,
    err_fd: RawFd,
) -> ! {
    unsafe {
        let fail = |err_fd: RawFd| -> ! {
            let e = *libc::__errno_location();
            let b = e.to_ne_bytes();
            libc::write(err_fd, b.as_ptr().cast(), 4);
            libc::_exit(127);
        };
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        // The Rust runtime ignores SIGPIPE; programs expect the default.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        if spec.session_on_tty {
            if libc::setsid() < 0 {
                fail(err_fd);
            }
        } else if spec.new_group {
            libc::setpgid(0, 0);
        }
        if cgroup_fd >= 0 && libc::write(cgroup_fd, b"0".as_ptr().cast(), 1) != 1 {
            fail(err_fd);
        }
        // Two passes so that a source fd numbered like another target is not
        // clobbered before it is used: first lift every source above 100
        // (close-on-exec copies), then place them.
        let mut lifted = [-1 as RawFd; 8];
        for (i, &(src, _)) in spec.fds.iter().enumerate().take(lifted.len()) {
            let fd = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, 100);
            if fd < 0 {
                fail(err_fd);
            }
            lifted[i] = fd;
        }
        for (i, &(_, dst)) in spec.fds.iter().enumerate().take(lifted.len()) {
            if libc::dup2(lifted[i], dst) < 0 {
                fail(err_fd);
            }
        }
        if spec.session_on_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            fail(err_fd);
        }
        if let Some(dir) = cwd
            && libc::chdir(dir) < 0
        {
            fail(err_fd);
        }
        if let Some((uid, gid)) = spec.ids {
            let groups = [gid];
            if libc::setgroups(1, groups.as_ptr()) < 0 || libc::setgid(gid) < 0 || libc::setuid(uid) < 0 {
                fail(err_fd);
            }
        }
        libc::execve(spec.program.as_ptr(), argv.as_ptr(), envp.as_ptr());
        fail(err_fd)
    }
}

/// Decoded wait status: `(exit_code, signal)`, exit_code -1 when signalled.
pub fn decode_status(status: i32) -> (i32, i32) {
    if libc::WIFEXITED(status) {
        (libc::WEXITSTATUS(status), 0)
    } else if libc::WIFSIGNALED(status) {
        (-1, libc::WTERMSIG(status))
    } else {
        (-1, 0)
    }
}

/// Finds `name` on `path` (a PATH value) the way execvp would.
pub fn resolve_program(name: &str, path: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    if name.contains('/') {
        return Some(name.to_string());
    }
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let cand = format!("{dir}/{name}");
        if let Ok(md) = std::fs::metadata(&cand)
            && md.is_file()
            && md.permissions().mode() & 0o111 != 0
        {
            return Some(cand);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(args: &[&str]) -> Spec {
        Spec {
            program: sys::cstr(args[0]).unwrap(),
            argv: args.iter().map(|a| sys::cstr(a).unwrap()).collect(),
            envp: vec![sys::cstr("PATH=/usr/bin:/bin").unwrap()],
            cwd: None,
            fds: vec![],
            new_group: true,
            session_on_tty: false,
            ids: None,
        }
    }

    #[test]
    fn spawn_reports_exit_status() {
        let c = spawn(&spec(&["/bin/sh", "-c", "exit 3"]), None).unwrap();
        let st = c.exit.wait(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(decode_status(st), (3, 0));
    }

    #[test]
    fn spawn_missing_program_is_enoent() {
        let e = spawn(&spec(&["/nonexistent/prog"]), None).err().unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn resolves_on_path() {
        assert!(resolve_program("sh", "/nonexistent:/bin:/usr/bin").unwrap().ends_with("/sh"));
        assert_eq!(resolve_program("./x", ""), Some("./x".into()));
        assert_eq!(resolve_program("no-such-program-here", "/bin"), None);
    }
}
