//! SnapshotService.

use std::pin::Pin;
use std::time::Duration;

use forkd_api::names::Tag;
use forkd_api::v1::{self as api, snapshot_service_server::SnapshotService};
use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::Services;
use super::convert;
use super::status::not_yet;
use crate::core::Error;
use crate::core::snapshots::CreateSnapshot;
use crate::core::store::SnapshotStatus;

type ChunkStream = Pin<Box<dyn Stream<Item = Result<api::DataChunk, Status>> + Send>>;

fn tag(field: &'static str, v: &str) -> Result<Tag, Status> {
    Ok(Tag::parse_field(v, field).map_err(Error::from)?)
}

#[tonic::async_trait]
impl SnapshotService for Services {
    async fn create_snapshot(&self, r: Request<api::CreateSnapshotRequest>) -> Result<Response<api::Snapshot>, Status> {
        let r = r.into_inner();
        let t = tag("tag", &r.tag)?;
        let volumes = crate::core::volumes::parse_all(&r.volumes, &self.rt.config.volume_root)?;
        let req = CreateSnapshot {
            tag: t.clone(),
            image: if r.image.is_empty() { "python".into() } else { r.image },
            vcpus: if r.vcpus == 0 { 1 } else { r.vcpus },
            mem_mib: if r.mem_mib == 0 { 256 } else { r.mem_mib },
            warm_timeout: Duration::from_secs(if r.warm_timeout_secs == 0 { 300 } else { r.warm_timeout_secs as u64 }),
            warm_eval: r.warm_eval,
            labels: r.labels.into_iter().collect(),
            volumes,
        };
        self.rt.create_snapshot(req).await?;
        if r.wait {
            loop {
                let rec = self.rt.get_snapshot(&t)?;
                if rec.status != SnapshotStatus::Writing {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let view = self.rt.snapshot_view(&t).await?;
        Ok(Response::new(convert::snapshot(&view)))
    }

    async fn list_snapshots(
        &self,
        r: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<api::ListSnapshotsResponse>, Status> {
        let r = r.into_inner();
        let snapshots = self
            .rt
            .list_snapshot_views()
            .await?
            .iter()
            .map(convert::snapshot)
            .filter(|s| r.status.is_empty() || s.status == r.status)
            .collect();
        Ok(Response::new(api::ListSnapshotsResponse { snapshots, next_page_token: String::new() }))
    }

    async fn get_snapshot(&self, r: Request<api::GetSnapshotRequest>) -> Result<Response<api::Snapshot>, Status> {
        let t = tag("tag", &r.get_ref().tag)?;
        let view = self.rt.snapshot_view(&t).await?;
        Ok(Response::new(convert::snapshot(&view)))
    }

    async fn delete_snapshot(
        &self,
        r: Request<api::DeleteSnapshotRequest>,
    ) -> Result<Response<api::DeleteSnapshotResponse>, Status> {
        let r = r.into_inner();
        let t = tag("tag", &r.tag)?;
        let (deleted, orphaned) = self.rt.delete_snapshot(&t, r.cascade, r.force).await?;
        Ok(Response::new(api::DeleteSnapshotResponse { deleted, orphaned }))
    }

    async fn compact_snapshot(
        &self,
        r: Request<api::CompactSnapshotRequest>,
    ) -> Result<Response<api::Snapshot>, Status> {
        let from = tag("tag", &r.get_ref().tag)?;
        let to = tag("to", &r.get_ref().to)?;
        let rec = self.rt.compact(&from, &to).await?;
        let view = self.rt.view_of(rec).await?;
        Ok(Response::new(convert::snapshot(&view)))
    }

    async fn derive_snapshot(&self, r: Request<api::DeriveSnapshotRequest>) -> Result<Response<api::Snapshot>, Status> {
        let r = r.into_inner();
        let from = tag("from_tag", &r.from_tag)?;
        let to = tag("tag", &r.tag)?;
        let secs = if r.timeout_secs == 0 { 300 } else { r.timeout_secs.min(24 * 3600) };
        let rec = self.rt.derive(&from, &to, r.exec, Duration::from_secs(secs as u64)).await?;
        let view = self.rt.view_of(rec).await?;
        Ok(Response::new(convert::snapshot(&view)))
    }

    type ExportSnapshotStream = ChunkStream;

    async fn export_snapshot(
        &self,
        _r: Request<api::ExportSnapshotRequest>,
    ) -> Result<Response<Self::ExportSnapshotStream>, Status> {
        Err(not_yet("ExportSnapshot"))
    }

    async fn import_snapshot(
        &self,
        _r: Request<Streaming<api::ImportSnapshotRequest>>,
    ) -> Result<Response<api::Snapshot>, Status> {
        Err(not_yet("ImportSnapshot"))
    }

    async fn push_snapshot(
        &self,
        _r: Request<api::PushSnapshotRequest>,
    ) -> Result<Response<api::PushSnapshotResponse>, Status> {
        Err(not_yet("PushSnapshot"))
    }

    async fn pull_snapshot(&self, _r: Request<api::PullSnapshotRequest>) -> Result<Response<api::Snapshot>, Status> {
        Err(not_yet("PullSnapshot"))
    }
}
