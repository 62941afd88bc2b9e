//! Pulling an image from an OCI distribution registry (Docker Hub, GHCR,
//! a private `registry:2`, …) into an OCI image layout on local disk.
//!
//! The wire protocol — the `/v2/` API, the anonymous bearer-token dance,
//! basic credentials, following blob redirects — is `oci-client`'s. What
//! this module adds is what an image store needs from a pull:
//!
//! - a multi-platform index is resolved to its `linux/amd64` manifest (the
//!   guest's platform, whatever the host is);
//! - every blob (manifest, config, layers) is checked while it streams to
//!   disk: the bytes must hash to the descriptor's digest and number exactly
//!   its declared size, and reading stops as soon as a blob runs past that
//!   size; a blob that fails is a "corrupted blob" ([`ImageError::Invalid`]);
//! - sizes are bounded before anything is fetched ([`PullOptions`]), and
//!   only blobs of container images are fetched (a Helm chart or a signature
//!   artifact is refused by its media types); a layer's `urls` are never
//!   followed (blobs come from the registry alone);
//! - connect and request timeouts, and bounded retries with backoff for what
//!   may pass (connection failures, timeouts, 5xx, 429), never for a refusal
//!   or a corrupted blob;
//! - errors say what the daemon's caller can act on: a registry that cannot
//!   be reached is `Unavailable` ("cannot reach registry …"), one that wants
//!   credentials is `Precondition`, a tag or repository that is not there is
//!   `NotFound`, a malformed reference or hostile content is `Invalid`.
//!
//! The result is an OCI image layout in the destination directory:
//! `oci-layout`, `index.json` with the one pulled manifest (its media type,
//! its platform when chosen from an index, and an
//! `org.opencontainers.image.ref.name` annotation holding the full
//! reference), and `blobs/sha256/<hex>` for the manifest, the config and
//! every layer. The manifest is stored byte for byte as the registry served
//! it, so its digest is the registry's: a Docker schema 2 manifest
//! (`application/vnd.docker.distribution.manifest.v2+json`) stays one, and
//! `index.json` says so in its descriptor's `mediaType`.
//!
//! Plain HTTP is used for the hosts in [`PullOptions::insecure_hosts`] and,
//! unless [`PullOptions::loopback_plain_http`] is off, for loopback registries
//! (`localhost`, `127.0.0.0/8`, `::1`, any port), as Docker does: their
//! traffic never leaves the machine. Every other registry is HTTPS, verified
//! against the system's roots with rustls (ring).
//!
//! [`PullOptions::from_env`] reads the daemon's environment:
//! `FORKD_REGISTRY_INSECURE` (comma-separated `host[:port]` list of
//! plain-HTTP registries) and, for a registry that needs credentials,
//! `FORKD_REGISTRY_HOST`, `FORKD_REGISTRY_USER` and `FORKD_REGISTRY_PASSWORD`
//! (basic credentials, only ever sent to that one registry).

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::ImageError;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MANIFEST_TYPES: [&str; 4] = [OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST];

const CONFIG_TYPES: [&str; 2] =
    ["application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"];

use super::source::LAYER_TYPES;

/// Manifests and indexes are read into memory: bounded (the distribution
/// spec has registries accept at least 4 MiB).
const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// The config is parsed in memory by the layout reader.
const MAX_CONFIG_BYTES: u64 = 16 << 20;
const MAX_LAYERS: usize = 512;
/// Progress is reported at most this often per blob (and at its start and end).
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
const PROGRESS_BYTES: u64 = 4 << 20;

/// Basic credentials for one registry.
#[derive(Clone, PartialEq)]
pub struct Credentials {
    /// The registry they are for, as references name it (`ghcr.io`,
    /// `registry.example.com:5000`; `docker.io` for Docker Hub).
    pub registry: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("registry", &self.registry)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// How a pull reaches registries and what it accepts from them.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Registries spoken to over plain HTTP, as `host[:port]` exactly as the
    /// reference names them (e.g. `localhost:5000`). Default: none.
    pub insecure_hosts: Vec<String>,
    /// Loopback registries (`localhost`, `127.0.0.0/8`, `[::1]`) over plain
    /// HTTP without being listed. Default: on.
    pub loopback_plain_http: bool,
    /// Sent only to the registry they name; every other pull is anonymous
    /// (with the registry's anonymous bearer token where it has one).
    pub credentials: Option<Credentials>,
    /// Largest blob (layer or config) accepted, by its declared size.
    pub max_blob_bytes: u64,
    /// Largest sum of the declared sizes of an image's blobs.
    pub max_total_bytes: u64,
    /// Time to open a connection (DNS, TCP, TLS).
    pub connect_timeout: Duration,
    /// Time a request may take (token, manifest, a blob's response
    /// headers), and the longest a blob download may go without a byte.
    pub request_timeout: Duration,
    /// Further attempts after a failure that may pass (connection failure,
    /// timeout, 5xx, 429); a blob download starts over.
    pub retries: u32,
    /// Blobs downloaded at once.
    pub concurrency: usize,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            insecure_hosts: Vec::new(),
            loopback_plain_http: true,
            credentials: None,
            max_blob_bytes: 8 << 30,
            max_total_bytes: 16 << 30,
            connect_timeout: Duration::from_secs(15),
            request_timeout: Duration::from_secs(60),
            retries: 3,
            concurrency: 3,
        }
    }
}

impl PullOptions {
    /// The defaults, with the daemon's environment applied:
    /// `FORKD_REGISTRY_INSECURE` (comma-separated `host[:port]`),
    /// `FORKD_REGISTRY_HOST` + `FORKD_REGISTRY_USER` + `FORKD_REGISTRY_PASSWORD`.
    pub fn from_env() -> Result<Self, ImageError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`from_env`](Self::from_env) with the variables from `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, ImageError> {
        let mut o = PullOptions::default();
        let var = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        if let Some(list) = var("FORKD_REGISTRY_INSECURE") {
            o.insecure_hosts = list.split(',').map(|h| h.trim().to_string()).filter(|h| !h.is_empty()).collect();
        }
        match (var("FORKD_REGISTRY_HOST"), var("FORKD_REGISTRY_USER"), var("FORKD_REGISTRY_PASSWORD")) {
            (None, None, None) => {}
            (Some(registry), Some(username), Some(password)) => {
                o.credentials = Some(Credentials { registry: registry.trim().to_string(), username, password })
            }
            _ => {
                return Err(ImageError::Precondition(
                    "registry credentials need all of FORKD_REGISTRY_HOST, FORKD_REGISTRY_USER and \
                     FORKD_REGISTRY_PASSWORD"
                        .into(),
                ));
            }
        }
        Ok(o)
    }
}

/// Bytes of one layer received so far.
#[derive(Debug, Clone, PartialEq)]
pub struct PullProgress {
    /// The layer's digest, `sha256:<hex>`.
    pub layer: String,
    pub done: u64,
    /// Its declared size.
    pub total: u64,
}

/// What was pulled.
#[derive(Debug, Clone, PartialEq)]
pub struct PulledImage {
    /// `sha256:<hex>` of the image manifest written to the layout (for a
    /// multi-platform image: of its linux/amd64 manifest).
    pub digest: String,
    /// The reference, normalized (`python:3.12` →
    /// `docker.io/library/python:3.12`): also the layout's
    /// `org.opencontainers.image.ref.name`.
    pub reference: String,
}

/// Pulls `reference` (`host[:port]/repo[:tag][@sha256:…]`; Docker Hub when
/// no host is named) into `dest`, an empty (or missing) staging directory,
/// as an OCI image layout. On error `dest` may hold part of the layout: the
/// caller discards it. `progress` is called as layer bytes arrive, from
/// concurrent downloads.
pub async fn pull(
    reference: &str,
    dest: &Path,
    opts: &PullOptions,
    progress: &(dyn Fn(PullProgress) + Send + Sync),
) -> Result<PulledImage, ImageError> {
    let r = parse_reference(reference)?;
    let registry = r.registry().to_string();
    let started = Instant::now();
    prepare_dest(dest)?;
    let p = Puller::new(&r, opts)?;
    tracing::debug!(reference = %r, "image pull");

    // The manifest, resolved to linux/amd64 through an index.
    p.authenticate().await?;
    let (mut body, mut media_type) = p.manifest(&r, r.digest()).await?;
    let mut platform = None;
    if media_type == OCI_INDEX || media_type == DOCKER_LIST {
        let index: RawManifest = parse_manifest(&body, &registry)?;
        let entries = index.manifests.unwrap_or_default();
        let entry = choose_platform(&entries, &r)?;
        let digest = check_digest(&entry.digest, "index entry")?;
        let (b, t) = p.manifest(&r.clone_with_digest(digest.clone()), Some(&digest)).await?;
        if b.len() as u64 != entry.size_u64()? {
            return Err(corrupted(&digest, &registry, "its size differs from the index's"));
        }
        if t == OCI_INDEX || t == DOCKER_LIST {
            return Err(ImageError::Invalid(format!("{r}: the linux/amd64 entry of the index is another index")));
        }
        (body, media_type, platform) = (b, t, entry.platform.clone());
    }
    let manifest: RawManifest = parse_manifest(&body, &registry)?;
    let (config, layers) = check_image_manifest(&manifest, &r, opts)?;

    // The manifest blob, then config and layers, verified as they stream.
    let manifest_digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
    let blobs = dest.join("blobs/sha256");
    write_file(&blobs.join(&manifest_digest["sha256:".len()..]), &body)?;
    let mut seen = HashSet::new();
    let mut jobs = vec![(config, false)];
    jobs.extend(layers.into_iter().map(|l| (l, true)));
    jobs.retain(|(d, _)| seen.insert(d.digest.clone()));
    let result = futures::stream::iter(jobs)
        .map(|(blob, is_layer)| {
            let report: Option<&(dyn Fn(PullProgress) + Send + Sync)> = is_layer.then_some(progress);
            p.blob(&r, blob, &blobs, report)
        })
        .buffer_unordered(opts.concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await;
    if let Err(e) = result {
        remove_partials(&blobs);
        return Err(e);
    }

    // The layout's index last: its presence means the layout is whole.
    let full = r.whole();
    let mut desc = serde_json::json!({
        "mediaType": media_type,
        "digest": manifest_digest,
        "size": body.len(),
        "annotations": { "org.opencontainers.image.ref.name": full },
    });
    if let Some(pf) = platform {
        desc["platform"] = serde_json::to_value(pf).unwrap_or_default();
    }
    let index = serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc] });
    write_file(&dest.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    write_file(&dest.join("index.json"), &serde_json::to_vec_pretty(&index).unwrap_or_default())?;
    tracing::info!(reference = %full, digest = %manifest_digest, secs = started.elapsed().as_secs_f32(), "image pulled");
    Ok(PulledImage { digest: manifest_digest, reference: full })
}

fn parse_reference(reference: &str) -> Result<Reference, ImageError> {
    let s = reference.trim();
    let bad = |why: String| ImageError::Invalid(format!("bad image reference {reference:?}: {why}"));
    if s.is_empty() || s.len() > 1024 || s.contains("://") {
        return Err(bad("expected host[:port]/repository[:tag][@sha256:…]".into()));
    }
    let r: Reference = s.parse().map_err(|e: oci_client::ParseError| bad(e.to_string()))?;
    if let Some(d) = r.digest()
        && !is_sha256(d)
    {
        return Err(bad("only sha256 digests are supported".into()));
    }
    Ok(r)
}

fn prepare_dest(dest: &Path) -> Result<(), ImageError> {
    let ctx = || dest.display().to_string();
    match std::fs::read_dir(dest) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(ImageError::Precondition(format!("pull destination {} is not empty", dest.display())));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ImageError::io(ctx(), e)),
    }
    std::fs::create_dir_all(dest.join("blobs/sha256")).map_err(|e| ImageError::io(ctx(), e))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    std::fs::write(path, bytes).map_err(|e| ImageError::io(format!("write {}", path.display()), e))
}

fn remove_partials(blobs: &Path) {
    for e in std::fs::read_dir(blobs).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().ends_with(".partial") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn is_sha256(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

fn check_digest(d: &str, what: &str) -> Result<String, ImageError> {
    if is_sha256(d) {
        Ok(d.to_string())
    } else {
        Err(ImageError::Invalid(format!("{what} digest {d:?} is not sha256:<64 hex digits>")))
    }
}

fn corrupted(digest: &str, registry: &str, why: &str) -> ImageError {
    ImageError::Invalid(format!("corrupted blob {digest} from registry {registry}: {why}"))
}

fn digest_mismatch(what: &str, registry: &str, e: &oci_client::errors::DigestError) -> ImageError {
    ImageError::Invalid(format!("corrupted blob: {what} from registry {registry} does not match its digest: {e}"))
}

fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, _)| h)
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The parts of a manifest or an index this module reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: i64,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: i64,
    #[serde(default)]
    platform: Option<Platform>,
}

impl Descriptor {
    fn size_u64(&self) -> Result<u64, ImageError> {
        u64::try_from(self.size)
            .map_err(|_| ImageError::Invalid(format!("blob {} has size {}", self.digest, self.size)))
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
struct Platform {
    architecture: String,
    os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    variant: Option<String>,
    #[serde(default, rename = "os.version", skip_serializing_if = "Option::is_none")]
    os_version: Option<String>,
}

/// A blob to fetch: digest checked, size declared.
#[derive(Debug, Clone)]
struct Blob {
    digest: String,
    size: u64,
}

fn parse_manifest(body: &[u8], registry: &str) -> Result<RawManifest, ImageError> {
    let m: RawManifest = serde_json::from_slice(body)
        .map_err(|e| ImageError::Invalid(format!("registry {registry} sent a manifest that does not parse: {e}")))?;
    if m.schema_version != 2 {
        return Err(ImageError::Invalid(format!(
            "registry {registry} sent a schema {} manifest: only schema 2 (OCI, Docker v2) is supported",
            m.schema_version
        )));
    }
    Ok(m)
}

/// The media type of a manifest: its own `mediaType`, else what its fields say.
fn manifest_type(body: &[u8], registry: &str) -> Result<String, ImageError> {
    let m = parse_manifest(body, registry)?;
    let t = match m.media_type {
        Some(t) => t,
        None if m.manifests.is_some() => OCI_INDEX.to_string(),
        None if m.config.is_some() => OCI_MANIFEST.to_string(),
        None => return Err(ImageError::Invalid(format!("registry {registry} sent a manifest of no known kind"))),
    };
    if !MANIFEST_TYPES.contains(&t.as_str()) {
        return Err(ImageError::Invalid(format!("registry {registry} sent a manifest of unsupported type {t}")));
    }
    Ok(t)
}

/// The linux/amd64 entry of an index: one without a variant first.
fn choose_platform<'a>(entries: &'a [Descriptor], r: &Reference) -> Result<&'a Descriptor, ImageError> {
    let amd64 = |d: &&Descriptor| {
        (d.media_type.is_empty() || d.media_type == OCI_MANIFEST || d.media_type == DOCKER_MANIFEST)
            && d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    };
    let plain = entries.iter().filter(amd64).find(|d| d.platform.as_ref().is_some_and(|p| p.variant.is_none()));
    plain.or_else(|| entries.iter().find(amd64)).ok_or_else(|| {
        let mut have: Vec<String> = entries
            .iter()
            .filter_map(|d| d.platform.as_ref())
            .filter(|p| p.os != "unknown")
            .map(|p| {
                format!(
                    "{}/{}{}",
                    p.os,
                    p.architecture,
                    p.variant.as_ref().map(|v| format!("/{v}")).unwrap_or_default()
                )
            })
            .collect();
        have.dedup();
        ImageError::NotFound(format!("{r} has no linux/amd64 image (it has: {})", have.join(", ")))
    })
}

/// The config and layers of an image manifest, checked against the limits.
fn check_image_manifest(m: &RawManifest, r: &Reference, opts: &PullOptions) -> Result<(Blob, Vec<Blob>), ImageError> {
    let config = m.config.as_ref().ok_or_else(|| ImageError::Invalid(format!("{r}: the manifest has no config")))?;
    if !CONFIG_TYPES.contains(&config.media_type.as_str()) {
        return Err(ImageError::Invalid(format!(
            "{r} is not a container image (its config is {:?})",
            config.media_type
        )));
    }
    let layers = m.layers.as_deref().unwrap_or_default();
    if layers.len() > MAX_LAYERS {
        return Err(ImageError::Invalid(format!("{r} has {} layers (at most {MAX_LAYERS})", layers.len())));
    }
    let blob = |d: &Descriptor, max: u64| -> Result<Blob, ImageError> {
        let digest = check_digest(&d.digest, "blob")?;
        let size = d.size_u64()?;
        if size > max {
            return Err(ImageError::Invalid(format!(
                "{r}: blob {digest} is {size} bytes, more than the {max} allowed"
            )));
        }
        Ok(Blob { digest, size })
    };
    let config = blob(config, MAX_CONFIG_BYTES.min(opts.max_blob_bytes))?;
    let mut out = Vec::with_capacity(layers.len());
    let mut total = config.size;
    for l in layers {
        if !LAYER_TYPES.contains(&l.media_type.as_str()) {
            return Err(ImageError::Invalid(format!(
                "{r}: layer {} has unsupported media type {:?}",
                l.digest, l.media_type
            )));
        }
        let b = blob(l, opts.max_blob_bytes)?;
        total = total.saturating_add(b.size);
        out.push(b);
    }
    if total > opts.max_total_bytes {
        return Err(ImageError::Invalid(format!(
            "{r} is {total} bytes of blobs, more than the {} allowed",
            opts.max_total_bytes
        )));
    }
    Ok((config, out))
}

/// What went wrong with one attempt: may it pass if tried again?
enum Failure {
    Transient(ImageError),
    Fatal(ImageError),
}

/// `e` and its sources, each once.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// Whether a TLS error is in `e`'s chain (e.g. HTTPS to a plain-HTTP port).
fn is_tls(e: &(dyn std::error::Error + 'static)) -> bool {
    use tokio_rustls::rustls::Error as TlsError;
    let mut cur = Some(e);
    while let Some(x) = cur {
        if x.is::<TlsError>() {
            return true;
        }
        // An io::Error's source skips the error it wraps: look inside.
        cur = match x.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => x.source(),
        };
    }
    false
}

struct Puller<'a> {
    client: Client,
    reference: Reference,
    auth: RegistryAuth,
    registry: String,
    repository: String,
    plain_http: bool,
    opts: &'a PullOptions,
}

impl<'a> Puller<'a> {
    fn new(r: &Reference, opts: &'a PullOptions) -> Result<Self, ImageError> {
        // reqwest takes its TLS from the process's default provider: ring,
        // as the rest of the daemon.
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        let host = r.resolve_registry().to_string();
        let plain_http = opts.insecure_hosts.iter().any(|h| h == r.registry() || *h == host)
            || (opts.loopback_plain_http && is_loopback(&host));
        let config = ClientConfig {
            protocol: if plain_http { ClientProtocol::HttpsExcept(vec![host]) } else { ClientProtocol::Https },
            connect_timeout: Some(opts.connect_timeout),
            read_timeout: Some(opts.request_timeout),
            user_agent: concat!("forkd/", env!("CARGO_PKG_VERSION")),
            platform_resolver: None,
            ..Default::default()
        };
        let client = Client::try_from(config)
            .map_err(|e| ImageError::Precondition(format!("cannot set up a registry client: {}", chain(&e))))?;
        let auth = match &opts.credentials {
            Some(c) if same_registry(&c.registry, r.registry()) => {
                RegistryAuth::Basic(c.username.clone(), c.password.clone())
            }
            _ => RegistryAuth::Anonymous,
        };
        Ok(Puller {
            client,
            reference: r.clone(),
            auth,
            registry: r.registry().to_string(),
            repository: r.repository().to_string(),
            plain_http,
            opts,
        })
    }

    /// Runs `attempt` until it succeeds, fails for good, or has been tried
    /// `1 + retries` times.
    async fn retrying<T, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T, ImageError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut tries = 0;
        loop {
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient(e)) if tries >= self.opts.retries => return Err(e),
                Err(Failure::Transient(e)) => {
                    let wait = Duration::from_millis(500 << tries.min(4));
                    tracing::debug!(registry = %self.registry, %what, error = %e, ?wait, "registry: retrying");
                    tokio::time::sleep(wait).await;
                    tries += 1;
                }
            }
        }
    }

    /// `fut` within the request timeout.
    async fn timed<T>(&self, what: &str, fut: impl Future<Output = Result<T, Failure>>) -> Result<T, Failure> {
        tokio::time::timeout(self.opts.request_timeout, fut).await.unwrap_or_else(|_| {
            Err(Failure::Transient(ImageError::Unavailable(format!(
                "registry {}: {what} timed out after {:?}",
                self.registry, self.opts.request_timeout
            ))))
        })
    }

    /// What an error of oci-client means for the daemon's caller.
    fn classify(&self, what: &str, e: OciDistributionError) -> Failure {
        use Failure::{Fatal, Transient};
        let reg = &self.registry;
        let repo = &self.repository;
        let needs_auth = || {
            ImageError::Precondition(format!(
                "registry {reg} refused {what} of {repo}: it needs credentials (FORKD_REGISTRY_HOST, \
                 FORKD_REGISTRY_USER, FORKD_REGISTRY_PASSWORD), or the repository does not exist"
            ))
        };
        let not_found = || ImageError::NotFound(format!("registry {reg} has no {what} in repository {repo}"));
        match e {
            OciDistributionError::RequestError(re) => self.request_failure(what, &re),
            OciDistributionError::IoError(io) => self.io_failure(what, io),
            OciDistributionError::DigestError(d) => Fatal(digest_mismatch(what, reg, &d)),
            OciDistributionError::UnauthorizedError { .. } => Fatal(needs_auth()),
            OciDistributionError::AuthenticationFailure(m) => Fatal(ImageError::Precondition(format!(
                "registry {reg} refused to authorize a pull of {repo}: {}",
                m.trim()
            ))),
            OciDistributionError::RegistryError { envelope, .. } => {
                let code = envelope.errors.first().map(|e| &e.code);
                match code {
                    Some(
                        OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown,
                    ) => Fatal(not_found()),
                    Some(OciErrorCode::Unauthorized | OciErrorCode::Denied) => Fatal(needs_auth()),
                    Some(OciErrorCode::Toomanyrequests) => {
                        Transient(ImageError::Unavailable(format!("registry {reg}: too many requests ({envelope})")))
                    }
                    Some(OciErrorCode::NameInvalid | OciErrorCode::TagInvalid) => {
                        Fatal(ImageError::Invalid(format!("registry {reg} refused {what} of {repo}: {envelope}")))
                    }
                    _ => Fatal(ImageError::Unavailable(format!("registry {reg}: {what} of {repo}: {envelope}"))),
                }
            }
            OciDistributionError::ServerError { code, message, .. } => {
                let msg = || {
                    let m: String = message.trim().chars().take(200).collect();
                    format!(
                        "registry {reg} answered {what} of {repo} with HTTP {code}{}",
                        if m.is_empty() { String::new() } else { format!(": {m}") }
                    )
                };
                match code {
                    404 => Fatal(not_found()),
                    401 | 403 => Fatal(needs_auth()),
                    429 | 500.. => Transient(ImageError::Unavailable(msg())),
                    _ => Fatal(ImageError::Unavailable(msg())),
                }
            }
            OciDistributionError::RegistryTokenDecodeError(m) => {
                Fatal(ImageError::Unavailable(format!("registry {reg} sent a token that does not parse: {m}")))
            }
            other => Fatal(ImageError::Unavailable(format!("registry {reg}: {what} of {repo}: {}", chain(&other)))),
        }
    }

    fn request_failure(&self, what: &str, e: &reqwest::Error) -> Failure {
        let reg = &self.registry;
        if e.is_connect() || (e.is_timeout() && !e.is_body()) {
            let hint = if !self.plain_http && is_tls(e) {
                " (TLS failed: a plain-HTTP registry must be listed in FORKD_REGISTRY_INSECURE)"
            } else {
                ""
            };
            return Failure::Transient(ImageError::Unavailable(format!(
                "cannot reach registry {reg}: {}{hint}",
                chain(e)
            )));
        }
        if e.is_builder() {
            return Failure::Fatal(ImageError::Invalid(format!("registry {reg}: {what}: {}", chain(e))));
        }
        Failure::Transient(ImageError::Unavailable(format!("registry {reg}: {what}: {}", chain(e))))
    }

    fn io_failure(&self, what: &str, e: std::io::Error) -> Failure {
        if let Some(inner) = e.get_ref() {
            if let Some(d) = inner.downcast_ref::<oci_client::errors::DigestError>() {
                return Failure::Fatal(digest_mismatch(what, &self.registry, d));
            }
            if let Some(re) = inner.downcast_ref::<reqwest::Error>() {
                return self.request_failure(what, re);
            }
        }
        Failure::Transient(ImageError::Unavailable(format!("registry {}: {what}: {e}", self.registry)))
    }

    /// The anonymous token or the credentials, up front: an unreachable
    /// registry or refused credentials show here.
    async fn authenticate(&self) -> Result<(), ImageError> {
        self.retrying("authentication", || async {
            let fut = async {
                self.client
                    .auth(&self.reference, &self.auth, RegistryOperation::Pull)
                    .await
                    .map_err(|e| self.classify("a pull", e))
            };
            self.timed("authentication", fut).await.map(|_| ())
        })
        .await
    }

    /// The raw bytes and media type of the manifest `r` names; checked
    /// against `digest` when one is expected.
    async fn manifest(&self, r: &Reference, digest: Option<&str>) -> Result<(Vec<u8>, String), ImageError> {
        let what = match (r.digest(), r.tag()) {
            (Some(d), _) => format!("manifest {d}"),
            (None, Some(t)) => format!("tag {t}"),
            (None, None) => "manifest".to_string(),
        };
        let body = self
            .retrying(&what, || async {
                let fut = async {
                    self.client
                        .pull_manifest_raw(r, &self.auth, &MANIFEST_TYPES)
                        .await
                        .map(|(b, _)| b)
                        .map_err(|e| self.classify(&what, e))
                };
                self.timed(&what, fut).await
            })
            .await?;
        if body.len() > MAX_MANIFEST_BYTES {
            return Err(ImageError::Invalid(format!(
                "registry {} sent a {} byte manifest for {r} (at most {MAX_MANIFEST_BYTES})",
                self.registry,
                body.len()
            )));
        }
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        if let Some(want) = digest
            && want != actual
        {
            return Err(corrupted(want, &self.registry, &format!("the manifest's sha256 is {actual}")));
        }
        let t = manifest_type(&body, &self.registry)?;
        Ok((body.to_vec(), t))
    }

    /// Downloads `blob` into `dir/<hex>`, verified, with retries.
    async fn blob(
        &self,
        r: &Reference,
        blob: Blob,
        dir: &Path,
        progress: Option<&(dyn Fn(PullProgress) + Send + Sync)>,
    ) -> Result<(), ImageError> {
        let hex = &blob.digest["sha256:".len()..];
        let path = dir.join(hex);
        let partial = dir.join(format!("{hex}.partial"));
        let what = format!("blob {}", blob.digest);
        self.retrying(&what, || self.blob_once(r, &blob, &partial, progress)).await?;
        tokio::fs::rename(&partial, &path).await.map_err(|e| ImageError::io(format!("rename {}", partial.display()), e))
    }

    async fn blob_once(
        &self,
        r: &Reference,
        blob: &Blob,
        partial: &Path,
        progress: Option<&(dyn Fn(PullProgress) + Send + Sync)>,
    ) -> Result<(), Failure> {
        let what = format!("blob {}", blob.digest);
        let io = |e: std::io::Error| Failure::Fatal(ImageError::io(format!("write {}", partial.display()), e));
        let bad = |why: String| Failure::Fatal(corrupted(&blob.digest, &self.registry, &why));
        let report = |done: u64| {
            if let Some(f) = progress {
                f(PullProgress { layer: blob.digest.clone(), done, total: blob.size });
            }
        };
        let fut =
            async { self.client.pull_blob_stream(r, blob.digest.as_str()).await.map_err(|e| self.classify(&what, e)) };
        let mut stream = self.timed(&what, fut).await?;
        if let Some(len) = stream.content_length
            && len != blob.size
        {
            return Err(bad(format!("the registry sends {len} bytes, its descriptor says {}", blob.size)));
        }
        let file = tokio::fs::File::create(partial).await.map_err(io)?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut hasher = Sha256::new();
        let mut done = 0u64;
        let (mut last_at, mut last_done) = (Instant::now(), 0u64);
        report(0);
        loop {
            let next = tokio::time::timeout(self.opts.request_timeout, stream.next()).await.map_err(|_| {
                Failure::Transient(ImageError::Unavailable(format!(
                    "registry {}: {what} stalled for {:?}",
                    self.registry, self.opts.request_timeout
                )))
            })?;
            let chunk = match next {
                None => break,
                Some(Ok(c)) => c,
                // The stream's own check of the digest fails at its end: a
                // corrupted blob whatever the size said.
                Some(Err(e)) => return Err(self.io_failure(&what, e)),
            };
            done += chunk.len() as u64;
            if done > blob.size {
                return Err(bad(format!("more than its declared {} bytes", blob.size)));
            }
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(io)?;
            if done - last_done >= PROGRESS_BYTES || last_at.elapsed() >= PROGRESS_EVERY {
                report(done);
                (last_at, last_done) = (Instant::now(), done);
            }
        }
        if done != blob.size {
            return Err(bad(format!("{done} bytes where its descriptor says {}", blob.size)));
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != blob.digest {
            return Err(bad(format!("its sha256 is {actual}")));
        }
        out.flush().await.map_err(io)?;
        out.into_inner().sync_all().await.map_err(io)?;
        if done != last_done {
            report(done);
        }
        Ok(())
    }
}

/// Whether credentials for `configured` apply to a reference's registry.
fn same_registry(configured: &str, registry: &str) -> bool {
    const HUB: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];
    configured.eq_ignore_ascii_case(registry) || (HUB.contains(&configured) && HUB.contains(&registry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = parse_reference("localhost:5000/team/app:1").unwrap();
        assert_eq!((r.registry(), r.repository(), r.tag()), ("localhost:5000", "team/app", Some("1")));
        let r = parse_reference("python:3.12-slim").unwrap();
        assert_eq!(r.whole(), "docker.io/library/python:3.12-slim");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = parse_reference(&format!("registry.example.com/x@{d}")).unwrap();
        assert_eq!(r.digest(), Some(d.as_str()));
        for bad in ["", "team/UPPER:1", "a b", "http://host/x:1", "x@sha256:abc", "x:t@sha512:00", "x::1"] {
            assert!(matches!(parse_reference(bad), Err(ImageError::Invalid(_))), "{bad:?} accepted");
        }
    }

    #[test]
    fn loopback_hosts() {
        for h in ["localhost:5000", "localhost", "127.0.0.1:5000", "127.1.2.3", "[::1]:5000", "LOCALHOST:1"] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["registry.example.com", "10.0.0.1:5000", "localhost.example.com:5000", "docker.io"] {
            assert!(!is_loopback(h), "{h}");
        }
    }

    #[test]
    fn options_from_env() {
        let o = PullOptions::from_vars(|_| None).unwrap();
        assert!(o.insecure_hosts.is_empty() && o.credentials.is_none() && o.loopback_plain_http);
        let vars = |k: &str| match k {
            "FORKD_REGISTRY_INSECURE" => Some("reg.lan:5000, other:80,".into()),
            "FORKD_REGISTRY_HOST" => Some("ghcr.io".into()),
            "FORKD_REGISTRY_USER" => Some("me".into()),
            "FORKD_REGISTRY_PASSWORD" => Some("s3cret".into()),
            _ => None,
        };
        let o = PullOptions::from_vars(vars).unwrap();
        assert_eq!(o.insecure_hosts, ["reg.lan:5000", "other:80"]);
        let c = o.credentials.unwrap();
        assert_eq!((c.registry.as_str(), c.username.as_str(), c.password.as_str()), ("ghcr.io", "me", "s3cret"));
        assert!(!format!("{c:?}").contains("s3cret"));
        let half = |k: &str| (k == "FORKD_REGISTRY_USER").then(|| "me".to_string());
        assert!(matches!(PullOptions::from_vars(half), Err(ImageError::Precondition(_))));
    }

    #[test]
    fn credentials_stay_with_their_registry() {
        assert!(same_registry("docker.io", "docker.io"));
        assert!(same_registry("index.docker.io", "docker.io"));
        assert!(same_registry("GHCR.io", "ghcr.io"));
        assert!(!same_registry("ghcr.io", "docker.io"));
        assert!(!same_registry("registry.example.com", "registry.example.com:5000"));
    }

    fn desc(os: &str, arch: &str, variant: Option<&str>, n: char) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: format!("sha256:{}", n.to_string().repeat(64)),
            size: 10,
            platform: Some(Platform {
                architecture: arch.into(),
                os: os.into(),
                variant: variant.map(Into::into),
                os_version: None,
            }),
        }
    }

    #[test]
    fn platform_choice() {
        let r = parse_reference("x:1").unwrap();
        let entries = vec![
            desc("linux", "arm64", Some("v8"), '1'),
            desc("linux", "amd64", Some("v3"), '2'),
            desc("linux", "amd64", None, '3'),
            desc("unknown", "unknown", None, '4'),
        ];
        assert!(choose_platform(&entries, &r).unwrap().digest.ends_with('3'));
        assert!(choose_platform(&entries[..2], &r).unwrap().digest.ends_with('2'));
        match choose_platform(&entries[..1], &r) {
            Err(ImageError::NotFound(m)) => assert!(m.contains("linux/arm64/v8"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn manifest_checks() {
        let r = parse_reference("x:1").unwrap();
        let opts = PullOptions { max_blob_bytes: 100, max_total_bytes: 150, ..Default::default() };
        let d = |n: char, size: i64, t: &str| serde_json::json!({"mediaType": t, "digest": format!("sha256:{}", n.to_string().repeat(64)), "size": size});
        let cfg = CONFIG_TYPES[0];
        let layer = LAYER_TYPES[1];
        let m = |config: serde_json::Value, layers: Vec<serde_json::Value>| -> RawManifest {
            let v = serde_json::json!({"schemaVersion": 2, "config": config, "layers": layers});
            serde_json::from_value(v).unwrap()
        };
        let (c, l) = check_image_manifest(&m(d('a', 5, cfg), vec![d('b', 100, layer)]), &r, &opts).unwrap();
        assert_eq!((c.size, l.len()), (5, 1));
        let invalid = |m: RawManifest| matches!(check_image_manifest(&m, &r, &opts), Err(ImageError::Invalid(_)));
        assert!(invalid(m(d('a', 5, "application/vnd.cncf.helm.config.v1+json"), vec![])));
        assert!(invalid(m(d('a', 5, cfg), vec![d('b', 101, layer)])));
        assert!(invalid(m(d('a', 5, cfg), vec![d('b', 100, layer), d('c', 100, layer)])));
        assert!(invalid(m(d('a', 5, cfg), vec![d('b', -1, layer)])));
        assert!(invalid(m(d('a', 5, cfg), vec![d('b', 1, "application/octet-stream")])));
        let mut bad = d('a', 5, cfg);
        bad["digest"] = "sha256:../../etc/passwd".into();
        assert!(invalid(m(bad, vec![])));
        assert_eq!(manifest_type(br#"{"schemaVersion":2,"manifests":[]}"#, "r").unwrap(), OCI_INDEX);
        assert!(matches!(manifest_type(br#"{"schemaVersion":1}"#, "r"), Err(ImageError::Invalid(_))));
    }

    #[test]
    fn pull_is_send() {
        fn send<T: Send>(_: &T) {}
        let (opts, noop) = (PullOptions::default(), |_: PullProgress| {});
        let fut = pull("x", Path::new("/nonexistent"), &opts, &noop);
        send(&fut);
    }

    #[test]
    fn destination_must_be_empty() {
        let t = tempfile::tempdir().unwrap();
        prepare_dest(&t.path().join("new")).unwrap();
        std::fs::write(t.path().join("new/stray"), b"x").unwrap();
        assert!(matches!(prepare_dest(&t.path().join("new")), Err(ImageError::Precondition(_))));
    }
}
