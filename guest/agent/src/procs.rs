//! Processes as resources: started attached or detached, optionally tagged
//! and on a pseudo-terminal, with their output kept in a bounded ring
//! buffer so a client can attach (and attach again) at any time.
//!
//! Each process has one pump thread that moves its output into the ring
//! and records its exit; attach streams read the ring from an offset and
//! wait on the process's condition variable for more. Nothing here depends
//! on the host connection: a process keeps running when its client goes
//! away, and since the table lives in guest memory a branch of the VM
//! carries every process (and its pump) into each child.

use crate::exec::{self, DRAIN_AFTER_EXIT};
use crate::proc::{self, Spec};
use crate::server::{Agent, error, io_error};
use crate::sys;
use forkd_agent_protocol::v1::{
    AgentError, ProcAttachRequest, ProcExit, ProcInfo, ProcInputRequest, ProcOutput, ProcResizeRequest, ProcSelector,
    ProcSignalRequest, ProcStartRequest, ProcTable, PtySize, agent_error::Kind, proc_output::Stream,
    response::Body as Resp,
};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Output kept per process for attach (older bytes are dropped first).
pub const RING_BYTES: usize = 1 << 20;
/// How long an exited process stays listed (and attachable).
const KEEP_EXITED: Duration = Duration::from_secs(600);
/// Most exited processes remembered; the oldest go first.
const MAX_EXITED: usize = 64;
/// Most processes in the table at once (running and remembered).
const MAX_PROCS: usize = 1024;
/// Largest piece of output in one frame.
const FRAME_DATA: usize = 64 * 1024;
/// How often a waiting attach looks at its cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(250);
/// Longest a write to a process's stdin may block.
const STDIN_WRITE: Duration = Duration::from_secs(5);

/// Output chunks in order, at most [`RING_BYTES`] of them.
#[derive(Default)]
struct Ring {
    chunks: VecDeque<(Stream, u64, Vec<u8>)>,
    /// Offset of the first byte held.
    start: u64,
    /// Offset just past the last byte produced.
    end: u64,
    held: usize,
}

impl Ring {
    fn push(&mut self, stream: Stream, data: &[u8]) {
        let end = self.end;
        match self.chunks.back_mut() {
            Some((s, _, d)) if *s == stream && d.len() + data.len() <= FRAME_DATA => d.extend_from_slice(data),
            _ => self.chunks.push_back((stream, end, data.to_vec())),
        }
        self.end += data.len() as u64;
        self.held += data.len();
        while self.held > RING_BYTES {
            let over = self.held - RING_BYTES;
            let Some((_, off, d)) = self.chunks.front_mut() else { break };
            if d.len() <= over {
                self.held -= d.len();
                self.chunks.pop_front();
            } else {
                d.drain(..over);
                *off += over as u64;
                self.held -= over;
            }
        }
        self.start = self.chunks.front().map_or(self.end, |(_, o, _)| *o);
    }

    /// Chunks from `offset` on (clipped to what is held), at most `max`
    /// bytes.
    fn read_from(&self, offset: u64, max: usize) -> Vec<(Stream, u64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut taken = 0;
        for (s, o, d) in &self.chunks {
            let chunk_end = o + d.len() as u64;
            if chunk_end <= offset {
                continue;
            }
            let skip = offset.saturating_sub(*o) as usize;
            let piece = &d[skip..];
            let n = piece.len().min(max - taken);
            out.push((*s, o + skip as u64, piece[..n].to_vec()));
            taken += n;
            if taken >= max {
                break;
            }
        }
        out
    }
}

struct State {
    ring: Ring,
    exit: Option<ProcExit>,
    exited_at: Option<Instant>,
    /// Where input goes (a pipe, or the terminal's master); None once closed.
    stdin: Option<Arc<OwnedFd>>,
}

pub struct Proc {
    pid: u32,
    tag: String,
    args: Vec<String>,
    cwd: String,
    /// The terminal's master side, for resizes.
    pty: Option<Arc<OwnedFd>>,
    started_unix_ms: i64,
    state: Mutex<State>,
    changed: Condvar,
}

impl Proc {
    fn info(&self) -> ProcInfo {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        ProcInfo {
            pid: self.pid,
            tag: self.tag.clone(),
            args: self.args.clone(),
            cwd: self.cwd.clone(),
            pty: self.pty.is_some(),
            stdin_open: st.stdin.is_some(),
            started_unix_ms: self.started_unix_ms,
            output_bytes: st.ring.end,
            exit: st.exit,
        }
    }

    fn append(&self, stream: Stream, data: &[u8]) {
        if let Ok(mut st) = self.state.lock() {
            st.ring.push(stream, data);
        }
        self.changed.notify_all();
    }

    fn finish(&self, exit: ProcExit) {
        if let Ok(mut st) = self.state.lock() {
            st.exit = Some(exit);
            st.exited_at = Some(Instant::now());
            st.stdin = None;
        }
        self.changed.notify_all();
    }
}

/// Every process started through the table.
#[derive(Default)]
pub struct Table {
    procs: Mutex<Vec<Arc<Proc>>>,
}

impl Table {
    fn find(&self, sel: &Option<ProcSelector>) -> Result<Arc<Proc>, AgentError> {
        let sel = sel.as_ref().ok_or_else(|| error(Kind::Invalid, "no process named"))?;
        let g = self.procs.lock().map_err(|_| error(Kind::Internal, "process table lock poisoned"))?;
        let found = if sel.pid != 0 {
            g.iter().find(|p| p.pid == sel.pid)
        } else {
            g.iter().find(|p| !sel.tag.is_empty() && p.tag == sel.tag)
        };
        found.cloned().ok_or_else(|| {
            if sel.pid != 0 {
                error(Kind::NotFound, format!("no process with pid {}", sel.pid))
            } else {
                error(Kind::NotFound, format!("no process tagged {:?}", sel.tag))
            }
        })
    }

    /// Forgets exited processes past their time or past the count.
    fn prune(procs: &mut Vec<Arc<Proc>>) {
        let exited_at = |p: &Arc<Proc>| p.state.lock().ok().and_then(|s| s.exited_at);
        procs.retain(|p| exited_at(p).is_none_or(|t| t.elapsed() < KEEP_EXITED));
        let mut exited: Vec<(Instant, u32)> = procs.iter().filter_map(|p| exited_at(p).map(|t| (t, p.pid))).collect();
        if exited.len() > MAX_EXITED {
            exited.sort();
            let drop: Vec<u32> = exited[..exited.len() - MAX_EXITED].iter().map(|(_, pid)| *pid).collect();
            procs.retain(|p| !drop.contains(&p.pid));
        }
    }

    pub fn list(&self) -> ProcTable {
        let mut g = match self.procs.lock() {
            Ok(g) => g,
            Err(e) => e.into_inner(),
        };
        Self::prune(&mut g);
        ProcTable { processes: g.iter().map(|p| p.info()).collect() }
    }
}

/// A new pseudo-terminal: (master, slave).
fn open_pty(size: &PtySize) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let master = sys::open("/dev/ptmx", libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC, 0)?;
    let m = master.as_raw_fd();
    let unlock: libc::c_int = 0;
    sys::check(unsafe { libc::ioctl(m, libc::TIOCSPTLCK, &unlock) })?;
    // TIOCGPTPEER opens the slave without a path lookup (Linux 4.13).
    let peer = unsafe { libc::ioctl(m, libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    let slave = if peer >= 0 {
        unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(peer) }
    } else {
        let mut n: libc::c_uint = 0;
        sys::check(unsafe { libc::ioctl(m, libc::TIOCGPTN, &mut n) })?;
        sys::open(&format!("/dev/pts/{n}"), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC, 0)?
    };
    set_size(m, size)?;
    sys::set_nonblocking(m)?;
    Ok((master, slave))
}

fn set_size(fd: RawFd, size: &PtySize) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows.clamp(1, 1000) as u16,
        ws_col: size.cols.clamp(1, 1000) as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    sys::check(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) }).map(|_| ())
}

/// Starts a process and its pump; answers with its info.
pub fn start(agent: &Arc<Agent>, req: ProcStartRequest) -> Result<ProcInfo, AgentError> {
    let cmd = exec::prepare(&req.args, &req.env, &req.cwd, &req.user)?;
    {
        let mut g = agent.procs.procs.lock().map_err(|_| error(Kind::Internal, "process table lock poisoned"))?;
        Table::prune(&mut g);
        if !req.tag.is_empty() {
            // A remembered (exited) process gives its tag up to the new one.
            let live = g.iter().any(|p| p.tag == req.tag && p.state.lock().is_ok_and(|s| s.exit.is_none()));
            if live {
                return Err(error(Kind::Exists, format!("a running process is already tagged {:?}", req.tag)));
            }
            g.retain(|p| p.tag != req.tag);
        }
        if g.len() >= MAX_PROCS {
            return Err(error(Kind::TooLarge, format!("the sandbox already tracks {MAX_PROCS} processes")));
        }
    }
    let pipe = |what: &str| sys::pipe().map_err(|e| io_error(what, &e));
    let (wake_r, wake_w) = pipe("pipe")?;
    sys::set_nonblocking(wake_w.as_raw_fd()).ok();
    // Output sources and what the child gets as 0, 1, 2.
    let mut sources: Vec<(OwnedFd, Stream)> = Vec::new();
    let mut child_fds: Vec<OwnedFd> = Vec::new();
    let stdin: Option<Arc<OwnedFd>>;
    let mut master: Option<Arc<OwnedFd>> = None;
    let fds: Vec<(RawFd, RawFd)>;
    if let Some(size) = &req.pty {
        let (m, s) = open_pty(size).map_err(|e| io_error("opening a pseudo-terminal", &e))?;
        let reader = m.try_clone().map_err(|e| io_error("dup", &e))?;
        let m = Arc::new(m);
        stdin = Some(m.clone());
        master = Some(m);
        sources.push((reader, Stream::Pty));
        fds = vec![(s.as_raw_fd(), 0), (s.as_raw_fd(), 1), (s.as_raw_fd(), 2)];
        child_fds.push(s);
    } else {
        let (out_r, out_w) = pipe("pipe")?;
        let (err_r, err_w) = pipe("pipe")?;
        let input = if req.stdin {
            let (in_r, in_w) = pipe("pipe")?;
            sys::set_nonblocking(in_w.as_raw_fd()).ok();
            stdin = Some(Arc::new(in_w));
            in_r
        } else {
            stdin = None;
            sys::open("/dev/null", libc::O_RDONLY | libc::O_CLOEXEC, 0).map_err(|e| io_error("/dev/null", &e))?
        };
        fds = vec![(input.as_raw_fd(), 0), (out_w.as_raw_fd(), 1), (err_w.as_raw_fd(), 2)];
        child_fds.extend([input, out_w, err_w]);
        sources.push((out_r, Stream::Stdout));
        sources.push((err_r, Stream::Stderr));
    }
    let spec = Spec {
        program: cmd.program,
        argv: cmd.argv,
        envp: cmd.envp,
        cwd: Some(cmd.cwd),
        fds,
        new_group: true,
        session_on_tty: master.is_some(),
        ids: cmd.ids,
    };
    let started = Instant::now();
    let child = proc::spawn(&spec, Some(wake_w)).map_err(|e| exec::spawn_error(&e, &req.args[0], &cmd.cwd_text))?;
    drop(child_fds);
    let now = sys::clock(libc::CLOCK_REALTIME);
    let p = Arc::new(Proc {
        pid: child.pid as u32,
        tag: req.tag.clone(),
        args: req.args.clone(),
        cwd: cmd.cwd_text,
        pty: master,
        started_unix_ms: now.tv_sec * 1000 + now.tv_nsec / 1_000_000,
        state: Mutex::new(State { ring: Ring::default(), exit: None, exited_at: None, stdin }),
        changed: Condvar::new(),
    });
    if let Ok(mut g) = agent.procs.procs.lock() {
        g.push(p.clone());
    }
    let deadline = (req.timeout_ms > 0).then(|| started + Duration::from_millis(req.timeout_ms as u64));
    let pump_proc = p.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("pump-{}", child.pid))
        .stack_size(128 * 1024)
        .spawn(move || pump(&pump_proc, child, sources, wake_r, started, deadline));
    if let Err(e) = spawned {
        unsafe { libc::kill(-(p.pid as i32), libc::SIGKILL) };
        return Err(io_error("starting the output thread", &e));
    }
    Ok(p.info())
}

/// Moves output into the ring until the process has exited and its output
/// ended (or stayed open past the drain time), then records the exit.
fn pump(
    p: &Proc,
    child: proc::Child,
    mut sources: Vec<(OwnedFd, Stream)>,
    wake: OwnedFd,
    started: Instant,
    deadline: Option<Instant>,
) {
    let mut buf = vec![0u8; FRAME_DATA];
    let mut exited_at: Option<Instant> = None;
    let mut timed_out = false;
    loop {
        if exited_at.is_none() && child.exit.try_status().is_some() {
            exited_at = Some(Instant::now());
        }
        if let Some(t) = exited_at
            && (sources.is_empty() || t.elapsed() >= DRAIN_AFTER_EXIT)
        {
            break;
        }
        if let Some(d) = deadline
            && !timed_out
            && Instant::now() >= d
        {
            timed_out = true;
            exec::kill_group(child.pid);
        }
        let mut wait: Option<Duration> = None;
        if let Some(d) = deadline.filter(|_| !timed_out) {
            wait = Some(d.saturating_duration_since(Instant::now()));
        }
        if let Some(t) = exited_at {
            let left = DRAIN_AFTER_EXIT.saturating_sub(t.elapsed());
            wait = Some(wait.map_or(left, |w| w.min(left)));
        }
        if sources.is_empty() && exited_at.is_none() {
            // Output closed (e.g. the program closed it) but still running.
            wait = Some(wait.map_or(Duration::from_secs(1), |w| w.min(Duration::from_secs(1))));
        }
        let mut pfds = vec![libc::pollfd { fd: wake.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        pfds.extend(sources.iter().map(|(fd, _)| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }));
        if sys::poll(&mut pfds, wait).is_err() {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        if pfds[0].revents != 0 {
            let mut junk = [0u8; 16];
            let _ = sys::read(wake.as_raw_fd(), &mut junk);
        }
        let mut closed = Vec::new();
        for (i, pfd) in pfds[1..].iter().enumerate() {
            if pfd.revents == 0 {
                continue;
            }
            let (fd, stream) = &sources[i];
            match sys::read(fd.as_raw_fd(), &mut buf) {
                Ok(0) => closed.push(i),
                Ok(n) => p.append(*stream, &buf[..n]),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) || e.raw_os_error() == Some(libc::EINTR) => {}
                // EIO: a terminal whose last slave closed.
                Err(_) => closed.push(i),
            }
        }
        for i in closed.into_iter().rev() {
            sources.remove(i);
        }
    }
    let status = child.exit.wait(None).unwrap_or(libc::SIGKILL);
    let (exit_code, signal) = proc::decode_status(status);
    p.finish(ProcExit { exit_code, signal, timed_out, duration_us: started.elapsed().as_micros() as u64 });
}

/// Streams a process's output from `req.from_offset`: the first frame
/// carries its info (and how much of the requested output is gone), the
/// last its exit. Ends early when `cancelled` is set.
pub fn attach(agent: &Arc<Agent>, id: u64, req: ProcAttachRequest, cancelled: &AtomicBool) -> Result<(), AgentError> {
    let p = agent.procs.find(&req.process)?;
    let mut offset = req.from_offset;
    let mut first = true;
    loop {
        if cancelled.load(Ordering::SeqCst) {
            return Ok(());
        }
        let (chunks, exit, dropped) = {
            let mut st = p.state.lock().map_err(|_| error(Kind::Internal, "process lock poisoned"))?;
            if st.ring.end <= offset && st.exit.is_none() && !first {
                st = p.changed.wait_timeout(st, CANCEL_POLL).map_err(|_| error(Kind::Internal, "lock"))?.0;
            }
            let dropped = if first { st.ring.start.saturating_sub(offset) } else { 0 };
            offset = offset.max(st.ring.start).min(st.ring.end);
            let chunks = st.ring.read_from(offset, 4 * FRAME_DATA);
            let caught_up = chunks.iter().map(|c| c.1 + c.2.len() as u64).max().unwrap_or(offset) >= st.ring.end;
            (chunks, if caught_up { st.exit } else { None }, dropped)
        };
        if first {
            let info = p.info();
            agent.send(id, Resp::ProcOutput(ProcOutput { info: Some(info), dropped, offset, ..Default::default() }));
            first = false;
        }
        for (stream, off, data) in chunks {
            offset = off + data.len() as u64;
            agent.send(
                id,
                Resp::ProcOutput(ProcOutput { stream: stream as i32, data, offset: off, ..Default::default() }),
            );
        }
        if let Some(x) = exit {
            agent.send(id, Resp::ProcOutput(ProcOutput { exit: Some(x), offset, ..Default::default() }));
            return Ok(());
        }
    }
}

/// Writes to a process's stdin (or terminal) for at most a few seconds and
/// says how much went in; `close` ends it once everything is written (a
/// terminal gets its end-of-file character instead).
pub fn input(agent: &Agent, req: ProcInputRequest) -> Result<u64, AgentError> {
    let p = agent.procs.find(&req.process)?;
    let fd = {
        let st = p.state.lock().map_err(|_| error(Kind::Internal, "process lock poisoned"))?;
        if st.exit.is_some() {
            return Err(exited(&p));
        }
        st.stdin.clone()
    };
    let Some(fd) = fd else {
        return Err(error(
            Kind::Invalid,
            format!("stdin of process {} is closed (start it with stdin to write to it)", p.pid),
        ));
    };
    let deadline = Instant::now() + STDIN_WRITE;
    let written = write_some(fd.as_raw_fd(), &req.data, deadline).map_err(|e| {
        if p.state.lock().is_ok_and(|s| s.exit.is_some()) { exited(&p) } else { io_error("writing stdin", &e) }
    })?;
    if req.close && written == req.data.len() {
        if p.pty.is_some() {
            write_some(fd.as_raw_fd(), &[4], deadline).map_err(|e| io_error("writing stdin", &e))?;
        } else if let Ok(mut st) = p.state.lock() {
            st.stdin = None;
        }
    }
    Ok(written as u64)
}

fn exited(p: &Proc) -> AgentError {
    error(Kind::Exited, format!("process {} has exited", p.pid))
}

/// Writes until everything is written or `deadline` passes; returns how
/// much was written.
fn write_some(fd: RawFd, data: &[u8], deadline: Instant) -> std::io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        let n = unsafe { libc::write(fd, data[done..].as_ptr().cast(), data.len() - done) };
        if n >= 0 {
            done += n as usize;
            continue;
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(done);
                }
                sys::poll_one(fd, libc::POLLOUT, Some(left))?;
            }
            _ => return Err(err),
        }
    }
    Ok(done)
}

/// Sends a signal to the process's group (or the process, if it has no
/// group of its own any more).
pub fn signal(agent: &Agent, req: ProcSignalRequest) -> Result<(), AgentError> {
    if !(1..=64).contains(&req.signal) {
        return Err(error(Kind::Invalid, format!("signal {} is not 1–64", req.signal)));
    }
    let p = agent.procs.find(&req.process)?;
    if p.state.lock().is_ok_and(|s| s.exit.is_some()) {
        return Err(exited(&p));
    }
    let pid = p.pid as i32;
    if unsafe { libc::kill(-pid, req.signal) } != 0 && unsafe { libc::kill(pid, req.signal) } != 0 {
        return Err(io_error(&format!("kill {pid}"), &std::io::Error::last_os_error()));
    }
    Ok(())
}

pub fn resize(agent: &Agent, req: ProcResizeRequest) -> Result<(), AgentError> {
    let p = agent.procs.find(&req.process)?;
    let Some(m) = &p.pty else {
        return Err(error(Kind::Invalid, format!("process {} has no terminal", p.pid)));
    };
    let size = req.size.unwrap_or(PtySize { rows: 24, cols: 80 });
    set_size(m.as_raw_fd(), &size).map_err(|e| io_error("resizing the terminal", &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_bytes_and_their_offsets() {
        let mut r = Ring::default();
        r.push(Stream::Stdout, b"hello ");
        r.push(Stream::Stderr, b"oops ");
        r.push(Stream::Stdout, b"world");
        assert_eq!((r.start, r.end), (0, 16));
        let all = r.read_from(0, 1 << 20);
        assert_eq!(all.len(), 3);
        assert_eq!(all[1], (Stream::Stderr, 6, b"oops ".to_vec()));
        let tail = r.read_from(8, 1 << 20);
        assert_eq!(tail[0], (Stream::Stderr, 8, b"ps ".to_vec()));
        let big = vec![b'x'; RING_BYTES];
        r.push(Stream::Stdout, &big);
        assert_eq!(r.held, RING_BYTES);
        assert_eq!(r.start, 16);
        assert_eq!(r.end, 16 + RING_BYTES as u64);
        let limited = r.read_from(0, 1000);
        assert_eq!(limited.iter().map(|c| c.2.len()).sum::<usize>(), 1000);
        assert_eq!(limited[0].1, 16);
    }
}
