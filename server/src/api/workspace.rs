//! WorkspaceService: named sandboxes that suspend and resume.

use forkd_api::v1::{self as api, workspace_service_server::WorkspaceService};
use tonic::{Request, Response, Status};

use super::Services;
use super::status::not_yet;

#[tonic::async_trait]
impl WorkspaceService for Services {
    async fn create_workspace(&self, _r: Request<api::CreateWorkspaceRequest>) -> Result<Response<api::Workspace>, Status> {
        Err(not_yet("CreateWorkspace"))
    }
    async fn get_workspace(&self, r: Request<api::GetWorkspaceRequest>) -> Result<Response<api::Workspace>, Status> {
        forkd_api::names::WorkspaceName::parse(&r.get_ref().name).map_err(crate::core::Error::from)?;
        Err(not_yet("GetWorkspace"))
    }
    async fn list_workspaces(&self, _r: Request<api::ListWorkspacesRequest>) -> Result<Response<api::ListWorkspacesResponse>, Status> {
        // No workspace can exist before CreateWorkspace exists: the empty list is the truth.
        Ok(Response::new(api::ListWorkspacesResponse::default()))
    }
    async fn suspend_workspace(&self, _r: Request<api::SuspendWorkspaceRequest>) -> Result<Response<api::Workspace>, Status> {
        Err(not_yet("SuspendWorkspace"))
    }
    async fn resume_workspace(&self, _r: Request<api::ResumeWorkspaceRequest>) -> Result<Response<api::Workspace>, Status> {
        Err(not_yet("ResumeWorkspace"))
    }
    async fn delete_workspace(&self, _r: Request<api::DeleteWorkspaceRequest>) -> Result<Response<api::DeleteWorkspaceResponse>, Status> {
        Err(not_yet("DeleteWorkspace"))
    }
}
