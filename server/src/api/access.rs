//! Who may touch what: every service call names its principal, and every
//! record it names is looked up as that principal sees it. A record another
//! tenant owns answers exactly as one that does not exist (NOT_FOUND with
//! the same message), so its existence is never revealed.

use std::sync::Arc;

use forkd_api::names::{SandboxId, Tag, WorkspaceName};
use tonic::{Request, Status};

use super::Services;
use crate::core::Error;
use crate::core::store::{SnapshotRecord, WorkspaceRecord};
use crate::core::tenants::Principal;
use crate::edge::audit::acted_on;

/// The principal a request was made as. The edge always sets one; a call
/// that did not pass through it (in-process tests) is the admin.
pub fn principal<T>(r: &Request<T>) -> Arc<Principal> {
    r.extensions().get::<Arc<Principal>>().cloned().unwrap_or_else(|| Arc::new(Principal::admin()))
}

fn sandbox_not_found(id: &SandboxId) -> Status {
    Error::NotFound(format!("sandbox {} not found", id.as_str())).into()
}

fn snapshot_not_found(tag: &Tag) -> Status {
    Error::NotFound(format!("snapshot {:?} not found", tag.as_str())).into()
}

fn workspace_not_found(name: &WorkspaceName) -> Status {
    Error::NotFound(format!("workspace {:?} not found", name.as_str())).into()
}

impl Services {
    /// A sandbox id the principal may act on (NOT_FOUND otherwise).
    pub(crate) async fn own_sandbox(&self, p: &Principal, raw: &str) -> Result<SandboxId, Status> {
        let id = SandboxId::parse(raw).map_err(Error::from)?;
        acted_on(format!("sandbox {id}"));
        if p.is_admin() {
            return Ok(id);
        }
        match self.rt.sandbox(&id).await {
            Ok(sb) if p.owns(&sb.snapshot().owner) => Ok(id),
            _ => Err(sandbox_not_found(&id)),
        }
    }

    /// Whether the principal may see a sandbox record (for listings).
    pub(crate) fn sees_sandbox(p: &Principal, owner: &str) -> bool {
        p.owns(owner)
    }

    /// A snapshot the principal may see and fork from: its own, or shared.
    pub(crate) fn usable_snapshot(&self, p: &Principal, tag: &Tag) -> Result<SnapshotRecord, Status> {
        acted_on(format!("snapshot {tag}"));
        let rec = self.rt.get_snapshot(tag)?;
        if p.may_use_snapshot(&rec.owner, rec.shared) { Ok(rec) } else { Err(snapshot_not_found(tag)) }
    }

    /// A snapshot the principal may change (delete, share): its own only.
    /// A shared snapshot of someone else's is visible, so changing it is
    /// PERMISSION_DENIED rather than NOT_FOUND.
    pub(crate) fn own_snapshot(&self, p: &Principal, tag: &Tag) -> Result<SnapshotRecord, Status> {
        let rec = self.usable_snapshot(p, tag)?;
        if p.owns(&rec.owner) {
            Ok(rec)
        } else {
            Err(Error::PermissionDenied(format!("snapshot {:?} is shared with you, not yours to change", tag.as_str()))
                .into())
        }
    }

    /// A workspace the principal may see and drive.
    pub(crate) fn own_workspace(&self, p: &Principal, name: &WorkspaceName) -> Result<WorkspaceRecord, Status> {
        acted_on(format!("workspace {name}"));
        let rec = self.rt.get_workspace(name)?;
        if p.owns(&rec.owner) { Ok(rec) } else { Err(workspace_not_found(name)) }
    }
}
