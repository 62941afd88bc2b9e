//! SandboxService.

use std::pin::Pin;
use std::time::Duration;

use forkd_agent_protocol::v1 as pb;
use forkd_api::names::{SandboxId, Tag};
use forkd_api::v1::{self as api, sandbox_service_server::SandboxService};
use futures::Stream;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status, Streaming};

use super::Services;
use super::access::principal;
use super::convert;
use super::guest_files::{self, FILE_OP_TIMEOUT, MAX_FILE_BYTES};
use super::process;
use crate::agent::ExecEvent;
use crate::core::Error;
use crate::core::branch::{BranchRequest, requested};
use crate::core::sandboxes::CreateSandboxes;
use crate::core::store::SandboxSettings;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Default and largest exec timeouts.
const DEFAULT_EXEC_SECS: u32 = 60;
const MAX_EXEC_SECS: u32 = 24 * 3600;
/// Output kept per stream by a unary exec unless the request asks otherwise.
pub const DEFAULT_EXEC_OUTPUT_BYTES: u64 = 16 << 20;
/// Largest `max_output_bytes` a request may ask for, unless the daemon is
/// started with another.
pub const MAX_EXEC_OUTPUT_BYTES: u64 = 64 << 20;

/// The network a request asks for: `per_child_netns` alone is network
/// "nat" with no allow-list (a private namespace per child, no egress).
pub(crate) fn network_of(network: &str, per_child_netns: bool) -> Result<String, Status> {
    match (network, per_child_netns) {
        ("", true) | ("nat", _) => Ok("nat".into()),
        ("", false) => Ok("none".into()),
        (other, true) => Err(Error::invalid(
            "per_child_netns",
            format!("a namespace per child comes with network \"nat\", not {other:?}"),
        )
        .into()),
        (other, false) => Ok(other.to_string()),
    }
}

fn sandbox_id(v: &str) -> Result<SandboxId, Status> {
    Ok(SandboxId::parse(v).map_err(Error::from)?)
}

fn guest_path(field: &str, p: &str) -> Result<String, Status> {
    if p.is_empty() {
        return Err(Error::invalid(field, "must not be empty").into());
    }
    if !p.starts_with('/') {
        return Err(Error::invalid(field, format!("{p:?} must be an absolute guest path")).into());
    }
    if p.contains('\0') || p.len() > 4096 {
        return Err(Error::invalid(field, "contains NUL or is longer than 4096 bytes").into());
    }
    Ok(p.to_string())
}

fn exec_request(r: &api::ExecRequest) -> Result<(SandboxId, pb::ExecRequest), Status> {
    let id = sandbox_id(&r.id)?;
    if r.args.is_empty() {
        return Err(Error::invalid("args", "must name a command").into());
    }
    if r.pty.is_some() || !r.tag.is_empty() {
        return Err(Error::invalid(
            if r.pty.is_some() { "pty" } else { "tag" },
            "is for ExecInteractive and StartProcess; Exec and ExecStream run without a terminal or handle",
        )
        .into());
    }
    if r.timeout_secs > MAX_EXEC_SECS {
        return Err(Error::invalid("timeout_secs", format!("{} exceeds {MAX_EXEC_SECS}", r.timeout_secs)).into());
    }
    let secs = if r.timeout_secs == 0 { DEFAULT_EXEC_SECS } else { r.timeout_secs };
    Ok((
        id,
        pb::ExecRequest {
            args: r.args.clone(),
            env: r.env.clone(),
            cwd: r.cwd.clone(),
            timeout_ms: secs * 1000,
            stdin: r.stdin.clone(),
            user: r.user.clone(),
        },
    ))
}

fn exit_response(x: &pb::ExecExit, stdout: String, stderr: String) -> api::ExecResponse {
    api::ExecResponse {
        stdout,
        stderr,
        exit_code: x.exit_code,
        signal: x.signal,
        timed_out: x.timed_out,
        duration_ms: x.duration_us as f64 / 1000.0,
        stdout_truncated: false,
        stderr_truncated: false,
    }
}

/// One output stream of a unary exec, kept up to a cap.
struct Capped {
    data: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl Capped {
    fn new(cap: u64) -> Self {
        Capped { data: Vec::new(), cap: cap as usize, truncated: false }
    }

    fn push(&mut self, d: &[u8]) {
        let room = self.cap - self.data.len();
        if d.len() > room {
            self.truncated = true;
        }
        self.data.extend_from_slice(&d[..d.len().min(room)]);
    }

    fn text(self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// The output cap of a unary exec, from the request and the daemon's limit.
fn output_cap(asked: u64, max: u64) -> Result<u64, Status> {
    match asked {
        0 => Ok(DEFAULT_EXEC_OUTPUT_BYTES.min(max)),
        n if n > max => Err(Error::invalid(
            "max_output_bytes",
            format!("{n} exceeds the daemon's limit of {max} (stream with ExecStream for more)"),
        )
        .into()),
        n => Ok(n),
    }
}

/// Children of a fork whose caller went away before the answer: nobody
/// knows their ids, so nobody would ever use or delete them.
fn kill_unclaimed_children(
    rt: std::sync::Arc<crate::core::Runtime>,
) -> crate::core::operations::Abandoned<Vec<crate::core::store::SandboxRecord>> {
    Box::new(move |recs| {
        Box::pin(async move {
            let ids: Vec<SandboxId> = recs.iter().map(|r| r.id.clone()).collect();
            for r in &recs {
                rt.events.emit_for("abandoned", r, "the caller went away before the fork answered; killing it");
            }
            if let Err(e) = rt.delete_sandboxes(&ids, None, false).await {
                tracing::warn!("killing the children of an abandoned fork: {e}");
            }
        })
    })
}

#[tonic::async_trait]
impl SandboxService for Services {
    async fn create_sandboxes(
        &self,
        r: Request<api::CreateSandboxesRequest>,
    ) -> Result<Response<api::CreateSandboxesResponse>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let tag = Tag::parse_field(&r.snapshot_tag, "snapshot_tag").map_err(Error::from)?;
        crate::core::sandboxes::check_n(r.n.unwrap_or(1))?;
        if r.hugepages {
            return Err(Error::FailedPrecondition(
                "hugepages: children map the snapshot's memory file privately from the page cache, which huge \
                 pages cannot back; omit it"
                    .into(),
            )
            .into());
        }
        if r.live_fork {
            return Err(Error::FailedPrecondition(format!(
                "live_fork needs a VMM that clones a running VM's memory; this daemon's backend ({}) forks from \
                 snapshots: branch the running sandbox (POST /v1/sandboxes/{{id}}/branch) and fork from the branch",
                self.rt.backend.name()
            ))
            .into());
        }
        let network = network_of(&r.network, r.per_child_netns)?;
        let settings = SandboxSettings {
            network,
            allow: r.allow.clone(),
            labels: r.labels.into_iter().collect(),
            ttl_secs: r.ttl_secs,
            idle_timeout_secs: r.idle_timeout_secs,
            memory_limit_mib: r.memory_limit_mib,
            cpu_quota: r.cpu_quota,
            pids_limit: r.pids_limit,
            volumes: volume_specs(&r.volumes, &self.rt.config.volume_root)?,
        };
        settings.validate_lifecycle()?;
        self.rt.check_network(&settings)?;
        crate::core::limits::validate_limits(&settings)?;
        // Inputs first: a bad request is a 400 whether or not the snapshot
        // exists (or may be seen).
        self.rt.pull_if_missing(&tag, p.owner(), r.pull_missing).await?;
        self.usable_snapshot(&p, &tag)?;
        let req = CreateSandboxes {
            tag,
            n: r.n.unwrap_or(1),
            settings,
            workspace: String::new(),
            prewarm: r.prewarm,
            owner: p.owner(),
            by: (*p).clone(),
        };
        let rt = self.rt.clone();
        let recs = crate::core::operations::owned(
            "fork",
            async move { rt.create_sandboxes(req).await },
            Some(kill_unclaimed_children(self.rt.clone())),
        )
        .await?;
        let sandboxes = recs.iter().map(|r| convert::sandbox(r, r.created_at_unix)).collect();
        Ok(Response::new(api::CreateSandboxesResponse { sandboxes }))
    }

    async fn list_sandboxes(
        &self,
        r: Request<api::ListSandboxesRequest>,
    ) -> Result<Response<api::ListSandboxesResponse>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let tag = if r.snapshot_tag.is_empty() {
            None
        } else {
            Some(Tag::parse_field(&r.snapshot_tag, "snapshot_tag").map_err(Error::from)?)
        };
        let sandboxes = self
            .rt
            .list_sandboxes(tag.as_ref().map(|t| t.as_str()))
            .await
            .iter()
            .filter(|r| Self::sees_sandbox(&p, &r.owner))
            .map(|r| convert::sandbox(r, 0))
            .collect();
        Ok(Response::new(api::ListSandboxesResponse { sandboxes, next_page_token: String::new() }))
    }

    async fn get_sandbox(&self, r: Request<api::GetSandboxRequest>) -> Result<Response<api::Sandbox>, Status> {
        let id = self.own_sandbox(&principal(&r), &r.get_ref().id).await?;
        let sb = self.rt.sandbox(&id).await?;
        Ok(Response::new(convert::live_sandbox(&sb)))
    }

    async fn delete_sandbox(
        &self,
        r: Request<api::DeleteSandboxRequest>,
    ) -> Result<Response<api::DeleteSandboxesResponse>, Status> {
        let p = principal(&r);
        let id = sandbox_id(&r.get_ref().id)?;
        // Another tenant's sandbox is deleted as one that does not exist is.
        if self.own_sandbox(&p, id.as_str()).await.is_err() {
            return Ok(Response::new(api::DeleteSandboxesResponse { deleted: vec![] }));
        }
        let deleted = self.owned("delete", |rt| async move { rt.delete_sandboxes(&[id], None, false).await }).await?;
        Ok(Response::new(api::DeleteSandboxesResponse { deleted }))
    }

    async fn delete_sandboxes(
        &self,
        r: Request<api::DeleteSandboxesRequest>,
    ) -> Result<Response<api::DeleteSandboxesResponse>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let ids = r.ids.iter().map(|i| sandbox_id(i)).collect::<Result<Vec<_>, _>>()?;
        let tag = if r.snapshot_tag.is_empty() {
            None
        } else {
            Some(Tag::parse_field(&r.snapshot_tag, "snapshot_tag").map_err(Error::from)?)
        };
        if ids.is_empty() && tag.is_none() && !r.all {
            return Err(Error::InvalidArgument("invalid ids: name sandboxes, a snapshot_tag, or set all".into()).into());
        }
        let all = r.all;
        if !p.is_admin() {
            // A tenant's "all" and "by tag" mean its own; ids of others'
            // sandboxes are ignored as unknown ids are.
            let mine: Vec<SandboxId> = self
                .rt
                .list_sandboxes(None)
                .await
                .into_iter()
                .filter(|s| p.owns(&s.owner))
                .filter(|s| all || ids.contains(&s.id) || tag.as_ref().is_some_and(|t| *t == s.snapshot_tag))
                .map(|s| s.id)
                .collect();
            let deleted =
                self.owned("delete", |rt| async move { rt.delete_sandboxes(&mine, None, false).await }).await?;
            return Ok(Response::new(api::DeleteSandboxesResponse { deleted }));
        }
        let deleted =
            self.owned("delete", |rt| async move { rt.delete_sandboxes(&ids, tag.as_ref(), all).await }).await?;
        Ok(Response::new(api::DeleteSandboxesResponse { deleted }))
    }

    async fn exec(&self, r: Request<api::ExecRequest>) -> Result<Response<api::ExecResponse>, Status> {
        let (id, req) = exec_request(r.get_ref())?;
        self.own_sandbox(&principal(&r), id.as_str()).await?;
        let cap = output_cap(r.get_ref().max_output_bytes, self.rt.config.max_exec_output_bytes)?;
        let mut stream = self.rt.exec(&id, req).await?;
        let (mut out, mut err) = (Capped::new(cap), Capped::new(cap));
        loop {
            match stream.next().await.map_err(Error::from)? {
                Some(ExecEvent::Stdout(d)) => out.push(&d),
                Some(ExecEvent::Stderr(d)) => err.push(&d),
                Some(ExecEvent::Exit(x)) => {
                    let (ot, et) = (out.truncated, err.truncated);
                    let mut resp = exit_response(&x, out.text(), err.text());
                    resp.stdout_truncated = ot;
                    resp.stderr_truncated = et;
                    return Ok(Response::new(resp));
                }
                None => return Err(Status::internal("exec ended without an exit status")),
            }
        }
    }

    type ExecStreamStream = BoxStream<api::ExecEvent>;

    async fn exec_stream(&self, r: Request<api::ExecRequest>) -> Result<Response<Self::ExecStreamStream>, Status> {
        let (id, req) = exec_request(r.get_ref())?;
        self.own_sandbox(&principal(&r), id.as_str()).await?;
        let mut stream = self.rt.exec(&id, req).await?;
        let out = async_stream(move |tx| async move {
            loop {
                let ev = match stream.next().await {
                    Ok(Some(ExecEvent::Stdout(d))) => api::exec_event::Event::Stdout(d),
                    Ok(Some(ExecEvent::Stderr(d))) => api::exec_event::Event::Stderr(d),
                    Ok(Some(ExecEvent::Exit(x))) => {
                        api::exec_event::Event::Exit(exit_response(&x, String::new(), String::new()))
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(Error::from(e)))).await;
                        break;
                    }
                };
                if tx.send(Ok(api::ExecEvent { event: Some(ev) })).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(out))
    }

    type OpenPortStream = super::ports::PortStream;

    async fn open_port(&self, r: Request<Streaming<api::PortInput>>) -> Result<Response<Self::OpenPortStream>, Status> {
        Ok(Response::new(self.open_port_stream(r).await?))
    }

    async fn share_port(&self, r: Request<api::SharePortRequest>) -> Result<Response<api::PortShare>, Status> {
        Services::share_port(self, r).await
    }

    async fn list_port_shares(
        &self,
        r: Request<api::ListPortSharesRequest>,
    ) -> Result<Response<api::ListPortSharesResponse>, Status> {
        Services::list_port_shares(self, r).await
    }

    async fn unshare_port(
        &self,
        r: Request<api::UnsharePortRequest>,
    ) -> Result<Response<api::UnsharePortResponse>, Status> {
        Services::unshare_port(self, r).await
    }

    async fn get_sandbox_metrics(
        &self,
        r: Request<api::GetSandboxMetricsRequest>,
    ) -> Result<Response<api::SandboxMetrics>, Status> {
        self.sandbox_metrics(r).await
    }

    type WatchSandboxMetricsStream = super::metrics::MetricsStream;

    async fn watch_sandbox_metrics(
        &self,
        r: Request<api::WatchSandboxMetricsRequest>,
    ) -> Result<Response<Self::WatchSandboxMetricsStream>, Status> {
        Ok(Response::new(Services::watch_sandbox_metrics(self, r).await?))
    }

    type ExecInteractiveStream = BoxStream<api::ExecEvent>;

    async fn exec_interactive(
        &self,
        r: Request<Streaming<api::ExecInput>>,
    ) -> Result<Response<Self::ExecInteractiveStream>, Status> {
        let p = principal(&r);
        let mut input = r.into_inner();
        let start = match input.message().await? {
            Some(api::ExecInput { input: Some(api::exec_input::Input::Start(s)) }) => s,
            Some(_) => return Err(Error::invalid("start", "the first message must start the command").into()),
            None => return Err(Error::invalid("start", "the stream ended before a start message").into()),
        };
        let id = self.own_sandbox(&p, &start.id).await?;
        if start.timeout_secs > MAX_EXEC_SECS {
            return Err(
                Error::invalid("timeout_secs", format!("{} exceeds {MAX_EXEC_SECS}", start.timeout_secs)).into()
            );
        }
        let req = process::Start {
            args: start.args,
            env: start.env,
            cwd: start.cwd,
            tag: start.tag,
            pty: start.pty,
            stdin: true,
            timeout_secs: start.timeout_secs,
            user: start.user,
        };
        let sb = self.rt.agent_of(&id).await?;
        let req = req.into_agent_for(&self.rt, &sb)?;
        let info = sb.agent.proc_start(req, process::CONTROL_TIMEOUT).await.map_err(Error::from)?;
        let sel = forkd_agent_protocol::v1::ProcSelector { pid: info.pid, tag: String::new() };
        // Input runs in its own task, in order; when the client goes away
        // the process keeps running (it can be attached again).
        let (in_sb, in_sel) = (sb.clone(), sel.clone());
        let (err_tx, mut err_rx) = tokio::sync::mpsc::channel::<Status>(2);
        let stdin = process::stdin_feeder(sb.clone(), sel.clone(), err_tx.clone());
        tokio::spawn(async move {
            loop {
                let msg = match input.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) | Err(_) => return,
                };
                let Some(i) = msg.input else { continue };
                if let Err(e) = process::apply_input(&in_sb, &in_sel, i, &stdin).await {
                    let _ = err_tx.send(e.into()).await;
                    return;
                }
            }
        });
        let out = async_stream(move |tx| async move {
            let (ftx, mut frx) = tokio::sync::mpsc::channel(16);
            let follow = tokio::spawn(process::follow(sb, sel, 0, true, ftx));
            loop {
                tokio::select! {
                    ev = frx.recv() => match ev {
                        Some(ev) => if tx.send(ev).await.is_err() { break },
                        None => break,
                    },
                    Some(e) = err_rx.recv() => {
                        let _ = tx.send(Err(e)).await;
                        break;
                    }
                }
            }
            follow.abort();
        });
        Ok(Response::new(out))
    }

    async fn start_process(&self, r: Request<api::StartProcessRequest>) -> Result<Response<api::ProcessInfo>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let id = self.own_sandbox(&p, &r.id).await?;
        let req = process::Start {
            args: r.args,
            env: r.env,
            cwd: r.cwd,
            tag: r.tag,
            pty: r.pty,
            stdin: r.stdin,
            timeout_secs: r.timeout_secs,
            user: r.user,
        };
        let sb = self.rt.agent_of(&id).await?;
        let req = req.into_agent_for(&self.rt, &sb)?;
        let info = sb.agent.proc_start(req, process::CONTROL_TIMEOUT).await.map_err(Error::from)?;
        Ok(Response::new(process::process_info(info)))
    }

    async fn list_processes(
        &self,
        r: Request<api::ListProcessesRequest>,
    ) -> Result<Response<api::ListProcessesResponse>, Status> {
        let p = principal(&r);
        let id = self.own_sandbox(&p, &r.get_ref().id).await?;
        let sb = self.rt.agent_of(&id).await?;
        let t = sb.agent.proc_list(process::CONTROL_TIMEOUT).await.map_err(Error::from)?;
        Ok(Response::new(api::ListProcessesResponse {
            processes: t.processes.into_iter().map(process::process_info).collect(),
        }))
    }

    type AttachProcessStream = BoxStream<api::ExecEvent>;

    async fn attach_process(
        &self,
        r: Request<api::AttachProcessRequest>,
    ) -> Result<Response<Self::AttachProcessStream>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let id = self.own_sandbox(&p, &r.id).await?;
        let sel = process::selector(&r.process)?;
        let sb = self.rt.agent_of(&id).await?;
        // Fail before the stream starts when there is no such process.
        process::info(&sb, &sel).await?;
        let offset = r.from_offset;
        Ok(Response::new(async_stream(move |tx| process::follow(sb, sel, offset, true, tx))))
    }

    async fn signal_process(
        &self,
        r: Request<api::SignalProcessRequest>,
    ) -> Result<Response<api::ProcessInfo>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let id = self.own_sandbox(&p, &r.id).await?;
        let sel = process::selector(&r.process)?;
        let signal = process::signal_number(if r.signal.is_empty() { "TERM" } else { &r.signal })?;
        let sb = self.rt.agent_of(&id).await?;
        let body = forkd_agent_protocol::v1::request::Body::ProcSignal(pb::ProcSignalRequest {
            process: Some(sel.clone()),
            signal,
        });
        process::control(&sb, body).await?;
        Ok(Response::new(process::info(&sb, &sel).await?))
    }

    async fn send_stdin(&self, r: Request<api::SendStdinRequest>) -> Result<Response<api::ProcessInfo>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let id = self.own_sandbox(&p, &r.id).await?;
        let sel = process::selector(&r.process)?;
        process::check_stdin(&r.data)?;
        let sb = self.rt.agent_of(&id).await?;
        let deadline = tokio::time::Instant::now() + process::SEND_STDIN_WAIT;
        process::send_input(&sb, &sel, &r.data, r.close, Some(deadline)).await?;
        Ok(Response::new(process::info(&sb, &sel).await?))
    }

    async fn close_stdin(&self, r: Request<api::CloseStdinRequest>) -> Result<Response<api::ProcessInfo>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let id = self.own_sandbox(&p, &r.id).await?;
        let sel = process::selector(&r.process)?;
        let sb = self.rt.agent_of(&id).await?;
        process::send_input(&sb, &sel, &[], true, None).await?;
        Ok(Response::new(process::info(&sb, &sel).await?))
    }

    async fn resize_pty(&self, r: Request<api::ResizePtyRequest>) -> Result<Response<api::ProcessInfo>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let id = self.own_sandbox(&p, &r.id).await?;
        let sel = process::selector(&r.process)?;
        let size = process::pty_size("size", &r.size.unwrap_or_default())?;
        let sb = self.rt.agent_of(&id).await?;
        let body = forkd_agent_protocol::v1::request::Body::ProcResize(pb::ProcResizeRequest {
            process: Some(sel.clone()),
            size: Some(size),
        });
        process::control(&sb, body).await?;
        Ok(Response::new(process::info(&sb, &sel).await?))
    }

    type WatchFilesStream = BoxStream<api::FileEvents>;

    async fn watch_files(
        &self,
        r: Request<api::WatchFilesRequest>,
    ) -> Result<Response<Self::WatchFilesStream>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let id = self.own_sandbox(&p, &r.id).await?;
        let path = guest_path("path", &r.path)?;
        let sb = self.rt.agent_of(&id).await?;
        let req = pb::WatchRequest { path, recursive: r.recursive };
        // The agent's first answer (the watch is armed, or an error such as
        // a missing directory) decides the status; the rest streams.
        let sub = process::arm_watch(&sb, &req).await?;
        Ok(Response::new(async_stream(move |tx| process::watch(sb, req, sub, tx))))
    }

    async fn eval(&self, r: Request<api::EvalRequest>) -> Result<Response<api::EvalResponse>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let id = self.own_sandbox(&p, &r.id).await?;
        if r.timeout_secs > MAX_EXEC_SECS {
            return Err(Error::invalid("timeout_secs", format!("{} exceeds {MAX_EXEC_SECS}", r.timeout_secs)).into());
        }
        let secs = if r.timeout_secs == 0 { DEFAULT_EXEC_SECS } else { r.timeout_secs };
        let res = self.rt.eval(&id, r.code, Duration::from_secs(secs as u64)).await?;
        Ok(Response::new(api::EvalResponse {
            result: res.result,
            error: res.error,
            exit_code: res.exit_code,
            stdout: res.stdout,
            stderr: res.stderr,
        }))
    }

    async fn ping(&self, r: Request<api::PingRequest>) -> Result<Response<api::PingResponse>, Status> {
        let id = self.own_sandbox(&principal(&r), &r.get_ref().id).await?;
        let (p, took) = self.rt.ping(&id).await?;
        Ok(Response::new(api::PingResponse {
            ok: true,
            pong: true,
            latency_ms: took.as_secs_f64() * 1000.0,
            uptime_secs: p.uptime_secs,
            runtime_ready: p.runtime_ready,
        }))
    }

    async fn branch(&self, r: Request<api::BranchRequest>) -> Result<Response<api::Snapshot>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let id = self.own_sandbox(&p, &r.id).await?;
        let tag = if r.tag.is_empty() { None } else { Some(Tag::parse(&r.tag).map_err(Error::from)?) };
        let (mode, measure_only) = requested(&r.mode, r.live, r.diff, r.measure_diff)?;
        if !r.parent_tag.is_empty() {
            let parent = Tag::parse_field(&r.parent_tag, "parent_tag").map_err(Error::from)?;
            let source = self.rt.sandbox(&id).await?.snapshot().snapshot_tag;
            if source != parent {
                return Err(Error::FailedPrecondition(format!(
                    "parent_tag: sandbox {id} was forked from {:?}, not {:?}",
                    source.as_str(),
                    parent.as_str()
                ))
                .into());
            }
        }
        let req = BranchRequest { id, tag, mode, measure_only, wait: r.wait.unwrap_or(true) };
        let rec = self.owned("branch", |rt| async move { rt.branch(req).await }).await?;
        if measure_only {
            let mut measured = convert::snapshot(&crate::core::snapshots::SnapshotView {
                record: rec,
                ancestors: vec![],
                dependents: vec![],
                live_sandboxes: 0,
                files: Default::default(),
                bootable: false,
            });
            // Nothing was stored: the answer names no snapshot.
            measured.tag = String::new();
            return Ok(Response::new(measured));
        }
        let view = self.rt.view_of(rec).await?;
        Ok(Response::new(convert::snapshot(&view)))
    }

    type ReadFileStream = BoxStream<api::DataChunk>;

    async fn read_file(&self, r: Request<api::ReadFileRequest>) -> Result<Response<Self::ReadFileStream>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let id = self.own_sandbox(&p, &r.id).await?;
        let path = guest_path("path", &r.path)?;
        let sb = self.rt.agent_of(&id).await?;
        // Fail before streaming when the file is missing or too large.
        let st = sb.agent.stat(path.clone(), FILE_OP_TIMEOUT).await.map_err(Error::from)?;
        if st.is_dir {
            return Err(Error::invalid("path", format!("{path} is a directory")).into());
        }
        if st.size > MAX_FILE_BYTES {
            return Err(Status::resource_exhausted(format!(
                "{path} is {} bytes, more than the {MAX_FILE_BYTES} limit",
                st.size
            )));
        }
        let mut chunks = guest_files::read_chunks(sb, path);
        let out = async_stream(move |tx| async move {
            while let Some(chunk) = chunks.recv().await {
                let msg = chunk.map(|data| api::DataChunk { data }).map_err(Status::from);
                let failed = msg.is_err();
                if tx.send(msg).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(out))
    }

    async fn write_file(
        &self,
        r: Request<Streaming<api::WriteFileRequest>>,
    ) -> Result<Response<api::FileInfo>, Status> {
        let p = principal(&r);
        let mut input = r.into_inner();
        let first = input.message().await?.ok_or_else(|| {
            Status::invalid_argument("invalid request: empty stream, the first message must carry id and path")
        })?;
        let id = self.own_sandbox(&p, &first.id).await?;
        let path = guest_path("path", &first.path)?;
        let sb = self.rt.agent_of(&id).await?;
        let mode = if first.mode == 0 { 0o644 } else { first.mode };
        let mut upload = guest_files::Upload::new(sb, path, mode);
        let mut hasher = Sha256::new();
        let mut pending = Some(first.data);
        loop {
            let data = match pending.take() {
                Some(d) => d,
                None => match input.message().await? {
                    Some(m) => m.data,
                    None => break,
                },
            };
            hasher.update(&data);
            upload.push(&data).await?;
        }
        let mut info = file_info(upload.finish().await?);
        info.digest = format!("sha256:{}", hex::encode(hasher.finalize()));
        Ok(Response::new(info))
    }

    async fn list_files(&self, r: Request<api::ListFilesRequest>) -> Result<Response<api::ListFilesResponse>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let id = self.own_sandbox(&p, &r.id).await?;
        let path = guest_path("path", if r.path.is_empty() { "/" } else { &r.path })?;
        let sb = self.rt.agent_of(&id).await?;
        let l = sb.agent.list_dir(path, FILE_OP_TIMEOUT).await.map_err(Error::from)?;
        Ok(Response::new(api::ListFilesResponse { entries: l.entries.into_iter().map(file_info).collect() }))
    }

    async fn stat_file(&self, r: Request<api::StatFileRequest>) -> Result<Response<api::FileInfo>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let id = self.own_sandbox(&p, &r.id).await?;
        let path = guest_path("path", &r.path)?;
        let sb = self.rt.agent_of(&id).await?;
        let st = sb.agent.stat(path, FILE_OP_TIMEOUT).await.map_err(Error::from)?;
        Ok(Response::new(file_info(st)))
    }

    async fn remove_file(
        &self,
        r: Request<api::RemoveFileRequest>,
    ) -> Result<Response<api::RemoveFileResponse>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let id = self.own_sandbox(&p, &r.id).await?;
        let path = guest_path("path", &r.path)?;
        if path == "/" {
            return Err(Error::invalid("path", "refusing to remove /").into());
        }
        let sb = self.rt.agent_of(&id).await?;
        sb.agent.remove(path, r.recursive, FILE_OP_TIMEOUT).await.map_err(Error::from)?;
        Ok(Response::new(api::RemoveFileResponse {}))
    }

    async fn renew_sandbox(&self, r: Request<api::RenewSandboxRequest>) -> Result<Response<api::Sandbox>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let id = self.own_sandbox(&p, &r.id).await?;
        let rec = self.rt.renew(&id, r.ttl_secs).await?;
        Ok(Response::new(convert::sandbox(&rec, crate::core::now_unix())))
    }

    type WatchEventsStream = BoxStream<api::Event>;

    async fn watch_events(
        &self,
        r: Request<api::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let p = principal(&r);
        let f = r.into_inner();
        let mut rx = self.rt.events.subscribe();
        let out = async_stream(move |tx| async move {
            loop {
                let ev = match rx.recv().await {
                    Ok(ev) => ev,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => break,
                };
                let keep = p.owns(&ev.owner)
                    && (f.sandbox_id.is_empty() || f.sandbox_id == ev.sandbox_id)
                    && (f.workspace.is_empty() || f.workspace == ev.workspace)
                    && (f.snapshot_tag.is_empty() || f.snapshot_tag == ev.snapshot_tag);
                if !keep {
                    continue;
                }
                let msg = api::Event {
                    kind: ev.kind.into(),
                    sandbox_id: ev.sandbox_id,
                    workspace: ev.workspace,
                    snapshot_tag: ev.snapshot_tag,
                    reason: ev.reason,
                    at_unix_ms: ev.at_unix_ms,
                };
                if tx.send(Ok(msg)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(out))
    }
}

fn file_info(s: pb::FileStat) -> api::FileInfo {
    api::FileInfo {
        name: s.name,
        path: s.path,
        size: s.size,
        mode: s.mode,
        is_dir: s.is_dir,
        is_symlink: s.is_symlink,
        mtime_unix: s.mtime_unix,
        digest: String::new(),
    }
}

/// A response stream fed by a task; the task stops when the client goes away.
fn async_stream<T, F, Fut>(f: F) -> BoxStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Checks volume specs (regular files beneath the volume root) and returns
/// them in their stored form.
pub(crate) fn volume_specs(specs: &[String], root: &crate::host::paths::Root) -> Result<Vec<String>, Status> {
    let vols = crate::core::volumes::parse_all(specs, root)?;
    Ok(vols.iter().map(|v| v.to_spec_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unary_exec_output_is_capped() {
        let mut c = Capped::new(10);
        c.push(b"12345");
        c.push(b"67890abc");
        assert!(c.truncated);
        assert_eq!(c.text(), "1234567890");
        let mut c = Capped::new(10);
        c.push(b"0123456789");
        assert!(!c.truncated, "exactly the cap is not truncated");
        assert_eq!(output_cap(0, MAX_EXEC_OUTPUT_BYTES).unwrap(), DEFAULT_EXEC_OUTPUT_BYTES);
        assert_eq!(output_cap(0, 1024).unwrap(), 1024, "the default never exceeds the daemon's limit");
        assert_eq!(output_cap(5, 1024).unwrap(), 5);
        let e = output_cap(2048, 1024).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("max_output_bytes"));
    }
}
