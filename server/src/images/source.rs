//! Reading an image from local files — an OCI image layout directory, an
//! OCI archive (a tar of a layout, possibly gzip or zstd compressed) or a
//! `docker save` tarball: selecting the image, verifying every blob it uses
//! (size, then sha256) and parsing its config.
//!
//! The JSON documents are read with serde structs written from the OCI
//! image spec (descriptor, index, manifest, image config, layout) and the
//! `docker save` manifest.json; only the fields forkd uses are kept.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::Mode;
use nix::unistd::{UnlinkatFlags, unlinkat};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tar::EntryType;

use super::layers::{self, Codec, Meter, Metered, Tree, host, host_io, show, split_path, stat_at, within};
use super::{ImageConfig, ImageError, LayerBlob, SourceImage};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// What a `docker save` layer is (its compression, if any, is sniffed).
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// The layer media types forkd applies.
pub(crate) const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The full reference containerd and Docker put beside REF_NAME.
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// Docker marks the provenance / SBOM manifests of an index with this.
const DOCKER_REF_TYPE: &str = "vnd.docker.reference.type";

/// The platform forkd's guests run.
const OS: &str = "linux";
const ARCH: &str = "amd64";

/// Manifests and indexes (registries refuse larger ones too).
const MAX_MANIFEST: u64 = 4 << 20;
const MAX_CONFIG: u64 = 16 << 20;
const MAX_LAYERS: usize = 1024;
const MAX_NESTING: usize = 4;
/// Bounds on unpacking an archive: its members, and its unpacked bytes when
/// it is compressed (uncompressed, its own size bounds them).
const MAX_ARCHIVE_ENTRIES: u64 = 100_000;
const MAX_ARCHIVE_BYTES: u64 = 64 << 30;

// ---- documents ----------------------------------------------------------------

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: Option<String>,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
    #[serde(default)]
    platform: Option<Platform>,
}

impl Descriptor {
    fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }

    /// Provenance / SBOM manifests that Docker and BuildKit put in an index.
    fn is_attestation(&self) -> bool {
        self.annotation(DOCKER_REF_TYPE).is_some()
            || self.platform.as_ref().is_some_and(|p| p.os == "unknown" && p.architecture == "unknown")
    }

    fn platform_text(&self) -> String {
        match &self.platform {
            Some(p) => match p.variant.as_deref() {
                Some(v) if !v.is_empty() => format!("{}/{}/{v}", p.os, p.architecture),
                _ => format!("{}/{}", p.os, p.architecture),
            },
            None => "unknown".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
struct Platform {
    architecture: String,
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    config: Descriptor,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// Enough of a JSON document to tell an index from a manifest.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
    #[serde(default)]
    config: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutFile {
    image_layout_version: String,
}

/// The OCI image config (Docker's is the same shape).
#[derive(Debug, Default, Deserialize)]
struct ImageJson {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    config: Option<RunConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Option<Vec<String>>,
}

/// One image of a `docker save` manifest.json.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerImage {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    #[serde(default)]
    layers: Option<Vec<String>>,
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| ImageError::Invalid(format!("{what}: not valid JSON of its kind: {e}")))
}

/// The hex of a `sha256:<64 lowercase hex>` digest; None for anything else.
pub(super) fn sha256_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then_some(hex)
}

fn checked_hex<'a>(what: &str, digest: &'a str) -> Result<&'a str, ImageError> {
    if let Some(hex) = sha256_hex(digest) {
        return Ok(hex);
    }
    let why = if digest.contains(':') && !digest.starts_with("sha256:") {
        "only sha256 digests are supported"
    } else {
        "not a sha256:<64 hex digits> digest"
    };
    Err(ImageError::Invalid(format!("{what}: {digest:?}: {why}")))
}

// ---- entry points -------------------------------------------------------------

/// Reads the image at `path`: an OCI image layout directory, an OCI archive
/// or a `docker save` tarball. An archive is unpacked into `scratch` (made
/// if missing; only regular files and directories, paths checked, size and
/// count bounded), and the layer paths of the answer point into it, so
/// `scratch` must outlive their use; the caller removes it. A source that
/// holds several images is refused unless they are one multi-arch image
/// (then linux/amd64 is taken): name one with [`read_source_ref`].
pub fn read_source(path: &Path, scratch: &Path) -> Result<SourceImage, ImageError> {
    read_source_ref(path, scratch, None)
}

/// [`read_source`], taking the image named `name`: by its
/// `org.opencontainers.image.ref.name` (or `io.containerd.image.name`)
/// annotation in an OCI index, or a `RepoTags` entry of `docker save` (a
/// name without a tag also matches `name:latest`). A name that is not there
/// is [`ImageError::NotFound`].
pub fn read_source_ref(path: &Path, scratch: &Path, name: Option<&str>) -> Result<SourceImage, ImageError> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ImageError::NotFound(format!("{}: no such file or directory", path.display())),
        _ => ImageError::io(format!("stat {}", path.display()), e),
    })?;
    let layout = if meta.is_dir() {
        Layout::open(path, HashMap::new())?
    } else if meta.is_file() {
        unpack_archive(path, scratch)?
    } else {
        return Err(ImageError::Invalid(format!("{}: neither a directory nor a regular file", path.display())));
    };
    let name = name.filter(|n| !n.is_empty());
    let has_index = layout.exists("index.json")?;
    let has_docker = layout.exists("manifest.json")?;
    match (has_index, has_docker) {
        (true, false) => read_oci(&layout, name),
        (true, true) => match read_oci(&layout, name) {
            // A newer `docker save` writes both: its RepoTags may name the
            // image where the index does not.
            Err(ImageError::NotFound(_)) => read_docker(&layout, name),
            other => other,
        },
        (false, true) => read_docker(&layout, name),
        (false, false) => Err(ImageError::Invalid(format!(
            "{}: neither an OCI image layout (index.json) nor a docker save archive (manifest.json)",
            path.display()
        ))),
    }
}

// ---- the layout on disk -------------------------------------------------------

/// A directory holding an OCI layout or `docker save` files, read without
/// following symlinks. `aliases` are the links of an unpacked archive
/// (path → what it names), resolved by name, never on disk.
struct Layout {
    dir: PathBuf,
    tree: Tree,
    aliases: HashMap<String, String>,
}

impl Layout {
    fn open(dir: &Path, aliases: HashMap<String, String>) -> Result<Layout, ImageError> {
        Ok(Layout { dir: dir.to_path_buf(), tree: Tree::open(dir)?, aliases })
    }

    /// `rel` with the archive's links resolved.
    fn resolve<'a>(&'a self, rel: &'a str) -> Result<&'a str, ImageError> {
        let mut cur = rel;
        for _ in 0..16 {
            let key = normalise(cur).unwrap_or_default();
            match self.aliases.get(&key) {
                Some(next) => cur = next,
                None => return Ok(cur),
            }
        }
        Err(ImageError::Invalid(format!("{rel}: too many links")))
    }

    /// The regular file `rel` below the layout, and its path; None when it
    /// is not there.
    fn open_file(&self, rel: &str) -> Result<Option<(File, PathBuf)>, ImageError> {
        let rel = self.resolve(rel)?;
        let comps = split_path(rel.as_bytes()).map_err(|why| ImageError::Invalid(format!("{rel:?}: {why}")))?;
        let Some((name, parent)) = comps.split_last() else {
            return Err(ImageError::Invalid(format!("{rel:?}: not a file")));
        };
        let Some(dir) = self.tree.dir(parent, false)? else { return Ok(None) };
        let fd = match openat(dir.as_fd(), *name, OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
        {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::ELOOP) => return Err(ImageError::Invalid(format!("{rel:?} is a symlink: not followed"))),
            Err(e) => return Err(host(&format!("open {rel}"), e)),
        };
        let file = File::from(fd);
        let meta = file.metadata().map_err(|e| ImageError::io(format!("stat {rel}"), e))?;
        if !meta.is_file() {
            return Err(ImageError::Invalid(format!("{rel:?} is not a regular file")));
        }
        Ok(Some((file, self.dir.join(show(&comps)))))
    }

    fn exists(&self, rel: &str) -> Result<bool, ImageError> {
        Ok(self.open_file(rel)?.is_some())
    }

    /// A small file that no digest names (index.json, manifest.json).
    fn read_small(&self, rel: &str, max: u64) -> Result<Option<Vec<u8>>, ImageError> {
        let Some((file, _)) = self.open_file(rel)? else { return Ok(None) };
        let len = file.metadata().map_err(|e| ImageError::io(format!("stat {rel}"), e))?.len();
        if len > max {
            return Err(ImageError::Invalid(format!("{rel} is {len} bytes, over the {max} allowed")));
        }
        let mut buf = Vec::with_capacity(len as usize);
        file.take(max + 1).read_to_end(&mut buf).map_err(|e| ImageError::io(format!("read {rel}"), e))?;
        if buf.len() as u64 > max {
            return Err(ImageError::Invalid(format!("{rel} is over the {max} bytes allowed")));
        }
        Ok(Some(buf))
    }

    /// The blob `desc` names, checked: its size against the descriptor
    /// first, then its sha256. With `max`, its content is answered too.
    fn blob(&self, what: &str, desc: &Descriptor, max: Option<u64>) -> Result<(PathBuf, Option<Vec<u8>>), ImageError> {
        let hex = checked_hex(what, &desc.digest)?;
        if let Some(max) = max
            && desc.size > max
        {
            return Err(ImageError::Invalid(format!(
                "{what} {}: {} bytes, over the {max} allowed",
                desc.digest, desc.size
            )));
        }
        let rel = format!("blobs/sha256/{hex}");
        let (file, path) = self
            .open_file(&rel)?
            .ok_or_else(|| ImageError::Invalid(format!("{what} {} is not in the layout", desc.digest)))?;
        let (got, size, content) = hash_file(file, desc.size, max.is_some())
            .map_err(|e| ImageError::io(format!("read {}", path.display()), e))?;
        if size != desc.size {
            return Err(ImageError::Invalid(format!(
                "{what} {}: the blob is {size} bytes but its descriptor says {}",
                desc.digest, desc.size
            )));
        }
        if got != hex {
            return Err(ImageError::Invalid(format!(
                "{what} {}: the blob's content is sha256:{got}, not the digest that names it",
                desc.digest
            )));
        }
        Ok((path, content))
    }
}

/// sha256 (hex) and size of `file`, checking the size from its metadata
/// before reading; with `keep`, its content too. A file whose length is
/// not `declared` is answered with its length and not read.
fn hash_file(file: File, declared: u64, keep: bool) -> io::Result<(String, u64, Option<Vec<u8>>)> {
    let len = file.metadata()?.len();
    if len != declared {
        return Ok((String::new(), len, None));
    }
    let mut hasher = Sha256::new();
    let mut content = keep.then(|| Vec::with_capacity(len as usize));
    let mut reader = file.take(declared + 1);
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        if let Some(c) = content.as_mut() {
            c.extend_from_slice(&buf[..n]);
        }
        total += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), total, content))
}

/// A path inside an archive in one spelling (`./a//b` → `a/b`); None when
/// it escapes.
fn normalise(p: &str) -> Option<String> {
    let comps = split_path(p.as_bytes()).ok()?;
    Some(show(&comps))
}

// ---- OCI ----------------------------------------------------------------------

fn read_oci(layout: &Layout, name: Option<&str>) -> Result<SourceImage, ImageError> {
    if let Some(bytes) = layout.read_small("oci-layout", 64 << 10)? {
        let v: LayoutFile = parse("oci-layout", &bytes)?;
        if !v.image_layout_version.starts_with("1.") {
            return Err(ImageError::Invalid(format!(
                "oci-layout: image layout version {} is not supported",
                v.image_layout_version
            )));
        }
    }
    let bytes = layout
        .read_small("index.json", MAX_MANIFEST)?
        .ok_or_else(|| ImageError::Invalid("index.json is missing".into()))?;
    let index: Index = parse("index.json", &bytes)?;
    let all: Vec<&Descriptor> = index.manifests.iter().flatten().filter(|d| !d.is_attestation()).collect();
    if all.is_empty() {
        return Err(ImageError::Invalid("index.json lists no image".into()));
    }
    let (candidates, mut ref_name) = match name {
        Some(n) => {
            let matching: Vec<&Descriptor> = all
                .iter()
                .copied()
                .filter(|d| {
                    [REF_NAME, CONTAINERD_NAME].iter().filter_map(|k| d.annotation(k)).any(|have| names_match(have, n))
                })
                .collect();
            if matching.is_empty() {
                return Err(ImageError::NotFound(format!(
                    "no image named {n:?} in the layout (it has: {})",
                    names_of(&all)
                )));
            }
            (matching, Some(n.to_string()))
        }
        None => (all, None),
    };
    let chosen = choose_top(&candidates)?;
    if ref_name.is_none() {
        ref_name = chosen.annotation(REF_NAME).map(str::to_string);
    }
    let (digest, manifest) = resolve_manifest(layout, chosen, 0)?;
    image_from_manifest(layout, digest, &manifest, ref_name)
}

/// `have` (an annotation) names `want`: equal, or `want` has no tag and
/// `have` is `want:latest`.
fn names_match(have: &str, want: &str) -> bool {
    if have == want {
        return true;
    }
    let last = want.rsplit('/').next().unwrap_or(want);
    !last.contains(':') && !want.contains('@') && have.strip_suffix(":latest") == Some(want)
}

fn names_of(descs: &[&Descriptor]) -> String {
    let names: Vec<&str> =
        descs.iter().filter_map(|d| d.annotation(REF_NAME).or_else(|| d.annotation(CONTAINERD_NAME))).collect();
    if names.is_empty() { "no named images".into() } else { names.join(", ") }
}

/// The entry of the top-level index to read: the only one, the one of
/// forkd's platform among a multi-arch set, or one of several that are all
/// the same manifest.
fn choose_top<'a>(candidates: &[&'a Descriptor]) -> Result<&'a Descriptor, ImageError> {
    if let [only] = candidates {
        return Ok(*only);
    }
    if candidates.iter().all(|d| d.platform.is_some()) {
        return choose_platform(candidates, "index.json");
    }
    if candidates.iter().all(|d| d.digest == candidates[0].digest) {
        return Ok(candidates[0]);
    }
    Err(ImageError::Invalid(format!(
        "the layout holds {} images ({}): name the one to import",
        candidates.len(),
        names_of(candidates)
    )))
}

fn choose_platform<'a>(candidates: &[&'a Descriptor], what: &str) -> Result<&'a Descriptor, ImageError> {
    let fits: Vec<&Descriptor> = candidates
        .iter()
        .copied()
        .filter(|d| d.platform.as_ref().is_some_and(|p| p.os == OS && p.architecture == ARCH))
        .collect();
    // Plain amd64 first, then any variant (v2, v3: all run on forkd's CPU
    // model only if it has them, so the baseline is the safe pick).
    let plain =
        fits.iter().find(|d| d.platform.as_ref().is_some_and(|p| p.variant.as_deref().unwrap_or("").is_empty()));
    plain.or(fits.first()).copied().ok_or_else(|| {
        let have: Vec<String> = candidates.iter().map(|d| d.platform_text()).collect();
        ImageError::Invalid(format!("{what} has no {OS}/{ARCH} image (it has: {})", have.join(", ")))
    })
}

fn media_kind(declared: Option<&str>, bytes: &[u8], what: &str) -> Result<&'static str, ImageError> {
    let probe: Probe = parse(what, bytes)?;
    if let (Some(d), Some(inner)) = (declared, probe.media_type.as_deref())
        && d != inner
    {
        return Err(ImageError::Invalid(format!("{what}: its descriptor says {d} but the document says {inner}")));
    }
    let mt = declared.or(probe.media_type.as_deref());
    match mt {
        Some(OCI_INDEX) | Some(DOCKER_LIST) => Ok(OCI_INDEX),
        Some(OCI_MANIFEST) | Some(DOCKER_MANIFEST) => Ok(OCI_MANIFEST),
        Some(other) => {
            Err(ImageError::Invalid(format!("{what}: media type {other} is not an image manifest or index")))
        }
        None if probe.manifests.is_some() => Ok(OCI_INDEX),
        None if probe.config.is_some() => Ok(OCI_MANIFEST),
        None => Err(ImageError::Invalid(format!("{what}: neither an image manifest nor an index"))),
    }
}

/// The image manifest `desc` leads to (through nested indexes, taking
/// forkd's platform), with its digest.
fn resolve_manifest(layout: &Layout, desc: &Descriptor, depth: usize) -> Result<(String, Manifest), ImageError> {
    if depth > MAX_NESTING {
        return Err(ImageError::Invalid("indexes nested too deep".into()));
    }
    let what = format!("manifest {}", desc.digest);
    let (_, bytes) = layout.blob(&what, desc, Some(MAX_MANIFEST))?;
    let bytes = bytes.unwrap_or_default();
    match media_kind(desc.media_type.as_deref(), &bytes, &what)? {
        OCI_INDEX => {
            let index: Index = parse(&what, &bytes)?;
            let all: Vec<&Descriptor> = index.manifests.iter().flatten().filter(|d| !d.is_attestation()).collect();
            let next = match all.as_slice() {
                [] => return Err(ImageError::Invalid(format!("index {} lists no image", desc.digest))),
                [only] if only.platform.is_none() => *only,
                _ => choose_platform(&all, &format!("index {}", desc.digest))?,
            };
            resolve_manifest(layout, next, depth + 1)
        }
        _ => {
            let manifest: Manifest = parse(&what, &bytes)?;
            Ok((desc.digest.clone(), manifest))
        }
    }
}

fn image_from_manifest(
    layout: &Layout,
    digest: String,
    manifest: &Manifest,
    ref_name: Option<String>,
) -> Result<SourceImage, ImageError> {
    let cdesc = &manifest.config;
    if let Some(mt) = cdesc.media_type.as_deref()
        && mt != OCI_CONFIG
        && mt != DOCKER_CONFIG
    {
        return Err(ImageError::Invalid(format!("manifest {digest}: config type {mt} is not a container image")));
    }
    let (_, bytes) = layout.blob("config", cdesc, Some(MAX_CONFIG))?;
    let image: ImageJson = parse("image config", &bytes.unwrap_or_default())?;
    let descs = manifest.layers.as_deref().unwrap_or_default();
    if descs.len() > MAX_LAYERS {
        return Err(ImageError::Invalid(format!("manifest {digest}: {} layers, over {MAX_LAYERS}", descs.len())));
    }
    check_diff_ids(&image, descs.len())?;
    let mut layers = Vec::with_capacity(descs.len());
    for (i, d) in descs.iter().enumerate() {
        let mt = d.media_type.as_deref().unwrap_or("");
        if !LAYER_TYPES.contains(&mt) {
            return Err(ImageError::Invalid(format!(
                "layer {} ({}): media type {mt:?} is not supported",
                i + 1,
                d.digest
            )));
        }
        let (path, _) = layout.blob(&format!("layer {}", i + 1), d, None)?;
        layers.push(LayerBlob { path, media_type: mt.to_string(), digest: d.digest.clone(), size: d.size });
    }
    Ok(SourceImage { digest, config: image_config(&image)?, layers, ref_name })
}

fn check_diff_ids(image: &ImageJson, layers: usize) -> Result<(), ImageError> {
    let ids = image.rootfs.as_ref().and_then(|r| r.diff_ids.as_ref());
    match ids {
        Some(ids) if !ids.is_empty() && ids.len() != layers => Err(ImageError::Invalid(format!(
            "the image config lists {} layers (rootfs.diff_ids) but the manifest has {layers}",
            ids.len()
        ))),
        _ => Ok(()),
    }
}

/// The parts of the image config forkd runs with; an image for another
/// platform is refused.
fn image_config(image: &ImageJson) -> Result<ImageConfig, ImageError> {
    let os = image.os.as_deref().unwrap_or("");
    let arch = image.architecture.as_deref().unwrap_or("");
    if (!os.is_empty() && os != OS) || (!arch.is_empty() && arch != ARCH) {
        return Err(ImageError::Invalid(format!("the image is for {os}/{arch}; forkd runs {OS}/{ARCH}")));
    }
    let c = image.config.as_ref();
    Ok(ImageConfig {
        env: c.and_then(|c| c.env.clone()).unwrap_or_default(),
        working_dir: c.and_then(|c| c.working_dir.clone()).unwrap_or_default(),
        user: c.and_then(|c| c.user.clone()).unwrap_or_default(),
        entrypoint: c.and_then(|c| c.entrypoint.clone()).unwrap_or_default(),
        cmd: c.and_then(|c| c.cmd.clone()).unwrap_or_default(),
        labels: c.and_then(|c| c.labels.clone()).unwrap_or_default(),
    })
}

// ---- docker save --------------------------------------------------------------

fn read_docker(layout: &Layout, name: Option<&str>) -> Result<SourceImage, ImageError> {
    let bytes = layout
        .read_small("manifest.json", MAX_MANIFEST)?
        .ok_or_else(|| ImageError::Invalid("manifest.json is missing".into()))?;
    let images: Vec<DockerImage> = parse("manifest.json", &bytes)?;
    let tags = |i: &DockerImage| i.repo_tags.clone().unwrap_or_default();
    let all_tags = || {
        let t: Vec<String> = images.iter().flat_map(tags).collect();
        if t.is_empty() { "no tags".to_string() } else { t.join(", ") }
    };
    let (image, ref_name) = match name {
        Some(n) => {
            let found = images.iter().find_map(|i| tags(i).into_iter().find(|t| names_match(t, n)).map(|t| (i, t)));
            let (image, _tag) = found.ok_or_else(|| {
                ImageError::NotFound(format!("no image tagged {n:?} in the archive (it has: {})", all_tags()))
            })?;
            (image, Some(n.to_string()))
        }
        None => match images.as_slice() {
            [] => return Err(ImageError::Invalid("manifest.json lists no image".into())),
            [only] => (only, tags(only).into_iter().next()),
            _ => {
                return Err(ImageError::Invalid(format!(
                    "the archive holds {} images ({}): name the one to import",
                    images.len(),
                    all_tags()
                )));
            }
        },
    };

    let (config_bytes, config_hex) = read_named(layout, &image.config, "config", Some(MAX_CONFIG))?;
    let config: ImageJson = parse("image config", &config_bytes.unwrap_or_default())?;
    let paths = image.layers.as_deref().unwrap_or_default();
    if paths.len() > MAX_LAYERS {
        return Err(ImageError::Invalid(format!("{} layers, over {MAX_LAYERS}", paths.len())));
    }
    check_diff_ids(&config, paths.len())?;
    let diff_ids = config.rootfs.as_ref().and_then(|r| r.diff_ids.clone()).unwrap_or_default();
    let mut layers = Vec::with_capacity(paths.len());
    for (i, rel) in paths.iter().enumerate() {
        let what = format!("layer {} ({rel})", i + 1);
        let (file, path) =
            layout.open_file(rel)?.ok_or_else(|| ImageError::Invalid(format!("{what} is not in the archive")))?;
        let mut head = [0u8; 8];
        let n = file.read_at(&mut head, 0).map_err(|e| ImageError::io(format!("read {}", path.display()), e))?;
        let head = &head[..n];
        let size = file.metadata().map_err(|e| ImageError::io(format!("stat {}", path.display()), e))?.len();
        let (hex, _, _) =
            hash_file(file, size, false).map_err(|e| ImageError::io(format!("read {}", path.display()), e))?;
        if let Some(named) = blob_name_hex(rel)
            && named != hex
        {
            return Err(ImageError::Invalid(format!("{what}: the content is sha256:{hex}, not what its name says")));
        }
        // An uncompressed layer's digest is its diff_id: check it when the
        // config lists them.
        let plain = matches!(layers::codec("", head), Ok(Codec::Plain));
        if plain
            && let Some(want) = diff_ids.get(i)
            && *want != format!("sha256:{hex}")
        {
            return Err(ImageError::Invalid(format!(
                "{what}: the content is sha256:{hex} but the config's diff_id is {want}"
            )));
        }
        layers.push(LayerBlob { path, media_type: DOCKER_LAYER.to_string(), digest: format!("sha256:{hex}"), size });
    }
    Ok(SourceImage { digest: format!("sha256:{config_hex}"), config: image_config(&config)?, layers, ref_name })
}

/// The hex digest a file name of `docker save` states: `blobs/sha256/<hex>`
/// or `<hex>.json`.
fn blob_name_hex(rel: &str) -> Option<String> {
    let norm = normalise(rel)?;
    let base = norm.rsplit('/').next()?;
    let hex = base.strip_suffix(".json").unwrap_or(base);
    let named = norm.starts_with("blobs/sha256/") || base.ends_with(".json");
    (named && sha256_hex(&format!("sha256:{hex}")).is_some()).then(|| hex.to_string())
}

/// A file `docker save` names by path: its content (with `max`) and its
/// sha256, checked against its name when the name is a digest.
fn read_named(
    layout: &Layout,
    rel: &str,
    what: &str,
    max: Option<u64>,
) -> Result<(Option<Vec<u8>>, String), ImageError> {
    let (file, path) =
        layout.open_file(rel)?.ok_or_else(|| ImageError::Invalid(format!("{what} {rel:?} is not in the archive")))?;
    let size = file.metadata().map_err(|e| ImageError::io(format!("stat {}", path.display()), e))?.len();
    if let Some(max) = max
        && size > max
    {
        return Err(ImageError::Invalid(format!("{what} {rel:?}: {size} bytes, over the {max} allowed")));
    }
    let (hex, _, content) =
        hash_file(file, size, max.is_some()).map_err(|e| ImageError::io(format!("read {}", path.display()), e))?;
    if let Some(named) = blob_name_hex(rel)
        && named != hex
    {
        return Err(ImageError::Invalid(format!(
            "{what} {rel:?}: the content is sha256:{hex}, not what its name says"
        )));
    }
    Ok((content, hex))
}

// ---- archives -----------------------------------------------------------------

/// Unpacks the archive at `path` into `scratch`: directories and regular
/// files only, every path checked and created below `scratch` without
/// following anything; symlinks and hard links between members become
/// aliases resolved by name. Device nodes and FIFOs are refused.
fn unpack_archive(path: &Path, scratch: &Path) -> Result<Layout, ImageError> {
    std::fs::create_dir_all(scratch).map_err(|e| ImageError::io(format!("create {}", scratch.display()), e))?;
    let file = File::open(path).map_err(|e| ImageError::io(format!("open {}", path.display()), e))?;
    let len = file.metadata().map_err(|e| ImageError::io(format!("stat {}", path.display()), e))?.len();
    let mut buffered = BufReader::with_capacity(1 << 16, file);
    let head = buffered.fill_buf().map_err(|e| ImageError::io(format!("read {}", path.display()), e))?;
    let codec = layers::codec("", &head[..head.len().min(8)])
        .map_err(|why| ImageError::Invalid(format!("{}: {why}", path.display())))?;
    let limit = if codec == Codec::Plain { len } else { MAX_ARCHIVE_BYTES };
    let stream =
        layers::decoder(codec, buffered).map_err(|e| ImageError::Invalid(format!("{}: {e}", path.display())))?;
    let meter = Rc::new(Meter::new(limit));
    let mut archive = tar::Archive::new(Metered { inner: stream, meter: meter.clone() });
    let tree = Tree::open(scratch)?;
    let mut aliases = HashMap::new();
    let mut count = 0u64;
    let bad_stream = |e: io::Error| match meter.tripped() {
        Some(why) => ImageError::Invalid(format!("{}: {why}", path.display())),
        None => ImageError::Invalid(format!("{}: not a readable tar archive: {e}", path.display())),
    };
    for entry in archive.entries().map_err(bad_stream)? {
        let mut entry = entry.map_err(bad_stream)?;
        meter.allow_entry(entry.size().max(entry.header().entry_size().unwrap_or(0)));
        count += 1;
        if count > MAX_ARCHIVE_ENTRIES {
            return Err(ImageError::Invalid(format!("{}: more than {MAX_ARCHIVE_ENTRIES} members", path.display())));
        }
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let ctx = format!("{}: member {shown:?}", path.display());
        let bad = |why: String| ImageError::Invalid(format!("{ctx}: {why}"));
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader | EntryType::XHeader) {
            continue;
        }
        let comps = split_path(&raw).map_err(bad)?;
        match kind {
            EntryType::Directory => {
                tree.dir(&comps, true).map_err(|e| within(&ctx, e))?;
            }
            EntryType::Regular | EntryType::Continuous => {
                let Some((name, parent)) = comps.split_last() else {
                    return Err(bad("a file at the root".into()));
                };
                let dir = tree.dir(parent, true).map_err(|e| within(&ctx, e))?.expect("created when missing");
                if let Some(st) = stat_at(dir.as_fd(), name)? {
                    if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                        return Err(bad("a file where a directory is".into()));
                    }
                    unlinkat(dir.as_fd(), *name, UnlinkatFlags::NoRemoveDir).map_err(|e| host("remove", e))?;
                }
                let fd: OwnedFd = openat(
                    dir.as_fd(),
                    *name,
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(|e| host("create", e))?;
                let mut out = File::from(fd);
                let mut left = entry.size();
                let mut buf = vec![0u8; 1 << 16];
                while left > 0 {
                    let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let n = match entry.read(&mut buf[..want]) {
                        Ok(0) => return Err(bad("the archive ends inside this member".into())),
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(bad_stream(e)),
                    };
                    out.write_all(&buf[..n]).map_err(|e| host_io("write", e))?;
                    left -= n as u64;
                }
            }
            EntryType::Symlink | EntryType::Link => {
                let target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                let target = String::from_utf8_lossy(&target).into_owned();
                let member = show(&comps);
                let resolved =
                    if kind == EntryType::Link { normalise(&target) } else { resolve_relative(&comps, &target) };
                // A link that leaves the archive names nothing in it.
                if let Some(r) = resolved {
                    aliases.insert(member, r);
                }
            }
            _ => return Err(bad("only files, directories and links belong in an image archive".into())),
        }
    }
    Layout::open(scratch, aliases)
}

/// A symlink `target` of the member at `comps`, as a path from the
/// archive's root; None when it is absolute or climbs out.
fn resolve_relative(comps: &[&[u8]], target: &str) -> Option<String> {
    if target.starts_with('/') {
        return None;
    }
    let mut out: Vec<&str> =
        comps[..comps.len().saturating_sub(1)].iter().map(|c| std::str::from_utf8(c).ok()).collect::<Option<_>>()?;
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    (!out.is_empty()).then(|| out.join("/"))
}

#[cfg(test)]
#[path = "tests/source.rs"]
mod tests;
