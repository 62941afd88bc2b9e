//! Paths under the data dir. Every path is built from a validated name
//! (`Tag`, `SandboxId`), so nothing outside the data dir is ever touched.
//!
//! ```text
//! <data>/forkd.db                 state store (SQLite, WAL)
//! <data>/snapshots/<tag>/mem      guest RAM (flat)
//! <data>/snapshots/<tag>/state    device + CPU state, no RAM
//! <data>/staging/<tag>.<nonce>/   a snapshot being written
//! <data>/sandboxes/<id>/          a running VM's sockets and logs
//! <data>/trash/                   removed directories awaiting deletion
//! <data>/volume-slot.img          placeholder disk behind spare volume slots
//! ```

use std::path::{Path, PathBuf};

use forkd_api::names::{SandboxId, Tag};

/// Size of the slot placeholder (sparse; never written).
const VOLUME_SLOT_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// Creates the directory skeleton.
    pub fn create(&self) -> std::io::Result<()> {
        for d in [self.snapshots_dir(), self.staging_dir(), self.sandboxes_dir(), self.trash_dir()] {
            std::fs::create_dir_all(d)?;
        }
        let slot = self.volume_slot_placeholder();
        if !slot.exists() {
            // Staged and renamed: a half-made placeholder never has its name.
            let staged = self.staging_dir().join(format!("volume-slot.{}", crate::core::ids::nonce()));
            std::fs::File::create(&staged)?.set_len(VOLUME_SLOT_BYTES)?;
            std::fs::rename(&staged, &slot)?;
        }
        Ok(())
    }

    /// The sparse, never-mounted disk that spare volume slots point at until
    /// a child plugs a volume in.
    pub fn volume_slot_placeholder(&self) -> PathBuf {
        self.root.join("volume-slot.img")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn db(&self) -> PathBuf {
        self.root.join("forkd.db")
    }
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }
    pub fn staging_dir(&self) -> PathBuf {
        self.root.join("staging")
    }
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.root.join("sandboxes")
    }
    pub fn trash_dir(&self) -> PathBuf {
        self.root.join("trash")
    }
    pub fn snapshot_dir(&self, tag: &Tag) -> PathBuf {
        self.snapshots_dir().join(tag.as_str())
    }
    pub fn staging_for(&self, tag: &Tag, nonce: &str) -> PathBuf {
        self.staging_dir().join(format!("{}.{nonce}", tag.as_str()))
    }
    pub fn sandbox_dir(&self, id: &SandboxId) -> PathBuf {
        self.sandboxes_dir().join(id.as_str())
    }

    /// Removes a directory by first renaming it into the trash (atomic: it
    /// is either in place or gone from its name), then deleting it.
    pub fn remove_dir(&self, dir: &Path) -> std::io::Result<()> {
        crate::core::blocking::run(|| self.remove_dir_now(dir))
    }

    fn remove_dir_now(&self, dir: &Path) -> std::io::Result<()> {
        if !dir.exists() {
            return Ok(());
        }
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let target = self.trash_dir().join(format!("{name}.{}", crate::core::ids::nonce()));
        match std::fs::rename(dir, &target) {
            Ok(()) => std::fs::remove_dir_all(&target),
            // Another filesystem (e.g. a mount over the staging dir): delete in place.
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => std::fs::remove_dir_all(dir),
            Err(e) => Err(e),
        }
    }
}

/// Bytes a file or directory tree occupies on disk (allocated blocks).
pub fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    if meta.is_dir() {
        std::fs::read_dir(path).map(|rd| rd.flatten().map(|e| disk_usage(&e.path())).sum()).unwrap_or(0)
    } else {
        meta.blocks() * 512
    }
}
