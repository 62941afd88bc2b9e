//! forkd-server: the daemon.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use forkd_server::api::{AuthMode, Services};
use forkd_server::core::Runtime;
use forkd_server::core::limits::{MAX_MEMORY_MIB, MIN_MEMORY_MIB};
use forkd_server::core::runtime::{GuestAssets, RuntimeConfig};
use forkd_server::edge::{self, EdgeConfig, audit::AuditLog};
use forkd_server::host::admission::AdmissionConfig;
use forkd_server::probe;
use forkd_server::vmm::accel::AccelChoice;
use forkd_server::vmm::jail::{JailConfig, UidRange};
use forkd_server::vmm::qemu::{QemuBackend, QemuConfig};

/// The forkd daemon: one port serving gRPC and REST /v1 for forking
/// copy-on-write microVM sandboxes from warmed snapshots.
#[derive(Parser, Debug)]
#[command(name = "forkd-server", version, about, long_about = None)]
struct Args {
    /// Address to listen on (gRPC and REST share it). A non-loopback address
    /// needs TLS, or --insecure-bind.
    #[arg(long, env = "FORKD_BIND", default_value = "127.0.0.1:8889")]
    bind: SocketAddr,
    /// All state lives here: the state store, snapshots, work dirs, sockets.
    #[arg(long, env = "FORKD_DATA_DIR", default_value = "/var/lib/forkd")]
    data_dir: PathBuf,
    /// Guest kernel, initramfs and images (from scripts/build-guest.sh).
    /// Default: <data-dir>/guest, else /var/lib/forkd/guest.
    #[arg(long, env = "FORKD_GUEST_DIR")]
    guest_dir: Option<PathBuf>,
    /// File holding the bearer token clients must present (≥ 16 bytes,
    /// readable by its owner only). Default: <data-dir>/token, created with
    /// 32 random bytes on the first start.
    #[arg(long, env = "FORKD_TOKEN_FILE", conflicts_with = "no_auth")]
    token_file: Option<PathBuf>,
    /// Tokens of other principals, TOML (or JSON for a `.json` name):
    /// `[[tokens]]` entries with `name`, `role` ("admin" or "tenant"),
    /// `token`, and optional `max_sandboxes` / `max_memory_mib` quotas. A
    /// tenant sees and drives only what it owns. The --token-file token
    /// stays the admin. Readable by its owner only.
    #[arg(long, env = "FORKD_TOKENS_FILE", conflicts_with = "no_auth")]
    tokens_file: Option<PathBuf>,
    /// Serve without authentication: anyone who can reach the port drives
    /// every VM. Loopback --bind only; logged at every start.
    #[arg(long, env = "FORKD_NO_AUTH")]
    no_auth: bool,
    /// A name clients may address the daemon by in `Host` (besides the bind
    /// address and loopback names): a DNS name, `*.suffix` or `*`.
    /// Repeatable (comma-separated in the env). Other names get 421.
    #[arg(long, env = "FORKD_ALLOWED_HOST", value_delimiter = ',')]
    allowed_host: Vec<String>,
    /// A domain whose names `{port}-{sandbox id}.DOMAIN` reach that port of
    /// that sandbox through the proxy (the whole path is the guest's).
    /// Point a wildcard DNS record at the daemon; clients still need a token.
    #[arg(long, env = "FORKD_PROXY_DOMAIN")]
    proxy_domain: Option<String>,
    /// Sandboxes reported with a `sandbox` label in /metrics (CPU, memory,
    /// commands); 0 = none. Capped so the series stay few.
    #[arg(long, env = "FORKD_SANDBOX_METRICS", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=1000))]
    sandbox_metrics: u32,
    /// Requests a second each principal may make (bursts of twice that);
    /// more get 429 / RESOURCE_EXHAUSTED. 0 = no limit.
    #[arg(long, env = "FORKD_RATE_LIMIT", default_value_t = 0)]
    rate_limit: u32,
    /// An origin (`https://app.example`) whose web pages may call the daemon
    /// (CORS). Repeatable; none by default, so no page can read an answer.
    #[arg(long, env = "FORKD_CORS_ORIGIN", value_delimiter = ',')]
    cors_origin: Vec<String>,
    /// Connections open at once; more are closed at accept.
    #[arg(long, env = "FORKD_MAX_CONNECTIONS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_connections: u32,
    /// Seconds a new connection has for its TLS handshake and each
    /// request's headers; slower ones are closed.
    #[arg(long, env = "FORKD_HEADER_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    header_timeout_secs: u64,
    /// PEM certificate chain for TLS.
    #[arg(long, env = "FORKD_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, env = "FORKD_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Append one JSON line per request to this file.
    #[arg(long, env = "FORKD_AUDIT_LOG")]
    audit_log: Option<PathBuf>,
    /// Allow a non-loopback --bind without TLS (the token is still required).
    #[arg(long, env = "FORKD_INSECURE_BIND")]
    insecure_bind: bool,
    /// Accelerator: auto uses KVM only when it can run the guest.
    #[arg(long, env = "FORKD_ACCEL", value_enum, default_value = "auto")]
    accel: AccelChoice,
    /// QEMU binary (default: qemu-system-x86_64 on PATH).
    #[arg(long, env = "FORKD_QEMU")]
    qemu: Option<PathBuf>,
    /// Largest REST request body in bytes.
    #[arg(long, env = "FORKD_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    max_body_bytes: usize,
    /// VMM processes started at once, daemon-wide: every fork and pool
    /// fill shares these permits.
    #[arg(long, env = "FORKD_SPAWN_CONCURRENCY", default_value_t = 8)]
    spawn_concurrency: usize,
    /// Keep N hot children of snapshot TAG ready (restored, re-initialized
    /// and waiting): forks take them first and they are replaced in the
    /// background. TAG=N:nat keeps children with their network made (for
    /// forks with network "nat"). Repeatable (comma-separated in the env);
    /// N at most 64.
    #[arg(long = "pool", env = "FORKD_POOL", value_name = "TAG=N[:nat]", value_delimiter = ',', value_parser = parse_pool)]
    pools: Vec<(forkd_api::names::Tag, usize, bool)>,
    /// How pooled children wait: running idle (the fastest take; under TCG
    /// about 0.7 % of a core each) or paused (no CPU at all; a take also
    /// resumes the vCPUs, and measured slower).
    #[arg(long, env = "FORKD_POOL_IDLE", value_enum, default_value = "running")]
    pool_idle: PoolIdle,
    /// Running or starting sandboxes at once, daemon-wide; a fork that
    /// would go over is refused (RESOURCE_EXHAUSTED).
    #[arg(long, env = "FORKD_MAX_SANDBOXES", default_value_t = 256)]
    max_sandboxes: usize,
    /// Memory limit (MiB) of sandboxes that ask for none. Default: the
    /// snapshot's guest RAM + 64 MiB of VMM overhead; 0 = unlimited.
    #[arg(long, env = "FORKD_DEFAULT_MEMORY_LIMIT_MIB")]
    default_memory_limit_mib: Option<u32>,
    /// Free space (MiB) the data dir's filesystem must keep after a
    /// snapshot, branch, compact or derive; less is refused up front.
    #[arg(long, env = "FORKD_MIN_FREE_MIB", default_value_t = 1024)]
    min_free_mib: u64,
    /// Most bytes the snapshot store (snapshots, branches, staging) may hold.
    #[arg(long, env = "FORKD_MAX_SNAPSHOT_BYTES")]
    max_snapshot_bytes: Option<u64>,
    /// Egress that network "nat" sandboxes never reach, whatever their
    /// allow-list: CIDR[:PORT], repeatable (comma-separated in the env).
    /// Always denied on top: the host's own addresses, the daemon's bind
    /// address, 127.0.0.0/8, 169.254.0.0/16 and other sandboxes' links.
    #[arg(long, env = "FORKD_EGRESS_DENY", value_delimiter = ',')]
    egress_deny: Vec<String>,
    /// Branches of running sandboxes allowed in flight at once.
    #[arg(long, env = "FORKD_BRANCH_CONCURRENCY", default_value_t = 4)]
    branch_concurrency: usize,
    /// Spare volume slots baked into each new snapshot: how many volumes of
    /// their own its sandboxes and workspaces may be given. A slot costs an
    /// idle virtio disk; snapshot volumes plus slots are at most 21.
    #[arg(long, env = "FORKD_VOLUME_SLOTS", default_value_t = 4,
          value_parser = clap::value_parser!(u8).range(0..=21))]
    volume_slots: u8,
    /// Confine every VMM (own uid, no capabilities, seccomp, own mount
    /// namespace). `off` is for debugging only and is logged loudly.
    #[arg(long, env = "FORKD_VMM_JAIL", value_enum, default_value = "on")]
    vmm_jail: JailChoice,
    /// First uid (and the gid) of the range VMMs run as, one uid per VMM.
    #[arg(long, env = "FORKD_VMM_UID_BASE", default_value_t = 2_000_000_000)]
    vmm_uid_base: u32,
    /// Size of that uid range: the most VMMs alive at once.
    #[arg(long, env = "FORKD_VMM_UID_COUNT", default_value_t = 65536,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    vmm_uid_count: u32,
    /// Volume files may only come from under this directory (symlinks are
    /// never followed). Default: <data-dir>/volumes.
    #[arg(long, env = "FORKD_VOLUME_ROOT")]
    volume_root: Option<PathBuf>,
    /// Bytes of serial console kept per VM (two rotated files together).
    #[arg(long, env = "FORKD_CONSOLE_LOG_BYTES", default_value_t = forkd_server::vmm::console::DEFAULT_CAP,
          value_parser = clap::value_parser!(u64).range(forkd_server::vmm::console::MIN_CAP..))]
    console_log_bytes: u64,
    /// Largest stdout (and stderr) a unary exec may ask to keep; requests
    /// keep 16 MiB (or this, if smaller) unless they ask otherwise.
    #[arg(long, env = "FORKD_MAX_EXEC_OUTPUT_BYTES", default_value_t = forkd_server::api::sandbox::MAX_EXEC_OUTPUT_BYTES)]
    max_exec_output_bytes: u64,
    /// Object store that snapshots are pushed to and pulled from:
    /// s3://bucket/prefix, gs://bucket/prefix, az://container/prefix,
    /// file:///dir or http(s)://host/path (WebDAV). Credentials come from
    /// each store's standard environment variables (AWS_*, GOOGLE_*,
    /// AZURE_*; AWS_ENDPOINT and AWS_ALLOW_HTTP for S3-compatible servers).
    #[arg(long, env = "FORKD_REMOTE")]
    remote: Option<String>,
    /// Whether a fork of a tag that is not here pulls it from the remote
    /// first (default: yes when --remote is set).
    #[arg(long, env = "FORKD_PULL_MISSING", default_value_t = true, action = clap::ArgAction::Set)]
    pull_missing: bool,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "FORKD_LOG", default_value = "info")]
    log: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum JailChoice {
    On,
    Off,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Capability sets belong to each thread: drop them before the async
    // runtime starts its threads, so every thread has only what is kept.
    let caps = forkd_server::host::caps::drop_daemon_caps();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve(args, caps))
}

async fn serve(args: Args, caps: forkd_server::host::caps::CapsReport) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match &caps.error {
        None => tracing::info!("capabilities: {}", caps.summary()),
        Some(_) => tracing::warn!("{}", caps.summary()),
    }

    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("create --data-dir {}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    if args.no_auth && !edge::is_loopback(&args.bind) {
        bail!("--no-auth is for a loopback --bind only; {} is not loopback", args.bind);
    }
    let token =
        if args.no_auth {
            tracing::warn!(
                bind = %args.bind,
                "--no-auth: NO AUTHENTICATION; every local user and process can drive every VM through {}",
                args.bind
            );
            None
        } else {
            let loaded = edge::token_file::load_or_create(args.token_file.as_deref(), &data_dir.join("token"))
                .map_err(|e| match &args.token_file {
                    Some(_) => anyhow::anyhow!("--token-file: {e}"),
                    None => anyhow::anyhow!("{e}"),
                })?;
            if loaded.created {
                tracing::info!(path = %loaded.path.display(), "created a token file; clients on this host read it");
            } else {
                tracing::info!(path = %loaded.path.display(), "clients authenticate with the token file");
            }
            let mut principals = edge::principals::Principals::admin_only(loaded.token);
            if let Some(p) = &args.tokens_file {
                principals = principals.load(p).map_err(|e| anyhow::anyhow!("--tokens-file: {e}"))?;
                tracing::info!(path = %p.display(), principals = principals.len(), "tokens file loaded");
            }
            Some(Arc::new(principals))
        };
    let auth_mode = if token.is_some() { AuthMode::Token } else { AuthMode::Off };
    let proxy_domain = match &args.proxy_domain {
        Some(d) => Some(edge::proxy::check_domain(d).map_err(|e| anyhow::anyhow!("--proxy-domain: {e}"))?),
        None => None,
    };
    let mut allowed = args.allowed_host.clone();
    if let Some(d) = &proxy_domain {
        allowed.push(format!("*.{d}"));
    }
    let allowed_hosts = Arc::new(edge::host_check::AllowedHosts::new(args.bind, &allowed)?);
    let limits = edge::conn::ConnLimits {
        max_connections: args.max_connections as usize,
        header_timeout: std::time::Duration::from_secs(args.header_timeout_secs),
        ..Default::default()
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(edge::tls::acceptor(c, k)?),
        _ => None,
    };
    if !edge::is_loopback(&args.bind) && !args.insecure_bind && tls.is_none() {
        bail!(
            "refusing to listen on non-loopback {} without --tls-cert/--tls-key (pass --insecure-bind to override)",
            args.bind
        );
    }
    let guest_dir = args.guest_dir.clone().unwrap_or_else(|| {
        let own = data_dir.join("guest");
        if own.join("vmlinux").exists() { own } else { PathBuf::from("/var/lib/forkd/guest") }
    });
    let guest = GuestAssets { dir: guest_dir };
    let qemu = args
        .qemu
        .clone()
        .or_else(QemuBackend::find_binary)
        .context("qemu-system-x86_64 not found on PATH (run scripts/setup-host.sh)")?;
    if let Some(m) = args.default_memory_limit_mib
        && m != 0
        && !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&m)
    {
        bail!("--default-memory-limit-mib {m} is outside {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB} (0 = unlimited)");
    }
    let egress_deny = forkd_server::host::net::parse_deny(&args.egress_deny, args.bind)
        .map_err(|e| anyhow::anyhow!("--egress-deny: {e}"))?;
    let volume_root = args.volume_root.clone().unwrap_or_else(|| data_dir.join("volumes"));
    std::fs::create_dir_all(&volume_root).with_context(|| format!("create --volume-root {}", volume_root.display()))?;
    let volume_root = forkd_server::host::paths::Root::new(&volume_root)
        .with_context(|| format!("--volume-root {}", volume_root.display()))?;
    let jail = match args.vmm_jail {
        JailChoice::On => Some(JailConfig {
            enabled: true,
            uids: UidRange { base: args.vmm_uid_base, count: args.vmm_uid_count, gid: args.vmm_uid_base },
            mountpoint: data_dir.join("jail"),
        }),
        JailChoice::Off => {
            tracing::warn!(
                "--vmm-jail off: VMMs run as the daemon's uid, in its mount namespace; a compromised VMM can reach every file the daemon can"
            );
            None
        }
    };
    let remote = match &args.remote {
        Some(url) => {
            let r = forkd_server::remote::Remote::open(url).with_context(|| format!("--remote {url}"))?;
            tracing::info!(remote = %url, pull_missing = args.pull_missing, "snapshots travel through a remote");
            Some(Arc::new(r))
        }
        None => None,
    };
    let qemu_config = QemuConfig { jail, volume_root: Some(volume_root.clone()), console_cap: args.console_log_bytes };
    // The KVM boot probe runs its VMM confined like every other.
    let accel = probe::choose_accel(args.accel, &qemu, &guest, &data_dir, &qemu_config).await?;
    tracing::info!(accel = accel.accel.as_str(), reason = %accel.reason, "accelerator chosen");
    let backend = Arc::new(
        QemuBackend::with_config(qemu, accel.accel, qemu_config).context("prepare VMM confinement (--vmm-jail)")?,
    );
    let rt = Runtime::open(
        data_dir.clone(),
        guest,
        backend,
        accel,
        RuntimeConfig {
            admission: AdmissionConfig {
                spawn_concurrency: args.spawn_concurrency,
                max_sandboxes: args.max_sandboxes,
                default_memory_limit_mib: args.default_memory_limit_mib,
                min_free_mib: args.min_free_mib,
                max_snapshot_bytes: args.max_snapshot_bytes,
            },
            egress_deny,
            tsc_khz: probe::tsc_khz(),
            branch_concurrency: args.branch_concurrency,
            volume_slots: args.volume_slots as usize,
            volume_root,
            vmm_jail: args.vmm_jail == JailChoice::On,
            max_exec_output_bytes: args.max_exec_output_bytes,
            remote,
            pull_missing: args.pull_missing,
            pool_paused: args.pool_idle == PoolIdle::Paused,
        },
    )
    .await?;
    for (tag, n, nat) in &args.pools {
        rt.keep_pool(tag, *n, *nat);
    }
    let audit = match &args.audit_log {
        Some(p) => Some(Arc::new(AuditLog::open(p).with_context(|| format!("open --audit-log {}", p.display()))?)),
        None => None,
    };
    {
        // logrotate renames the audit log and sends SIGHUP: reopen it at its
        // path. Without an audit log SIGHUP is ignored (it never stops the daemon).
        let audit = audit.clone();
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("install the SIGHUP handler")?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let Some(a) = &audit else { continue };
                match a.reopen() {
                    Ok(()) => tracing::info!("SIGHUP: reopened the audit log"),
                    Err(e) => tracing::warn!("SIGHUP: reopening the audit log failed, still writing the old file: {e}"),
                }
            }
        });
    }
    let cors_origins = args
        .cors_origin
        .iter()
        .map(|o| {
            let ok = (o.starts_with("https://") || o.starts_with("http://")) && !o.trim_end_matches('/').contains("/.");
            let v = http::HeaderValue::from_str(o.trim_end_matches('/')).ok().filter(|_| ok);
            v.ok_or_else(|| anyhow::anyhow!("--cors-origin {o:?}: expected an origin like https://app.example"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rate_limit = (args.rate_limit > 0).then(|| Arc::new(edge::rate_limit::RateLimiter::new(args.rate_limit)));
    let cfg = EdgeConfig {
        principals: token,
        rate_limit,
        cors_origins,
        audit,
        max_body: args.max_body_bytes,
        tls,
        allowed_hosts,
        limits,
        proxy_domain,
        sandbox_metrics: args.sandbox_metrics as usize,
    };
    let services = Services { rt: rt.clone(), data_dir: data_dir.display().to_string(), auth: auth_mode };
    let app = edge::app(services, &cfg).await?;
    let listener = tokio::net::TcpListener::bind(args.bind).await.with_context(|| format!("bind {}", args.bind))?;
    let local = listener.local_addr()?;
    // One machine-readable line so scripts and tests can find an ephemeral port.
    println!("forkd-server listening on {}://{local}", if cfg.tls.is_some() { "https" } else { "http" });
    tracing::info!(%local, tls = cfg.tls.is_some(), auth = cfg.principals.is_some(), "serving gRPC and REST");
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        tracing::info!("shutting down; sandboxes keep running and are adopted on the next start");
    };
    edge::serve(listener, app, cfg.tls.clone(), cfg.limits, shutdown).await?;
    // Sandboxes outlive the daemon; VMMs waiting in pools serve no one.
    let drained = rt.drain_pools().await;
    if drained > 0 {
        tracing::info!(drained, "stopped pooled VMMs");
    }
    Ok(())
}

/// `--pool TAG=N`.
fn parse_pool(s: &str) -> Result<(forkd_api::names::Tag, usize, bool), String> {
    let (tag, rest) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected TAG=N or TAG=N:nat"))?;
    let tag = forkd_api::names::Tag::parse(tag).map_err(|e| format!("{tag:?}: {e}"))?;
    let (n, network) = rest.split_once(':').unwrap_or((rest, "none"));
    let n: usize = n.parse().map_err(|_| format!("{n:?}: expected a count"))?;
    if n == 0 || n > forkd_server::core::pool::MAX_PER_SNAPSHOT {
        return Err(format!("{n}: a pool keeps 1..={} children", forkd_server::core::pool::MAX_PER_SNAPSHOT));
    }
    let nat = forkd_server::core::pool::pool_network(network).map_err(|e| e.to_string())?;
    Ok((tag, n, nat))
}

/// `--pool-idle`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum PoolIdle {
    Running,
    Paused,
}
