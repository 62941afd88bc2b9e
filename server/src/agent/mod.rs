//! Host side of the agent channel: one connection per VM to the guest agent's
//! byte stream, with many requests in flight. Responses are matched to their
//! request by id; a streaming request (exec) receives many responses.
//!
//! The guest is an attacker. Every request's responses wait in a small
//! bounded queue; when a reader falls behind, the channel's reader waits for
//! it, so the guest's writes stall instead of the daemon buffering them.
//! Every write to the guest has a deadline: a guest that stops draining its
//! port breaks the channel. A guest that sends malformed frames past a small
//! budget breaks it too. A broken channel fails every call, says why once,
//! and the runtime then stops the sandbox. Text from the guest is clipped
//! and escaped before it reaches a log or an error.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use forkd_agent_protocol::v1::{self as pb, request, response};
use forkd_agent_protocol::{FrameDecoder, encode_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex, mpsc};

pub mod ports;

/// Responses queued per request before the channel's reader waits.
const QUEUE_PER_REQUEST: usize = 4;
/// Responses queued for a lossy stream (attach, watch) before it is
/// dropped as lagged.
const LOSSY_QUEUE: usize = 64;
/// Longest a write to the guest may take.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Malformed frames tolerated before the channel is broken.
pub const MALFORMED_BUDGET: u64 = 16;
/// Garbage bytes (outside any frame) tolerated before the channel is
/// broken. A restored child may resume mid-frame once; a guest that keeps
/// sending noise is not talking the protocol.
pub const GARBAGE_BUDGET: u64 = 1 << 20;
/// How long past its own timeout an exec may go before the host stops
/// waiting for the guest to report its exit (and cancels it).
pub const EXEC_GRACE: Duration = Duration::from_secs(10);
/// Longest guest-provided text kept in an error.
pub const MAX_GUEST_TEXT: usize = 4096;

/// Guest text made safe for logs and errors: clipped, control characters
/// escaped.
pub fn guest_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_GUEST_TEXT));
    for c in s.chars() {
        if out.len() >= MAX_GUEST_TEXT {
            out.push('…');
            break;
        }
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to {path}: {reason}")]
    Connect { path: String, reason: String },
    #[error("the channel to the guest is closed")]
    Closed,
    #[error("the channel to the guest is broken: {0}")]
    Broken(String),
    #[error("no answer to {0}")]
    Timeout(String),
    #[error("guest error: {message}")]
    Guest { kind: i32, message: String },
    #[error("unexpected answer to {0}")]
    Unexpected(&'static str),
    #[error("channel i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Where one request's responses go. A lossy waiter (a process attach or a
/// file watch, which may live for hours behind a slow client) never makes
/// the channel's reader wait: when its queue is full it is dropped and
/// marked lagged, and its owner resumes from what it last saw.
struct Waiter {
    tx: mpsc::Sender<response::Body>,
    lagged: Option<Arc<AtomicBool>>,
    /// A port stream's send credit: grants from the guest are added here
    /// by the channel's reader itself instead of being queued.
    credit: Option<Arc<tokio::sync::Semaphore>>,
}

/// How one request's responses are to be delivered: a `Waiter` before its
/// queue exists.
struct Delivery {
    lagged: Option<Arc<AtomicBool>>,
    credit: Option<Arc<tokio::sync::Semaphore>>,
    queue: usize,
}

type Waiters = Arc<std::sync::Mutex<HashMap<u64, Waiter>>>;
type Failure = Arc<std::sync::OnceLock<String>>;

/// A re-init on its way: its answer, awaited with `done`.
pub struct PendingReinit {
    rx: Responses,
    timeout: Duration,
}

impl PendingReinit {
    /// Waits for the agent's answer on `agent`, the client that sent it.
    pub async fn done(self, agent: &AgentClient) -> Result<pb::ReinitDone, AgentError> {
        match agent.answer(self.rx, "reinit", self.timeout).await? {
            response::Body::ReinitDone(d) => Ok(d),
            _ => Err(AgentError::Unexpected("reinit")),
        }
    }
}

/// A connection to one guest agent. Cheap to share behind an `Arc`.
pub struct AgentClient {
    writer: Arc<Mutex<OwnedWriteHalf>>,
    waiters: Waiters,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
    /// Why the channel broke, once it has.
    failure: Failure,
    /// Commands started through this connection (exec, eval, processes).
    commands: AtomicU64,
}

/// Records why the channel broke (the first reason wins, logged once) and
/// wakes every waiter.
fn break_channel(failure: &Failure, waiters: &Waiters, why: String) {
    if failure.set(why.clone()).is_ok() {
        tracing::warn!("agent channel broken: {why}");
    }
    waiters.lock().unwrap().clear();
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Output of a streaming exec, as it arrives.
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(pb::ExecExit),
}

impl AgentClient {
    /// Connects to the VMM's end of the channel, retrying until `timeout`
    /// while the VMM creates the socket.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, AgentError> {
        let stream = crate::vmm::connect_when_ready(path, timeout)
            .await
            .map_err(|e| AgentError::Connect { path: path.display().to_string(), reason: e.to_string() })?;
        let (mut r, w) = stream.into_split();
        let waiters: Waiters = Default::default();
        let reader_waiters = waiters.clone();
        let failure: Failure = Default::default();
        let reader_failure = failure.clone();
        let reader = tokio::spawn(async move {
            let mut dec = FrameDecoder::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut malformed = 0u64;
            'read: loop {
                // Never more than the decoder can take (its buffer is bounded).
                let room = dec.space().min(buf.len());
                let n = match r.read(&mut buf[..room]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                dec.push(&buf[..n]);
                loop {
                    match dec.next_message::<pb::Response>() {
                        Ok(Some(resp)) => {
                            let Some(body) = resp.body else { continue };
                            let waiter = reader_waiters
                                .lock()
                                .unwrap()
                                .get(&resp.id)
                                .map(|w| (w.tx.clone(), w.lagged.clone(), w.credit.clone()));
                            let (body, waiter) = match waiter {
                                Some((tx, lagged, Some(credit))) => match ports::take_grant(body, &credit) {
                                    Some(body) => (body, Some((tx, lagged))),
                                    None => continue,
                                },
                                Some((tx, lagged, None)) => (body, Some((tx, lagged))),
                                None => (body, None),
                            };
                            match waiter {
                                // Waiting here is the backpressure: a slow reader
                                // of this response stalls the guest, not memory.
                                Some((tx, None)) => {
                                    let _ = tx.send(body).await;
                                }
                                Some((tx, Some(lagged))) => {
                                    if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(body) {
                                        lagged.store(true, Ordering::SeqCst);
                                        reader_waiters.lock().unwrap().remove(&resp.id);
                                    }
                                }
                                None => {}
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            malformed += 1;
                            if malformed > MALFORMED_BUDGET {
                                let why =
                                    format!("{malformed} malformed frames (last: {})", guest_text(&e.to_string()));
                                break_channel(&reader_failure, &reader_waiters, why);
                                break 'read;
                            }
                        }
                    }
                }
                if dec.skipped() > GARBAGE_BUDGET {
                    let why = format!("{} bytes of garbage outside frames", dec.skipped());
                    break_channel(&reader_failure, &reader_waiters, why);
                    break;
                }
            }
            // Dropping every sender wakes all waiters with `Closed`.
            reader_waiters.lock().unwrap().clear();
        });
        Ok(Self {
            writer: Arc::new(Mutex::new(w)),
            waiters,
            // Start ids from a random point: answers meant for a previous
            // connection (a snapshot taken mid-request) never match.
            next_id: AtomicU64::new(rand::random::<u32>() as u64 + 1),
            reader,
            failure,
            commands: AtomicU64::new(0),
        })
    }

    /// Why the channel broke, if it did (the runtime stops such a sandbox).
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(|s| s.as_str())
    }

    /// A client whose channel is already closed (its VM is gone): every
    /// call fails with `Closed`.
    pub fn disconnected() -> Self {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        drop(theirs);
        ours.set_nonblocking(true).expect("nonblocking socket");
        let stream = tokio::net::UnixStream::from_std(ours).expect("register socket");
        let (_r, w) = stream.into_split();
        Self {
            writer: Arc::new(Mutex::new(w)),
            waiters: Default::default(),
            next_id: AtomicU64::new(1),
            reader: tokio::spawn(async {}),
            failure: Default::default(),
            commands: AtomicU64::new(0),
        }
    }

    /// Commands started through this connection (exec, eval, processes).
    pub fn commands(&self) -> u64 {
        self.commands.load(Ordering::Relaxed)
    }

    fn count_command(&self) {
        self.commands.fetch_add(1, Ordering::Relaxed);
    }

    /// Sends a request and returns the receiver of its responses.
    async fn send(&self, body: request::Body) -> Result<(u64, Responses), AgentError> {
        self.send_with(body, None).await
    }

    async fn send_with(
        &self,
        body: request::Body,
        lagged: Option<Arc<AtomicBool>>,
    ) -> Result<(u64, Responses), AgentError> {
        let queue = if lagged.is_some() { LOSSY_QUEUE } else { QUEUE_PER_REQUEST };
        self.send_to(body, Delivery { lagged, credit: None, queue }).await
    }

    /// Sends a request whose responses are delivered as `delivery` says.
    async fn send_to(&self, body: request::Body, delivery: Delivery) -> Result<(u64, Responses), AgentError> {
        if let Some(why) = self.failure() {
            return Err(AgentError::Broken(why.to_string()));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(delivery.queue);
        let waiter = Waiter { tx, lagged: delivery.lagged, credit: delivery.credit };
        self.waiters.lock().unwrap().insert(id, waiter);
        let frame = encode_frame(&pb::Request { id, body: Some(body) });
        if let Err(e) = write_frame(&self.writer, &frame, &self.failure, &self.waiters).await {
            self.waiters.lock().unwrap().remove(&id);
            return Err(e);
        }
        Ok((id, Responses { id, rx, waiters: self.waiters.clone() }))
    }

    async fn call(
        &self,
        body: request::Body,
        what: &'static str,
        timeout: Duration,
    ) -> Result<response::Body, AgentError> {
        let (_, rx) =
            tokio::time::timeout(timeout, self.send(body)).await.map_err(|_| AgentError::Timeout(what.into()))??;
        self.answer(rx, what, timeout).await
    }

    /// The one answer to a request sent with `send`.
    async fn answer(
        &self,
        mut rx: Responses,
        what: &'static str,
        timeout: Duration,
    ) -> Result<response::Body, AgentError> {
        match tokio::time::timeout(timeout, rx.recv()).await {
            Err(_) => Err(AgentError::Timeout(what.into())),
            Ok(None) => Err(self.closed()),
            Ok(Some(response::Body::Error(e))) => {
                Err(AgentError::Guest { kind: e.kind, message: guest_text(&e.message) })
            }
            Ok(Some(b)) => Ok(b),
        }
    }

    /// `Closed`, or `Broken` with the reason when the channel broke.
    fn closed(&self) -> AgentError {
        match self.failure() {
            Some(why) => AgentError::Broken(why.to_string()),
            None => AgentError::Closed,
        }
    }

    pub async fn ping(&self, timeout: Duration) -> Result<pb::Pong, AgentError> {
        match self.call(request::Body::Ping(pb::PingRequest {}), "ping", timeout).await? {
            response::Body::Pong(p) => Ok(p),
            _ => Err(AgentError::Unexpected("ping")),
        }
    }

    pub async fn reinit(&self, req: pb::ReinitRequest, timeout: Duration) -> Result<pb::ReinitDone, AgentError> {
        self.send_reinit(req, timeout).await?.done(self).await
    }

    /// Queues a re-init on the channel without waiting for its answer. Sent
    /// while the vCPUs are still stopped, it is the first thing the agent
    /// reads when they resume: no round trip between resume and re-init.
    pub async fn send_reinit(&self, req: pb::ReinitRequest, timeout: Duration) -> Result<PendingReinit, AgentError> {
        let (_, rx) = tokio::time::timeout(timeout, self.send(request::Body::Reinit(req)))
            .await
            .map_err(|_| AgentError::Timeout("reinit".into()))??;
        Ok(PendingReinit { rx, timeout })
    }

    pub async fn eval(&self, req: pb::EvalRequest, timeout: Duration) -> Result<pb::EvalResult, AgentError> {
        self.count_command();
        match self.call(request::Body::Eval(req), "eval", timeout).await? {
            response::Body::EvalResult(r) => Ok(r),
            _ => Err(AgentError::Unexpected("eval")),
        }
    }

    /// Evaluates with `req.stream` set: what the code prints goes to
    /// `output` as it comes (dropped when `output` is full: a slow reader
    /// must not stall the channel), then the result. The evaluation is not
    /// cancelled when this future is dropped.
    pub async fn eval_streamed(
        &self,
        mut req: pb::EvalRequest,
        timeout: Duration,
        output: &mpsc::Sender<pb::EvalOutput>,
    ) -> Result<pb::EvalResult, AgentError> {
        req.stream = true;
        self.count_command();
        let deadline = tokio::time::Instant::now() + timeout;
        let (_, mut rx) = tokio::time::timeout_at(deadline, self.send(request::Body::Eval(req)))
            .await
            .map_err(|_| AgentError::Timeout("eval".into()))??;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => return Err(AgentError::Timeout("eval".into())),
                Ok(None) => return Err(self.closed()),
                Ok(Some(response::Body::EvalOutput(o))) => {
                    let _ = output.try_send(o);
                }
                Ok(Some(response::Body::EvalResult(r))) => return Ok(r),
                Ok(Some(response::Body::Error(e))) => {
                    return Err(AgentError::Guest { kind: e.kind, message: guest_text(&e.message) });
                }
                Ok(Some(_)) => return Err(AgentError::Unexpected("eval")),
            }
        }
    }

    /// Starts a command; its output arrives on the returned stream.
    pub async fn exec(&self, req: pb::ExecRequest) -> Result<ExecStream, AgentError> {
        self.count_command();
        // The guest kills the command at its timeout; a guest that does not
        // say so within the grace period is not waited for any longer.
        let deadline = (req.timeout_ms > 0)
            .then(|| tokio::time::Instant::now() + Duration::from_millis(req.timeout_ms as u64) + EXEC_GRACE);
        let (id, rx) = self.send(request::Body::Exec(req)).await?;
        Ok(ExecStream { deadline, rx, cancel: self.cancel_on_drop(id) })
    }

    pub async fn read_file(&self, req: pb::ReadFileRequest, timeout: Duration) -> Result<pb::FileData, AgentError> {
        match self.call(request::Body::ReadFile(req), "read_file", timeout).await? {
            response::Body::FileData(d) => Ok(d),
            _ => Err(AgentError::Unexpected("read_file")),
        }
    }

    pub async fn write_file(&self, req: pb::WriteFileRequest, timeout: Duration) -> Result<(), AgentError> {
        match self.call(request::Body::WriteFile(req), "write_file", timeout).await? {
            response::Body::Ack(_) => Ok(()),
            _ => Err(AgentError::Unexpected("write_file")),
        }
    }

    pub async fn list_dir(&self, path: String, timeout: Duration) -> Result<pb::DirListing, AgentError> {
        match self.call(request::Body::ListDir(pb::ListDirRequest { path }), "list_dir", timeout).await? {
            response::Body::DirListing(d) => Ok(d),
            _ => Err(AgentError::Unexpected("list_dir")),
        }
    }

    pub async fn stat(&self, path: String, timeout: Duration) -> Result<pb::FileStat, AgentError> {
        match self.call(request::Body::Stat(pb::StatRequest { path }), "stat", timeout).await? {
            response::Body::FileStat(s) => Ok(s),
            _ => Err(AgentError::Unexpected("stat")),
        }
    }

    pub async fn remove(&self, path: String, recursive: bool, timeout: Duration) -> Result<(), AgentError> {
        match self.call(request::Body::Remove(pb::RemoveRequest { path, recursive }), "remove", timeout).await? {
            response::Body::Ack(_) => Ok(()),
            _ => Err(AgentError::Unexpected("remove")),
        }
    }

    pub async fn make_dir(&self, path: String, timeout: Duration) -> Result<pb::FileStat, AgentError> {
        match self.call(request::Body::MakeDir(pb::MakeDirRequest { path, mode: 0 }), "make_dir", timeout).await? {
            response::Body::FileStat(s) => Ok(s),
            _ => Err(AgentError::Unexpected("make_dir")),
        }
    }

    pub async fn rename(&self, from: String, to: String, timeout: Duration) -> Result<pb::FileStat, AgentError> {
        match self.call(request::Body::Rename(pb::RenameRequest { from, to }), "rename", timeout).await? {
            response::Body::FileStat(s) => Ok(s),
            _ => Err(AgentError::Unexpected("rename")),
        }
    }

    pub async fn mount(&self, req: pb::MountRequest, timeout: Duration) -> Result<(), AgentError> {
        match self.call(request::Body::Mount(req), "mount", timeout).await? {
            response::Body::Ack(_) => Ok(()),
            _ => Err(AgentError::Unexpected("mount")),
        }
    }

    /// Starts a process of the guest's process table.
    pub async fn proc_start(&self, req: pb::ProcStartRequest, timeout: Duration) -> Result<pb::ProcInfo, AgentError> {
        self.count_command();
        match self.call(request::Body::ProcStart(req), "proc_start", timeout).await? {
            response::Body::ProcInfo(i) => Ok(i),
            _ => Err(AgentError::Unexpected("proc_start")),
        }
    }

    pub async fn proc_list(&self, timeout: Duration) -> Result<pb::ProcTable, AgentError> {
        match self.call(request::Body::ProcList(pb::ProcListRequest {}), "proc_list", timeout).await? {
            response::Body::ProcTable(t) => Ok(t),
            _ => Err(AgentError::Unexpected("proc_list")),
        }
    }

    /// Writes input for a process; answers how much of it went in.
    pub async fn proc_input(&self, req: pb::ProcInputRequest, timeout: Duration) -> Result<u64, AgentError> {
        match self.call(request::Body::ProcInput(req), "proc_input", timeout).await? {
            response::Body::ProcInputDone(d) => Ok(d.written),
            _ => Err(AgentError::Unexpected("proc_input")),
        }
    }

    /// A signal or a resize for a process: answered with an ack.
    pub async fn proc_control(&self, body: request::Body, timeout: Duration) -> Result<(), AgentError> {
        match self.call(body, "process control", timeout).await? {
            response::Body::Ack(_) => Ok(()),
            _ => Err(AgentError::Unexpected("process control")),
        }
    }

    /// Follows a process's output from an offset. The stream is lossy: a
    /// consumer that falls behind sees it end as lagged and attaches again
    /// from the last offset it got (the output waits in the guest's ring).
    pub async fn proc_attach(&self, req: pb::ProcAttachRequest) -> Result<Subscription, AgentError> {
        self.subscribe(request::Body::ProcAttach(req)).await
    }

    /// Follows file-system events under a guest directory (lossy, as
    /// [`proc_attach`](Self::proc_attach)).
    pub async fn watch(&self, req: pb::WatchRequest) -> Result<Subscription, AgentError> {
        self.subscribe(request::Body::Watch(req)).await
    }

    fn cancel_on_drop(&self, id: u64) -> CancelOnDrop {
        CancelOnDrop {
            id,
            done: false,
            writer: self.writer.clone(),
            failure: self.failure.clone(),
            waiters: self.waiters.clone(),
        }
    }

    async fn subscribe(&self, body: request::Body) -> Result<Subscription, AgentError> {
        let lagged = Arc::new(AtomicBool::new(false));
        let (id, rx) = self.send_with(body, Some(lagged.clone())).await?;
        Ok(Subscription { rx, lagged, cancel: self.cancel_on_drop(id) })
    }
}

/// How a subscription's stream of responses ended.
#[derive(Debug)]
pub enum SubscriptionEnd {
    /// The consumer fell behind: the agent was told to stop; resume.
    Lagged,
    /// The channel closed or broke.
    Closed(AgentError),
}

/// A long-lived stream of responses (attach, watch); cancelled in the
/// guest when dropped.
pub struct Subscription {
    rx: Responses,
    lagged: Arc<AtomicBool>,
    cancel: CancelOnDrop,
}

impl Subscription {
    /// The next response; guest errors come back as `Err(Closed(Guest))`.
    pub async fn next(&mut self) -> Result<response::Body, SubscriptionEnd> {
        match self.rx.recv().await {
            Some(response::Body::Error(e)) => {
                self.cancel.done = true;
                Err(SubscriptionEnd::Closed(AgentError::Guest { kind: e.kind, message: guest_text(&e.message) }))
            }
            Some(b) => Ok(b),
            None if self.lagged.load(Ordering::SeqCst) => Err(SubscriptionEnd::Lagged),
            None => {
                self.cancel.done = true;
                Err(SubscriptionEnd::Closed(match self.cancel.failure.get() {
                    Some(why) => AgentError::Broken(why.clone()),
                    None => AgentError::Closed,
                }))
            }
        }
    }

    /// The guest ended the stream itself (e.g. the process exited): no
    /// cancel is needed.
    pub fn finished(&mut self) {
        self.cancel.done = true;
    }
}

/// Tells the guest to stop request `id` unless it finished.
struct CancelOnDrop {
    id: u64,
    done: bool,
    writer: Arc<Mutex<OwnedWriteHalf>>,
    failure: Failure,
    waiters: Waiters,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.done || self.failure.get().is_some() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        let frame = encode_frame(&pb::Request {
            id: self.id.wrapping_add(1 << 63),
            body: Some(request::Body::Cancel(pb::CancelRequest { target_id: self.id })),
        });
        let (writer, failure, waiters) = (self.writer.clone(), self.failure.clone(), self.waiters.clone());
        handle.spawn(async move {
            let _ = write_frame(&writer, &frame, &failure, &waiters).await;
        });
    }
}

/// Writes one frame within `WRITE_TIMEOUT`; a guest that does not drain
/// its port in that time breaks the channel.
async fn write_frame(
    writer: &Mutex<OwnedWriteHalf>,
    frame: &[u8],
    failure: &Failure,
    waiters: &Waiters,
) -> Result<(), AgentError> {
    let write = async {
        let mut w = writer.lock().await;
        w.write_all(frame).await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => {
            let why = format!("the guest did not read its channel for {} s", WRITE_TIMEOUT.as_secs());
            break_channel(failure, waiters, why.clone());
            Err(AgentError::Broken(why))
        }
    }
}

/// Responses to one request; unregisters itself when dropped.
struct Responses {
    id: u64,
    rx: mpsc::Receiver<response::Body>,
    waiters: Waiters,
}

impl Responses {
    async fn recv(&mut self) -> Option<response::Body> {
        self.rx.recv().await
    }
}

impl Drop for Responses {
    fn drop(&mut self) {
        self.waiters.lock().unwrap().remove(&self.id);
    }
}

/// The output of one exec. Dropped before the exit status arrives (its
/// client went away), it tells the guest to kill the command.
pub struct ExecStream {
    /// When the host gives up on the exit status (None: no timeout).
    deadline: Option<tokio::time::Instant>,
    rx: Responses,
    cancel: CancelOnDrop,
}

impl ExecStream {
    /// Next piece of output; `Ok(None)` after the exit status.
    pub async fn next(&mut self) -> Result<Option<ExecEvent>, AgentError> {
        if self.cancel.done {
            return Ok(None);
        }
        let next = match self.deadline {
            Some(at) => match tokio::time::timeout_at(at, self.rx.recv()).await {
                Ok(n) => n,
                // Not done: dropping the stream cancels the command.
                Err(_) => return Err(AgentError::Timeout("exec (the guest did not report its exit)".into())),
            },
            None => self.rx.recv().await,
        };
        match next {
            None => {
                self.cancel.done = true;
                Err(match self.cancel.failure.get() {
                    Some(why) => AgentError::Broken(why.clone()),
                    None => AgentError::Closed,
                })
            }
            Some(response::Body::ExecOutput(o)) => Ok(Some(if o.stream == pb::exec_output::Stream::Stderr as i32 {
                ExecEvent::Stderr(o.data)
            } else {
                ExecEvent::Stdout(o.data)
            })),
            Some(response::Body::ExecExit(x)) => {
                self.cancel.done = true;
                Ok(Some(ExecEvent::Exit(x)))
            }
            Some(response::Body::Error(e)) => {
                self.cancel.done = true;
                Err(AgentError::Guest { kind: e.kind, message: guest_text(&e.message) })
            }
            Some(_) => Err(AgentError::Unexpected("exec")),
        }
    }
}

/// A client and the raw guest end of its channel, for tests that play a
/// (misbehaving) guest.
#[cfg(test)]
pub(crate) async fn test_pair() -> (AgentClient, tokio::net::UnixStream, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let client = AgentClient::connect(&sock, Duration::from_secs(2)).await.unwrap();
    let (guest, _) = listener.accept().await.unwrap();
    (client, guest, dir)
}

#[cfg(test)]
mod tests {
    use super::test_pair as pair;
    use super::*;

    #[tokio::test]
    async fn malformed_frames_past_the_budget_break_the_channel() {
        let (client, mut guest, _dir) = pair().await;
        let mut bad = Vec::new();
        for _ in 0..=MALFORMED_BUDGET {
            bad.extend_from_slice(forkd_agent_protocol::MAGIC);
            bad.extend_from_slice(&16u32.to_le_bytes());
            bad.extend_from_slice(&[0xff; 16]);
        }
        guest.write_all(&bad).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while client.failure().is_none() {
            assert!(tokio::time::Instant::now() < deadline, "channel not broken");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(client.failure().unwrap().contains("malformed frames"));
        let e = client.ping(Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(e, AgentError::Broken(_)), "{e}");
    }

    #[tokio::test]
    async fn garbage_past_the_budget_breaks_the_channel() {
        let (client, mut guest, _dir) = pair().await;
        let mut hdr = forkd_agent_protocol::MAGIC.to_vec();
        hdr.extend_from_slice(&u32::MAX.to_le_bytes());
        let junk: Vec<u8> = hdr.iter().copied().cycle().take(GARBAGE_BUDGET as usize + 64 * 1024).collect();
        let _ = guest.write_all(&junk).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while client.failure().is_none() {
            assert!(tokio::time::Instant::now() < deadline, "channel not broken");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(client.failure().unwrap().contains("garbage"));
    }

    #[tokio::test]
    async fn a_guest_that_does_not_read_breaks_the_channel_on_write() {
        let (client, _guest, _dir) = pair().await;
        // Nobody reads `_guest`: the socket buffer fills and the write stalls.
        let big = pb::ExecRequest { args: vec!["cat".into()], stdin: vec![b'x'; 8 << 20], ..Default::default() };
        let e = client.exec(big).await.err().expect("the write cannot finish");
        assert!(matches!(e, AgentError::Broken(ref why) if why.contains("did not read")), "{e}");
        assert!(client.failure().is_some());
    }

    #[test]
    fn guest_text_is_clipped_and_escaped() {
        assert_eq!(guest_text("a\u{1b}[2Jb\nc"), "a\\u{1b}[2Jb\nc");
        assert!(guest_text(&"x".repeat(100_000)).len() <= MAX_GUEST_TEXT + 4);
    }
}
