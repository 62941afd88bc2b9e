//! Image pulls from a real OCI distribution registry (Debian's
//! `docker-registry`, images pushed with `skopeo`; both installed by
//! scripts/setup-registry.sh), no VM: the pull writes an OCI image layout
//! whose blobs are the pushed ones byte for byte and whose manifest digest
//! is the registry's; a multi-platform index resolves to linux/amd64; a
//! Docker schema 2 manifest is kept as it is; a blob corrupted in the
//! registry's storage, a registry that cannot be reached, a missing tag and
//! oversized blobs are refused with the error each deserves.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flate2::Compression;
use flate2::write::GzEncoder;
use forkd_integration::registry::Registry;
use forkd_server::images::ImageError;
use forkd_server::images::registry::{Credentials, PullOptions, PullProgress, PulledImage, pull};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Bytes that do not compress, so a layer has a size worth reporting.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A gzip-compressed tar layer holding `files`.
fn gz_layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    for (path, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

fn descriptor(media_type: &str, blob: &[u8]) -> Value {
    json!({ "mediaType": media_type, "digest": sha256(blob), "size": blob.len() })
}

/// One platform's image: config, layers and the manifest naming them.
struct Image {
    config: Vec<u8>,
    layers: Vec<Vec<u8>>,
    manifest: Vec<u8>,
}

impl Image {
    fn new(arch: &str, layers: Vec<Vec<u8>>) -> Image {
        let config = serde_json::to_vec(&json!({
            "architecture": arch,
            "os": "linux",
            "config": { "Env": ["PATH=/bin"], "Cmd": ["sh"] },
            "rootfs": { "type": "layers", "diff_ids": [] },
        }))
        .unwrap();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
            "layers": layers.iter().map(|l| descriptor("application/vnd.oci.image.layer.v1.tar+gzip", l)).collect::<Vec<_>>(),
        }))
        .unwrap();
        Image { config, layers, manifest }
    }

    fn digest(&self) -> String {
        sha256(&self.manifest)
    }

    fn blobs(&self) -> impl Iterator<Item = &Vec<u8>> {
        [&self.manifest, &self.config].into_iter().chain(&self.layers)
    }
}

/// Writes an OCI layout at `dir` whose index names `top` (a manifest or
/// an index, of `media_type`) as `tag`, with `blobs`.
fn write_layout<'a>(dir: &Path, tag: &str, top: &[u8], media_type: &str, blobs: impl Iterator<Item = &'a Vec<u8>>) {
    let dir_blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&dir_blobs).unwrap();
    for b in blobs.map(|b| b.as_slice()).chain([top]) {
        std::fs::write(dir_blobs.join(&sha256(b)["sha256:".len()..]), b).unwrap();
    }
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut d = descriptor(media_type, top);
    d["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
    let index = json!({ "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [d] });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// An image of two layers (one of 5 MiB that does not compress), pushed
/// to `repo:tag` as an OCI manifest.
fn two_layer_image(seed: u64) -> Image {
    let big = noise(5 << 20, seed);
    let layers = vec![
        gz_layer(&[("etc/hello", b"hello from the registry\n")]),
        gz_layer(&[("data/big", &big), ("data/small", b"x")]),
    ];
    Image::new("amd64", layers)
}

fn push(reg: &Registry, img: &Image, repo: &str, tag: &str, args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    write_layout(dir.path(), tag, &img.manifest, "application/vnd.oci.image.manifest.v1+json", img.blobs());
    reg.push_with(dir.path(), tag, repo, args)
}

struct Pulled {
    result: Result<PulledImage, ImageError>,
    progress: Vec<PullProgress>,
    dir: tempfile::TempDir,
}

async fn pull_into(reference: &str, opts: &PullOptions) -> Pulled {
    let dir = tempfile::tempdir().unwrap();
    let seen = Mutex::new(Vec::new());
    let report = |p: PullProgress| seen.lock().unwrap().push(p);
    let result = pull(reference, &dir.path().join("layout"), opts, &report).await;
    Pulled { result, progress: seen.into_inner().unwrap(), dir }
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn blob_of(layout: &Path, digest: &str) -> Vec<u8> {
    let p = layout.join("blobs/sha256").join(digest.strip_prefix("sha256:").unwrap());
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The layout's single manifest: (descriptor in index.json, manifest).
fn layout_manifest(layout: &Path) -> (Value, Value) {
    assert_eq!(read_json(&layout.join("oci-layout")), json!({"imageLayoutVersion": "1.0.0"}));
    let index = read_json(&layout.join("index.json"));
    assert_eq!(index["schemaVersion"], 2);
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{index}");
    let d = entries[0].clone();
    let bytes = blob_of(layout, d["digest"].as_str().unwrap());
    assert_eq!(sha256(&bytes), d["digest"].as_str().unwrap());
    assert_eq!(bytes.len() as u64, d["size"].as_u64().unwrap());
    (d, serde_json::from_slice(&bytes).unwrap())
}

fn no_partials(layout: &Path) {
    for e in std::fs::read_dir(layout.join("blobs/sha256")).unwrap().flatten() {
        assert!(!e.file_name().to_string_lossy().ends_with(".partial"), "{:?} left behind", e.path());
    }
}

#[tokio::test]
async fn pull_writes_an_oci_layout_of_the_pushed_image() {
    let reg = Registry::start().await;
    let img = two_layer_image(1);
    let pushed = push(&reg, &img, "team/app", "1", &["--preserve-digests"]);
    let raw = reg.raw_manifest("team/app", "1");
    assert_eq!(sha256(&raw), pushed);
    assert_eq!(pushed, img.digest(), "skopeo kept the OCI manifest as written");

    let reference = format!("{}/team/app:1", reg.host());
    let p = pull_into(&reference, &PullOptions::default()).await;
    let pulled = p.result.expect("pull");
    assert_eq!(pulled, PulledImage { digest: pushed.clone(), reference: reference.clone() });

    let layout = p.dir.path().join("layout");
    let (desc, manifest) = layout_manifest(&layout);
    assert_eq!(desc["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(desc["digest"], pushed.as_str());
    assert_eq!(desc["annotations"]["org.opencontainers.image.ref.name"], reference.as_str());
    assert_eq!(blob_of(&layout, &pushed), raw, "the manifest is stored as served");
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 2);
    for b in img.blobs() {
        assert!(blob_of(&layout, &sha256(b)) == *b, "blob {} differs", sha256(b));
    }
    let files = std::fs::read_dir(layout.join("blobs/sha256")).unwrap().count();
    assert_eq!(files, 4, "manifest, config and two layers");
    no_partials(&layout);

    // Progress: each layer from 0 to its size, never past it, the big one
    // in several steps; the config is not a layer.
    for l in &img.layers {
        let d = sha256(l);
        let steps: Vec<_> = p.progress.iter().filter(|x| x.layer == d).collect();
        assert!(!steps.is_empty(), "no progress for {d}");
        assert!(steps.iter().all(|x| x.total == l.len() as u64 && x.done <= x.total));
        assert_eq!(steps.first().unwrap().done, 0);
        assert_eq!(steps.last().unwrap().done, l.len() as u64);
        assert!(steps.windows(2).all(|w| w[0].done <= w[1].done));
    }
    let big = sha256(&img.layers[1]);
    assert!(p.progress.iter().filter(|x| x.layer == big).count() >= 2, "{:?}", p.progress);
    assert!(!p.progress.iter().any(|x| x.layer == sha256(&img.config)));

    // By digest, the same manifest.
    let by_digest = format!("{}/team/app@{pushed}", reg.host());
    let p = pull_into(&by_digest, &PullOptions::default()).await;
    assert_eq!(p.result.expect("pull by digest").digest, pushed);
}

#[tokio::test]
async fn docker_schema2_manifest_is_kept_and_named_in_the_index() {
    let reg = Registry::start().await;
    let img = two_layer_image(2);
    let pushed = push(&reg, &img, "legacy/app", "v2", &["--format", "v2s2"]);
    let raw = reg.raw_manifest("legacy/app", "v2");
    assert_eq!(sha256(&raw), pushed);
    let served: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(served["mediaType"], "application/vnd.docker.distribution.manifest.v2+json");

    let p = pull_into(&format!("{}/legacy/app:v2", reg.host()), &PullOptions::default()).await;
    assert_eq!(p.result.expect("pull").digest, pushed);
    let layout = p.dir.path().join("layout");
    let (desc, manifest) = layout_manifest(&layout);
    assert_eq!(desc["mediaType"], "application/vnd.docker.distribution.manifest.v2+json");
    assert_eq!(manifest, served);
    let mut descriptors = vec![manifest["config"].clone()];
    descriptors.extend(manifest["layers"].as_array().unwrap().iter().cloned());
    for d in descriptors {
        let b = blob_of(&layout, d["digest"].as_str().unwrap());
        assert_eq!(sha256(&b), d["digest"].as_str().unwrap());
        assert_eq!(b.len() as u64, d["size"].as_u64().unwrap());
    }
    // The layers are the pushed ones, byte for byte.
    for l in &img.layers {
        assert!(blob_of(&layout, &sha256(l)) == *l);
    }
}

#[tokio::test]
async fn multi_platform_index_resolves_to_linux_amd64() {
    let reg = Registry::start().await;
    let arm = Image::new("arm64", vec![gz_layer(&[("arch", b"arm64")])]);
    let amd = Image::new("amd64", vec![gz_layer(&[("arch", b"amd64")])]);
    let platform = |arch: &str, img: &Image| {
        let mut d = descriptor("application/vnd.oci.image.manifest.v1+json", &img.manifest);
        d["platform"] = json!({ "architecture": arch, "os": "linux" });
        d
    };
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [platform("arm64", &arm), platform("amd64", &amd)],
    }))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let index_type = "application/vnd.oci.image.index.v1+json";
    write_layout(dir.path(), "multi", &index, index_type, arm.blobs().chain(amd.blobs()));
    let pushed = reg.push_with(dir.path(), "multi", "team/multi", &["--all", "--preserve-digests"]);
    assert_eq!(pushed, sha256(&index));

    let reference = format!("{}/team/multi:multi", reg.host());
    let p = pull_into(&reference, &PullOptions::default()).await;
    let pulled = p.result.expect("pull");
    assert_eq!(pulled.digest, amd.digest(), "the amd64 manifest, not the index nor arm64");
    let layout = p.dir.path().join("layout");
    let (desc, _) = layout_manifest(&layout);
    assert_eq!(desc["platform"], json!({ "architecture": "amd64", "os": "linux" }));
    assert_eq!(desc["annotations"]["org.opencontainers.image.ref.name"], reference.as_str());
    for b in amd.blobs() {
        assert!(blob_of(&layout, &sha256(b)) == *b);
    }
    assert!(!layout.join("blobs/sha256").join(&arm.digest()["sha256:".len()..]).exists());
    assert_eq!(std::fs::read_dir(layout.join("blobs/sha256")).unwrap().count(), 3);

    // An index without linux/amd64 is not there for this host's guests.
    let only_arm = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [platform("arm64", &arm)],
    }))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_layout(dir.path(), "arm", &only_arm, index_type, arm.blobs());
    reg.push_with(dir.path(), "arm", "team/multi", &["--all", "--preserve-digests"]);
    let p = pull_into(&format!("{}/team/multi:arm", reg.host()), &PullOptions::default()).await;
    match p.result {
        Err(ImageError::NotFound(m)) => assert!(m.contains("linux/amd64") && m.contains("linux/arm64"), "{m}"),
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[tokio::test]
async fn corrupted_blobs_are_refused() {
    let reg = Registry::start().await;
    let img = two_layer_image(3);
    push(&reg, &img, "team/bad", "1", &["--preserve-digests"]);
    let reference = format!("{}/team/bad:1", reg.host());
    let opts = PullOptions { retries: 1, ..Default::default() };
    assert!(pull_into(&reference, &opts).await.result.is_ok());

    // Same size, one byte flipped in the middle of the big layer.
    let stored = reg.blob_path(&sha256(&img.layers[1]));
    let mut data = std::fs::read(&stored).unwrap();
    assert!(data == img.layers[1], "the registry stores blobs as pushed");
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&stored, &data).unwrap();
    let p = pull_into(&reference, &opts).await;
    match &p.result {
        Err(ImageError::Invalid(m)) => {
            assert!(m.contains("corrupted blob") && m.contains(&sha256(&img.layers[1])), "{m}")
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    let layout = p.dir.path().join("layout");
    assert!(!layout.join("index.json").exists(), "a refused pull leaves no index");
    no_partials(&layout);

    // Longer than declared: refused before or as the extra bytes arrive.
    data[mid] ^= 0xff;
    data.extend_from_slice(b"trailing bytes");
    std::fs::write(&stored, &data).unwrap();
    match pull_into(&reference, &opts).await.result {
        Err(ImageError::Invalid(m)) => assert!(m.contains("corrupted blob"), "{m}"),
        other => panic!("expected Invalid, got {other:?}"),
    }

    // Shorter than declared.
    data.truncate(data.len() - 100);
    std::fs::write(&stored, &data).unwrap();
    match pull_into(&reference, &opts).await.result {
        Err(ImageError::Invalid(m)) => assert!(m.contains("corrupted blob"), "{m}"),
        other => panic!("expected Invalid, got {other:?}"),
    }

    // A corrupted config is refused the same way.
    std::fs::write(&stored, &img.layers[1]).unwrap();
    let config = reg.blob_path(&sha256(&img.config));
    let mut c = std::fs::read(&config).unwrap();
    c[0] = b' ';
    std::fs::write(&config, &c).unwrap();
    match pull_into(&reference, &opts).await.result {
        Err(ImageError::Invalid(m)) => assert!(m.contains("corrupted blob") && m.contains(&sha256(&img.config)), "{m}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[tokio::test]
async fn missing_tags_and_repositories_are_not_found() {
    let reg = Registry::start().await;
    push(&reg, &two_layer_image(4), "team/app", "1", &[]);
    for reference in [
        format!("{}/team/app:2", reg.host()),
        format!("{}/team/nothing:1", reg.host()),
        format!("{}/team/app@sha256:{}", reg.host(), "0".repeat(64)),
    ] {
        let p = pull_into(&reference, &PullOptions::default()).await;
        match p.result {
            Err(ImageError::NotFound(m)) => assert!(m.contains(&reg.host()), "{m}"),
            other => panic!("{reference}: expected NotFound, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn unreachable_registries_are_unavailable() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let opts = PullOptions {
        retries: 1,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let p = pull_into(&format!("{closed}/team/app:1"), &opts).await;
    match p.result {
        Err(ImageError::Unavailable(m)) => assert!(m.contains(&format!("cannot reach registry {closed}")), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(20));

    // A name that does not resolve.
    let p = pull_into("registry.forkd-test.invalid/team/app:1", &opts).await;
    match p.result {
        Err(ImageError::Unavailable(m)) => {
            assert!(m.contains("cannot reach registry registry.forkd-test.invalid"), "{m}");
            assert!(!m.contains("FORKD_REGISTRY_INSECURE"), "no TLS hint for a name that does not resolve: {m}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }

    // A plain-HTTP registry spoken to over HTTPS does not answer either.
    let reg = Registry::start().await;
    let https_only = PullOptions { loopback_plain_http: false, ..opts.clone() };
    match pull_into(&format!("{}/team/app:1", reg.host()), &https_only).await.result {
        Err(ImageError::Unavailable(m)) => assert!(m.contains("FORKD_REGISTRY_INSECURE"), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn limits_and_bad_input_are_refused_before_downloading() {
    let reg = Registry::start().await;
    let img = two_layer_image(5);
    push(&reg, &img, "team/app", "1", &[]);
    let reference = format!("{}/team/app:1", reg.host());

    let small = PullOptions { max_blob_bytes: 1 << 20, ..Default::default() };
    let p = pull_into(&reference, &small).await;
    match &p.result {
        Err(ImageError::Invalid(m)) => assert!(m.contains(&sha256(&img.layers[1])), "{m}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert!(p.progress.is_empty(), "nothing fetched: {:?}", p.progress);
    let total = PullOptions { max_total_bytes: 5 << 20, ..Default::default() };
    assert!(matches!(pull_into(&reference, &total).await.result, Err(ImageError::Invalid(_))));

    for bad in ["", "team/App:1", "host:5000/a b:1", "http://127.0.0.1:5000/x:1", "x@sha256:12"] {
        match pull_into(bad, &PullOptions::default()).await.result {
            Err(ImageError::Invalid(_)) => {}
            other => panic!("{bad:?}: expected Invalid, got {other:?}"),
        }
    }

    // The destination must be empty.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("stray"), b"x").unwrap();
    match pull(&reference, dir.path(), &PullOptions::default(), &|_| {}).await {
        Err(ImageError::Precondition(_)) => {}
        other => panic!("expected Precondition, got {other:?}"),
    }
}

/// A request as a [`FakeRegistry`] saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    authorization: Option<String>,
}

/// An answer: status, extra headers, body, and whether to send a
/// `Content-Length` (without one the body ends when the connection closes).
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    length: bool,
}

impl Answer {
    fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Answer { status, headers: vec![], body: body.into(), length: true }
    }
    fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
}

/// A registry that misbehaves on purpose: plain HTTP on a loopback port,
/// one request per connection, answered by `handler` (`None`: never
/// answered, the connection held open).
struct FakeRegistry {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeRegistry {
    async fn start(handler: impl Fn(&Seen) -> Option<Answer> + Send + Sync + 'static) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (log, handler) = (seen.clone(), Arc::new(handler));
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else { return };
                let (log, handler) = (log.clone(), handler.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head).to_string();
                    let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
                    let authorization = text
                        .lines()
                        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("authorization")))
                        .map(|(_, v)| v.trim().to_string());
                    let req = Seen { path, authorization };
                    log.lock().unwrap().push(req.clone());
                    let Some(a) = handler(&req) else {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    };
                    let mut out = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", a.status);
                    for (k, v) in &a.headers {
                        out.push_str(&format!("{k}: {v}\r\n"));
                    }
                    if a.length {
                        out.push_str(&format!("Content-Length: {}\r\n", a.body.len()));
                    }
                    out.push_str("\r\n");
                    let _ = conn.write_all(out.as_bytes()).await;
                    let _ = conn.write_all(&a.body).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        FakeRegistry { addr, seen, task }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn envelope(code: &str) -> String {
    json!({ "errors": [{ "code": code, "message": code.to_lowercase() }] }).to_string()
}

#[tokio::test]
async fn credentials_go_only_to_their_registry_and_refusals_need_them() {
    // Basic auth: everything is 401 without the right header; with it, no
    // such manifest.
    let good = "Basic dGVhbTpzM2NyZXQ="; // team:s3cret
    let fake = FakeRegistry::start(move |r| {
        Some(if r.authorization.as_deref() == Some(good) {
            Answer::new(404, envelope("MANIFEST_UNKNOWN"))
        } else {
            Answer::new(401, envelope("UNAUTHORIZED")).header("WWW-Authenticate", "Basic realm=\"test\"")
        })
    })
    .await;
    let reference = format!("{}/team/app:1", fake.addr);
    let creds = |registry: String| Credentials { registry, username: "team".into(), password: "s3cret".into() };

    let anonymous = pull_into(&reference, &PullOptions::default()).await;
    match anonymous.result {
        Err(ImageError::Precondition(m)) => assert!(m.contains("credentials"), "{m}"),
        other => panic!("expected Precondition, got {other:?}"),
    }
    let elsewhere = PullOptions { credentials: Some(creds("registry.example.com".into())), ..Default::default() };
    assert!(matches!(pull_into(&reference, &elsewhere).await.result, Err(ImageError::Precondition(_))));
    assert!(fake.seen().iter().all(|s| s.authorization.is_none()), "credentials sent elsewhere: {:?}", fake.seen());

    let here = PullOptions { credentials: Some(creds(fake.addr.to_string())), ..Default::default() };
    match pull_into(&reference, &here).await.result {
        Err(ImageError::NotFound(_)) => {}
        other => panic!("expected NotFound with credentials, got {other:?}"),
    }
    assert!(fake.seen().iter().any(|s| s.path.ends_with("/manifests/1") && s.authorization.as_deref() == Some(good)));

    // A bearer-token registry whose token service (on the same port, its
    // address known once it listens) refuses.
    let token_url = Arc::new(Mutex::new(String::new()));
    let realm = token_url.clone();
    let fake = FakeRegistry::start(move |r| {
        Some(if r.path.starts_with("/token") {
            Answer::new(403, "denied")
        } else {
            let challenge = format!("Bearer realm=\"{}\",service=\"fake\"", realm.lock().unwrap());
            Answer::new(401, envelope("UNAUTHORIZED")).header("WWW-Authenticate", &challenge)
        })
    })
    .await;
    *token_url.lock().unwrap() = format!("http://{}/token", fake.addr);
    match pull_into(&format!("{}/team/app:1", fake.addr), &PullOptions::default()).await.result {
        Err(ImageError::Precondition(m)) => assert!(m.contains("team/app"), "{m}"),
        other => panic!("expected Precondition, got {other:?}"),
    }
    assert!(
        fake.seen().iter().any(|s| s.path.starts_with("/token?") && s.path.contains("repository%3Ateam%2Fapp%3Apull"))
    );
}

#[tokio::test]
async fn failing_and_stalling_registries_are_unavailable_after_bounded_retries() {
    let fake = FakeRegistry::start(|_| Some(Answer::new(503, "overloaded"))).await;
    let opts = PullOptions { retries: 2, ..Default::default() };
    match pull_into(&format!("{}/team/app:1", fake.addr), &opts).await.result {
        Err(ImageError::Unavailable(m)) => assert!(m.contains("503"), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let manifests = fake.seen().iter().filter(|s| s.path.ends_with("/manifests/1")).count();
    assert_eq!(manifests, 3, "one try and two retries: {:?}", fake.seen());

    let fake = FakeRegistry::start(|_| None).await;
    let opts = PullOptions { retries: 1, request_timeout: Duration::from_secs(1), ..Default::default() };
    let started = std::time::Instant::now();
    match pull_into(&format!("{}/team/app:1", fake.addr), &opts).await.result {
        Err(ImageError::Unavailable(m)) => assert!(m.contains(&fake.addr.to_string()), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert_eq!(fake.seen().len(), 2, "one try and one retry: {:?}", fake.seen());
}

#[tokio::test]
async fn a_blob_running_past_its_declared_size_is_cut_off() {
    // The layer is declared as 1 KiB; the registry sends 64 MiB without a
    // Content-Length. The pull stops at the first byte too many.
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec();
    let declared = noise(1024, 7);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", &declared)],
    }))
    .unwrap();
    let (config_digest, layer_digest) = (sha256(&config), sha256(&declared));
    let (m, c, l) = (manifest.clone(), config.clone(), layer_digest.clone());
    let fake = FakeRegistry::start(move |r| {
        Some(if r.path == "/v2/" {
            Answer::new(200, "{}")
        } else if r.path.ends_with("/manifests/1") {
            Answer::new(200, m.clone()).header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        } else if r.path.ends_with(&config_digest) {
            Answer::new(200, c.clone())
        } else if r.path.ends_with(&l) {
            Answer { status: 200, headers: vec![], body: noise(64 << 20, 8), length: false }
        } else {
            Answer::new(404, envelope("BLOB_UNKNOWN"))
        })
    })
    .await;
    let p = pull_into(&format!("{}/team/app:1", fake.addr), &PullOptions::default()).await;
    match &p.result {
        Err(ImageError::Invalid(m)) => {
            assert!(m.contains("corrupted blob") && m.contains(&layer_digest) && m.contains("1024"), "{m}")
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert!(p.progress.iter().all(|x| x.done <= 1024), "{:?}", p.progress);
    no_partials(&p.dir.path().join("layout"));
}
