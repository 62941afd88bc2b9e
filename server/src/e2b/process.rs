//! envd's `process.Process` service on forkd's guest agent: Start and
//! Connect stream a process's output (start event with the pid, data, end
//! event), List, SendInput, CloseStdin, SendSignal and Update (PTY size).
//! Processes are the agent's: they outlive the request, and a client that
//! goes away only stops following.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use forkd_agent_protocol::v1::{self as pb, request};
use forkd_api::e2b::process as pr;
use forkd_api::v1 as api;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Status;

use super::connect::{self, Call, EnvdMessage, decode, frame};
use super::sandboxes;
use crate::api::Services;
use crate::api::process as procs;
use crate::core::Error;
use crate::core::sandboxes::Sandbox;
use crate::core::tenants::Principal;

/// Who and what a call is for.
pub struct Target<'a> {
    pub services: &'a Services,
    pub principal: &'a Principal,
    pub sandbox: &'a str,
    /// The user named by the request (`Authorization: Basic`), "" = the image's.
    pub user: String,
}

/// Runs one method of the process service.
pub async fn call(t: Target<'_>, method: &str, call: Call, body: &[u8]) -> Result<axum::response::Response, Status> {
    let payload = if call.streaming { connect::single_envelope(body)? } else { body };
    match method {
        "Start" => start(t, call, decode(call.encoding, payload)?).await,
        "Connect" => reconnect(t, call, decode(call.encoding, payload)?).await,
        "List" => {
            let _: pr::ListRequest = decode(call.encoding, payload)?;
            let (sb, _) = sandboxes::live(t.services, t.principal, t.sandbox).await?;
            let table = sb.agent.proc_list(procs::CONTROL_TIMEOUT).await.map_err(Error::from)?;
            let processes = table.processes.into_iter().filter(|p| p.exit.is_none()).map(info).collect();
            Ok(connect::unary(&call, &pr::ListResponse { processes }))
        }
        "SendInput" => {
            let req: pr::SendInputRequest = decode(call.encoding, payload)?;
            let sel = selector(req.process)?;
            let data = match req.input.and_then(|i| i.input) {
                Some(pr::process_input::Input::Stdin(d)) | Some(pr::process_input::Input::Pty(d)) => d,
                None => return Err(Status::invalid_argument("input: stdin or pty bytes are required")),
            };
            procs::check_stdin(&data)?;
            let (sb, _) = sandboxes::live(t.services, t.principal, t.sandbox).await?;
            let deadline = Instant::now() + procs::SEND_STDIN_WAIT;
            procs::send_input(&sb, &sel, &data, false, Some(deadline)).await.map_err(gone_is_not_found)?;
            Ok(connect::unary(&call, &pr::SendInputResponse {}))
        }
        "CloseStdin" => {
            let req: pr::CloseStdinRequest = decode(call.encoding, payload)?;
            let sel = selector(req.process)?;
            let (sb, _) = sandboxes::live(t.services, t.principal, t.sandbox).await?;
            procs::send_input(&sb, &sel, &[], true, None).await.map_err(gone_is_not_found)?;
            Ok(connect::unary(&call, &pr::CloseStdinResponse {}))
        }
        "SendSignal" => {
            let req: pr::SendSignalRequest = decode(call.encoding, payload)?;
            let sel = selector(req.process)?;
            let signal = match pr::Signal::try_from(req.signal) {
                Ok(pr::Signal::Sigkill) => libc::SIGKILL,
                Ok(pr::Signal::Sigterm) => libc::SIGTERM,
                _ => return Err(Status::invalid_argument("signal: SIGNAL_SIGKILL or SIGNAL_SIGTERM")),
            };
            let (sb, _) = sandboxes::live(t.services, t.principal, t.sandbox).await?;
            let body = request::Body::ProcSignal(pb::ProcSignalRequest { process: Some(sel), signal });
            procs::control(&sb, body).await.map_err(gone_is_not_found)?;
            Ok(connect::unary(&call, &pr::SendSignalResponse {}))
        }
        "Update" => {
            let req: pr::UpdateRequest = decode(call.encoding, payload)?;
            let sel = selector(req.process)?;
            let Some(size) = req.pty.and_then(|p| p.size) else {
                return Ok(connect::unary(&call, &pr::UpdateResponse {}));
            };
            let size = procs::pty_size("pty.size", &api::PtySize { rows: size.rows, cols: size.cols })?;
            let (sb, _) = sandboxes::live(t.services, t.principal, t.sandbox).await?;
            let body = request::Body::ProcResize(pb::ProcResizeRequest { process: Some(sel), size: Some(size) });
            procs::control(&sb, body).await.map_err(gone_is_not_found)?;
            Ok(connect::unary(&call, &pr::UpdateResponse {}))
        }
        "StreamInput" => Err(Status::internal("StreamInput reads its body as a stream (e2b::handle)")),
        other => Err(Status::unimplemented(format!("process.Process/{other} does not exist"))),
    }
}

/// Input or a signal for a process that has exited is for one that is
/// not there (the SDKs' kill then answers false).
fn gone_is_not_found(e: Error) -> Status {
    match e {
        Error::FailedPrecondition(m) if m.contains("exited") => Status::not_found(m),
        e => e.into(),
    }
}

fn selector(s: Option<pr::ProcessSelector>) -> Result<pb::ProcSelector, Status> {
    match s.and_then(|s| s.selector) {
        Some(pr::process_selector::Selector::Pid(pid)) if pid > 0 => Ok(pb::ProcSelector { pid, tag: String::new() }),
        Some(pr::process_selector::Selector::Tag(tag)) => Ok(procs::selector(&tag)?),
        _ => Err(Status::invalid_argument("process: a pid or a tag is required")),
    }
}

fn info(p: pb::ProcInfo) -> pr::ProcessInfo {
    let mut args = p.args.into_iter();
    let cmd = args.next().unwrap_or_default();
    pr::ProcessInfo {
        config: Some(pr::ProcessConfig {
            cmd,
            args: args.collect(),
            envs: HashMap::new(),
            cwd: (!p.cwd.is_empty()).then_some(p.cwd),
        }),
        pid: p.pid,
        tag: (!p.tag.is_empty()).then_some(p.tag),
    }
}

async fn start(t: Target<'_>, call: Call, req: pr::StartRequest) -> Result<axum::response::Response, Status> {
    let cfg = req.process.ok_or_else(|| Status::invalid_argument("process: the command is required"))?;
    let (sb, ws) = sandboxes::live(t.services, t.principal, t.sandbox).await?;
    let mut env: HashMap<String, String> = ws.map(|w| w.env.into_iter().collect()).unwrap_or_default();
    env.extend(cfg.envs);
    let pty = req.pty.and_then(|p| p.size).map(|s| api::PtySize { rows: s.rows, cols: s.cols });
    let start = procs::Start {
        args: std::iter::once(cfg.cmd).chain(cfg.args).collect(),
        env,
        cwd: cfg.cwd.unwrap_or_default(),
        tag: req.tag.unwrap_or_default(),
        // Older SDKs say nothing and expect input to be open.
        stdin: pty.is_none() && req.stdin.unwrap_or(true),
        pty,
        timeout_secs: 0,
        user: t.user,
    };
    let agent_req = start.into_agent_for(&t.services.rt, &sb)?;
    let started = sb.agent.proc_start(agent_req, procs::CONTROL_TIMEOUT).await.map_err(Error::from)?;
    Ok(follow::<pr::StartResponse>(call, sb, started.pid))
}

async fn reconnect(t: Target<'_>, call: Call, req: pr::ConnectRequest) -> Result<axum::response::Response, Status> {
    let sel = selector(req.process)?;
    let (sb, _) = sandboxes::live(t.services, t.principal, t.sandbox).await?;
    let now = procs::info(&sb, &sel).await?;
    Ok(follow::<pr::ConnectResponse>(call, sb, now.pid))
}

/// Start and Connect answer with the same events in different wrappers.
trait EventMessage: EnvdMessage + Send {
    fn wrap(e: pr::process_event::Event) -> Self;
}

impl EventMessage for pr::StartResponse {
    fn wrap(e: pr::process_event::Event) -> Self {
        pr::StartResponse { event: Some(pr::ProcessEvent { event: Some(e) }) }
    }
}

impl EventMessage for pr::ConnectResponse {
    fn wrap(e: pr::process_event::Event) -> Self {
        pr::ConnectResponse { event: Some(pr::ProcessEvent { event: Some(e) }) }
    }
}

/// How E2B describes an exit ("exit status 1", "signal: killed").
fn end_event(x: &api::ExecResponse) -> pr::process_event::EndEvent {
    let status = match x.signal {
        0 => format!("exit status {}", x.exit_code),
        libc::SIGKILL => "signal: killed".into(),
        libc::SIGTERM => "signal: terminated".into(),
        libc::SIGINT => "signal: interrupt".into(),
        n => format!("signal: {n}"),
    };
    pr::process_event::EndEvent {
        exit_code: x.exit_code,
        exited: true,
        status,
        error: x.timed_out.then(|| "the process ran past its timeout and was killed".to_string()),
    }
}

/// Streams a process's events: the start event, its output from the
/// beginning of what the agent's ring holds, then its end — or the stream
/// ends early with deadline_exceeded when the client's Connect timeout
/// passes (the process keeps running). Idle streams send keepalives at the
/// interval the client asked for.
fn follow<M: EventMessage>(call: Call, sb: Arc<Sandbox>, pid: u32) -> axum::response::Response {
    use pr::process_event::{DataEvent, Event, KeepAlive, StartEvent, data_event::Output};
    let (tx, rx) = mpsc::channel::<Bytes>(32);
    let (etx, mut erx) = mpsc::channel(32);
    let sel = pb::ProcSelector { pid, tag: String::new() };
    tokio::spawn(procs::follow(sb, sel, 0, false, etx));
    let enc = call.encoding;
    tokio::spawn(async move {
        if tx.send(frame(enc, &M::wrap(Event::Start(StartEvent { pid })))).await.is_err() {
            return;
        }
        let deadline = call.timeout.map(|t| Instant::now() + t);
        let mut keepalive = call.keepalive.map(|every| tokio::time::interval_at(Instant::now() + every, every));
        loop {
            let out = tokio::select! {
                ev = erx.recv() => match ev {
                    Some(Ok(api::ExecEvent { event: Some(e) })) => match e {
                        api::exec_event::Event::Stdout(d) => frame(enc, &M::wrap(Event::Data(DataEvent { output: Some(Output::Stdout(d)) }))),
                        api::exec_event::Event::Stderr(d) => frame(enc, &M::wrap(Event::Data(DataEvent { output: Some(Output::Stderr(d)) }))),
                        api::exec_event::Event::Pty(d) => frame(enc, &M::wrap(Event::Data(DataEvent { output: Some(Output::Pty(d)) }))),
                        api::exec_event::Event::Exit(x) => {
                            if tx.send(frame(enc, &M::wrap(Event::End(end_event(&x))))).await.is_ok() {
                                let _ = tx.send(connect::end_frame(None)).await;
                            }
                            return;
                        }
                        _ => continue,
                    },
                    Some(Ok(_)) => continue,
                    Some(Err(status)) => {
                        let _ = tx.send(connect::end_frame(Some(&status))).await;
                        return;
                    }
                    None => {
                        let _ = tx.send(connect::end_frame(Some(&Status::unavailable("the sandbox went away")))).await;
                        return;
                    }
                },
                _ = async { keepalive.as_mut().expect("guarded").tick().await }, if keepalive.is_some() => {
                    frame(enc, &M::wrap(Event::Keepalive(KeepAlive {})))
                }
                _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                    let s = Status::deadline_exceeded("the request's timeout passed; the process keeps running");
                    let _ = tx.send(connect::end_frame(Some(&s))).await;
                    return;
                }
            };
            // The client went away: stop following (the process runs on).
            if tx.send(out).await.is_err() {
                return;
            }
        }
    });
    connect::stream(&call, rx)
}

/// `StreamInput` (client streaming): a start message naming the process,
/// then input messages, each written before the next is read (a process
/// that does not read its input holds the stream up, for up to
/// SEND_STDIN_WAIT a message). Answers one empty message when the body ends.
pub async fn stream_input(t: Target<'_>, call: Call, body: axum::body::Body) -> axum::response::Response {
    match stream_input_inner(t, call, body).await {
        Ok(()) => {
            let mut frames = frame(call.encoding, &pr::StreamInputResponse {}).to_vec();
            frames.extend_from_slice(&connect::end_frame(None));
            let (tx, rx) = mpsc::channel(1);
            let _ = tx.try_send(Bytes::from(frames));
            connect::stream(&call, rx)
        }
        Err(s) => connect::error(Some(&call), &s),
    }
}

async fn stream_input_inner(t: Target<'_>, call: Call, body: axum::body::Body) -> Result<(), Status> {
    use futures::StreamExt;
    use pr::stream_input_request::Event;
    if !call.streaming {
        return Err(Status::invalid_argument("StreamInput is a streaming call (application/connect+json or +proto)"));
    }
    let mut chunks = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    let mut target: Option<(Arc<Sandbox>, pb::ProcSelector)> = None;
    loop {
        // Every whole envelope in the buffer, in order.
        while buf.len() >= 5 {
            let (msg, used) = match connect::split_envelope(&buf) {
                Ok((flags, payload, _)) => {
                    if flags & 0x01 != 0 {
                        return Err(Status::unimplemented("compressed messages are not supported"));
                    }
                    (decode::<pr::StreamInputRequest>(call.encoding, payload)?, 5 + payload.len())
                }
                // Incomplete: read more.
                Err(s) if s.code() == tonic::Code::InvalidArgument => break,
                Err(s) => return Err(s),
            };
            let _ = buf.split_to(used);
            match (msg.event, &target) {
                (Some(Event::Start(start)), None) => {
                    let sel = selector(start.process)?;
                    let (sb, _) = sandboxes::live(t.services, t.principal, t.sandbox).await?;
                    procs::info(&sb, &sel).await?;
                    target = Some((sb, sel));
                }
                (Some(Event::Start(_)), Some(_)) => return Err(Status::invalid_argument("a second start message")),
                (Some(Event::Data(d)), Some((sb, sel))) => {
                    let data = match d.input.and_then(|i| i.input) {
                        Some(pr::process_input::Input::Stdin(b)) | Some(pr::process_input::Input::Pty(b)) => b,
                        None => continue,
                    };
                    procs::check_stdin(&data)?;
                    let deadline = Instant::now() + procs::SEND_STDIN_WAIT;
                    procs::send_input(sb, sel, &data, false, Some(deadline)).await.map_err(gone_is_not_found)?;
                }
                (Some(Event::Data(_)), None) => {
                    return Err(Status::invalid_argument("input before the start message naming the process"));
                }
                (Some(Event::Keepalive(_)), _) | (None, _) => {}
            }
        }
        match chunks.next().await {
            Some(Ok(chunk)) => {
                if buf.len() + chunk.len() > connect::MAX_MESSAGE + 5 {
                    return Err(Status::resource_exhausted(format!(
                        "a message exceeds {} bytes",
                        connect::MAX_MESSAGE
                    )));
                }
                buf.extend_from_slice(&chunk);
            }
            Some(Err(e)) => return Err(Status::cancelled(format!("reading the request: {e}"))),
            None if buf.is_empty() => return Ok(()),
            None => return Err(Status::invalid_argument("the request ends inside a message")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_read_as_e2b_writes_them() {
        let x = api::ExecResponse { exit_code: 3, ..Default::default() };
        assert_eq!(end_event(&x).status, "exit status 3");
        let k = api::ExecResponse { exit_code: -1, signal: 9, ..Default::default() };
        let e = end_event(&k);
        assert_eq!((e.exit_code, e.status.as_str()), (-1, "signal: killed"));
    }

    #[test]
    fn selectors_need_a_pid_or_a_valid_tag() {
        assert!(selector(None).is_err());
        let pid = pr::ProcessSelector { selector: Some(pr::process_selector::Selector::Pid(7)) };
        assert_eq!(selector(Some(pid)).unwrap().pid, 7);
        let bad = pr::ProcessSelector { selector: Some(pr::process_selector::Selector::Tag("../x".into())) };
        assert!(selector(Some(bad)).is_err());
    }
}
