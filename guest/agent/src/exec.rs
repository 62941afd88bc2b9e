//! Exec: run a program in its own process group and stream its output.

use crate::proc::{self, Spec};
use crate::server::{Agent, Running, error, io_error};
use crate::sys;
use forkd_agent_protocol::v1::{
    ExecExit, ExecOutput, ExecRequest, agent_error::Kind, exec_output::Stream, response::Body as Resp,
};
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
pub const HOME: &str = "/root";
const CHUNK: usize = 64 * 1024;
/// After the main process exits, output still buffered in the pipes is read;
/// a background process that keeps them open is not waited for longer.
pub const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(200);

/// The environment every process starts from, before the request's own.
pub fn base_env() -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("PATH".into(), DEFAULT_PATH.into());
    env.insert("HOME".into(), HOME.into());
    env.insert("TERM".into(), "xterm".into());
    env.insert("LANG".into(), "C.UTF-8".into());
    env
}

pub fn env_vec(env: &BTreeMap<String, String>) -> Result<Vec<std::ffi::CString>, std::io::Error> {
    env.iter().map(|(k, v)| sys::cstr(format!("{k}={v}"))).collect()
}

/// A command converted for `execve`: program found on PATH, argv, the
/// environment (the base one plus the request's) and the working directory.
pub struct Prepared {
    /// `(uid, gid)` to switch to, when not root.
    pub ids: Option<(u32, u32)>,
    pub program: std::ffi::CString,
    pub argv: Vec<std::ffi::CString>,
    pub envp: Vec<std::ffi::CString>,
    pub cwd: std::ffi::CString,
    pub cwd_text: String,
}

pub fn prepare(
    args: &[String],
    req_env: &std::collections::HashMap<String, String>,
    req_cwd: &str,
    user: &str,
) -> Result<Prepared, forkd_agent_protocol::v1::AgentError> {
    if args.is_empty() || args[0].is_empty() {
        return Err(error(Kind::Invalid, "exec needs at least a program name"));
    }
    let account = crate::users::resolve(user)?;
    let mut env = base_env();
    if let Some(a) = &account {
        env.insert("HOME".into(), a.home.clone());
        env.insert("USER".into(), a.name.clone());
    }
    for (k, v) in req_env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(error(Kind::Invalid, format!("bad environment variable name {k:?}")));
        }
        env.insert(k.clone(), v.clone());
    }
    let cwd = if req_cwd.is_empty() {
        let home = account.as_ref().map_or(HOME, |a| a.home.as_str());
        if std::path::Path::new(home).is_dir() { home.to_string() } else { "/".to_string() }
    } else {
        req_cwd.to_string()
    };
    let search = env.get("PATH").cloned().unwrap_or_default();
    let program = proc::resolve_program(&args[0], &search)
        .ok_or_else(|| error(Kind::NotFound, format!("{}: command not found", args[0])))?;
    let bad = |e: std::io::Error| io_error("exec arguments", &e);
    Ok(Prepared {
        ids: account.map(|a| (a.uid, a.gid)),
        program: sys::cstr(&program).map_err(bad)?,
        argv: args.iter().map(sys::cstr).collect::<Result<Vec<_>, _>>().map_err(bad)?,
        envp: env_vec(&env).map_err(bad)?,
        cwd: sys::cstr(&cwd).map_err(bad)?,
        cwd_text: cwd,
    })
}

/// The error for a failed spawn: a missing working directory is named as
/// such rather than as a missing program.
pub fn spawn_error(e: &std::io::Error, program: &str, cwd: &str) -> forkd_agent_protocol::v1::AgentError {
    if e.raw_os_error() == Some(libc::ENOENT) && !std::path::Path::new(cwd).is_dir() {
        io_error(&format!("cwd {cwd}"), e)
    } else {
        io_error(&format!("exec {program}"), e)
    }
}

/// Lets Cancel reach a running exec.
pub struct ExecHandle {
    pgid: AtomicI32,
    cancelled: AtomicBool,
    wake: OwnedFd,
}

impl ExecHandle {
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        let pg = self.pgid.load(Ordering::SeqCst);
        if pg > 0 {
            unsafe { libc::kill(-pg, libc::SIGKILL) };
        }
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), b"c".as_ptr().cast(), 1) };
    }
}

/// SIGKILLs a process group until it is gone, for at most two seconds: a
/// fork bomb may still be forking while the first signal is delivered.
pub fn kill_group(pgid: i32) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if unsafe { libc::kill(-pgid, libc::SIGKILL) } != 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs the request to completion, sending ExecOutput frames and a final
/// ExecExit (or an AgentError when the program could not be started).
pub fn run(agent: &Arc<Agent>, id: u64, req: ExecRequest) {
    match start_and_stream(agent, id, req) {
        Ok(exit) => agent.send(id, Resp::ExecExit(exit)),
        Err(e) => agent.send(id, Resp::Error(e)),
    }
    agent.unregister(id);
}

fn start_and_stream(
    agent: &Arc<Agent>,
    id: u64,
    req: ExecRequest,
) -> Result<ExecExit, forkd_agent_protocol::v1::AgentError> {
    let cmd = prepare(&req.args, &req.env, &req.cwd, &req.user)?;
    let cwd = cmd.cwd_text.clone();
    let (out_r, out_w) = sys::pipe().map_err(|e| io_error("pipe", &e))?;
    let (err_r, err_w) = sys::pipe().map_err(|e| io_error("pipe", &e))?;
    let (in_r, in_w) = sys::pipe().map_err(|e| io_error("pipe", &e))?;
    let (wake_r, wake_w) = sys::pipe().map_err(|e| io_error("pipe", &e))?;
    let wake_w2 = wake_w.try_clone().map_err(|e| io_error("dup", &e))?;
    sys::set_nonblocking(wake_w.as_raw_fd()).ok();
    sys::set_nonblocking(wake_w2.as_raw_fd()).ok();

    let handle = Arc::new(ExecHandle { pgid: AtomicI32::new(0), cancelled: AtomicBool::new(false), wake: wake_w });
    agent.register(id, Running::Exec(handle.clone()));

    let spec = Spec {
        program: cmd.program,
        argv: cmd.argv,
        envp: cmd.envp,
        cwd: Some(cmd.cwd),
        fds: vec![(in_r.as_raw_fd(), 0), (out_w.as_raw_fd(), 1), (err_w.as_raw_fd(), 2)],
        new_group: true,
        session_on_tty: false,
        ids: cmd.ids,
    };
    let started = Instant::now();
    let child = proc::spawn(&spec, Some(wake_w2)).map_err(|e| spawn_error(&e, &req.args[0], &cwd))?;
    handle.pgid.store(child.pid, Ordering::SeqCst);
    if handle.cancelled.load(Ordering::SeqCst) {
        handle.cancel();
    }
    drop((in_r, out_w, err_w));

    // Feed stdin from its own thread so a program that writes before it reads
    // cannot deadlock against us.
    if req.stdin.is_empty() {
        drop(in_w);
    } else {
        let data = req.stdin;
        let spawned = std::thread::Builder::new().stack_size(64 * 1024).spawn(move || {
            let _ = sys::write_all(in_w.as_raw_fd(), &data, None);
        });
        if spawned.is_err() {
            // in_w was moved into the failed closure and dropped: the program sees EOF.
        }
    }

    let deadline = (req.timeout_ms > 0).then(|| started + Duration::from_millis(req.timeout_ms as u64));
    let mut timed_out = false;
    let mut open: [Option<(RawFd, Stream)>; 2] =
        [Some((out_r.as_raw_fd(), Stream::Stdout)), Some((err_r.as_raw_fd(), Stream::Stderr))];
    let mut buf = vec![0u8; CHUNK];
    let mut exited_at: Option<Instant> = None;
    loop {
        let status = child.exit.try_status();
        if status.is_some() && exited_at.is_none() {
            exited_at = Some(Instant::now());
        }
        if open.iter().all(Option::is_none) && status.is_some() {
            break;
        }
        if let Some(t) = exited_at
            && t.elapsed() >= DRAIN_AFTER_EXIT
        {
            break;
        }
        let now = Instant::now();
        if let Some(d) = deadline
            && !timed_out
            && now >= d
        {
            timed_out = true;
            unsafe { libc::kill(-child.pid, libc::SIGKILL) };
        }
        let mut wait = None;
        if let Some(d) = deadline
            && !timed_out
        {
            wait = Some(d.saturating_duration_since(now));
        }
        if let Some(t) = exited_at {
            let left = DRAIN_AFTER_EXIT.saturating_sub(t.elapsed());
            wait = Some(wait.map_or(left, |w: Duration| w.min(left)));
        }
        let mut pfds = vec![libc::pollfd { fd: wake_r.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        for (fd, _) in open.iter().flatten() {
            pfds.push(libc::pollfd { fd: *fd, events: libc::POLLIN, revents: 0 });
        }
        if sys::poll(&mut pfds, wait).is_err() {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        if pfds[0].revents != 0 {
            let mut junk = [0u8; 16];
            let _ = sys::read(wake_r.as_raw_fd(), &mut junk);
        }
        for p in &pfds[1..] {
            if p.revents == 0 {
                continue;
            }
            let slot = open.iter_mut().find(|s| matches!(s, Some((fd, _)) if *fd == p.fd));
            let Some(slot) = slot else { continue };
            let Some((fd, stream)) = *slot else { continue };
            match sys::read(fd, &mut buf) {
                Ok(0) | Err(_) => *slot = None,
                Ok(n) => {
                    agent.send(id, Resp::ExecOutput(ExecOutput { stream: stream as i32, data: buf[..n].to_vec() }))
                }
            }
        }
    }
    // The main process is gone (or its output ended); make sure we have its status.
    let status = match child.exit.try_status() {
        Some(s) => s,
        None => {
            // Output closed first: wait for the exit, still honouring the deadline.
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            match child.exit.wait(left) {
                Some(s) => s,
                None => {
                    timed_out = true;
                    unsafe { libc::kill(-child.pid, libc::SIGKILL) };
                    child.exit.wait(None).unwrap_or(libc::SIGKILL)
                }
            }
        }
    };
    if timed_out || handle.cancelled.load(Ordering::SeqCst) {
        kill_group(child.pid);
    }
    let duration_us = started.elapsed().as_micros() as u64;
    // A cancelled exec still ends with its (SIGKILL) exit status.
    let (exit_code, signal) = proc::decode_status(status);
    Ok(ExecExit { exit_code, signal, timed_out, duration_us })
}
