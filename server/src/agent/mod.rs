//! Host side of the agent channel: one connection per VM to the guest agent's
//! byte stream, with many requests in flight. Responses are matched to their
//! request by id; a streaming request (exec) receives many responses.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use forkd_agent_protocol::v1::{self as pb, request, response};
use forkd_agent_protocol::{FrameDecoder, encode_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex, mpsc};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to {path}: {reason}")]
    Connect { path: String, reason: String },
    #[error("the channel to the guest is closed")]
    Closed,
    #[error("no answer to {0}")]
    Timeout(String),
    #[error("guest error: {message}")]
    Guest { kind: i32, message: String },
    #[error("unexpected answer to {0}")]
    Unexpected(&'static str),
    #[error("channel i/o: {0}")]
    Io(#[from] std::io::Error),
}

type Waiters = Arc<std::sync::Mutex<HashMap<u64, mpsc::UnboundedSender<response::Body>>>>;

/// A connection to one guest agent. Cheap to share behind an `Arc`.
pub struct AgentClient {
    writer: Mutex<OwnedWriteHalf>,
    waiters: Waiters,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
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
        let reader = tokio::spawn(async move {
            let mut dec = FrameDecoder::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                dec.push(&buf[..n]);
                loop {
                    match dec.next_message::<pb::Response>() {
                        Ok(Some(resp)) => {
                            let Some(body) = resp.body else { continue };
                            let tx = reader_waiters.lock().unwrap().get(&resp.id).cloned();
                            if let Some(tx) = tx {
                                let _ = tx.send(body);
                            }
                        }
                        Ok(None) => break,
                        Err(e) => tracing::warn!("agent channel: {e}"),
                    }
                }
            }
            // Dropping every sender wakes all waiters with `Closed`.
            reader_waiters.lock().unwrap().clear();
        });
        Ok(Self {
            writer: Mutex::new(w),
            waiters,
            // Start ids from a random point: answers meant for a previous
            // connection (a snapshot taken mid-request) never match.
            next_id: AtomicU64::new(rand::random::<u32>() as u64 + 1),
            reader,
        })
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
            writer: Mutex::new(w),
            waiters: Default::default(),
            next_id: AtomicU64::new(1),
            reader: tokio::spawn(async {}),
        }
    }

    /// Sends a request and returns the receiver of its responses.
    async fn send(&self, body: request::Body) -> Result<(u64, Responses), AgentError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.waiters.lock().unwrap().insert(id, tx);
        let frame = encode_frame(&pb::Request { id, body: Some(body) });
        let mut w = self.writer.lock().await;
        if let Err(e) = w.write_all(&frame).await {
            self.waiters.lock().unwrap().remove(&id);
            return Err(e.into());
        }
        drop(w);
        Ok((id, Responses { id, rx, waiters: self.waiters.clone() }))
    }

    async fn call(
        &self,
        body: request::Body,
        what: &'static str,
        timeout: Duration,
    ) -> Result<response::Body, AgentError> {
        let (_, mut rx) = self.send(body).await?;
        match tokio::time::timeout(timeout, rx.recv()).await {
            Err(_) => Err(AgentError::Timeout(what.into())),
            Ok(None) => Err(AgentError::Closed),
            Ok(Some(response::Body::Error(e))) => Err(AgentError::Guest { kind: e.kind, message: e.message }),
            Ok(Some(b)) => Ok(b),
        }
    }

    pub async fn ping(&self, timeout: Duration) -> Result<pb::Pong, AgentError> {
        match self.call(request::Body::Ping(pb::PingRequest {}), "ping", timeout).await? {
            response::Body::Pong(p) => Ok(p),
            _ => Err(AgentError::Unexpected("ping")),
        }
    }

    pub async fn reinit(&self, req: pb::ReinitRequest, timeout: Duration) -> Result<pb::ReinitDone, AgentError> {
        match self.call(request::Body::Reinit(req), "reinit", timeout).await? {
            response::Body::ReinitDone(d) => Ok(d),
            _ => Err(AgentError::Unexpected("reinit")),
        }
    }

    pub async fn eval(&self, req: pb::EvalRequest, timeout: Duration) -> Result<pb::EvalResult, AgentError> {
        match self.call(request::Body::Eval(req), "eval", timeout).await? {
            response::Body::EvalResult(r) => Ok(r),
            _ => Err(AgentError::Unexpected("eval")),
        }
    }

    /// Starts a command; its output arrives on the returned stream.
    pub async fn exec(&self, req: pb::ExecRequest) -> Result<ExecStream, AgentError> {
        let (_, rx) = self.send(request::Body::Exec(req)).await?;
        Ok(ExecStream { rx, done: false })
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

    pub async fn mount(&self, req: pb::MountRequest, timeout: Duration) -> Result<(), AgentError> {
        match self.call(request::Body::Mount(req), "mount", timeout).await? {
            response::Body::Ack(_) => Ok(()),
            _ => Err(AgentError::Unexpected("mount")),
        }
    }
}

/// Responses to one request; unregisters itself when dropped.
struct Responses {
    id: u64,
    rx: mpsc::UnboundedReceiver<response::Body>,
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

/// The output of one exec.
pub struct ExecStream {
    rx: Responses,
    done: bool,
}

impl ExecStream {
    /// Next piece of output; `Ok(None)` after the exit status.
    pub async fn next(&mut self) -> Result<Option<ExecEvent>, AgentError> {
        if self.done {
            return Ok(None);
        }
        match self.rx.recv().await {
            None => Err(AgentError::Closed),
            Some(response::Body::ExecOutput(o)) => Ok(Some(if o.stream == pb::exec_output::Stream::Stderr as i32 {
                ExecEvent::Stderr(o.data)
            } else {
                ExecEvent::Stdout(o.data)
            })),
            Some(response::Body::ExecExit(x)) => {
                self.done = true;
                Ok(Some(ExecEvent::Exit(x)))
            }
            Some(response::Body::Error(e)) => {
                self.done = true;
                Err(AgentError::Guest { kind: e.kind, message: e.message })
            }
            Some(_) => Err(AgentError::Unexpected("exec")),
        }
    }
}
