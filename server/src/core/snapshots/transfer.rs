//! Snapshots that leave the host and come back: which files of which
//! snapshots an export sends (see `memory::pack` for the archive), and how
//! an archive becomes snapshots here — read into a staging dir, checked
//! against this host (guest assets, accelerator, tags), expanded and
//! verified, then renamed into the store with its records. An import
//! either adds every snapshot it carries or nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use forkd_api::names::Tag;
use tokio::io::AsyncRead;

use crate::core::leases::Resource;
use crate::core::runtime::Runtime;
use crate::core::store::{SnapshotRecord, SnapshotStatus};
use crate::core::{Error, Result, ids};
use crate::memory::digest;
use crate::memory::layout;
use crate::memory::pack::manifest::{FORMAT, FileEntry, GuestDigests, MAX_SNAPSHOTS, Requires, SnapshotEntry};
use crate::memory::pack::write::{Body, Source};
use crate::memory::pack::{self, FileKind, Manifest, PackError};

/// What an export holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportMode {
    /// The snapshot and every ancestor it is a layer over.
    Chain,
    /// The snapshot alone, as one flat image.
    Flat,
    /// Only the snapshot's own layer; the importer must have its parent.
    LayerOnly,
}

/// An export ready to stream: the manifest and the open files.
pub struct ExportPlan {
    pub manifest: Manifest,
    pub sources: Vec<Source>,
}

impl From<PackError> for Error {
    fn from(e: PackError) -> Self {
        match e {
            PackError::Invalid(m) => Error::InvalidArgument(m),
            PackError::Io(e) => Error::internal("snapshot archive", e),
        }
    }
}

/// The guest digests of this host, from the guest dir's manifest.json.
fn guest_digests(guest_dir: &Path, image: &str) -> Result<GuestDigests> {
    let path = guest_dir.join("manifest.json");
    let text = std::fs::read(&path)
        .map_err(|e| Error::FailedPrecondition(format!("{}: {e} (run scripts/build-guest.sh)", path.display())))?;
    let v: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| Error::FailedPrecondition(format!("{}: {e}", path.display())))?;
    let get = |p: &str| v.pointer(p).and_then(|d| d.as_str()).map(|d| format!("sha256:{d}"));
    let missing =
        |what: &str| Error::FailedPrecondition(format!("{} does not give the digest of {what}", path.display()));
    Ok(GuestDigests {
        kernel: get("/kernel/sha256").ok_or_else(|| missing("the kernel"))?,
        initramfs: get("/initramfs/sha256").ok_or_else(|| missing("the initramfs"))?,
        image: match get(&format!("/images/{image}/sha256")) {
            Some(d) => d,
            // Archives name their image by the guest manifest's digest, which
            // only the daemon's own images have.
            None if image.starts_with("sha256:") => {
                return Err(Error::FailedPrecondition(format!(
                    "the snapshot runs image {image} of the image store; archives carry snapshots of the \
                     daemon's own guest images only: make the image on the other host (forkd image pull, \
                     import or build: the same inputs give the same image) and bake the snapshot there"
                )));
            }
            None => return Err(missing(&format!("image {image:?}"))),
        },
    })
}

/// Whether `have`, a snapshot of this host, is ready and holds the memory
/// `digest` names: a snapshot an archive or a pull may build on or reuse.
pub(super) fn ready_with_memory(have: &SnapshotRecord, digest: &str) -> bool {
    have.status == SnapshotStatus::Ready && have.memory_digest == digest
}

/// A record as it travels: nothing of this host (owner, sharing, sizes).
fn portable(mut r: SnapshotRecord) -> SnapshotRecord {
    r.owner = String::new();
    r.shared = false;
    r.physical_size_bytes = 0;
    r.status = SnapshotStatus::Ready;
    r.status_reason = String::new();
    r
}

impl Runtime {
    /// Chooses and opens the files of an export of `tag` (blocking reads
    /// run off the executor). The files are open before anything is sent,
    /// so a deletion meanwhile cannot change the archive.
    pub async fn export_plan(self: &Arc<Self>, tag: &Tag, mode: ExportMode) -> Result<ExportPlan> {
        let top = self.get_snapshot(tag)?;
        if top.status != SnapshotStatus::Ready {
            return Err(Error::FailedPrecondition(format!("snapshot {:?} is {}", tag.as_str(), top.status.as_str())));
        }
        if top.vm.as_ref().is_some_and(|vm| vm.drives.iter().any(|d| !d.slot)) {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {:?} was made with volumes; volumes are host files and do not travel with it",
                tag.as_str()
            )));
        }
        // The chain, top first: each a diff whose layer file is there and
        // whose parent is a ready snapshot here.
        let has_layer =
            |r: &SnapshotRecord| r.kind == "diff" && self.layout.snapshot_dir(&r.tag).join("layer").is_file();
        let parent_of = |r: &SnapshotRecord| -> Option<SnapshotRecord> {
            let p = self.store.get_snapshot(r.parent_tag.as_ref()?.as_str()).ok()??;
            (p.status == SnapshotStatus::Ready).then_some(p)
        };
        let mut chain = vec![top.clone()];
        let mut requires = None;
        match mode {
            ExportMode::Flat => {}
            ExportMode::LayerOnly => {
                let parent = if has_layer(&top) { parent_of(&top) } else { None };
                let Some(parent) = parent else {
                    return Err(Error::FailedPrecondition(format!(
                        "snapshot {:?} is not a layer over a snapshot here; export it whole",
                        tag.as_str()
                    )));
                };
                requires = Some(Requires { tag: parent.tag.clone(), memory_digest: parent.memory_digest.clone() });
            }
            ExportMode::Chain => {
                while chain.len() < MAX_SNAPSHOTS {
                    let last = chain.last().expect("non-empty");
                    match if has_layer(last) { parent_of(last) } else { None } {
                        Some(p) => chain.push(p),
                        None => break,
                    }
                }
            }
        }
        chain.reverse();
        let guest = guest_digests(&self.guest.dir, &top.image)?;
        let layout = self.layout.clone();
        let layered_first = requires.is_some();
        let (entries, sources) = crate::core::blocking::run(move || -> Result<_> {
            let mut entries = vec![];
            let mut sources = vec![];
            for (i, rec) in chain.into_iter().enumerate() {
                let dir = layout.snapshot_dir(&rec.tag);
                let mut rec = portable(rec);
                let layered = i > 0 || layered_first;
                if !layered {
                    // A diff's memory digest is its layer's; a flat image's is
                    // its memory's.
                    if rec.kind == "diff" {
                        rec.memory_digest =
                            digest::sha256_file(&dir.join("mem")).map_err(|e| Error::internal("digest memory", e))?;
                    }
                    rec.kind = if rec.kind == "base" { "base".into() } else { "full".into() };
                    rec.parent_tag = None;
                    rec.parent_memory_digest = String::new();
                }
                let open = |name: &str| {
                    let p = dir.join(name);
                    let f =
                        std::fs::File::open(&p).map_err(|e| Error::internal(&format!("open {}", p.display()), e))?;
                    let len = f.metadata().map_err(|e| Error::internal("stat", e))?.len();
                    Ok::<_, Error>((f, len))
                };
                let t = rec.tag.as_str().to_string();
                let (state, state_len) = open("state")?;
                let state_entry = FileEntry {
                    path: format!("snapshots/{t}/state"),
                    kind: FileKind::State,
                    size: state_len,
                    sha256: rec.state_digest.clone(),
                };
                sources
                    .push(Source { path: state_entry.path.clone(), body: Body::File { file: state, len: state_len } });
                let mem_entry = if layered {
                    let (f, len) = open("layer")?;
                    // A diff's memory digest is its layer's, taken when the
                    // layer was written: no second read of the layer.
                    let sha256 = rec.memory_digest.clone();
                    let e =
                        FileEntry { path: format!("snapshots/{t}/layer"), kind: FileKind::Layer, size: len, sha256 };
                    sources.push(Source { path: e.path.clone(), body: Body::File { file: f, len } });
                    e
                } else {
                    let (f, len) = open("mem")?;
                    let pages = pack::pages::nonzero_pages(&f, len).map_err(|e| Error::internal("scan memory", e))?;
                    let body = Body::Pages { file: f, pages };
                    let e = FileEntry {
                        path: format!("snapshots/{t}/mem.pages"),
                        kind: FileKind::Pages,
                        size: body.size(),
                        sha256: rec.memory_digest.clone(),
                    };
                    sources.push(Source { path: e.path.clone(), body });
                    e
                };
                entries.push(SnapshotEntry { record: rec, files: vec![state_entry, mem_entry] });
            }
            Ok((entries, sources))
        })?;
        let manifest = Manifest {
            format: FORMAT.into(),
            tag: top.tag.clone(),
            snapshots: entries,
            guest,
            requires,
            description: String::new(),
            base_image: String::new(),
        };
        manifest
            .validate()
            .map_err(|e| Error::Internal(format!("the export of {:?} is not valid: {e}", tag.as_str())))?;
        Ok(ExportPlan { manifest, sources })
    }

    /// Refuses an archive this host cannot take, before any file of it is
    /// written: other guest assets or accelerator, tags in use, a missing
    /// parent, not enough disk. Returns the parent memory a layer-only
    /// archive builds on.
    pub(super) fn check_import(&self, m: &Manifest, rename: Option<&Tag>) -> Result<Option<PathBuf>> {
        let local = guest_digests(&self.guest.dir, &m.snapshots[0].record.image).map_err(|_| {
            Error::FailedPrecondition(format!(
                "image {:?} is not on this host: the archive needs it",
                m.snapshots[0].record.image
            ))
        })?;
        for (what, theirs, ours) in [
            ("kernel", &m.guest.kernel, &local.kernel),
            ("initramfs", &m.guest.initramfs, &local.initramfs),
            ("image", &m.guest.image, &local.image),
        ] {
            if theirs != ours {
                let name =
                    if what == "image" { format!("image {:?}", m.snapshots[0].record.image) } else { what.into() };
                return Err(Error::FailedPrecondition(format!(
                    "the archive was made with {name} {theirs}; this host has {ours}"
                )));
            }
        }
        self.resolve_image(&m.snapshots[0].record.image)?;
        let top = &m.snapshots.last().expect("validated").record;
        if top.accel != self.accel.accel.as_str() || top.backend != self.backend.name() {
            return Err(Error::FailedPrecondition(format!(
                "the archive's snapshots run on {} with {}; this host runs {} with {}",
                top.backend,
                top.accel,
                self.backend.name(),
                self.accel.accel.as_str()
            )));
        }
        let n = m.snapshots.len();
        for (i, e) in m.snapshots.iter().enumerate() {
            let tag = if i + 1 == n { rename.unwrap_or(&e.record.tag) } else { &e.record.tag };
            if let Some(have) = self.store.get_snapshot(tag.as_str())? {
                // An ancestor this host already has, byte for byte, is reused.
                if i + 1 < n && ready_with_memory(&have, &e.record.memory_digest) {
                    continue;
                }
                return Err(Error::AlreadyExists(format!(
                    "snapshot {:?} already exists here{}",
                    tag.as_str(),
                    if i + 1 == n { "; import it under another tag" } else { " with other contents" }
                )));
            }
        }
        let parent = match &m.requires {
            None => None,
            Some(q) => match self.store.get_snapshot(q.tag.as_str())? {
                Some(p) if ready_with_memory(&p, &q.memory_digest) => {
                    Some(self.layout.snapshot_dir(&p.tag).join("mem"))
                }
                _ => {
                    return Err(Error::FailedPrecondition(format!(
                        "the archive is a layer over snapshot {:?} ({}), which this host does not have",
                        q.tag.as_str(),
                        q.memory_digest
                    )));
                }
            },
        };
        let expanded: u64 = m.snapshots.iter().map(|e| e.record.mem_bytes()).sum();
        self.admit_snapshot_write("import", m.total_bytes() + expanded)?;
        Ok(parent)
    }

    /// Imports the archive on `input`: the top snapshot under `rename` when
    /// given, owned by `owner`. Returns the top snapshot's record.
    pub async fn import_archive<R: AsyncRead + Unpin + Send>(
        self: &Arc<Self>,
        input: R,
        rename: Option<Tag>,
        owner: String,
    ) -> Result<SnapshotRecord> {
        let archive = pack::read::open(input).await?;
        let outside_parent = self.check_import(&archive.manifest, rename.as_ref())?;
        self.in_staging("import", |staging| async move {
            let manifest = archive.read_files(&staging).await?;
            // Everything arrived: from here on the work is the runtime's,
            // whatever the client does.
            let rt = self.clone();
            tokio::spawn(async move { rt.finish_import(manifest, &staging, outside_parent, rename, owner).await })
                .await
                .map_err(|e| Error::internal("import", e))?
        })
        .await
    }

    /// Runs `work` in a new staging dir `<what>.<nonce>`, ledgered and
    /// leased: whatever is left there is removed when `work` ends, however
    /// it ends.
    pub(super) async fn in_staging<T, F, Fut>(self: &Arc<Self>, what: &str, work: F) -> Result<T>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let staging = self.layout.staging_dir().join(format!("{what}.{}", ids::nonce()));
        self.store.ledger_add("staging", &staging.display().to_string(), what)?;
        let staged = self.lease(Resource::Staging(staging.clone()));
        let result = async {
            tokio::fs::create_dir_all(&staging).await.map_err(|e| Error::internal("create staging dir", e))?;
            work(staging.clone()).await
        }
        .await;
        drop(staged);
        self.release_dropped().await;
        result
    }

    /// Expands and verifies the staged snapshots and moves them into the
    /// store with their records: all of them or none.
    pub(super) async fn finish_import(
        self: &Arc<Self>,
        manifest: Manifest,
        staging: &Path,
        outside_parent: Option<PathBuf>,
        rename: Option<Tag>,
        owner: String,
    ) -> Result<SnapshotRecord> {
        let (st, m) = (staging.to_path_buf(), manifest.clone());
        crate::core::blocking::run(move || pack::read::expand(&st, &m, outside_parent.as_deref()))?;
        let n = manifest.snapshots.len();
        let mut rows = vec![];
        let mut placed = vec![];
        let mut added = vec![];
        let result: Result<SnapshotRecord> = async {
            let mut top = None;
            for (i, e) in manifest.snapshots.iter().enumerate() {
                let mut rec = e.record.clone();
                if i + 1 == n
                    && let Some(t) = &rename
                {
                    rec.tag = t.clone();
                }
                if i + 1 < n
                    && let Some(have) = self.store.get_snapshot(rec.tag.as_str())?
                    && ready_with_memory(&have, &rec.memory_digest)
                {
                    continue; // reused (checked before the files were read)
                }
                let final_dir = self.layout.snapshot_dir(&rec.tag);
                let image = self.resolve_image(&rec.image)?;
                if let Some(vm) = rec.vm.as_mut() {
                    vm.kernel = self.guest.kernel();
                    vm.initrd = self.guest.initrd();
                    vm.rootfs = image.path.clone();
                    vm.mem_file = final_dir.join("mem");
                    for d in vm.drives.iter_mut() {
                        d.path = self.layout.volume_slot_placeholder();
                    }
                }
                rec.owner = owner.clone();
                rec.shared = false;
                rec.status = SnapshotStatus::Writing;
                self.store.insert_snapshot(&rec)?;
                rows.push(self.lease(Resource::SnapshotRow(rec.tag.to_string())));
                let from = staging.join("snapshots").join(e.record.tag.as_str());
                if let Some(vm) = &rec.vm {
                    super::write_vm_json(&from, vm)?;
                }
                if final_dir.exists() {
                    return Err(Error::AlreadyExists(format!(
                        "snapshot {:?} already exists on disk",
                        rec.tag.as_str()
                    )));
                }
                std::fs::rename(&from, &final_dir).map_err(|e| Error::internal("rename snapshot into place", e))?;
                placed.push(self.lease(Resource::Staging(final_dir.clone())));
                rec.physical_size_bytes = layout::disk_usage(&final_dir);
                added.push(rec.clone());
                top = Some(rec);
            }
            for rec in added.iter_mut() {
                rec.status = SnapshotStatus::Ready;
                self.store.update_snapshot(rec)?;
            }
            top.ok_or_else(|| Error::Internal("the import added no snapshot".into()))
        }
        .await;
        match result {
            Ok(_) => {
                rows.into_iter().for_each(|l| l.commit());
                placed.into_iter().for_each(|l| l.commit());
                let top = added.last().cloned().expect("one snapshot added");
                for rec in &added {
                    self.events.emit_ws("snapshot_imported", "", "", rec.tag.as_str(), &rec.owner, "");
                }
                Ok(top)
            }
            Err(e) => {
                drop((rows, placed));
                self.release_dropped().await;
                Err(e)
            }
        }
    }
}
