//! Processes of a sandbox (start detached, list, attach, signal, stdin,
//! resize), interactive exec and file watching: request validation and the
//! streams that follow the guest agent's process table.
//!
//! Attach and watch streams from the agent are lossy on the host (a slow
//! client must never stall the VM's channel): when one falls behind it is
//! dropped and resumed — an attach from the last output offset it
//! delivered (the bytes wait in the guest's ring buffer), a watch with an
//! overflow event.

use std::sync::Arc;
use std::time::Duration;

use forkd_agent_protocol::v1::{self as pb, request, response};
use forkd_api::v1 as api;
use tokio::sync::mpsc;
use tonic::Status;

use crate::agent::{Subscription, SubscriptionEnd};
use crate::core::Error;
use crate::core::sandboxes::Sandbox;

/// How long a control call (start, input, signal, resize, list) may take.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(15);
/// Most bytes one SendStdin call carries.
pub const MAX_STDIN_CHUNK: usize = 1 << 20;
/// Largest tag, and largest terminal side.
const MAX_TAG: usize = 64;
const MAX_PTY_SIDE: u32 = 1000;
/// Longest timeout a process may ask for.
const MAX_PROCESS_SECS: u32 = 7 * 24 * 3600;

/// A process tag: 1–64 of `[A-Za-z0-9._-]`, starting with a letter or a
/// digit, not all digits (those name pids).
pub fn check_tag(field: &str, tag: &str) -> Result<(), Error> {
    let ok = !tag.is_empty()
        && tag.len() <= MAX_TAG
        && tag.as_bytes()[0].is_ascii_alphanumeric()
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        && !tag.bytes().all(|b| b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "{tag:?} must be 1–{MAX_TAG} of [A-Za-z0-9._-], start with a letter or digit and not be all digits"
            ),
        ))
    }
}

/// A pid (digits) or a tag.
pub fn selector(raw: &str) -> Result<pb::ProcSelector, Error> {
    if raw.is_empty() {
        return Err(Error::invalid("process", "must name a pid or a tag"));
    }
    if raw.bytes().all(|b| b.is_ascii_digit()) {
        let pid: u32 =
            raw.parse().ok().filter(|p| *p > 0).ok_or_else(|| Error::invalid("process", format!("bad pid {raw:?}")))?;
        return Ok(pb::ProcSelector { pid, tag: String::new() });
    }
    check_tag("process", raw)?;
    Ok(pb::ProcSelector { pid: 0, tag: raw.to_string() })
}

/// A signal by number (1–64) or name (`TERM`, `SIGINT`, `kill`).
pub fn signal_number(raw: &str) -> Result<i32, Error> {
    let raw = raw.trim();
    if let Ok(n) = raw.parse::<i32>() {
        return if (1..=64).contains(&n) { Ok(n) } else { Err(Error::invalid("signal", format!("{n} is not 1–64"))) };
    }
    let upper = raw.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    name.parse::<nix::sys::signal::Signal>()
        .map(|s| s as i32)
        .map_err(|_| Error::invalid("signal", format!("{raw:?} is not a signal name or number")))
}

pub fn pty_size(field: &str, p: &api::PtySize) -> Result<pb::PtySize, Error> {
    for (side, v) in [("rows", p.rows), ("cols", p.cols)] {
        if v == 0 || v > MAX_PTY_SIDE {
            return Err(Error::invalid(&format!("{field}.{side}"), format!("{v} is not 1–{MAX_PTY_SIDE}")));
        }
    }
    Ok(pb::PtySize { rows: p.rows, cols: p.cols })
}

fn check_env(env: &std::collections::HashMap<String, String>) -> Result<(), Error> {
    for k in env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(Error::invalid("env", format!("bad variable name {k:?}")));
        }
    }
    Ok(())
}

/// What StartProcess (and ExecInteractive's first message) asks the agent.
pub struct Start {
    pub args: Vec<String>,
    pub env: std::collections::HashMap<String, String>,
    pub cwd: String,
    pub tag: String,
    pub pty: Option<api::PtySize>,
    pub stdin: bool,
    pub timeout_secs: u32,
    pub user: String,
}

impl Start {
    /// The agent's request, with what the request left out taken from the
    /// sandbox's image.
    pub fn into_agent_for(
        mut self,
        rt: &crate::core::runtime::Runtime,
        sb: &Sandbox,
    ) -> Result<pb::ProcStartRequest, Error> {
        rt.image_defaults(sb, &mut self.env, &mut self.cwd, &mut self.user);
        self.into_agent()
    }

    pub fn into_agent(self) -> Result<pb::ProcStartRequest, Error> {
        if self.args.is_empty() || self.args[0].is_empty() {
            return Err(Error::invalid("args", "must name a command"));
        }
        if !self.tag.is_empty() {
            check_tag("tag", &self.tag)?;
        }
        if !self.cwd.is_empty() && !self.cwd.starts_with('/') {
            return Err(Error::invalid("cwd", format!("{:?} must be an absolute guest path", self.cwd)));
        }
        if self.timeout_secs > MAX_PROCESS_SECS {
            return Err(Error::invalid("timeout_secs", format!("{} exceeds {MAX_PROCESS_SECS}", self.timeout_secs)));
        }
        check_env(&self.env)?;
        let pty = self.pty.as_ref().map(|p| pty_size("pty", p)).transpose()?;
        Ok(pb::ProcStartRequest {
            args: self.args,
            env: self.env,
            cwd: self.cwd,
            tag: self.tag,
            pty,
            stdin: self.stdin,
            timeout_ms: self.timeout_secs.saturating_mul(1000),
            user: self.user,
        })
    }
}

pub fn exit_response(x: &pb::ProcExit) -> api::ExecResponse {
    api::ExecResponse {
        exit_code: x.exit_code,
        signal: x.signal,
        timed_out: x.timed_out,
        duration_ms: x.duration_us as f64 / 1000.0,
        ..Default::default()
    }
}

pub fn process_info(i: pb::ProcInfo) -> api::ProcessInfo {
    api::ProcessInfo {
        pid: i.pid,
        tag: i.tag,
        args: i.args,
        cwd: i.cwd,
        pty: i.pty,
        stdin_open: i.stdin_open,
        started_unix_ms: i.started_unix_ms,
        output_bytes: i.output_bytes,
        running: i.exit.is_none(),
        exit: i.exit.as_ref().map(exit_response),
    }
}

/// The process as the agent sees it now.
pub async fn info(sb: &Sandbox, sel: &pb::ProcSelector) -> Result<api::ProcessInfo, Error> {
    let table = sb.agent.proc_list(CONTROL_TIMEOUT).await?;
    table
        .processes
        .into_iter()
        .find(|p| if sel.pid != 0 { p.pid == sel.pid } else { p.tag == sel.tag })
        .map(process_info)
        .ok_or_else(|| not_found(sel))
}

fn not_found(sel: &pb::ProcSelector) -> Error {
    if sel.pid != 0 {
        Error::NotFound(format!("no process with pid {}", sel.pid))
    } else {
        Error::NotFound(format!("no process tagged {:?}", sel.tag))
    }
}

/// Sends one control request (signal, resize).
pub async fn control(sb: &Sandbox, body: request::Body) -> Result<(), Error> {
    sb.touch();
    Ok(sb.agent.proc_control(body, CONTROL_TIMEOUT).await?)
}

/// Most that SendStdin waits for a process to take its input.
pub const SEND_STDIN_WAIT: Duration = Duration::from_secs(30);

pub fn check_stdin(data: &[u8]) -> Result<(), Error> {
    if data.len() > MAX_STDIN_CHUNK {
        return Err(Error::invalid("data", format!("{} bytes exceed {MAX_STDIN_CHUNK} per call", data.len())));
    }
    Ok(())
}

type Events = mpsc::Sender<Result<api::ExecEvent, Status>>;

fn event(e: api::exec_event::Event) -> Result<api::ExecEvent, Status> {
    Ok(api::ExecEvent { event: Some(e) })
}

/// Follows a process's output into `tx` from `offset` until it exits, the
/// client goes away or the sandbox does: `started` first (with `announce`),
/// `dropped` when the replay begins past what the ring still holds, the
/// output, then `exit`.
pub async fn follow(sb: Arc<Sandbox>, sel: pb::ProcSelector, mut offset: u64, announce: bool, tx: Events) {
    let mut first = true;
    loop {
        let req = pb::ProcAttachRequest { process: Some(sel.clone()), from_offset: offset };
        let mut sub = match sb.agent.proc_attach(req).await {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(Error::from(e).into())).await;
                return;
            }
        };
        loop {
            let out = match sub.next().await {
                Ok(response::Body::ProcOutput(o)) => o,
                Ok(_) => {
                    let _ = tx.send(Err(Status::internal("unexpected answer to a process attach"))).await;
                    return;
                }
                // Resume from the last offset delivered.
                Err(SubscriptionEnd::Lagged) => break,
                Err(SubscriptionEnd::Closed(e)) => {
                    let _ = tx.send(Err(Error::from(e).into())).await;
                    return;
                }
            };
            if let Some(info) = out.info {
                if first
                    && announce
                    && tx.send(event(api::exec_event::Event::Started(process_info(info)))).await.is_err()
                {
                    return;
                }
                first = false;
            }
            if out.dropped > 0 && tx.send(event(api::exec_event::Event::Dropped(out.dropped))).await.is_err() {
                return;
            }
            if !out.data.is_empty() {
                // Bytes before `offset` were delivered by an earlier attach.
                let skip = offset.saturating_sub(out.offset).min(out.data.len() as u64) as usize;
                let end = out.offset.saturating_add(out.data.len() as u64);
                let data = out.data[skip..].to_vec();
                offset = offset.max(end);
                if !data.is_empty() {
                    let ev = match pb::proc_output::Stream::try_from(out.stream) {
                        Ok(pb::proc_output::Stream::Stderr) => api::exec_event::Event::Stderr(data),
                        Ok(pb::proc_output::Stream::Pty) => api::exec_event::Event::Pty(data),
                        _ => api::exec_event::Event::Stdout(data),
                    };
                    if tx.send(event(ev)).await.is_err() {
                        return;
                    }
                    // A client reading output is using the sandbox.
                    sb.touch();
                }
            }
            if let Some(x) = out.exit {
                sub.finished();
                let _ = tx.send(event(api::exec_event::Event::Exit(exit_response(&x)))).await;
                return;
            }
        }
    }
}

/// Follows file events under `path` into `tx` until the client or the
/// sandbox goes away. A lagging stream is re-armed after an overflow event.
pub async fn watch(
    sb: Arc<Sandbox>,
    req: pb::WatchRequest,
    armed: Subscription,
    tx: mpsc::Sender<Result<api::FileEvents, Status>>,
) {
    let mut next = Some(armed);
    loop {
        let mut sub = match next.take() {
            Some(s) => s,
            None => match arm_watch(&sb, &req).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            },
        };
        loop {
            match sub.next().await {
                Ok(response::Body::WatchEvents(w)) => {
                    let msg = api::FileEvents {
                        overflow: w.overflow,
                        events: w.events.into_iter().map(file_event).collect(),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {
                    let _ = tx.send(Err(Status::internal("unexpected answer to a file watch"))).await;
                    return;
                }
                Err(SubscriptionEnd::Lagged) => {
                    if tx.send(Ok(api::FileEvents { events: vec![], overflow: true })).await.is_err() {
                        return;
                    }
                    break;
                }
                Err(SubscriptionEnd::Closed(e)) => {
                    let _ = tx.send(Err(Error::from(e).into())).await;
                    return;
                }
            }
        }
    }
}

/// Starts a watch and waits for the agent's first answer: an empty batch
/// once inotify is armed, or the error (no such directory, …).
pub async fn arm_watch(sb: &Sandbox, req: &pb::WatchRequest) -> Result<Subscription, Error> {
    let mut sub = sb.agent.watch(req.clone()).await?;
    match tokio::time::timeout(CONTROL_TIMEOUT, sub.next()).await {
        Err(_) => Err(Error::DeadlineExceeded("the guest did not arm the file watch in time".into())),
        Ok(Ok(response::Body::WatchEvents(_))) => Ok(sub),
        Ok(Ok(_)) => Err(Error::Internal("unexpected answer to a file watch".into())),
        Ok(Err(SubscriptionEnd::Closed(e))) => Err(e.into()),
        // Nothing can have queued up yet; treat as a failed start.
        Ok(Err(SubscriptionEnd::Lagged)) => Err(Error::Unavailable("the file watch fell behind at once".into())),
    }
}

fn file_event(e: pb::FileEvent) -> api::FileEvent {
    use api::file_event::Kind as A;
    use pb::file_event::Kind as P;
    let kind = match P::try_from(e.kind).unwrap_or(P::Write) {
        P::Create => A::Create,
        P::Write => A::Write,
        P::Remove => A::Remove,
        P::Rename => A::Rename,
        P::Chmod => A::Chmod,
    };
    api::FileEvent { kind: kind as i32, path: e.path, from: e.from, is_dir: e.is_dir }
}

/// Writes `data` to a process's stdin, in pieces the agent takes, and then
/// closes it when `close`. A process that does not read its input leaves
/// the rest unwritten: retried until `deadline` (forever when `None`).
pub async fn send_input(
    sb: &Sandbox,
    sel: &pb::ProcSelector,
    mut data: &[u8],
    close: bool,
    deadline: Option<tokio::time::Instant>,
) -> Result<(), Error> {
    // Typing into a sandbox is using it: its idle timeout starts again.
    sb.touch();
    loop {
        let n = data.len().min(MAX_STDIN_CHUNK);
        let last = n == data.len();
        let req = pb::ProcInputRequest { process: Some(sel.clone()), data: data[..n].to_vec(), close: close && last };
        let written = (sb.agent.proc_input(req, CONTROL_TIMEOUT).await? as usize).min(n);
        data = &data[written..];
        if last && written == n {
            return Ok(());
        }
        if written < n && deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return Err(Error::DeadlineExceeded(format!(
                "the process does not read its input: {} bytes were not written",
                data.len()
            )));
        }
    }
}

/// Where interactive stdin goes: a task of its own writes it in order, so
/// a process that stops reading holds up its stdin, not signals or
/// resizes. Input for a process that has exited is dropped; other failures
/// go to `errors`.
pub fn stdin_feeder(
    sb: Arc<Sandbox>,
    sel: pb::ProcSelector,
    errors: mpsc::Sender<Status>,
) -> mpsc::Sender<(Vec<u8>, bool)> {
    let (tx, mut rx) = mpsc::channel::<(Vec<u8>, bool)>(64);
    tokio::spawn(async move {
        while let Some((data, close)) = rx.recv().await {
            match send_input(&sb, &sel, &data, close, None).await {
                Ok(()) => {}
                Err(Error::FailedPrecondition(_)) => return,
                Err(e) => {
                    let _ = errors.send(e.into()).await;
                    return;
                }
            }
        }
    });
    tx
}

/// Applies one interactive input message: stdin through `stdin`, a resize
/// or a signal at once. Late input for an exited process is not an error.
pub async fn apply_input(
    sb: &Sandbox,
    sel: &pb::ProcSelector,
    input: api::exec_input::Input,
    stdin: &mpsc::Sender<(Vec<u8>, bool)>,
) -> Result<(), Error> {
    use api::exec_input::Input;
    let body = match input {
        Input::Start(_) => return Err(Error::invalid("start", "only the first message may start the command")),
        Input::Stdin(data) => {
            let _ = stdin.send((data, false)).await;
            return Ok(());
        }
        Input::Eof(false) => return Ok(()),
        Input::Eof(true) => {
            let _ = stdin.send((Vec::new(), true)).await;
            return Ok(());
        }
        Input::Resize(p) => request::Body::ProcResize(pb::ProcResizeRequest {
            process: Some(sel.clone()),
            size: Some(pty_size("resize", &p)?),
        }),
        Input::Signal(s) => {
            request::Body::ProcSignal(pb::ProcSignalRequest { process: Some(sel.clone()), signal: signal_number(&s)? })
        }
    };
    match control(sb, body).await {
        Err(Error::FailedPrecondition(_)) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_are_pids_or_tags() {
        assert_eq!(selector("42").unwrap().pid, 42);
        assert_eq!(selector("web-1").unwrap().tag, "web-1");
        assert!(selector("").is_err());
        assert!(selector("0").is_err());
        assert!(selector("99999999999").is_err());
        assert!(selector("../x").is_err());
        assert!(selector("-x").is_err());
        assert!(selector(&"a".repeat(65)).is_err());
        assert!(check_tag("tag", "123").is_err());
        assert!(check_tag("tag", "job.1_a-b").is_ok());
    }

    #[test]
    fn signals_by_number_or_name() {
        assert_eq!(signal_number("9").unwrap(), 9);
        assert_eq!(signal_number("TERM").unwrap(), 15);
        assert_eq!(signal_number("sigint").unwrap(), 2);
        assert_eq!(signal_number("kill").unwrap(), 9);
        assert!(signal_number("0").is_err());
        assert!(signal_number("65").is_err());
        assert!(signal_number("NOPE").is_err());
    }

    #[test]
    fn pty_sizes_are_bounded() {
        assert!(pty_size("pty", &api::PtySize { rows: 24, cols: 80 }).is_ok());
        assert!(pty_size("pty", &api::PtySize { rows: 0, cols: 80 }).is_err());
        assert!(pty_size("pty", &api::PtySize { rows: 24, cols: 1001 }).is_err());
    }
}
