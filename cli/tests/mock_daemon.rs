//! Runs the real `forkd` binary against a small in-process gRPC server that
//! stands in for forkd-server, and checks what scripts depend on: exit
//! codes, streamed exec output, the bearer token, JSON output and paging.

use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Command, Output};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use forkd_api::v1::{
    AttachProcessRequest, CloseStdinRequest, CreateSandboxesRequest, CreateSandboxesResponse, DataChunk,
    DeleteSandboxRequest, DeleteSandboxesRequest, DeleteSandboxesResponse, EvalRequest, EvalResponse, Event, ExecEvent,
    ExecInput, ExecRequest, ExecResponse, FileEvents, FileInfo, GetSandboxRequest, GetVersionRequest, ListFilesRequest,
    ListFilesResponse, ListProcessesRequest, ListProcessesResponse, ListSandboxesRequest, ListSandboxesResponse,
    PingRequest, PingResponse, ProcessInfo, ReadFileRequest, RemoveFileRequest, RemoveFileResponse, ResizePtyRequest,
    Sandbox, SendStdinRequest, SignalProcessRequest, Snapshot, StartProcessRequest, StatFileRequest, VersionInfo,
    WatchEventsRequest, WatchFilesRequest, WriteFileRequest, exec_event,
    sandbox_service_server::{SandboxService, SandboxServiceServer},
    system_service_server::{SystemService, SystemServiceServer},
};
use forkd_api::v1::{
    CompactSnapshotRequest, CreateSnapshotRequest, DeleteSnapshotRequest, DeleteSnapshotResponse,
    DeriveSnapshotRequest, ExportSnapshotRequest, GetSnapshotRequest, ImportSnapshotRequest,
    ListRemoteSnapshotsRequest, ListRemoteSnapshotsResponse, ListSnapshotsRequest, ListSnapshotsResponse,
    PullSnapshotRequest, PushSnapshotRequest, PushSnapshotResponse,
    snapshot_service_server::{SnapshotService, SnapshotServiceServer},
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

const TOKEN: &str = "s3cret-token";

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Clone, Default)]
struct Mock {
    /// GetSnapshot calls per tag: a snapshot "finishes" after a few polls.
    polls: Arc<Mutex<HashMap<String, u32>>>,
}

fn authorize<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get("authorization") {
        Some(v) if v == format!("Bearer {TOKEN}").as_str() => Ok(()),
        Some(_) => Err(Status::permission_denied("wrong token")),
        None => Err(Status::unauthenticated("missing bearer token")),
    }
}

fn sandbox(id: &str, pid: u32) -> Sandbox {
    Sandbox {
        id: id.into(),
        snapshot_tag: "py".into(),
        pid,
        status: "running".into(),
        created_at_unix: 1,
        memory_limit_mib: 512,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl SystemService for Mock {
    async fn get_version(&self, req: Request<GetVersionRequest>) -> Result<Response<VersionInfo>, Status> {
        authorize(&req)?;
        Ok(Response::new(VersionInfo {
            version: "9.9.9".into(),
            api: "v1".into(),
            backend: "qemu".into(),
            accel: "tcg".into(),
            accel_reason: "no /dev/kvm".into(),
            git_commit: String::new(),
            data_dir: "/var/lib/forkd".into(),
            sandboxes: 2,
            snapshots: 1,
            vmm_confinement: "jail: own uid, no capabilities".into(),
            auth: "token".into(),
        }))
    }
}

fn exit_event(exit_code: i32, signal: i32, timed_out: bool) -> Result<ExecEvent, Status> {
    Ok(ExecEvent {
        event: Some(exec_event::Event::Exit(ExecResponse { exit_code, signal, timed_out, ..Default::default() })),
    })
}

fn out(bytes: &[u8]) -> Result<ExecEvent, Status> {
    Ok(ExecEvent { event: Some(exec_event::Event::Stdout(bytes.to_vec())) })
}

fn err(bytes: &[u8]) -> Result<ExecEvent, Status> {
    Ok(ExecEvent { event: Some(exec_event::Event::Stderr(bytes.to_vec())) })
}

#[tonic::async_trait]
impl SandboxService for Mock {
    type ExecStreamStream = BoxStream<ExecEvent>;
    type ExecInteractiveStream = BoxStream<ExecEvent>;
    type ReadFileStream = BoxStream<DataChunk>;
    type WatchEventsStream = BoxStream<Event>;

    async fn create_sandboxes(
        &self,
        req: Request<CreateSandboxesRequest>,
    ) -> Result<Response<CreateSandboxesResponse>, Status> {
        authorize(&req)?;
        let r = req.into_inner();
        if r.snapshot_tag == "missing" {
            return Err(Status::not_found("snapshot \"missing\" not found"));
        }
        let n = r.n.unwrap_or(1);
        let sandboxes = (0..n).map(|i| sandbox(&format!("sb-new{i}"), 100 + i)).collect();
        Ok(Response::new(CreateSandboxesResponse { sandboxes }))
    }

    async fn list_sandboxes(
        &self,
        req: Request<ListSandboxesRequest>,
    ) -> Result<Response<ListSandboxesResponse>, Status> {
        authorize(&req)?;
        // Two pages, so the client has to follow the token.
        let r = req.into_inner();
        let resp = if r.page_token.is_empty() {
            ListSandboxesResponse { sandboxes: vec![sandbox("sb-first", 11)], next_page_token: "page2".into() }
        } else {
            ListSandboxesResponse { sandboxes: vec![sandbox("sb-second", 22)], next_page_token: String::new() }
        };
        Ok(Response::new(resp))
    }

    async fn get_sandbox(&self, _: Request<GetSandboxRequest>) -> Result<Response<Sandbox>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn delete_sandbox(
        &self,
        _: Request<DeleteSandboxRequest>,
    ) -> Result<Response<DeleteSandboxesResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn delete_sandboxes(
        &self,
        req: Request<DeleteSandboxesRequest>,
    ) -> Result<Response<DeleteSandboxesResponse>, Status> {
        authorize(&req)?;
        let r = req.into_inner();
        let deleted = if r.all { vec!["sb-a".into(), "sb-b".into(), "sb-c".into()] } else { r.ids };
        Ok(Response::new(DeleteSandboxesResponse { deleted }))
    }

    async fn exec(&self, _: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn exec_stream(&self, req: Request<ExecRequest>) -> Result<Response<Self::ExecStreamStream>, Status> {
        authorize(&req)?;
        let r = req.into_inner();
        if r.id == "sb-gone" {
            return Err(Status::not_found("sandbox sb-gone not found"));
        }
        let events = match r.args[0].as_str() {
            "ok" => vec![out(b"hello "), err(b"warning\n"), out(b"world\n"), exit_event(0, 0, false)],
            "fail" => vec![out(b"partial\n"), exit_event(3, 0, false)],
            "killed" => vec![exit_event(-1, 9, false)],
            "slow" => vec![exit_event(-1, 9, true)],
            "silent" => vec![out(b"no exit record\n")],
            "echo" => {
                let mut env: Vec<_> = r.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
                env.sort();
                let line = format!(
                    "args={:?} cwd={} env={} timeout={} stdin={}\n",
                    r.args,
                    r.cwd,
                    env.join(","),
                    r.timeout_secs,
                    String::from_utf8_lossy(&r.stdin)
                );
                vec![out(line.as_bytes()), exit_event(0, 0, false)]
            }
            _ => vec![Err(Status::invalid_argument("unknown command"))],
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }

    async fn exec_interactive(
        &self,
        _: Request<Streaming<ExecInput>>,
    ) -> Result<Response<Self::ExecInteractiveStream>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn start_process(&self, _: Request<StartProcessRequest>) -> Result<Response<ProcessInfo>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn list_processes(
        &self,
        _: Request<ListProcessesRequest>,
    ) -> Result<Response<ListProcessesResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    type AttachProcessStream = BoxStream<ExecEvent>;

    async fn attach_process(
        &self,
        _: Request<AttachProcessRequest>,
    ) -> Result<Response<Self::AttachProcessStream>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn signal_process(&self, _: Request<SignalProcessRequest>) -> Result<Response<ProcessInfo>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn send_stdin(&self, _: Request<SendStdinRequest>) -> Result<Response<ProcessInfo>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn close_stdin(&self, _: Request<CloseStdinRequest>) -> Result<Response<ProcessInfo>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn resize_pty(&self, _: Request<ResizePtyRequest>) -> Result<Response<ProcessInfo>, Status> {
        Err(Status::unimplemented("mock"))
    }

    type WatchFilesStream = BoxStream<FileEvents>;

    async fn watch_files(&self, _: Request<WatchFilesRequest>) -> Result<Response<Self::WatchFilesStream>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn eval(&self, req: Request<EvalRequest>) -> Result<Response<EvalResponse>, Status> {
        authorize(&req)?;
        let r = req.into_inner();
        if r.code == "sleep" {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        }
        let resp = if r.code == "1/0" {
            EvalResponse {
                stdout: "before\n".into(),
                error: "Traceback (most recent call last):\nZeroDivisionError: division by zero".into(),
                exit_code: 1,
                ..Default::default()
            }
        } else {
            EvalResponse { stdout: "printed\n".into(), result: format!("<{}>", r.code), ..Default::default() }
        };
        Ok(Response::new(resp))
    }

    async fn ping(&self, req: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        authorize(&req)?;
        Ok(Response::new(PingResponse { ok: true, latency_ms: 0.5, uptime_secs: 3.0, runtime_ready: true }))
    }

    async fn branch(&self, _: Request<forkd_api::v1::BranchRequest>) -> Result<Response<Snapshot>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn read_file(&self, _: Request<ReadFileRequest>) -> Result<Response<Self::ReadFileStream>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn write_file(&self, _: Request<Streaming<WriteFileRequest>>) -> Result<Response<FileInfo>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn list_files(&self, _: Request<ListFilesRequest>) -> Result<Response<ListFilesResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn stat_file(&self, _: Request<StatFileRequest>) -> Result<Response<FileInfo>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn remove_file(&self, _: Request<RemoveFileRequest>) -> Result<Response<RemoveFileResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn renew_sandbox(
        &self,
        _req: Request<forkd_api::v1::RenewSandboxRequest>,
    ) -> Result<Response<forkd_api::v1::Sandbox>, Status> {
        Err(Status::unimplemented("renew"))
    }

    async fn watch_events(&self, _: Request<WatchEventsRequest>) -> Result<Response<Self::WatchEventsStream>, Status> {
        Err(Status::unimplemented("mock"))
    }
}

fn snap(tag: &str, status: &str) -> Snapshot {
    Snapshot {
        tag: tag.into(),
        status: status.into(),
        kind: "base".into(),
        image: "python".into(),
        mem_mib: 256,
        logical_size_bytes: 256 << 20,
        physical_size_bytes: 3 << 20,
        created_at_unix: 1,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl SnapshotService for Mock {
    type ExportSnapshotStream = BoxStream<DataChunk>;

    async fn create_snapshot(&self, req: Request<CreateSnapshotRequest>) -> Result<Response<Snapshot>, Status> {
        authorize(&req)?;
        let r = req.into_inner();
        if r.tag == "taken" {
            return Err(Status::already_exists("snapshot \"taken\" already exists"));
        }
        assert!(!r.wait, "the client polls instead of waiting");
        Ok(Response::new(snap(&r.tag, "writing")))
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        authorize(&req)?;
        let mut child = snap("py-child", "ready");
        child.kind = "diff".into();
        child.parent_tag = "py".into();
        Ok(Response::new(ListSnapshotsResponse {
            snapshots: vec![snap("py", "ready"), child],
            next_page_token: String::new(),
        }))
    }

    async fn get_snapshot(&self, req: Request<GetSnapshotRequest>) -> Result<Response<Snapshot>, Status> {
        authorize(&req)?;
        let tag = req.into_inner().tag;
        let polls = {
            let mut polls = self.polls.lock().unwrap();
            let n = polls.entry(tag.clone()).or_default();
            *n += 1;
            *n
        };
        match tag.as_str() {
            "nope" => Err(Status::not_found("snapshot \"nope\" not found")),
            "broken" if polls >= 2 => {
                let mut s = snap(&tag, "failed");
                s.status_reason = "guest never became ready".into();
                Ok(Response::new(s))
            }
            _ if polls >= 3 => Ok(Response::new(snap(&tag, "ready"))),
            _ => Ok(Response::new(snap(&tag, "writing"))),
        }
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        authorize(&req)?;
        let r = req.into_inner();
        match (r.tag.as_str(), r.cascade) {
            ("py", false) => Err(Status::failed_precondition("snapshot \"py\" has dependents: py-child")),
            ("py", true) => Ok(Response::new(DeleteSnapshotResponse {
                deleted: vec!["py-child".into(), "py".into()],
                orphaned: vec![],
            })),
            ("nope", _) => Err(Status::not_found("snapshot \"nope\" not found")),
            (tag, _) => Ok(Response::new(DeleteSnapshotResponse { deleted: vec![tag.into()], orphaned: vec![] })),
        }
    }

    async fn compact_snapshot(&self, _: Request<CompactSnapshotRequest>) -> Result<Response<Snapshot>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn share_snapshot(
        &self,
        _: Request<forkd_api::v1::ShareSnapshotRequest>,
    ) -> Result<Response<Snapshot>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn derive_snapshot(&self, req: Request<DeriveSnapshotRequest>) -> Result<Response<Snapshot>, Status> {
        authorize(&req)?;
        let r = req.into_inner();
        // Echo the argv back so the test can see how --exec was split.
        let mut s = snap(&r.tag, "ready");
        s.kind = "diff".into();
        s.parent_tag = r.from_tag;
        s.labels = [("argv".to_string(), format!("{:?}", r.exec))].into();
        Ok(Response::new(s))
    }

    async fn export_snapshot(
        &self,
        _: Request<ExportSnapshotRequest>,
    ) -> Result<Response<Self::ExportSnapshotStream>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn import_snapshot(
        &self,
        _: Request<Streaming<ImportSnapshotRequest>>,
    ) -> Result<Response<Snapshot>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn push_snapshot(&self, _: Request<PushSnapshotRequest>) -> Result<Response<PushSnapshotResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn pull_snapshot(&self, _: Request<PullSnapshotRequest>) -> Result<Response<Snapshot>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn list_remote_snapshots(
        &self,
        _: Request<ListRemoteSnapshotsRequest>,
    ) -> Result<Response<ListRemoteSnapshotsResponse>, Status> {
        Err(Status::failed_precondition("this daemon has no remote: start it with --remote URL"))
    }
}

/// A mock daemon on a loopback port, stopped when dropped.
struct Daemon {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    fn start() -> Self {
        Self::start_with(None)
    }

    /// Serves https with `identity` (certificate and key, PEM).
    fn start_with(identity: Option<(String, String)>) -> Self {
        let tls = identity.is_some();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel::<SocketAddr>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let mock = Mock::default();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let mut builder = tonic::transport::Server::builder();
                if let Some((cert, key)) = identity {
                    let tls = tonic::transport::ServerTlsConfig::new()
                        .identity(tonic::transport::Identity::from_pem(cert, key));
                    builder = builder.tls_config(tls).unwrap();
                }
                builder
                    .add_service(SystemServiceServer::new(mock.clone()))
                    .add_service(SandboxServiceServer::new(mock.clone()))
                    .add_service(SnapshotServiceServer::new(mock))
                    .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async {
                        let _ = stop_rx.await;
                    })
                    .await
                    .unwrap();
            });
        });
        let addr = addr_rx.recv().unwrap();
        let scheme = if tls { "https" } else { "http" };
        Self { url: format!("{scheme}://{addr}"), stop: Some(stop_tx), thread: Some(thread) }
    }

    /// Runs `forkd` with the daemon's URL and token in its environment.
    fn forkd(&self, args: &[&str]) -> Output {
        self.forkd_stdin(args, "")
    }

    fn forkd_stdin(&self, args: &[&str], stdin: &str) -> Output {
        run(args, &[("FORKD_URL", &self.url), ("FORKD_TOKEN", TOKEN)], stdin)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(args: &[&str], env: &[(&str, &str)], stdin: &str) -> Output {
    use std::io::Write;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_forkd"));
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for var in ["FORKD_URL", "FORKD_TOKEN", "FORKD_TOKEN_FILE", "FORKD_CA_CERT"] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run forkd");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited normally")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn exec_streams_output_and_passes_the_exit_code_through() {
    let d = Daemon::start();
    let o = d.forkd(&["exec", "sb-x", "--", "ok"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "hello world\n");
    assert_eq!(stderr(&o), "warning\n");

    let o = d.forkd(&["exec", "sb-x", "fail"]);
    assert_eq!(code(&o), 3);
    assert_eq!(stdout(&o), "partial\n");

    assert_eq!(code(&d.forkd(&["exec", "sb-x", "killed"])), 137);
    assert_eq!(code(&d.forkd(&["exec", "sb-x", "slow"])), 124);

    let o = d.forkd(&["exec", "sb-x", "silent"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("without an exit status"), "{}", stderr(&o));

    let o = d.forkd(&["exec", "sb-gone", "ok"]);
    assert_eq!(code(&o), 3);
    assert!(stderr(&o).starts_with("forkd: "), "{}", stderr(&o));

    assert_eq!(code(&d.forkd(&["exec", "sb-x", "bogus"])), 2);
}

#[test]
fn exec_sends_env_cwd_timeout_and_stdin() {
    let d = Daemon::start();
    let o = d.forkd_stdin(
        &[
            "exec",
            "sb-x",
            "-e",
            "B=2",
            "--env",
            "A=1",
            "--cwd",
            "/tmp",
            "--timeout",
            "1m",
            "-i",
            "echo",
            "-n",
            "--json",
        ],
        "fed",
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "args=[\"echo\", \"-n\", \"--json\"] cwd=/tmp env=A=1,B=2 timeout=60 stdin=fed\n");
}

#[test]
fn token_is_sent_as_bearer() {
    let d = Daemon::start();
    let o = d.forkd(&["where"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("data_dir   /var/lib/forkd"), "{}", stdout(&o));

    let o = run(&["where"], &[("FORKD_URL", &d.url)], "");
    assert_eq!(code(&o), 5);
    assert!(stderr(&o).contains("--token"), "{}", stderr(&o));

    let o = run(&["--token", "wrong", "--url", &d.url, "where"], &[], "");
    assert_eq!(code(&o), 5);

    let dir = std::env::temp_dir().join(format!("forkd-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    // A token file others may read is refused, with the fix in the message.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = run(&["where", "--token-file", file.to_str().unwrap()], &[("FORKD_URL", &d.url)], "");
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("chmod 600"), "{}", stderr(&o));
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let o = run(&["where", "--token-file", file.to_str().unwrap()], &[("FORKD_URL", &d.url)], "");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn json_output_keeps_numbers() {
    let d = Daemon::start();
    let o = d.forkd(&["where", "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["sandboxes"], 2);
    assert_eq!(v["url"], d.url.as_str());

    let o = d.forkd(&["--json", "version"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["server"]["accel_reason"], "no /dev/kvm");
    assert_eq!(v["client"]["version"], env!("CARGO_PKG_VERSION"));

    let o = d.forkd(&["fork", "--tag", "py", "-n", "2", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[1]["pid"], 101);
    assert_eq!(v[0]["memory_limit_mib"], 512);
}

#[test]
fn listings_follow_pages_and_align() {
    let d = Daemon::start();
    let o = d.forkd(&["ls"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("ID         SNAPSHOT  STATUS   PID  CREATED"), "{text}");
    assert!(lines[1].starts_with("sb-first   py        running  11"), "{text}");
    assert!(lines[2].starts_with("sb-second"), "{text}");
    assert!(lines[2].ends_with("512 MiB"), "{text}");
    assert!(text.lines().all(|l| !l.ends_with(' ')));

    let o = d.forkd(&["ls", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
}

#[test]
fn fork_kill_eval_ping() {
    let d = Daemon::start();
    let o = d.forkd(&["spawn", "-t", "py", "-n", "3", "--quiet"]);
    assert_eq!(stdout(&o), "sb-new0\nsb-new1\nsb-new2\n");
    let o = d.forkd(&["fork", "-t", "missing"]);
    assert_eq!(code(&o), 3);
    assert_eq!(stderr(&o), "forkd: snapshot \"missing\" not found\n");

    let o = d.forkd(&["kill", "sb-a", "sb-b"]);
    assert_eq!((code(&o), stdout(&o).as_str()), (0, "killed 2 sandboxes\n"));
    let o = d.forkd(&["kill", "--all", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["deleted"].as_array().unwrap().len(), 3);

    let o = d.forkd(&["eval", "sb-x", "2 + 2"]);
    assert_eq!(code(&o), 0);
    assert_eq!(stdout(&o), "printed\n<2 + 2>\n");
    let o = d.forkd_stdin(&["eval", "sb-x", "-"], "from stdin");
    assert_eq!(stdout(&o), "printed\n<from stdin>\n");
    let o = d.forkd(&["eval", "sb-x", "1/0"]);
    assert_eq!(code(&o), 1);
    assert_eq!(stdout(&o), "before\n");
    assert!(stderr(&o).ends_with("ZeroDivisionError: division by zero\n"));

    let o = d.forkd(&["ping", "sb-x"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).starts_with("sb-x: 0.50 ms"), "{}", stdout(&o));
}

#[test]
fn services_the_daemon_lacks_exit_7() {
    // The mock serves no WorkspaceService and no CompactSnapshot.
    let d = Daemon::start();
    let o = d.forkd(&["workspace", "list"]);
    assert_eq!(code(&o), 7, "{}", stderr(&o));
    assert_eq!(code(&d.forkd(&["compact", "py", "--to", "flat"])), 7);
}

#[test]
fn snapshot_create_polls_until_ready() {
    let d = Daemon::start();
    let o = d.forkd(&["snapshot", "--tag", "fresh", "--image", "python"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).starts_with("fresh ready, kind base"), "{}", stdout(&o));
    // Not a terminal: one plain progress line per status, no spinner.
    let err = stderr(&o);
    assert!(err.contains("snapshot fresh: writing"), "{err}");
    assert!(err.contains("snapshot fresh: ready"), "{err}");
    assert_eq!(err.matches("writing").count(), 1, "{err}");

    let o = d.forkd(&["snapshot", "--tag", "other", "--image", "python", "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["status"], "ready");
    assert_eq!(v["physical_size_bytes"], 3 << 20);

    let o = d.forkd(&["snapshot", "--tag", "later", "--image", "python", "--no-wait"]);
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).starts_with("later: writing"), "{}", stdout(&o));
}

#[test]
fn snapshot_failure_exits_1_with_the_reason() {
    let d = Daemon::start();
    let o = d.forkd(&["snapshot", "--tag", "broken", "--image", "python"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).ends_with("forkd: snapshot broken failed: guest never became ready\n"), "{}", stderr(&o));
    let o = d.forkd(&["snapshot", "--tag", "taken", "--image", "python"]);
    assert_eq!(code(&o), 4);
}

#[test]
fn images_info_and_rmi() {
    let d = Daemon::start();
    let o = d.forkd(&["images"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "TAG       STATUS  KIND  PARENT  IMAGE   MEM      SIZE     CREATED");
    assert!(lines[1].starts_with("py        ready   base  -       python  256 MiB  3.0 MiB"), "{text}");
    assert!(lines[2].starts_with("py-child  ready   diff  py"), "{text}");

    let o = d.forkd(&["snapshots", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[1]["parent_tag"], "py");

    let o = d.forkd(&["snapshot-info", "nope"]);
    assert_eq!(code(&o), 3);

    let o = d.forkd(&["rmi", "py"]);
    assert_eq!(code(&o), 4);
    assert!(stderr(&o).contains("dependents"), "{}", stderr(&o));
    let o = d.forkd(&["rmi", "py", "--cascade"]);
    assert_eq!(stdout(&o), "deleted py-child\ndeleted py\n");
    // Every tag is tried; the first failure decides the exit code.
    let o = d.forkd(&["rmi", "nope", "old", "--json"]);
    assert_eq!(code(&o), 3);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["deleted"], serde_json::json!(["old"]));
}

#[test]
fn snapshot_diff_splits_the_command() {
    let d = Daemon::start();
    let o = d.forkd(&["snapshot-diff", "--from", "py", "--tag", "py2", "--exec", "pip install 'a b'", "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["labels"]["argv"], r#"["pip", "install", "a b"]"#);
    assert_eq!(v["parent_tag"], "py");

    let o = d.forkd(&["snapshot-diff", "--from", "py", "--tag", "py3", "--sh", "--exec", "a | b", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["labels"]["argv"], r#"["sh", "-c", "a | b"]"#);
}

#[test]
fn timeout_exits_8() {
    let d = Daemon::start();
    let started = std::time::Instant::now();
    let o = d.forkd(&["--timeout", "300ms", "eval", "sb-x", "sleep"]);
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("--timeout"), "{}", stderr(&o));
    assert!(started.elapsed() < std::time::Duration::from_secs(4));
}

/// A CA and a certificate it signed for 127.0.0.1, as PEM:
/// (ca, server certificate, server key).
fn test_pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

#[test]
fn https_with_a_private_ca() {
    let (ca, cert, key) = test_pki();
    let d = Daemon::start_with(Some((cert, key)));
    assert!(d.url.starts_with("https://"));
    let dir = std::env::temp_dir().join(format!("forkd-cli-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();

    let o = d.forkd(&["where", "--ca-cert", ca_file.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = run(
        &["ls"],
        &[("FORKD_URL", &d.url), ("FORKD_TOKEN", TOKEN), ("FORKD_CA_CERT", ca_file.to_str().unwrap())],
        "",
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    // Without the CA the system roots do not trust the daemon.
    let o = d.forkd(&["where"]);
    assert_eq!(code(&o), 6);
    assert!(stderr(&o).contains("--ca-cert"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unreachable_daemon_exits_6_and_names_the_url() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let o = run(&["--url", &url, "ls"], &[], "");
    assert_eq!(code(&o), 6);
    let err = stderr(&o);
    assert!(err.starts_with("forkd: "), "{err}");
    assert!(err.contains(&url), "{err}");
    assert!(err.contains("forkd-server"), "{err}");

    // `version` still shows the client's own version first.
    let o = run(&["--url", &url, "version"], &[], "");
    assert_eq!(code(&o), 6);
    assert!(stdout(&o).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn usage_errors_exit_2_without_contacting_anyone() {
    for args in [
        &["snapshot-info", "../etc"][..],
        &["fork", "--tag", "py", "-n", "0"],
        &["--url", "ftp://x", "ls"],
        &["--url", "http://127.0.0.1:1", "--ca-cert", "/nonexistent", "ls"],
        &["nonsense"],
    ] {
        let o = run(args, &[], "");
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn help_and_completions_need_no_daemon() {
    let o = run(&["--help"], &[], "");
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).contains("Exit codes:"));
    for shell in ["bash", "zsh", "fish"] {
        let o = run(&["completions", shell], &[("FORKD_URL", "http://127.0.0.1:1")], "");
        assert_eq!(code(&o), 0, "{shell}");
        assert!(stdout(&o).contains("snapshot-info"), "{shell}");
    }
}
