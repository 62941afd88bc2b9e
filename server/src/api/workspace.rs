//! WorkspaceService: named sandboxes that suspend and resume.

use forkd_api::names::{Tag, WorkspaceName};
use forkd_api::v1::{self as api, workspace_service_server::WorkspaceService};
use tonic::{Request, Response, Status};

use super::Services;
use crate::core::Error;
use crate::core::store::{SandboxSettings, WorkspaceRecord};

fn name(v: &str) -> Result<WorkspaceName, Status> {
    Ok(WorkspaceName::parse(v).map_err(Error::from)?)
}

pub fn workspace(r: &WorkspaceRecord) -> api::Workspace {
    let s = &r.settings;
    api::Workspace {
        name: r.name.clone(),
        status: r.status.clone(),
        status_reason: r.status_reason.clone(),
        live_sandbox_id: r.live_sandbox_id.clone(),
        source_snapshot_tag: r.source_snapshot_tag.clone(),
        state_tag: r.state_tag.clone(),
        memory_limit_mib: s.memory_limit_mib,
        cpu_quota: s.cpu_quota,
        network: if s.network.is_empty() { "none".into() } else { s.network.clone() },
        volumes: s.volumes.clone(),
        labels: s.labels.clone().into_iter().collect(),
        ttl_secs: s.ttl_secs,
        idle_timeout_secs: s.idle_timeout_secs,
        created_at_unix: r.created_at_unix,
        updated_at_unix: r.updated_at_unix,
        suspended_at_unix: r.suspended_at_unix,
    }
}

#[tonic::async_trait]
impl WorkspaceService for Services {
    async fn create_workspace(
        &self,
        r: Request<api::CreateWorkspaceRequest>,
    ) -> Result<Response<api::Workspace>, Status> {
        let r = r.into_inner();
        let n = name(&r.name)?;
        let source = Tag::parse_field(&r.snapshot_tag, "snapshot_tag").map_err(Error::from)?;
        let settings = SandboxSettings {
            memory_limit_mib: r.memory_limit_mib,
            cpu_quota: r.cpu_quota,
            network: if r.network.is_empty() { "none".into() } else { r.network },
            labels: r.labels.into_iter().collect(),
            ttl_secs: r.ttl_secs,
            idle_timeout_secs: r.idle_timeout_secs,
            volumes: super::sandbox::volume_specs(&r.volumes, &self.rt.config.volume_root)?,
            ..Default::default()
        };
        self.rt.check_network(&settings)?;
        let rec = self.rt.create_workspace(n, source, settings).await?;
        Ok(Response::new(workspace(&rec)))
    }

    async fn get_workspace(&self, r: Request<api::GetWorkspaceRequest>) -> Result<Response<api::Workspace>, Status> {
        let n = name(&r.get_ref().name)?;
        Ok(Response::new(workspace(&self.rt.get_workspace(&n)?)))
    }

    async fn list_workspaces(
        &self,
        _r: Request<api::ListWorkspacesRequest>,
    ) -> Result<Response<api::ListWorkspacesResponse>, Status> {
        let workspaces = self.rt.list_workspaces()?.iter().map(workspace).collect();
        Ok(Response::new(api::ListWorkspacesResponse { workspaces, next_page_token: String::new() }))
    }

    async fn suspend_workspace(
        &self,
        r: Request<api::SuspendWorkspaceRequest>,
    ) -> Result<Response<api::Workspace>, Status> {
        let n = name(&r.get_ref().name)?;
        Ok(Response::new(workspace(&self.rt.suspend_workspace(&n).await?)))
    }

    async fn resume_workspace(
        &self,
        r: Request<api::ResumeWorkspaceRequest>,
    ) -> Result<Response<api::Workspace>, Status> {
        let n = name(&r.get_ref().name)?;
        Ok(Response::new(workspace(&self.rt.resume_workspace(&n).await?)))
    }

    async fn delete_workspace(
        &self,
        r: Request<api::DeleteWorkspaceRequest>,
    ) -> Result<Response<api::DeleteWorkspaceResponse>, Status> {
        let n = name(&r.get_ref().name)?;
        let deleted_snapshots = self.rt.delete_workspace(&n).await?;
        Ok(Response::new(api::DeleteWorkspaceResponse { deleted_snapshots }))
    }
}
