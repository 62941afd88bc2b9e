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
    ListFilesResponse, ListPoolsRequest, ListPoolsResponse, ListProcessesRequest, ListProcessesResponse,
    ListSandboxesRequest, ListSandboxesResponse, PingRequest, PingResponse, Pool, ProcessInfo, ReadFileRequest,
    RemoveFileRequest, RemoveFileResponse, ResizePtyRequest, Sandbox, SendStdinRequest, SetPoolRequest,
    SignalProcessRequest, Snapshot, StartProcessRequest, StatFileRequest, VersionInfo, WatchEventsRequest,
    WatchFilesRequest, WriteFileRequest, exec_event,
    sandbox_service_server::{SandboxService, SandboxServiceServer},
    system_service_server::{SystemService, SystemServiceServer},
};
use forkd_api::v1::{
    BuildImageRequest, DeleteImageRequest, DeleteImageResponse, GetImageRequest, Image, ImageProgress,
    ImportImageRequest, LayerProgress, ListImagesRequest, ListImagesResponse, PullImageRequest, image_progress,
    image_service_server::{ImageService, ImageServiceServer},
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
    /// Snapshots created, by tag: their image and labels show in GetSnapshot.
    created: Arc<Mutex<HashMap<String, CreateSnapshotRequest>>>,
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
    type OpenPortStream = BoxStream<forkd_api::v1::PortOutput>;
    type WatchSandboxMetricsStream = BoxStream<forkd_api::v1::SandboxMetrics>;

    async fn open_port(
        &self,
        _: Request<tonic::Streaming<forkd_api::v1::PortInput>>,
    ) -> Result<Response<Self::OpenPortStream>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn share_port(
        &self,
        _: Request<forkd_api::v1::SharePortRequest>,
    ) -> Result<Response<forkd_api::v1::PortShare>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn list_port_shares(
        &self,
        _: Request<forkd_api::v1::ListPortSharesRequest>,
    ) -> Result<Response<forkd_api::v1::ListPortSharesResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn unshare_port(
        &self,
        _: Request<forkd_api::v1::UnsharePortRequest>,
    ) -> Result<Response<forkd_api::v1::UnsharePortResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn get_sandbox_metrics(
        &self,
        _: Request<forkd_api::v1::GetSandboxMetricsRequest>,
    ) -> Result<Response<forkd_api::v1::SandboxMetrics>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn watch_sandbox_metrics(
        &self,
        _: Request<forkd_api::v1::WatchSandboxMetricsRequest>,
    ) -> Result<Response<Self::WatchSandboxMetricsStream>, Status> {
        Err(Status::unimplemented("mock"))
    }

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
        Ok(Response::new(PingResponse { ok: true, pong: true, latency_ms: 0.5, uptime_secs: 3.0, runtime_ready: true }))
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
        assert_eq!(r.wait, Some(false), "the client polls instead of waiting");
        let mut s = snap(&r.tag, "writing");
        s.image = r.image.clone();
        s.labels = r.labels.clone();
        self.created.lock().unwrap().insert(r.tag.clone(), r);
        Ok(Response::new(s))
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
        let created = self.created.lock().unwrap().get(&tag).cloned();
        let answer = |status: &str| {
            let mut s = snap(&tag, status);
            if let Some(c) = &created {
                s.image = c.image.clone();
                s.labels = c.labels.clone();
            }
            Ok(Response::new(s))
        };
        match tag.as_str() {
            "nope" => Err(Status::not_found("snapshot \"nope\" not found")),
            // `forkd run`'s snapshots exist once created.
            t if t.starts_with("run-") && created.is_none() => {
                Err(Status::not_found(format!("snapshot {t:?} not found")))
            }
            "broken" if polls >= 2 => {
                let mut s = snap(&tag, "failed");
                s.status_reason = "guest never became ready".into();
                Ok(Response::new(s))
            }
            _ if polls >= 3 => answer("ready"),
            _ => answer("writing"),
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

    async fn set_pool(&self, r: Request<SetPoolRequest>) -> Result<Response<Pool>, Status> {
        let r = r.into_inner();
        Ok(Response::new(Pool { tag: r.tag, ready: 0, filling: 1, target: r.target, network: r.network }))
    }

    async fn list_pools(&self, _: Request<ListPoolsRequest>) -> Result<Response<ListPoolsResponse>, Status> {
        Ok(Response::new(ListPoolsResponse {
            pools: vec![Pool { tag: "py".into(), ready: 2, filling: 1, target: 3, network: "none".into() }],
        }))
    }
}

/// A full digest of one repeated byte.
fn digest(byte: &str) -> String {
    format!("sha256:{}", byte.repeat(32))
}

fn stored(digest: String, names: &[&str], source: &str) -> Image {
    Image {
        digest,
        names: names.iter().map(|n| n.to_string()).collect(),
        source: source.into(),
        size_bytes: 12 << 20,
        created_at_unix: 1,
        config: Some(Default::default()),
        ..Default::default()
    }
}

/// The store: python (built in, no digest), team/app:1 alias app, and
/// used:1, which a snapshot was made from.
fn images() -> Vec<Image> {
    let python = Image {
        names: vec!["python".into()],
        source: "builtin".into(),
        runtime: "python".into(),
        size_bytes: 300 << 20,
        ..Default::default()
    };
    let mut used = stored(digest("cd"), &["used:1"], "pull");
    used.snapshots = vec!["py".into()];
    vec![python, stored(digest("ab"), &["team/app:1", "app"], "import"), used]
}

fn progress(event: image_progress::Event) -> Result<ImageProgress, Status> {
    Ok(ImageProgress { event: Some(event) })
}

#[tonic::async_trait]
impl ImageService for Mock {
    type PullImageStream = BoxStream<ImageProgress>;
    type BuildImageStream = BoxStream<ImageProgress>;

    async fn list_images(&self, req: Request<ListImagesRequest>) -> Result<Response<ListImagesResponse>, Status> {
        authorize(&req)?;
        Ok(Response::new(ListImagesResponse { images: images() }))
    }

    async fn get_image(&self, req: Request<GetImageRequest>) -> Result<Response<Image>, Status> {
        authorize(&req)?;
        let name = req.into_inner().name;
        images()
            .into_iter()
            .find(|i| i.digest == name || i.names.contains(&name))
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("image {name:?} not found (see `forkd image ls`)")))
    }

    async fn delete_image(&self, req: Request<DeleteImageRequest>) -> Result<Response<DeleteImageResponse>, Status> {
        authorize(&req)?;
        let name = req.into_inner().name;
        let Some(image) = images().into_iter().find(|i| i.digest == name || i.names.contains(&name)) else {
            return Err(Status::not_found(format!("image {name:?} not found")));
        };
        if !image.snapshots.is_empty() {
            let msg = format!("image {name:?} is used by snapshots: {}", image.snapshots.join(", "));
            return Err(Status::failed_precondition(msg));
        }
        // A name of several goes alone; the last name or the digest takes the image.
        let removed = image.names.len() == 1 || name == image.digest || name == "team/app:1";
        Ok(Response::new(DeleteImageResponse { digest: image.digest, removed }))
    }

    async fn import_image(&self, req: Request<Streaming<ImportImageRequest>>) -> Result<Response<Image>, Status> {
        authorize(&req)?;
        let mut stream = req.into_inner();
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("the archive is empty"))?;
        let mut data = first.data.clone();
        let mut messages = 1;
        while let Some(m) = stream.message().await? {
            assert!(m.name.is_empty() && m.r#ref.is_empty(), "only the first message names the image");
            data.extend(m.data);
            messages += 1;
        }
        // Echo what came: the entries of the tar, so tests see the layout.
        let mut entries = Vec::new();
        if let Ok(list) = tar::Archive::new(&data[..]).entries() {
            for e in list.flatten() {
                entries.push(
                    e.path().map(|p| p.display().to_string().trim_end_matches('/').to_string()).unwrap_or_default(),
                );
            }
        }
        let name = if first.name.is_empty() { "from-archive:1".to_string() } else { first.name.clone() };
        let mut image = stored(digest("ee"), &[&name], "import");
        image.origin = format!(
            "bytes={} messages={messages} ref={} devices={} entries={}",
            data.len(),
            first.r#ref,
            first.allow_devices,
            entries.join(",")
        );
        Ok(Response::new(image))
    }

    async fn pull_image(&self, req: Request<PullImageRequest>) -> Result<Response<Self::PullImageStream>, Status> {
        authorize(&req)?;
        let r = req.into_inner();
        let layer = |digest: String, done: u64| {
            progress(image_progress::Event::Layer(LayerProgress { digest, done, total: 2048 }))
        };
        if r.reference.starts_with("missing") {
            let events = vec![Err(Status::not_found(format!("{}: manifest unknown", r.reference)))];
            return Ok(Response::new(Box::pin(tokio_stream::iter(events))));
        }
        let name = if r.name.is_empty() { r.reference.clone() } else { r.name };
        let mut image = stored(digest("ff"), &[&name], "pull");
        image.origin = r.reference;
        let events = vec![
            layer(digest("01"), 0),
            layer(digest("01"), 2048),
            layer(digest("02"), 1024),
            layer(digest("02"), 2048),
            progress(image_progress::Event::Image(image)),
        ];
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }

    async fn build_image(&self, req: Request<BuildImageRequest>) -> Result<Response<Self::BuildImageStream>, Status> {
        authorize(&req)?;
        let r = req.into_inner();
        let mut image = stored(digest("bb"), &[&r.name], "build");
        image.origin = format!("from {}; apt {:?}; pip {:?}; run {:?}", r.from, r.apt, r.pip, r.run);
        image.runtime = "python".into();
        let events = vec![
            progress(image_progress::Event::Log("step 1\n".into())),
            progress(image_progress::Event::Log("\x1b[32mok\x1b[0m 10%\r100%".into())),
            progress(image_progress::Event::Image(image)),
        ];
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
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
                    .add_service(ImageServiceServer::new(mock.clone()))
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
    // The data directory alone, for `$(forkd where)/snapshots/TAG`.
    assert_eq!(stdout(&o), "/var/lib/forkd\n");
    let o = d.forkd(&["where", "--all"]);
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

    let o = d.forkd(&["pool", "ls", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v, serde_json::json!([{ "tag": "py", "ready": 2, "filling": 1, "target": 3, "network": "none" }]));
    let o = d.forkd(&["pool", "set", "py", "4", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["target"].as_u64(), v["filling"].as_u64()), (Some(4), Some(1)), "{v}");
    assert_eq!(v["network"], "none", "the default: {v}");
    let o = d.forkd(&["pool", "set", "py", "2", "--network", "nat", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["network"], "nat", "{v}");
    let o = d.forkd(&["pool", "set", "py", "2", "--network", "bridge"]);
    assert_eq!(code(&o), 2, "none or nat");
    let o = d.forkd(&["pool", "set", "py", "65"]);
    assert_eq!(code(&o), 2, "at most 64");
    let o = d.forkd(&["pool", "ls"]);
    let out = String::from_utf8_lossy(&o.stdout);
    let row = out.lines().nth(1).unwrap();
    assert!(out.contains("NETWORK") && row.split_whitespace().eq(["py", "none", "2", "1", "3"]), "{out}");
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

#[test]
fn image_ls_inspect_rm() {
    let d = Daemon::start();
    let o = d.forkd(&["image", "ls"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "NAMES           DIGEST        SOURCE   SIZE       RUNTIME  CREATED", "{text}");
    assert!(lines[1].starts_with("python          -             builtin  300.0 MiB  python   -"), "{text}");
    assert!(lines[2].starts_with("team/app:1,app  abababababab  import   12.0 MiB   -"), "{text}");

    let o = d.forkd(&["image", "ls", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[2]["snapshots"], serde_json::json!(["py"]));
    assert_eq!(v[1]["size_bytes"], 12 << 20);

    // Always JSON; by name, by digest prefix with and without sha256:.
    for name in ["app", "sha256:abab", "abababab"] {
        let o = d.forkd(&["image", "inspect", name]);
        assert_eq!(code(&o), 0, "{name}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["digest"], format!("sha256:{}", "ab".repeat(32)), "{name}");
    }
    let o = d.forkd(&["image", "inspect", "nope"]);
    assert_eq!(code(&o), 3);
    assert_eq!(stderr(&o), "forkd: image \"nope\" not found (see `forkd image ls`)\n");

    // The daemon's refusal, as it says it.
    let o = d.forkd(&["image", "rm", "used:1"]);
    assert_eq!(code(&o), 4);
    assert_eq!(stderr(&o), "forkd: image \"used:1\" is used by snapshots: py\n");
    let o = d.forkd(&["image", "rm", "app"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("untagged app (sha256:{} keeps its other names)\n", "ab".repeat(32)));
    let o = d.forkd(&["image", "rm", "abababab"]);
    assert_eq!(stdout(&o), format!("removed sha256:{} (abababab)\n", "ab".repeat(32)));
    // Every image is tried; the first failure decides the exit code.
    let o = d.forkd(&["image", "rm", "nope", "team/app:1", "--json"]);
    assert_eq!(code(&o), 3);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v,
        serde_json::json!([{ "name": "team/app:1", "digest": format!("sha256:{}", "ab".repeat(32)), "removed": true }])
    );
}

/// A small OCI image layout under a fresh temp dir.
fn layout(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("forkd-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(dir.join("index.json"), br#"{"schemaVersion":2,"manifests":[]}"#).unwrap();
    std::fs::write(dir.join("blobs/sha256").join("1".repeat(64)), vec![1u8; 600 << 10]).unwrap();
    dir
}

#[test]
fn image_import_streams_layouts_and_archives() {
    let d = Daemon::start();
    let dir = layout("import");
    let o = d.forkd(&["image", "import", dir.to_str().unwrap(), "--name", "team/x:1", "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["names"], serde_json::json!(["team/x:1"]));
    let origin = v["origin"].as_str().unwrap();
    let blob = format!("blobs/sha256/{}", "1".repeat(64));
    assert!(origin.contains(&format!("entries=blobs,blobs/sha256,{blob},index.json,oci-layout")), "{origin}");
    assert!(origin.contains("ref= devices=false"), "{origin}");
    assert!(!origin.contains("messages=1 "), "sent in several messages: {origin}");

    // A file goes as it is, with --ref and --allow-devices in the first message.
    let archive = dir.with_extension("tar");
    let mut tar = tar::Builder::new(Vec::new());
    tar.append_dir_all(".", &dir).unwrap();
    let bytes = tar.into_inner().unwrap();
    std::fs::write(&archive, &bytes).unwrap();
    let o = d.forkd(&["image", "import", archive.to_str().unwrap(), "--ref", "app:2", "--allow-devices"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).starts_with(&format!("imported from-archive:1 (sha256:{}, 12.0 MiB)", "ee".repeat(32))));
    let o = d.forkd(&["image", "import", archive.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["origin"].as_str().unwrap().starts_with(&format!("bytes={} ", bytes.len())), "{v}");

    // Refused before anything is sent.
    let o = d.forkd(&["image", "import", "/nonexistent/layout"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).starts_with("forkd: cannot read /nonexistent/layout: "), "{}", stderr(&o));
    std::fs::remove_file(dir.join("oci-layout")).unwrap();
    let o = d.forkd(&["image", "import", dir.to_str().unwrap()]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("not an OCI image layout (it has no oci-layout)"), "{}", stderr(&o));
    std::fs::write(&archive, "not a tar").unwrap();
    let o = d.forkd(&["image", "import", archive.to_str().unwrap()]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("is not a tar archive"), "{}", stderr(&o));
    std::fs::remove_file(&archive).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn image_pull_and_build_show_progress() {
    let d = Daemon::start();
    let o = d.forkd(&["image", "pull", "localhost:5000/team/app:1", "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // Only the image on stdout.
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["names"], serde_json::json!(["localhost:5000/team/app:1"]));
    // Not a terminal: a line per finished layer.
    let err = stderr(&o);
    assert!(err.starts_with("pulling localhost:5000/team/app:1\n"), "{err}");
    assert!(err.contains("  layer 010101010101: 2.0 KiB done\n"), "{err}");
    assert_eq!(err.matches("layer 020202020202").count(), 1, "{err}");
    let o = d.forkd(&["image", "pull", "localhost:5000/team/app:1", "--name", "app2"]);
    assert!(stdout(&o).starts_with("pulled app2 (sha256:ffff"), "{}", stdout(&o));
    let o = d.forkd(&["image", "pull", "missing/x:1"]);
    assert_eq!(code(&o), 3);
    assert!(stderr(&o).ends_with("forkd: missing/x:1: manifest unknown\n"), "{}", stderr(&o));

    let o = d.forkd(&["image", "build", "py-req", "--pip", "requests", "--apt", "curl", "--run", "true"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("built py-req (sha256:{}, 12.0 MiB, runtime python)\n", "bb".repeat(32)));
    // Build output indented, without escapes; the last of a \r-updated line.
    assert_eq!(stderr(&o), "building py-req from python\n  step 1\n  100%\n");
    let o = d.forkd(&["image", "build", "x", "--from", "sha256:abab", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["origin"], format!("from sha256:{}; apt []; pip []; run []", "ab".repeat(32)), "prefix looked up");
}

#[test]
fn parent_build_builds_imports_or_pulls() {
    let d = Daemon::start();
    let o = d.forkd(&["parent", "build", "python", "--extra", "curl", "--pip", "requests", "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["origin"], r#"from python; apt ["curl"]; pip ["requests"]; run []"#);
    let name = v["names"][0].as_str().unwrap();
    assert!(name.starts_with("parent-") && name.len() == 19, "{name}");
    // From a store image: its digest is the base.
    let o = d.forkd(&["parent", "build", "app", "--apt", "jq", "--name", "app-jq", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["names"], serde_json::json!(["app-jq"]));
    assert!(v["origin"].as_str().unwrap().starts_with(&format!("from sha256:{};", "ab".repeat(32))));
    // As `image build NAME --from BASE`.
    let o = d.forkd(&["parent", "build", "tools", "--from", "minimal", "--apt", "jq", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["names"][0].as_str(), v["origin"].as_str()),
        (Some("tools"), Some(r#"from minimal; apt ["jq"]; pip []; run []"#))
    );

    let dir = layout("parent");
    let o = d.forkd(&["parent", "build", dir.to_str().unwrap(), "--name", "p:1"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).starts_with("imported p:1 (sha256:eeee"), "{}", stdout(&o));
    std::fs::remove_dir_all(&dir).unwrap();
    let o = d.forkd(&["parent", "build", "localhost:5000/base:1"]);
    assert!(stdout(&o).starts_with("pulled localhost:5000/base:1 (sha256:ffff"), "{}", stdout(&o));
    let o = d.forkd(&["parent", "build", "./missing-dir"]);
    assert_eq!(code(&o), 2);
    assert_eq!(stderr(&o), "forkd: ./missing-dir: no such file or directory\n");
    let o = d.forkd(&["parent", "build", "localhost:5000/base:1", "--ref", "x"]);
    assert_eq!(code(&o), 2);
}

#[test]
fn from_image_snapshots_the_digest() {
    let d = Daemon::start();
    let o = d.forkd(&["from-image", "app", "--tag", "fromapp", "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["status"], "ready");
    assert_eq!(v["image"], format!("sha256:{}", "ab".repeat(32)));
    assert!(stderr(&o).starts_with("image app (sha256:abab"), "{}", stderr(&o));
    // A built-in has no digest: its name goes.
    let o = d.forkd(&["from-image", "python", "--tag", "frompy", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["image"], "python");
    // Not in the store, not a path: pulled.
    let o = d.forkd(&["from-image", "localhost:5000/new:1", "--tag", "fromreg", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["image"], format!("sha256:{}", "ff".repeat(32)));
    let o = d.forkd(&["from-image", "/no/such/layout", "--tag", "x"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("no image of the store"), "{}", stderr(&o));
}

#[test]
fn run_bakes_once_then_reuses_and_passes_the_exit_code() {
    let d = Daemon::start();
    // The mock has no ExecInteractive: piped stdin goes the buffered way.
    let o = d.forkd(&["run", "--image", "python", "--timings", "--", "ok"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "hello world\n");
    let err = stderr(&o);
    assert!(err.contains("warning\n"), "{err}");
    assert!(err.contains("PHASE  TIME"), "{err}");
    let bake = err.lines().find(|l| l.starts_with("bake ")).unwrap();
    assert!(bake.contains("run-") && bake.ends_with(" baked"), "{err}");
    assert!(err.lines().any(|l| l.starts_with("fork ") && l.ends_with("sb-new0")), "{err}");
    assert!(err.lines().any(|l| l.starts_with("exec ") && l.ends_with("exit 0")), "{err}");
    let kill = err.lines().find(|l| l.starts_with("kill ")).unwrap();
    assert!(kill.contains(" ms"), "the child was killed: {err}");

    let o = d.forkd(&["run", "--image", "python", "--timings", "--keep", "fail"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert_eq!(stdout(&o), "partial\n");
    let err = stderr(&o);
    assert!(err.lines().any(|l| l.starts_with("bake ") && l.ends_with(" reused")), "{err}");
    assert!(err.contains("forkd: kept sandbox sb-new0\n"), "{err}");

    let o = d.forkd(&["run", "--image", "python", "--timings", "--json", "--", "killed"]);
    assert_eq!(code(&o), 137);
    let timings: serde_json::Value = serde_json::from_str(stderr(&o).lines().last().unwrap()).unwrap();
    assert_eq!(timings["phases"][1]["phase"], "build");
    assert_eq!(timings["phases"][1]["ms"], serde_json::Value::Null);

    // With packages: a build first, and the snapshot of the built image.
    let o = d.forkd(&["run", "--image", "python", "--pip", "requests", "--timings", "--", "ok"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.lines().any(|l| l.starts_with("build ") && l.contains("(sha256:bbbb")), "{err}");

    // A tag that holds someone else's snapshot is not taken over.
    let o = d.forkd(&["run", "--image", "python", "--tag", "py", "--", "ok"]);
    assert_eq!(code(&o), 4);
    assert!(stderr(&o).contains("was not baked by `forkd run`"), "{}", stderr(&o));
    assert_eq!(stdout(&o), "");
}
