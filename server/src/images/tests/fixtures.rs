//! Test fixtures for the image readers: layer tars, OCI layouts and
//! `docker save` archives, built by hand with the tar crate (names are
//! written raw, so hostile ones can be made too).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tar::{Builder, EntryType, Header};

use crate::images::layers::apply_layers;
use crate::images::{ImportLimits, LayerBlob};

pub const MTIME: u64 = 1_700_000_000;
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

pub fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A layer tar being written.
pub struct Tar {
    b: Builder<Vec<u8>>,
}

impl Default for Tar {
    fn default() -> Self {
        Tar::new()
    }
}

impl Tar {
    pub fn new() -> Tar {
        Tar { b: Builder::new(Vec::new()) }
    }

    /// A header with `path` written as is (no checks of the tar crate).
    pub fn header(kind: EntryType, path: &[u8], mode: u32, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h.set_size(size);
        let name = &mut h.as_old_mut().name;
        assert!(path.len() <= name.len(), "fixture paths are short");
        name[..path.len()].copy_from_slice(path);
        h
    }

    pub fn append(mut self, mut h: Header, data: &[u8]) -> Tar {
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    pub fn dir(self, path: &str, mode: u32) -> Tar {
        let h = Tar::header(EntryType::Directory, path.as_bytes(), mode, 0);
        self.append(h, b"")
    }

    pub fn file(self, path: &str, content: &[u8]) -> Tar {
        self.file_as(path, content, 0o644, 0, 0)
    }

    pub fn file_as(self, path: &str, content: &[u8], mode: u32, uid: u64, gid: u64) -> Tar {
        let mut h = Tar::header(EntryType::Regular, path.as_bytes(), mode, content.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.append(h, content)
    }

    pub fn symlink(self, path: &str, target: &str) -> Tar {
        let mut h = Tar::header(EntryType::Symlink, path.as_bytes(), 0o777, 0);
        h.set_link_name_literal(target).unwrap();
        self.append(h, b"")
    }

    pub fn hardlink(self, path: &str, target: &str) -> Tar {
        let mut h = Tar::header(EntryType::Link, path.as_bytes(), 0o644, 0);
        h.set_link_name_literal(target).unwrap();
        self.append(h, b"")
    }

    pub fn device(self, path: &str, kind: EntryType, major: u32, minor: u32) -> Tar {
        let mut h = Tar::header(kind, path.as_bytes(), 0o666, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.append(h, b"")
    }

    /// PAX records for the next entry.
    pub fn pax(mut self, records: &[(&str, &[u8])]) -> Tar {
        self.b.append_pax_extensions(records.iter().copied()).unwrap();
        self
    }

    pub fn bytes(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

pub fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).unwrap()
}

/// A layer tar holding one file of `size` zero bytes, gzip'd as a chain of
/// gzip members (one 1 MiB member of zeros repeated), so making it costs
/// next to nothing. `size` is a multiple of 1 MiB.
pub fn zero_file_gzip(path: &str, size: u64) -> Vec<u8> {
    assert_eq!(size % (1 << 20), 0);
    let mut h = Tar::header(EntryType::Regular, path.as_bytes(), 0o644, size);
    h.set_cksum();
    let mut out = gzip(h.as_bytes());
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(&vec![0u8; 1 << 20]).unwrap();
    let chunk = e.finish().unwrap();
    for _ in 0..size >> 20 {
        out.extend_from_slice(&chunk);
    }
    out.extend_from_slice(&gzip(&[0u8; 1024]));
    out
}

/// `bytes` as a blob file in `dir`, described as a layer of `media_type`.
pub fn layer_blob(dir: &Path, bytes: &[u8], media_type: &str) -> LayerBlob {
    std::fs::create_dir_all(dir).unwrap();
    let hex = sha(bytes);
    let path = dir.join(&hex);
    std::fs::write(&path, bytes).unwrap();
    LayerBlob { path, media_type: media_type.into(), digest: format!("sha256:{hex}"), size: bytes.len() as u64 }
}

/// The image config the fixtures use, listing `diff_ids` (uncompressed
/// layer tars).
pub fn config_json(arch: &str, layers: &[&[u8]]) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| format!("sha256:{}", sha(l))).collect();
    serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "APP=forkd"],
            "WorkingDir": "/srv/app",
            "User": "1000:1000",
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo hello"],
            "Labels": {"org.example.team": "images"},
            "ExposedPorts": {"80/tcp": {}}
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "fixture"}]
    }))
    .unwrap()
}

/// An OCI image layout being written.
pub struct Oci {
    pub dir: PathBuf,
}

impl Oci {
    pub fn new(dir: &Path) -> Oci {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Oci { dir: dir.to_path_buf() }
    }

    /// Stores `bytes` as a blob; answers its descriptor.
    pub fn blob(&self, media_type: &str, bytes: &[u8]) -> Value {
        let hex = sha(bytes);
        std::fs::write(self.dir.join("blobs/sha256").join(&hex), bytes).unwrap();
        json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len()})
    }

    /// An image of `layers` ((media type, blob, uncompressed tar)) for
    /// `arch`; answers the manifest's descriptor.
    pub fn image(&self, arch: &str, layers: &[(&str, Vec<u8>, Vec<u8>)]) -> Value {
        let tars: Vec<&[u8]> = layers.iter().map(|(_, _, t)| t.as_slice()).collect();
        let config = self.blob(OCI_CONFIG, &config_json(arch, &tars));
        let layer_descs: Vec<Value> = layers.iter().map(|(mt, blob, _)| self.blob(mt, blob)).collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config,
            "layers": layer_descs,
        });
        self.blob(OCI_MANIFEST, &serde_json::to_vec(&manifest).unwrap())
    }

    /// A nested index of `manifests`; answers its descriptor.
    pub fn nested_index(&self, manifests: Vec<Value>) -> Value {
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
        self.blob(OCI_INDEX, &serde_json::to_vec(&index).unwrap())
    }

    /// Writes index.json listing `manifests`.
    pub fn index(&self, manifests: Vec<Value>) {
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
        std::fs::write(self.dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    }
}

pub fn with_ref(mut desc: Value, name: &str) -> Value {
    desc["annotations"] = json!({"org.opencontainers.image.ref.name": name});
    desc
}

pub fn with_platform(mut desc: Value, os: &str, arch: &str) -> Value {
    desc["platform"] = json!({"os": os, "architecture": arch});
    desc
}

/// A tar of the directory `dir` (its contents at the archive's root),
/// symlinks kept as symlinks.
pub fn tar_dir(dir: &Path) -> Vec<u8> {
    fn walk(b: &mut Builder<Vec<u8>>, base: &Path, dir: &Path) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for p in entries {
            let rel = p.strip_prefix(base).unwrap();
            b.append_path_with_name(&p, rel).unwrap();
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                walk(b, base, &p);
            }
        }
    }
    let mut b = Builder::new(Vec::new());
    b.follow_symlinks(false);
    walk(&mut b, dir, dir);
    b.into_inner().unwrap()
}

/// What a tree holds: path → `dir`, `file:<content>`, `link:<target>`,
/// or another kind.
pub fn listing(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let what = if ft.is_dir() {
                walk(root, &p, out);
                "dir".to_string()
            } else if ft.is_symlink() {
                format!("link:{}", std::fs::read_link(&p).unwrap().display())
            } else if ft.is_file() {
                format!("file:{}", String::from_utf8_lossy(&std::fs::read(&p).unwrap()))
            } else if ft.is_char_device() {
                format!("char:{}", m.rdev())
            } else if ft.is_fifo() {
                "fifo".to_string()
            } else {
                "other".to_string()
            };
            out.insert(rel, what);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

pub fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Bytes of regular-file content under `root`.
pub fn content_bytes(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                total += m.len();
            }
        }
    }
    total
}

/// The value of xattr `name` on `path` (not followed).
pub fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: NUL-terminated strings and a live buffer of the given size.
    let len = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return None;
    }
    buf.truncate(len as usize);
    Some(buf)
}

/// Applies a layer with setuid, sticky, owners, mtimes, xattrs, hard links
/// and symlinks into `root`; answers `root`.
pub fn kept_attributes_tree(blobs: &Path, root: &Path) -> PathBuf {
    let mut dir_h = Tar::header(EntryType::Directory, b"home/u/", 0o750, 0);
    dir_h.set_uid(1000);
    dir_h.set_gid(1001);
    dir_h.set_mtime(1_500_000_000);
    let mut f_h = Tar::header(EntryType::Regular, b"home/u/f", 0o640, 5);
    f_h.set_uid(1000);
    f_h.set_gid(1001);
    f_h.set_mtime(1_600_000_000);
    let tar = Tar::new()
        .dir("bin/", 0o755)
        .file_as("bin/su", b"#!su", 0o4755, 0, 0)
        .file_as("bin/wall", b"#!wall", 0o2755, 0, 5)
        .dir("tmp/", 0o1777)
        .dir("home/", 0o755)
        .append(dir_h, b"")
        .pax(&[("SCHILY.xattr.user.forkd", b"yes"), ("SCHILY.xattr.trusted.note", b"t")])
        .append(f_h, b"hello")
        .hardlink("home/u/g", "home/u/f")
        .symlink("lib", "usr/lib")
        .bytes();
    let layer = layer_blob(blobs, &gzip(&tar), OCI_LAYER_GZIP);
    apply_layers(&[layer], root, &ImportLimits::default()).unwrap();
    root.to_path_buf()
}

pub fn check_kept_attributes(root: &Path) {
    let meta = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap();
    assert_eq!(meta("bin/su").mode() & 0o7777, 0o4755);
    assert_eq!(meta("bin/wall").mode() & 0o7777, 0o2755);
    assert_eq!(meta("bin/wall").gid(), 5);
    assert_eq!(meta("tmp").permissions().mode() & 0o7777, 0o1777);
    let f = meta("home/u/f");
    assert_eq!((f.uid(), f.gid(), f.mode() & 0o7777), (1000, 1001, 0o640));
    assert_eq!(f.mtime(), 1_600_000_000);
    assert_eq!(f.nlink(), 2);
    assert_eq!(meta("home/u/g").ino(), f.ino());
    let d = meta("home/u");
    assert_eq!((d.uid(), d.gid(), d.mode() & 0o7777), (1000, 1001, 0o750));
    assert_eq!(d.mtime(), 1_500_000_000, "a directory's mtime is set after its content");
    assert_eq!(meta("bin").mtime(), MTIME as i64);
    assert_eq!(xattr(&root.join("home/u/f"), "user.forkd").as_deref(), Some(&b"yes"[..]));
    assert_eq!(xattr(&root.join("home/u/f"), "trusted.note").as_deref(), Some(&b"t"[..]));
    assert_eq!(std::fs::read_link(root.join("lib")).unwrap(), Path::new("usr/lib"));
    assert_eq!(std::fs::read(root.join("home/u/g")).unwrap(), b"hello");
}
