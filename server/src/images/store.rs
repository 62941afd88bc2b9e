//! The image store: `<data>/images/<hex>/` holds an image's `rootfs.ext4`
//! and `image.json` (its record), and `<data>/images/names.json` maps names
//! to digests. An image directory is complete before it is renamed into
//! place, and the names file is replaced atomically, so a crash leaves
//! either the old store or the new one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ImageConfig, ImageError};

/// The longest image name.
const MAX_NAME: usize = 255;

/// What the store knows of an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub digest: String,
    /// "import", "pull" or "build".
    pub source: String,
    pub origin: String,
    pub size_bytes: u64,
    pub created_at_unix: i64,
    pub config: ImageConfig,
    /// "python" when the image has python3, else "".
    pub runtime: String,
    #[serde(default)]
    pub owner: String,
}

/// A name for an image: a registry-style reference (`team/app:1`,
/// `localhost:5000/x/y@sha256:…`) or a plain word; printable ASCII without
/// spaces, at most 255 bytes, never a bare digest.
pub fn check_name(name: &str) -> Result<(), ImageError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/:@+".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && !name.contains("..")
        && !name.starts_with("sha256:");
    if ok {
        Ok(())
    } else {
        Err(ImageError::Invalid(format!(
            "image name {name:?} must be 1–{MAX_NAME} of [A-Za-z0-9._-/:@+], start with a letter or digit, \
             and not be a digest"
        )))
    }
}

/// `sha256:<64 hex>`.
pub fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
}

pub struct ImageStore {
    dir: PathBuf,
    /// Serialises changes to the names file.
    lock: std::sync::Mutex<()>,
}

impl ImageStore {
    pub fn new(dir: PathBuf) -> Self {
        ImageStore { dir, lock: std::sync::Mutex::new(()) }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn image_dir(&self, digest: &str) -> PathBuf {
        self.dir.join(digest.trim_start_matches("sha256:"))
    }

    pub fn rootfs(&self, digest: &str) -> PathBuf {
        self.image_dir(digest).join("rootfs.ext4")
    }

    /// A fresh staging directory under the store (same file system, so the
    /// finished image can be renamed into place).
    pub fn staging(&self) -> Result<PathBuf, ImageError> {
        let dir = self.dir.join(".staging").join(crate::core::ids::nonce());
        std::fs::create_dir_all(&dir).map_err(|e| ImageError::io(format!("create {}", dir.display()), e))?;
        Ok(dir)
    }

    /// Removes staging directories left by a crash (called at start).
    pub fn clean_staging(&self) {
        let _ = std::fs::remove_dir_all(self.dir.join(".staging"));
    }

    fn names(&self) -> BTreeMap<String, String> {
        std::fs::read(self.dir.join("names.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn write_names(&self, names: &BTreeMap<String, String>) -> Result<(), ImageError> {
        let path = self.dir.join("names.json");
        let tmp = self.dir.join(format!(".names.json.{}", crate::core::ids::nonce()));
        let body = serde_json::to_vec_pretty(names).expect("names serialise");
        std::fs::write(&tmp, body).map_err(|e| ImageError::io("write the image names", e))?;
        std::fs::rename(&tmp, &path).map_err(|e| ImageError::io("replace the image names", e))
    }

    fn read_record(&self, digest: &str) -> Option<ImageRecord> {
        let b = std::fs::read(self.image_dir(digest).join("image.json")).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// The digest a name or digest refers to, if the store has it.
    pub fn resolve(&self, name_or_digest: &str) -> Option<String> {
        let digest = if is_digest(name_or_digest) {
            name_or_digest.to_string()
        } else {
            self.names().get(name_or_digest)?.clone()
        };
        self.image_dir(&digest).join("image.json").is_file().then_some(digest)
    }

    /// An image and its names.
    pub fn get(&self, name_or_digest: &str) -> Option<(ImageRecord, Vec<String>)> {
        let digest = self.resolve(name_or_digest)?;
        let rec = self.read_record(&digest)?;
        let names = self.names().into_iter().filter(|(_, d)| *d == digest).map(|(n, _)| n).collect();
        Some((rec, names))
    }

    /// Every image with its names, newest first.
    pub fn list(&self) -> Vec<(ImageRecord, Vec<String>)> {
        let names = self.names();
        let mut out = vec![];
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return out };
        for e in rd.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let digest = format!("sha256:{file}");
            if !is_digest(&digest) {
                continue;
            }
            if let Some(rec) = self.read_record(&digest) {
                let n = names.iter().filter(|(_, d)| **d == digest).map(|(n, _)| n.clone()).collect();
                out.push((rec, n));
            }
        }
        out.sort_by(|a, b| b.0.created_at_unix.cmp(&a.0.created_at_unix).then(a.0.digest.cmp(&b.0.digest)));
        out
    }

    /// Moves a finished image (`rootfs` written in a staging dir) into the
    /// store under `rec.digest` and points `names` at it. An image already
    /// present keeps its files; the names move.
    pub fn put(&self, rootfs: &Path, rec: &ImageRecord, names: &[String]) -> Result<(), ImageError> {
        for n in names {
            check_name(n)?;
        }
        if !is_digest(&rec.digest) {
            return Err(ImageError::Invalid(format!("bad image digest {:?}", rec.digest)));
        }
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let dest = self.image_dir(&rec.digest);
        if !dest.join("image.json").is_file() {
            let stage = rootfs.parent().ok_or_else(|| ImageError::Invalid("rootfs has no directory".into()))?;
            let body = serde_json::to_vec_pretty(rec).expect("record serialises");
            std::fs::write(stage.join("image.json"), body).map_err(|e| ImageError::io("write image.json", e))?;
            if rootfs.file_name() != Some(std::ffi::OsStr::new("rootfs.ext4")) {
                std::fs::rename(rootfs, stage.join("rootfs.ext4")).map_err(|e| ImageError::io("stage rootfs", e))?;
            }
            let _ = std::fs::remove_dir_all(&dest);
            std::fs::rename(stage, &dest).map_err(|e| ImageError::io(format!("store image {}", rec.digest), e))?;
        }
        let mut all = self.names();
        for n in names {
            all.insert(n.clone(), rec.digest.clone());
        }
        self.write_names(&all)
    }

    /// Removes a name (when `name_or_digest` is a name that another name
    /// also points at's image keeps) or the whole image. `in_use` says
    /// whether a snapshot uses a digest; such an image is refused.
    pub fn remove(
        &self,
        name_or_digest: &str,
        in_use: &dyn Fn(&str) -> Vec<String>,
    ) -> Result<(String, bool), ImageError> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let digest = self
            .resolve(name_or_digest)
            .ok_or_else(|| ImageError::NotFound(format!("image {name_or_digest:?} not found")))?;
        let mut all = self.names();
        let others = all.iter().filter(|(n, d)| **d == digest && n.as_str() != name_or_digest).count();
        if !is_digest(name_or_digest) && others > 0 {
            all.remove(name_or_digest);
            self.write_names(&all)?;
            return Ok((digest, false));
        }
        let users = in_use(&digest);
        if !users.is_empty() {
            return Err(ImageError::Precondition(format!(
                "image {name_or_digest:?} is used by snapshot(s) {}: delete them first",
                users.join(", ")
            )));
        }
        all.retain(|_, d| *d != digest);
        // Out of the store first (a rename), then deleted.
        let doomed = self.dir.join(".staging").join(format!("rm-{}", crate::core::ids::nonce()));
        std::fs::create_dir_all(doomed.parent().expect("parent")).map_err(|e| ImageError::io("staging", e))?;
        std::fs::rename(self.image_dir(&digest), &doomed).map_err(|e| ImageError::io("remove image", e))?;
        self.write_names(&all)?;
        let _ = std::fs::remove_dir_all(&doomed);
        Ok((digest, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(d: &str) -> ImageRecord {
        ImageRecord {
            digest: d.into(),
            source: "import".into(),
            origin: String::new(),
            size_bytes: 3,
            created_at_unix: 1,
            config: ImageConfig::default(),
            runtime: String::new(),
            owner: String::new(),
        }
    }

    #[test]
    fn names_are_checked() {
        for ok in ["app", "team/app:1", "localhost:5000/x/y", "reg.example.com/a/b@sha256:abc"] {
            check_name(ok).unwrap();
        }
        for bad in ["", "/abs", "a b", "../x", "sha256:0", "-x", &"a".repeat(256)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn put_get_rename_and_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::new(tmp.path().join("images"));
        let d = format!("sha256:{}", "a".repeat(64));
        let stage = store.staging().unwrap();
        std::fs::write(stage.join("rootfs.ext4"), b"abc").unwrap();
        store.put(&stage.join("rootfs.ext4"), &rec(&d), &["one".into(), "two".into()]).unwrap();
        assert!(!stage.exists());
        let (r, names) = store.get("one").unwrap();
        assert_eq!((r.digest.as_str(), names.len()), (d.as_str(), 2));
        assert!(store.get(&d).is_some());
        assert_eq!(store.list().len(), 1);
        // Removing one of two names keeps the image.
        assert_eq!(store.remove("one", &|_| vec![]).unwrap(), (d.clone(), false));
        // In use: refused.
        let e = store.remove("two", &|_| vec!["snap".into()]).unwrap_err();
        assert!(matches!(e, ImageError::Precondition(_)), "{e}");
        assert_eq!(store.remove("two", &|_| vec![]).unwrap(), (d.clone(), true));
        assert!(store.get(&d).is_none());
        assert!(matches!(store.remove("two", &|_| vec![]).unwrap_err(), ImageError::NotFound(_)));
    }
}
