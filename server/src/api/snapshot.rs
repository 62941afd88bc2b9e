//! SnapshotService.

use std::pin::Pin;
use std::time::Duration;

use forkd_api::names::Tag;
use forkd_api::v1::{self as api, snapshot_service_server::SnapshotService};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::Services;
use super::access::principal;
use super::convert;
use crate::core::Error;
use crate::core::snapshots::CreateSnapshot;
use crate::core::snapshots::SnapshotView;
use crate::core::snapshots::transfer::ExportMode;
use crate::core::store::SnapshotStatus;
use crate::core::tenants::Principal;
use crate::memory::pack;

type ChunkStream = Pin<Box<dyn Stream<Item = Result<api::DataChunk, Status>> + Send>>;

/// Bytes buffered between the archive writer and an export's stream.
const EXPORT_PIPE: usize = 256 << 10;

fn tag(field: &'static str, v: &str) -> Result<Tag, Status> {
    Ok(Tag::parse_field(v, field).map_err(Error::from)?)
}

#[tonic::async_trait]
impl SnapshotService for Services {
    async fn create_snapshot(&self, r: Request<api::CreateSnapshotRequest>) -> Result<Response<api::Snapshot>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let t = tag("tag", &r.tag)?;
        crate::edge::audit::acted_on(format!("snapshot {t}"));
        let volumes = crate::core::volumes::parse_all(&r.volumes, &self.rt.config.volume_root)?;
        let (image, warning) = self.reference_boot_fields(&r)?;
        // The reference's create returns the snapshot taken; so does one
        // asked in its form, unless it says otherwise.
        let reference_form =
            !r.rootfs.is_empty() || !r.kernel.is_empty() || r.rw.is_some() || !r.tap.is_empty() || r.boot_wait_secs > 0;
        let wait = r.wait.unwrap_or(reference_form);
        let req = CreateSnapshot {
            tag: t.clone(),
            image,
            min_warm: Duration::from_secs(r.boot_wait_secs as u64),
            vcpus: if r.vcpus == 0 { 1 } else { r.vcpus },
            mem_mib: if r.mem_mib == 0 { 256 } else { r.mem_mib },
            warm_timeout: Duration::from_secs(if r.warm_timeout_secs == 0 { 300 } else { r.warm_timeout_secs as u64 }),
            warm_eval: r.warm_eval,
            labels: r.labels.into_iter().collect(),
            volumes,
            owner: p.owner(),
        };
        self.owned("snapshot", |rt| async move { rt.create_snapshot(req).await }).await?;
        if wait {
            loop {
                let rec = self.rt.get_snapshot(&t)?;
                if rec.status != SnapshotStatus::Writing {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let view = self.rt.snapshot_view(&t).await?;
        let mut out = self.snapshot_for(&p, view).await;
        out.warning = warning;
        Ok(Response::new(out))
    }

    async fn list_pools(&self, r: Request<api::ListPoolsRequest>) -> Result<Response<api::ListPoolsResponse>, Status> {
        let p = principal(&r);
        let pools = self
            .rt
            .pool_list()
            .into_iter()
            .filter(
                |i| matches!(self.rt.store.get_snapshot(&i.tag), Ok(Some(s)) if p.may_use_snapshot(&s.owner, s.shared)),
            )
            .map(convert::pool)
            .collect();
        Ok(Response::new(api::ListPoolsResponse { pools }))
    }

    async fn set_pool(&self, r: Request<api::SetPoolRequest>) -> Result<Response<api::Pool>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let t = tag("tag", &r.tag)?;
        if !p.is_admin() {
            return Err(Error::PermissionDenied("only an admin may size a pool".into()).into());
        }
        let max = crate::core::pool::MAX_PER_SNAPSHOT;
        if r.target as usize > max {
            return Err(Error::invalid("target", format!("{} is outside 0..={max}", r.target)).into());
        }
        Ok(Response::new(convert::pool(self.rt.set_pool(&t, r.target as usize, &r.network).await?)))
    }

    async fn list_snapshots(
        &self,
        r: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<api::ListSnapshotsResponse>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let mut snapshots = vec![];
        for v in self.rt.list_snapshot_views().await? {
            if !p.may_use_snapshot(&v.record.owner, v.record.shared) {
                continue;
            }
            let s = self.snapshot_for(&p, v).await;
            if r.status.is_empty() || s.status == r.status {
                snapshots.push(s);
            }
        }
        Ok(Response::new(api::ListSnapshotsResponse { snapshots, next_page_token: String::new() }))
    }

    async fn get_snapshot(&self, r: Request<api::GetSnapshotRequest>) -> Result<Response<api::Snapshot>, Status> {
        let p = principal(&r);
        let t = tag("tag", &r.get_ref().tag)?;
        self.usable_snapshot(&p, &t)?;
        let view = self.rt.snapshot_view(&t).await?;
        Ok(Response::new(self.snapshot_for(&p, view).await))
    }

    async fn delete_snapshot(
        &self,
        r: Request<api::DeleteSnapshotRequest>,
    ) -> Result<Response<api::DeleteSnapshotResponse>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let t = tag("tag", &r.tag)?;
        if r.cascade && r.force {
            return Err(Error::InvalidArgument(
                "invalid cascade/force: choose one of cascade (delete dependents) and force (orphan them)".into(),
            )
            .into());
        }
        self.own_snapshot(&p, &t)?;
        if !p.is_admin() && (r.cascade || r.force) && !self.owns_subtree(&p, &t)? {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {:?} has dependents that are not yours; it cannot be deleted with cascade or force",
                t.as_str()
            ))
            .into());
        }
        let (cascade, force, t2) = (r.cascade, r.force, t.clone());
        let (deleted, orphaned) =
            self.owned("delete snapshot", |rt| async move { rt.delete_snapshot(&t2, cascade, force).await }).await?;
        Ok(Response::new(api::DeleteSnapshotResponse { deleted, orphaned }))
    }

    async fn compact_snapshot(
        &self,
        r: Request<api::CompactSnapshotRequest>,
    ) -> Result<Response<api::Snapshot>, Status> {
        let p = principal(&r);
        let from = tag("tag", &r.get_ref().tag)?;
        let to = tag("to", &r.get_ref().to)?;
        self.usable_snapshot(&p, &from)?;
        let owner = p.owner();
        let rec = self.owned("compact", |rt| async move { rt.compact(&from, &to, owner).await }).await?;
        let view = self.rt.view_of(rec).await?;
        Ok(Response::new(self.snapshot_for(&p, view).await))
    }

    async fn derive_snapshot(&self, r: Request<api::DeriveSnapshotRequest>) -> Result<Response<api::Snapshot>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let from = tag("from_tag", &r.from_tag)?;
        let to = tag("tag", &r.tag)?;
        if r.exec.is_empty() {
            return Err(Error::invalid("exec", "must name a command").into());
        }
        self.usable_snapshot(&p, &from)?;
        let by = (*p).clone();
        let secs = if r.timeout_secs == 0 { 300 } else { r.timeout_secs.min(24 * 3600) };
        let exec = r.exec;
        let rec =
            self.owned("derive", |rt| async move {
                rt.derive(&from, &to, exec, Duration::from_secs(secs as u64), by).await
            })
            .await?;
        let view = self.rt.view_of(rec).await?;
        Ok(Response::new(self.snapshot_for(&p, view).await))
    }

    async fn share_snapshot(&self, r: Request<api::ShareSnapshotRequest>) -> Result<Response<api::Snapshot>, Status> {
        let p = principal(&r);
        let t = tag("tag", &r.get_ref().tag)?;
        self.own_snapshot(&p, &t)?;
        if !p.is_admin() {
            return Err(Error::PermissionDenied("only an admin may share or unshare a snapshot".into()).into());
        }
        let rec = self.rt.share_snapshot(&t, r.get_ref().shared)?;
        let view = self.rt.view_of(rec).await?;
        Ok(Response::new(self.snapshot_for(&p, view).await))
    }

    type ExportSnapshotStream = ChunkStream;

    async fn export_snapshot(
        &self,
        r: Request<api::ExportSnapshotRequest>,
    ) -> Result<Response<Self::ExportSnapshotStream>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let t = tag("tag", &r.tag)?;
        self.usable_snapshot(&p, &t)?;
        let mode = match (r.layer_only, r.flat) {
            (true, true) => {
                return Err(Error::InvalidArgument(
                    "invalid layer_only/flat: choose one of layer_only (only its layer) and flat (one flat image)"
                        .into(),
                )
                .into());
            }
            (true, false) => ExportMode::LayerOnly,
            (false, true) => ExportMode::Flat,
            (false, false) => ExportMode::Chain,
        };
        for (field, note) in [("description", &r.description), ("base_image", &r.base_image)] {
            if let Some(e) = pack::manifest::note_error(note) {
                return Err(Error::invalid(field, e).into());
            }
        }
        let mut plan = self.rt.export_plan(&t, mode).await?;
        plan.manifest.description = r.description;
        plan.manifest.base_image = r.base_image;
        let manifest = serde_json::to_vec_pretty(&plan.manifest).map_err(|e| Error::internal("manifest", e))?;
        // The archive is written into one end of a bounded pipe and streamed
        // from the other: a slow client slows the writer, and a client that
        // goes away stops it.
        let (w, rd) = tokio::io::duplex(EXPORT_PIPE);
        let writer = tokio::spawn(pack::write::write(w, manifest, plan.sources));
        let data = tokio_util::io::ReaderStream::with_capacity(rd, EXPORT_PIPE)
            .map(|b| b.map(|data| api::DataChunk { data: data.to_vec() }).map_err(|e| Status::internal(e.to_string())));
        let outcome = futures::stream::once(async move {
            match writer.await {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(Err(Status::from(Error::from(e)))),
                Err(e) => Some(Err(Status::internal(format!("export: {e}")))),
            }
        })
        .filter_map(|x| async move { x });
        Ok(Response::new(Box::pin(data.chain(outcome)) as ChunkStream))
    }

    async fn import_snapshot(
        &self,
        r: Request<Streaming<api::ImportSnapshotRequest>>,
    ) -> Result<Response<api::Snapshot>, Status> {
        let p = principal(&r);
        let mut s = r.into_inner();
        let first = s.message().await?.ok_or_else(|| Error::invalid("data", "the archive is empty"))?;
        let rename = if first.tag.is_empty() { None } else { Some(tag("tag", &first.tag)?) };
        if let Some(t) = &rename {
            crate::edge::audit::acted_on(format!("snapshot {t}"));
        }
        let head = futures::stream::once(async move { Ok::<_, std::io::Error>(bytes::Bytes::from(first.data)) });
        let rest = s.map(|m| {
            m.map(|m| bytes::Bytes::from(m.data)).map_err(|st| std::io::Error::other(st.message().to_string()))
        });
        let input = tokio_util::io::StreamReader::new(Box::pin(head.chain(rest)));
        let rec = self.rt.import_archive(input, rename, p.owner()).await?;
        crate::edge::audit::acted_on(format!("snapshot {}", rec.tag));
        let view = self.rt.view_of(rec).await?;
        Ok(Response::new(self.snapshot_for(&p, view).await))
    }

    async fn push_snapshot(
        &self,
        r: Request<api::PushSnapshotRequest>,
    ) -> Result<Response<api::PushSnapshotResponse>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let t = tag("tag", &r.tag)?;
        self.named_remote(&r.remote)?;
        self.usable_snapshot(&p, &t)?;
        if !p.is_admin() {
            // A remote's tags are shared by every node and every tenant.
            return Err(Error::PermissionDenied("only an admin may push to the remote".into()).into());
        }
        let rt = self.rt.clone();
        let report = crate::core::operations::owned("push", async move { rt.push_snapshot(&t).await }, None).await?;
        Ok(Response::new(api::PushSnapshotResponse {
            url: report.url,
            bytes: report.uploaded_bytes,
            uploaded_blobs: report.uploaded_blobs,
            present_blobs: report.present_blobs,
            total_bytes: report.total_bytes,
            manifest_written: report.manifest_written,
            seconds: report.seconds,
        }))
    }

    async fn pull_snapshot(&self, r: Request<api::PullSnapshotRequest>) -> Result<Response<api::Snapshot>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let t = tag("tag", &r.tag)?;
        self.named_remote(&r.remote)?;
        if let Some(have) = self.rt.store.get_snapshot(t.as_str())?
            && !p.may_use_snapshot(&have.owner, have.shared)
        {
            // Another tenant's tag: as if it were not here, and not ours to replace.
            return Err(Error::AlreadyExists(format!("snapshot {:?} already exists here", t.as_str())).into());
        }
        let (rt, owner, pulled) = (self.rt.clone(), p.owner(), t.clone());
        let rec =
            crate::core::operations::owned("pull", async move { rt.pull_snapshot(&pulled, owner).await }, None).await?;
        let view = self.rt.view_of(rec).await?;
        Ok(Response::new(self.snapshot_for(&p, view).await))
    }

    async fn list_remote_snapshots(
        &self,
        _r: Request<api::ListRemoteSnapshotsRequest>,
    ) -> Result<Response<api::ListRemoteSnapshotsResponse>, Status> {
        let url = self.rt.remote()?.url().to_string();
        let snapshots = self
            .rt
            .remote_tags()
            .await?
            .into_iter()
            .map(|t| api::RemoteSnapshot {
                tag: t.tag.to_string(),
                pushed_unix: t.pushed_unix,
                manifest_bytes: t.manifest_bytes,
            })
            .collect();
        Ok(Response::new(api::ListRemoteSnapshotsResponse { url, snapshots }))
    }
}

impl Services {
    /// Checks a request's `remote`: empty or the daemon's own URL. A client
    /// never chooses where the daemon reads or writes.
    fn named_remote(&self, asked: &str) -> Result<(), Status> {
        let remote = self.rt.remote()?;
        if !asked.is_empty() && asked != remote.url() {
            return Err(Error::InvalidArgument(format!(
                "invalid remote: this daemon uses only its configured remote {}; leave remote empty",
                remote.url()
            ))
            .into());
        }
        Ok(())
    }

    /// A snapshot as the principal may see it: dependents it may not see
    /// are left out, and a tenant counts only its own live sandboxes.
    async fn snapshot_for(&self, p: &Principal, mut view: SnapshotView) -> api::Snapshot {
        if !p.is_admin() {
            view.dependents.retain(|d| {
                self.rt.store.get_snapshot(d).ok().flatten().is_some_and(|r| p.may_use_snapshot(&r.owner, r.shared))
            });
        }
        let mut out = convert::snapshot(&view);
        if !p.is_admin() {
            out.live_sandboxes = self
                .rt
                .list_sandboxes(Some(view.record.tag.as_str()))
                .await
                .iter()
                .filter(|s| p.owns(&s.owner))
                .count() as u32;
        }
        out
    }

    /// Whether every snapshot below `tag` belongs to the principal.
    fn owns_subtree(&self, p: &Principal, tag: &Tag) -> Result<bool, Status> {
        let mut todo = vec![tag.to_string()];
        let mut seen = std::collections::HashSet::new();
        while let Some(t) = todo.pop() {
            if !seen.insert(t.clone()) {
                continue;
            }
            for child in self.rt.store.snapshot_children(&t).map_err(Status::from)? {
                match self.rt.store.get_snapshot(&child).map_err(Status::from)? {
                    Some(r) if p.owns(&r.owner) => todo.push(child),
                    Some(_) => return Ok(false),
                    None => {}
                }
            }
        }
        Ok(true)
    }
}

impl Services {
    /// The image of the daemon's guest images a `rootfs` path names (a
    /// request never boots an arbitrary host file).
    fn store_image_at(&self, rootfs: &str) -> Result<String, Status> {
        if !rootfs.starts_with('/') {
            // A bare `NAME.ext4` is image NAME: what `forkd parent build -o
            // NAME.ext4` made (the file itself lives in the daemon's store).
            let file = rootfs.strip_prefix("./").unwrap_or(rootfs);
            let name = file.strip_suffix(".ext4").or_else(|| file.strip_suffix(".erofs")).unwrap_or(file);
            return Ok(name.to_string());
        }
        let images = std::fs::canonicalize(self.rt.guest.dir.join("images")).ok();
        let path = std::fs::canonicalize(rootfs).ok();
        let name = path.as_ref().filter(|p| p.parent() == images.as_deref()).and_then(|p| {
            let ext = p.extension()?.to_str()?;
            matches!(ext, "ext4" | "erofs").then(|| p.file_stem()?.to_str().map(str::to_string))?
        });
        name.ok_or_else(|| {
            Error::invalid(
                "rootfs",
                format!(
                    "{rootfs:?} is not one of the daemon's images ({}); put the file system in the image store \
                     (`forkd image import`, `forkd image build`, docs/images.md) and name it in `image`",
                    self.rt.guest.dir.join("images").display()
                ),
            )
            .into()
        })
    }

    /// The reference's boot fields (`rootfs`, `kernel`, `rw`, `tap`) taken
    /// with their nearest meaning here: answers the image to boot and a
    /// warning for what was accepted but has no effect.
    fn reference_boot_fields(&self, r: &api::CreateSnapshotRequest) -> Result<(String, String), Status> {
        let image = match (r.image.as_str(), r.rootfs.as_str()) {
            (i, f) if !i.is_empty() && !f.is_empty() && i != f => {
                return Err(Error::invalid("rootfs", format!("{f:?} and image {i:?} name different images")).into());
            }
            ("", "") => "python".to_string(),
            ("", f) => self.store_image_at(f)?,
            (i, _) => i.to_string(),
        };
        if !r.kernel.is_empty() {
            let ours = self.rt.guest.kernel();
            let same = std::fs::canonicalize(&r.kernel)
                .ok()
                .zip(std::fs::canonicalize(&ours).ok())
                .is_some_and(|(a, b)| a == b);
            if !same {
                return Err(Error::FailedPrecondition(format!(
                    "kernel: forkd boots every guest with its own kernel ({}); omit `kernel` and name the root file \
                     system in `image` (or `rootfs`), or import it first with `forkd image import`",
                    ours.display()
                ))
                .into());
            }
        }
        let mut warnings = vec![];
        if r.rw == Some(false) {
            // The reference mounts an .ext4 root read-write whatever `rw`
            // says; every image here is written through a child's overlay.
            warnings.push(
                "rw false has no effect: the image is never written, each child writes to its own overlay over it"
                    .to_string(),
            );
        }
        if !r.tap.is_empty() {
            warnings.push(format!(
                "tap {:?} ignored: forkd gives each child a network of its own instead (fork with network \"nat\")",
                r.tap
            ));
        }
        let warning = warnings.join("; ");
        Ok((image, warning))
    }
}
