//! E2B sandboxes are forkd workspaces: the sandbox id is the workspace
//! name, the template its source snapshot, pause and resume are suspend and
//! resume (memory and running processes kept), the timeout is its TTL, and
//! its metadata and environment live on the workspace record. Sandbox
//! traffic may also name a plain forkd sandbox id.

use std::sync::Arc;

use forkd_api::names::{SandboxId, WorkspaceName};
use tonic::Status;

use crate::api::Services;
use crate::core::sandboxes::Sandbox;
use crate::core::state::WorkspaceStatus;
use crate::core::store::WorkspaceRecord;
use crate::core::tenants::Principal;

/// The envd version forkd answers as: the newest whose features it serves
/// (stdin close, octet-stream uploads, default user); the SDKs gate
/// features on it.
pub const ENVD_VERSION: &str = "0.5.7";

/// A new E2B sandbox id (a valid workspace name).
pub fn new_id() -> WorkspaceName {
    WorkspaceName::parse(&format!("i{}", crate::core::ids::random_name(19))).expect("generated names are valid")
}

/// "The sandbox was not found" as E2B's SDKs recognise it on sandbox
/// traffic (a sandbox that is paused, gone, or not the caller's).
pub fn not_running(id: &str) -> Status {
    Status::unavailable(format!("The sandbox {id} was not found (it is paused, stopped or does not exist)"))
}

/// The workspace behind an E2B sandbox id, as the principal may see it
/// (NOT_FOUND otherwise).
pub fn workspace(s: &Services, p: &Principal, id: &str) -> Result<WorkspaceRecord, Status> {
    let name = WorkspaceName::parse(id).map_err(|_| Status::not_found(format!("sandbox {id:?} not found")))?;
    s.own_workspace(p, &name).map_err(|_| Status::not_found(format!("sandbox {id:?} not found")))
}

/// The running VM that sandbox traffic for `id` goes to, with the
/// workspace (for its environment) when it is one.
pub async fn live(s: &Services, p: &Principal, id: &str) -> Result<(Arc<Sandbox>, Option<WorkspaceRecord>), Status> {
    if let Ok(ws) = workspace(s, p, id) {
        if ws.status != WorkspaceStatus::Running {
            return Err(not_running(id));
        }
        let sid = SandboxId::parse(&ws.live_sandbox_id).map_err(|_| not_running(id))?;
        let sb = s.rt.agent_of(&sid).await.map_err(|_| not_running(id))?;
        return Ok((sb, Some(ws)));
    }
    let sid = s.own_sandbox(p, id).await.map_err(|_| not_running(id))?;
    let sb = s.rt.agent_of(&sid).await.map_err(|_| not_running(id))?;
    Ok((sb, None))
}
