//! WorkspaceService: named sandboxes that suspend and resume.

use forkd_api::names::{Tag, WorkspaceName};
use forkd_api::v1::{self as api, workspace_service_server::WorkspaceService};
use tonic::{Request, Response, Status};

use super::Services;
use super::access::principal;
use crate::core::Error;
use crate::core::store::{SandboxSettings, WorkspaceRecord};

fn name(v: &str) -> Result<WorkspaceName, Status> {
    Ok(WorkspaceName::parse(v).map_err(Error::from)?)
}

pub fn workspace(r: &WorkspaceRecord) -> api::Workspace {
    let s = &r.settings;
    api::Workspace {
        name: r.name.to_string(),
        status: r.status.as_str().into(),
        status_reason: r.status_reason.clone(),
        live_sandbox_id: r.live_sandbox_id.clone(),
        source_snapshot_tag: r.source_snapshot_tag.to_string(),
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
        owner: r.owner.clone(),
    }
}

#[tonic::async_trait]
impl WorkspaceService for Services {
    async fn create_workspace(
        &self,
        r: Request<api::CreateWorkspaceRequest>,
    ) -> Result<Response<api::Workspace>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let n = name(&r.name)?;
        crate::edge::audit::acted_on(format!("workspace {n}"));
        let source = Tag::parse_field(&r.snapshot_tag, "snapshot_tag").map_err(Error::from)?;
        let settings = SandboxSettings {
            memory_limit_mib: r.memory_limit_mib,
            cpu_quota: r.cpu_quota,
            network: super::sandbox::network_of(&r.network, r.per_child_netns)?,
            labels: r.labels.into_iter().collect(),
            ttl_secs: r.ttl_secs,
            idle_timeout_secs: r.idle_timeout_secs,
            volumes: super::sandbox::volume_specs(&r.volumes, &self.rt.config.volume_root)?,
            ..Default::default()
        };
        self.rt.check_network(&settings)?;
        // Inputs first: a bad request is a 400 whether or not the snapshot
        // exists (or may be seen).
        self.rt.pull_if_missing(&source, p.owner(), None).await?;
        self.usable_snapshot(&p, &source)?;
        let by = (*p).clone();
        let rec = self
            .owned("create workspace", |rt| async move { rt.create_workspace(n, source, settings, by).await })
            .await?;
        Ok(Response::new(workspace(&rec)))
    }

    async fn get_workspace(&self, r: Request<api::GetWorkspaceRequest>) -> Result<Response<api::Workspace>, Status> {
        let n = name(&r.get_ref().name)?;
        Ok(Response::new(workspace(&self.own_workspace(&principal(&r), &n)?)))
    }

    async fn list_workspaces(
        &self,
        r: Request<api::ListWorkspacesRequest>,
    ) -> Result<Response<api::ListWorkspacesResponse>, Status> {
        let p = principal(&r);
        let workspaces = self.rt.list_workspaces()?.iter().filter(|w| p.owns(&w.owner)).map(workspace).collect();
        Ok(Response::new(api::ListWorkspacesResponse { workspaces, next_page_token: String::new() }))
    }

    async fn suspend_workspace(
        &self,
        r: Request<api::SuspendWorkspaceRequest>,
    ) -> Result<Response<api::Workspace>, Status> {
        let n = name(&r.get_ref().name)?;
        if r.get_ref().diff == Some(true) {
            return Err(Error::FailedPrecondition(
                "diff: a workspace's state is always a flat snapshot here (each suspend drops the previous \
                 state, so chains never grow); omit `diff` or pass false"
                    .into(),
            )
            .into());
        }
        self.own_workspace(&principal(&r), &n)?;
        let rec = self.owned("suspend workspace", |rt| async move { rt.suspend_workspace(&n).await }).await?;
        Ok(Response::new(workspace(&rec)))
    }

    async fn resume_workspace(
        &self,
        r: Request<api::ResumeWorkspaceRequest>,
    ) -> Result<Response<api::Workspace>, Status> {
        let p = principal(&r);
        let n = name(&r.get_ref().name)?;
        self.own_workspace(&p, &n)?;
        let by = (*p).clone();
        let rec = self.owned("resume workspace", |rt| async move { rt.resume_workspace(&n, by).await }).await?;
        Ok(Response::new(workspace(&rec)))
    }

    async fn delete_workspace(
        &self,
        r: Request<api::DeleteWorkspaceRequest>,
    ) -> Result<Response<api::DeleteWorkspaceResponse>, Status> {
        let n = name(&r.get_ref().name)?;
        self.own_workspace(&principal(&r), &n)?;
        let deleted_snapshots =
            self.owned("delete workspace", |rt| async move { rt.delete_workspace(&n).await }).await?;
        Ok(Response::new(api::DeleteWorkspaceResponse { deleted_snapshots }))
    }
}
