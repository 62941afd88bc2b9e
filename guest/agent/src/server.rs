//! Request dispatch and the frame reader/writer.

use crate::exec::{self, ExecHandle};
use crate::runtime::Runtime;
use crate::{files, log, ports, procs, reinit, sys, watch};
use forkd_agent_protocol::v1::{
    Ack, AgentError, EvalOutput, Pong, ProcInputDone, Request, Response, agent_error::Kind, eval_output,
    request::Body as Req, response::Body as Resp,
};
use forkd_agent_protocol::{FrameDecoder, MAGIC, encode_frame};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// How long one frame may wait for the host to drain the channel before it is
/// dropped. A host that went away must not wedge every request thread.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Silence after which a chunk that starts with the magic is taken as the
/// start of a new frame even if a fragment is pending.
const RESYNC_GAP: Duration = Duration::from_millis(20);

/// After one frame timed out, later frames wait only this long until the
/// host is heard from again: a port whose host side is gone blocks writes,
/// and every response would otherwise sit out the full timeout.
const STALLED_WRITE_TIMEOUT: Duration = Duration::from_millis(50);

/// Serialises whole frames onto the channel.
#[derive(Default)]
pub struct Writer {
    fd: Mutex<Option<Arc<OwnedFd>>>,
    stalled: AtomicBool,
}

impl Writer {
    pub fn set(&self, fd: Option<Arc<OwnedFd>>) {
        if let Ok(mut g) = self.fd.lock() {
            *g = fd;
        }
    }

    /// The host sent something: it is connected and reading again.
    pub fn host_active(&self) {
        self.stalled.store(false, Ordering::Relaxed);
    }

    pub fn send(&self, msg: &Response) {
        let frame = encode_frame(msg);
        let Ok(g) = self.fd.lock() else { return };
        let Some(fd) = g.as_ref() else { return };
        let stalled = self.stalled.load(Ordering::Relaxed);
        let wait = if stalled { STALLED_WRITE_TIMEOUT } else { WRITE_TIMEOUT };
        match sys::write_all(fd.as_raw_fd(), &frame, Some(Instant::now() + wait)) {
            Ok(()) => self.stalled.store(false, Ordering::Relaxed),
            Err(e) => {
                // A partial frame may have gone out; the host resynchronises
                // on the next magic.
                if !stalled {
                    log::info(&format!("dropping response frames until the host reads again: {e}"));
                }
                self.stalled.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// An in-flight request that Cancel can reach.
pub enum Running {
    Exec(Arc<ExecHandle>),
    Eval,
    /// A process attach or a file watch: it belongs to the connection that
    /// asked for it and ends with it (or when cancelled).
    Stream(Arc<AtomicBool>),
    /// A port stream: like a stream, it belongs to its connection.
    Port(Arc<ports::PortStream>),
}

/// Most attach and watch streams at once.
const MAX_STREAMS: usize = 64;

type Job = Box<dyn FnOnce() + Send>;

/// Request threads started ahead of time. A template's threads survive into
/// every restored child, where creating a fresh thread means running cold
/// kernel and libc paths through TCG (tens of milliseconds); a job only gets
/// a new thread when every pooled one is busy (e.g. with long execs).
pub struct Pool {
    tx: Mutex<mpsc::Sender<Job>>,
    idle: Arc<AtomicUsize>,
}

impl Pool {
    pub fn new(workers: usize) -> Pool {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let idle = Arc::new(AtomicUsize::new(0));
        for i in 0..workers {
            let (rx, free) = (rx.clone(), idle.clone());
            let started = std::thread::Builder::new().name(format!("worker-{i}")).stack_size(STACK).spawn(move || {
                loop {
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => {
                            job();
                            free.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => return,
                    }
                }
            });
            if started.is_ok() {
                idle.fetch_add(1, Ordering::SeqCst);
            }
        }
        Pool { tx: Mutex::new(tx), idle }
    }

    pub fn run(&self, job: Job) -> io::Result<()> {
        // Reserve an idle worker first, so a queued job never waits behind
        // a busy one.
        let reserved = self.idle.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if reserved {
            if let Ok(tx) = self.tx.lock() {
                match tx.send(job) {
                    Ok(()) => return Ok(()),
                    Err(mpsc::SendError(job)) => {
                        self.idle.fetch_add(1, Ordering::SeqCst);
                        return std::thread::Builder::new().stack_size(STACK).spawn(job).map(|_| ());
                    }
                }
            }
            self.idle.fetch_add(1, Ordering::SeqCst);
        }
        std::thread::Builder::new().stack_size(STACK).spawn(job).map(|_| ())
    }
}

const STACK: usize = 512 * 1024;

pub struct Agent {
    pub writer: Writer,
    pool: Pool,
    pub runtime: Arc<Runtime>,
    pub sandbox_id: Mutex<String>,
    /// Where the agent publishes state files (sandbox-id).
    pub run_dir: String,
    running: Mutex<HashMap<u64, Running>>,
    pub procs: procs::Table,
}

pub type Reply = Result<Resp, AgentError>;

pub fn error(kind: Kind, message: impl Into<String>) -> AgentError {
    AgentError { kind: kind as i32, message: message.into() }
}

/// Maps an OS error onto the protocol's error kinds.
pub fn io_error(context: &str, e: &io::Error) -> AgentError {
    let kind = match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ENODEV) | Some(libc::ENXIO) => Kind::NotFound,
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => Kind::Permission,
        Some(libc::EEXIST) | Some(libc::EBUSY) => Kind::Exists,
        Some(libc::EINVAL)
        | Some(libc::EISDIR)
        | Some(libc::ENOTEMPTY)
        | Some(libc::ENAMETOOLONG)
        | Some(libc::ELOOP) => Kind::Invalid,
        Some(libc::EFBIG) | Some(libc::ENOSPC) | Some(libc::E2BIG) | Some(libc::EDQUOT) => Kind::TooLarge,
        Some(libc::ETIMEDOUT) => Kind::Timeout,
        _ => match e.kind() {
            io::ErrorKind::NotFound => Kind::NotFound,
            io::ErrorKind::PermissionDenied => Kind::Permission,
            io::ErrorKind::AlreadyExists => Kind::Exists,
            io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => Kind::Invalid,
            io::ErrorKind::TimedOut => Kind::Timeout,
            _ => Kind::Internal,
        },
    };
    error(kind, format!("{context}: {e}"))
}

impl Agent {
    pub fn new(runtime: Arc<Runtime>, run_dir: &str) -> Arc<Agent> {
        Arc::new(Agent {
            writer: Writer::default(),
            pool: Pool::new(4),
            runtime,
            sandbox_id: Mutex::new(String::new()),
            run_dir: run_dir.to_string(),
            running: Mutex::new(HashMap::new()),
            procs: procs::Table::default(),
        })
    }

    pub fn send(&self, id: u64, body: Resp) {
        self.writer.send(&Response { id, body: Some(body) });
    }

    pub fn reply(&self, id: u64, r: Reply) {
        self.send(id, r.unwrap_or_else(Resp::Error));
    }

    pub fn register(&self, id: u64, r: Running) {
        if let Ok(mut g) = self.running.lock() {
            g.insert(id, r);
        }
    }

    pub fn unregister(&self, id: u64) {
        if let Ok(mut g) = self.running.lock() {
            g.remove(&id);
        }
    }

    fn pong(&self) -> Pong {
        let up = sys::clock(libc::CLOCK_BOOTTIME);
        Pong {
            runtime_ready: self.runtime.ready(),
            runtime: self.runtime.kind().to_string(),
            uptime_secs: up.tv_sec as f64 + up.tv_nsec as f64 / 1e9,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            sandbox_id: self.sandbox_id.lock().map(|s| s.clone()).unwrap_or_default(),
        }
    }

    fn cancel(&self, target: u64) -> Reply {
        let g = self.running.lock().map_err(|_| error(Kind::Internal, "lock poisoned"))?;
        match g.get(&target) {
            Some(Running::Exec(h)) => {
                h.cancel();
                Ok(Resp::Ack(Ack {}))
            }
            Some(Running::Eval) => {
                self.runtime.interrupt();
                Ok(Resp::Ack(Ack {}))
            }
            Some(Running::Stream(c)) => {
                c.store(true, Ordering::SeqCst);
                Ok(Resp::Ack(Ack {}))
            }
            Some(Running::Port(p)) => {
                p.cancel();
                Ok(Resp::Ack(Ack {}))
            }
            None => Err(error(Kind::NotFound, format!("no running request {target}"))),
        }
    }

    /// Ends every attach and watch stream: their host connection is gone
    /// (or, after a restore, belonged to the parent). Processes keep running.
    pub fn cancel_streams(&self) {
        if let Ok(g) = self.running.lock() {
            for r in g.values() {
                match r {
                    Running::Stream(c) => c.store(true, Ordering::SeqCst),
                    Running::Port(p) => p.cancel(),
                    _ => {}
                }
            }
        }
    }

    /// Runs a long-lived stream registered for Cancel, within the limit.
    fn stream(self: &Arc<Self>, id: u64, f: impl FnOnce(&Arc<Agent>, &AtomicBool) -> Result<(), AgentError>) {
        let flag = Arc::new(AtomicBool::new(false));
        {
            let Ok(mut g) = self.running.lock() else { return };
            let streams = g.values().filter(|r| matches!(r, Running::Stream(_))).count();
            if streams >= MAX_STREAMS {
                drop(g);
                self.reply(id, Err(error(Kind::TooLarge, format!("more than {MAX_STREAMS} attach/watch streams"))));
                return;
            }
            g.insert(id, Running::Stream(flag.clone()));
        }
        let r = f(self, &flag);
        self.unregister(id);
        if let Err(e) = r {
            self.send(id, Resp::Error(e));
        }
    }

    /// Opens a port stream registered for PortSend and Cancel, within the
    /// limit, and runs it on a thread of its own.
    fn open_port(self: &Arc<Self>, id: u64, req: forkd_agent_protocol::v1::PortOpenRequest) {
        let stream = match ports::new_stream(req.window) {
            Ok(s) => s,
            Err(e) => return self.reply(id, Err(e)),
        };
        {
            let Ok(mut g) = self.running.lock() else { return };
            let open = g.values().filter(|r| matches!(r, Running::Port(_))).count();
            if open >= ports::MAX_PORT_STREAMS {
                drop(g);
                let msg = format!("more than {} port connections at once", ports::MAX_PORT_STREAMS);
                return self.reply(id, Err(error(Kind::TooLarge, msg)));
            }
            g.insert(id, Running::Port(stream.clone()));
        }
        let me = self.clone();
        let started = std::thread::Builder::new().name("port".into()).stack_size(STACK).spawn(move || {
            let r = ports::run(&me, id, req, &stream);
            me.unregister(id);
            if let Err(e) = r {
                me.send(id, Resp::Error(e));
            }
        });
        if let Err(e) = started {
            self.unregister(id);
            self.reply(id, Err(io_error("starting a port thread", &e)));
        }
    }

    /// Hands data and credit to a port stream; never answered, never blocks.
    fn port_send(&self, req: forkd_agent_protocol::v1::PortSendRequest) {
        let stream = match self.running.lock() {
            Ok(g) => match g.get(&req.target_id) {
                Some(Running::Port(p)) => p.clone(),
                _ => return,
            },
            Err(_) => return,
        };
        stream.accept(req);
    }

    /// Handles one request. Cheap ones are answered on the reader thread;
    /// everything that may block gets its own thread.
    pub fn dispatch(self: &Arc<Self>, req: Request) {
        let id = req.id;
        let Some(body) = req.body else {
            self.reply(id, Err(error(Kind::Invalid, "request without a body")));
            return;
        };
        match body {
            Req::Ping(_) => self.send(id, Resp::Pong(self.pong())),
            Req::Cancel(c) => {
                let r = self.cancel(c.target_id);
                self.reply(id, r);
            }
            Req::PortSend(s) => self.port_send(s),
            Req::PortOpen(o) => self.open_port(id, o),
            other => {
                let me = self.clone();
                if let Err(e) = self.pool.run(Box::new(move || me.handle(id, other))) {
                    self.reply(id, Err(io_error("starting a request thread", &e)));
                }
            }
        }
    }

    fn handle(self: Arc<Self>, id: u64, body: Req) {
        let r = match body {
            Req::Reinit(r) => {
                // Streams of the connection this VM was snapshotted with.
                self.cancel_streams();
                let sandbox_id = r.sandbox_id.clone();
                let r = reinit::reinit(&self, r).map(Resp::ReinitDone);
                self.reply(id, r);
                reinit::record_identity(&self, &sandbox_id);
                return;
            }
            Req::Exec(e) => {
                // Exec streams its own frames and ends with ExecExit or Error.
                exec::run(&self, id, e);
                return;
            }
            Req::Eval(e) => {
                self.register(id, Running::Eval);
                let r = self.runtime.eval_streamed(&e, &mut |stream, text| {
                    let stream =
                        if stream == "stderr" { eval_output::Stream::Stderr } else { eval_output::Stream::Stdout };
                    self.send(id, Resp::EvalOutput(EvalOutput { stream: stream as i32, text: text.to_string() }));
                });
                self.unregister(id);
                Ok(Resp::EvalResult(r))
            }
            Req::ReadFile(r) => files::read_file(&r).map(Resp::FileData),
            Req::WriteFile(w) => files::write_file(&w).map(|_| Resp::Ack(Ack {})),
            Req::ListDir(l) => files::list_dir(&l.path).map(Resp::DirListing),
            Req::Stat(s) => files::stat(&s.path).map(Resp::FileStat),
            Req::Remove(r) => files::remove(&r).map(|_| Resp::Ack(Ack {})),
            Req::MakeDir(m) => files::make_dir(&m).map(Resp::FileStat),
            Req::Rename(r) => files::rename(&r).map(Resp::FileStat),
            Req::Mount(m) => files::mount(&m).map(|_| Resp::Ack(Ack {})),
            Req::ProcStart(p) => procs::start(&self, p).map(Resp::ProcInfo),
            Req::ProcAttach(a) => {
                self.stream(id, |agent, cancelled| procs::attach(agent, id, a, cancelled));
                return;
            }
            Req::Watch(w) => {
                self.stream(id, |agent, cancelled| watch::run(agent, id, w, cancelled));
                return;
            }
            Req::ProcInput(i) => procs::input(&self, i).map(|written| Resp::ProcInputDone(ProcInputDone { written })),
            Req::ProcSignal(s) => procs::signal(&self, s).map(|_| Resp::Ack(Ack {})),
            Req::ProcResize(r) => procs::resize(&self, r).map(|_| Resp::Ack(Ack {})),
            Req::ProcList(_) => Ok(Resp::ProcTable(self.procs.list())),
            Req::Ping(_) | Req::Cancel(_) | Req::PortSend(_) | Req::PortOpen(_) => unreachable!("answered inline"),
        };
        self.reply(id, r);
    }
}

/// Reads frames from `fd` and dispatches them.
///
/// With `reconnecting` (a virtio-serial port) a hang-up only means the host
/// side is not connected right now: partial input is dropped and the loop
/// waits for the next connection. Otherwise end of input returns.
pub fn serve(agent: &Arc<Agent>, fd: RawFd, reconnecting: bool) {
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut idle = Duration::from_millis(1);
    let mut last_rx = Instant::now();
    loop {
        let rev = match sys::poll_one(fd, libc::POLLIN, None) {
            Ok(r) => r,
            Err(e) => {
                log::error(&format!("poll on the agent channel: {e}"));
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let mut disconnected = false;
        if rev & libc::POLLIN != 0 {
            // Never more than the decoder has room for (see its bound).
            let room = decoder.space().min(buf.len());
            match sys::read(fd, &mut buf[..room]) {
                Ok(0) => disconnected = true,
                Ok(n) => {
                    idle = Duration::from_millis(1);
                    // A host that dropped the connection mid-frame and came
                    // straight back may leave no hang-up for us to see. Its
                    // next frame then arrives, after a pause, starting with
                    // the magic: drop whatever fragment is still buffered
                    // instead of letting it swallow the new frame.
                    if buf[..n].starts_with(MAGIC) && last_rx.elapsed() >= RESYNC_GAP {
                        decoder = FrameDecoder::new();
                    }
                    last_rx = Instant::now();
                    agent.writer.host_active();
                    decoder.push(&buf[..n]);
                    loop {
                        match decoder.next_message::<Request>() {
                            Ok(Some(req)) => agent.dispatch(req),
                            Ok(None) => break,
                            Err(e) => log::info(&format!("{e}")),
                        }
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(e) => {
                    log::info(&format!("read from the agent channel: {e}"));
                    disconnected = true;
                }
            }
        } else if rev & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            disconnected = true;
        }
        if disconnected {
            agent.cancel_streams();
            if !reconnecting {
                return;
            }
            // A new connection starts from a clean frame boundary.
            decoder = FrameDecoder::new();
            std::thread::sleep(idle);
            idle = (idle * 2).min(Duration::from_millis(20));
        }
    }
}
