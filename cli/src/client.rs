//! Connection to the daemon: URL handling, TLS, the bearer-token
//! interceptor, per-call deadlines, and turning failures into exit codes.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use forkd_api::v1::{
    image_service_client::ImageServiceClient, sandbox_service_client::SandboxServiceClient,
    snapshot_service_client::SnapshotServiceClient, system_service_client::SystemServiceClient,
    workspace_service_client::WorkspaceServiceClient,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::args::GlobalArgs;
use crate::exit::{CliError, EXHAUSTED, UNREACHABLE, USAGE, error_chain, unreachable_message};

/// How long to wait for the TCP (and TLS) connection when no --timeout is
/// given. A local daemon answers in microseconds; this only bounds a
/// blackholed address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Replies can hold whole listings or large eval results; tonic's 4 MiB
/// default is too tight for a thousand snapshots with their labels.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

pub type Svc = InterceptedService<Channel, CallMetadata>;

/// Adds `authorization: Bearer …` and the deadline to every request.
#[derive(Clone, Debug, Default)]
pub struct CallMetadata {
    authorization: Option<MetadataValue<Ascii>>,
    deadline: Option<Duration>,
}

impl CallMetadata {
    pub fn new(token: Option<&str>, deadline: Option<Duration>) -> Result<Self, CliError> {
        let authorization = token
            .map(|t| {
                MetadataValue::try_from(format!("Bearer {t}"))
                    .map_err(|_| CliError::usage("the token contains characters not allowed in a header"))
            })
            .transpose()?;
        Ok(Self { authorization, deadline })
    }

    pub fn has_token(&self) -> bool {
        self.authorization.is_some()
    }
}

impl Interceptor for CallMetadata {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.authorization {
            req.metadata_mut().insert("authorization", value.clone());
        }
        if let Some(deadline) = self.deadline {
            // Lets the daemon stop working on a call nobody waits for.
            req.set_timeout(deadline);
        }
        Ok(req)
    }
}

/// A connected daemon.
pub struct Conn {
    pub url: String,
    channel: Channel,
    metadata: CallMetadata,
    deadline: Option<Duration>,
}

impl Conn {
    /// Whether calls carry a bearer token.
    pub fn has_token(&self) -> bool {
        self.metadata.has_token()
    }

    pub async fn connect(global: &GlobalArgs) -> Result<Self, CliError> {
        let url = normalise_url(&global.url)?;
        let token = load_token(global.token.as_deref(), global.token_file.as_deref(), &url)?;
        let deadline = global.rpc_timeout.filter(|d| !d.is_zero());
        let metadata = CallMetadata::new(token.as_deref(), deadline)?;

        let bad_url = |e: tonic::transport::Error| CliError::usage(format!("invalid URL {url:?}: {}", error_chain(&e)));
        let connect_timeout = deadline.map_or(CONNECT_TIMEOUT, |d| d.min(CONNECT_TIMEOUT));
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(bad_url)?
            .connect_timeout(connect_timeout)
            .user_agent(format!("forkd-cli/{}", forkd_api::VERSION))
            .map_err(bad_url)?;
        if url.starts_with("https://") {
            endpoint = endpoint.tls_config(tls_config(global.ca_cert.as_deref())?).map_err(bad_url)?;
        } else if let Some(ca) = &global.ca_cert {
            return Err(CliError::usage(format!(
                "--ca-cert {} was given but {url} is not an https:// URL",
                ca.display()
            )));
        }

        let channel = match tokio::time::timeout(connect_timeout, endpoint.connect()).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                let detail = error_chain(&e);
                // A certificate problem needs a different fix than a daemon
                // that is not running.
                let message = if url.starts_with("https://") && detail.contains("certificate") {
                    format!(
                        "TLS handshake with {url} failed: {detail} (pass the CA that signed \
                         the daemon's certificate with --ca-cert or FORKD_CA_CERT)"
                    )
                } else {
                    unreachable_message(&url, &detail)
                };
                return Err(CliError::new(UNREACHABLE, message));
            }
            Err(_) => {
                return Err(CliError::new(UNREACHABLE, unreachable_message(&url, "timed out connecting")));
            }
        };
        Ok(Self { url, channel, metadata, deadline })
    }

    fn svc(&self) -> Svc {
        InterceptedService::new(self.channel.clone(), self.metadata.clone())
    }

    pub fn snapshots(&self) -> SnapshotServiceClient<Svc> {
        SnapshotServiceClient::new(self.svc()).max_decoding_message_size(MAX_MESSAGE)
    }

    pub fn sandboxes(&self) -> SandboxServiceClient<Svc> {
        SandboxServiceClient::new(self.svc()).max_decoding_message_size(MAX_MESSAGE)
    }

    pub fn workspaces(&self) -> WorkspaceServiceClient<Svc> {
        WorkspaceServiceClient::new(self.svc()).max_decoding_message_size(MAX_MESSAGE)
    }

    pub fn system(&self) -> SystemServiceClient<Svc> {
        SystemServiceClient::new(self.svc()).max_decoding_message_size(MAX_MESSAGE)
    }

    pub fn images(&self) -> ImageServiceClient<Svc> {
        ImageServiceClient::new(self.svc()).max_decoding_message_size(MAX_MESSAGE)
    }

    /// Awaits one call, bounded by --timeout, and maps a failure to its exit
    /// code. The client-side bound matters when the daemon hangs without
    /// honouring the deadline it was sent.
    pub async fn call<T>(
        &self,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CliError> {
        let result = match self.deadline {
            Some(d) => tokio::time::timeout(d, fut).await.map_err(|_| self.deadline_error(d))?,
            None => fut.await,
        };
        result.map(tonic::Response::into_inner).map_err(|s| self.status_error(&s))
    }

    pub fn status_error(&self, status: &tonic::Status) -> CliError {
        // A tonic server whose deadline expires answers CANCELLED rather
        // than DEADLINE_EXCEEDED; with a deadline set, both mean "too slow".
        let too_slow = matches!(status.code(), tonic::Code::Cancelled | tonic::Code::DeadlineExceeded);
        if let (Some(d), true) = (self.deadline, too_slow) {
            return self.deadline_error(d);
        }
        CliError::from_status(status, &self.url)
    }

    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    pub fn deadline_error(&self, d: Duration) -> CliError {
        CliError::new(
            EXHAUSTED,
            format!("no answer from {} within {} (--timeout)", self.url, humantime::format_duration(d)),
        )
    }
}

/// Accepts `host:port` as shorthand for `http://host:port`; refuses other
/// schemes with a usage error.
pub fn normalise_url(raw: &str) -> Result<String, CliError> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err(CliError::usage("the daemon URL is empty"));
    }
    let url = if raw.contains("://") { raw.to_string() } else { format!("http://{raw}") };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(CliError::usage(format!("unsupported URL {raw:?}: use http://HOST:PORT or https://HOST:PORT")));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// Where the daemon writes its token on a host nobody configured.
pub const DEFAULT_TOKEN_FILE: &str = "/var/lib/forkd/token";

/// The token to send: `--token`, else `--token-file`, else — for a
/// loopback URL only — the daemon's own token file when it exists, so the
/// host's admin needs no flags. A token file others may read is refused.
pub fn load_token(token: Option<&str>, file: Option<&Path>, url: &str) -> Result<Option<String>, CliError> {
    if let Some(t) = token.map(str::trim).filter(|t| !t.is_empty()) {
        return Ok(Some(t.to_string()));
    }
    let path = match file {
        Some(p) => p,
        None if is_loopback_url(url) && Path::new(DEFAULT_TOKEN_FILE).exists() => Path::new(DEFAULT_TOKEN_FILE),
        None => return Ok(None),
    };
    read_token_file(path).map(Some)
}

/// Whether others than the owner may read a token file with this mode and
/// group. A group that is the caller's own (a pod's `fsGroup`, a user's
/// private group) shares nothing; any other group, or others, does.
pub fn token_file_is_shared(mode: u32, file_gid: u32, own_gid: u32) -> bool {
    mode & 0o007 != 0 || (mode & 0o070 != 0 && file_gid != own_gid)
}

fn read_token_file(path: &Path) -> Result<String, CliError> {
    use std::os::unix::fs::MetadataExt;
    let cannot = |e: std::io::Error| CliError::usage(format!("cannot read token file {}: {e}", path.display()));
    let meta = std::fs::metadata(path).map_err(cannot)?;
    let mode = meta.mode();
    // SAFETY: getegid has no preconditions and cannot fail.
    let own_gid = unsafe { libc::getegid() };
    if token_file_is_shared(mode, meta.gid(), own_gid) {
        return Err(CliError::usage(format!(
            "token file {} may be read by others (mode {:04o}); only its owner may read it: run `chmod 600 {}`",
            path.display(),
            mode & 0o7777,
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(cannot)?;
    let t = text.trim();
    if t.is_empty() {
        return Err(CliError::usage(format!("token file {} is empty", path.display())));
    }
    Ok(t.to_string())
}

/// True when a (normalised) URL names this host: `localhost`, 127/8 or ::1.
pub fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn tls_config(ca_cert: Option<&Path>) -> Result<ClientTlsConfig, CliError> {
    let config = ClientTlsConfig::new();
    match ca_cert {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| CliError::usage(format!("cannot read --ca-cert {}: {e}", path.display())))?;
            // Caught here so a wrong file is a usage error, not a baffling
            // handshake failure reported as "daemon unreachable".
            if !pem.windows(b"-----BEGIN CERTIFICATE-----".len()).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                return Err(CliError::new(USAGE, format!("--ca-cert {} holds no PEM certificate", path.display())));
            }
            Ok(config.ca_certificate(Certificate::from_pem(pem)))
        }
        None => Ok(config.with_native_roots()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(normalise_url("127.0.0.1:8889").unwrap(), "http://127.0.0.1:8889");
        assert_eq!(normalise_url("https://h:1/").unwrap(), "https://h:1");
        assert_eq!(normalise_url("unix:///x").unwrap_err().code, USAGE);
        assert_eq!(normalise_url("  ").unwrap_err().code, USAGE);
    }

    #[test]
    fn tokens() {
        use std::os::unix::fs::PermissionsExt;
        let remote = "https://forkd.example:8889";
        assert_eq!(load_token(None, None, remote).unwrap(), None, "no local file for a remote URL");
        assert_eq!(load_token(Some(" abc \n"), None, remote).unwrap().as_deref(), Some("abc"));
        let dir = std::env::temp_dir().join(format!("forkd-cli-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let open = load_token(None, Some(&file), remote).unwrap_err();
        assert!(open.message.contains("chmod 600"), "{}", open.message);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_token(None, Some(&file), remote).unwrap().as_deref(), Some("from-file"));
        // Readable by the caller's own group only (a pod's fsGroup): accepted.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(load_token(None, Some(&file), remote).is_ok());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        // --token wins over --token-file.
        assert_eq!(load_token(Some("flag"), Some(&file), remote).unwrap().as_deref(), Some("flag"));
        std::fs::write(&file, "\n").unwrap();
        assert_eq!(load_token(None, Some(&file), remote).unwrap_err().code, USAGE);
        assert_eq!(load_token(None, Some(&dir.join("missing")), remote).unwrap_err().code, USAGE);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shared_token_files() {
        assert!(!token_file_is_shared(0o100600, 5, 7));
        assert!(!token_file_is_shared(0o100440, 7, 7), "the caller's own group");
        assert!(token_file_is_shared(0o100640, 5, 7), "another group");
        assert!(token_file_is_shared(0o100604, 7, 7), "others");
    }

    #[test]
    fn loopback_urls() {
        for l in ["http://127.0.0.1:8889", "http://localhost:1", "https://[::1]:8889", "http://127.1.2.3"] {
            assert!(is_loopback_url(l), "{l}");
        }
        for r in
            ["http://10.0.0.1:8889", "https://forkd.forkd.svc:8889", "http://[fe80::1]:1", "http://localhost.evil:1"]
        {
            assert!(!is_loopback_url(r), "{r}");
        }
    }

    #[test]
    fn interceptor_sets_bearer_and_deadline() {
        let mut md = CallMetadata::new(Some("s3cret"), Some(Duration::from_secs(2))).unwrap();
        let req = md.call(tonic::Request::new(())).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer s3cret");
        assert!(req.metadata().get("grpc-timeout").is_some());

        let mut none = CallMetadata::new(None, None).unwrap();
        let req = none.call(tonic::Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
        assert!(req.metadata().get("grpc-timeout").is_none());

        assert_eq!(CallMetadata::new(Some("bad\ntoken"), None).unwrap_err().code, USAGE);
    }

    #[test]
    fn ca_cert_must_be_pem() {
        let file = std::env::temp_dir().join(format!("forkd-cli-ca-{}", std::process::id()));
        std::fs::write(&file, "not a cert").unwrap();
        assert_eq!(tls_config(Some(&file)).unwrap_err().code, USAGE);
        std::fs::remove_file(&file).unwrap();
    }
}
