//! Builds OCI images for tests by hand: layers as tar archives written
//! entry by entry, an image config, a manifest, and the image layout
//! (`oci-layout`, `index.json`, `blobs/sha256/…`) or a `docker save`
//! tarball around them.

use std::path::Path;

use sha2::{Digest, Sha256};

/// One entry of a layer.
pub enum Entry {
    Dir(&'static str, u32),
    File(String, Vec<u8>, u32),
    /// Owned by (uid, gid).
    OwnedFile(String, Vec<u8>, u32, u64, u64),
    Symlink(String, String),
    HostFile(String, std::path::PathBuf, u32),
    /// A file whose name is written into the header as is (no checks), for
    /// hostile archives.
    RawName(&'static [u8], Vec<u8>),
}

pub fn layer(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_700_000_000);
        match e {
            Entry::Dir(p, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                b.append_data(&mut h, p, std::io::empty()).unwrap();
            }
            Entry::File(p, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, &data[..]).unwrap();
            }
            Entry::OwnedFile(p, data, mode, uid, gid) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(*uid);
                h.set_gid(*gid);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, &data[..]).unwrap();
            }
            Entry::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.set_mode(0o777);
                b.append_link(&mut h, p, target).unwrap();
            }
            Entry::RawName(name, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                h.as_old_mut().name[..name.len()].copy_from_slice(name);
                h.set_cksum();
                b.append(&h, &data[..]).unwrap();
            }
            Entry::HostFile(p, src, mode) => {
                let data = std::fs::read(src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, &data[..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// A base layer with the host's static busybox and a shell userland.
pub fn busybox_layer() -> Vec<u8> {
    let busybox = std::path::PathBuf::from("/bin/busybox");
    assert!(busybox.is_file(), "/bin/busybox (busybox-static) is needed to build a test image");
    let mut entries = vec![
        Entry::Dir("bin", 0o755),
        Entry::Dir("etc", 0o755),
        Entry::Dir("proc", 0o555),
        Entry::Dir("sys", 0o555),
        Entry::Dir("dev", 0o755),
        Entry::Dir("run", 0o755),
        Entry::Dir("tmp", 0o1777),
        Entry::Dir("root", 0o700),
        Entry::HostFile("bin/busybox".into(), busybox, 0o755),
    ];
    for applet in
        ["sh", "cat", "env", "id", "ls", "pwd", "test", "echo", "mkdir", "sleep", "true", "head", "tr", "stat"]
    {
        entries.push(Entry::Symlink(format!("bin/{applet}"), "busybox".into()));
    }
    entries.push(Entry::File("etc/passwd".into(), b"root:x:0:0:root:/root:/bin/sh\n".to_vec(), 0o644));
    entries.push(Entry::File("etc/group".into(), b"root:x:0:\n".to_vec(), 0o644));
    layer(&entries)
}

pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// An image: its blobs and the manifest that names them.
pub struct Image {
    pub config: Vec<u8>,
    pub layers: Vec<Vec<u8>>,
    pub manifest: Vec<u8>,
}

impl Image {
    pub fn new(layers: Vec<Vec<u8>>, env: &[&str], working_dir: &str, user: &str) -> Image {
        let diff_ids: Vec<String> = layers.iter().map(|l| format!("sha256:{}", sha256_hex(l))).collect();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Env": env, "WorkingDir": working_dir, "User": user, "Cmd": ["sh"], "Labels": {"test": "yes"} },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        }))
        .unwrap();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": format!("sha256:{}", sha256_hex(&config)),
                "size": config.len(),
            },
            "layers": layers.iter().map(|l| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": format!("sha256:{}", sha256_hex(l)),
                "size": l.len(),
            })).collect::<Vec<_>>(),
        }))
        .unwrap();
        Image { config, layers, manifest }
    }

    pub fn manifest_digest(&self) -> String {
        format!("sha256:{}", sha256_hex(&self.manifest))
    }

    /// Writes an OCI image layout into `dir`, tagged `ref_name`.
    pub fn write_layout(&self, dir: &Path, ref_name: &str) {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        for b in [&self.config, &self.manifest].into_iter().chain(self.layers.iter()) {
            std::fs::write(blobs.join(sha256_hex(b)), b).unwrap();
        }
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": self.manifest_digest(),
                "size": self.manifest.len(),
                "annotations": { "org.opencontainers.image.ref.name": ref_name },
            }],
        });
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    }

    /// A `docker save` tarball of the image, tagged `repo_tag`.
    pub fn docker_save(&self, repo_tag: &str) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |path: &str, data: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, path, data).unwrap();
        };
        let config_name = format!("{}.json", sha256_hex(&self.config));
        add(&config_name, &self.config);
        let mut layer_names = vec![];
        for l in &self.layers {
            let name = format!("{}/layer.tar", sha256_hex(l));
            add(&name, l);
            layer_names.push(name);
        }
        let manifest = serde_json::json!([{ "Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names }]);
        add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
        b.into_inner().unwrap()
    }
}

/// A tar of a directory tree (an OCI archive of a layout).
pub fn tar_dir(dir: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", dir).unwrap();
    b.into_inner().unwrap()
}
