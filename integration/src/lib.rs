//! Test harness: starts a real `forkd-server` process on an ephemeral port and
//! hands out real gRPC and HTTP clients to it. Dropping a `Daemon` stops it
//! and kills every VM it left behind, so a failing test leaks nothing.

pub mod chaos;
pub mod oci;
pub mod registry;
pub mod s3;
pub mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use forkd_api::v1::{
    sandbox_service_client::SandboxServiceClient, snapshot_service_client::SnapshotServiceClient,
    system_service_client::SystemServiceClient, workspace_service_client::WorkspaceServiceClient,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Where cargo put the workspace binaries (next to the test executable's deps dir).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps dir");
    if deps.ends_with("deps") { deps.parent().unwrap().to_path_buf() } else { deps.to_path_buf() }
}

pub fn server_bin() -> PathBuf {
    let p = bin_dir().join("forkd-server");
    assert!(p.exists(), "{} missing: run `cargo build --workspace` first", p.display());
    p
}

pub fn cli_bin() -> PathBuf {
    let p = bin_dir().join("forkd");
    assert!(p.exists(), "{} missing: run `cargo build --workspace` first", p.display());
    p
}

/// Guest assets built by scripts/build-guest.sh.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("FORKD_GUEST_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/lib/forkd/guest"))
}

/// Options for a test daemon.
#[derive(Default, Clone)]
pub struct Options {
    pub token: Option<String>,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub audit_log: Option<PathBuf>,
    pub extra_args: Vec<String>,
    /// Reuse this data dir (restart tests); a fresh temp dir otherwise.
    pub data_dir: Option<PathBuf>,
    /// A command the daemon is started under, e.g. `setpriv
    /// --bounding-set …` to run it as the shipped systemd unit would.
    pub wrapper: Vec<String>,
    /// Environment variables the daemon gets besides the test's own (e.g.
    /// an object store's credentials and endpoint).
    pub env: Vec<(String, String)>,
}

pub struct Daemon {
    child: Option<Child>,
    pub addr: String,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub token: Option<String>,
    pub tls: bool,
}

/// A test token that passes the daemon's strength checks.
pub const TEST_TOKEN: &str = "tKq2r9VfX81mWz4LcN7pHs0dJy5uBe3a";

impl Daemon {
    pub fn start(opts: Options) -> Self {
        support::netns_before_tests();
        let (tmp, data_dir) = match &opts.data_dir {
            Some(d) => (None, d.clone()),
            None => {
                let t = tempfile::Builder::new().prefix("forkd-it-").tempdir_in("/tmp").expect("temp dir");
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let mut cmd = match opts.wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(server_bin());
                c
            }
            None => Command::new(server_bin()),
        };
        cmd.arg("--bind")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--guest-dir")
            .arg(guest_dir())
            .arg("--log")
            // FORKD_TEST_LOG=info shows the daemons' logs while debugging a test.
            .arg(std::env::var("FORKD_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .args(&opts.extra_args)
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(tok) = &opts.token {
            use std::os::unix::fs::OpenOptionsExt;
            let f = data_dir.join("test-token");
            let _ = std::fs::remove_file(&f);
            let mut w = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&f).unwrap();
            std::io::Write::write_all(&mut w, tok.as_bytes()).unwrap();
            cmd.arg("--token-file").arg(&f);
        }
        if let Some((c, k)) = &opts.tls {
            cmd.arg("--tls-cert").arg(c).arg("--tls-key").arg(k);
        }
        if let Some(a) = &opts.audit_log {
            cmd.arg("--audit-log").arg(a);
        }
        let mut child = cmd.spawn().expect("start forkd-server");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(120);
        let addr = loop {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Some(rest) = l.strip_prefix("forkd-server listening on ") {
                        break rest.split("://").nth(1).unwrap().to_string();
                    }
                }
                _ => {
                    let status = child.wait();
                    panic!("forkd-server exited before listening: {status:?}");
                }
            }
            assert!(Instant::now() < deadline, "forkd-server did not start");
        };
        // Keep draining stdout so the daemon never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        // Without --token-file the daemon made (or reused) <data-dir>/token.
        let token = opts.token.clone().or_else(|| {
            let no_auth = opts.extra_args.iter().any(|a| a == "--no-auth");
            (!no_auth).then(|| std::fs::read_to_string(data_dir.join("token")).expect("the daemon's token file"))
        });
        let token = token.map(|t| t.trim().to_string());
        Daemon { child: Some(child), addr, data_dir, _tmp: tmp, token, tls: opts.tls.is_some() }
    }

    pub fn http_url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }

    /// The CLI, pointed at this daemon with its token.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(cli_bin());
        c.arg("--url").arg(self.http_url()).env_remove("FORKD_TOKEN_FILE").env_remove("FORKD_URL");
        match &self.token {
            Some(t) => c.env("FORKD_TOKEN", t),
            None => c.env_remove("FORKD_TOKEN"),
        };
        c
    }

    /// An HTTP client that sends this daemon's token with every request
    /// (a request's own `authorization` header wins).
    pub fn http(&self) -> reqwest::Client {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(b) = self.bearer() {
            headers.insert(reqwest::header::AUTHORIZATION, b.parse().unwrap());
        }
        reqwest::Client::builder().timeout(Duration::from_secs(600)).default_headers(headers).build().unwrap()
    }

    /// A plain HTTP client: no token attached.
    pub fn anon(&self) -> reqwest::Client {
        reqwest::Client::builder().timeout(Duration::from_secs(600)).build().unwrap()
    }

    /// `Authorization` header value, if the daemon has a token.
    pub fn bearer(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.auth(self.anon().get(format!("{}{path}", self.http_url())))
    }

    pub fn post(&self, path: &str, body: serde_json::Value) -> reqwest::RequestBuilder {
        self.auth(self.anon().post(format!("{}{path}", self.http_url())).json(&body))
    }

    pub fn put(&self, path: &str, body: serde_json::Value) -> reqwest::RequestBuilder {
        self.auth(self.anon().put(format!("{}{path}", self.http_url())).json(&body))
    }

    /// A DELETE that asks for the answer's body (`Prefer:
    /// return=representation`): 200 with what was deleted instead of 204.
    pub fn delete(&self, path: &str) -> reqwest::RequestBuilder {
        self.auth(self.anon().delete(format!("{}{path}", self.http_url()))).header("prefer", "return=representation")
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.bearer() {
            Some(b) => rb.header("authorization", b),
            None => rb,
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.expect("gRPC connect")
    }

    pub async fn snapshots(&self) -> SnapshotServiceClient<InterceptedService<Channel, Auth>> {
        SnapshotServiceClient::with_interceptor(self.channel().await, Auth(self.bearer()))
    }
    pub async fn sandboxes(&self) -> SandboxServiceClient<InterceptedService<Channel, Auth>> {
        SandboxServiceClient::with_interceptor(self.channel().await, Auth(self.bearer()))
            .max_decoding_message_size(64 << 20)
    }
    pub async fn workspaces(&self) -> WorkspaceServiceClient<InterceptedService<Channel, Auth>> {
        WorkspaceServiceClient::with_interceptor(self.channel().await, Auth(self.bearer()))
    }
    pub async fn system(&self) -> SystemServiceClient<InterceptedService<Channel, Auth>> {
        SystemServiceClient::with_interceptor(self.channel().await, Auth(self.bearer()))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILLs the daemon (VMs keep running), for restart tests.
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the daemon with SIGTERM.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        // Whatever VMs this daemon's data dir still has must not outlive the test.
        kill_vmms_under(&self.data_dir);
        // Nor its network namespaces (host-wide names): a test that fails
        // half-way must not make the next test see them as its leaks.
        delete_netns_of(&self.data_dir);
    }
}

/// Deletes the network namespaces the ledger of `data_dir` still holds.
fn delete_netns_of(data_dir: &Path) {
    // No panics here: this runs while a failed test unwinds.
    let db = data_dir.join("forkd.db");
    if !db.exists() {
        return;
    }
    let Ok(c) = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) else { return };
    let names: Vec<String> = match c.prepare("SELECT key FROM ledger WHERE kind = 'netns'") {
        Ok(mut st) => match st.query_map([], |r| r.get(0)) {
            Ok(rows) => rows.flatten().collect(),
            Err(_) => return,
        },
        Err(_) => return,
    };
    for name in names {
        if name.starts_with("forkd-") {
            let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        }
    }
}

/// Pids of VMM processes whose command line mentions `dir`.
pub fn vmms_under(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.contains("qemu-system") && cmd.contains(&needle) {
                out.push(pid);
            }
        }
    }
    out
}

/// The cgroup of `pid` that holds its memory limit: the `memory`
/// controller's path on cgroup v1, the unified path on v2 (e.g.
/// `/forkd/sb-…`). Empty when the process is gone.
pub fn memory_cgroup_of(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mut unified = String::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        if controllers.split(',').any(|c| c == "memory") {
            return path.to_string();
        }
        if controllers.is_empty() {
            unified = path.to_string();
        }
    }
    unified
}

pub fn kill_vmms_under(dir: &Path) {
    for pid in vmms_under(dir) {
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
}

/// Adds the bearer token to every gRPC call.
#[derive(Clone)]
pub struct Auth(pub Option<String>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(b) = &self.0 {
            req.metadata_mut().insert("authorization", b.parse().unwrap());
        }
        Ok(req)
    }
}
